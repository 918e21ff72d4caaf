"""One-change ablations: our scripts with one function replaced by the paper code's choice.

Each ablation takes a private copy of a script (sbb_baseline_dqn.load_script, so the imported
modules stay untouched), replaces one function with what the paper's code
(proroklab/memory-monoids) does, and runs the script's own `train`:

  sbb_loss          SBB's loss as huber(masked mean of |TD error|), not the masked mean of
                    per-step Huber losses (SBB only)
  rescan_target     Q(o_t+1) from scanning the next-observation tape with the same start flags,
                    so the target's memory never sees o_0 (the first observation of its episode
                    or segment), not the prefix state after o_t combined with o_t+1
  lt_normaliser     linear attention normalised by (sum z)(sum phi(q)), not phi(q) . z
                    (linear transformer only)
  episodes_by_length  training tapes of episodes drawn in proportion to their length (a random
                    stored step brings its episode), not uniformly (TBB only; our sampler before
                    uniform episode draws became the default, which the paper's code also uses)
  first_network     our first embedding and Q head, the scripts' default before the paper
                    code's network replaced it: one LayerNorm with a learned scale and bias, and a
                    head of one Linear-leaky-ReLU layer with the default start (zero biases), not
                    two Linear-LayerNorm-leaky-ReLU blocks and value and advantage layers that
                    start 10x smaller. With FFM: 365,257 parameters (the default 430,537)
  small_head_init   first_network with its value and advantage layers starting 10x smaller
                    (one part of the default network; give first_network too)
  head_layernorm    first_network with a LayerNorm (no scale or bias) after the head's hidden
                    layer, before its leaky ReLU (another part; give first_network too)
  paper_lt_block    the paper code's linear-attention block around the same scan: keys and
                    queries without bias, a three-layer MLP, an output LayerNorm with a learned
                    scale and bias, every other bias uniform like equinox's (linear transformer
                    only; its 349,205 parameters, the default 282,933)
  fixed_eval_seeds  every evaluation plays the same episodes (the paper's fixed eval seeds), not
                    fresh ones; reproduce.py plots the best-so-far curve of any run

The paper's collection (one env, one whole episode with the current network before each update)
needs no code: it is the flags --num-envs 1 --train-frequency <episode length>.

Run:   python benchmarks/ablations.py sbb_loss --memory ffm --segment-length 50 [script flags]
       python benchmarks/ablations.py rescan_target --memory lru [script flags]    (TBB)
       python benchmarks/ablations.py first_network+fixed_eval_seeds [script flags]  (several)
--segment-length picks SBB; without it the run is TBB. Every other flag is the script's.
"""

import os
import sys
from functools import partial

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sbb_baseline_dqn as sbb  # noqa: E402


def paper_sbb_loss(segment_q, params, target_params, batch, gamma, scan):
    """huber(mean |TD error| over real steps): the paper code's segment loss."""
    q_taken, target, mask = sbb.taken_q_and_targets(segment_q, params, target_params, batch,
                                                    gamma, scan)
    real = jnp.maximum(mask.sum(), 1)
    mean_abs_error = jnp.where(mask, jnp.abs(q_taken - target), 0.0).sum() / real
    return optax.huber_loss(mean_abs_error), {
        "q_values": jnp.where(mask, q_taken, 0.0).sum() / real, "density": mask.mean()}


def rescanned(q_tape):
    """q_tape whose Q(o_t+1) comes from its own scan of the next observations."""
    def q_tape_rescan(params, obs, next_obs, start, scan):
        return q_tape(params, obs, next_obs, start, scan)[0], q_tape(
            params, next_obs, next_obs, start, scan)[0]
    return q_tape_rescan


def paper_attention(params, state, x, eps=1e-6):
    """phi(q)^T S / ((sum z)(sum phi(q)) + eps) per head: the paper code's normaliser."""
    s, z = state
    q = jax.nn.elu(jnp.tensordot(x, params["attention"]["query"]["w"], axes=1)
                   + params["attention"]["query"]["b"]) + 1.0
    numerator = jnp.einsum("...hk,...hkv->...hv", q, s)
    denominator = z.sum(-1) * q.sum(-1) + eps
    a = numerator / denominator[..., None]
    return a.reshape(a.shape[:-2] + (-1,))


def episodes_by_length(sample_tape):
    """sample_tape with episodes drawn in proportion to their length, as a uniformly random
    stored step bringing its whole episode would (our scripts' sampler before uniform episode
    draws): it lists every stored step's episode as if it were an episode of its own."""
    def sample(tape, key, batch_size):
        capacity = tape.first_step.shape[0]
        head, j = tape.first_step[tape.oldest], jnp.arange(capacity)
        # the stored episodes' first steps counted from the oldest step, in order; then padding
        starts = jnp.where(j < tape.count, (tape.first_step[(tape.oldest + j) % capacity] - head)
                           % capacity, capacity)
        each_step = (head + starts[jnp.searchsorted(starts, j, side="right") - 1]) % capacity
        return sample_tape(tape._replace(first_step=each_step, oldest=jnp.int32(0),
                                         count=tape.size), key, batch_size)
    return sample


def eqx_uniform(key, shape, n_in):
    """Equinox's default start of a Linear layer's weight and bias: uniform in +-1/sqrt(n_in)."""
    bound = 1.0 / jnp.sqrt(n_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def eqx_linear(kw, kb, n_in, n_out):
    return {"w": eqx_uniform(kw, (n_in, n_out), n_in), "b": eqx_uniform(kb, (n_out,), n_in)}


def first_network(script):
    """Swap the script's embedding and Q head for our first ones."""
    init = script.init_params

    def init_params(key, obs_dim, num_actions, args):
        params, width = init(key, obs_dim, num_actions, args), args.hidden_size
        k = jax.random.split(jax.random.fold_in(key, 1), 3)
        params["embed_ln"] = {"scale": jnp.ones(width), "bias": jnp.zeros(width)}
        params["head"] = {"hidden": script.init_linear(k[0], width, width),
                          "value": script.init_linear(k[1], width, 1),
                          "advantage": script.init_linear(k[2], width, num_actions)}
        return params

    def embed(params, obs):
        return jax.nn.leaky_relu(script.layer_norm(script.linear(params["embed"], obs),
                                                   params["embed_ln"]))

    script.init_params, script.embed = init_params, embed
    script.q_head = partial(first_head, script, norm=False)


def first_head(script, params, y, norm):
    """Our first head: Q = V + A - mean(A) on one Linear(-LayerNorm if `norm`)-leaky-ReLU layer."""
    p = params["head"]
    hidden = script.linear(p["hidden"], y)
    hidden = jax.nn.leaky_relu(script.layer_norm(hidden) if norm else hidden)
    advantage = script.linear(p["advantage"], hidden)
    return script.linear(p["value"], hidden) + advantage - advantage.mean(-1, keepdims=True)


def small_head_init(script):
    """first_network's value and advantage layers start 10x smaller (the one part of the
    default head that is an initialisation, not a layer): which part matters."""
    init = script.init_params

    def init_params(key, obs_dim, num_actions, args):
        params = init(key, obs_dim, num_actions, args)
        for name in ("value", "advantage"):
            params["head"][name]["w"] = 0.1 * params["head"][name]["w"]
        return params

    script.init_params = init_params


def head_layernorm(script):
    """first_network's head with its hidden layer normalised as in the default's blocks
    (Linear -> LayerNorm without scale and bias -> leaky ReLU): which part matters."""
    script.q_head = partial(first_head, script, norm=True)


def paper_lt_block(script):
    """Swap our linear-attention block for the paper code's (its LinearAttention module); the
    normaliser stays the script's (lt_normaliser swaps that)."""
    init, input_map = script.init_params, script.input_map

    def init_params(key, obs_dim, num_actions, args):
        params, width = init(key, obs_dim, num_actions, args), args.hidden_size
        p = params["attention"]
        k = jax.random.split(jax.random.fold_in(key, 2), 8)

        for name in ("query", "key"):
            del p[name]["b"]
        p["value"]["b"] = eqx_uniform(k[0], p["value"]["b"].shape, width)
        n_a = p["mlp"]["hidden"]["w"].shape[0]  # heads * value size
        p["mlp"] = {"hidden": eqx_linear(k[1], k[2], n_a, width),
                    "middle": eqx_linear(k[3], k[4], width, width),
                    "out": eqx_linear(k[5], k[6], width, width)}
        p["skip"]["b"] = eqx_uniform(k[7], (width,), width)
        p["out_ln"] = {"scale": jnp.ones(width), "bias": jnp.zeros(width)}
        return params

    def unbiased(params):  # the script's functions, given keys and queries with zero bias
        p = params["attention"]
        return {**params, "attention": {**p, "query": {"w": p["query"]["w"], "b": 0.0},
                                        "key": {"w": p["key"]["w"], "b": 0.0}}}

    def output_map(params, state, x):
        p = params["attention"]
        h = jax.nn.leaky_relu(script.linear(p["mlp"]["hidden"], script.attention(
            unbiased(params), state, x)))
        h = jax.nn.leaky_relu(script.linear(p["mlp"]["middle"], h))
        mlp = script.linear(p["mlp"]["out"], h)
        return script.layer_norm(mlp + script.linear(p["skip"], x), p["out_ln"])

    def initial_carry(params, num_envs):
        _, heads, key_size = params["attention"]["key"]["w"].shape
        value_size = params["attention"]["value"]["w"].shape[-1]
        shape = (num_envs, heads, key_size)
        return script.identity_like((jnp.zeros(shape + (value_size,)), jnp.zeros(shape)))

    script.init_params, script.output_map = init_params, output_map
    script.input_map = lambda params, x: input_map(unbiased(params), x)
    script.initial_carry = initial_carry


def fixed_seed_evaluation(script):
    """Evaluate on the same episodes every time (the paper code's fixed eval seeds): reseed the
    eval envs before the script's own reset, whose episodes then repeat."""
    evaluate = script.evaluate

    def evaluate_fixed(params, eval_envs, num_episodes):
        eval_envs.reset(seed=1000)
        return evaluate(params, eval_envs, num_episodes)

    script.evaluate = evaluate_fixed


def ablated_script(ablations, memory, segment_length=None):
    """A private copy of the script (TBB, or SBB with `segment_length`) with the changes named in
    `ablations` ("+"-joined names, e.g. "first_network+fixed_eval_seeds")."""
    tbb = segment_length is None
    script = sbb.load_script(memory) if tbb else sbb.segment_script(memory, segment_length)
    names = ablations.split("+")
    if {"small_head_init", "head_layernorm"} & set(names) and "first_network" not in names:
        raise ValueError("small_head_init and head_layernorm change first_network: add it")
    for ablation in sorted(names, key=lambda name: name != "first_network"):  # that one first
        if ablation == "sbb_loss" and tbb:
            raise ValueError(f"{ablation} changes SBB only: give --segment-length")
        if ablation == "episodes_by_length" and not tbb:
            raise ValueError("episodes_by_length changes TBB only: leave out --segment-length")
        if ablation in ("lt_normaliser", "paper_lt_block") and memory != "linear_transformer":
            raise ValueError(f"{ablation} changes the linear transformer only: give --memory "
                             "linear_transformer")
        if ablation == "lt_normaliser":
            script.attention = paper_attention
        elif ablation == "episodes_by_length":
            script.sample_tape = episodes_by_length(script.sample_tape)
        elif ablation == "rescan_target":
            script.q_tape = rescanned(script.q_tape)
        elif ablation == "sbb_loss":
            pass  # below
        elif ablation == "first_network":
            first_network(script)
        elif ablation == "paper_lt_block":
            paper_lt_block(script)
        elif ablation == "small_head_init":
            small_head_init(script)
        elif ablation == "head_layernorm":
            head_layernorm(script)
        elif ablation == "fixed_eval_seeds":
            fixed_seed_evaluation(script)
        else:
            raise ValueError(f"unknown ablation {ablation!r}; known: {', '.join(ABLATIONS)}")
    if not tbb:  # SBB's loss holds its q_tape: give it the final one (rescanned or not)
        loss = paper_sbb_loss if "sbb_loss" in ablations.split("+") else sbb.masked_td_loss
        script.td_loss = partial(loss, partial(sbb.q_segments, script.q_tape))
    return script


ABLATIONS = ("sbb_loss", "rescan_target", "lt_normaliser", "episodes_by_length", "first_network",
             "small_head_init", "head_layernorm", "paper_lt_block", "fixed_eval_seeds")


def main(argv):
    fail = sbb.ffm_tbb_dqn.fail  # one line on stderr, exit code 2
    if argv[:1] in (["-h"], ["--help"]):  # "<ablation> --help": the script's flags as well
        print(__doc__.strip())
        sys.exit(0)
    if not argv or not set(argv[0].split("+")) <= set(ABLATIONS):
        fail(f"the first argument must be one or more of {', '.join(ABLATIONS)}, joined by +")
    ablation, flags = argv[0], argv[1:]
    # --memory and --segment-length pick the script: read as argparse reads them (--memory=lru)
    picks = sbb.ffm_tbb_dqn.Parser(add_help=False)
    picks.add_argument("--memory", choices=sbb.MEMORIES, default="ffm")
    picks.add_argument("--segment-length")
    picked, script_flags = picks.parse_known_args(flags)
    if picked.segment_length is not None:
        args = sbb.parse_args(flags)
        if args.stored_state:  # its own loss and buffer, which the ablations do not know
            fail("--stored-state and --burn-in are not for ablations: run sbb_baseline_dqn.py")
    else:  # TBB: --memory picks the script, which does not know the flag itself
        args = sbb.load_script(picked.memory).parse_args(script_flags)
        args.memory, args.segment_length = picked.memory, None
    try:
        script = ablated_script(ablation, args.memory, args.segment_length)
    except ValueError as e:
        fail(str(e))
    args.exp_name = f"{args.exp_name}_{ablation.replace('+', '_')}"
    # SBB's train runs the swapped script's train, which checks SBB's ring
    return script.train(args) if args.segment_length is None else sbb.train(args, script)


if __name__ == "__main__":
    main(sys.argv[1:])
