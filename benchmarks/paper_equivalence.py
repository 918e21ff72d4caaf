"""Does our linear transformer with the paper code's choices compute what the paper's code does?

The paper's code (proroklab/memory-monoids) runs in its own environment (equinox), outside this
project. Step 1, in that environment, builds its linear-attention Q network and writes its
parameters, a batch of segments, and its SBB loss, gradients and Q on that batch; or only the
initial parameters of one of its runs. Step 2, here, loads those parameters into our
linear_transformer_tbb_dqn.py (whose default network is the paper code's) with the ablations paper_lt_block+lt_normaliser+
sbb_loss+rescan_target and prints the largest differences. An `init` file is a --load-model
checkpoint for that ablated script: our run then starts from the paper run's own weights.

    <paper venv>/bin/python benchmarks/paper_equivalence.py paper --paper-src SRC --out paper.npz
    <paper venv>/bin/python benchmarks/paper_equivalence.py init --paper-src SRC --out init.npz \\
        --config SRC/experiments/repeat_first_easy/segment_linattn_50_20.yaml --seed 0
    python benchmarks/paper_equivalence.py compare paper.npz
"""

import argparse
import os
import sys

import numpy as np

ABLATIONS = "paper_lt_block+lt_normaliser+sbb_loss+rescan_target"  # its network is our default
OBS_DIM, ACTIONS, T, GAMMA = 6, 4, 6, 0.99  # RepeatFirstEasy's sizes; segments of 6 steps


def paper_network(src, memory_config, model_config, seed):
    """The paper code's Q network, built as its segment_dqn.py and tape_dqn.py build it."""
    sys.path.insert(0, src)
    from jax import random
    from memory.linear_transformer import LinearAttention
    from modules import RecurrentQNetwork
    _, model_key, memory_key = random.split(random.PRNGKey(seed), 3)
    memory = LinearAttention(**memory_config, key=memory_key)
    return RecurrentQNetwork((OBS_DIM,), ACTIONS, memory, model_config, model_key)


def our_names(tree):
    """The paper network's arrays (or gradients) under our --save-model names."""
    import equinox as eqx
    import jax
    p = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
         jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_inexact_array))[0]}
    key_size, value_size = p[".memory.key._fun.layers[0].weight"].shape[0], p[
        ".memory.value._fun.weight"].shape[0]
    width = p[".memory.skip._fun.weight"].shape[1]

    def linear(ours, theirs, head=False):  # equinox stores [out, in]; ours [in, out]
        w, b = (p[f"{theirs}.weight"], p.get(f"{theirs}.bias"))
        w, b = (w[0], b[0]) if head else (w, b)  # the head has an ensemble axis of 1
        out = {f"{ours}/w": w.T}
        return out if b is None else {**out, f"{ours}/b": b}

    names = {**linear("embed", ".pre._fun.net.layers[0]"),
             **linear("attention/skip", ".memory.skip._fun"),
             "attention/out_ln/scale": p[".memory.ln._fun.weight"],
             "attention/out_ln/bias": p[".memory.ln._fun.bias"]}
    for ours, theirs in (("key", ".memory.key._fun.layers[0]"), ("query",
                         ".memory.query._fun.layers[0]"), ("value", ".memory.value._fun")):
        size = key_size if ours != "value" else value_size  # one head
        names[f"attention/{ours}/w"] = p[f"{theirs}.weight"].T.reshape(width, 1, size)
        if ours == "value":
            names["attention/value/b"] = p[f"{theirs}.bias"].reshape(1, size)
    for ours, i in (("hidden", 0), ("middle", 2), ("out", 4)):
        names.update(linear(f"attention/mlp/{ours}", f".memory.mlp._fun.layers[{i}]"))
    for ours, theirs in (("block0", "post0._fun.net.layers[0]"), ("block1",
                         "post1._fun.net.layers[0]"), ("value", "value._fun"),
                         ("advantage", "advantage._fun")):
        names.update(linear(f"head/{ours}", f".q.{theirs}", head=True))
    return names


def segments(seed=0):
    """Three segments of T steps: an episode start, a continuation, and one that terminates at
    step 3 and is padded after it. next_observation[t] = observation[t + 1] within a segment."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(3, T + 1, OBS_DIM)).astype(np.float32)
    batch = {"observation": obs[:, :-1].copy(), "next_observation": obs[:, 1:].copy(),
             "action": rng.integers(0, ACTIONS, (3, T)).astype(np.int32),
             "next_reward": rng.normal(size=(3, T)).astype(np.float32),
             "start": np.zeros((3, T), bool), "next_terminated": np.zeros((3, T), bool),
             "mask": np.ones((3, T), bool)}
    batch["start"][[0, 2], 0] = True
    batch["next_terminated"][2, 3] = True
    batch["mask"][2, 4:] = False
    for name in ("observation", "next_observation", "next_reward"):
        batch[name][2, 4:] = 0.0
    return batch


def paper_side(args):
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    model = {"mlp_size": 256, "recurrent_size": 256, "dropout": 0.0, "ensemble_size": 1}
    net = paper_network(args.paper_src, {"input_size": 256, "key_size": 16, "value_size": 16},
                        model, args.seed)
    from losses import segment_ddqn_loss  # the paper's SBB loss (its path is set by now)
    batch = segments()
    (loss, _), grads = eqx.filter_value_and_grad(segment_ddqn_loss, has_aux=True)(
        net, eqx.tree_inference(net, True), {k: jnp.asarray(v) for k, v in batch.items()},
        GAMMA, jax.random.PRNGKey(0))
    q, _ = net(jnp.asarray(batch["observation"][0]), net.initial_state(),
               jnp.asarray(batch["start"][0]), jnp.asarray(batch["next_terminated"][0]),
               jax.random.PRNGKey(0))
    np.savez(args.out, loss=np.asarray(loss), q0=np.asarray(q)[0],
             **{f"param:{k}": v for k, v in our_names(net).items()},
             **{f"grad:{k}": v for k, v in our_names(grads).items()},
             **{f"batch:{k}": v for k, v in batch.items()})
    print(f"wrote {args.out}: loss {float(loss):.8f}")


def init_side(args):
    import yaml
    config = yaml.safe_load(open(args.config))
    net = paper_network(args.paper_src, config["model"]["memory"], config["model"], args.seed)
    np.savez(args.out, **our_names(net))
    print(f"wrote {args.out}: the initial parameters of {args.config} with --seed {args.seed}")


def compare(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ablations
    import jax
    import jax.numpy as jnp
    stored = dict(np.load(args.file))  # main() checked it holds what step `paper` writes
    script = ablations.ablated_script(ABLATIONS, "linear_transformer", T)
    template = script.init_params(jax.random.PRNGKey(0), OBS_DIM, ACTIONS, script.parse_args([]))
    params = {k.removeprefix("param:"): v for k, v in stored.items() if k.startswith("param:")}
    name = lambda key: jax.tree_util.keystr(key, simple=True, separator="/")  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(template)[0]
    if {name(k) for k, _ in leaves} != set(params) or any(
            params[name(k)].shape != leaf.shape for k, leaf in leaves):
        raise ValueError("its parameters are not those of our network with " + ABLATIONS)
    params = jax.tree_util.tree_map_with_path(lambda k, _: jnp.asarray(params[name(k)]), template)
    b = {k.removeprefix("batch:"): jnp.asarray(v) for k, v in stored.items()
         if k.startswith("batch:")}
    steps = script.Transition(b["observation"], b["action"], b["next_reward"],
                              b["next_observation"], b["next_terminated"],
                              jnp.zeros_like(b["next_terminated"]))
    start = jnp.zeros(T, bool).at[0].set(True)
    q0 = script.q_tape(params, steps.obs[0], steps.obs[0], start, "sequential")[0]
    (loss, _), grads = jax.value_and_grad(script.td_loss, has_aux=True)(
        params, params, (steps, b["mask"]), GAMMA, "sequential")
    flat = {name(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    theirs = {k: stored[f"grad:{k}"] for k in flat}
    worst = max(np.abs(flat[k] - theirs[k]).max() / (np.abs(theirs[k]).max() + 1e-30)
                for k in flat)
    q_gap = np.abs(np.asarray(q0) - stored["q0"]).max()
    print(f"Q of segment 0: largest |ours - paper| {q_gap:.1e}"
          f" (mean |Q| {np.abs(stored['q0']).mean():.1e})")
    print(f"SBB loss: ours {float(loss):.8f}, paper {float(stored['loss']):.8f}")
    print(f"gradients of all {len(flat)} arrays: largest difference relative to the array's "
          f"largest entry {worst:.1e}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, without argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def main():
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("paper", "init"):
        s = sub.add_parser(name, allow_abbrev=False)
        s.add_argument("--paper-src", required=True, help="a checkout of proroklab/memory-monoids")
        s.add_argument("--out", required=True)
        s.add_argument("--seed", type=int, default=0)
        if name == "init":
            s.add_argument("--config", required=True, help="one of its experiment yaml files")
    sub.add_parser("compare", allow_abbrev=False).add_argument(
        "file", help="the file written by step `paper`")
    args = p.parse_args()
    check_inputs(p, args)
    try:
        {"paper": paper_side, "init": init_side, "compare": compare}[args.step](args)
    except ValueError as e:
        p.error(f"{args.file}: {e}")


def check_inputs(p, args):
    """Bad input stops here in one line that names it, not in a traceback from a step."""
    import importlib.util
    if args.step == "compare":
        try:
            with np.load(args.file) as stored:
                missing = [k for k in ("loss", "q0", "batch:observation") if k not in stored]
        except (OSError, ValueError, EOFError) as e:
            p.error(f"{args.file}: not a file written by step `paper` ({e})")
        if missing:
            p.error(f"{args.file}: not a file written by step `paper` (no {', '.join(missing)})")
        return
    if not os.path.isfile(os.path.join(args.paper_src, "modules.py")):
        p.error(f"--paper-src {args.paper_src}: not a checkout of proroklab/memory-monoids "
                "(no modules.py)")
    if args.step == "init" and not os.path.isfile(args.config):
        p.error(f"--config {args.config}: no such file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: its folder does not exist")
    if importlib.util.find_spec("equinox") is None:
        p.error(f"step `{args.step}` runs in the paper code's environment: equinox is not "
                "installed in this one")


if __name__ == "__main__":
    main()
