"""Double DQN with a Fast and Forgetful Memory (FFM) memoroid and Tape-Based Batching.

Reference implementation of "Revisiting Recurrent Reinforcement Learning with Memoroids"
(Morad et al., NeurIPS 2024), in one file you can read top to bottom:

  (1) the FFM memoroid and its resettable scan      (paper Sec. 3, 4.1)
  (2) the recurrent Q network                        (paper Sec. 5)
  (3) the tape buffer                                (paper Sec. 4.2, Tape-Based Batching)
  (4) the double-DQN loss                            (paper Sec. 5)
  (5) the jitted training loop

Run:   python ffm_tbb_dqn.py                          # learns RepeatFirstEasy
       python ffm_tbb_dqn.py --env-id CountRecallEasy --total-timesteps 1000000
Help:  python ffm_tbb_dqn.py --help
"""

import argparse
import csv
import difflib
import json
import os
import sys
import time
from functools import partial
from typing import NamedTuple

import numpy as np


# ---------------------------------------------------------------------------------------------
# Command line. Every hyperparameter is a flag; the model's own sizes come first.
# ---------------------------------------------------------------------------------------------
def add_model_flags(parser):
    g = parser.add_argument_group("FFM model")
    g.add_argument("--hidden-size", type=int, default=256,
                   help="width of the embedding, the FFM output and the Q head")
    g.add_argument("--trace-size", type=int, default=64,
                   help="FFM trace size m: number of decaying memory traces")
    g.add_argument("--context-size", type=int, default=4,
                   help="FFM context size c: oscillation frequencies per trace")
    g.add_argument("--min-period", type=float, default=1.0,
                   help="shortest oscillation period (steps) of the initial frequencies")
    g.add_argument("--max-period", type=float, default=1024.0,
                   help="longest oscillation period (steps) of the initial frequencies")


def check_model_flags(args):
    for name in ("hidden_size", "trace_size", "context_size", "min_period", "max_period"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.min_period > args.max_period:
        raise UsageError("--min-period must not exceed --max-period")


# ==== shared: command line ====
class UsageError(Exception):
    """A bad flag or environment: reported as one line on stderr, exit code 2."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--exp-name", default=os.path.splitext(os.path.basename(__file__))[0],
                   help="name of this experiment, part of the run folder name")
    p.add_argument("--env-id", default="RepeatFirstEasy",
                   help="a POPGym class name (RepeatFirstEasy) or a gymnasium id "
                        "(popgym-RepeatFirstEasy-v0); any discrete-action env")
    p.add_argument("--seed", type=int, default=1, help="seed of the network, the envs and sampling")
    p.add_argument("--total-timesteps", type=int, default=300_000,
                   help="environment steps (transitions) to collect, summed over all envs")
    p.add_argument("--num-envs", type=int, default=32,
                   help="parallel environments stepped with one batched act call")
    p.add_argument("--max-episode-steps", type=int, default=0,
                   help="episode cap; 0 takes the env's own (needed for envs without one)")
    p.add_argument("--buffer-size", type=int, default=100_000,
                   help="tape buffer capacity in transitions (oldest whole episodes are evicted)")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="transitions per training tape B (whole episodes, only the last cut)")
    p.add_argument("--learning-rate", type=float, default=1e-3,
                   help="AdamW learning rate (the paper's 1e-4 learns too, ~2x slower)")
    p.add_argument("--lr-warmup-updates", type=int, default=200,
                   help="updates over which the learning rate ramps linearly from 0")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--gamma", type=float, default=0.99, help="discount factor")
    p.add_argument("--tau", type=float, default=0.005,
                   help="Polyak rate of the target network, applied after every update")
    p.add_argument("--start-e", type=float, default=0.2, help="starting epsilon of exploration")
    p.add_argument("--end-e", type=float, default=0.01, help="final epsilon of exploration")
    p.add_argument("--exploration-fraction", type=float, default=0.5,
                   help="fraction of the steps after --learning-starts over which epsilon "
                        "anneals linearly")
    p.add_argument("--learning-starts", type=int, default=100_000,
                   help="env steps of uniformly random actions before training starts")
    p.add_argument("--train-frequency", type=int, default=256,
                   help="env steps between two train phases")
    p.add_argument("--updates-per-train", type=int, default=4,
                   help="gradient updates in one train phase (one jitted call)")
    p.add_argument("--scan", choices=("auto", "associative", "sequential"), default="auto",
                   help="how to scan the tape: associative (O(log n) depth, best on GPU/TPU), "
                        "sequential (lax.scan, best on CPU); auto picks by backend")
    p.add_argument("--eval-every", type=int, default=10_000, help="env steps between evaluations")
    p.add_argument("--eval-episodes", type=int, default=32,
                   help="greedy episodes per evaluation (their plain mean is logged)")
    p.add_argument("--log-every", type=int, default=10_000, help="env steps between progress lines")
    p.add_argument("--output-dir", default="runs", help="parent folder of the run folder")
    p.add_argument("--save-model", action="store_true", help="write params.npz into the run folder")
    p.add_argument("--load-model", default=None,
                   help="params.npz to start from (a file written by --save-model)")
    add_model_flags(p)
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    positive = ("total_timesteps", "num_envs", "buffer_size", "batch_size", "learning_rate",
                "max_grad_norm", "train_frequency", "updates_per_train", "eval_every",
                "eval_episodes", "log_every")
    for name in positive:
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("learning_starts", "lr_warmup_updates", "max_episode_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("gamma", "start_e", "end_e"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    for name in ("tau", "exploration_fraction"):
        if not 0.0 < getattr(args, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    if args.load_model is not None and not os.path.isfile(args.load_model):
        raise UsageError(f"--load-model: no such file {args.load_model!r}")
    check_model_flags(args)
# ==== end shared: command line ====


import jax  # noqa: E402  (after argparse, so that --help and flag errors answer at once)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402


# ---------------------------------------------------------------------------------------------
# (1) The FFM memoroid (paper Sec. 3 and 4.1; FFM: Morad et al. 2023)
#
# FFM keeps m x c complex traces S_t = gamma * S_{t-1} + x_t 1_c^T, with a learned
# gamma_{jk} = exp(a_j + i b_k): trace j decays at rate a_j < 0 and oscillates at frequency b_k.
# As a monoid over elements (S, g) -- a trace and the decay accumulated over its span --
#
#     (S_i, g_i) . (S_j, g_j) = (S_i * g_j + S_j,  g_i * g_j),     identity e = (0, 1).
#
# The op has no parameters: gamma enters through the input map, which gives every step the
# element (x_t 1^T, gamma). Associativity lets jax.lax.associative_scan compute all prefix
# states in O(log n) depth.
# ---------------------------------------------------------------------------------------------
def monoid_op(a, b):
    """(S_i, g_i) . (S_j, g_j) = (S_i g_j + S_j, g_i g_j): older span a, then newer span b."""
    s_a, g_a = a
    s_b, g_b = b
    return s_a * g_b + s_b, g_a * g_b


def identity_like(elements):
    """The identity e = (0, 1), shaped like `elements`: e . x = x . e = x."""
    s, g = elements
    return jnp.zeros_like(s), jnp.ones_like(g)


def reset_op(a, b):
    """Reset-wrapped op on (element, start) pairs (paper Sec. 4.1):

        (x_a, s_a) . (x_b, s_b) = (x_b if s_b else x_a . x_b,  s_a or s_b).

    Still associative, so one scan over many concatenated episodes never carries memory
    across an episode start. Works on single elements and on batches (leading axis).
    """
    x_a, start_a = a
    x_b, start_b = b
    merged = monoid_op(x_a, x_b)

    def pick(new, both):
        flag = start_b.reshape(start_b.shape + (1,) * (new.ndim - start_b.ndim))
        return jnp.where(flag, new, both)

    return jax.tree.map(pick, x_b, merged), start_a | start_b


def resettable_scan(elements, start, scan="associative"):
    """Inclusive prefix states h_t = e . x_{t0} . ... . x_t, where t0 is the last start <= t.

    `elements` is a pytree with a leading time axis, `start` a bool vector over time. Both
    paths evaluate the same op: "associative" in O(log n) depth (fast on accelerators),
    "sequential" as a lax.scan (fewer operations in total, fast on a CPU).
    """
    if scan == "associative":
        states, _ = jax.lax.associative_scan(reset_op, (elements, start))
        return states
    if scan == "sequential":
        first = jax.tree.map(lambda x: x[0], elements)
        carry0 = (identity_like(first), jnp.zeros((), bool))

        def step(carry, x):
            carry = reset_op(carry, x)
            return carry, carry[0]

        _, states = jax.lax.scan(step, carry0, (elements, start))
        return states
    raise ValueError(f"unknown scan {scan!r}")


# ---------------------------------------------------------------------------------------------
# (2) The Q network, as plain pytrees (paper Sec. 5):
#     Linear -> LayerNorm -> leaky ReLU -> FFM -> dueling MLP head.
# The FFM input map turns an embedding into an element; its output map reads the prefix state:
#     x_t = W_v h_t * sigmoid(W_i h_t)                      (input gate)
#     z_t = W_mix [Re S_t, Im S_t]                          (mix the traces)
#     y_t = LN(z_t * sigmoid(W_o h_t)) + W_s h_t * (1 - sigmoid(W_o h_t))   (output gate, skip)
# ---------------------------------------------------------------------------------------------
def init_linear(key, n_in, n_out):
    bound = 1.0 / np.sqrt(n_in)
    return {"w": jax.random.uniform(key, (n_in, n_out), minval=-bound, maxval=bound),
            "b": jnp.zeros(n_out)}


def linear(p, x):
    return x @ p["w"] + p["b"]


def layer_norm(x, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(x.var(-1, keepdims=True) + eps)


def init_params(key, obs_dim, num_actions, args):
    h, m, c = args.hidden_size, args.trace_size, args.context_size
    k = jax.random.split(key, 7)
    return {
        "embed": init_linear(k[0], obs_dim, h),
        "embed_ln": {"scale": jnp.ones(h), "bias": jnp.zeros(h)},
        "ffm": {
            "pre": init_linear(k[1], h, 2 * m),  # trace input and its gate
            # Decay rates |a_j| from 0.5 down to 1e-6 (memories of ~2 to ~1e6 steps), as in
            # the memoroid authors' FFM; FFM's first release started at e (under a step) and
            # learned RepeatFirstEasy ~1.5x slower here. Periods: --min-period to --max-period.
            "decay": jnp.linspace(-0.5, -1e-6, m),
            "freq": 2 * np.pi / jnp.linspace(args.min_period, args.max_period, c),
            "mix": init_linear(k[2], 2 * m * c, h),
            "post": init_linear(k[3], h, 2 * h),  # output gate and skip
        },
        "head": {
            "hidden": init_linear(k[4], h, h),
            "value": init_linear(k[5], h, 1),
            "advantage": init_linear(k[6], h, num_actions),
        },
    }


def embed(params, obs):
    p = params["embed_ln"]
    x = layer_norm(linear(params["embed"], obs)) * p["scale"] + p["bias"]
    return jax.nn.leaky_relu(x)


def ffm_gamma(p):
    """gamma_{jk} = exp(a_j + i b_k), with a_j clipped below 0 so every trace decays."""
    a = jnp.minimum(p["decay"], -1e-6)
    return jnp.exp(a[:, None] + 1j * p["freq"][None, :])


def input_map(params, h):
    """Embedding [..., hidden] -> FFM element (x 1^T, gamma), each [..., m, c] complex."""
    p = params["ffm"]
    value, gate = jnp.split(linear(p["pre"], h), 2, axis=-1)
    x = value * jax.nn.sigmoid(gate)
    gamma = ffm_gamma(p)  # once per call, not per step: a complex exp costs ~18 float exps
    s = jnp.broadcast_to(x[..., None], x.shape + (gamma.shape[-1],)).astype(jnp.complex64)
    return s, jnp.broadcast_to(gamma, s.shape)


def output_map(params, state, h):
    """Prefix state (S, g) and embedding h -> Markov state y (only S is read)."""
    p = params["ffm"]
    s, _ = state
    traces = jnp.concatenate([s.real, s.imag], axis=-1).reshape(s.shape[:-2] + (-1,))
    z = linear(p["mix"], traces)
    gate, skip = jnp.split(linear(p["post"], h), 2, axis=-1)
    gate = jax.nn.sigmoid(gate)
    return layer_norm(z * gate) + skip * (1.0 - gate)


def q_head(params, y):
    """Dueling head: Q = V + A - mean(A)."""
    p = params["head"]
    x = jax.nn.leaky_relu(linear(p["hidden"], y))
    adv = linear(p["advantage"], x)
    return linear(p["value"], x) + adv - adv.mean(-1, keepdims=True)


def q_tape(params, obs, next_obs, start, scan):
    """Q values along a tape of concatenated episodes, in one scan.

    Returns Q(o_0..o_t) and Q(o_0..o_t, o_{t+1}) for every t, each [B, actions]. The second
    combines the prefix state after o_t with the element of o_{t+1} (one extra op), so the
    target's memory sees the whole episode, its first observation included.
    """
    h, h_next = embed(params, obs), embed(params, next_obs)
    states = resettable_scan(input_map(params, h), start, scan)
    states_next = monoid_op(states, input_map(params, h_next))
    return (q_head(params, output_map(params, states, h)),
            q_head(params, output_map(params, states_next, h_next)))


def initial_carry(params, num_envs):
    """Recurrent state of `num_envs` envs before their first step: the identity."""
    shape = (num_envs,) + ffm_gamma(params["ffm"]).shape
    return identity_like((jnp.zeros(shape, jnp.complex64),) * 2)


def q_step(params, carry, obs, start):
    """One recurrent step for a batch of envs: the same reset op as the scan, so the two agree."""
    h = embed(params, obs)
    carry, _ = reset_op((carry, start), (input_map(params, h), start))
    return q_head(params, output_map(params, carry, h)), carry


# ==== shared: tape buffer ====
# ---------------------------------------------------------------------------------------------
# (3) The tape buffer (paper Sec. 4.2). One flat ring of transitions on the device. Episodes
# are stored whole and contiguously (modulo the ring), oldest first; adding an episode evicts
# the oldest *whole* episodes until it fits, so no stored episode is ever partly overwritten.
# Each transition remembers where its episode starts and how long it is, which is all that
# sampling and eviction need.
# ---------------------------------------------------------------------------------------------
class Tape(NamedTuple):
    obs: jax.Array  # [N, obs_dim] float32
    action: jax.Array  # [N] int32
    reward: jax.Array  # [N] float32
    next_obs: jax.Array  # [N, obs_dim] float32
    terminated: jax.Array  # [N] bool: no bootstrap after this step
    truncated: jax.Array  # [N] bool: the episode was cut here; bootstrap from next_obs
    episode_start: jax.Array  # [N] int32 ring index of the first step of this episode
    episode_length: jax.Array  # [N] int32 length of this episode
    head: jax.Array  # [] int32 ring index of the oldest stored transition
    size: jax.Array  # [] int32 number of stored transitions


class Batch(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    start: jax.Array  # [B] bool: first step of an episode


def init_tape(capacity, obs_dim):
    # Distinct arrays for every field: add_episode donates (updates in place) each of them.
    obs = lambda: jnp.zeros((capacity, obs_dim), jnp.float32)  # noqa: E731
    ints = lambda: jnp.zeros(capacity, jnp.int32)  # noqa: E731
    flags = lambda: jnp.zeros(capacity, bool)  # noqa: E731
    return Tape(obs(), ints(), jnp.zeros(capacity), obs(), flags(), flags(), ints(), ints(),
                jnp.int32(0), jnp.int32(0))


@partial(jax.jit, donate_argnums=0)  # donated: the ring is updated in place, not copied
def add_episode(tape, episode, length):
    """Append one episode (fields padded to a fixed length T, the first `length` real).

    `episode` holds (obs, action, reward, next_obs, terminated, truncated), each [T, ...].
    """
    capacity = tape.action.shape[0]

    def must_evict(c):
        head, size = c
        return size + length > capacity

    def evict_oldest(c):
        head, size = c
        n = tape.episode_length[head]
        return (head + n) % capacity, size - n

    head, size = jax.lax.while_loop(must_evict, evict_oldest, (tape.head, tape.size))
    write = (head + size) % capacity
    t = jnp.arange(episode[0].shape[0])
    # Padding rows get an out-of-range index and are dropped by the scatter.
    idx = jnp.where(t < length, (write + t) % capacity, capacity)
    stored = [col.at[idx].set(new.astype(col.dtype), mode="drop") for col, new in zip(tape[:6], episode)]
    return Tape(*stored,
                tape.episode_start.at[idx].set(write, mode="drop"),
                tape.episode_length.at[idx].set(length, mode="drop"),
                head, size + length)


def sample_tape(tape, key, batch_size):
    """A training tape of exactly `batch_size` transitions made of whole episodes.

    Sampling distribution: each episode is drawn independently, with replacement, with
    probability proportional to its length (draw a uniformly random stored transition and
    take its whole episode). So every stored transition, the newest included, is equally
    likely to be trained on, and short episodes are not over-represented. Episodes are
    concatenated in draw order; only the last one may be cut to fit exactly B.
    """
    capacity = tape.action.shape[0]
    # B draws always suffice: each episode contributes at least one step.
    pos = (tape.head + jax.random.randint(key, (batch_size,), 0, tape.size)) % capacity
    begin, length = tape.episode_start[pos], tape.episode_length[pos]
    ends = jnp.cumsum(length)
    slot = jnp.arange(batch_size)
    k = jnp.searchsorted(ends, slot, side="right")  # which drawn episode fills each slot
    offset = slot - (ends[k] - length[k])
    idx = (begin[k] + offset) % capacity
    return Batch(tape.obs[idx], tape.action[idx], tape.reward[idx], tape.next_obs[idx],
                 tape.terminated[idx], tape.truncated[idx], offset == 0)
# ==== end shared: tape buffer ====


# ==== shared: loss ====
# ---------------------------------------------------------------------------------------------
# (4) The loss: double DQN with a Polyak target network, Huber loss averaged over the tape.
# ---------------------------------------------------------------------------------------------
def td_targets(q_next_online, q_next_target, reward, terminated, gamma):
    """y_t = r_t + gamma (1 - terminated_t) Q_target(o_{..t+1}, argmax_a Q_online(o_{..t+1}, a)).

    Truncation still bootstraps (the episode was cut, not ended); termination does not.
    """
    best = jnp.argmax(q_next_online, axis=-1)
    q_next = jnp.take_along_axis(q_next_target, best[:, None], axis=-1)[:, 0]
    return reward + gamma * (1.0 - terminated) * q_next


def td_loss(params, target_params, batch, gamma, scan):
    """Mean Huber TD error over all B steps of the tape, plus the mean Q of taken actions."""
    q, q_next_online = q_tape(params, batch.obs, batch.next_obs, batch.start, scan)
    _, q_next_target = q_tape(target_params, batch.obs, batch.next_obs, batch.start, scan)
    target = jax.lax.stop_gradient(
        td_targets(q_next_online, q_next_target, batch.reward, batch.terminated, gamma))
    q_taken = jnp.take_along_axis(q, batch.action[:, None], axis=-1)[:, 0]
    return optax.huber_loss(q_taken, target).mean(), q_taken.mean()
# ==== end shared: loss ====


# ==== shared: training loop ====
# ---------------------------------------------------------------------------------------------
# (5) The jitted training loop. A train phase -- sample a tape, TD loss, AdamW step, Polyak
# target update, repeated --updates-per-train times -- is ONE jitted call.
# ---------------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    params: dict
    target_params: dict
    opt_state: tuple


def make_optimizer(args):
    warmup = max(args.lr_warmup_updates, 1)
    schedule = lambda n: args.learning_rate * jnp.minimum(1.0, (n + 1) / warmup)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(args.max_grad_norm),
                       optax.adamw(schedule, eps=1e-8, weight_decay=0.0))


def make_train_phase(optimizer, args, scan):
    def update(state, tape, key):
        batch = sample_tape(tape, key, args.batch_size)
        (loss, q), grads = jax.value_and_grad(td_loss, has_aux=True)(
            state.params, state.target_params, batch, args.gamma, scan)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        target = optax.incremental_update(params, state.target_params, args.tau)
        return TrainState(params, target, opt_state), (loss, q)

    @partial(jax.jit, donate_argnums=0)
    def train_phase(state, tape, key):
        keys = jax.random.split(key, args.updates_per_train)
        state, (loss, q) = jax.lax.scan(lambda s, k: update(s, tape, k), state, keys)
        return state, {"td_loss": loss.mean(), "q_values": q.mean()}

    return train_phase


@jax.jit
def act(params, carry, obs, start, epsilon, key, step):
    """Epsilon-greedy actions for a batch of envs, one recurrent step each."""
    q, carry = q_step(params, carry, obs, start)
    # Folding the step into the key inside the call saves a host-side split per env step.
    k_explore, k_action = jax.random.split(jax.random.fold_in(key, step))
    explore = jax.random.uniform(k_explore, (obs.shape[0],)) < epsilon
    random_action = jax.random.randint(k_action, (obs.shape[0],), 0, q.shape[-1])
    return jnp.where(explore, random_action, jnp.argmax(q, axis=-1)), carry


def epsilon_at(step, args):
    """1 during the random warm-up, then linear from --start-e to --end-e over a fraction of
    the remaining steps (CleanRL anneals from step 0; ours starts when learning does)."""
    if step < args.learning_starts:
        return 1.0
    duration = args.exploration_fraction * max(args.total_timesteps - args.learning_starts, 1)
    progress = (step - args.learning_starts) / duration
    return max(args.end_e, args.start_e + (args.end_e - args.start_e) * progress)


def pick_scan(choice):
    # On a CPU the lax.scan (n ops in n steps) beats the associative scan (about 2n ops in
    # 2 log n passes of strided slices) at every tape length we measured; on a GPU/TPU the
    # O(log n) depth of the associative scan wins at large B.
    if choice != "auto":
        return choice
    return "sequential" if jax.default_backend() == "cpu" else "associative"
# ==== end shared: training loop ====


# ==== shared: environments ====
# ---------------------------------------------------------------------------------------------
# Environments. POPGym envs get popgym's wrapper stack so that every discrete-action env
# gives a flat one-hot observation (with an is-first-step flag, and the previous action where
# the env needs it) and one Discrete action; a TimeLimit at the episode cap makes that cap a
# guarantee (the host stages each episode in arrays of that length).
# ---------------------------------------------------------------------------------------------
def resolve_env(env_id, max_episode_steps=0):
    """-> (make_env, cap): a function building one wrapped env, and the longest episode."""
    import gymnasium as gym
    import popgym  # noqa: F401  (registers the popgym-*-v0 ids)
    from popgym import envs as popgym_envs
    from popgym.core.env import POPGymEnv
    from popgym.wrappers import Antialias, DiscreteAction, Flatten, PreviousAction

    cls = getattr(popgym_envs, env_id, None)
    if isinstance(cls, type) and issubclass(cls, POPGymEnv):
        make_raw = cls
    elif env_id in gym.registry:
        make_raw = lambda: gym.make(env_id)  # noqa: E731
    else:
        names = sorted(n for n, c in vars(popgym_envs).items()
                       if isinstance(c, type) and issubclass(c, POPGymEnv) and c is not POPGymEnv)
        close = difflib.get_close_matches(env_id, names, n=3) or [
            "RepeatFirstEasy", "RepeatPreviousEasy", "CountRecallEasy", "PositionOnlyCartPoleEasy"]
        raise UsageError(f"unknown env id {env_id!r}; try {', '.join(close)} "
                         "(any POPGym class name or registered gymnasium id)")

    probe = make_raw()
    is_popgym = isinstance(probe.unwrapped, POPGymEnv)
    if not isinstance(probe.action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)) or (
            not is_popgym and not isinstance(probe.action_space, gym.spaces.Discrete)):
        raise UsageError(f"{env_id} has action space {probe.action_space}; "
                         "DQN needs a discrete action space")
    cap = (max_episode_steps or getattr(probe.unwrapped, "max_episode_length", None)
           or getattr(probe.unwrapped, "episode_length", None)
           or (probe.spec.max_episode_steps if probe.spec else None))
    if not cap:
        raise UsageError(f"{env_id} states no episode cap; pass --max-episode-steps")

    def make_env():
        env = make_raw()
        if is_popgym:
            env = env.unwrapped  # popgym's wrappers take the raw env
            if env.obs_requires_prev_action:  # popgym's advice; it slows stepping, so only here
                env = PreviousAction(env)
            env = DiscreteAction(Flatten(Antialias(env)))
        else:
            env = gym.wrappers.FlattenObservation(env)
        return gym.wrappers.TimeLimit(env, max_episode_steps=cap)

    return make_env, int(cap)


def make_vector_env(make_env, num_envs):
    import gymnasium as gym
    # SAME_STEP autoreset: a finished env returns its next episode's first observation at
    # once and the true last one in info["final_obs"], so no dummy transition is ever stored.
    return gym.vector.SyncVectorEnv([make_env] * num_envs,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


def true_next_obs(next_obs, done, info):
    """The observation after each step: the final one for envs that just ended."""
    if not done.any():
        return next_obs
    real = next_obs.copy()
    real[done] = np.stack(info["final_obs"][done])
    return real


class Staging:
    """Host-side episodes in progress, one row per env, in the tape's field order."""

    def __init__(self, num_envs, cap, obs_dim):
        e = num_envs
        self.columns = (np.zeros((e, cap, obs_dim), np.float32), np.zeros((e, cap), np.int32),
                        np.zeros((e, cap), np.float32), np.zeros((e, cap, obs_dim), np.float32),
                        np.zeros((e, cap), bool), np.zeros((e, cap), bool))
        self.length = np.zeros(e, np.int32)
        self.rows = np.arange(e)

    def record(self, *transition):
        for column, value in zip(self.columns, transition):
            column[self.rows, self.length] = value
        self.length += 1

    def pop(self, i):
        """Env i's finished episode (padded to the cap) and its length; its row restarts."""
        episode, length = tuple(c[i] for c in self.columns), self.length[i]
        self.length[i] = 0
        return episode, length


def evaluate(params, eval_envs, num_episodes):
    """Plain mean return of one greedy episode in each of the eval envs."""
    obs, _ = eval_envs.reset()
    carry = initial_carry(params, num_episodes)
    start = np.ones(num_episodes, bool)
    returns = np.zeros(num_episodes)
    running = np.ones(num_episodes, bool)
    key = jax.random.PRNGKey(0)  # unused at epsilon 0
    while running.any():
        actions, carry = act(params, carry, obs, start, 0.0, key, 0)
        obs, reward, terminated, truncated, _ = eval_envs.step(np.asarray(actions))
        returns += reward * running
        start = terminated | truncated
        running &= ~start
    return float(returns.mean())
# ==== end shared: environments ====


# ==== shared: outputs ====
def save_params(params, path):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(path, **{jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
                      for k, v in flat})


def load_params(template, path):
    """Params from a --save-model file, checked leaf by leaf against the model flags."""
    stored = np.load(path)
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for k, leaf in flat:
        name = jax.tree_util.keystr(k, simple=True, separator="/")
        if name not in stored or stored[name].shape != leaf.shape:
            raise UsageError(f"--load-model {path}: parameter {name} is missing or shaped "
                             "differently; use the model flags it was trained with")
        leaves.append(jnp.asarray(stored[name]))
    return jax.tree_util.tree_unflatten(treedef, leaves)


class Progress:
    """One metrics.csv row and one progress line every --log-every steps."""

    COLUMNS = ("global_step", "episodes", "updates", "train_return", "eval_return", "td_loss",
               "q_values", "epsilon", "sps", "elapsed_s")

    def __init__(self, run_dir, total_timesteps):
        self.file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
        self.writer = csv.DictWriter(self.file, self.COLUMNS)
        self.writer.writeheader()
        self.total = total_timesteps
        self.t0 = time.time()

    def log(self, **row):
        elapsed = time.time() - self.t0
        step = row["global_step"]
        row.update(sps=step / elapsed, elapsed_s=elapsed)  # sps: average since the start
        self.writer.writerow(row)
        self.file.flush()
        print(f"step {step:>9,d} | SPS {row['sps']:6.0f} | train return "
              f"{row['train_return']:+.3f} | eval return {row['eval_return']:+.3f} | loss "
              f"{row['td_loss']:.2e} | eps {row['epsilon']:.3f} | {clock(elapsed)} elapsed, "
              f"ETA {clock(elapsed * (self.total - step) / step)}", flush=True)

    def close(self):
        self.file.close()


def plot_learning_curve(csv_path, png_path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["eval_return"] != "nan"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(r["global_step"]) for r in rows], [float(r["eval_return"]) for r in rows], "o-")
    ax.set(xlabel="environment steps", ylabel="mean greedy eval return", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def clock(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
# ==== end shared: outputs ====


# ==== shared: main ====
class Diverged(Exception):
    """The loss became non-finite: reported as one line on stderr, exit code 1."""

    exit_code = 1


def train(args):
    """The algorithm box: collect with the recurrent policy, store whole episodes on the
    tape, and every --train-frequency steps run one jitted train phase on sampled tapes."""
    make_env, cap = resolve_env(args.env_id, args.max_episode_steps)
    for flag, value in (("--buffer-size", args.buffer_size), ("--batch-size", args.batch_size)):
        if value < cap:
            raise UsageError(f"{flag} {value} is smaller than the longest episode of "
                             f"{args.env_id} ({cap} steps)")
    envs = make_vector_env(make_env, args.num_envs)
    eval_envs = make_vector_env(make_env, args.eval_episodes)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    scan = pick_scan(args.scan)

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args) | {"scan_used": scan, "episode_cap": cap}, f, indent=2)

    key = jax.random.PRNGKey(args.seed)
    key, init_key, act_key = jax.random.split(key, 3)
    # Set-up is jitted: one compile instead of dozens of small eager ones.
    num_actions = int(envs.single_action_space.n)
    params = jax.jit(lambda k: init_params(k, obs_dim, num_actions, args))(init_key)
    if args.load_model:
        params = load_params(params, args.load_model)
    optimizer = make_optimizer(args)
    target = jax.jit(partial(jax.tree.map, jnp.copy))(params)  # own buffers: both are donated
    state = TrainState(params, target, jax.jit(optimizer.init)(params))
    train_phase = make_train_phase(optimizer, args, scan)
    tape = init_tape(args.buffer_size, obs_dim)
    staging = Staging(args.num_envs, cap, obs_dim)

    obs, _ = envs.reset(seed=args.seed)
    eval_envs.reset(seed=args.seed + 1_000_000)  # separately seeded; later resets continue it
    carry = initial_carry(params, args.num_envs)
    start = np.ones(args.num_envs, bool)
    ep_return = np.zeros(args.num_envs)
    returns, phase_metrics = [], []
    step = episodes = updates = 0
    eval_return = float("nan")
    next_train, next_eval, next_log = args.learning_starts, args.eval_every, args.log_every
    print(f"{run_name}: {args.env_id} (episodes <= {cap} steps), {scan} scan, "
          f"backend {jax.default_backend()}, run folder {run_dir}")
    progress = Progress(run_dir, args.total_timesteps)
    while step < args.total_timesteps:
        epsilon = epsilon_at(step, args)
        actions, carry = act(state.params, carry, obs, start, epsilon, act_key, step)
        actions = np.asarray(actions)
        next_obs, reward, terminated, truncated, info = envs.step(actions)
        done = terminated | truncated
        staging.record(obs, actions, reward, true_next_obs(next_obs, done, info),
                       terminated, truncated)
        ep_return += reward
        for i in np.flatnonzero(done):
            tape = add_episode(tape, *staging.pop(i))
            returns.append(ep_return[i])
            ep_return[i] = 0.0
            episodes += 1
        obs, start = next_obs, done
        step += args.num_envs

        while step >= next_train and episodes > 0:
            key, k = jax.random.split(key)
            state, metrics = train_phase(state, tape, k)
            phase_metrics.append(metrics)
            updates += args.updates_per_train
            next_train += args.train_frequency
        finished = step >= args.total_timesteps
        if step >= next_eval or finished:
            eval_return = evaluate(state.params, eval_envs, args.eval_episodes)
            next_eval += args.eval_every
        if step >= next_log or finished:
            # Metrics stay on the device until here: one sync per log line, not per phase.
            phase = {name: float(np.mean([m[name] for m in phase_metrics]))
                     if phase_metrics else float("nan") for name in ("td_loss", "q_values")}
            if phase_metrics and not np.isfinite(phase["td_loss"]):
                raise Diverged(f"the TD loss became non-finite by step {step}; "
                               "try a lower --learning-rate or --max-grad-norm")
            progress.log(global_step=step, episodes=episodes, updates=updates,
                         train_return=np.mean(returns) if returns else float("nan"),
                         eval_return=eval_return, epsilon=epsilon, **phase)
            returns, phase_metrics, eval_return = [], [], float("nan")
            next_log += args.log_every
    progress.close()
    envs.close()
    eval_envs.close()
    plot_learning_curve(os.path.join(run_dir, "metrics.csv"),
                        os.path.join(run_dir, "learning_curve.png"),
                        f"{args.exp_name} on {args.env_id}")
    if args.save_model:
        save_params(state.params, os.path.join(run_dir, "params.npz"))
    print(f"done: {step:,d} steps in {clock(time.time() - progress.t0)}; results in {run_dir}")
    return run_dir


def run(argv=None):
    """Command-line entry: flag and env errors are one line on stderr, never a traceback."""
    prog = os.path.basename(__file__)
    try:
        return train(parse_args(argv))
    except (UsageError, Diverged) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
# ==== end shared: main ====


if __name__ == "__main__":
    run()
