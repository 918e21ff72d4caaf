"""Double DQN with a memoroid and Segment-Based Batching (SBB): the baseline TBB replaces.

The batching the memoroids paper (Morad et al., NeurIPS 2024, Sec. 4.2) argues against, built
with the same care as the Tape-Based Batching scripts, so that comparing the two isolates the
*batching* and nothing else: the same three memoroids (FFM, LRU, linear transformer) with the
same math, the same double-DQN Huber loss, the same flags, envs, evaluation and outputs.
Only four things differ:

  - the buffer holds fixed-length segments: every finished episode is split into segments of
    --segment-length L steps, the last one zero-padded to L with a mask;
  - every segment starts from the memory's identity state (no stored state, no burn-in), so
    a step sees at most the L-1 steps before it in its segment, not its whole episode;
  - a batch is --batch-size // L segments drawn uniformly, i.e. the same number of slots
    (padding included) as a TBB tape of --batch-size transitions: equal compute per update;
  - the loss is averaged over real (unpadded) steps only, and the *density* of each batch
    (real steps / slots) is logged.

  (1) the three memoroids and the resettable scan    (paper Sec. 3, 4.1)
  (2) the recurrent Q networks                       (paper Sec. 5)
  (3) the segment buffer                             (paper Sec. 4.2, the SBB baseline)
  (4) the masked double-DQN loss                     (paper Sec. 5)
  (5) the jitted training loop

Run:   python sbb_baseline_dqn.py --memory ffm --segment-length 10
       python sbb_baseline_dqn.py --memory lru --segment-length 50 --env-id CountRecallEasy
Help:  python sbb_baseline_dqn.py --help
"""

import argparse
import csv
import difflib
import json
import os
import sys
import time
from functools import partial
from typing import Callable, NamedTuple

import numpy as np


# ---------------------------------------------------------------------------------------------
# Command line. Every hyperparameter is a flag; the batching and the models' sizes come first.
# The model flags and their defaults are those of the three TBB scripts; only the chosen
# --memory's are used.
# ---------------------------------------------------------------------------------------------
def add_model_flags(parser):
    g = parser.add_argument_group("Segment-Based Batching")
    g.add_argument("--memory", choices=("ffm", "lru", "linear_transformer"), default="ffm",
                   help="the memoroid, with the math of ffm_tbb_dqn.py, lru_tbb_dqn.py or "
                        "linear_transformer_tbb_dqn.py")
    g.add_argument("--segment-length", type=int, default=10,
                   help="segment length L; a batch is --batch-size // L segments, each from "
                        "the identity state, the last segment of an episode zero-padded")
    g = parser.add_argument_group("all models")
    g.add_argument("--hidden-size", type=int, default=256,
                   help="width of the embedding, the memory's output and the Q head")
    g = parser.add_argument_group("FFM model (--memory ffm)")
    g.add_argument("--trace-size", type=int, default=64,
                   help="FFM trace size m: number of decaying memory traces")
    g.add_argument("--context-size", type=int, default=4,
                   help="FFM context size c: oscillation frequencies per trace")
    g.add_argument("--min-period", type=float, default=1.0,
                   help="shortest oscillation period (steps) of the initial frequencies")
    g.add_argument("--max-period", type=float, default=1024.0,
                   help="longest oscillation period (steps) of the initial frequencies")
    g = parser.add_argument_group("LRU model (--memory lru)")
    g.add_argument("--state-size", type=int, default=128,
                   help="LRU state size N: complex diagonal states per block")
    g.add_argument("--num-layers", type=int, default=2, help="number of stacked LRU blocks")
    g.add_argument("--r-min", type=float, default=0.9,
                   help="smallest |lambda| of the ring initialisation (memory ~1/(1-r) steps)")
    g.add_argument("--r-max", type=float, default=0.999,
                   help="largest |lambda| of the ring initialisation")
    g.add_argument("--max-phase", type=float, default=np.pi / 10,
                   help="largest initial phase arg(lambda), in radians")
    g = parser.add_argument_group("Linear Transformer model (--memory linear_transformer)")
    g.add_argument("--key-size", type=int, default=16,
                   help="size of each head's keys and queries (the feature space of phi)")
    g.add_argument("--value-size", type=int, default=16, help="size of each head's values")
    g.add_argument("--num-heads", type=int, default=1,
                   help="attention heads, each with its own memory (S, z)")


def check_model_flags(args):
    if not 0 < args.segment_length <= args.batch_size:
        raise UsageError(f"--segment-length must be in [1, --batch-size {args.batch_size}], "
                         f"got {args.segment_length}")
    positive = ("hidden_size", "trace_size", "context_size", "min_period", "max_period",
                "state_size", "num_layers", "r_max", "max_phase", "key_size", "value_size",
                "num_heads")
    for name in positive:
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.min_period > args.max_period:
        raise UsageError("--min-period must not exceed --max-period")
    if not 0.0 <= args.r_min <= args.r_max < 1.0:
        raise UsageError(f"need 0 <= --r-min <= --r-max < 1, got {args.r_min} and {args.r_max}")


# ==== command line: as in the TBB scripts, except where marked "SBB" ====
class UsageError(Exception):
    """A bad flag or environment: reported as one line on stderr, exit code 2."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--exp-name", default=None,  # SBB: the default names the memory and L
                   help="name of this experiment, part of the run folder name; "
                        "None means sbb_<memory>_L<segment length>")
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
                   help="SBB: buffer capacity in slots; it holds --buffer-size // L segments "
                        "(the oldest segments are overwritten)")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="SBB: slots per batch; a batch is --batch-size // L segments of L "
                        "steps (padding included), the slots of a TBB tape of this size")
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
    if args.exp_name is None:  # SBB
        args.exp_name = f"sbb_{args.memory}_L{args.segment_length}"
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
# ==== end command line ====

import jax  # noqa: E402  (after argparse, so that --help and flag errors answer at once)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402


# ---------------------------------------------------------------------------------------------
# (1) The memoroids (paper Sec. 3 and 4.1). Each is a monoid over its recurrent state: an
# associative op `a . b` (older span a, then newer span b) and an identity e. The three ops
# and identities below are those of the TBB scripts, prefixed by the model's name; the reset
# wrapping and the scan are generic and take the model's op as an argument.
#
#   FFM (Morad et al. 2023)    (S_i, g_i) . (S_j, g_j) = (S_i g_j + S_j,  g_i g_j)    e = (0, 1)
#   LRU (Orvieto et al. 2023)  (A_i, b_i) . (A_j, b_j) = (A_j A_i,  A_j b_i + b_j)    e = (1, 0)
#   linear transformer         (S_i, z_i) . (S_j, z_j) = (S_i + S_j,  z_i + z_j)      e = (0, 0)
#   (Katharopoulos et al. 2020)
# ---------------------------------------------------------------------------------------------
def ffm_monoid_op(a, b):
    """(S_i, g_i) . (S_j, g_j) = (S_i g_j + S_j, g_i g_j): older span a, then newer span b."""
    s_a, g_a = a
    s_b, g_b = b
    return s_a * g_b + s_b, g_a * g_b


def ffm_identity_like(elements):
    """The identity e = (0, 1), shaped like `elements`: e . x = x . e = x."""
    s, g = elements
    return jnp.zeros_like(s), jnp.ones_like(g)


def lru_monoid_op(a, b):
    """(A_i, b_i) . (A_j, b_j) = (A_j A_i, A_j b_i + b_j): older span a, then newer span b."""
    decay_a, state_a = a
    decay_b, state_b = b
    return decay_b * decay_a, decay_b * state_a + state_b


def lru_identity_like(elements):
    """The identity e = (1, 0), shaped like `elements`: e . x = x . e = x."""
    decay, state = elements
    return jnp.ones_like(decay), jnp.zeros_like(state)


def lt_monoid_op(a, b):
    """(S_i, z_i) . (S_j, z_j) = (S_i + S_j, z_i + z_j): older span a, then newer span b."""
    s_a, z_a = a
    s_b, z_b = b
    return s_a + s_b, z_a + z_b


def lt_identity_like(elements):
    """The identity e = (0, 0), shaped like `elements`: e . x = x . e = x."""
    s, z = elements
    return jnp.zeros_like(s), jnp.zeros_like(z)


def reset_op(monoid_op, a, b):
    """Reset-wrapped op on (element, start) pairs (paper Sec. 4.1):

        (x_a, s_a) . (x_b, s_b) = (x_b if s_b else x_a . x_b,  s_a or s_b).

    Still associative. Works on single elements and on batches (leading axis).
    """
    x_a, start_a = a
    x_b, start_b = b
    merged = monoid_op(x_a, x_b)

    def pick(new, both):
        flag = start_b.reshape(start_b.shape + (1,) * (new.ndim - start_b.ndim))
        return jnp.where(flag, new, both)

    return jax.tree.map(pick, x_b, merged), start_a | start_b


def resettable_scan(monoid_op, identity_like, elements, start, scan="associative"):
    """Inclusive prefix states h_t = e . x_{t0} . ... . x_t, where t0 is the last start <= t.

    `elements` is a pytree with a leading time axis, `start` a bool vector over time. Both
    paths evaluate the same op: "associative" in O(log n) depth (fast on accelerators),
    "sequential" as a lax.scan (fewer operations in total, fast on a CPU).
    """
    op = partial(reset_op, monoid_op)
    if scan == "associative":
        states, _ = jax.lax.associative_scan(op, (elements, start))
        return states
    if scan == "sequential":
        first = jax.tree.map(lambda x: x[0], elements)
        carry0 = (identity_like(first), jnp.zeros((), bool))

        def step(carry, x):
            carry = op(carry, x)
            return carry, carry[0]

        _, states = jax.lax.scan(step, carry0, (elements, start))
        return states
    raise ValueError(f"unknown scan {scan!r}")


# ---------------------------------------------------------------------------------------------
# (2) The Q networks, as plain pytrees (paper Sec. 5), exactly those of the TBB scripts:
#     Linear -> LayerNorm -> leaky ReLU -> memory -> dueling MLP head.
# Each model has an input map (embedding -> element), an output map (prefix state ->
# Markov state), init, a tape path and a one-step path; see its TBB script for the equations.
# `q_tape` scans one sequence (a tape with episode starts); SBB runs it on every segment.
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


def init_norm(n):
    return {"scale": jnp.ones(n), "bias": jnp.zeros(n)}


def norm(p, x):
    """LayerNorm with a learned scale and bias."""
    return layer_norm(x) * p["scale"] + p["bias"]


def embed(params, obs):
    return jax.nn.leaky_relu(norm(params["embed_ln"], linear(params["embed"], obs)))


def q_head(params, y):
    """Dueling head: Q = V + A - mean(A)."""
    p = params["head"]
    x = jax.nn.leaky_relu(linear(p["hidden"], y))
    adv = linear(p["advantage"], x)
    return linear(p["value"], x) + adv - adv.mean(-1, keepdims=True)


# ---- FFM (ffm_tbb_dqn.py) -------------------------------------------------------------------
#     x_t = W_v h_t * sigmoid(W_i h_t)                      (input gate)
#     z_t = W_mix [Re S_t, Im S_t]                          (mix the traces)
#     y_t = LN(z_t * sigmoid(W_o h_t)) + W_s h_t * (1 - sigmoid(W_o h_t))   (output gate, skip)
def ffm_init_params(key, obs_dim, num_actions, args):
    h, m, c = args.hidden_size, args.trace_size, args.context_size
    k = jax.random.split(key, 7)
    return {
        "embed": init_linear(k[0], obs_dim, h),
        "embed_ln": init_norm(h),
        "ffm": {
            "pre": init_linear(k[1], h, 2 * m),  # trace input and its gate
            # As in ffm_tbb_dqn.py: decay rates |a_j| from 0.5 down to 1e-6 (memories of ~2
            # to ~1e6 steps); periods from --min-period to --max-period.
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


def ffm_gamma(p):
    """gamma_{jk} = exp(a_j + i b_k), with a_j clipped below 0 so every trace decays."""
    a = jnp.minimum(p["decay"], -1e-6)
    return jnp.exp(a[:, None] + 1j * p["freq"][None, :])


def ffm_input_map(params, h):
    """Embedding [..., hidden] -> FFM element (x 1^T, gamma), each [..., m, c] complex."""
    p = params["ffm"]
    value, gate = jnp.split(linear(p["pre"], h), 2, axis=-1)
    x = value * jax.nn.sigmoid(gate)
    gamma = ffm_gamma(p)
    s = jnp.broadcast_to(x[..., None], x.shape + (gamma.shape[-1],)).astype(jnp.complex64)
    return s, jnp.broadcast_to(gamma, s.shape)


def ffm_output_map(params, state, h):
    """Prefix state (S, g) and embedding h -> Markov state y (only S is read)."""
    p = params["ffm"]
    s, _ = state
    traces = jnp.concatenate([s.real, s.imag], axis=-1).reshape(s.shape[:-2] + (-1,))
    z = linear(p["mix"], traces)
    gate, skip = jnp.split(linear(p["post"], h), 2, axis=-1)
    gate = jax.nn.sigmoid(gate)
    return layer_norm(z * gate) + skip * (1.0 - gate)


def ffm_q_tape(params, obs, next_obs, start, scan):
    """Q(o_0..o_t) and Q(o_0..o_t, o_{t+1}) for every t of a tape, each [n, actions]."""
    h, h_next = embed(params, obs), embed(params, next_obs)
    states = resettable_scan(ffm_monoid_op, ffm_identity_like, ffm_input_map(params, h), start, scan)
    states_next = ffm_monoid_op(states, ffm_input_map(params, h_next))
    return (q_head(params, ffm_output_map(params, states, h)),
            q_head(params, ffm_output_map(params, states_next, h_next)))


def ffm_initial_carry(params, num_envs):
    shape = (num_envs,) + ffm_gamma(params["ffm"]).shape
    return ffm_identity_like((jnp.zeros(shape, jnp.complex64),) * 2)


def ffm_q_step(params, carry, obs, start):
    h = embed(params, obs)
    carry, _ = reset_op(ffm_monoid_op, (carry, start), (ffm_input_map(params, h), start))
    return q_head(params, ffm_output_map(params, carry, h)), carry


# ---- LRU (lru_tbb_dqn.py): --num-layers blocks, each pre-LN, LRU, GELU, GLU, residual -------
#     h_t = lambda * h_{t-1} + gamma * (B u_t),  u_t = LN(x_t)    (input map, then the scan)
#     y_t = Re(C h_t) + D * u_t;   x_t <- x_t + W_a z_t * sigmoid(W_g z_t),  z_t = GELU(y_t)
def lru_init_block(key, h, n, args):
    k = jax.random.split(key, 5)
    u_radius, u_phase = jax.random.uniform(k[0], (2, n), minval=1e-6)
    radius_sq = args.r_min**2 + u_radius * (args.r_max**2 - args.r_min**2)
    return {
        "norm": init_norm(h),
        "nu_log": jnp.log(-0.5 * jnp.log(radius_sq)),
        "theta_log": jnp.log(args.max_phase * u_phase),
        "gamma_log": 0.5 * jnp.log1p(-radius_sq),
        "B": jax.random.normal(k[1], (h, 2 * n)) / np.sqrt(2 * h),
        "C": jax.random.normal(k[2], (2 * n, h)) / np.sqrt(n),
        "D": jax.random.normal(k[3], (h,)),
        "glu": init_linear(k[4], h, 2 * h),  # the GLU's value and gate
    }


def lru_init_params(key, obs_dim, num_actions, args):
    h = args.hidden_size
    k = jax.random.split(key, 4 + args.num_layers)
    return {
        "embed": init_linear(k[0], obs_dim, h),
        "embed_ln": init_norm(h),
        "lru": [lru_init_block(kb, h, args.state_size, args) for kb in k[4:]],
        "head": {
            "hidden": init_linear(k[1], h, h),
            "value": init_linear(k[2], h, 1),
            "advantage": init_linear(k[3], h, num_actions),
        },
    }


def lru_lambda(p):
    """lambda = exp(-exp(nu) + i exp(theta)), one per state."""
    return jnp.exp(-jnp.exp(p["nu_log"]) + 1j * jnp.exp(p["theta_log"]))


def lru_input_map(p, u):
    """Normalised block input u [..., H] -> LRU element (lambda, gamma B u), each [..., N] complex."""
    bu_re, bu_im = jnp.split(u @ p["B"], 2, axis=-1)
    b = jnp.exp(p["gamma_log"]) * jax.lax.complex(bu_re, bu_im)
    lam = lru_lambda(p)
    return jnp.broadcast_to(lam, b.shape), b


def lru_output_map(p, state, x, u):
    """Prefix state (A, h), block input x and its norm u -> block output (only h is read)."""
    _, h = state
    y = jnp.concatenate([h.real, h.imag], axis=-1) @ p["C"] + p["D"] * u
    value, gate = jnp.split(linear(p["glu"], jax.nn.gelu(y)), 2, axis=-1)
    return x + value * jax.nn.sigmoid(gate)


def lru_q_tape(params, obs, next_obs, start, scan):
    """Q(o_0..o_t) and Q(o_0..o_t, o_{t+1}) for every t of a tape, one scan per block."""
    x, x_next = embed(params, obs), embed(params, next_obs)
    for p in params["lru"]:
        u, u_next = norm(p["norm"], x), norm(p["norm"], x_next)
        states = resettable_scan(lru_monoid_op, lru_identity_like, lru_input_map(p, u), start, scan)
        states_next = lru_monoid_op(states, lru_input_map(p, u_next))
        x, x_next = lru_output_map(p, states, x, u), lru_output_map(p, states_next, x_next, u_next)
    return q_head(params, x), q_head(params, x_next)


def lru_initial_carry(params, num_envs):
    return tuple(lru_identity_like((jnp.zeros((num_envs,) + p["nu_log"].shape, jnp.complex64),) * 2)
                 for p in params["lru"])


def lru_q_step(params, carry, obs, start):
    x = embed(params, obs)
    new_carry = []
    for p, state in zip(params["lru"], carry):
        u = norm(p["norm"], x)
        state, _ = reset_op(lru_monoid_op, (state, start), (lru_input_map(p, u), start))
        x = lru_output_map(p, state, x, u)
        new_carry.append(state)
    return q_head(params, x), tuple(new_carry)


# ---- Linear transformer (linear_transformer_tbb_dqn.py) -------------------------------------
#     k_t = W_k h_t,  v_t = W_v h_t,  element (phi(k_t) v_t^T, phi(k_t)),  phi = elu + 1
#     a_t = phi(q_t)^T S_t / (phi(q_t) . z_t + eps),  q_t = W_q h_t
#     y_t = LN(MLP(a_t) + W_s h_t)                           (small MLP, skip, LayerNorm)
def lt_init_heads_linear(key, n_in, heads, n_out):
    """A linear map to `heads` outputs of size n_out each: w [n_in, heads, n_out]."""
    p = init_linear(key, n_in, heads * n_out)
    return {"w": p["w"].reshape(n_in, heads, n_out), "b": p["b"].reshape(heads, n_out)}


def lt_heads_linear(p, x):
    """[..., n_in] -> [..., heads, n_out]."""
    return jnp.tensordot(x, p["w"], axes=1) + p["b"]


def lt_init_params(key, obs_dim, num_actions, args):
    h, heads = args.hidden_size, args.num_heads
    k = jax.random.split(key, 10)
    return {
        "embed": init_linear(k[0], obs_dim, h),
        "embed_ln": init_norm(h),
        "attention": {
            "query": lt_init_heads_linear(k[1], h, heads, args.key_size),
            "key": lt_init_heads_linear(k[2], h, heads, args.key_size),
            "value": lt_init_heads_linear(k[3], h, heads, args.value_size),
            "mlp": {"hidden": init_linear(k[4], heads * args.value_size, h),
                    "out": init_linear(k[5], h, h)},
            "skip": init_linear(k[6], h, h),
        },
        "head": {
            "hidden": init_linear(k[7], h, h),
            "value": init_linear(k[8], h, 1),
            "advantage": init_linear(k[9], h, num_actions),
        },
    }


def lt_feature_map(x):
    """phi(x) = elu(x) + 1: positive, so every attention weight phi(q) . phi(k) is too."""
    return jax.nn.elu(x) + 1.0


def lt_input_map(params, h):
    """Embedding -> element (phi(k) v^T [..., heads, key, value], phi(k) [..., heads, key])."""
    p = params["attention"]
    k = lt_feature_map(lt_heads_linear(p["key"], h))
    v = lt_heads_linear(p["value"], h)
    return k[..., :, None] * v[..., None, :], k


def lt_attention(params, state, h, eps=1e-6):
    """a = phi(q)^T S / (phi(q) . z + eps) per head, heads concatenated: [..., heads * value]."""
    s, z = state
    q = lt_feature_map(lt_heads_linear(params["attention"]["query"], h))
    numerator = jnp.einsum("...hk,...hkv->...hv", q, s)
    denominator = jnp.einsum("...hk,...hk->...h", q, z) + eps
    a = numerator / denominator[..., None]
    return a.reshape(a.shape[:-2] + (-1,))


def lt_output_map(params, state, h):
    """Prefix state (S, z) and embedding h -> Markov state y = LN(MLP(a) + W_s h)."""
    p = params["attention"]
    a = lt_attention(params, state, h)
    mlp = linear(p["mlp"]["out"], jax.nn.leaky_relu(linear(p["mlp"]["hidden"], a)))
    return layer_norm(mlp + linear(p["skip"], h))


def lt_q_tape(params, obs, next_obs, start, scan):
    """Q(o_0..o_t) and Q(o_0..o_t, o_{t+1}) for every t of a tape, each [n, actions]."""
    h, h_next = embed(params, obs), embed(params, next_obs)
    states = resettable_scan(lt_monoid_op, lt_identity_like, lt_input_map(params, h), start, scan)
    states_next = lt_monoid_op(states, lt_input_map(params, h_next))
    return (q_head(params, lt_output_map(params, states, h)),
            q_head(params, lt_output_map(params, states_next, h_next)))


def lt_initial_carry(params, num_envs):
    p = params["attention"]
    heads, key_size = p["key"]["b"].shape
    value_size = p["value"]["b"].shape[-1]
    shape = (num_envs, heads, key_size)
    return lt_identity_like((jnp.zeros(shape + (value_size,)), jnp.zeros(shape)))


def lt_q_step(params, carry, obs, start):
    h = embed(params, obs)
    carry, _ = reset_op(lt_monoid_op, (carry, start), (lt_input_map(params, h), start))
    return q_head(params, lt_output_map(params, carry, h)), carry


# ---- The three memories behind one interface ------------------------------------------------
class Memory(NamedTuple):
    params_key: str  # the top-level key of this model's params: it tells the models apart
    monoid_op: Callable
    identity_like: Callable
    init_params: Callable  # (key, obs_dim, num_actions, args) -> params
    q_tape: Callable  # (params, obs, next_obs, start, scan) -> (Q, Q_next), each [n, actions]
    initial_carry: Callable  # (params, num_envs) -> carry
    q_step: Callable  # (params, carry, obs, start) -> (Q, carry)


MEMORIES = {
    "ffm": Memory("ffm", ffm_monoid_op, ffm_identity_like, ffm_init_params, ffm_q_tape,
                  ffm_initial_carry, ffm_q_step),
    "lru": Memory("lru", lru_monoid_op, lru_identity_like, lru_init_params, lru_q_tape,
                  lru_initial_carry, lru_q_step),
    "linear_transformer": Memory("attention", lt_monoid_op, lt_identity_like, lt_init_params,
                                 lt_q_tape, lt_initial_carry, lt_q_step),
}


def memory_of(params):
    """The Memory whose params these are (read from the pytree's keys, at trace time)."""
    (memory,) = [m for m in MEMORIES.values() if m.params_key in params]
    return memory


# The TBB scripts' public functions, for the memory in `args` / `params`:
def init_params(key, obs_dim, num_actions, args):
    return MEMORIES[args.memory].init_params(key, obs_dim, num_actions, args)


def q_tape(params, obs, next_obs, start, scan):
    return memory_of(params).q_tape(params, obs, next_obs, start, scan)


def initial_carry(params, num_envs):
    """Recurrent state of `num_envs` envs before their first step: the identity."""
    return memory_of(params).initial_carry(params, num_envs)


def q_step(params, carry, obs, start):
    """One recurrent step for a batch of envs: the same reset op as the scan, so the two agree."""
    return memory_of(params).q_step(params, carry, obs, start)


def q_segments(params, obs, next_obs, scan):
    """Q(o_k..o_t) and Q(o_k..o_t, o_{t+1}) for every step t of every segment, where o_k is the
    segment's first step: each segment [L] of the batch [S, L, ...] is scanned on its own,
    from the identity (vmap over segments). Returns two [S, L, actions] arrays."""
    start = jnp.arange(obs.shape[1]) == 0  # one start, at each segment's first step
    return jax.vmap(q_tape, in_axes=(None, 0, 0, None, None))(params, obs, next_obs, start, scan)


# ---------------------------------------------------------------------------------------------
# (3) The segment buffer (paper Sec. 4.2: Segment-Based Batching, the baseline). A ring of
# `--buffer-size // L` segment slots on the device, each [L, ...] with a mask. A finished
# episode of n steps is written as its ceil(n / L) segments, in order: segment k holds steps
# kL .. kL+L-1, and the last is zero-padded (obs, action, reward, next_obs, flags all 0) with
# mask 0 where there is no step. The ring overwrites the oldest *segments*, so the oldest
# episode may keep only its later segments: each segment is an independent sample that
# starts from the identity, so no segment ever needs another.
# ---------------------------------------------------------------------------------------------
class Segments(NamedTuple):
    obs: jax.Array  # [C, L, obs_dim] float32
    action: jax.Array  # [C, L] int32
    reward: jax.Array  # [C, L] float32
    next_obs: jax.Array  # [C, L, obs_dim] float32
    terminated: jax.Array  # [C, L] bool: no bootstrap after this step
    truncated: jax.Array  # [C, L] bool: the episode was cut here; bootstrap from next_obs
    mask: jax.Array  # [C, L] bool: a real step (False: padding)
    next: jax.Array  # [] int32 slot the next segment is written to
    size: jax.Array  # [] int32 number of stored segments


class Batch(NamedTuple):
    obs: jax.Array  # [S, L, obs_dim]
    action: jax.Array  # [S, L]
    reward: jax.Array
    next_obs: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    mask: jax.Array  # [S, L] bool: a real step; each segment's first step is real


def init_segments(capacity, segment_length, obs_dim):
    """An empty ring of `capacity` segments of `segment_length` steps."""
    shape = (capacity, segment_length)
    # Distinct arrays for every field: add_episode donates (updates in place) each of them.
    obs = lambda: jnp.zeros(shape + (obs_dim,), jnp.float32)  # noqa: E731
    flags = lambda: jnp.zeros(shape, bool)  # noqa: E731
    return Segments(obs(), jnp.zeros(shape, jnp.int32), jnp.zeros(shape), obs(), flags(),
                    flags(), flags(), jnp.int32(0), jnp.int32(0))


def split_episode(episode, length, segment_length):
    """Fields [T, ...] (the first `length` real) -> ([K, L, ...] fields, mask [K, L]), with
    K = ceil(T / L): padding (and anything the staging rows held past `length`) becomes 0."""
    T = episode[0].shape[0]
    K = -(-T // segment_length)
    mask = jnp.arange(K * segment_length) < length

    def cut(x):
        x = jnp.pad(x, [(0, K * segment_length - T)] + [(0, 0)] * (x.ndim - 1))
        x = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
        return x.reshape((K, segment_length) + x.shape[1:])

    return tuple(cut(jnp.asarray(x)) for x in episode), mask.reshape(K, segment_length)


@partial(jax.jit, donate_argnums=0)  # donated: the ring is updated in place, not copied
def add_episode(buffer, episode, length):
    """Append one episode's ceil(length / L) segments, overwriting the oldest segments.

    `episode` holds (obs, action, reward, next_obs, terminated, truncated), each [T, ...],
    the first `length` real (as for the TBB tape). The ring must hold ceil(T / L) segments.
    """
    capacity, segment_length = buffer.mask.shape
    fields, mask = split_episode(episode, length, segment_length)
    count = (length + segment_length - 1) // segment_length
    k = jnp.arange(mask.shape[0])
    # Segments past the episode's end get an out-of-range index and are dropped by the scatter.
    idx = jnp.where(k < count, (buffer.next + k) % capacity, capacity)
    stored = [col.at[idx].set(new.astype(col.dtype), mode="drop")
              for col, new in zip(buffer[:6], fields)]
    return Segments(*stored, buffer.mask.at[idx].set(mask, mode="drop"),
                    (buffer.next + count) % capacity, jnp.minimum(buffer.size + count, capacity))


def sample_segments(buffer, key, num_segments):
    """`num_segments` stored segments, drawn uniformly with replacement: [S, L, ...] fields.

    Until the ring is full the stored segments are slots 0 .. size-1; after, all slots.
    """
    idx = jax.random.randint(key, (num_segments,), 0, buffer.size)
    return Batch(*(col[idx] for col in buffer[:7]))


# ---------------------------------------------------------------------------------------------
# (4) The loss: the TBB scripts' double DQN with a Polyak target network and Huber loss, on
# the segments' Q values, averaged over real (unpadded) steps only. The target of a step
# uses Q(o_k..o_t, o_{t+1}): its segment's prefix state combined with the stored next
# observation, so the last real step of a segment that ends mid-episode still bootstraps.
# ---------------------------------------------------------------------------------------------
def td_targets(q_next_online, q_next_target, reward, terminated, gamma):
    """y_t = r_t + gamma (1 - terminated_t) Q_target(o_{..t+1}, argmax_a Q_online(o_{..t+1}, a)).

    Truncation still bootstraps (the episode was cut, not ended); termination does not.
    """
    best = jnp.argmax(q_next_online, axis=-1)
    q_next = jnp.take_along_axis(q_next_target, best[:, None], axis=-1)[:, 0]
    return reward + gamma * (1.0 - terminated) * q_next


def td_loss(params, target_params, batch, gamma, scan):
    """Mean Huber TD error over the real steps of the batch, plus the mean Q of taken actions.

    Padded steps enter neither: they come after every real step of their segment (so the
    causal scan keeps them out of real steps' Q), and their errors are selected away.
    """
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731  [S, L, ...] -> [S L, ...]
    q, q_next_online = map(flat, q_segments(params, batch.obs, batch.next_obs, scan))
    _, q_next_target = q_segments(target_params, batch.obs, batch.next_obs, scan)
    target = jax.lax.stop_gradient(td_targets(q_next_online, flat(q_next_target),
                                              flat(batch.reward), flat(batch.terminated), gamma))
    q_taken = jnp.take_along_axis(q, flat(batch.action)[:, None], axis=-1)[:, 0]
    mask = flat(batch.mask)
    real = jnp.maximum(mask.sum(), 1)
    # jnp.where, not a product with the mask: a padded step cannot reach the loss or its gradient
    loss = jnp.where(mask, optax.huber_loss(q_taken, target), 0.0).sum() / real
    return loss, jnp.where(mask, q_taken, 0.0).sum() / real


# ---------------------------------------------------------------------------------------------
# (5) The jitted training loop, as in the TBB scripts: a train phase -- sample segments, TD
# loss, AdamW step, Polyak target update, repeated --updates-per-train times -- is ONE jitted
# call. SBB: the batch is --batch-size // L segments, and the phase also reports its density.
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
    num_segments = args.batch_size // args.segment_length  # equal slots: S * L <= B

    def update(state, buffer, key):
        batch = sample_segments(buffer, key, num_segments)
        (loss, q), grads = jax.value_and_grad(td_loss, has_aux=True)(
            state.params, state.target_params, batch, args.gamma, scan)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        target = optax.incremental_update(params, state.target_params, args.tau)
        return TrainState(params, target, opt_state), (loss, q, batch.mask.mean())

    @partial(jax.jit, donate_argnums=0)
    def train_phase(state, buffer, key):
        keys = jax.random.split(key, args.updates_per_train)
        state, (loss, q, density) = jax.lax.scan(lambda s, k: update(s, buffer, k), state, keys)
        return state, {"td_loss": loss.mean(), "q_values": q.mean(), "density": density.mean()}

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


# ==== outputs: as in the TBB scripts, except where marked "SBB" ====
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
               "q_values", "density", "epsilon", "sps", "elapsed_s")  # SBB: density

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
              f"{row['td_loss']:.2e} | density {row['density']:.2f} | eps {row['epsilon']:.3f} | "
              f"{clock(elapsed)} elapsed, "
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
# ==== end outputs ====


# ==== main: as in the TBB scripts, except where marked "SBB" ====
class Diverged(Exception):
    """The loss became non-finite: reported as one line on stderr, exit code 1."""

    exit_code = 1


def train(args):
    """The algorithm box: collect with the recurrent policy, store each finished episode as
    segments, and every --train-frequency steps run one jitted train phase on sampled segments."""
    make_env, cap = resolve_env(args.env_id, args.max_episode_steps)
    for flag, value in (("--buffer-size", args.buffer_size), ("--batch-size", args.batch_size)):
        if value < cap:
            raise UsageError(f"{flag} {value} is smaller than the longest episode of "
                             f"{args.env_id} ({cap} steps)")
    # SBB: the ring holds --buffer-size // L segments; the longest episode must fit in it.
    capacity = args.buffer_size // args.segment_length
    per_episode = -(-cap // args.segment_length)
    if capacity < per_episode:
        raise UsageError(f"--buffer-size {args.buffer_size} holds {capacity} segments of "
                         f"{args.segment_length} steps; the longest episode of {args.env_id} "
                         f"({cap} steps) needs {per_episode}")
    num_segments = args.batch_size // args.segment_length
    envs = make_vector_env(make_env, args.num_envs)
    eval_envs = make_vector_env(make_env, args.eval_episodes)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    scan = pick_scan(args.scan)

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(vars(args) | {"scan_used": scan, "episode_cap": cap,  # SBB: and the shapes
                                "buffer_segments": capacity, "batch_segments": num_segments,
                                "batch_slots": num_segments * args.segment_length}, f, indent=2)

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
    buffer = init_segments(capacity, args.segment_length, obs_dim)  # SBB
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
    print(f"{run_name}: {args.env_id} (episodes <= {cap} steps), {args.memory}, "
          f"{num_segments} segments of {args.segment_length} steps per batch, buffer of "
          f"{capacity} segments, {scan} scan, backend {jax.default_backend()}, "
          f"run folder {run_dir}")
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
            buffer = add_episode(buffer, *staging.pop(i))
            returns.append(ep_return[i])
            ep_return[i] = 0.0
            episodes += 1
        obs, start = next_obs, done
        step += args.num_envs

        while step >= next_train and episodes > 0:
            key, k = jax.random.split(key)
            state, metrics = train_phase(state, buffer, k)
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
                     if phase_metrics else float("nan")
                     for name in ("td_loss", "q_values", "density")}  # SBB: density
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
# ==== end main ====


if __name__ == "__main__":
    run()
