"""Tests for the memoroids, the networks, the buffers, the loss and the scripts.

Every check compares against an independent reference -- a plain Python/NumPy loop, a
per-episode run, a from-scratch recurrence -- never against the code under test itself.
Sections: memoroid laws and scans; networks; buffers; loss; scripts end to end; returns;
VML; runners; stopping early, limits and the README's commands.  Run: python -m pytest -q
"""

import argparse
import atexit
import collections
import contextlib
import csv
import importlib.util
import io
import json
import os
import pdb
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ffm_tbb_dqn as ffm
import linear_transformer_tbb_dqn as lt
import lru_tbb_dqn as lru
import sbb_baseline_dqn as sbb
import vml_analysis as vml
from discounted_return_scan import (
    blocked_scan,
    discounted_prefix_sum,
    discounted_return,
    jit_episode_returns,
    jit_lax_scan_returns,
    lax_scan_returns,
    numpy_loop_returns,
    parse_args as parse_returns_args,
    reset_return_op,
    return_op,
    sequential_scan,
)

HERE = os.path.dirname(os.path.abspath(__file__))
# One compilation cache for this test session, here and in the scripts the tests start (they
# inherit the environment): a program compiled once (the tiny FFM run, or a network that a
# test jits anew) is read back, not compiled again. A fresh folder: no test sees an old one.
JAX_CACHE = tempfile.mkdtemp(prefix="memoroids-tests-jax-cache-")
atexit.register(shutil.rmtree, JAX_CACHE, ignore_errors=True)
os.environ.update(JAX_COMPILATION_CACHE_DIR=JAX_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
# The tests' arrays are tiny, so compiling is most of their time: XLA's backend (LLVM) at its
# lowest optimisation level compiles faster (the suite's CPU time -20% on 2 cores); it tunes
# the machine code less, not the operations it runs. XLA reads it when it starts, after these
# imports.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    "--xla_backend_optimization_level=0"]).strip()
jax.config.update("jax_compilation_cache_dir", JAX_CACHE)  # this process read the env at import
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
SCANS = ("associative", "sequential")
OBS_DIM, NUM_ACTIONS = 5, 3


def episode_starts(lengths):
    start = np.zeros(sum(lengths), bool)
    start[np.cumsum([0] + list(lengths[:-1]))] = True
    return start


def take(elements, i):
    return jax.tree.map(lambda x: x[i], elements)


def assert_tree_close(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# =============================================================================================
# Memoroid laws and scans: each op against its recurrence written as a plain loop
# =============================================================================================
def random_ffm_elements(rng, n, m=3, c=2):
    s = rng.normal(size=(n, m, c)) + 1j * rng.normal(size=(n, m, c))
    g = rng.uniform(0.5, 1.0, (n, m, c)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (n, m, c)))
    return jnp.asarray(s, jnp.complex64), jnp.asarray(g, jnp.complex64)


def ffm_loop(s, g, start):
    """FFM by its definition: S_t = S_{t-1} * g_t + s_t, restarted from 0 at every start."""
    s, g = np.asarray(s, np.complex128), np.asarray(g, np.complex128)
    out_s, out_g = [], []
    for t in range(len(s)):
        if start[t]:
            trace, decay = np.zeros_like(s[0]), np.ones_like(g[0])
        trace, decay = trace * g[t] + s[t], decay * g[t]
        out_s.append(trace)
        out_g.append(decay)
    return np.stack(out_s), np.stack(out_g)


def random_lru_elements(rng, n, m=4):
    """Random (A, h): decays inside the unit disc, states anywhere."""
    a = rng.uniform(0.5, 1.0, (n, m)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (n, m)))
    b = rng.normal(size=(n, m)) + 1j * rng.normal(size=(n, m))
    return jnp.asarray(a, jnp.complex64), jnp.asarray(b, jnp.complex64)


def lru_loop(a, b, start):
    """h_t = A_t h_{t-1} + b_t (and the decay so far P_t = A_t P_{t-1}), restarted from h = 0,
    P = 1 at every start."""
    a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
    out_a, out_h = [], []
    for t in range(len(a)):
        if start[t]:
            decay, h = np.ones_like(a[0]), np.zeros_like(b[0])
        decay, h = a[t] * decay, a[t] * h + b[t]
        out_a.append(decay)
        out_h.append(h)
    return np.stack(out_a), np.stack(out_h)


def random_lt_elements(rng, n, heads=2, k=3, v=4):
    """Elements (phi(k) v^T, phi(k)) as the input map makes them: z > 0, S of any sign."""
    z = rng.uniform(0.1, 2.0, (n, heads, k))
    s = z[..., None] * rng.normal(size=(n, heads, 1, v))
    return jnp.asarray(s, jnp.float32), jnp.asarray(z, jnp.float32)


def lt_loop(s, z, start):
    """S_t = S_{t-1} + s_t, z_t = z_{t-1} + z'_t, restarted from 0 at every start."""
    s, z = np.asarray(s, np.float64), np.asarray(z, np.float64)
    out_s, out_z = [], []
    for t in range(len(s)):
        if start[t]:
            total_s, total_z = np.zeros_like(s[0]), np.zeros_like(z[0])
        total_s, total_z = total_s + s[t], total_z + z[t]
        out_s.append(total_s)
        out_z.append(total_z)
    return np.stack(out_s), np.stack(out_z)


# model -> (module, random elements, the recurrence as a plain loop, jitted scan). Jitted: one
# compile per shape instead of one per primitive (associative scans compile slowly).
MEMOROIDS = {
    name: (module, elements, loop, jax.jit(module.resettable_scan, static_argnames="scan"))
    for name, module, elements, loop in (("ffm", ffm, random_ffm_elements, ffm_loop),
                                         ("lru", lru, random_lru_elements, lru_loop),
                                         ("linear_transformer", lt, random_lt_elements, lt_loop))}


@pytest.mark.parametrize("model", MEMOROIDS)
def test_op_is_associative_with_two_sided_identity(model):
    module, random_elements, _, _ = MEMOROIDS[model]
    a, b, c = (take(random_elements(np.random.default_rng(0), 3), i) for i in range(3))
    op = module.monoid_op
    assert_tree_close(op(op(a, b), c), op(a, op(b, c)))
    e = module.identity_like(a)
    for left, right in ((e, a), (a, e)):
        assert_tree_close(op(left, right), a, rtol=0, atol=0)


@pytest.mark.parametrize("flags", [(i >> 2 & 1, i >> 1 & 1, i & 1) for i in range(8)])
@pytest.mark.parametrize("model", MEMOROIDS)
def test_reset_op_is_associative(model, flags):
    module, random_elements, _, _ = MEMOROIDS[model]
    x = random_elements(np.random.default_rng(1), 3)
    a, b, c = ((take(x, i), jnp.asarray(bool(f))) for i, f in enumerate(flags))
    left = module.reset_op(module.reset_op(a, b), c)
    right = module.reset_op(a, module.reset_op(b, c))
    assert_tree_close(left, right)
    assert bool(left[1]) == any(flags)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("model", MEMOROIDS)
def test_scan_over_concatenated_episodes(model, scan):
    _, random_elements, loop, scan_jit = MEMOROIDS[model]
    lengths = [5, 1, 9, 3, 1, 12]
    start = episode_starts(lengths)
    x = random_elements(np.random.default_rng(2), len(start))
    states = scan_jit(x, jnp.asarray(start), scan=scan)
    assert_tree_close(states, loop(*x, start))  # == a plain loop
    begin = 0
    for n in lengths:  # == each episode scanned alone from the identity
        alone = scan_jit(take(x, slice(begin, begin + n)), jnp.zeros(n, bool), scan=scan)
        assert_tree_close(take(states, slice(begin, begin + n)), alone)
        begin += n


@pytest.mark.parametrize("model", MEMOROIDS)
def test_associative_equals_sequential(model):
    _, random_elements, _, scan_jit = MEMOROIDS[model]
    start = episode_starts([40, 70, 1, 17])
    x = random_elements(np.random.default_rng(3), len(start))
    a = scan_jit(x, jnp.asarray(start), scan="associative")
    s = scan_jit(x, jnp.asarray(start), scan="sequential")
    assert_tree_close(a, s, rtol=1e-4, atol=1e-4)


# =============================================================================================
# Networks: tape path == step path, no information across an episode start, and each memory
# against an independent reference
# =============================================================================================
# model -> (module, small model flags)
NETWORKS = {
    "ffm": (ffm, ["--hidden-size", "16", "--trace-size", "4", "--context-size", "3",
                  "--max-period", "16"]),
    "lru": (lru, ["--hidden-size", "16", "--state-size", "64", "--num-layers", "2"]),
    "linear_transformer": (lt, ["--hidden-size", "16", "--key-size", "3", "--value-size", "4",
                                "--num-heads", "2"]),
}


@lru_cache(maxsize=None)
def net_params(model, seed=0, *extra_flags):
    module, flags = NETWORKS[model]
    args = module.parse_args(flags + list(extra_flags))
    return jax.jit(lambda k: module.init_params(k, OBS_DIM, NUM_ACTIONS, args))(
        jax.random.PRNGKey(seed))


@lru_cache(maxsize=None)
def q_tape_jit(model):
    return jax.jit(NETWORKS[model][0].q_tape, static_argnames="scan")


def random_tape_obs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    obs = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    next_obs = np.roll(obs, -1, axis=0)  # within an episode next_obs[t] == obs[t+1]
    ends = np.cumsum(lengths) - 1
    next_obs[ends] = rng.normal(size=(len(lengths), OBS_DIM))  # the final observations
    return obs, next_obs, episode_starts(lengths)


@lru_cache(maxsize=None)
def q_step_jit(module):
    return jax.jit(module.q_step)


def step_loop(module, params, obs, start):
    """Q values from the recurrent step path, one observation at a time (batch of 1 env)."""
    carry = module.initial_carry(params, 1)
    qs = []
    for t in range(len(obs)):
        q, carry = q_step_jit(module)(params, carry, jnp.asarray(obs[t:t + 1]),
                                      jnp.asarray(start[t:t + 1]))
        qs.append(np.asarray(q[0]))
    return np.stack(qs)


def assert_no_leak(q_fn, obs, next_obs, start, steps):
    """q_fn(obs, next_obs) -> (Q, Q_next), each [T, actions]. At step t both may depend only
    on obs[b..t] (b the start of t's episode) and Q_next also on next_obs[t]: the gradient is
    zero everywhere else, and not zero there (so the test can fail)."""
    grad = jax.jit(jax.grad(lambda o, n, t: sum(q[t].sum() for q in q_fn(o, n)), argnums=(0, 1)))
    for t in steps:
        g_obs, g_next = map(np.asarray, grad(jnp.asarray(obs), jnp.asarray(next_obs), t))
        begin = max(b for b in np.flatnonzero(start) if b <= t)
        assert not np.delete(g_obs, np.arange(begin, t + 1), axis=0).any()
        assert not np.delete(g_next, t, axis=0).any()
        assert g_obs[begin:t + 1].any() and g_next[t].any()


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("model", NETWORKS)
def test_no_information_crosses_an_episode_start(model, scan):
    params = net_params(model)
    lengths = [6, 5, 4]
    obs, next_obs, start = random_tape_obs(lengths, seed=1)
    q_fn = lambda o, n: NETWORKS[model][0].q_tape(params, o, n, start, scan)  # noqa: E731
    assert_no_leak(q_fn, obs, next_obs, start, steps=(0, 6, 8, 14))


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("model", NETWORKS)
def test_step_path_equals_tape_path(model, scan):
    module, params = NETWORKS[model][0], net_params(model)
    lengths = [7, 1, 12]
    obs, next_obs, start = random_tape_obs(lengths)
    q, q_next = q_tape_jit(model)(params, obs, next_obs, start, scan=scan)
    np.testing.assert_allclose(np.asarray(q), step_loop(module, params, obs, start),
                               rtol=1e-5, atol=1e-5)
    # Q(o_0..o_t, o_t+1) == the step path run over the episode with next_obs[t] appended
    ends = set(np.cumsum(lengths) - 1)
    begin = 0
    for t in range(len(obs)):
        begin = t if start[t] else begin
        seq = np.concatenate([obs[begin:t + 1], next_obs[t:t + 1]])
        expect = step_loop(module, params, seq, episode_starts([len(seq)]))[-1]
        np.testing.assert_allclose(np.asarray(q_next[t]), expect, rtol=1e-5, atol=1e-5)
        if t not in ends:  # inside an episode the next observation is the next tape entry
            np.testing.assert_allclose(np.asarray(q_next[t]), np.asarray(q[t + 1]),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, expected", [
    # embedding 6*256+256, head 2 blocks of 256*256+256 and V, A of 257 + 4*257: 134,661; then
    # FFM: W_v,g 256*128+128, a 64, b 4, mix 512*256+256, gates 256*512+512 (the paper code's
    # 430,537); LRU: per block norm 512, nu, theta, gamma 3*128, B, C 2*256*256, D 256, GLU
    # 256*512+512; linear transformer: q, k, v 3*(256*16+16), MLP 16*256+256 and 256*256+256,
    # skip 256*256+256
    ("ffm", 134_661 + 295_876), ("lru", 134_661 + 2 * 263_808),
    ("linear_transformer", 134_661 + 148_272)])
def test_default_network_sizes_and_head_against_numpy(model, expected):
    """The paper code's network: parameter count at the default sizes (RepeatFirstEasy's 6
    inputs and 4 actions), and its embedding and head against a NumPy reference."""
    module = {"ffm": ffm, "lru": lru, "linear_transformer": lt}[model]
    params = module.init_params(jax.random.PRNGKey(0), 6, 4, module.parse_args([]))
    assert sum(leaf.size for leaf in jax.tree.leaves(params)) == expected
    np_ = {name: {k: np.asarray(v) for k, v in layer.items()}
           for name, layer in params["head"].items()}

    def block(p, x):  # Linear -> LayerNorm without scale or bias -> leaky ReLU
        z = x @ p["w"] + p["b"]
        z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
        return np.where(z > 0, z, 0.01 * z)

    y = np.random.default_rng(1).normal(size=(5, 256)).astype(np.float32)
    hidden = block(np_["block1"], block(np_["block0"], y))
    v, a = (hidden @ np_[n]["w"] + np_[n]["b"] for n in ("value", "advantage"))
    np.testing.assert_allclose(np.asarray(module.q_head(params, jnp.asarray(y))),
                               v + a - a.mean(-1, keepdims=True), rtol=1e-4, atol=1e-6)
    obs = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    embed = {k: np.asarray(v) for k, v in params["embed"].items()}
    np.testing.assert_allclose(np.asarray(module.embed(params, jnp.asarray(obs))),
                               block(embed, obs), rtol=1e-4, atol=1e-5)
    # It starts as the paper code's: V and A 10x smaller than the blocks, with zero bias
    bound = 1 / 16  # 1 / sqrt(256)
    assert np.abs(np_["advantage"]["w"]).max() <= 0.1 * bound and not np_["value"]["b"].any()
    assert np.abs(np_["block0"]["b"]).max() > 0.5 * bound  # uniform biases, as equinox's


def lru_eigenvalues(params):
    """[(lambda, gamma) of each block], from the stored logs in float64."""
    return [(np.exp(-np.exp(np.float64(p["nu_log"])) + 1j * np.exp(np.float64(p["theta_log"]))),
             np.exp(np.float64(p["gamma_log"]))) for p in params["lru"]]


def test_lru_ring_initialisation():
    """The default: two rings, the first half of each block's states on the first, the rest on
    the second; on each, |lambda|^2 uniform on [r_min^2, r_max^2], phase on [0, max_phase]."""
    params = net_params("lru")
    args = lru.parse_args(NETWORKS["lru"][1])
    assert (args.r_min, args.r_max, args.max_phase) == ([0.0, 0.9], [0.9999, 0.999],
                                                         [6.28, 0.314159])
    half = args.state_size // 2
    for i, (r_min, r_max, max_phase) in enumerate(zip(args.r_min, args.r_max, args.max_phase)):
        on_ring = slice(i * half, (i + 1) * half)
        lam, gamma = map(np.concatenate, zip(*((lam[on_ring], gamma[on_ring])
                                               for lam, gamma in lru_eigenvalues(params))))
        radius, phase = np.abs(lam), np.angle(lam) % (2 * np.pi)  # max_phase < 2 pi
        assert np.all((radius >= r_min - 1e-6) & (radius <= r_max + 1e-6))
        assert np.all((phase >= 0) & (phase <= max_phase + 1e-6))
        # tolerances ~4 standard errors of the mean of len(lam) uniform draws
        se = 4 / np.sqrt(12 * len(lam))
        np.testing.assert_allclose(np.mean(radius**2), (r_min**2 + r_max**2) / 2,
                                   atol=se * (r_max**2 - r_min**2))
        np.testing.assert_allclose(np.mean(phase), max_phase / 2, atol=se * max_phase)
        np.testing.assert_allclose(gamma, np.sqrt(1 - radius**2), rtol=1e-4)


def test_lru_several_rings_share_the_states_evenly(capsys):
    """--r-min 0 0.9 --r-max 0.5 0.999 ...: the states of each block, in order, split between
    the two rings (counted from the eigenvalues: the rings' radii do not overlap)."""
    for n, first in ((64, 32), (5, 3)):
        args = lru.parse_args(["--r-min", "0", "0.9", "--r-max", "0.5", "0.999", "--max-phase",
                               "3.14159", "0.314159", "--state-size", str(n), "--hidden-size", "8"])
        for lam, gamma in lru_eigenvalues(lru.init_params(jax.random.PRNGKey(n), 4, 2, args)):
            radius, phase = np.abs(lam), np.angle(lam) % (2 * np.pi)
            assert np.all(radius[:first] <= 0.5 + 1e-6) and np.all(phase[:first] <= np.pi + 1e-5)
            assert np.all((radius[first:] >= 0.9 - 1e-6) & (radius[first:] <= 0.999 + 1e-6))
            assert np.all(phase[first:] <= np.pi / 10 + 1e-5)
            np.testing.assert_allclose(gamma, np.sqrt(1 - radius**2), rtol=1e-4)
    for flags in (["--r-min", "0", "0.5", "0.9"],  # three rings, the defaults' two of the others
                  ["--max-phase", "1", "2", "3", "--r-min", "0", "0", "0",
                   "--r-max", "0.5", "0.6", "0.7", "--state-size", "2"]):
        with pytest.raises(SystemExit) as e:
            lru.parse_args(flags)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "one value per |lambda| ring" in err


def numpy_lru_q(params, obs, start):
    """Q values of the whole LRU network in float64 NumPy, each LRU as the plain loop
    h_t = lambda h_{t-1} + gamma B u_t restarted at 0 on each start."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def ln(s, x):
        z = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        return z * s["scale"] + s["bias"]

    def lin(s, x):
        return x @ s["w"] + s["b"]

    def leaky(x):
        return np.where(x > 0, x, 0.01 * x)

    def gelu(x):  # tanh form, like jax.nn.gelu's default
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def block(s, x):  # Linear -> LayerNorm without scale or bias -> leaky ReLU
        return leaky(ln({"scale": 1.0, "bias": 0.0}, lin(s, x)))

    x = block(p["embed"], obs)
    for blk in p["lru"]:
        n = blk["nu_log"].size
        lam = np.exp(-np.exp(blk["nu_log"]) + 1j * np.exp(blk["theta_log"]))
        gamma = np.exp(blk["gamma_log"])
        b_mat = blk["B"][:, :n] + 1j * blk["B"][:, n:]  # [H, N]: u @ B
        c_mat = blk["C"][:n] - 1j * blk["C"][n:]  # [N, H]: Re(h @ C)
        out = np.empty_like(x)
        for t in range(len(x)):
            if start[t]:
                h = np.zeros(n, complex)
            u = ln(blk["norm"], x[t])
            h = lam * h + gamma * (u @ b_mat)
            y = (h @ c_mat).real + blk["D"] * u
            value, gate = np.split(lin(blk["glu"], gelu(y)), 2)
            out[t] = x[t] + value / (1 + np.exp(-gate))
        x = out
    hidden = block(p["head"]["block1"], block(p["head"]["block0"], x))
    adv = lin(p["head"]["advantage"], hidden)
    return lin(p["head"]["value"], hidden) + adv - adv.mean(-1, keepdims=True)


@pytest.mark.parametrize("scan", SCANS)
def test_lru_q_tape_equals_numpy_loop(scan):
    params = net_params("lru")
    obs, next_obs, start = random_tape_obs([7, 1, 12], seed=2)
    q, q_next = q_tape_jit("lru")(params, obs, next_obs, start, scan)
    np.testing.assert_allclose(np.asarray(q), numpy_lru_q(params, obs, start), rtol=1e-4, atol=1e-4)
    # the last step's next observation, run as one more step of the last episode
    last = numpy_lru_q(params, np.concatenate([obs, next_obs[-1:]]), np.append(start, False))[-1]
    np.testing.assert_allclose(np.asarray(q_next[-1]), last, rtol=1e-4, atol=1e-4)


def np_phi(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def causal_attention_loop(p, x, start, eps=1e-6):
    """out_t = sum_{s<=t, same episode} (phi(q_t).phi(k_s)) v_s / (sum_s phi(q_t).phi(k_s) + eps),
    softmax-free causal attention over each episode, written out pair by pair."""
    x = np.asarray(x, np.float64)
    proj = {n: np.tensordot(x, np.asarray(p[n]["w"], np.float64), axes=1) + np.asarray(p[n]["b"])
            for n in ("query", "key", "value")}
    q, k, v = np_phi(proj["query"]), np_phi(proj["key"]), proj["value"]
    heads, n_out = v.shape[1], v.shape[2]
    out = np.zeros((len(x), heads, n_out))
    begin = 0
    for t in range(len(x)):
        begin = t if start[t] else begin
        for head in range(heads):
            num, den = np.zeros(n_out), 0.0
            for s in range(begin, t + 1):
                w = float(q[t, head] @ k[s, head])
                num += w * v[s, head]
                den += w
            out[t, head] = num / (den + eps)
    return out.reshape(len(x), -1)


@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("scan", SCANS)
def test_lt_attention_equals_causal_attention_per_episode(num_heads, scan):
    p = net_params("linear_transformer", num_heads, "--num-heads", str(num_heads))
    lengths = [5, 1, 9, 3, 1, 12]  # the tape of test_scan_over_concatenated_episodes: one compile
    obs, next_obs, start = random_tape_obs(lengths, seed=5)
    x = lt.embed(p, jnp.asarray(obs))
    states = MEMOROIDS["linear_transformer"][3](lt.input_map(p, x), jnp.asarray(start), scan=scan)
    np.testing.assert_allclose(np.asarray(lt.attention(p, states, x)),
                               causal_attention_loop(p["attention"], x, start), rtol=1e-5, atol=1e-5)
    # The Q_next path: the prefix state after o_t plus o_t+1's element, queried by o_t+1.
    x_next = lt.embed(p, jnp.asarray(next_obs))
    a_next = np.asarray(lt.attention(p, lt.monoid_op(states, lt.input_map(p, x_next)), x_next))
    x, x_next = np.asarray(x), np.asarray(x_next)  # NumPy slices: no compile per slice shape
    begin = 0
    for t in range(len(obs)):
        begin = t if start[t] else begin
        seq = np.concatenate([x[begin:t + 1], x_next[t:t + 1]])
        expect = causal_attention_loop(p["attention"], seq, episode_starts([len(seq)]))[-1]
        np.testing.assert_allclose(a_next[t], expect, rtol=1e-5, atol=1e-5)


def test_lt_normaliser_is_the_dot_product_of_query_features_and_z():
    """phi(q)^T S / (phi(q) . z): a hand-made state where (sum z)(sum phi(q)) differs."""
    p = dict(net_params("linear_transformer"))
    p["attention"] = dict(p["attention"], query={"w": jnp.zeros((16, 2, 2)),  # phi(q): [1, 2], [2, 1]
                                                 "b": jnp.array([[0.0, 1.0], [1.0, 0.0]])})
    s = jnp.array([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, 3.0]]])  # [heads, key, value]
    z = jnp.array([[3.0, 0.5], [1.0, 4.0]])  # [heads, key]
    out = np.asarray(lt.attention(p, (s, z), jnp.zeros(16)))
    # head 0: [1*1 + 2*3, 1*2 + 2*4] / (1*3 + 2*0.5);  head 1: [2*2, 1*3] / (2*1 + 1*4)
    expect = np.array([7.0 / 4.0, 10.0 / 4.0, 4.0 / 6.0, 3.0 / 6.0])
    np.testing.assert_allclose(out, expect, rtol=1e-5)
    wrong = np.array([7.0, 10.0, 4.0, 3.0]) / np.array([3.5 * 3, 3.5 * 3, 5 * 3, 5 * 3])
    assert not np.allclose(out, wrong, rtol=1e-2)


# SBB runs the TBB networks on segments: each segment is a new episode of L steps.
def observed(obs, next_obs):
    """A batch of segments [S, L, ...] that holds only what q_segments reads."""
    return (ffm.Transition(obs, None, None, next_obs, None, None),)


@pytest.mark.parametrize("model", NETWORKS)
def test_sbb_segment_q_equals_tbb_q_of_that_slice(model):
    module, params = NETWORKS[model][0], net_params(model)
    obs, next_obs, _ = random_tape_obs([12], seed=5)
    L = 4
    q, q_next = jax.jit(sbb.q_segments, static_argnums=(0, 3))(
        module.q_tape, params, observed(obs.reshape(3, L, OBS_DIM),
                                        next_obs.reshape(3, L, OBS_DIM)), "sequential")
    for k in range(3):  # segment k = steps 4k..4k+3 run as their own episode
        steps = slice(k * L, (k + 1) * L)
        expect = step_loop(module, params, obs[steps], episode_starts([L]))
        np.testing.assert_allclose(np.asarray(q[k]), expect, rtol=1e-5, atol=1e-5)
        last = np.concatenate([obs[steps], next_obs[steps][-1:]])
        np.testing.assert_allclose(np.asarray(q_next[k, -1]),
                                   step_loop(module, params, last, episode_starts([L + 1]))[-1],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model,scan", [(m, "sequential") for m in NETWORKS] + [("ffm", "associative")])
def test_no_information_crosses_a_segment(model, scan):
    params, L = net_params(model), 5
    obs, next_obs, _ = random_tape_obs([15], seed=2)  # one episode: 3 consecutive segments

    def q_fn(o, n):
        q = sbb.q_segments(NETWORKS[model][0].q_tape, params,
                           observed(o.reshape(3, L, -1), n.reshape(3, L, -1)), scan)
        return jax.tree.map(lambda x: x.reshape(3 * L, -1), q)

    assert_no_leak(q_fn, obs, next_obs, np.arange(15) % L == 0, steps=(5, 8, 12))


# =============================================================================================
# Buffers: the tape against a FIFO of whole episodes; the segments against a plain split
# =============================================================================================
def make_episode(ep_id, length, cap, obs_dim=2):
    """Fields padded to `cap`; every value encodes (episode id, step) so a test can check it."""
    t = np.arange(cap)
    obs = np.stack([np.full(cap, ep_id), t], 1).astype(np.float32)[:, :obs_dim]
    return ffm.Transition(obs, (ep_id * 7 + t) % 5, ep_id + t / 1000.0, obs + 0.5,
                          t == length - 1, np.zeros(cap, bool)), np.int32(length)


def check_sampled_tape(batch, stored, batch_size):
    """`stored` maps episode id -> length for every episode the reference buffer holds."""
    steps, start = jax.tree.map(np.asarray, batch)
    obs = steps.obs
    assert obs.shape[0] == batch_size and start[0]
    runs = np.split(np.arange(batch_size), np.flatnonzero(start)[1:])
    for k, run in enumerate(runs):
        ep_id = int(obs[run[0], 0])
        assert ep_id in stored, "sampled an evicted episode"
        assert np.all(obs[run, 0] == ep_id) and np.all(obs[run, 1] == np.arange(len(run)))
        if k < len(runs) - 1:
            assert len(run) == stored[ep_id], "an episode was cut before the last one"
        else:
            assert len(run) <= stored[ep_id]
        t = np.arange(len(run))
        np.testing.assert_array_equal(steps.action[run], (ep_id * 7 + t) % 5)
        np.testing.assert_allclose(steps.reward[run], ep_id + t / 1000.0)
        np.testing.assert_array_equal(steps.next_obs[run], obs[run] + 0.5)
        np.testing.assert_array_equal(steps.terminated[run], t == stored[ep_id] - 1)


def test_tape_buffer_against_fifo_reference():
    capacity, cap, batch_size = 97, 13, 40
    rng = np.random.default_rng(0)
    tape = ffm.init_tape(capacity, 2)
    reference = collections.OrderedDict()  # episode id -> length, oldest first
    sample = jax.jit(ffm.sample_tape, static_argnums=2)
    for ep_id in range(120):  # ~7 trips around the ring
        length = int(rng.integers(1, cap + 1))
        tape = ffm.add_episode(tape, *make_episode(ep_id, length, cap))
        reference[ep_id] = length
        while sum(reference.values()) > capacity:
            reference.popitem(last=False)
        assert int(tape.size) == sum(reference.values())
        for k in range(3):
            batch = sample(tape, jax.random.PRNGKey(ep_id * 3 + k), batch_size)
            check_sampled_tape(batch, reference, batch_size)


def test_every_stored_step_is_equally_likely_to_be_trained_on():
    """sample_tape's claim, checked on the step counts themselves over episodes of 1 to 12
    steps: each episode is drawn equally often, and each stored step lands in a training tape
    equally often (drawing episodes by length would give a 1-step episode's step ~0.1x)."""
    cap, batch_size = 12, 120
    lengths = np.random.default_rng(0).permutation(np.arange(1, cap + 1))
    tape = ffm.init_tape(128, 2)
    for ep_id, n in enumerate(lengths):
        tape = ffm.add_episode(tape, *make_episode(ep_id, int(n), cap))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    obs = jax.vmap(lambda k: ffm.sample_tape(tape, k, batch_size)[0].obs)(keys)
    ep_id, t = np.asarray(obs).reshape(-1, 2).astype(int).T
    first = np.bincount(np.asarray(obs)[:, 0, 0].astype(int), minlength=cap) / len(keys)
    np.testing.assert_allclose(first, 1 / cap, atol=0.015)  # uniform episode draws
    counts = np.zeros((cap, cap))
    np.add.at(counts, (ep_id, t), 1)
    uniform = len(ep_id) / lengths.sum()  # expected count of every stored step
    per_episode = np.array([counts[i, :n].mean() for i, n in enumerate(lengths)]) / uniform
    np.testing.assert_allclose(per_episode, 1.0, atol=0.06)
    per_step = np.concatenate([counts[i, :n] for i, n in enumerate(lengths)]) / uniform
    assert 0.85 < per_step.min() and per_step.max() < 1.15, (per_step.min(), per_step.max())
    assert counts[np.arange(cap)[None, :] >= lengths[:, None]].sum() == 0  # nothing unstored


def tagged_episode(ep_id, length, cap, obs_dim=2, junk=9.0):
    """Fields padded to `cap` with junk (as stale rows of the running episodes are); every real
    value encodes (episode id, step)."""
    t = np.arange(cap)
    real = t < length
    obs = np.where(real[:, None], np.stack([np.full(cap, ep_id), t], 1), junk).astype(np.float32)
    return ffm.Transition(obs, np.where(real, (ep_id * 7 + t) % 5 + 1, 3),
                          np.where(real, ep_id + t / 1000.0, junk).astype(np.float32),
                          np.where(real[:, None], obs + 0.5, junk), real & (t == length - 1),
                          np.where(real, False, True))


def python_split(episode, length, L):
    """Plain Python: the segments of one episode, each a dict of [L] lists, padded with 0."""
    segments = []
    for begin in range(0, length, L):
        seg = {"mask": [begin + i < length for i in range(L)]}
        for name, field in episode._asdict().items():
            seg[name] = [field[begin + i] if begin + i < length else np.zeros_like(field[0])
                         for i in range(L)]
        segments.append(seg)
    return segments


def empty_segments(capacity, L, obs_dim=2):
    return sbb.init_segments(ffm.zero_transitions((capacity, L), obs_dim))


@pytest.mark.parametrize("L", [1, 4, 13, 20])
def test_segments_and_masks_reconstruct_each_episode(L):
    cap, capacity = 13, 60 // L
    buffer = empty_segments(capacity, L)
    reference = collections.deque(maxlen=capacity)  # (episode id, k, segment), oldest first
    episodes = {}
    rng = np.random.default_rng(L)
    for ep_id in range(40):  # several trips around the ring
        length = int(rng.integers(1, cap + 1))
        episode = tagged_episode(ep_id, length, cap)
        episodes[ep_id] = (episode, length)
        buffer = sbb.add_segments(buffer, episode, np.int32(length))
        for k, seg in enumerate(python_split(episode, length, L)):
            reference.append((ep_id, k, seg))
        assert int(buffer.size) == len(reference)
    columns = dict(jax.tree.map(np.asarray, buffer.steps)._asdict(), mask=np.asarray(buffer.mask))
    # Every stored segment equals the plain split, in ring order (the oldest overwritten).
    oldest = (int(buffer.next) - int(buffer.size)) % capacity
    for i, (_, _, seg) in enumerate(reference):
        for name, values in seg.items():
            np.testing.assert_array_equal(columns[name][(oldest + i) % capacity],
                                          np.array(values), err_msg=name)
    # Concatenating an episode's segments and dropping mask-0 steps gives the episode back.
    by_episode = collections.defaultdict(list)
    for i, (ep_id, k, _) in enumerate(reference):
        by_episode[ep_id].append((k, (oldest + i) % capacity))
    for ep_id, slots in by_episode.items():
        episode, length = episodes[ep_id]
        if slots[0][0] != 0:  # partly overwritten: only its last segments remain
            continue
        assert [k for k, _ in slots] == list(range(-(-length // L)))
        rows = [s for _, s in slots]
        keep = columns["mask"][rows].reshape(-1)
        assert keep.sum() == length and keep[:length].all()  # padding only at the end
        for name, field in episode._asdict().items():
            stored = columns[name][rows]
            stored = stored.reshape((-1,) + stored.shape[2:])
            np.testing.assert_array_equal(stored[keep], np.asarray(field)[:length].astype(stored.dtype))
            assert not stored[~keep].any(), f"{name}: padding is not zero"
    # Sampled segments are stored segments (rows of the ring), drawn among the stored ones.
    steps, mask = jax.jit(sbb.sample_segments, static_argnums=2)(buffer, jax.random.PRNGKey(0), 50)
    assert steps.obs.shape == (50, L, 2) and bool(mask[:, 0].all())
    stored = {columns["obs"][s].tobytes() for s in range(capacity)}
    assert all(np.asarray(o).tobytes() in stored for o in steps.obs)


def test_segment_sampling_is_uniform_over_stored_segments():
    L, capacity = 5, 10
    buffer = empty_segments(capacity, L)
    for ep_id, length in enumerate([12, 3, 5]):  # 3 + 1 + 1 = 5 segments, the ring half full
        buffer = sbb.add_segments(buffer, tagged_episode(ep_id, length, 13), np.int32(length))
    steps, _ = sbb.sample_segments(buffer, jax.random.PRNGKey(0), 20000)
    key = np.asarray(steps.obs[:, 0, 0]) * 100 + np.asarray(steps.obs[:, 0, 1])  # (episode, step)
    values, counts = np.unique(key, return_counts=True)
    assert set(values) == {0, 5, 10, 100, 200}
    np.testing.assert_allclose(counts / counts.sum(), 0.2, atol=0.02)


# =============================================================================================
# Loss: double-DQN targets against a plain loop; SBB's mask against perturbed padding and
# against the TBB loss on the same real steps
# =============================================================================================
def test_double_dqn_targets_match_a_plain_loop():
    online, target = net_params("ffm"), net_params("ffm", 7)
    lengths = [4, 3, 5]  # ends: terminated, truncated, cut by the tape's end (bootstraps)
    obs, next_obs, start = random_tape_obs(lengths, seed=3)
    n = len(obs)
    rng = np.random.default_rng(4)
    reward = rng.normal(size=n).astype(np.float32)
    action = rng.integers(0, NUM_ACTIONS, n).astype(np.int32)
    terminated, truncated = np.arange(n) == 3, np.arange(n) == 6
    gamma = 0.9
    steps = ffm.Transition(*map(jnp.asarray, (obs, action, reward, next_obs, terminated, truncated)))

    # Plain loop: rebuild each episode prefix o_0..o_t, o_t+1 and run the step path.
    expect_y, expect_q = [], []
    for t in range(n):
        begin = t if start[t] else begin
        seq = np.concatenate([obs[begin:t + 1], next_obs[t:t + 1]])
        q_online = step_loop(ffm, online, seq, episode_starts([len(seq)]))
        q_target = step_loop(ffm, target, seq, episode_starts([len(seq)]))[-1]
        bootstrap = 0.0 if terminated[t] else q_target[np.argmax(q_online[-1])]
        expect_y.append(reward[t] + gamma * bootstrap)
        expect_q.append(q_online[-2][action[t]])
    expect_y, expect_q = np.array(expect_y), np.array(expect_q)
    err = np.abs(expect_q - expect_y)
    huber = np.where(err < 1.0, 0.5 * err**2, err - 0.5)

    for scan in SCANS:
        _, q_next_online = q_tape_jit("ffm")(online, obs, next_obs, start, scan)
        _, q_next_target = q_tape_jit("ffm")(target, obs, next_obs, start, scan)
        y = ffm.td_targets(q_next_online, q_next_target, steps.reward, steps.terminated, gamma)
        np.testing.assert_allclose(np.asarray(y), expect_y, rtol=1e-5, atol=1e-5)
        loss, metrics = ffm.td_loss(online, target, (steps, jnp.asarray(start)), gamma, scan)
        np.testing.assert_allclose(float(loss), huber.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["q_values"]), expect_q.mean(), rtol=1e-5, atol=1e-6)
        assert set(metrics) == {"q_values"}  # no padding on a tape: the log writes density 1


def segment_batch(lengths, L, seed=0):
    """The segments of episodes of the given lengths (each episode's own split)."""
    rng = np.random.default_rng(seed)
    parts = []
    for ep_id, length in enumerate(lengths):
        obs = rng.normal(size=(length, OBS_DIM)).astype(np.float32)
        next_obs = np.concatenate([obs[1:], rng.normal(size=(1, OBS_DIM))]).astype(np.float32)
        last = np.arange(length) == length - 1
        episode = ffm.Transition(obs, rng.integers(0, NUM_ACTIONS, length),
                                 rng.normal(size=length).astype(np.float32), next_obs,
                                 last & (ep_id % 2 == 0), last & (ep_id % 2 == 1))
        parts.append(sbb.split_episode(jax.tree.map(jnp.asarray, episode), length, L))
    return jax.tree.map(lambda *x: jnp.concatenate(x), *parts)


@lru_cache(maxsize=None)
def masked_loss_grad_jit(model):  # one compile per model
    loss = partial(sbb.masked_td_loss, partial(sbb.q_segments, NETWORKS[model][0].q_tape))
    return jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(3, 4))


def masked_loss_and_grads(model, params, target, batch):
    return masked_loss_grad_jit(model)(params, target, batch, 0.9, "sequential")


def test_padded_steps_cannot_change_loss_or_gradients():
    params, target = net_params("ffm"), net_params("ffm", 3)  # the mask is the same for all
    steps, mask = segment_batch([7, 3, 10], L=4)
    pad = ~np.asarray(mask)
    assert pad.any() and np.asarray(mask)[:, 0].all()
    for name, column in steps._asdict().items():
        assert not np.asarray(column)[pad].any(), f"padded {name} is not 0"
    (loss, metrics), grads = masked_loss_and_grads("ffm", params, target, (steps, mask))
    rng = np.random.default_rng(1)
    noise = lambda x, scale: jnp.where(  # noqa: E731
        jnp.asarray(pad).reshape(pad.shape + (1,) * (x.ndim - 2)),
        jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype), x)
    perturbed = steps._replace(obs=noise(steps.obs, 100.0), next_obs=noise(steps.next_obs, 100.0),
                               reward=noise(steps.reward, 1e3),
                               action=jnp.where(pad, NUM_ACTIONS - 1, steps.action),
                               terminated=jnp.where(pad, True, steps.terminated))
    (loss2, metrics2), grads2 = masked_loss_and_grads("ffm", params, target, (perturbed, mask))
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6, atol=1e-7)
    assert_tree_close(metrics2, metrics, rtol=1e-6, atol=1e-7)
    assert_tree_close(grads2, grads, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(metrics["density"]), 20 / 24)  # 7+3+10 real of 6 x 4 slots


def test_masked_loss_equals_tbb_loss_on_the_unpadded_steps():
    """SBB's loss == the (independently tested) TBB loss on a tape of the same real steps, with
    an episode start at every segment start."""
    params, target, L = net_params("ffm"), net_params("ffm", 3), 4
    steps, mask = segment_batch([7, 3, 10], L)
    (loss, metrics), _ = masked_loss_and_grads("ffm", params, target, (steps, mask))
    mask = np.asarray(mask).reshape(-1)
    real = jax.tree.map(lambda x: jnp.asarray(np.asarray(x).reshape((-1,) + x.shape[2:])[mask]), steps)
    start = jnp.asarray((np.arange(mask.size) % L == 0)[mask])
    expect_loss, expect = jax.jit(ffm.td_loss, static_argnums=(3, 4))(
        params, target, (real, start), 0.9, "sequential")
    np.testing.assert_allclose(float(loss), float(expect_loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["q_values"]), float(expect["q_values"]), rtol=1e-5,
                               atol=1e-6)


# =============================================================================================
# SBB with R2D2's stored states and burn-in (--stored-state, --burn-in): the buffer against the
# rule in words, the Q against the whole episode's, the loss and its gradient against a batch
# that starts from the refreshed state
# =============================================================================================
def stored_script(model, L, N, *flags):
    args = sbb.parse_args(["--memory", model, *NETWORKS[model][1], "--segment-length", str(L),
                           "--stored-state", "--burn-in", str(N), *flags])
    return sbb.segment_script(model, L, args)


def stored_split(length, L, N):
    """Plain Python, from the rule in words: per segment k, the episode step in each of its
    N + L slots (None: padding) and whether it is trained on. The burn-in is the up to N steps
    before kL in the episode, then come the trained steps kL .. kL+L-1 that exist."""
    segments = []
    for k in range(-(-length // L)):
        burn_in = list(range(k * L - N, k * L))
        trained = [t for t in range(k * L, k * L + L) if t < length]
        slots = [(t, False) for t in burn_in if t >= 0] + [(t, True) for t in trained]
        segments.append(slots + [(None, False)] * (N + L - len(slots)))
    return segments


def tagged_episodes(transition, lengths, cap, seed=0):
    """Episodes padded to `cap` with junk (as stale rows are); obs[:, 0] = episode + step / 64."""
    rng = np.random.default_rng(seed)
    episodes = []
    for ep_id, n in enumerate(lengths):
        obs = rng.normal(size=(cap + 1, OBS_DIM)).astype(np.float32)
        obs[:, 0] = ep_id + np.arange(cap + 1) / 64
        real, t = np.arange(cap) < n, np.arange(cap)
        junk = lambda x: np.where(real.reshape((cap,) + (1,) * (x.ndim - 1)), x, 9).astype(x.dtype)  # noqa: E731
        episodes.append(transition(
            junk(obs[:cap]), junk(rng.integers(0, NUM_ACTIONS, cap).astype(np.int32)),
            junk(rng.normal(size=cap).astype(np.float32)), junk(obs[1:]),
            real & (t == n - 1) & (ep_id % 2 == 0), real & (t == n - 1) & (ep_id % 2 == 1)))
    return episodes


STORED_LENGTHS, STORED_L, STORED_N = (11, 2, 7), 3, 5  # burn-ins of 0, 3 and 5 steps


@lru_cache(maxsize=None)
def stored_ring(model, cap=11):
    """A ring filled with the segments of STORED_LENGTHS-step episodes, stored under
    net_params(model): -> (ring, episodes, per slot (episode id, stored_split's segment))."""
    L, N = STORED_L, STORED_N
    script = stored_script(model, L, N)  # a private copy: its own Transition
    episodes = tagged_episodes(script.Transition, STORED_LENGTHS, cap)
    ring = script.init_tape(L * sum(-(-n // L) for n in STORED_LENGTHS), OBS_DIM)
    for episode, n in zip(episodes, STORED_LENGTHS):
        ring = script.add_episode(ring, episode, np.int32(n), net_params(model))
    return ring, episodes, [(ep_id, segment) for ep_id, n in enumerate(STORED_LENGTHS)
                            for segment in stored_split(n, L, N)]


@pytest.mark.parametrize("model", NETWORKS)
def test_stored_state_segments_see_their_whole_episode(model):
    """Parameters unchanged since storing: every slot's Q(o_..t) and Q(o_..t, o_t+1) is the
    whole episode's, scanned from its start; each slot holds its step of its own episode (a
    burn-in never reaches into the previous one), the mask its trained steps, and the state
    stored before an episode's first step is the identity."""
    module, params = NETWORKS[model][0], net_params(model)
    ring, episodes, slots = stored_ring(model)
    obs, mask = np.asarray(ring.steps.obs), np.asarray(ring.mask)
    q, q_next = map(np.asarray, jax.jit(partial(sbb.q_stored, module.q_step))(
        params, (ring.steps, ring.mask, ring.state)))
    identity = [np.asarray(x)[0] for x in jax.tree.leaves(module.initial_carry(params, 1))]
    # the whole episodes, each scanned from its start: one tape of them, reset at every start
    obs_tape, next_obs_tape = (np.concatenate([x[:n] for x, n in zip(column, STORED_LENGTHS)])
                               for column in zip(*[(e.obs, e.next_obs) for e in episodes]))
    whole = [np.asarray(x) for x in q_tape_jit(model)(
        params, obs_tape, next_obs_tape, episode_starts(STORED_LENGTHS), scan="sequential")]
    offset = np.cumsum((0,) + STORED_LENGTHS)
    for s, (ep_id, segment) in enumerate(slots):
        steps = [t for t, _ in segment if t is not None]
        np.testing.assert_array_equal(mask[s], [trained for _, trained in segment])
        np.testing.assert_array_equal(obs[s, :len(steps)], episodes[ep_id].obs[steps])
        assert np.all(obs[s, :len(steps), 0] // 1 == ep_id)  # never the previous episode's
        assert not obs[s, len(steps):].any()  # then padding
        q_ref, q_next_ref = (x[offset[ep_id]:offset[ep_id + 1]] for x in whole)
        np.testing.assert_allclose(q[s, :len(steps)], q_ref[steps], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(q_next[s, :len(steps)], q_next_ref[steps], rtol=1e-5,
                                   atol=1e-5)
        if steps[0] == 0:  # the state before an episode's first step
            for leaf, e in zip(jax.tree.leaves(ring.state), identity):
                np.testing.assert_array_equal(np.asarray(leaf)[s], e)


@pytest.mark.parametrize("model", NETWORKS)
def test_stored_states_stay_with_their_segments_when_the_ring_wraps_and_is_sampled(model):
    """A ring of 6 segments takes STORED_LENGTHS's 8 (the last episode wraps over the first's
    oldest two): every sampled segment, with its drawn state, still gives its whole episode's
    Q at its steps, and every stored segment is drawn."""
    L, N, module, params = STORED_L, STORED_N, NETWORKS[model][0], net_params(model)
    script = stored_script(model, L, N, "--batch-size", str(60 * (N + L)))
    episodes = tagged_episodes(script.Transition, STORED_LENGTHS, 11)
    ring = script.init_tape(6 * L, OBS_DIM)
    for episode, n in zip(episodes, STORED_LENGTHS):
        ring = script.add_episode(ring, episode, np.int32(n), params)
    batch = script.sample_tape(ring, jax.random.PRNGKey(1), 60 * (N + L))
    q, q_next = map(np.asarray, jax.jit(partial(sbb.q_stored, module.q_step))(params, batch))
    obs_tape, next_obs_tape = (np.concatenate([x[:n] for x, n in zip(column, STORED_LENGTHS)])
                               for column in zip(*[(e.obs, e.next_obs) for e in episodes]))
    whole = [np.asarray(x) for x in q_tape_jit(model)(
        params, obs_tape, next_obs_tape, episode_starts(STORED_LENGTHS), scan="sequential")]
    offset, drawn = np.cumsum((0,) + STORED_LENGTHS), set()
    for s, obs in enumerate(np.asarray(batch[0].obs)):
        real = obs.any(axis=-1)
        ep_id = (obs[real, 0] // 1).astype(int)
        at = offset[ep_id] + np.round((obs[real, 0] - ep_id) * 64).astype(int)
        drawn.add((ep_id[0], int(at[np.asarray(batch[1][s])[real].argmax()])))  # 1st trained
        np.testing.assert_allclose(q[s, real], whole[0][at], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(q_next[s, real], whole[1][at], rtol=1e-5, atol=1e-5)
    assert len(drawn) == 6 and {ep for ep, _ in drawn} == {0, 1, 2}  # episode 0: 2 of its 4


def refresh_and_train_loop(params, target, steps, state, trained, gamma=0.9):
    """Plain Python over the step path: each network refreshes the stored state over the burn-in
    (the slots before the first `trained` one) with its own parameters, then runs the rest.
    -> (the mean Huber TD error over `trained` slots, the refreshed states of `params`)."""
    first = trained.argmax(1)
    steps = jax.tree.map(np.asarray, steps)
    errors, refreshed = [], []
    for s in range(len(first)):
        q = {}
        for name, p in (("online", params), ("target", target)):
            carry = jax.tree.map(lambda x: x[s:s + 1], state)  # noqa: B023
            for i in range(first[s]):
                _, carry = q_step_jit(ffm)(p, carry, steps.obs[s, i:i + 1], jnp.zeros(1, bool))
            if name == "online":
                refreshed.append(carry)
            q[name] = []
            for i in range(first[s], steps.obs.shape[1]):
                q_t, carry = q_step_jit(ffm)(p, carry, steps.obs[s, i:i + 1], jnp.zeros(1, bool))
                q_next, _ = q_step_jit(ffm)(p, carry, steps.next_obs[s, i:i + 1], jnp.zeros(1, bool))
                q[name].append((np.asarray(q_t[0]), np.asarray(q_next[0])))
        for j, ((q_t, q_next), (_, q_next_target)) in enumerate(zip(q["online"], q["target"])):
            i = first[s] + j
            if trained[s, i]:
                y = steps.reward[s, i] + gamma * (1 - steps.terminated[s, i]) * q_next_target[
                    np.argmax(q_next)]
                errors.append(abs(q_t[steps.action[s, i]] - y))
    errors = np.array(errors)
    huber = np.where(errors < 1.0, 0.5 * errors ** 2, errors - 0.5)
    return huber.mean(), jax.tree.map(lambda *x: jnp.concatenate(x), *refreshed)


def test_burn_in_steps_carry_no_loss_and_no_gradient():
    """Stored under other parameters (stale states), with burn-ins of 0, 3 and 5 steps: the loss
    is a plain step loop's in which each network refreshes the state over the burn-in with its
    own parameters and the TD error counts on trained steps only; the gradient is that of the
    trained steps alone, started from the refreshed state; the burn-in's own fields change
    nothing, its observations no gradient, and yet the loss (so the refresh happens). The
    density is trained steps over slots."""
    params, target = net_params("ffm", 7), net_params("ffm", 3)  # stored under net_params("ffm")
    ring, _, slots = stored_ring("ffm")
    segment_q = partial(sbb.q_stored, ffm.q_step)

    @jax.jit
    def loss_and_grads(params, target, obs, steps, mask, state):
        loss = lambda p, o: sbb.masked_td_loss(  # noqa: E731
            segment_q, p, target, (steps._replace(obs=o), mask, state), 0.9, "sequential")
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, obs)

    steps, mask, state = ring.steps, ring.mask, ring.state
    (loss, metrics), (grads, g_obs) = loss_and_grads(params, target, steps.obs, steps, mask, state)
    trained = np.array([[trained for _, trained in segment] for _, segment in slots])
    burn = np.array([[t is not None and not trained for t, trained in seg] for _, seg in slots])
    first = burn.sum(1)  # the first trained slot of each segment
    assert list(first) == [0, 3, 5, 5, 0, 0, 3, 5]  # 11 steps in 4 segments, 2 in 1, 7 in 3
    np.testing.assert_allclose(float(metrics["density"]), trained.sum() / trained.size)
    expect_loss, refreshed = refresh_and_train_loop(params, target, steps, state, trained)
    np.testing.assert_allclose(float(loss), expect_loss, rtol=1e-5)
    g_obs = np.asarray(g_obs)
    assert not g_obs[burn].any() and np.abs(g_obs[np.asarray(mask)]).sum(-1).all()
    # The burn-in's actions, rewards, next observations and ends change nothing ...
    flip = lambda x, new: jnp.where(burn.reshape(burn.shape + (1,) * (x.ndim - 2)), new, x)  # noqa: E731
    rng = np.random.default_rng(0)
    other = steps._replace(action=flip(steps.action, NUM_ACTIONS - 1 - steps.action),
                           reward=flip(steps.reward, 1e3), terminated=flip(steps.terminated, True),
                           truncated=flip(steps.truncated, True),
                           next_obs=flip(steps.next_obs, rng.normal(size=steps.next_obs.shape)
                                         .astype(np.float32) * 10))
    (loss2, metrics2), (grads2, _) = loss_and_grads(params, target, other.obs, other, mask, state)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    assert_tree_close(metrics2, metrics, rtol=1e-6, atol=1e-7)
    assert_tree_close(grads2, grads, rtol=1e-6, atol=1e-7)
    # ... its observations change the loss, through the refreshed state only
    noisy = flip(steps.obs, steps.obs + rng.normal(size=steps.obs.shape).astype(np.float32))
    (loss3, _), _ = loss_and_grads(params, target, noisy, steps, mask, state)
    assert abs(float(loss3) - float(loss)) > 1e-6
    # The gradient: the trained slots alone (moved to the front, no burn-in), started from the
    # refreshed state as a constant. With target = online one refreshed state serves both.
    slot = np.arange(mask.shape[1])
    take = np.minimum(slot + first[:, None], slot[-1])
    shift = lambda x: jnp.asarray(np.where(  # noqa: E731
        (slot < mask.shape[1] - first[:, None]).reshape(take.shape + (1,) * (x.ndim - 2)),
        np.take_along_axis(np.asarray(x), take.reshape(take.shape + (1,) * (x.ndim - 2)), 1), 0))
    trained_steps = jax.tree.map(shift, steps)
    (loss4, _), (grads4, _) = loss_and_grads(params, params, steps.obs, steps, mask, state)
    (loss_ref, _), (grads_ref, _) = loss_and_grads(params, params, trained_steps.obs,
                                                   trained_steps, shift(mask), refreshed)
    np.testing.assert_allclose(float(loss4), float(loss_ref), rtol=1e-5)
    assert_tree_close(grads4, grads_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("B,L,N", [(1000, 10, 10), (100, 7, 0)])
def test_a_stored_state_batch_holds_b_over_l_plus_n_segments(B, L, N):
    script = stored_script("ffm", L, N, "--batch-size", str(B))
    ring = script.init_tape(1000, OBS_DIM)
    steps, mask, state = script.sample_tape(ring._replace(size=jnp.int32(1000 // L)),
                                            jax.random.PRNGKey(0), B)
    assert mask.shape == steps.obs.shape[:2] == (B // (L + N), L + N)
    assert mask.size == (B // (L + N)) * (L + N) <= B
    assert {x.shape[0] for x in jax.tree.leaves(state)} == {B // (L + N)}


def test_stored_states_count_in_the_memory_check(tmp_path, capsys):
    """A ring that fits as zero-state SBB is refused once each segment keeps its state (FFM's
    default 4 KiB), and more so with a burn-in: the check counts what init_tape makes."""
    class Accepted(Exception):
        pass

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", ram)
    # ~0.3 of the limit without states (10 steps of ~59 bytes a segment), ~2.3 with them
    flags = ["--buffer-size", str(10 * (limit // 2000)), "--output-dir", str(tmp_path)]
    for extra, fits in (([], True), (["--stored-state"], False),
                        (["--stored-state", "--burn-in", "10"], False)):
        args = sbb.parse_args([*flags, *extra])
        script = sbb.segment_script("ffm", 10, args)
        check = script.check_memory

        def check_memory(*shapes):  # its own check, then stop: nothing more is needed
            check(*shapes)
            raise Accepted

        script.check_memory = check_memory
        with pytest.raises(Accepted if fits else SystemExit):
            sbb.train(args, script)
        assert fits or "--buffer-size" in capsys.readouterr().err


STORED_BAD_FLAGS = [
    (["--burn-in", "5"], "--burn-in 5 needs --stored-state"),
    (["--burn-in", "-1"], "--burn-in: must be >= 0"),
    (["--stored-state", "--burn-in", "995"],
     "--segment-length must be in [1, --batch-size 1000 - --burn-in 995], got 10"),
]


@pytest.mark.parametrize("flags,message", STORED_BAD_FLAGS, ids=[m for _, m in STORED_BAD_FLAGS])
def test_stored_state_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sbb.parse_args(flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_stored_state_is_not_an_ablation(capsys):
    """ablations.py swaps SBB's loss for the zero-state one: it refuses the flags in one line."""
    with pytest.raises(SystemExit) as exit_info:
        load_ablations().main(["sbb_loss", "--segment-length", "10", "--stored-state"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "--stored-state" in lines[0]


def test_stored_states_are_computed_by_the_acting_network(tmp_path):
    """train() hands add_episode the parameters that acted on the episode's last step (not the
    target's): the same values, at a store after updates have changed them."""
    args = sbb.parse_args([*TINY, *TINY_MODEL["ffm"], "--segment-length", "10", "--stored-state",
                           "--output-dir", str(tmp_path)])
    script, acted, stored = sbb.segment_script("ffm", 10, args), [None], []
    act, add_episode = script.act, script.add_episode

    def recording_act(params, *rest):
        acted[0] = params
        return act(params, *rest)

    def recording_add_episode(tape, episode, length, params=None):
        # copied now: the next train phase donates (deletes) these buffers
        stored.append([np.asarray(x) for x in jax.tree.leaves((params, acted[0]))])
        return add_episode(tape, episode, length, params)

    script.act, script.add_episode = recording_act, recording_add_episode
    sbb.train(args, script)
    half = len(stored[0]) // 2
    for leaves in stored:
        assert all(np.array_equal(a, b) for a, b in zip(leaves[:half], leaves[half:]))
    assert not all(np.array_equal(a, b) for a, b in zip(stored[0][:half], stored[-1][:half]))


def test_stored_state_and_burn_in_smoke_run(tmp_path):
    """A tiny FFM run with both flags, a few updates: finite metrics, density below 1."""
    sbb.train(sbb.parse_args([*TINY, *TINY_MODEL["ffm"], *SHORT, "--segment-length", "10",
                              "--stored-state", "--burn-in", "5", "--output-dir",
                              str(tmp_path)]))
    (run_dir,) = [tmp_path / d for d in os.listdir(tmp_path)]
    assert "sbb_ffm_L10_stored_burnin5" in run_dir.name
    (row,) = read_metrics(run_dir)
    assert all(np.isfinite(float(row[k])) for k in ("td_loss", "eval_return", "q_values"))
    assert 0.0 < float(row["density"]) < 1.0 and int(row["updates"]) > 0


# =============================================================================================
# Scripts end to end: smoke runs, determinism, checkpoints, shared text, one-line errors
# =============================================================================================
TINY = ["--total-timesteps", "2000", "--learning-starts", "1000", "--num-envs", "4",
        "--batch-size", "128", "--buffer-size", "2000", "--train-frequency", "200",
        "--updates-per-train", "2", "--eval-every", "1000", "--eval-episodes", "4",
        "--log-every", "1000", "--hidden-size", "32"]
TINY_MODEL = {"ffm": ["--trace-size", "8", "--context-size", "2"],
              "lru": ["--state-size", "8", "--num-layers", "2"],
              "linear_transformer": ["--key-size", "4", "--value-size", "4", "--num-heads", "2"]}
TBB_SCRIPTS = {"ffm": "ffm_tbb_dqn.py", "lru": "lru_tbb_dqn.py",
               "linear_transformer": "linear_transformer_tbb_dqn.py"}
TIMING = {"sps", "elapsed_s"}


def run_script(script, *flags):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *flags],
                          capture_output=True, text=True, cwd=HERE, timeout=600)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def check_run(out, files=("args.json", "metrics.csv", "learning_curve.png")):
    """The one run folder under `out`, with its files; -> its metrics without timings."""
    (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
    for f in files:
        assert os.path.isfile(os.path.join(run_dir, f)), f
    rows = read_metrics(run_dir)
    assert len(rows) == 2 and int(rows[-1]["global_step"]) == 2000
    for r in rows:
        assert all(np.isfinite(float(r[k])) for k in ("td_loss", "eval_return", "q_values"))
        assert 0.0 < float(r["density"]) <= 1.0
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_smoke_runs_are_finite_and_deterministic(tmp_path):
    """A tiny run of every TBB script and of SBB (the linear transformer at L = 50; SBB with FFM
    runs in the signal test), started together to share the wait; FFM once more when its first
    run is done, to check seeding (the loop is one text in every script)."""
    def start(name, script, *flags):
        return name, subprocess.Popen(
            [sys.executable, os.path.join(HERE, script), *TINY, *flags, "--output-dir",
             str(tmp_path / name)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=HERE)

    procs = [start(f"tbb_{m}", TBB_SCRIPTS[m], *TINY_MODEL[m], "--save-model") for m in TINY_MODEL]
    procs.append(start("sbb_linear_transformer", "sbb_baseline_dqn.py",
                       *TINY_MODEL["linear_transformer"], "--memory", "linear_transformer",
                       "--segment-length", "50"))
    metrics = {}
    while procs:
        name, proc = procs.pop(0)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        files = ("params.npz",) if name.startswith("tbb") else ()
        metrics[name] = check_run(tmp_path / name, ("args.json", "metrics.csv",
                                                    "learning_curve.png") + files)
        if name == "tbb_ffm":
            procs.append(start("tbb_ffm_again", "ffm_tbb_dqn.py", *TINY_MODEL["ffm"],
                               "--save-model"))
    assert metrics["tbb_ffm"] == metrics["tbb_ffm_again"], "same --seed gave different metrics"
    assert all(float(r["density"]) == 1.0 for r in metrics["tbb_ffm"])
    # 51-step episodes in segments of 50: a 1-step segment padded to 50 after every full one
    assert all(float(r["density"]) < 1.0 for r in metrics["sbb_linear_transformer"][1:])


def test_params_round_trip_through_npz(tmp_path):
    params = net_params("ffm")
    path = str(tmp_path / "params.npz")
    ffm.save_params(params, path)
    loaded = ffm.load_params(jax.tree.map(jnp.zeros_like, params), path)
    assert_tree_close(loaded, params, rtol=0, atol=0)
    other = ffm.init_params(jax.random.PRNGKey(0), OBS_DIM + 1, NUM_ACTIONS,
                            ffm.parse_args(NETWORKS["ffm"][1]))
    with pytest.raises(SystemExit):
        ffm.load_params(other, path)


def test_sbb_leaves_the_imported_tbb_script_untouched():
    script = sbb.segment_script("ffm", 10)
    assert script.td_loss is not ffm.td_loss and script.add_episode is sbb.add_segments
    assert ffm.td_loss.__module__ == "ffm_tbb_dqn" and ffm.add_episode is not sbb.add_segments


def shared_blocks(script):
    """Text between '# ==== shared: NAME ====' and '# ==== end shared: NAME ====' markers."""
    with open(os.path.join(HERE, script)) as f:
        text = f.read()
    blocks = {}
    for part in text.split("# ==== shared: ")[1:]:
        name = part.split(" ====", 1)[0]
        end = f"# ==== end shared: {name} ===="
        assert end in part, f"{script}: block {name!r} has no end marker"
        blocks[name] = part.split(end, 1)[0]
    return blocks


@pytest.mark.parametrize("script", ["lru_tbb_dqn.py", "linear_transformer_tbb_dqn.py"])
def test_shared_blocks_are_identical_across_scripts(script):
    """All but the memory (its op, identity, maps and flags) is one text in every TBB script."""
    reference = shared_blocks("ffm_tbb_dqn.py")
    assert set(reference) == {"scan and layers", "tape, loss, training, plumbing"}
    blocks = shared_blocks(script)
    assert set(blocks) == set(reference)
    for name, text in reference.items():
        assert blocks[name] == text, f"{script}: shared block {name!r} drifted from ffm_tbb_dqn.py"


@pytest.mark.parametrize("script", [*TBB_SCRIPTS.values(), "sbb_baseline_dqn.py"])
def test_the_method_comes_first_and_the_plumbing_below_its_marker(script):
    """The docstrings' promise: the method sections hold the method; the checks, the command
    line, the outputs and the memory's flags all follow the one plumbing marker."""
    with open(os.path.join(HERE, script)) as f:
        text = f.read()
    method, plumbing = text.split("# ==== Plumbing: not needed to follow the method ====")
    method = method.split("import optax")[1]  # after the imports and the early Ctrl-C handler
    for word in ("fail(", "argparse", "add_argument", "print(", "sys.", "os.", "open(", "signal"):
        assert word not in method, f"{script}: {word!r} above the plumbing marker"
    names = (("def parse_args", "def load_script", "def check_segment_sizes")
             if script.startswith("sbb") else
             ("def make_parser", "def add_model_flags", "def check_model_flags", "def fail"))
    for name in names:
        assert name in plumbing, f"{script}: {name} is not below the plumbing marker"


def not_an_npz(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    return str(path)


def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    return str(path)


BAD_INPUT = [  # (flags, a part of the message, exit code)
    (["--env-id", "RepeatFirstEsy"], "unknown env id", 2),
    (["--env-id", "PositionOnlyPendulumEasy"], "discrete action space", 2),
    (["--batch-size", "0"], "--batch-size: must be positive, got 0", 2),
    (["--batch-size", "x"], "--batch-size: invalid int value", 2),
    (["--batch-size", "20"], "smaller than the longest episode", 2),
    (["--buffer-size", "50"], "smaller than the longest episode", 2),
    (["--gamma", "1.5"], "--gamma: must be in [0, 1]", 2),
    (["--tau", "0"], "--tau: must be in (0, 1]", 2),
    (["--min-period", "8", "--max-period", "4"], "--min-period must not exceed", 2),
    (["--env-kwargs", '{"nope": 1}'], "RepeatFirstEasy does not take --env-kwargs", 2),
    (["--env-kwargs", "[1]"], "--env-kwargs: must be a JSON object", 2),
    (["--env-kwargs", "{x"], "--env-kwargs: invalid JSON value", 2),
    (["--load-model", "missing.npz"], "no such file", 2),
    (["--load-model", not_an_npz], "not a params.npz written by --save-model", 2),
    (["--output-dir", a_file, *TINY], "--output-dir", 2),
    # sizes that cannot fit, refused before anything is allocated (lower bounds of the bytes)
    (["--buffer-size", "10000000000000"], "--buffer-size 10,000,000,000,000 cannot fit", 2),
    (["--num-envs", "100000000"], "--num-envs 100,000,000 cannot fit", 2),
    (["--batch-size", "1000000000"], "--batch-size 1,000,000,000 cannot fit", 2),
    (["--learning-starts", "5000", "--total-timesteps", "3000"], "would end as training starts",
     2),
    (["--learning-rate", "1e30", *TINY, "--total-timesteps", "400", "--learning-starts", "200",
      "--log-every", "400", "--eval-every", "400"], "non-finite", 1),
]


@pytest.mark.parametrize("flags,message,code", BAD_INPUT, ids=[b[1] for b in BAD_INPUT])
def test_bad_input_is_one_clear_line(flags, message, code, tmp_path, capsys):
    # In-process (no new interpreter per case); the next test checks one case end to end.
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    out = [] if "--output-dir" in flags else ["--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        ffm.train(ffm.parse_args([*flags, *out]))
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_bad_input_exit_code_from_the_shell(tmp_path):
    p = run_script("ffm_tbb_dqn.py", "--env-id", "NoSuchEnv", "--output-dir", str(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "unknown env id" in p.stderr


@pytest.mark.parametrize("script,flags", [
    (lru, ["--r-min", "0.95", "--r-max", "0.9", "--max-phase", "1"]),
    (lru, ["--r-min", "0", "0.9", "--r-max", "0.5", "1.0"]),
    (lru, ["--r-min", "-0.1", "0.9"]), (lru, ["--max-phase", "0"]), (lru, ["--num-layers", "0"]),
    (lru, ["--r-min", "0", "--r-max", "0.99999999", "--max-phase", "1"]),  # 1 in float32
    (lru, ["--state-size", "0"]), (lt, ["--key-size", "0"]), (lt, ["--value-size", "0"]),
    (lt, ["--num-heads", "0"]), (ffm, ["--trace-size", "0"]), (ffm, ["--hidden-size", "-1"])])
def test_bad_model_flags_are_one_line(script, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(flags)
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def wrappers(env):
    names = []
    while hasattr(env, "env"):
        names.append(type(env).__name__)
        env = env.env
    return names


@pytest.mark.parametrize("env_id,needs_it", [("RepeatFirstEasy", False), ("MineSweeperEasy", True)])
def test_previous_action_wrapper_is_there_iff_requested(env_id, needs_it):
    for prev_action, expect in (("auto", needs_it), ("on", True), ("off", False)):
        make_env, _ = ffm.resolve_env(env_id, prev_action=prev_action)
        assert ("PreviousAction" in wrappers(make_env())) == expect, prev_action


def test_env_kwargs_reach_the_env():
    make_env, cap = ffm.resolve_env("RepeatPreviousEasy", env_kwargs={"num_decks": 2, "k": 10})
    env = make_env().unwrapped
    assert env.k == 10 and cap == env.max_episode_length == 103  # 2 decks of 52 cards, minus 1
    assert ffm.resolve_env("RepeatPreviousEasy")[1] == 51  # popgym's default: 1 deck, k = 4


def test_help_says_the_budget_is_whole_vector_steps():
    """--total-timesteps 100 with 32 envs runs 128 steps: the help says so."""
    text = " ".join(ffm.make_parser().format_help().split())
    assert "rounded up to a multiple of --num-envs" in text


SBB_BAD_INPUT = [
    (["--segment-length", "0"], "--segment-length must be in", 2),
    (["--segment-length", "1001"], "--segment-length must be in", 2),
    (["--memory", "gru"], "invalid choice", 2),
    (["--buffer-size", "51", "--segment-length", "50"], "holds 1 segments", 2),
    (["--memory", "lru", "--state-size", "0"], "--state-size: must be positive", 2),
    (["--state-size", "8"], "unrecognized arguments: --state-size", 2),  # not an FFM flag
    (["--learning-rate", "1e30", *TINY, "--segment-length", "16", "--total-timesteps", "400",
      "--learning-starts", "200", "--log-every", "400", "--eval-every", "400"], "non-finite", 1),
]


@pytest.mark.parametrize("flags,message,code", SBB_BAD_INPUT, ids=[b[1] for b in SBB_BAD_INPUT])
def test_sbb_bad_input_is_one_clear_line(flags, message, code, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sbb.train(sbb.parse_args([*flags, "--output-dir", str(tmp_path)]))
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


# ---------------------------------------------------------------------------------------------
# Issue 38: every script keeps the promise on bad input -- one line on stderr naming a flag of
# the script that was run, exit 2 for bad input and 1 for a failed run -- or takes the input
# ---------------------------------------------------------------------------------------------
CHECKPOINT_FLAGS = [*TINY_MODEL["ffm"], "--hidden-size", "32"]


def a_checkpoint(tmp_path, meta=None, change=None):
    """A --save-model file of FFM (CHECKPOINT_FLAGS) on RepeatFirstEasy, with `meta` for its
    own __meta__ and its first parameter replaced by change(that array), where given."""
    obs_dim, num_actions = repeat_first_sizes()
    args = ffm.parse_args(CHECKPOINT_FLAGS)
    leaves, tree = jax.tree.flatten(ffm.init_params(jax.random.PRNGKey(0), obs_dim, num_actions,
                                                    args))
    if change:
        leaves[0] = change(np.asarray(leaves[0]))
    path = str(tmp_path / "params.npz")
    ffm.save_params(jax.tree.unflatten(tree, leaves), path,
                    ffm.checkpoint_meta(args, obs_dim, num_actions) if meta is None else meta)
    return path


TRAINING_BAD_INPUT = [  # (script, flags, a part of the message, exit code)
    (ffm, ["--seed", "-1"], "--seed: must be in [0, 2**63 - 1], got -1", 2),
    (ffm, ["--seed", "99999999999999999999999"], "--seed: must be in [0, 2**63 - 1]", 2),
    (sbb, ["--seed", "-1"], "--seed: must be in [0, 2**63 - 1], got -1", 2),
    (ffm, ["--env-id", "RepeatFirst", "--env-kwargs", '{"num_decks": 0}'],
     'RepeatFirst with --env-kwargs {"num_decks": 0} has episodes of at most -1 steps', 2),
    (ffm, ["--learning-rate", "inf"], "--learning-rate: must be positive and finite, got inf", 2),
    (ffm, ["--max-period", "1e39"], "--max-period: must be positive and finite, got 1e39", 2),
    (lru, ["--max-phase", "inf"], "--max-phase: must be positive and finite, got inf", 2),
    (lru, ["--r-min", "0", "0", "--r-max", "0.9", "0.9", "--max-phase", "1", "inf"],
     "--max-phase: must be positive and finite, got inf", 2),  # one value per ring, each checked
    (sbb, ["--memory", "lru", "--max-phase", "inf"], "--max-phase: must be positive and finite",
     2),
    (ffm, ["--load-model", str], "is a folder, not a params.npz", 2),
    (ffm, ["--load-model", partial(a_checkpoint, meta=[1, 2]), *CHECKPOINT_FLAGS],
     "its __meta__ is not one that --save-model writes", 2),
    (ffm, ["--load-model", partial(a_checkpoint, meta="ffm_tbb_dqn.py"), *CHECKPOINT_FLAGS],
     "its __meta__ is not one that --save-model writes", 2),
    (ffm, ["--load-model", partial(a_checkpoint, change=lambda x: x.astype(np.int64)),
           *CHECKPOINT_FLAGS], "holds int64, not finite floats", 2),
    (ffm, ["--load-model", partial(a_checkpoint, change=lambda x: np.full_like(x, np.nan)),
           *CHECKPOINT_FLAGS], "holds NaN or inf", 2),
    (ffm, ["--total", "1000"], "unrecognized arguments: --total", 2),  # not --total-timesteps
    (sbb, ["--segment", "10"], "unrecognized arguments: --segment", 2),
]


@pytest.mark.parametrize("script,flags,message,code", TRAINING_BAD_INPUT,
                         ids=[f"{s.__name__}: {m}" for s, _, m, _ in TRAINING_BAD_INPUT])
def test_training_bad_input_is_one_line_and_no_run_folder(script, flags, message, code,
                                                           tmp_path, capsys):
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        script.train(script.parse_args([*flags, "--output-dir", str(out)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == code and len(lines) == 1 and message in lines[0], lines
    assert not out.exists()  # refused before the run folder is made


def test_an_env_missing_a_dependency_is_not_blamed_on_env_kwargs(tmp_path, monkeypatch, capsys):
    """As gymnasium's LunarLander without Box2D."""
    import gymnasium as gym

    def needs_box2d(**kwargs):
        raise gym.error.DependencyNotInstalled("Box2D is not installed, run `pip install swig`")

    monkeypatch.setitem(gym.registry, "NeedsBox2D-v0",
                        gym.envs.registration.EnvSpec("NeedsBox2D-v0", entry_point=needs_box2d))
    with pytest.raises(SystemExit) as exit_info:
        ffm.train(ffm.parse_args(["--env-id", "NeedsBox2D-v0", "--output-dir", str(tmp_path)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert "--env-id NeedsBox2D-v0 cannot be made here: Box2D is not installed" in lines[0]


@pytest.mark.parametrize("script", [*TBB_SCRIPTS.values(), "sbb_baseline_dqn.py"])
def test_ctrl_c_while_the_script_starts_ends_it_in_one_line(script):
    """SIGINT as the script begins to import jax (before train() takes signals): without a
    handler of its own, a KeyboardInterrupt there is a traceback, or is lost in one of jax's
    callbacks and the run goes on to its end, exit 0."""
    code = f"""if True:
        import builtins, os, runpy, signal, sys
        sys.argv = [{script!r}, "--output-dir", {os.devnull!r}]
        real_import = builtins.__import__

        def ctrl_c_at_jax(name, *args, **kwargs):
            if name == "jax":
                os.kill(os.getpid(), signal.SIGINT)
            return real_import(name, *args, **kwargs)

        builtins.__import__ = ctrl_c_at_jax
        runpy.run_path({os.path.join(HERE, script)!r}, run_name="__main__")
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                       timeout=120)
    assert p.returncode == 130 and p.stderr.strip().splitlines() == [
        f"{script}: error: interrupted"], p.stderr


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch, capsys):
    """Not an --output-dir error: the second run takes the next second's name."""
    taken = tmp_path / "RepeatFirstEasy__ffm_tbb_dqn__1__1000"
    taken.mkdir()
    clock = iter([1000.0])
    monkeypatch.setattr(ffm.time, "time", lambda: next(clock, 1001.0))
    run_dir, _ = ffm.start_run(ffm.parse_args(["--output-dir", str(tmp_path)]))
    assert run_dir == str(tmp_path / "RepeatFirstEasy__ffm_tbb_dqn__1__1001")
    assert not os.listdir(taken) and not capsys.readouterr().err


def test_a_full_disk_before_args_json_is_one_line(tmp_path, monkeypatch, capsys):
    real_open = open

    def full_disk_for_args_json(file, *args, **kwargs):
        if "args.json" in str(file):
            raise OSError(28, "No space left on device")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk_for_args_json)
    with pytest.raises(SystemExit) as exit_info:
        ffm.start_run(ffm.parse_args(["--output-dir", str(tmp_path)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    assert "args.json" in lines[0] and "No space left on device" in lines[0]


def test_a_run_that_trains_nothing_says_so(tmp_path, capsys):
    """25 steps in each of 4 envs, and RepeatFirstEasy's episodes last 51: no episode ends, so
    nothing is stored or trained on."""
    flags = [*TINY, *TINY_MODEL["ffm"], "--total-timesteps", "100", "--learning-starts", "50",
             "--log-every", "100", "--eval-every", "100", "--output-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        ffm.train(ffm.parse_args(flags))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1, lines
    assert "nothing was trained: no episode ended within --total-timesteps 100" in lines[0]


@pytest.mark.parametrize("flags,message", [
    (["--final-steps", "1000"], "--final-steps 1000 is more than the 103 steps of an episode"),
    (["--segment-lengths", "10", "2000"], "--segment-lengths 2000 is larger than --batch-size"),
    (["--seed", "7"], "--seed is set for each run by this script (see --seeds"),
    (["--seeds", "2", "--exp-name", "x"], "--exp-name is set for each run by this script"),
    (["--total", "1000"], "unrecognized arguments: --total"),  # a training script's error
])
def test_vml_refuses_before_any_training(flags, message, monkeypatch, capsys):
    for script in (lru, sbb):  # a run would be a failure of the test
        monkeypatch.setattr(script, "train", lambda args: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exit_info:
        vml.main(vml.parse_args(flags))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_vml_runs_shorter_than_the_scripts_random_warm_up(tmp_path, monkeypatch):
    """The training scripts' --learning-starts is 100,000: vml_analysis.py's runs of no more
    steps take a third of them; longer ones (its default 300,000) keep the 100,000."""
    for total, learning_starts in ((50_000, 16_666), (100_000, 33_333), (150_000, 100_000)):
        runs = []
        monkeypatch.setattr(lru, "train", runs.append)
        args = vml.parse_args(["--total-timesteps", str(total), "--output-dir", str(tmp_path)])
        vml.trained_run(args, "tbb", 1, args.run_flags)
        assert (runs[0].total_timesteps, runs[0].learning_starts) == (total, learning_starts)


def test_returns_script_checks_its_output_dir_before_the_benchmark(tmp_path, monkeypatch,
                                                                  capsys):
    """A read-only --output-dir (simulated: root writes anywhere) is found at the start."""
    import discounted_return_scan as returns

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(returns.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(returns, "run_grid", lambda args: pytest.fail("the benchmark ran"))
    with pytest.raises(SystemExit) as exit_info:
        returns.main(["--output-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert f"--output-dir {tmp_path}: cannot write there (Permission denied)" in lines[0]


def test_returns_script_refuses_what_no_tape_holds_and_files_in_the_way(tmp_path, monkeypatch,
                                                                       capsys):
    """An episode longer than --max-transitions, and a folder where an output goes, stop it in
    one line before the benchmark; more episodes than the cap has steps are not drawn (they
    allocated 745 GiB)."""
    import discounted_return_scan as returns
    monkeypatch.setattr(returns, "run_grid", lambda args: pytest.fail("the benchmark ran"))
    (tmp_path / "returns_timing.png").mkdir()
    for argv, message in ((["--episode-lengths", "1e19"], "--episode-lengths 10,000,000,000,"
                           "000,000,000 is longer than --max-transitions 1,000,000"),
                          (["--output-dir", str(tmp_path)], "returns_timing.png there is a folder")):
        with pytest.raises(SystemExit) as exit_info:
            returns.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    rewards, ends = returns.make_tape(2, 10**11, 1000, 0)
    assert 999 <= len(rewards) <= 1000 and ends[-1]
    # below the cap, the tapes are drawn as before
    rewards, ends = returns.make_tape(10, 100, 1_000_000, 0)
    rng = np.random.default_rng([0, 10, 100])
    assert np.array_equal(np.flatnonzero(ends) + 1, np.cumsum(rng.integers(1, 11, size=100)))


def test_vml_finds_an_output_file_in_the_way_before_any_run(tmp_path, capsys):
    (tmp_path / "vml.csv").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        vml.parse_args(["--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.endswith("vml.csv there is a folder"), err


@pytest.mark.parametrize("reverse", [False, True])
def test_blocked_scan_takes_a_block_longer_than_the_tape(reverse):
    """--block-size 1e30: one block, the whole tape (it padded the tape to 1e30 steps)."""
    assert parse_returns_args(["--block-size", "1e30"]).block_size == int(1e30)
    elems = (jnp.linspace(0.1, 0.9, 7), jnp.arange(7.0))
    for got, expected in zip(blocked_scan(return_op, elems, reverse=reverse, block_size=int(1e30)),
                             jax.lax.associative_scan(return_op, elems, reverse=reverse)):
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def load_benchmark(name):
    """benchmarks/<name>.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(HERE, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags,message", [
    (["--collect-steps", "10"], "--collect-steps must be at least 3,264"),
    (["--collect-steps", "1"], "--collect-steps must be at least 3,264"),
    (["--collect", "100000"], "unrecognized arguments: --collect"),
])
def test_throughput_bad_input_is_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark("throughput").main(flags)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_throughput_times_tbb_and_sbb_updates():
    """The update timings README section 5.3 quotes run for a TBB script (every slot a real
    step) and for SBB (the density of 51-step episodes in segments of 10: 51 / 60)."""
    tp = load_benchmark("throughput")
    (b, scan, ms, compile_s, density), = tp.update_timings(ffm, [120], ("sequential",), 1)
    assert (b, scan, density) == (120, "sequential", 1.0) and ms > 0 and compile_s > 0
    (b, L, scan, ms, _, density, expected), = tp.sbb_update_timings("ffm", [600], [10],
                                                                    ("sequential",), 3)
    # 180 segments drawn, each 1 or 0.1 dense: the standard error of their mean is 0.025
    assert (b, L) == (600, 10) and expected == 51 / 60 and abs(density - expected) < 0.1


def test_ablations_read_memory_as_argparse_does(monkeypatch, capsys):
    abl = load_benchmark("ablations")

    class Chosen(Exception):
        pass

    def chosen(ablations, memory, segment_length=None):
        raise Chosen(memory, segment_length)

    monkeypatch.setattr(abl, "ablated_script", chosen)
    for flags, memory, segment_length in [([], "ffm", None), (["--memory=lru"], "lru", None),
                                          (["--memory", "lru"], "lru", None),
                                          (["--memory=lru", "--segment-length=50"], "lru", 50)]:
        with pytest.raises(Chosen) as chosen_info:
            abl.main(["rescan_target", *flags])
        assert chosen_info.value.args == (memory, segment_length), flags
    for flags, message in [(["--memory"], "argument --memory: expected one argument"),
                           (["--memory", "gru"], "argument --memory: invalid choice: 'gru'")]:
        with pytest.raises(SystemExit) as exit_info:
            abl.main(["rescan_target", *flags])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_no_script_takes_an_abbreviated_flag(monkeypatch, capsys):
    """argparse's abbreviations are off: vml_analysis.py read --seed 7 as --seeds 7."""
    official, equivalence = load_benchmark("official"), load_benchmark("paper_equivalence")
    monkeypatch.setattr(sys, "argv", ["paper_equivalence.py", "paper", "--paper-src", "src",
                                      "--out", "o", "--se", "1"])
    for run in (partial(parse_returns_args, ["--block", "8"]), equivalence.main,
                partial(official.main, ["paper.log", "--episode-length", "51", "--out", "o",
                                         "--random", "22"])):
        with pytest.raises(SystemExit) as exit_info:
            run()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and "unrecognized arguments" in err
        assert len(err.splitlines()) == 1  # without argparse's usage block


def test_paper_code_tools_refuse_bad_input_in_one_line(tmp_path, monkeypatch, capsys):
    """official.py and paper_equivalence.py: a missing, malformed or wrong file, a bad length
    or folder is one line naming it and exit code 2, not a traceback."""
    official, equivalence = load_benchmark("official"), load_benchmark("paper_equivalence")
    (tmp_path / "bad.log").write_text("EVAL,t,12.5,epoch=10\n")
    (tmp_path / "none.log").write_text("hello\n")
    (tmp_path / "a_file").write_text("")
    np.savez(tmp_path / "other.npz", a=1)
    out = ["--out", str(tmp_path / "o")]
    cases = [
        (official.main, ["nope.log", "--episode-length", "51", *out], "cannot read it (No such"),
        (official.main, [str(tmp_path), "--episode-length", "51", *out], "(Is a directory)"),
        (official.main, ["bad.log", "--episode-length", "51", *out], "line 1 is not an EVAL"),
        (official.main, ["none.log", "--episode-length", "51", *out], "no EVAL lines"),
        (official.main, ["bad.log", "--episode-length", "-51", *out],
         "argument --episode-length: must be a positive integer"),
        (equivalence.main, ["compare", str(tmp_path / "nope.npz")], "not a file written by"),
        (equivalence.main, ["compare", str(tmp_path / "a_file")], "not a file written by"),
        (equivalence.main, ["compare", str(tmp_path / "other.npz")], "(no loss, q0, batch"),
        (equivalence.main, ["init", "--paper-src", str(tmp_path), "--out", "o.npz", "--config",
                            "c.yaml"], "not a checkout of proroklab/memory-monoids")]
    for main, argv, message in cases:
        monkeypatch.chdir(tmp_path)
        if main is official.main:
            run = partial(main, argv)
        else:
            monkeypatch.setattr(sys, "argv", ["paper_equivalence.py", *argv])
            run = main
        with pytest.raises(SystemExit) as exit_info:
            run()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, (
            argv, err)
    assert not (tmp_path / "o").exists()


# =============================================================================================
# Returns: discounted_return_scan.py's return-to-go memoroid against plain loops
# =============================================================================================
SCRIPT = os.path.join(HERE, "discounted_return_scan.py")
TAPE_LENGTH = 48  # one shape for every random tape, so each scan compiles once
GAMMAS = [0.0, 0.9, 1.0]
RETURN_SCANS = {
    "associative": jax.lax.associative_scan,
    "sequential": sequential_scan,
    "blocked": partial(blocked_scan, block_size=5),  # 48 is not a multiple of 5: exercises padding
}
jit_return = jax.jit(discounted_return, static_argnames="scan")
jit_prefix = jax.jit(discounted_prefix_sum, static_argnames="scan")


def loop_returns(rewards, ends, gamma, bootstrap=None):
    """G_t = r_t + gamma * (bootstrap_t if t ends an episode else G_{t+1}); the tape end is an end."""
    out, g = [], 0.0
    for t in reversed(range(len(rewards))):
        if ends[t] or t == len(rewards) - 1:
            g = 0.0 if bootstrap is None else float(bootstrap[t])
        g = float(rewards[t]) + gamma * g
        out.append(g)
    return np.array(out[::-1])


def loop_prefix(rewards, ends, gamma):
    """P_t = sum_{k=s..t} gamma^(k-s) r_k, restarting after every episode end."""
    out, total, weight = [], 0.0, 1.0
    for t in range(len(rewards)):
        if t == 0 or ends[t - 1]:
            total, weight = 0.0, 1.0
        total += weight * float(rewards[t])
        weight *= gamma
        out.append(total)
    return np.array(out)


def random_return_tape(seed, length=TAPE_LENGTH):
    """Signed rewards and episode ends: short episodes, many of length 1, the last maybe unfinished."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=length).astype(np.float32)
    ends = rng.random(length) < 0.3
    ends[rng.integers(0, length, size=6)] = True
    ends[5:9] = True  # a run of length-1 episodes
    return rewards, ends


def assert_returns_close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", RETURN_SCANS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_return_matches_loop(scan, gamma):
    for seed in range(3):
        rewards, ends = random_return_tape(seed)
        actual = jit_return(rewards, ends, gamma, scan=RETURN_SCANS[scan])
        assert_returns_close(actual, loop_returns(rewards, ends, gamma))


@pytest.mark.parametrize("gamma", GAMMAS)
def test_return_baselines_match_loop(gamma):
    for seed in range(3):
        rewards, ends = random_return_tape(seed)
        expected = loop_returns(rewards, ends, gamma)
        assert_returns_close(numpy_loop_returns(rewards, ends, gamma), expected)
        assert_returns_close(jax.jit(lax_scan_returns)(rewards, ends, gamma), expected)
        assert_returns_close(jit_episode_returns(rewards, ends, gamma), expected)


def test_gamma_zero_and_length_one_episodes_give_rewards():
    rewards, ends = random_return_tape(7)
    assert_returns_close(jit_return(rewards, ends, 0.0), rewards)
    assert_returns_close(jit_return(rewards, np.ones(TAPE_LENGTH, bool), 0.9), rewards)
    assert_returns_close(jit_prefix(rewards, np.ones(TAPE_LENGTH, bool), 0.9), rewards)


def test_gamma_one_is_undiscounted_sum_to_episode_end():
    rewards = np.arange(1, 7, dtype=np.float32)
    ends = np.array([0, 0, 1, 0, 0, 0], bool)  # episodes [1, 2, 3] and [4, 5, 6], the last unfinished
    assert_returns_close(jit_return(rewards, ends, 1.0, scan=sequential_scan), [6, 5, 3, 15, 11, 6])
    assert_returns_close(jit_prefix(rewards, ends, 1.0, scan=sequential_scan), [1, 3, 6, 4, 9, 15])


@pytest.mark.parametrize("scan", RETURN_SCANS)
def test_return_truncation_vs_termination(scan):
    gamma = 0.9
    rewards, _ = random_return_tape(3)
    rng = np.random.default_rng(3)
    terminated = rng.random(TAPE_LENGTH) < 0.15
    truncated = (rng.random(TAPE_LENGTH) < 0.15) & ~terminated
    terminated[-1] = truncated[-1] = False  # the rollout stops mid-episode ...
    cut = truncated.copy()
    cut[-1] = True  # ... so the tape's end is a truncation too
    next_value = rng.normal(size=TAPE_LENGTH).astype(np.float32)
    ends = terminated | truncated
    bootstrap = np.where(cut, next_value, 0.0).astype(np.float32)

    stopped = jit_return(rewards, ends, gamma, scan=RETURN_SCANS[scan])
    assert_returns_close(stopped, loop_returns(rewards, ends, gamma))
    booted = jit_return(rewards, ends, gamma, bootstrap, scan=RETURN_SCANS[scan])
    assert_returns_close(booted, loop_returns(rewards, ends, gamma, bootstrap))
    assert_returns_close(np.asarray(booted)[terminated], rewards[terminated])
    assert_returns_close(np.asarray(booted)[cut], rewards[cut] + gamma * next_value[cut])
    assert_returns_close(np.asarray(stopped)[cut], rewards[cut])
    # Bootstrap values are ignored away from episode ends.
    noisy = np.where(cut | terminated, bootstrap, 1e3).astype(np.float32)
    assert_returns_close(jit_return(rewards, ends, gamma, noisy, scan=RETURN_SCANS[scan]), booted)


@pytest.mark.parametrize("scan", RETURN_SCANS)
@pytest.mark.parametrize("gamma", GAMMAS)
def test_prefix_sum_matches_loop(scan, gamma):
    for seed in range(3):
        rewards, ends = random_return_tape(seed)
        actual = jit_prefix(rewards, ends, gamma, scan=RETURN_SCANS[scan])
        assert_returns_close(actual, loop_prefix(rewards, ends, gamma))


def random_return_elements(rng, size=1000):
    """Random ((discount, value), reset) elements, float32."""
    pair = (rng.uniform(0, 1, size).astype(np.float32), rng.normal(size=size).astype(np.float32))
    return pair, rng.random(size) < 0.3


@pytest.mark.parametrize("op", [return_op, reset_return_op, partial(reset_return_op, reverse=True)],
                         ids=["return_op", "reset_return_op", "reset_return_op_reverse"])
def test_return_ops_are_associative_with_identity(op):
    rng = np.random.default_rng(0)
    a, b, c = (random_return_elements(rng) for _ in range(3))
    if op is return_op:
        a, b, c = a[0], b[0], c[0]
        identity = (np.float32(1), np.float32(0))
    else:
        identity = ((np.float32(1), np.float32(0)), False)
    left, right = op(op(a, b), c), op(a, op(b, c))
    for x, y in zip(jax.tree.leaves(left), jax.tree.leaves(right)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    for with_identity in (op(identity, a), op(a, identity)):
        for x, y in zip(jax.tree.leaves(with_identity), jax.tree.leaves(a)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("scan", ["sequential", "blocked"])
def test_blocked_and_sequential_scans_keep_operand_order(scan, reverse):
    """With a non-commutative op (2x2 matrix products) the scans match a loop, like associative_scan."""
    matrices = np.random.default_rng(1).normal(size=(61, 2, 2)).astype(np.float32)
    expected, product = [], np.eye(2)
    for m in (matrices[::-1] if reverse else matrices):
        product = product @ m
        expected.append(product)
    expected = np.array(expected[::-1] if reverse else expected)
    actual = RETURN_SCANS[scan](jnp.matmul, jnp.asarray(matrices), reverse=reverse)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.lax.associative_scan(jnp.matmul, matrices, reverse=reverse), expected,
                               rtol=1e-4, atol=1e-4)


def test_returns_script_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, SCRIPT, "--episode-lengths", "3,20", "--episode-counts", "2,10",
         "--repeats", "1", "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "returns_timing.csv").stat().st_size > 0
    assert (tmp_path / "returns_timing.png").stat().st_size > 0
    assert "vs_lax_scan" in result.stdout
    with open(tmp_path / "returns_timing.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 5 and {row["status"] for row in rows} == {"ok"}
    assert all(float(row["median_s"]) > 0 for row in rows)


@pytest.mark.parametrize("flags", [["--gamma", "1.5"], ["--repeats", "0"], ["--methods", "nope"],
                                   ["--episode-counts", "10,x"], ["--block-size", "-3"], ["--seed", "inf"],
                                   ["--bogus"]])
def test_returns_script_bad_flags_are_one_line(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_returns_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err




# Rewards [1, 2, 3, 4, 5] in episodes [0, 1] and [2, 4], gamma 0.5, by hand:
# return-to-go G = [1 + .5*2, 2, 3 + .5*4 + .25*5, 4 + .5*5, 5] and
# prefix sum   P = [1, 1 + .5*2, 3, 3 + .5*4, 3 + .5*4 + .25*5].
@pytest.mark.parametrize("scan", [jax.lax.associative_scan, sequential_scan,
                                  partial(blocked_scan, block_size=2)])
@pytest.mark.parametrize("rewards, episode_end, returns, prefix", [
    ([1, 0, 2], [0, 0, 1], [1.5, 1.0, 2.0], [1.0, 1.0, 1.5]),
    ([True, False, True], [0, 0, 1], [1.25, 0.5, 1.0], [1.0, 1.0, 1.25]),
    ([1, 2, 3, 4, 5], [0, 1, 0, 0, 1], [2.0, 2.0, 6.25, 6.5, 5.0], [1.0, 2.0, 3.0, 5.0, 6.25]),
])
def test_returns_of_integer_and_bool_rewards_are_float(rewards, episode_end, returns, prefix, scan):
    rewards = jnp.asarray(rewards, jnp.bool_ if isinstance(rewards[0], bool) else jnp.int32)
    episode_end = jnp.asarray(episode_end, bool)
    got_returns = discounted_return(rewards, episode_end, 0.5, scan=scan)
    got_prefix = discounted_prefix_sum(rewards, episode_end, 0.5, scan=scan)
    assert got_returns.dtype == got_prefix.dtype == jnp.float32
    np.testing.assert_allclose(got_returns, returns, rtol=1e-6)
    np.testing.assert_allclose(got_prefix, prefix, rtol=1e-6)
    for baseline in (numpy_loop_returns, jit_episode_returns, jit_lax_scan_returns):  # the timed
        got = baseline(np.asarray(rewards), np.asarray(episode_end), 0.5)  # ones, on host tapes
        assert np.asarray(got).dtype == np.float32
        np.testing.assert_allclose(got, returns, rtol=1e-6)


@pytest.mark.parametrize("block_size", ["1", "0"])
def test_returns_script_rejects_block_size_below_two(block_size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_returns_args(["--block-size", block_size])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--block-size" in err and ">= 2" in err
    assert parse_returns_args(["--block-size", "2"]).block_size == 2


@pytest.mark.parametrize("reverse", [False, True])
def test_blocked_scan_rejects_block_size_below_two(reverse):
    elems = (jnp.full(5, 0.5), jnp.ones(5))
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        blocked_scan(return_op, elems, reverse=reverse, block_size=1)


# =============================================================================================
# VML: vml_analysis.py against a Q function of known dependence
# =============================================================================================
def linear_q_fn(weights, bias):
    """Q_t(a) = sum_{i<=t} w_i . o_{t-i} + bias_a: the true sensitivity at age i is sum |w_i|."""
    def q_fn(obs):
        t = jnp.arange(obs.shape[0])
        age = t[:, None] - t[None, :]
        kernel = jnp.where((age >= 0)[..., None], weights[jnp.clip(age, 0)], 0.0)  # [T, T, d]
        return jnp.einsum("tsd,sd->t", kernel, obs)[:, None] + bias
    return q_fn


def test_vml_recovers_a_known_linear_dependence():
    rng = np.random.default_rng(0)
    weights = np.zeros((30, 4), np.float32)
    weights[:5] = rng.normal(size=(5, 4))  # this Q looks exactly 5 observations back
    weights[7] = 0.01  # and a little at age 7
    q_fn = linear_q_fn(jnp.asarray(weights), jnp.asarray([5.0, 0.0, -1.0]))
    episodes = [rng.normal(size=(n, 4)).astype(np.float32) for n in (20, 26)]
    sens = vml.mean_sensitivity(q_fn, episodes, final_steps=3)
    assert len(sens) == 18  # the ages every analysed step has: 0..17
    np.testing.assert_allclose(sens, np.abs(weights[:18]).sum(-1), rtol=1e-5, atol=1e-7)
    cumulative, length = vml.value_memory_length(sens, 0.95)
    assert length == 5 and cumulative[-1] == pytest.approx(1.0)
    assert vml.value_memory_length(sens, 1.0)[1] == 8


@pytest.mark.parametrize("model", NETWORKS)
def test_vml_sensitivity_is_zero_across_an_episode_start(model):
    params, module = net_params(model), NETWORKS[model][0]
    obs, _, _ = random_tape_obs([6, 9], seed=5)
    start = jnp.asarray(episode_starts([6, 9]))
    q_fn = jax.jit(lambda o: module.q_tape(params, o, o, start[: o.shape[0]], "sequential")[0])
    for t in (6, 14):  # steps of the second episode, which starts at 6
        sens = vml.sensitivity(q_fn, obs, t)
        assert np.all(sens[t - 6 + 1:] == 0.0) and np.all(sens[: t - 6 + 1] > 0.0)
    # vml's own Q of one episode is the network's on that episode
    np.testing.assert_allclose(vml.q_fn_of(module, params)(jnp.asarray(obs[6:])),
                               q_fn(jnp.asarray(obs))[6:], rtol=1e-5, atol=1e-5)


def test_vml_script_smoke(tmp_path):
    p = run_script("vml_analysis.py", "--memory", "ffm", "--seeds", "1", "--segment-lengths", "10",
                   "--episodes", "2", "--final-steps", "2", "--output-dir", str(tmp_path),
                   "--total-timesteps", "1000", "--learning-starts", "900", "--num-envs", "8",
                   "--hidden-size", "32", "--trace-size", "8", "--context-size", "2")
    assert p.returncode == 0, p.stderr
    assert "RML = 10 observations" in p.stdout and p.stdout.count("VML = ") == 2
    with open(tmp_path / "vml.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["batching"] == "tbb"]
    assert float(rows[-1]["cumulative"]) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "vml.png").stat().st_size > 0


@pytest.mark.parametrize("k", [1, 4, 10])
def test_repeat_previous_rewards_the_suit_k_minus_1_observations_back(k):
    """vml_analysis.py's RML = k: the rewarded suit is that of the observation at age k - 1."""
    from popgym.envs.repeat_previous import RepeatPrevious
    for age in (k - 2, k - 1, k):
        env = RepeatPrevious(num_decks=2, k=k)
        seen, rewards = [env.reset(seed=3)[0]], []
        for _ in range(80):
            action = seen[-1 - age] if 0 <= age < len(seen) else 0
            obs, reward, *_ = env.step(action)
            if len(seen) >= k:  # rewarded from the k-th observation on
                rewards.append(reward)
            seen.append(obs)
        assert (min(rewards) > 0) == (age == k - 1)


def test_vml_reuses_a_finished_run_of_the_same_settings(tmp_path, monkeypatch):
    """...and not an interrupted one, which keeps its params.npz too, nor one made with other
    settings (another --k, --gamma, or a default that changed since): that one is trained again."""
    args = vml.parse_args(["--output-dir", str(tmp_path)])
    made_with = sbb.parse_args([*args.run_flags, "--seed", "2", "--save-model", "--output-dir",
                                "elsewhere", "--exp-name", "sbb10", *args.script_flags,
                                "--memory", "lru", "--segment-length", "10"])
    for name, last_step in (("Task__sbb10__2__0", 300_000), ("Task__sbb10__2__1", 4_000)):
        run_dir = tmp_path / "runs" / "sbb10" / "seed2" / name
        run_dir.mkdir(parents=True)
        (run_dir / "params.npz").write_bytes(b"")
        (run_dir / "args.json").write_text(json.dumps({**vars(made_with), "scan_used": "x"}))
        (run_dir / "metrics.csv").write_text(f"global_step,eval_return\n{last_step},0.5\n")
        assert vml.finished(str(run_dir), made_with) == (last_step == 300_000)
    trained = []
    monkeypatch.setattr(sbb, "train", lambda run_args: trained.append(run_args) or "trained")
    # the newer, interrupted run is passed over: no training started
    assert vml.trained_run(args, "sbb10", 2, args.run_flags) == str(
        run_dir.parent / "Task__sbb10__2__0") and not trained
    for flags in (["--k", "5"], ["--gamma", "0.9"], ["--hidden-size", "32"]):
        other = vml.parse_args(["--output-dir", str(tmp_path), *flags])
        assert vml.trained_run(other, "sbb10", 2, other.run_flags) == "trained"
    assert len(trained) == 3
    changed = argparse.Namespace(**{**vars(made_with), "learning_rate": 3e-4})  # a new default
    assert not vml.finished(str(run_dir.parent / "Task__sbb10__2__0"), changed)


def test_vml_trains_lru_on_the_split_ring_unless_told_otherwise():
    ring = lambda a: (a.r_min, a.r_max, a.max_phase)
    split = ([0.0, 0.9], [0.9999, 0.999], [6.28, 0.314159])
    assert ring(lru.parse_args(vml.parse_args([]).script_flags)) == split
    told = vml.parse_args(["--r-min", "0.5", "0.9", "--hidden-size", "8"]).script_flags
    assert ring(lru.parse_args(told)) == ([0.5, 0.9],) + split[1:]
    assert vml.parse_args(["--memory", "ffm", "--trace-size", "8"]).script_flags == [
        "--trace-size", "8"]


def test_vml_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        vml.parse_args(["--k", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip() and len(err.strip().splitlines()) == 1
    assert "argument --k: must be positive, got 0" in err


# =============================================================================================
# Runners: benchmarks/reproduce.py's bookkeeping (not its training)
# =============================================================================================
def load_reproduce():
    spec = importlib.util.spec_from_file_location(
        "reproduce", os.path.join(HERE, "benchmarks", "reproduce.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strip_run_flags(flags, model, batching):
    """The flags without those that may differ: the run's name and folder, and SBB's own."""
    flags = list(flags)
    for flag in ("--exp-name", "--output-dir", "--memory", "--segment-length"):
        if flag in flags:
            i = flags.index(flag)
            if flag == "--segment-length":
                assert flags[i + 1] == batching[3:]
            if flag == "--memory":
                assert flags[i + 1] == model
            del flags[i:i + 2]
    return flags


def test_reproduce_runs_differ_only_in_batching(tmp_path):
    rep = load_reproduce()
    args = rep.parse_args(["--grid-dir", str(tmp_path), "--extra", "--num-envs 16"])
    for task in args.tasks:
        for model in args.models:
            flags = {}
            for batching in args.batchings:
                out, cmd = rep.command(task, model, batching, 2, args)
                assert out == os.path.join(str(tmp_path), task, model, batching, "seed2")
                flags[batching] = cmd[2:]  # past the interpreter and the script
                assert os.path.basename(cmd[1]) == ("sbb_baseline_dqn.py" if batching != "tbb"
                                                    else f"{model}_tbb_dqn.py")
            reference = strip_run_flags(flags["tbb"], model, "tbb")
            assert "--num-envs" in reference and "--seed" in reference
            for batching in ("sbb10", "sbb50"):
                assert strip_run_flags(flags[batching], model, batching) == reference


def test_reproduce_variants_swap_one_thing(tmp_path, capsys):
    """tbb+ablation runs ablations.py; +one_env adds --num-envs 1; nothing else changes."""
    rep = load_reproduce()
    assert rep.ABLATIONS == load_ablations().ABLATIONS  # reproduce.py's copy, kept without jax
    batchings = ["tbb", "tbb+first_network+one_env", "sbb50", "sbb50+sbb_loss"]
    args = rep.parse_args(["--recipe", "paper", "--tasks", "CountRecallEasy", "--models", "lru",
                           "--grid-dir", str(tmp_path), "--batchings", *batchings])
    cmds = {b: rep.command("CountRecallEasy", "lru", b, 1, args)[1] for b in batchings}
    variant = cmds["tbb+first_network+one_env"]
    assert variant[1].endswith(os.path.join("benchmarks", "ablations.py"))
    assert variant[2] == "first_network" and variant[-4:] == ["--memory", "lru", "--num-envs", "1"]
    assert strip_run_flags(variant[3:-4], "lru", "tbb") == strip_run_flags(
        cmds["tbb"][2:], "lru", "tbb")
    sbb_variant = cmds["sbb50+sbb_loss"]
    assert sbb_variant[2] == "sbb_loss" and sbb_variant[-4:] == [
        "--memory", "lru", "--segment-length", "50"]
    assert strip_run_flags(sbb_variant[3:], "lru", "sbb50") == strip_run_flags(
        cmds["sbb50"][2:], "lru", "sbb50")
    # The LRU's default is the split ring; +paper_lru_init gives the paper code's alone,
    # |lambda| over [0, 1) and phases up to 2 pi, +first_lru_init our first one, |lambda| in
    # [0.9, 0.999] and phases up to pi/10
    default = lru.parse_args(cmds["tbb"][2:])
    assert (default.r_min, default.r_max, default.max_phase) == ([0.0, 0.9], [0.9999, 0.999],
                                                                 [6.28, 0.314159])
    paper = lru.parse_args(rep.command("CountRecallEasy", "lru", "tbb+paper_lru_init", 1,
                                       args)[1][2:])
    lam = lru.lru_lambda(lru.init_params(jax.random.PRNGKey(0), 4, 2, paper)["lru"][0])
    assert np.abs(lam).min() < 0.3 and np.abs(lam).max() > 0.95 and np.angle(lam).max() > 3.0
    first = lru.parse_args(rep.command("CountRecallEasy", "lru", "tbb+first_lru_init", 1,
                                       args)[1][2:])
    lam = lru.lru_lambda(lru.init_params(jax.random.PRNGKey(0), 4, 2, first)["lru"][0])
    assert np.abs(lam).min() >= 0.9 - 1e-6 and np.abs(lam).max() <= 0.999 + 1e-6
    assert np.angle(lam).max() <= np.pi / 10 + 1e-5
    # flag=value: that flag appended, so it wins over the recipe's (argparse keeps the last)
    lr = rep.command("CountRecallEasy", "lru", "tbb+learning-rate=3e-5", 1, args)[1]
    assert strip_run_flags(lr[2:], "lru", "tbb") == strip_run_flags(
        cmds["tbb"][2:], "lru", "tbb") + ["--learning-rate", "3e-5"]
    assert lru.parse_args(lr[2:]).learning_rate == 3e-5
    r2d2 = sbb.parse_args(rep.command("CountRecallEasy", "lru", "sbb50+stored_state+burn-in=50",
                                      1, args)[1][2:])
    assert (r2d2.stored_state, r2d2.burn_in, r2d2.segment_length) == (True, 50, 50)
    for bad in ("tbb+fast", "sbb10+first_network+fast", "tbb+paper_network", "tbb+=3",
                "tbb+first_lru_init"):  # the last: a ring, asked of every model
        with pytest.raises(SystemExit) as e:
            rep.parse_args(["--batchings", bad])
        assert e.value.code == 2 and bad in capsys.readouterr().err


def write_fake_run(out, steps, returns, density=None, cmd=None):
    """A finished run's folder as the runner leaves it; with `cmd`, its settings too."""
    run_dir = os.path.join(out, "Task__x__1__0")
    os.makedirs(run_dir)
    if cmd is not None:
        with open(os.path.join(out, "command.json"), "w") as f:
            json.dump(load_reproduce().settings(cmd), f)
    extra = "" if density is None else f",{density}"  # TBB runs from before the density column log none
    with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
        f.write("global_step,updates,eval_return,elapsed_s" + (",density" if extra else "") + "\n")
        for i, (s, r) in enumerate(zip(steps, returns)):
            f.write(f"{s},{10 * i},{r},{60.0 * i}{extra}\n")


def test_reproduce_resumes_and_tabulates(tmp_path, monkeypatch):
    rep = load_reproduce()
    grid = str(tmp_path / "grid")
    flags = ["--tasks", "RepeatFirstEasy", "--models", "ffm", "--batchings", "tbb", "sbb10",
             "--seeds", "2", "--total-timesteps", "300", "--grid-dir", grid,
             "--figure", str(tmp_path / "f.png"), "--table", str(tmp_path / "t.md"),
             "--curves", str(tmp_path / "c.csv"), "--extra", "--learning-starts 100"]
    args = rep.parse_args(flags)
    curves = {("tbb", 1): [0.0, 0.5, 1.0], ("tbb", 2): [0.0, 0.25, 0.5],
              ("sbb10", 1): [0.0, 0.0, 0.25]}
    for (batching, seed), returns in curves.items():
        out, cmd = rep.command("RepeatFirstEasy", "ffm", batching, seed, args)
        write_fake_run(out, [100, 200, 300], returns, None if batching == "tbb" else 0.8, cmd)
    # sbb10 seed 2 stopped early: it is run again; the finished runs are not.
    out, cmd = rep.command("RepeatFirstEasy", "ffm", "sbb10", 2, args)
    write_fake_run(out, [100, 200], [0.0, 0.0], 0.8, cmd)
    ran = []
    monkeypatch.setattr(rep.subprocess, "run", lambda line, **kw: ran.append(
        shlex.split(line)) or subprocess.CompletedProcess(line, 0))
    rep.run_grid(args)
    assert len(ran) == 1 and ran[0][ran[0].index("--seed") + 1] == "2"
    assert any(word.endswith("sbb_baseline_dqn.py") for word in ran[0])

    rep.summarise(args)
    rows = [line.split("|")[1:-1] for line in (tmp_path / "t.md").read_text().splitlines()[2:]]
    by_batching = {r[2].strip(): [c.strip() for c in r] for r in rows}
    tbb, sbb10 = by_batching["tbb"], by_batching["sbb10"]
    assert tbb[3] == "2" and sbb10[3] == "1"  # the unfinished seed is left out
    assert tbb[4].startswith("+0.750 (+0.500, +1.000)")  # mean of the last evals 1.0 and 0.5
    assert tbb[5].startswith(f"{np.mean([0.5, 0.25]):+.3f}")  # area: the mean of each curve
    assert sbb10[4].startswith("+0.250 (+0.250, +0.250)")
    assert tbb[7] == "1.00" and sbb10[7] == "0.80" and tbb[6] == "20" and tbb[8] == "2.0"
    assert tbb[11] == "20, never" and sbb10[11] == "never"  # updates to the first eval >= 0.9
    # the mean eval after the first update: the evaluation at 0 updates is left out
    assert tbb[12].startswith(f"{np.mean([np.mean([0.5, 1.0]), np.mean([0.25, 0.5])]):+.3f}")
    assert (tmp_path / "f.png").stat().st_size > 0
    # The finished runs' curves are kept in --curves: without runs/ the table is the same and
    # they are not run again.
    table = (tmp_path / "t.md").read_text()
    shutil.rmtree(grid)
    (tmp_path / "t.md").unlink()
    rep.summarise(args)
    assert (tmp_path / "t.md").read_text() == table
    ran.clear()
    rep.run_grid(args)
    assert len(ran) == 1 and ran[0][ran[0].index("--seed") + 1] == "2"


FAKE_PYTHON = """#!/bin/bash
# Stands in for the interpreter: a run that finishes at once, its last eval total / 1,000.
while [ $# -gt 0 ]; do
  case "$1" in --output-dir) out="$2"; shift;; --total-timesteps) total="$2"; shift;; esac; shift
done
mkdir -p "$out/Task__x__1__0" && printf "global_step,updates,eval_return,elapsed_s\\n0,0,0,0\\n%s,9,%s,60\\n" \\
  "$total" "$((total / 1000))" > "$out/Task__x__1__0/metrics.csv"
"""


def test_reproduce_never_mixes_settings(tmp_path, monkeypatch, capsys):
    """A grid, then the same grid with another --total-timesteps or --extra: the second runs
    again (its runs are not the first's), both are kept, and each table shows its own; the
    shell lines the runner starts are exactly those --commands prints, and runs made from them
    elsewhere (GNU parallel, a job array) are picked up by --plot-only."""
    rep = load_reproduce()
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    monkeypatch.setattr(rep.sys, "executable", str(fake))
    started, run = [], subprocess.run
    monkeypatch.setattr(rep.subprocess, "run", lambda line, **kw: started.append(line) or run(
        line, **kw))

    def grid(*flags):
        args = rep.parse_args(["--tasks", "RepeatFirstEasy", "--models", "ffm", "--batchings",
                               "tbb", "--seeds", "1", "--grid-dir", str(tmp_path / "grid"),
                               "--curves", str(tmp_path / "c.csv"), "--figure",
                               str(tmp_path / "f.png"), "--table", str(tmp_path / "t.md"), *flags])
        started.clear()
        rep.run_grid(args)
        todo = capsys.readouterr().out.splitlines()[0]
        rep.summarise(args)
        capsys.readouterr()
        final = (tmp_path / "t.md").read_text().splitlines()[2].split("|")[5].split()[0]
        return todo, len(started), float(final)

    short = ["--total-timesteps", "3000", "--extra", "--learning-starts 1000"]
    assert grid(*short) == ("1 runs to do", 1, 3.0)
    assert grid(*short) == ("0 runs to do", 0, 3.0)
    longer = ["--total-timesteps", "6000", "--extra", "--learning-starts 1000"]
    todo, ran, final = grid(*longer)
    assert todo.startswith("1 runs to do; 1 of the runs asked for were kept only with other "
                           "settings") and (ran, final) == (1, 6.0)
    todo, ran, final = grid(*short[:-1], "--learning-starts 1000 --learning-rate 3e-4")
    assert todo.startswith("1 runs to do; 1 of") and (ran, final) == (1, 3.0)
    assert grid(*short) == ("0 runs to do", 0, 3.0)  # all three stay kept, each with its own
    with open(tmp_path / "c.csv") as f:
        assert len({r["settings"] for r in csv.DictReader(f)}) == 3

    # --plot-only with settings never run: one line says so, and nothing is drawn
    never = rep.parse_args(["--tasks", "RepeatFirstEasy", "--models", "ffm", "--batchings",
                            "tbb", "--seeds", "1", "--grid-dir", str(tmp_path / "grid"),
                            "--curves", str(tmp_path / "c.csv"), "--plot-only",
                            "--total-timesteps", "9000", "--figure", str(tmp_path / "g.png"),
                            "--table", str(tmp_path / "g.md")])
    with pytest.raises(SystemExit):
        rep.summarise(never)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("note: 1 of the runs asked for were kept only with other settings")
    assert not (tmp_path / "g.md").exists()

    # --commands prints the lines the runner would start; made by hand, --plot-only finds them
    argv = ["reproduce.py", "--tasks", "RepeatFirstEasy", "CountRecallEasy", "--models", "ffm",
            "--batchings", "tbb", "sbb10", "--seeds", "2", "--grid-dir", str(tmp_path / "grid"),
            "--curves", str(tmp_path / "c.csv"), "--figure", str(tmp_path / "f.png"),
            "--table", str(tmp_path / "t.md"), *short, "--commands"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(HERE, "benchmarks", "reproduce.py"), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert e.value.code in (None, 0) and len(lines) == 7  # 8 runs, 1 finished above
    args = rep.parse_args(argv[1:-1])
    assert [line for _, line in rep.unfinished(args)[0]] == lines
    for line in lines:  # as GNU parallel would
        run(line, shell=True, executable="/bin/bash", check=True)
    started.clear()
    rep.run_grid(args)
    assert started == [] and capsys.readouterr().out.startswith("0 runs to do")
    rep.summarise(args)
    assert len((tmp_path / "t.md").read_text().splitlines()) == 2 + 4


def test_reproduce_a_changed_default_is_another_run(monkeypatch):
    """A run's settings hold the training script's defaults of the flags its command leaves
    out: changing one (the LRU's ring) makes TBB and SBB runs other runs; changing one that the
    command gives (the recipe's --learning-rate) does not."""
    rep = load_reproduce()
    args = rep.parse_args(["--recipe", "paper"])
    keys = [("CountRecallEasy", "lru", batching, 1) for batching in ("tbb", "sbb10")]
    today = [rep.settings_id(key, args) for key in keys]
    load_script = sbb.load_script  # SBB's parse_args reads its TBB script's too

    def changed_script(memory):  # as if the script's defaults were `changed`
        script = load_script(memory)
        parse = script.parse_args
        script.parse_args = lambda argv=None: parse([*(argv or []), *changed])
        return script

    monkeypatch.setattr(sbb, "load_script", changed_script)
    for changed, same in ((["--r-min", "0", "0.5"], False), (["--learning-rate", "0.5"], True)):
        rep.training_defaults.cache_clear()
        rep.training_parser.cache_clear()
        after = [rep.settings_id(key, args) for key in keys]
        assert [a == b for a, b in zip(after, today)] == [same, same]


@pytest.mark.parametrize("flags, message", [
    (["--jobs", "0"], "argument --jobs: must be a positive integer, got 0"),
    (["--seeds", "-3"], "argument --seeds: must be a positive integer, got -3"),
    (["--tasks", "NotAnEnv"], "--tasks: NotAnEnv is neither a POPGym class nor a gymnasium id"),
    (["--job", "2"], "unrecognized arguments: --job 2"),  # no abbreviations
    (["--plot-only", "--commands"], "--commands prints the runs to make, --plot-only draws"),
    (["--curves", "."], "--curves '.': a CSV file is needed"),
    (["--recipe", "paper", "--plot-only", "--course-figure", "f.txt"],
     "--course-figure f.txt: name a .png, .pdf or .svg file"),
    (["--recipe", "paper", "--r2d2", "--models", "lru", "--plot-only"],
     "--r2d2: none of its cells (FFM on RepeatFirstEasy"),
    # flags for the runs that the grid sets, or that every run would stop on
    (["--extra", "--seed 5"], "--seed is set for each run by the grid"),
    (["--batchings", "tbb", "sbb10+seed=7"], "--seed is set for each run by the grid"),
    (["--models", "ffm", "--extra", "--num-env 16"], "every run of tbb on RepeatFirstEasy (ffm) "
     "would stop at once (with --extra '--num-env 16'): ffm_tbb_dqn.py: unrecognized arguments"),
    (["--models", "lru", "--batchings", "sbb10+bogus-flag=1"], "every run of sbb10+bogus-flag=1 "
     "on RepeatFirstEasy (lru) would stop at once: sbb_baseline_dqn.py: unrecognized arguments"),
    (["--recipe", "paper", "--extra", "--learning-starts 9999999"], "every run of tbb on "
     "RepeatFirstEasy (ffm) would stop at once (with --extra '--learning-starts 9999999'): "
     "ffm_tbb_dqn.py: --learning-starts 9,999,999 is not below --total-timesteps 510,000"),
])
def test_reproduce_bad_input_is_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        load_reproduce().parse_args(flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"reproduce.py: error: {message}")


def test_reproduce_failed_run_shows_its_last_line(tmp_path, monkeypatch, capsys):
    rep = load_reproduce()
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\necho starting\necho 'ffm_tbb_dqn.py: error: --seed must be "
                    "in [0, 2**32)' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(rep.sys, "executable", str(fake))
    args = rep.parse_args(["--tasks", "RepeatFirstEasy", "--models", "ffm", "--batchings", "tbb",
                           "--seeds", "1", "--grid-dir", str(tmp_path / "grid"), "--curves",
                           str(tmp_path / "c.csv")])
    rep.run_grid(args)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (f"FAILED (2): {rep.command('RepeatFirstEasy', 'ffm', 'tbb', 1, args)[0]}: "
                       "ffm_tbb_dqn.py: error: --seed must be in [0, 2**32)")


def test_reproduce_rejects_an_unknown_batching(capsys):
    with pytest.raises(SystemExit) as e:
        load_reproduce().parse_args(["--batchings", "tbb", "segments"])
    assert e.value.code == 2 and "unknown batching 'segments'" in capsys.readouterr().err


def test_reproduce_paper_recipe_is_the_papers_settings(tmp_path):
    rep = load_reproduce()
    args = rep.parse_args(["--recipe", "paper", "--tasks", "RepeatPrevious2x10", "--models", "ffm",
                           "--seeds", "1", "--grid-dir", str(tmp_path / "grid"),
                           "--figure", str(tmp_path / "f.png"), "--table", str(tmp_path / "t.md"),
                           "--curves", str(tmp_path / "c.csv")])
    assert args.batchings == ["tbb", "sbb10", "sbb50", "sbb100"]
    flags = {}
    for batching in args.batchings:
        out, cmd = rep.command("RepeatPrevious2x10", "ffm", batching, 1, args)
        flags[batching] = cmd[2:]
        parsed = (ffm if batching == "tbb" else sbb).parse_args(cmd[2:])  # the scripts take them
        assert parsed.env_kwargs == {"num_decks": 2, "k": 10} and parsed.gamma == 0.5
        assert parsed.learning_starts == 5000 * 103 and parsed.total_timesteps == 10000 * 103
        assert parsed.train_frequency == 103 and parsed.updates_per_train == 1
        assert (parsed.learning_rate, parsed.max_grad_norm, parsed.end_e) == (1e-4, 0.01, 0.1)
        assert parsed.buffer_size >= 2 * parsed.total_timesteps  # nothing is evicted
        assert (parsed.trace_size, parsed.context_size) == (16, 16)  # its RepeatPrevious FFM
        # a curve that rises then falls: the plain final is 0.0, the best so far 0.5
        write_fake_run(out, [103_000, 515_000, 1_030_000], [-0.5, 0.5, 0.0], 0.9, cmd)
    for batching in ("sbb10", "sbb50", "sbb100"):
        assert strip_run_flags(flags[batching], "ffm", batching) == strip_run_flags(
            flags["tbb"], "ffm", "tbb")
    rep.summarise(args)
    rows = [line.split("|")[1:-1] for line in (tmp_path / "t.md").read_text().splitlines()[2:]]
    tbb = [c.strip() for c in rows[0]]
    assert tbb[4].startswith("+0.000") and tbb[9].startswith("+0.500") and tbb[10] == "~0.0"
    # CartPole's episodes vary: ~22 random steps each, then one update per 200 (the cap)
    cart = ffm.parse_args(rep.command("PositionOnlyCartPoleEasy", "ffm", "tbb", 1, args)[1][2:])
    assert (cart.learning_starts, cart.train_frequency) == (10000 * 22, 200)
    assert cart.total_timesteps == cart.learning_starts + 10000 * 200 and cart.prev_action == "on"


def test_reproduce_readme_tables_are_the_commands_output():
    """Each of README's result tables (section 5's, the R2D2 section's) is what the command
    named above it draws from the committed curves (and so is its file under figures/): redraw
    it with that command, never edit it."""
    import re
    rep = load_reproduce()
    text = open(os.path.join(HERE, "README.md")).read()
    tables = list(re.finditer(r"<!-- (\w+) table: python benchmarks/reproduce.py (.*?) -->\n",
                              text))
    assert [m.group(1) for m in tables][:1] == ["results"]
    for begin in tables:
        end = text.index(f"<!-- end of {begin.group(1)} table -->")
        args = rep.parse_args(begin.group(2).split())
        assert args.plot_only and args.course_table
        table = rep.course_table(rep.asked_curves(
            rep.kept_curves(os.path.join(HERE, args.curves)), args)[0], args)
        assert text[begin.end():end] == table, "README's table: rerun " + begin.group(2)
        assert open(os.path.join(HERE, args.course_table)).read() == table


def fake_course_curve(returns):
    """An eval curve as the paper recipe logs it: one evaluation before the first update, then
    one every 10 updates."""
    n = len(returns)
    updates = np.array([0.0] + [1.0 + 10 * i for i in range(n - 1)])
    return {"global_step": 255_000 + 51 * updates, "updates": updates,
            "eval_return": np.array(returns, float), "density": np.ones(n),
            "elapsed_s": np.arange(n, dtype=float)}


def test_reproduce_course_table_and_figure(tmp_path, capsys):
    """Every course cell has its two rows, "no run kept" where the CSV has none; the figure has
    a panel only for cells with runs; --variant picks the rows of our batchings only; every
    file written is named."""
    rep = load_reproduce()
    default = rep.parse_args(["--recipe", "paper", "--plot-only"])
    assert default.course_table == os.path.join("figures", "results.md") and default.figure is None
    subset = rep.parse_args(["--recipe", "paper", "--batchings", "tbb"])  # beside the runs
    assert subset.course_table is None and subset.figure == os.path.join(
        "runs", "reproduce_paper", "tbb_vs_sbb_paper.png")
    assert rep.parse_args(["--recipe", "paper", "--tasks", "CountRecallEasy"]).course_table == (
        os.path.join("runs", "reproduce_paper", "results.md"))  # not README's file
    rise = [-0.5, 0.0, 0.95, 1.0, 1.0]  # the first eval >= 0.9 after 11 updates
    curves = {("RepeatFirstEasy", "ffm", "tbb", s): fake_course_curve(rise) for s in (1, 2, 3)}
    curves["RepeatFirstEasy", "ffm", "sbb10", 1] = fake_course_curve([-0.5, -0.2, 0.1, 0.2, 0.3])
    curves["RepeatFirstEasy", "ffm", "paper-tbb", 1] = fake_course_curve([-0.5, 0.5, 1.0, 1.0, 1.0])
    curves["CountRecallEasy", "ffm", "sbb50+first_network", 1] = fake_course_curve([-0.9] * 5)
    path = tmp_path / "c.csv"
    with open(path, "w") as f:
        f.write(",".join(rep.KEY + rep.CURVE) + "\n")
        for key, curve in curves.items():
            for values in zip(*(curve[c] for c in rep.CURVE)):
                f.write(",".join(map(str, key + values)) + "\n")
    flags = ["--recipe", "paper", "--plot-only", "--curves", str(path), "--grid-dir",
             str(tmp_path / "grid"), "--course-table", str(tmp_path / "t.md"),
             "--course-figure", str(tmp_path / "f.png")]
    args = rep.parse_args(flags)
    rep.summarise(args)
    out, err = capsys.readouterr()
    assert out.splitlines()[-2:] == [f"wrote {tmp_path / 't.md'}", f"wrote {tmp_path / 'f.png'}"]
    # a CSV without settings (kept before they were recorded) is drawn, and said to be unchecked
    assert err.startswith("note: 5 of the runs asked for were kept before settings were recorded")
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert len(lines) == 2 + 2 * len(rep.COURSE_CELLS) and len(rep.COURSE_CELLS) == 12
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert rows[0][:3] == ["RepeatFirstEasy, FFM", "ours: final eval (95% CI); updates to 0.9",
                           "+1.00 (+1.00, +1.00); 11, 11, 11"]
    assert rows[0][3:] == ["+0.30 (1 seed); never", "no run kept", "no run kept"]
    assert rows[1][2:4] == ["+1.00; 11 / ~1.0", "no run kept / ~0.9"]  # code here / Fig. 3
    assert all(r[2:] == ["no run kept"] * 4 for r in rows[2::2])  # no other cell has runs
    kept = rep.kept_curves(str(path))
    assert rep.course_figure(rep.asked_curves(kept, args)[0], args, str(tmp_path / "g.png")) == [
        ("RepeatFirstEasy", "ffm")]  # one panel: no empty ones
    variant = rep.parse_args(flags + ["--variant", "first_network"])
    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in rep.course_table(rep.asked_curves(kept, variant)[0],
                                         variant).splitlines()[2:]]
    assert rows[0][2:] == ["no run kept"] * 4 and rows[1][2] == "+1.00; 11 / ~1.0"  # the paper's
    count_recall = 2 * rep.COURSE_CELLS.index(("CountRecallEasy", "ffm"))
    assert rows[count_recall][2:] == ["no run kept", "no run kept", "-0.90 (1 seed); never",
                                      "no run kept"]


def test_reproduce_r2d2_runs_and_table(tmp_path):
    """--r2d2 runs the R2D2 cells (each with its own L) and tabulates one row per cell: TBB,
    SBB from zero, from stored states, and with a burn-in of L, each run as those flags."""
    rep = load_reproduce()
    args = rep.parse_args(["--recipe", "paper", "--r2d2", "--curves", str(tmp_path / "c.csv"),
                           "--grid-dir", str(tmp_path / "grid")])
    assert args.course_table == str(tmp_path / "grid" / "r2d2.md") and args.table is None
    assert rep.parse_args(["--recipe", "paper", "--r2d2", "--plot-only"]).course_figure == (
        os.path.join("figures", "r2d2.png"))
    keys = rep.grid(args)
    assert len(keys) == len(set(keys)) == (len(rep.R2D2_CELLS) * 4 - 1) * 3  # one TBB a task
    flags = {b: rep.command(task, "ffm", b, 1, args)[1] for task, _, b, _ in keys
             if task == "CountRecallEasy"}
    burn = sbb.parse_args(flags["sbb50+stored_state+burn-in=50"][2:])
    assert (burn.segment_length, burn.stored_state, burn.burn_in) == (50, True, 50)
    stored, zero = (sbb.parse_args(flags[b][2:]) for b in ("sbb10+stored_state", "sbb10"))
    assert (stored.segment_length, stored.stored_state, stored.burn_in) == (10, True, 0)
    assert (zero.stored_state, zero.burn_in) == (False, 0)
    assert os.path.basename(flags["tbb"][1]) == "ffm_tbb_dqn.py"
    curves = {("CountRecallEasy", "ffm", "sbb50+stored_state", s): fake_course_curve([-1, 0.95])
              for s in (1, 2, 3)}
    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in rep.course_table(curves, args).splitlines()]
    assert len(rows) == 2 + len(rep.R2D2_CELLS) and len(rows[0]) == 5
    assert rows[-1] == ["CountRecallEasy, FFM, L = 50", "no run kept", "no run kept",
                        "+0.95 (+0.95, +0.95); 1, 1, 1", "no run kept"]
    assert all(r[1:] == ["no run kept"] * 4 for r in rows[2:-1])
    with pytest.raises(SystemExit):
        rep.parse_args(["--recipe", "paper", "--r2d2", "--batchings", "tbb"])


def test_reproduce_bad_curves_or_outputs_stop_in_one_line(tmp_path, capsys):
    """A curves CSV that is not one, or an output that cannot be written, stops the command in
    one line naming its flag (before any run), not with a traceback after it."""
    rep = load_reproduce()
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    (tmp_path / "a_file").write_text("")
    cases = [(["--curves", str(tmp_path / "bad.csv")], "--curves", "not a curves CSV"),
             (["--course-table", str(tmp_path / "a_file" / "t.md")], "--course-table",
              "a file is in the way"),
             (["--course-figure", str(tmp_path)], "--course-figure", "name a .png"),
             (["--course-table", str(tmp_path)], "--course-table", "is a folder")]
    for flags, flag, says in cases:
        with pytest.raises(SystemExit) as e:
            args = rep.parse_args(["--recipe", "paper", "--plot-only", "--grid-dir",
                                   str(tmp_path / "grid"), *flags])
            rep.check_outputs(args)
            rep.summarise(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"reproduce.py: error: {flag} ") and says in err, err


def test_reproduce_writes_committed_files_only_for_the_documented_commands():
    """figures/ holds what README shows: a subset of runs, other curves, a variant or other
    flags are drawn beside the runs, never over it."""
    rep = load_reproduce()
    paper = ["--recipe", "paper", "--plot-only"]
    assert rep.parse_args(paper).course_table == os.path.join("figures", "results.md")
    assert rep.parse_args(["--plot-only"]).figure == os.path.join("figures", "tbb_vs_sbb.png")
    grid = os.path.join("runs", "reproduce_paper")
    for flags in (["--curves", "benchmarks/curves_first_network.csv"],
                  ["--variant", "first_network"], ["--tasks", "CountRecallEasy"],
                  ["--models", "ffm"], ["--seeds", "2"], ["--extra", "--num-envs 16"]):
        args = rep.parse_args(paper + flags)
        assert (args.course_table, args.course_figure) == (
            os.path.join(grid, "results.md"), os.path.join(grid, "results.png")), flags
    for flags in (["--tasks", "RepeatFirstEasy"], ["--batchings", "tbb"],
                  ["--total-timesteps", "3000"], ["--curves", "c.csv"]):
        args = rep.parse_args(["--plot-only", *flags])
        assert args.figure == os.path.join("runs", "reproduce", "tbb_vs_sbb.png"), flags
    # --extra is split as a shell splits it: a JSON argument with spaces stays one
    args = rep.parse_args(["--models", "ffm", "--extra", """--env-kwargs '{"k": 3}'"""])
    assert rep.command("RepeatFirstEasy", "ffm", "tbb", 1, args)[1][-2:] == [
        "--env-kwargs", '{"k": 3}']


def test_reproduce_plot_only_names_what_is_missing(tmp_path, capsys):
    """Nothing to plot (the short study's curves were never kept): one line, exit code 2, and
    no file is written."""
    rep = load_reproduce()
    args = rep.parse_args(["--plot-only", "--grid-dir", str(tmp_path / "grid"), "--curves",
                           str(tmp_path / "c.csv"), "--figure", str(tmp_path / "f.png"),
                           "--table", str(tmp_path / "t.md")])
    with pytest.raises(SystemExit) as e:
        rep.summarise(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 'c.csv'} does not exist" in err and str(tmp_path / "grid") in err
    assert not list(tmp_path.iterdir())


# =============================================================================================
# Ablations: each of benchmarks/ablations.py's replacements really changes what it replaces
# =============================================================================================
def load_ablations():
    return load_benchmark("ablations")


def test_ablations_change_one_function_and_leave_the_scripts_untouched(monkeypatch):
    abl = load_ablations()
    originals = {m: dict(vars(m)) for m in (ffm, lru, lt, sbb)}
    params, target = net_params("ffm"), net_params("ffm", 3)
    # SBB loss: huber(mean |error|) != mean huber(error) once errors exceed the Huber knee
    steps, mask = segment_batch([7, 3, 10], L=4)
    # errors on both sides of the knee (Q starts near 0, so the errors are about the rewards)
    steps = steps._replace(reward=jnp.where(mask, 1.5 * steps.reward, 0.0))
    segment_q = partial(sbb.q_segments, ffm.q_tape)
    losses = [jax.jit(partial(loss, segment_q), static_argnums=(3, 4))(
        params, target, (steps, mask), 0.9, "sequential")[0]
        for loss in (sbb.masked_td_loss, abl.paper_sbb_loss)]
    ours, paper = losses
    assert abs(float(ours) - float(paper)) > 1e-3
    # ... and combined with rescan_target, in either order, SBB gets both changes
    for names in ("sbb_loss+rescan_target", "rescan_target+sbb_loss"):
        combined = abl.ablated_script(names, "ffm", 4)
        assert combined.td_loss.func is abl.paper_sbb_loss
        assert combined.td_loss.args[0].args == (combined.q_tape,)
        assert combined.q_tape.__name__ == "q_tape_rescan"
    # Rescanned target: equal Q(o_t), but Q(o_t+1) differs (its memory misses o_0)
    obs, next_obs, start = random_tape_obs([5, 4], seed=6)
    q, q_next = q_tape_jit("ffm")(params, obs, next_obs, start, "sequential")
    q2, q_next2 = jax.jit(abl.rescanned(ffm.q_tape), static_argnums=4)(
        params, obs, next_obs, start, "sequential")
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q2))
    assert not np.allclose(np.asarray(q_next), np.asarray(q_next2), atol=1e-4)
    # LT normaliser: (sum z)(sum phi(q)) != phi(q) . z on the hand-made state of the LT test
    p = net_params("linear_transformer")
    state = (jnp.ones((2, 3, 4)), jnp.array([[3.0, 0.5, 1.0], [1.0, 4.0, 2.0]]))
    x = jnp.asarray(np.random.default_rng(0).normal(size=16), jnp.float32)
    assert not np.allclose(lt.attention(p, state, x), abl.paper_attention(p, state, x))
    # Episodes by length: a step is trained on in proportion to its episode's length L, as
    # L * sum(L) / sum(L^2) times uniform predicts (the default's test finds ~1 for every L)
    lengths = np.array([12, 1, 5, 9, 2, 7, 3])
    tape = ffm.init_tape(64, 2)
    for ep_id, n in enumerate(lengths):
        tape = ffm.add_episode(tape, *make_episode(ep_id, int(n), 12))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    by_length = abl.episodes_by_length(ffm.sample_tape)
    drawn = np.asarray(jax.vmap(lambda k: by_length(tape, k, 120)[0].obs[:, 0])(keys)).astype(int)
    per_step = np.bincount(drawn.ravel(), minlength=len(lengths)) / lengths
    per_step /= drawn.size / lengths.sum()  # 1: uniform
    np.testing.assert_allclose(per_step, lengths * lengths.sum() / (lengths ** 2).sum(), rtol=0.06)
    # First network: our first embedding and head (365,257 FFM parameters, the default 430,537)
    net = abl.ablated_script("first_network", "ffm")
    args = net.parse_args([])
    count = lambda p: sum(leaf.size for leaf in jax.tree.leaves(p))  # noqa: E731
    first_params = net.init_params(jax.random.PRNGKey(0), 6, 4, args)
    assert count(first_params) == 365_257
    y = jnp.asarray(np.random.default_rng(1).normal(size=(5, 256)), jnp.float32)
    h = {name: {k: np.asarray(x) for k, x in layer.items()}
         for name, layer in first_params["head"].items()}
    z = np.asarray(y) @ h["hidden"]["w"] + h["hidden"]["b"]
    hidden = np.where(z > 0, z, 0.01 * z)
    v, a = (hidden @ h[n]["w"] + h[n]["b"] for n in ("value", "advantage"))
    first_q = np.asarray(net.q_head(first_params, y))
    np.testing.assert_allclose(first_q, v + a - a.mean(-1, keepdims=True), rtol=1e-4, atol=1e-5)
    # Small head init (with first_network): Q exactly 10x smaller at the start (zero biases)
    small = abl.ablated_script("first_network+small_head_init", "ffm")
    small_params = small.init_params(jax.random.PRNGKey(0), 6, 4, args)
    np.testing.assert_allclose(np.asarray(small.q_head(small_params, y)), 0.1 * first_q,
                               rtol=1e-4, atol=1e-7)
    assert count(small_params) == 365_257
    with pytest.raises(ValueError):
        abl.ablated_script("small_head_init", "ffm")  # it changes first_network's head
    # Head LayerNorm (with first_network): the hidden layer normalised before its leaky ReLU
    normed = abl.ablated_script("head_layernorm+first_network", "ffm")
    z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    hidden = np.where(z > 0, z, 0.01 * z)
    v, a = (hidden @ h[n]["w"] + h[n]["b"] for n in ("value", "advantage"))
    np.testing.assert_allclose(np.asarray(normed.q_head(first_params, y)),
                               v + a - a.mean(-1, keepdims=True), rtol=1e-4, atol=1e-5)
    # Fixed eval seeds: every evaluation starts the same episodes (ours: fresh ones)
    make_env, _ = ffm.resolve_env("RepeatFirstEasy")
    fixed = abl.ablated_script("fixed_eval_seeds", "ffm")
    for script, same in ((ffm, False), (fixed, True)):
        # Which episodes are played does not depend on the policy: always action 0, no compile
        monkeypatch.setattr(script, "act", lambda p, carry, obs, *_: (np.zeros(len(obs), int),
                                                                      carry))
        monkeypatch.setattr(script, "initial_carry", lambda p, n: None)
        envs = ffm.make_vector_env(make_env, 8)
        envs.reset(seed=5)
        starts, reset = [], envs.reset
        envs.reset = lambda **kw: starts.append(reset(**kw)) or starts[-1]  # noqa: B023
        first_obs = []  # what each evaluation played from: its last reset
        for _ in range(2):
            script.evaluate(None, envs, 8)
            first_obs.append(starts[-1][0])
        assert np.array_equal(first_obs[0], first_obs[1]) == same
    monkeypatch.undo()
    # Paper LT block: the paper code's LinearAttention (349,205 parameters with its network,
    # counted in its own code; the default 282,933), checked against a numpy loop over two episodes
    block = abl.ablated_script("paper_lt_block", "linear_transformer")
    p = block.init_params(jax.random.PRNGKey(0), 6, 4, block.parse_args([]))
    assert count(p) == 349_205
    rng = np.random.default_rng(7)
    p["attention"]["out_ln"] = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 256), jnp.float32),
                                "bias": jnp.asarray(rng.normal(size=256), jnp.float32)}
    a = {"/".join(k.key for k in path): np.asarray(leaf)
         for path, leaf in jax.tree_util.tree_flatten_with_path(p["attention"])[0]}
    phi = lambda v: np.where(v > 0, v + 1, np.exp(np.minimum(v, 0)))  # noqa: E731 (elu + 1)
    lrelu = lambda v: np.where(v > 0, v, 0.01 * v)  # noqa: E731
    obs = rng.normal(size=(5, 6)).astype(np.float32)
    start = episode_starts([3, 2])
    x, ys = np.asarray(block.embed(p, obs)), []
    for t in range(len(x)):
        past = x[max(i for i in range(t + 1) if start[i]): t + 1]  # this episode so far
        k = phi(np.einsum("si,ihk->shk", past, a["key/w"]))  # keys and queries: no bias
        v = np.einsum("si,ihv->shv", past, a["value/w"]) + a["value/b"]
        q = phi(np.einsum("i,ihk->hk", x[t], a["query/w"]))
        s_, z = np.einsum("shk,shv->hkv", k, v), k.sum(0)
        att = np.einsum("hk,hkv->hv", q, s_) / (np.einsum("hk,hk->h", q, z) + 1e-6)[:, None]
        h = lrelu(att.reshape(-1) @ a["mlp/hidden/w"] + a["mlp/hidden/b"])
        h = lrelu(h @ a["mlp/middle/w"] + a["mlp/middle/b"])
        y = h @ a["mlp/out/w"] + a["mlp/out/b"] + x[t] @ a["skip/w"] + a["skip/b"]
        y = (y - y.mean()) / np.sqrt(y.var() + 1e-5)
        ys.append(y * a["out_ln/scale"] + a["out_ln/bias"])
    np.testing.assert_allclose(
        np.asarray(block.q_tape(p, obs, obs, start, "sequential")[0]),
        np.asarray(block.q_head(p, jnp.asarray(np.stack(ys), jnp.float32))), rtol=1e-4, atol=1e-5)
    # Each ablated script is a private copy with exactly that function swapped
    script = abl.ablated_script("lt_normaliser", "linear_transformer")
    assert script.attention is abl.paper_attention and lt.attention is not abl.paper_attention
    assert abl.ablated_script("episodes_by_length", "ffm").sample_tape is not ffm.sample_tape
    assert {m: dict(vars(m)) for m in (ffm, lru, lt, sbb)} == originals
    with pytest.raises(ValueError):
        abl.ablated_script("sbb_loss", "ffm")  # SBB only


def test_official_log_becomes_a_curve_beside_ours(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "official", os.path.join(HERE, "benchmarks", "official.py"))
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    log = tmp_path / "paper.log"
    log.write_text("progress\r 12%|##\n" + "".join(
        f"EVAL,2026-01-01T00:00:00,{10.0 * e},epoch={e},train_epoch={max(0, e - 5000)},"
        f"transitions_collected=51,transitions_trained=1000,eval_mean={r},eval_best={b},"
        f"eval_min=0,eval_max=1,train_ep_reward=0,loss=0.1,eps=0.2,train_time_total=1\n"
        for e, r, b in ((5001, -0.5, -0.5), (7500, 0.5, 0.5), (10000, 0.25, 0.5))))
    rep = load_reproduce()
    args = rep.parse_args(["--recipe", "paper", "--tasks", "RepeatFirstEasy", "--models", "ffm",
                           "--batchings", "paper-tbb", "--seeds", "1", "--grid-dir",
                           str(tmp_path / "grid"), "--figure", str(tmp_path / "f.png"),
                           "--table", str(tmp_path / "t.md"), "--curves", str(tmp_path / "c.csv")])
    out, cmd = rep.command("RepeatFirstEasy", "ffm", "paper-tbb", 1, args)
    assert cmd is None  # never run by the grid
    official.main([str(log), "--episode-length", "51", "--out", out])
    (curve,) = rep.finished_curves(rep.record_curves(args)[0], "RepeatFirstEasy", "ffm",
                                   "paper-tbb", args)
    np.testing.assert_array_equal(curve["global_step"], [5001 * 51, 7500 * 51, 10000 * 51])
    np.testing.assert_array_equal(curve["updates"], [1, 2500, 5000])
    # Episodes of varying length (PositionOnlyCartPole): at the step of our run's same update.
    official.main([str(log), "--episode-length", "200", "--random-episode-length", "22",
                   "--out", str(tmp_path / "pocp")])
    np.testing.assert_array_equal(rep.read_curve(str(tmp_path / "pocp"))["global_step"],
                                  [5000 * 22 + 200 * u for u in (1, 2500, 5000)])
    rep.summarise(args)
    row = [c.strip() for c in (tmp_path / "t.md").read_text().splitlines()[2].split("|")[1:-1]]
    assert row[4].startswith("+0.250") and row[9].startswith("+0.500") and row[10] == "~1.0"


# =============================================================================================
# Stopping early, I/O errors, resource limits, checkpoints, and the README's commands
# =============================================================================================
SHORT = ["--total-timesteps", "400", "--learning-starts", "200", "--log-every", "400",
         "--eval-every", "400"]  # with TINY: one log line, after one train phase


def repeat_first_sizes():
    env = ffm.resolve_env("RepeatFirstEasy")[0]()
    return env.observation_space.shape[0], int(env.action_space.n)


def test_a_signal_ends_the_run_and_keeps_what_it_learned(tmp_path):
    """SIGINT to a TBB run and SIGTERM to an SBB run (FFM: the smoke test's SBB run is the
    linear transformer's), once training has begun: each ends at the next step with its last
    metrics row (finite, as its earlier ones), its plot and a params.npz that loads, exits 130."""
    jobs = {"int": (signal.SIGINT, "ffm_tbb_dqn.py", []),
            "term": (signal.SIGTERM, "sbb_baseline_dqn.py", ["--segment-length", "10"])}
    procs = {name: subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), *TINY, *TINY_MODEL["ffm"], *flags,
         "--total-timesteps", "100000000", "--save-model", "--output-dir", str(tmp_path / name)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        for name, (_, script, flags) in jobs.items()}
    for name, proc in procs.items():
        for line in proc.stdout:  # the first progress line comes after the first train phase
            if line.startswith("step"):
                break
        proc.send_signal(jobs[name][0])
    obs_dim, num_actions = repeat_first_sizes()
    args = ffm.parse_args([*TINY, *TINY_MODEL["ffm"]])
    template = jax.eval_shape(lambda k: ffm.init_params(k, obs_dim, num_actions, args),
                              jax.random.PRNGKey(0))
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, err
        (line,) = [line for line in out.splitlines() if line.startswith("interrupted at step")]
        step, run_dir = int(line.split()[3].rstrip(";").replace(",", "")), line.split(" in ")[1]
        rows = read_metrics(run_dir)
        assert int(rows[-1]["global_step"]) == step < 100_000_000
        assert np.isfinite(float(rows[-1]["eval_return"]))  # the step that stops also evaluates
        trained = [r for r in rows if r["td_loss"] != "nan"]  # rows with updates since the last
        assert trained and all(np.isfinite(float(r[k])) for r in trained for k in ("td_loss",
                                                                               "q_values"))
        assert os.path.isfile(os.path.join(run_dir, "learning_curve.png"))
        path = os.path.join(run_dir, "params.npz")
        ffm.load_params(template, path, ffm.checkpoint_meta(args, obs_dim, num_actions))
        assert json.loads(str(np.load(path)["__meta__"]))["script"] == "ffm_tbb_dqn.py"


def test_a_failing_plot_costs_a_warning_not_the_model(tmp_path, monkeypatch, capsys):
    def full_disk(run_dir, title):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ffm, "plot_learning_curve", full_disk)
    run_dir = ffm.train(ffm.parse_args([*TINY, *TINY_MODEL["ffm"], *SHORT, "--save-model",
                                        "--output-dir", str(tmp_path)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: no learning_curve.png"), lines
    assert sorted(os.listdir(run_dir)) == ["args.json", "metrics.csv", "params.npz"]
    obs_dim, num_actions = repeat_first_sizes()
    args = ffm.parse_args([*TINY_MODEL["ffm"], "--hidden-size", "32"])
    template = jax.eval_shape(lambda k: ffm.init_params(k, obs_dim, num_actions, args),
                              jax.random.PRNGKey(0))
    ffm.load_params(template, os.path.join(run_dir, "params.npz"),
                    ffm.checkpoint_meta(args, obs_dim, num_actions))


def test_params_npz_is_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """A write that fails half way (a full disk) leaves the earlier params.npz as it was."""
    path, params = tmp_path / "params.npz", net_params("ffm")
    ffm.save_params(params, str(path))
    before = path.read_bytes()

    def half_then_full(file, **arrays):  # a path (np.savez adds .npz) or an open file
        with open(file, "wb") if isinstance(file, str) else contextlib.nullcontext(file) as f:
            f.write(before[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ffm.np, "savez", half_then_full)
    with pytest.raises(SystemExit) as exit_info:
        ffm.save_params(params, str(path))
    assert exit_info.value.code == 1 and "No space left" in capsys.readouterr().err
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["params.npz"]


def test_a_full_disk_leaves_whole_metrics_rows(tmp_path):
    """A file size limit (RLIMIT_FSIZE: writes past it fail as on a full disk) that lets only
    part of a row through: one line, exit 1, and metrics.csv holds whole rows only."""
    code = f"""if True:
        import os, resource, signal, sys
        sys.path.insert(0, {HERE!r})
        import ffm_tbb_dqn as ffm
        run_dir, log = ffm.start_run(ffm.parse_args(["--output-dir", {str(tmp_path)!r}]))
        row = dict(step=100, episodes=1, updates=0, returns=[0.5], eval_return=0.5, epsilon=1.0,
                   metrics=[dict(td_loss=0.1, q_values=0.2, density=1.0)])
        log(**row)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails
        size = os.path.getsize(os.path.join(run_dir, "metrics.csv"))
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (size + 40, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        log(**row)  # about 80 bytes: 40 fit
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "cannot write" in lines[0], p.stderr
    (run_dir,) = os.listdir(tmp_path)
    with open(tmp_path / run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 2 and [len(r) for r in rows] == [11, 11]


@pytest.mark.parametrize("start_e, end_e", [(0.2, 0.01), (0.05, 0.5), (1.0, 1.0)])
def test_epsilon_is_one_then_linear_from_start_to_end(start_e, end_e):
    """epsilon_at's docstring: 1 before --learning-starts, then a straight line from --start-e
    to --end-e over --exploration-fraction of the remaining steps, then --end-e (either way)."""
    args = ffm.parse_args(["--total-timesteps", "1000", "--learning-starts", "200",
                           "--exploration-fraction", "0.5", "--start-e", str(start_e),
                           "--end-e", str(end_e)])
    for step in range(0, 1000, 7):
        expected = (1.0 if step < 200 else end_e if step >= 600
                    else start_e + (end_e - start_e) * (step - 200) / 400)
        assert ffm.epsilon_at(step, args) == pytest.approx(expected, abs=1e-12), step


def test_progress_line_says_dash_before_there_is_anything_to_show(tmp_path, capsys):
    _, log = ffm.start_run(ffm.parse_args(["--output-dir", str(tmp_path)]))
    nan = float("nan")
    log(step=100, episodes=0, updates=0, returns=[], eval_return=nan, epsilon=1.0, metrics=[])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "nan" not in line and "train return   -    | eval return   -    | loss    -" in line


@pytest.mark.parametrize("error", [
    jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 TiB"),
    ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 9 TiB"),  # a CPU's, as jax 0.10 has it
    MemoryError()])
def test_out_of_memory_while_running_is_one_line(error, tmp_path, capsys):
    script = sbb.load_script("ffm")  # a private copy, to make its tape raise

    def init_tape(capacity, obs_dim):
        raise error

    script.init_tape = init_tape
    with pytest.raises(SystemExit) as exit_info:
        script.train(script.parse_args([*TINY, *TINY_MODEL["ffm"], "--output-dir", str(tmp_path)]))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(lines) == 1 and "out of memory" in lines[0], lines


def test_checkpoints_say_what_differs(tmp_path, capsys):
    """Where a parameter does not fit, --load-model names all that differs: the script, the
    env and its sizes, the model flags; a file that fits loads."""
    obs_dim, num_actions = repeat_first_sizes()
    flags = [*TINY_MODEL["ffm"], "--hidden-size", "32"]
    args = ffm.parse_args(flags)
    path = str(tmp_path / "params.npz")
    params = ffm.init_params(jax.random.PRNGKey(0), obs_dim, num_actions, args)
    ffm.save_params(params, path, ffm.checkpoint_meta(args, obs_dim, num_actions))
    # Through a run (the file is checked before anything is made): another script
    with pytest.raises(SystemExit) as exit_info:
        lru.train(lru.parse_args(["--load-model", path, "--output-dir", str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "script ffm_tbb_dqn.py (this run: lru_tbb_dqn.py), --hidden-size 32 (this run: 256)" \
        in err and len(err.strip().splitlines()) == 1, err
    for env_id, actions, more, message in [
            ("CountRecallEasy", 27, flags, "it was made with --env-id RepeatFirstEasy (this run: "
                                           "CountRecallEasy), actions 4 (this run: 27)"),
            ("RepeatFirstEasy", num_actions, [], "it was made with --hidden-size 32 (this run: "
             "256), --trace-size 8 (this run: 64), --context-size 2 (this run: 4)")]:
        other = ffm.parse_args(["--env-id", env_id, *more])
        template = jax.eval_shape(lambda k: ffm.init_params(k, obs_dim, actions, other),
                                  jax.random.PRNGKey(0))
        with pytest.raises(SystemExit):
            ffm.load_params(template, path, ffm.checkpoint_meta(other, obs_dim, actions))
        assert message in capsys.readouterr().err
    # A flag that only starts the network may differ: the file loads
    other = ffm.parse_args([*flags, "--min-period", "2"])
    loaded = ffm.load_params(params, path, ffm.checkpoint_meta(other, obs_dim, num_actions))
    assert_tree_close(loaded, params, rtol=0, atol=0)


def test_sbb_sizes_follow_its_own_rule_not_tbbs(tmp_path, capsys):
    """SBB needs a batch of one segment and a ring of one episode's segments, not TBB's batch
    and tape of a whole episode: RepeatFirstEasy's 51 steps in batches of 2 segments of 10."""
    class Accepted(Exception):
        pass

    def start_run(*args, **kwargs):  # reached once every input is checked
        raise Accepted

    script = sbb.segment_script("ffm", 10)
    script.start_run = start_run
    flags = ["--batch-size", "20", "--segment-length", "10", "--output-dir", str(tmp_path)]
    with pytest.raises(Accepted):
        sbb.train(sbb.parse_args([*flags, "--buffer-size", "60"]), script)
    with pytest.raises(SystemExit):
        sbb.train(sbb.parse_args([*flags, "--buffer-size", "59"]), script)
    assert "--buffer-size 59 holds 5 segments of 10 steps" in capsys.readouterr().err


class Parsed(BaseException):
    """Raised where a script's parser has accepted its command line, so that nothing runs."""


def accept_and_stop(monkeypatch, script, flags):
    """Run `script flags` as `python` would, stopped once argparse has accepted the flags."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse_args(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *flags])
    monkeypatch.syspath_prepend(os.path.dirname(os.path.join(HERE, script)))
    ctrl_c = signal.getsignal(signal.SIGINT)  # a script run as __main__ takes it while starting
    try:
        with pytest.raises((Parsed, SystemExit)) as stopped:
            runpy.run_path(os.path.join(HERE, script), run_name="__main__")
    finally:
        signal.signal(signal.SIGINT, ctrl_c)
    return stopped.value


def readme_commands():
    """Every `python SCRIPT FLAGS` of the README's ```bash blocks, as (script, flags)."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), re.S | re.M)
    commands = []
    for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i in [i for i, w in enumerate(words) if w in ("python", "python3")]:
            command = words[i + 1:]
            command = command[:next((j for j, w in enumerate(command)
                                     if w in ("&&", "||", ";", "|", ">")), len(command))]
            if command and command[0] != "-m":  # python -m pytest, pip: not our scripts
                commands.append((command[0], command[1:]))
    return commands


@pytest.mark.parametrize("script,flags", readme_commands(),
                         ids=[" ".join([s, *f])[:80] for s, f in readme_commands()])
def test_readme_commands_are_accepted_as_written(script, flags, monkeypatch, capsys):
    """Each command in the README names a script that takes every flag it is given."""
    stopped = accept_and_stop(monkeypatch, script, flags)
    assert isinstance(stopped, Parsed) or stopped.code == 0, capsys.readouterr().err


def readme_debugger_line():
    """The README's one `python -m pdb` line, as (environment, script, flags)."""
    with open(os.path.join(HERE, "README.md")) as f:
        (line,) = [line for line in f.read().splitlines() if " -m pdb " in line]
    words = shlex.split(line, comments=True)
    at = words.index("python")
    assert words[at + 1:at + 3] == ["-m", "pdb"]
    return dict(w.split("=", 1) for w in words[:at]), words[at + 3], words[at + 4:]


def test_the_readme_debugger_line_runs_the_script_without_jit(tmp_path, monkeypatch):
    """The README's debugger line as written: pdb runs the script (as `python -m pdb` does,
    as __main__ with these flags) with jit off (JAX_DISABLE_JIT=1: read when jax starts, so
    jax.disable_jit here); a breakpoint in td_loss, which runs inside the jitted train phase,
    shows a real array; the run ends with finite metrics in ./runs."""
    env, script, flags = readme_debugger_line()
    assert env == {"JAX_DISABLE_JIT": "1"} and script == "ffm_tbb_dqn.py"
    path = os.path.join(HERE, script)
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines.count("    steps, start = batch") == 1  # td_loss's first line
    in_loss = lines.index("    steps, start = batch") + 1
    out = io.StringIO()
    debugger = pdb.Pdb(stdin=io.StringIO(f"tbreak {path}:{in_loss}\ncontinue\n"
                                         "p float(batch[0].reward.sum())\ncontinue\n"),
                       stdout=out, nosigint=True)
    monkeypatch.chdir(tmp_path)  # the run folder: ./runs, as for the reader
    monkeypatch.setattr(sys, "argv", [script, *flags])
    ctrl_c = signal.getsignal(signal.SIGINT)  # run as __main__, the script takes it
    try:
        with jax.disable_jit():
            debugger.runcall(runpy.run_path, path, run_name="__main__")
    finally:
        signal.signal(signal.SIGINT, ctrl_c)
    shown = out.getvalue().splitlines()
    at = next(i for i, line in enumerate(shown) if line.endswith("steps, start = batch"))
    float(shown[at + 1].removeprefix("(Pdb) "))  # a number: a tracer (jit on) prints an error
    (run_dir,) = (tmp_path / "runs").iterdir()
    (row,) = read_metrics(run_dir)  # one log line, at the end
    assert int(row["global_step"]) == int(flags[flags.index("--total-timesteps") + 1])
    assert int(row["updates"]) > 0
    assert all(np.isfinite(float(row[k])) for k in ("td_loss", "q_values", "eval_return"))


SCRIPTS = ["ffm_tbb_dqn.py", "lru_tbb_dqn.py", "linear_transformer_tbb_dqn.py",
           "sbb_baseline_dqn.py", "discounted_return_scan.py", "vml_analysis.py",
           *(f"benchmarks/{f}" for f in sorted(os.listdir(os.path.join(HERE, "benchmarks")))
             if f.endswith(".py"))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help(script, monkeypatch, capsys):
    stopped = accept_and_stop(monkeypatch, script, ["--help"])
    assert isinstance(stopped, SystemExit) and stopped.code == 0, capsys.readouterr().err
    assert "usage" in capsys.readouterr().out.lower() or script.endswith("ablations.py")


def test_returns_script_says_which_files_it_writes_and_replaces(tmp_path, monkeypatch, capsys):
    """--output-dir figures replaces the committed files: the script says so up front."""
    (tmp_path / "returns_timing.csv").write_text("old\n")
    monkeypatch.setattr(sys, "argv", ["discounted_return_scan.py", "--episode-lengths", "3",
                                      "--episode-counts", "2", "--repeats", "1",
                                      "--output-dir", str(tmp_path)])
    runpy.run_path(os.path.join(HERE, "discounted_return_scan.py"), run_name="__main__")
    out = capsys.readouterr().out
    csv_path, png = tmp_path / "returns_timing.csv", tmp_path / "returns_timing.png"
    assert f"writes {csv_path} and {png}, replacing {csv_path}\n" in out
    assert f"wrote {csv_path} and {png}, replacing {csv_path}\n" in out
