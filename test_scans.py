"""Tests for the memoroid scans, the tape buffer, the loss and the scripts.

Every check compares against an independent reference -- a plain Python/NumPy loop, a
per-episode run, a from-scratch recurrence -- never against the code under test itself.
Run: python -m pytest -q
"""

import collections
import csv
import importlib
import os
import subprocess
import sys

from functools import partial

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
    lax_scan_returns,
    numpy_loop_returns,
    parse_args as parse_returns_args,
    reset_return_op,
    return_op,
    sequential_scan,
)

HERE = os.path.dirname(os.path.abspath(__file__))
SCANS = ("associative", "sequential")


def episode_starts(lengths):
    start = np.zeros(sum(lengths), bool)
    start[np.cumsum([0] + list(lengths[:-1]))] = True
    return start


# ---------------------------------------------------------------------------------------------
# FFM memoroid
# ---------------------------------------------------------------------------------------------
# Jitted: one compile per shape instead of one per primitive (associative scans compile slowly).
ffm_scan_jit = jax.jit(ffm.resettable_scan, static_argnames="scan")
ffm_q_tape_jit = jax.jit(ffm.q_tape, static_argnames="scan")


def random_ffm_elements(rng, n, m=3, c=2):
    s = rng.normal(size=(n, m, c)) + 1j * rng.normal(size=(n, m, c))
    g = rng.uniform(0.5, 1.0, (n, m, c)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (n, m, c)))
    return jnp.asarray(s, jnp.complex64), jnp.asarray(g, jnp.complex64)


def take(elements, i):
    return jax.tree.map(lambda x: x[i], elements)


def assert_tree_close(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)






def ffm_loop(s, g, start):
    """FFM by its definition: S_t = S_{t-1} * g_t + s_t, restarted from 0 at every start."""
    s, g = np.asarray(s, np.complex128), np.asarray(g, np.complex128)
    trace, decay = np.zeros_like(s[0]), np.ones_like(g[0])
    out_s, out_g = [], []
    for t in range(len(s)):
        if start[t]:
            trace, decay = np.zeros_like(s[0]), np.ones_like(g[0])
        trace, decay = trace * g[t] + s[t], decay * g[t]
        out_s.append(trace)
        out_g.append(decay)
    return np.stack(out_s), np.stack(out_g)






# ---------------------------------------------------------------------------------------------
# FFM Q network: tape path vs recurrent step path, and no leakage across episodes
# ---------------------------------------------------------------------------------------------
FFM_FLAGS = ["--hidden-size", "16", "--trace-size", "4", "--context-size", "3", "--max-period", "16"]
OBS_DIM, NUM_ACTIONS = 5, 3


@pytest.fixture(scope="module")
def ffm_params():
    args = ffm.parse_args(FFM_FLAGS)
    return ffm.init_params(jax.random.PRNGKey(0), OBS_DIM, NUM_ACTIONS, args)


def random_tape_obs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    obs = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
    next_obs = np.roll(obs, -1, axis=0)  # within an episode next_obs[t] == obs[t+1]
    ends = np.cumsum(lengths) - 1
    next_obs[ends] = rng.normal(size=(len(lengths), OBS_DIM))  # the final observations
    return obs, next_obs, episode_starts(lengths)


def step_loop(model, params, obs, start):
    """Q values from the recurrent step path, one observation at a time (batch of 1 env)."""
    carry = model.initial_carry(params, 1)
    qs = []
    for t in range(len(obs)):
        q, carry = model.q_step(params, carry, jnp.asarray(obs[t : t + 1]), jnp.asarray(start[t : t + 1]))
        qs.append(np.asarray(q[0]))
    return np.stack(qs)




@pytest.mark.parametrize("scan", SCANS)
def test_ffm_no_gradient_across_episode_start(ffm_params, scan):
    lengths = [6, 5, 4]
    obs, next_obs, start = random_tape_obs(lengths, seed=1)
    first_end = lengths[0]
    for t in (first_end, first_end + 2, len(obs) - 1):  # outputs in later episodes

        def out(o, n):
            q, q_next = ffm_q_tape_jit(ffm_params, o, n, start, scan)
            return q[t].sum() + q_next[t].sum()

        g_obs, g_next = jax.jit(jax.grad(out, argnums=(0, 1)))(jnp.asarray(obs), jnp.asarray(next_obs))
        episode_begin = max(b for b in np.flatnonzero(start) if b <= t)
        assert np.all(np.asarray(g_obs[:episode_begin]) == 0.0)
        assert np.all(np.asarray(g_next[:t]) == 0.0)
        assert np.any(np.asarray(g_obs[episode_begin : t + 1]) != 0.0)  # the test can fail


# ---------------------------------------------------------------------------------------------
# Tape buffer
# ---------------------------------------------------------------------------------------------
def make_episode(ep_id, length, cap, obs_dim=2):
    """Fields padded to `cap`; every value encodes (episode id, step) so a test can check it."""
    t = np.arange(cap)
    obs = np.stack([np.full(cap, ep_id), t], 1).astype(np.float32)[:, :obs_dim]
    return (obs, (ep_id * 7 + t) % 5, ep_id + t / 1000.0, obs + 0.5,
            t == length - 1, np.zeros(cap, bool)), np.int32(length)


def check_sampled_tape(batch, stored, batch_size):
    """`stored` maps episode id -> length for every episode the reference buffer holds."""
    obs = np.asarray(batch.obs)
    start = np.asarray(batch.start)
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
        np.testing.assert_array_equal(np.asarray(batch.action)[run], (ep_id * 7 + np.arange(len(run))) % 5)
        np.testing.assert_allclose(np.asarray(batch.reward)[run], ep_id + np.arange(len(run)) / 1000.0)
        np.testing.assert_array_equal(np.asarray(batch.next_obs)[run], obs[run] + 0.5)
        np.testing.assert_array_equal(np.asarray(batch.terminated)[run], np.arange(len(run)) == stored[ep_id] - 1)


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


def test_tape_sampling_is_proportional_to_episode_length():
    capacity, cap = 64, 20
    tape = ffm.init_tape(capacity, 2)
    lengths = {0: 20, 1: 1, 2: 5, 3: 10, 4: 2}  # episode 4 is the newest
    for ep_id, n in lengths.items():
        tape = ffm.add_episode(tape, *make_episode(ep_id, n, cap))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    first = jax.vmap(lambda k: ffm.sample_tape(tape, k, 20).obs[0, 0])(keys)
    freq = np.bincount(np.asarray(first).astype(int), minlength=5) / len(keys)
    expect = np.array(list(lengths.values())) / sum(lengths.values())
    np.testing.assert_allclose(freq, expect, atol=0.025)


# ---------------------------------------------------------------------------------------------
# Double-DQN loss on a hand-built tape
# ---------------------------------------------------------------------------------------------
def test_double_dqn_targets_match_a_plain_loop(ffm_params):
    args = ffm.parse_args(FFM_FLAGS)
    online = ffm_params
    target = ffm.init_params(jax.random.PRNGKey(7), OBS_DIM, NUM_ACTIONS, args)
    lengths = [4, 3, 5]  # ends: terminated, truncated, cut by the tape's end (bootstraps)
    obs, next_obs, start = random_tape_obs(lengths, seed=3)
    n = len(obs)
    rng = np.random.default_rng(4)
    reward = rng.normal(size=n).astype(np.float32)
    action = rng.integers(0, NUM_ACTIONS, n).astype(np.int32)
    terminated = np.zeros(n, bool)
    truncated = np.zeros(n, bool)
    terminated[3] = True
    truncated[6] = True
    gamma = 0.9
    batch = ffm.Batch(*map(jnp.asarray, (obs, action, reward, next_obs, terminated, truncated, start)))

    # Plain loop: rebuild each episode prefix o_0..o_t, o_{t+1} and run the step path.
    expect_y, expect_q = [], []
    begin = 0
    for t in range(n):
        begin = t if start[t] else begin
        seq = np.concatenate([obs[begin : t + 1], next_obs[t : t + 1]])
        seq_start = episode_starts([len(seq)])
        q_online = step_loop(ffm, online, seq, seq_start)
        q_target = step_loop(ffm, target, seq, seq_start)[-1]
        bootstrap = 0.0 if terminated[t] else q_target[np.argmax(q_online[-1])]
        expect_y.append(reward[t] + gamma * bootstrap)
        expect_q.append(q_online[-2][action[t]])
    expect_y, expect_q = np.array(expect_y), np.array(expect_q)

    for scan in SCANS:
        _, q_next_online = ffm_q_tape_jit(online, obs, next_obs, start, scan)
        _, q_next_target = ffm_q_tape_jit(target, obs, next_obs, start, scan)
        y = ffm.td_targets(q_next_online, q_next_target, batch.reward, batch.terminated, gamma)
        np.testing.assert_allclose(np.asarray(y), expect_y, rtol=1e-5, atol=1e-5)
        loss, q_mean = ffm.td_loss(online, target, batch, gamma, scan)
        err = np.abs(expect_q - expect_y)
        huber = np.where(err < 1.0, 0.5 * err**2, err - 0.5)
        np.testing.assert_allclose(float(loss), huber.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(q_mean), expect_q.mean(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# LRU (lru_tbb_dqn.py)
# ---------------------------------------------------------------------------------------------
# Jitted: one compile per shape instead of one per primitive, which halves the test time.
lru_scan_jit = jax.jit(lru.resettable_scan, static_argnames="scan")
lru_q_tape_jit = jax.jit(lru.q_tape, static_argnames="scan")


def random_lru_elements(rng, n, m=4):
    """Random (A, b): decays inside the unit disc, states anywhere."""
    a = rng.uniform(0.5, 1.0, (n, m)) * np.exp(1j * rng.uniform(-np.pi, np.pi, (n, m)))
    b = rng.normal(size=(n, m)) + 1j * rng.normal(size=(n, m))
    return jnp.asarray(a, jnp.complex64), jnp.asarray(b, jnp.complex64)






def lru_loop(a, b, start):
    """The recurrence by its definition: h_t = A_t h_{t-1} + b_t (and the decay so far
    P_t = A_t P_{t-1}), restarted from h = 0, P = 1 at every start."""
    a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
    decay, h = np.ones_like(a[0]), np.zeros_like(b[0])
    out_a, out_h = [], []
    for t in range(len(a)):
        if start[t]:
            decay, h = np.ones_like(a[0]), np.zeros_like(b[0])
        decay, h = a[t] * decay, a[t] * h + b[t]
        out_a.append(decay)
        out_h.append(h)
    return np.stack(out_a), np.stack(out_h)






# ---------------------------------------------------------------------------------------------
# LRU Q network: ring initialisation, a NumPy reference, tape path vs step path, no leakage
# ---------------------------------------------------------------------------------------------
LRU_FLAGS = ["--hidden-size", "16", "--state-size", "64", "--num-layers", "2"]


@pytest.fixture(scope="module")
def lru_params():
    args = lru.parse_args(LRU_FLAGS)
    return jax.jit(lambda k: lru.init_params(k, OBS_DIM, NUM_ACTIONS, args))(jax.random.PRNGKey(0))


def test_lru_ring_initialisation(lru_params):
    args = lru.parse_args(LRU_FLAGS)
    r_min, r_max, max_phase = args.r_min, args.r_max, args.max_phase
    nu = np.concatenate([np.float64(p["nu_log"]) for p in lru_params["lru"]])
    theta = np.concatenate([np.float64(p["theta_log"]) for p in lru_params["lru"]])
    gamma = np.concatenate([np.exp(np.float64(p["gamma_log"])) for p in lru_params["lru"]])
    lam = np.exp(-np.exp(nu) + 1j * np.exp(theta))
    radius, phase = np.abs(lam), np.angle(lam)
    assert np.all((radius >= r_min - 1e-6) & (radius <= r_max + 1e-6))
    assert np.all((phase >= 0) & (phase <= max_phase + 1e-6))
    # |lambda|^2 uniform on [r_min^2, r_max^2], phase uniform on [0, max_phase]: 128 draws,
    # tolerances ~4 standard errors of the mean
    np.testing.assert_allclose(np.mean(radius**2), (r_min**2 + r_max**2) / 2, atol=0.02)
    np.testing.assert_allclose(np.mean(phase), max_phase / 2, atol=0.03)
    np.testing.assert_allclose(gamma, np.sqrt(1 - radius**2), rtol=1e-4)


def numpy_q(params, obs, start):
    """Q values of the whole network in float64 NumPy, each LRU as the plain loop
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

    x = leaky(ln(p["embed_ln"], lin(p["embed"], obs)))
    for blk in p["lru"]:
        n = blk["nu_log"].size
        lam = np.exp(-np.exp(blk["nu_log"]) + 1j * np.exp(blk["theta_log"]))
        gamma = np.exp(blk["gamma_log"])
        b_mat = blk["B"][:, :n] + 1j * blk["B"][:, n:]  # [H, N]: u @ B
        c_mat = blk["C"][:n] - 1j * blk["C"][n:]  # [N, H]: Re(h @ C)
        out = np.empty_like(x)
        h = np.zeros(n, complex)
        for t in range(len(x)):
            if start[t]:
                h = np.zeros(n, complex)
            u = ln(blk["norm"], x[t])
            h = lam * h + gamma * (u @ b_mat)
            y = (h @ c_mat).real + blk["D"] * u
            value, gate = np.split(lin(blk["glu"], gelu(y)), 2)
            out[t] = x[t] + value / (1 + np.exp(-gate))
        x = out
    hidden = leaky(lin(p["head"]["hidden"], x))
    adv = lin(p["head"]["advantage"], hidden)
    return lin(p["head"]["value"], hidden) + adv - adv.mean(-1, keepdims=True)


@pytest.mark.parametrize("scan", SCANS)
def test_lru_q_tape_equals_numpy_loop(lru_params, scan):
    obs, next_obs, start = random_tape_obs([7, 1, 12], seed=2)
    q, q_next = lru_q_tape_jit(lru_params, obs, next_obs, start, scan)
    np.testing.assert_allclose(np.asarray(q), numpy_q(lru_params, obs, start), rtol=1e-4, atol=1e-4)
    # the last step's next observation, run as one more step of the last episode
    last = numpy_q(lru_params, np.concatenate([obs, next_obs[-1:]]), np.append(start, False))[-1]
    np.testing.assert_allclose(np.asarray(q_next[-1]), last, rtol=1e-4, atol=1e-4)




@pytest.mark.parametrize("scan", SCANS)
def test_lru_no_gradient_across_episode_start(lru_params, scan):
    lengths = [6, 5, 4]
    obs, next_obs, start = random_tape_obs(lengths, seed=1)
    later = np.array([lengths[0], lengths[0] + 2, len(obs) - 1])  # outputs in later episodes

    def out(o, n):
        q, q_next = lru.q_tape(lru_params, o, n, start, scan)
        return q[later].sum(-1) + q_next[later].sum(-1)

    # one compile for the gradients of all three outputs
    g_obs, g_next = jax.jit(jax.jacrev(out, argnums=(0, 1)))(jnp.asarray(obs), jnp.asarray(next_obs))
    for i, t in enumerate(later):
        episode_begin = max(b for b in np.flatnonzero(start) if b <= t)
        assert np.all(np.asarray(g_obs[i, :episode_begin]) == 0.0)
        assert np.all(np.asarray(g_next[i, :t]) == 0.0)
        assert np.any(np.asarray(g_obs[i, episode_begin : t + 1]) != 0.0)  # the test can fail


@pytest.mark.parametrize("flags", [["--r-min", "0.95", "--r-max", "0.9"], ["--r-max", "1.0"],
                                   ["--r-min", "-0.1"], ["--max-phase", "0"], ["--num-layers", "0"],
                                   ["--state-size", "0"]])
def test_lru_bad_model_flags(flags):
    with pytest.raises(lru.UsageError):
        lru.parse_args(flags)


# ---------------------------------------------------------------------------------------------
# Linear Transformer (linear_transformer_tbb_dqn.py)
# ---------------------------------------------------------------------------------------------
# Jitted once per shape: eager associative scans dispatch (and compile) op by op, ~4x slower.
lt_scan_jit = jax.jit(lt.resettable_scan, static_argnames="scan")
lt_q_tape_jit = jax.jit(lt.q_tape, static_argnames="scan")


def random_lt_elements(rng, n, heads=2, k=3, v=4):
    """Elements (phi(k) v^T, phi(k)) as the input map makes them: z > 0, S of any sign."""
    z = rng.uniform(0.1, 2.0, (n, heads, k))
    s = z[..., None] * rng.normal(size=(n, heads, 1, v))
    return jnp.asarray(s, jnp.float32), jnp.asarray(z, jnp.float32)






def lt_loop(s, z, start):
    """Linear attention's recurrence: S_t = S_{t-1} + s_t, z_t = z_{t-1} + z_t', restarted at 0."""
    s, z = np.asarray(s, np.float64), np.asarray(z, np.float64)
    total_s, total_z = np.zeros_like(s[0]), np.zeros_like(z[0])
    out_s, out_z = [], []
    for t in range(len(s)):
        if start[t]:
            total_s, total_z = np.zeros_like(s[0]), np.zeros_like(z[0])
        total_s, total_z = total_s + s[t], total_z + z[t]
        out_s.append(total_s)
        out_z.append(total_z)
    return np.stack(out_s), np.stack(out_z)






# ---------------------------------------------------------------------------------------------
# Attention output: the scanned memory against causal attention written out, per episode
# ---------------------------------------------------------------------------------------------
LT_FLAGS = ["--hidden-size", "16", "--key-size", "3", "--value-size", "4", "--num-heads", "2"]


def lt_params(num_heads=2, seed=0):
    args = lt.parse_args(LT_FLAGS + ["--num-heads", str(num_heads)])
    return lt.init_params(jax.random.PRNGKey(seed), OBS_DIM, NUM_ACTIONS, args)


@pytest.fixture(scope="module")
def lt_fixture_params():
    return lt_params()


def np_phi(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def causal_attention_loop(p, h, start, eps=1e-6):
    """out_t = sum_{s<=t, same episode} (phi(q_t).phi(k_s)) v_s / (sum_s phi(q_t).phi(k_s) + eps),
    softmax-free causal attention over each episode, written out pair by pair."""
    h = np.asarray(h, np.float64)
    proj = {n: np.tensordot(h, np.asarray(p[n]["w"], np.float64), axes=1) + np.asarray(p[n]["b"])
            for n in ("query", "key", "value")}
    q, k, v = np_phi(proj["query"]), np_phi(proj["key"]), proj["value"]
    heads, n_out = v.shape[1], v.shape[2]
    out = np.zeros((len(h), heads, n_out))
    begin = 0
    for t in range(len(h)):
        begin = t if start[t] else begin
        for head in range(heads):
            num, den = np.zeros(n_out), 0.0
            for s in range(begin, t + 1):
                w = float(q[t, head] @ k[s, head])
                num += w * v[s, head]
                den += w
            out[t, head] = num / (den + eps)
    return out.reshape(len(h), -1)


@pytest.mark.parametrize("num_heads", [1, 2])
@pytest.mark.parametrize("scan", SCANS)
def test_lt_attention_equals_causal_attention_per_episode(num_heads, scan):
    p = lt_params(num_heads, seed=num_heads)
    lengths = [5, 1, 9, 3, 1, 12]  # the tape of test_lt_scan_over_concatenated_episodes: one compile
    obs, next_obs, start = random_tape_obs(lengths, seed=5)
    h = lt.embed(p, jnp.asarray(obs))
    states = lt_scan_jit(lt.input_map(p, h), jnp.asarray(start), scan=scan)
    np.testing.assert_allclose(np.asarray(lt.attention(p, states, h)),
                               causal_attention_loop(p["attention"], h, start), rtol=1e-5, atol=1e-5)
    # The q_next path: the prefix state after o_t plus o_{t+1}'s element, queried by o_{t+1}.
    h_next = lt.embed(p, jnp.asarray(next_obs))
    a_next = np.asarray(lt.attention(p, lt.monoid_op(states, lt.input_map(p, h_next)), h_next))
    h, h_next = np.asarray(h), np.asarray(h_next)  # NumPy slices: no compile per slice shape
    begin = 0
    for t in range(len(obs)):
        begin = t if start[t] else begin
        seq = np.concatenate([h[begin : t + 1], h_next[t : t + 1]])
        expect = causal_attention_loop(p["attention"], seq, episode_starts([len(seq)]))[-1]
        np.testing.assert_allclose(a_next[t], expect, rtol=1e-5, atol=1e-5)


def test_lt_normaliser_is_the_dot_product_of_query_features_and_z():
    """phi(q)^T S / (phi(q) . z): a hand-made state where (sum z)(sum phi(q)) differs."""
    p = lt_params(num_heads=2)
    p["attention"]["query"] = {"w": jnp.zeros((16, 2, 2)),
                               "b": jnp.array([[0.0, 1.0], [1.0, 0.0]])}  # phi(q): [1, 2], [2, 1]
    s = jnp.array([[[1.0, 2.0], [3.0, 4.0]], [[2.0, 0.0], [0.0, 3.0]]])  # [heads, key, value]
    z = jnp.array([[3.0, 0.5], [1.0, 4.0]])  # [heads, key]
    out = np.asarray(lt.attention(p, (s, z), jnp.zeros(16)))
    # head 0: [1*1 + 2*3, 1*2 + 2*4] / (1*3 + 2*0.5);  head 1: [2*2, 1*3] / (2*1 + 1*4)
    expect = np.array([7.0 / 4.0, 10.0 / 4.0, 4.0 / 6.0, 3.0 / 6.0])
    np.testing.assert_allclose(out, expect, rtol=1e-5)
    wrong = np.array([7.0, 10.0, 4.0, 3.0]) / np.array([3.5 * 3, 3.5 * 3, 5 * 3, 5 * 3])
    assert not np.allclose(out, wrong, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# Linear Transformer Q network: tape path vs recurrent step path, and no leakage across episodes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", SCANS)
def test_lt_no_gradient_across_episode_start(lt_fixture_params, scan):
    lengths = [6, 5, 4]
    obs, next_obs, start = random_tape_obs(lengths, seed=1)
    first_end = lengths[0]

    @jax.jit
    @partial(jax.grad, argnums=(0, 1))
    def grad_of_output(o, n, t):
        q, q_next = lt.q_tape(lt_fixture_params, o, n, start, scan)
        return q[t].sum() + q_next[t].sum()

    for t in (first_end, first_end + 2, len(obs) - 1):  # outputs in later episodes
        g_obs, g_next = grad_of_output(jnp.asarray(obs), jnp.asarray(next_obs), t)
        episode_begin = max(b for b in np.flatnonzero(start) if b <= t)
        assert np.all(np.asarray(g_obs[:episode_begin]) == 0.0)
        assert np.all(np.asarray(g_next[:t]) == 0.0)
        assert np.any(np.asarray(g_obs[episode_begin : t + 1]) != 0.0)  # the test can fail


# ---------------------------------------------------------------------------------------------
# The script: flags and a smoke run
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--hidden-size", "--key-size", "--value-size", "--num-heads"])
def test_lt_model_flags_must_be_positive(flag):
    with pytest.raises(lt.UsageError, match=f"{flag} must be positive"):
        lt.parse_args([flag, "0"])


# ---------------------------------------------------------------------------------------------
# The monoid laws, for each memoroid
# ---------------------------------------------------------------------------------------------
# model -> (module, random elements, the model's recurrence as a plain loop, jitted scan)
MEMOROIDS = {"ffm": (ffm, random_ffm_elements, ffm_loop, ffm_scan_jit),
             "lru": (lru, random_lru_elements, lru_loop, lru_scan_jit),
             "linear_transformer": (lt, random_lt_elements, lt_loop, lt_scan_jit)}


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
    # == a plain loop
    assert_tree_close(states, loop(*x, start))
    # == each episode scanned alone from the identity
    begin = 0
    for n in lengths:
        part = take(x, slice(begin, begin + n))
        alone = scan_jit(part, jnp.zeros(n, bool), scan=scan)
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


# model -> (module, its params fixture, jitted q_tape)
NETWORKS = {"ffm": (ffm, "ffm_params", ffm_q_tape_jit), "lru": (lru, "lru_params", lru_q_tape_jit),
            "linear_transformer": (lt, "lt_fixture_params", lt_q_tape_jit)}


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("model", NETWORKS)
def test_step_path_equals_tape_path(model, scan, request):
    module, fixture, q_tape_jit = NETWORKS[model]
    params = request.getfixturevalue(fixture)
    lengths = [7, 1, 12]
    obs, next_obs, start = random_tape_obs(lengths)
    q, q_next = q_tape_jit(params, obs, next_obs, start, scan=scan)
    np.testing.assert_allclose(np.asarray(q), step_loop(module, params, obs, start), rtol=1e-5, atol=1e-5)
    # Q(o_0..o_t, o_{t+1}) == the step path run over the episode with next_obs[t] appended
    ends = set(np.cumsum(lengths) - 1)
    begin = 0
    for t in range(len(obs)):
        begin = t if start[t] else begin
        seq = np.concatenate([obs[begin : t + 1], next_obs[t : t + 1]])
        expect = step_loop(module, params, seq, episode_starts([len(seq)]))[-1]
        np.testing.assert_allclose(np.asarray(q_next[t]), expect, rtol=1e-5, atol=1e-5)
        if t not in ends:  # inside an episode the next observation is the next tape entry
            np.testing.assert_allclose(np.asarray(q_next[t]), np.asarray(q[t + 1]), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The scripts: smoke runs, determinism, checkpoints, error paths
# ---------------------------------------------------------------------------------------------
TINY = ["--total-timesteps", "3000", "--learning-starts", "1000", "--num-envs", "4",
        "--batch-size", "128", "--buffer-size", "2000", "--train-frequency", "200",
        "--updates-per-train", "2", "--eval-every", "1000", "--eval-episodes", "4",
        "--log-every", "1000", "--hidden-size", "32"]
TINY_MODEL = {"ffm_tbb_dqn.py": ["--trace-size", "8", "--context-size", "2"],
              "lru_tbb_dqn.py": ["--state-size", "8", "--num-layers", "2"],
              "linear_transformer_tbb_dqn.py": ["--key-size", "4", "--value-size", "4", "--num-heads", "2"]}
TIMING = {"sps", "elapsed_s"}


def run_script(script, *flags):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *flags],
                          capture_output=True, text=True, cwd=HERE, timeout=600)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("script", sorted(TINY_MODEL))
def test_smoke_run_is_finite_and_deterministic(script, tmp_path):
    # The loop is shared text (see the next test), so one script's second run checks seeding.
    runs = []
    for name in ("a", "b") if script == "ffm_tbb_dqn.py" else ("a",):
        out = tmp_path / name
        p = run_script(script, *TINY, *TINY_MODEL[script], "--output-dir", str(out), "--save-model")
        assert p.returncode == 0, p.stderr
        (run_dir,) = [os.path.join(out, d) for d in os.listdir(out)]
        for f in ("args.json", "metrics.csv", "learning_curve.png", "params.npz"):
            assert os.path.isfile(os.path.join(run_dir, f)), f
        rows = read_metrics(run_dir)
        assert len(rows) == 3 and int(rows[-1]["global_step"]) == 3000
        assert all(np.isfinite(float(r[k])) for r in rows for k in ("td_loss", "eval_return", "q_values"))
        runs.append([{k: v for k, v in r.items() if k not in TIMING} for r in rows])
    assert runs[0] == runs[-1], "same --seed gave different metrics"


def test_params_round_trip_through_npz(ffm_params, tmp_path):
    path = str(tmp_path / "params.npz")
    ffm.save_params(ffm_params, path)
    zeros = jax.tree.map(jnp.zeros_like, ffm_params)
    loaded = ffm.load_params(zeros, path)
    assert_tree_close(loaded, ffm_params, rtol=0, atol=0)
    other = ffm.init_params(jax.random.PRNGKey(0), OBS_DIM + 1, NUM_ACTIONS, ffm.parse_args(FFM_FLAGS))
    with pytest.raises(ffm.UsageError):
        ffm.load_params(other, path)


TBB_SCRIPTS = ("ffm_tbb_dqn.py", "lru_tbb_dqn.py", "linear_transformer_tbb_dqn.py")


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


@pytest.mark.parametrize("script", TBB_SCRIPTS[1:])
def test_shared_blocks_are_identical_across_scripts(script):
    """Tape buffer, loss, loop, environments, outputs and CLI are one text in every script."""
    reference = shared_blocks(TBB_SCRIPTS[0])
    assert set(reference) == {"command line", "tape buffer", "loss", "training loop",
                              "environments", "outputs", "main"}
    blocks = shared_blocks(script)
    assert set(blocks) == set(reference)
    for name, text in reference.items():
        assert blocks[name] == text, f"{script}: shared block {name!r} drifted from {TBB_SCRIPTS[0]}"


BAD_INPUT = [
    (["--env-id", "RepeatFirstEsy"], "unknown env id", 2),
    (["--env-id", "PositionOnlyPendulumEasy"], "discrete action space", 2),
    (["--batch-size", "0"], "--batch-size must be positive", 2),
    (["--batch-size", "20"], "smaller than the longest episode", 2),
    (["--buffer-size", "50"], "smaller than the longest episode", 2),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]", 2),
    (["--load-model", "missing.npz"], "no such file", 2),
    (["--learning-rate", "1e30", *TINY], "non-finite", 1),
]


@pytest.mark.parametrize("flags,message,code", BAD_INPUT, ids=[b[1] for b in BAD_INPUT])
def test_bad_input_is_one_clear_line(flags, message, code, tmp_path, capsys):
    # In-process (no new interpreter per case); the next test checks one case end to end.
    with pytest.raises(SystemExit) as exit_info:
        ffm.run([*flags, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_bad_input_exit_code_from_the_shell(tmp_path):
    p = run_script("ffm_tbb_dqn.py", "--env-id", "NoSuchEnv", "--output-dir", str(tmp_path))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "unknown env id" in p.stderr


# ---------------------------------------------------------------------------------------------
# sbb_baseline_dqn.py: the Segment-Based Batching baseline
# ---------------------------------------------------------------------------------------------
SBB_MODEL_FLAGS = ["--hidden-size", "16", "--trace-size", "4", "--context-size", "3",
                   "--max-period", "16", "--state-size", "4", "--num-layers", "2",
                   "--key-size", "4", "--value-size", "3", "--num-heads", "2"]
TBB_MODULES = {"ffm": "ffm_tbb_dqn", "lru": "lru_tbb_dqn",
               "linear_transformer": "linear_transformer_tbb_dqn"}
MEMORY_NAMES = tuple(sbb.MEMORIES)


def sbb_args(memory, *flags):
    return sbb.parse_args(["--memory", memory, *SBB_MODEL_FLAGS, *flags])


def sbb_init(memory, seed):
    args = sbb_args(memory)
    return jax.jit(lambda k: sbb.init_params(k, OBS_DIM, NUM_ACTIONS, args))(jax.random.PRNGKey(seed))


@pytest.fixture(scope="module")
def sbb_params():
    return {m: sbb_init(m, 0) for m in MEMORY_NAMES}


sbb_q_tape_jit = jax.jit(sbb.q_tape, static_argnums=4)
sbb_q_segments_jit = jax.jit(sbb.q_segments, static_argnums=3)


def tbb_module(memory):
    """The TBB script of this memory, or a skip while its file does not exist yet."""
    name = TBB_MODULES[memory]
    if not os.path.exists(os.path.join(HERE, name + ".py")):
        pytest.skip(f"{name}.py does not exist yet")
    return importlib.import_module(name)


# ---------------------------------------------------------------------------------------------
# The memories are the TBB scripts' memories: same params from the same key, same Q values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", MEMORY_NAMES)
def test_memory_math_equals_the_tbb_script(memory, sbb_params):
    tbb = tbb_module(memory)
    # The TBB parser knows only its own model's flags; the shared ones mean the same there.
    tbb_flags = {"ffm": SBB_MODEL_FLAGS[:8], "lru": SBB_MODEL_FLAGS[:2] + SBB_MODEL_FLAGS[8:12],
                 "linear_transformer": SBB_MODEL_FLAGS[:2] + SBB_MODEL_FLAGS[12:]}[memory]
    tbb_args = tbb.parse_args(tbb_flags)
    tbb_params = jax.jit(lambda k: tbb.init_params(k, OBS_DIM, NUM_ACTIONS, tbb_args))(jax.random.PRNGKey(0))
    params = sbb_params[memory]
    assert jax.tree.structure(params) == jax.tree.structure(tbb_params)
    assert_tree_close(params, tbb_params, rtol=1e-6, atol=1e-7)  # both jitted: equal to rounding
    lengths = [9, 4]
    obs, next_obs, start = random_tape_obs(lengths, seed=5)
    for scan in ("sequential", "associative"):
        assert_tree_close(sbb_q_tape_jit(params, obs, next_obs, start, scan),
                          jax.jit(tbb.q_tape, static_argnums=4)(params, obs, next_obs, start, scan))
    # A segment is its episode's steps k..k+L-1 run from the identity, i.e. TBB on that slice.
    L = 4
    seg_obs, seg_next = obs[5:9].reshape(1, L, OBS_DIM), next_obs[5:9].reshape(1, L, OBS_DIM)
    q, q_next = sbb_q_segments_jit(params, seg_obs, seg_next, "sequential")
    expect = jax.jit(tbb.q_tape, static_argnums=4)(params, obs[5:9], next_obs[5:9],
                                                     episode_starts([L]), "sequential")
    assert_tree_close((q[0], q_next[0]), expect)
    # And the acting path is the TBB acting path.
    q_loop = step_loop(sbb, params, obs, start)
    np.testing.assert_allclose(q_loop, step_loop(tbb, params, obs, start), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", MEMORY_NAMES)
def test_ops_are_associative_with_identity(memory):
    m = sbb.MEMORIES[memory]
    rng = np.random.default_rng(0)
    x = tuple(jnp.asarray(rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4)), jnp.complex64)
              for _ in range(2))
    a, b, c = (jax.tree.map(lambda v, i=i: v[i], x) for i in range(3))
    assert_tree_close(m.monoid_op(m.monoid_op(a, b), c), m.monoid_op(a, m.monoid_op(b, c)))
    e = m.identity_like(a)
    assert_tree_close(m.monoid_op(e, a), a, rtol=0, atol=0)
    assert_tree_close(m.monoid_op(a, e), a, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# The segment buffer
# ---------------------------------------------------------------------------------------------
def tagged_episode(ep_id, length, cap, obs_dim=2, junk=9.0):
    """Fields padded to `cap` with junk (as stale staging rows are); every real value encodes
    (episode id, step)."""
    t = np.arange(cap)
    real = t < length
    obs = np.where(real[:, None], np.stack([np.full(cap, ep_id), t], 1), junk).astype(np.float32)
    return (obs, np.where(real, (ep_id * 7 + t) % 5 + 1, 3), np.where(real, ep_id + t / 1000.0, junk).astype(np.float32),
            np.where(real[:, None], obs + 0.5, junk), real & (t == length - 1), np.where(real, False, True))


def python_split(episode, length, L):
    """Plain Python: the segments of one episode, each a dict of [L] lists, padded with 0."""
    segments = []
    for begin in range(0, length, L):
        seg = {"mask": [begin + i < length for i in range(L)]}
        for name, field in zip(sbb.Batch._fields[:6], episode):
            seg[name] = [field[begin + i] if begin + i < length else np.zeros_like(field[0])
                         for i in range(L)]
        segments.append(seg)
    return segments


def assert_segment(buffer, slot, expect):
    for name, values in expect.items():
        np.testing.assert_array_equal(np.asarray(getattr(buffer, name)[slot]), np.array(values), err_msg=name)


@pytest.mark.parametrize("L", [1, 4, 13, 20])
def test_segments_and_masks_reconstruct_each_episode(L):
    cap, capacity = 13, 60 // L
    buffer = sbb.init_segments(capacity, L, 2)
    reference = collections.deque(maxlen=capacity)  # (episode id, k, segment), oldest first
    episodes = {}
    rng = np.random.default_rng(L)
    for ep_id in range(40):  # several trips around the ring
        length = int(rng.integers(1, cap + 1))
        episode = tagged_episode(ep_id, length, cap)
        episodes[ep_id] = (episode, length)
        buffer = sbb.add_episode(buffer, episode, np.int32(length))
        for k, seg in enumerate(python_split(episode, length, L)):
            reference.append((ep_id, k, seg))
        assert int(buffer.size) == len(reference)
    # Every stored segment equals the plain split, in ring order (the oldest overwritten).
    oldest = (int(buffer.next) - int(buffer.size)) % capacity
    for i, (_, _, seg) in enumerate(reference):
        assert_segment(buffer, (oldest + i) % capacity, seg)
    # Concatenating an episode's segments and dropping mask-0 steps gives the episode back.
    by_episode = collections.defaultdict(list)
    for i, (ep_id, k, _) in enumerate(reference):
        by_episode[ep_id].append((k, (oldest + i) % capacity))
    mask = np.asarray(buffer.mask)
    for ep_id, slots in by_episode.items():
        episode, length = episodes[ep_id]
        ks = [k for k, _ in slots]
        if ks[0] != 0:  # partly overwritten: only its last segments remain
            continue
        assert ks == list(range(-(-length // L)))
        rows = [s for _, s in slots]
        keep = mask[rows].reshape(-1)
        assert keep.sum() == length and keep[:length].all()  # padding only at the end
        for name, field in zip(sbb.Batch._fields[:6], episode):
            stored = np.asarray(getattr(buffer, name))[rows]
            stored = stored.reshape((-1,) + stored.shape[2:])
            np.testing.assert_array_equal(stored[keep], np.asarray(field)[:length].astype(stored.dtype))
            assert not stored[~keep].any(), f"{name}: padding is not zero"
    # Sampled segments are stored segments (rows of the ring), drawn among the stored ones.
    batch = jax.jit(sbb.sample_segments, static_argnums=2)(buffer, jax.random.PRNGKey(0), 50)
    assert batch.obs.shape == (50, L, 2) and bool(batch.mask[:, 0].all())
    stored = {np.asarray(buffer.obs[s]).tobytes() for s in range(capacity)}
    assert all(np.asarray(o).tobytes() in stored for o in batch.obs)


def test_sampling_is_uniform_over_stored_segments():
    L, capacity = 5, 10
    buffer = sbb.init_segments(capacity, L, 2)
    for ep_id, length in enumerate([12, 3, 5]):  # 3 + 1 + 1 = 5 segments, the ring half full
        buffer = sbb.add_episode(buffer, tagged_episode(ep_id, length, 13), np.int32(length))
    batch = sbb.sample_segments(buffer, jax.random.PRNGKey(0), 20000)
    key = np.asarray(batch.obs[:, 0, 0]) * 100 + np.asarray(batch.obs[:, 0, 1])  # (episode, first step)
    values, counts = np.unique(key, return_counts=True)
    assert set(values) == {0, 5, 10, 100, 200}
    np.testing.assert_allclose(counts / counts.sum(), 0.2, atol=0.02)


# ---------------------------------------------------------------------------------------------
# The masked loss
# ---------------------------------------------------------------------------------------------
def sbb_random_batch(lengths, L, seed=0):
    """The segments of episodes of the given lengths (each episode's own split), as a Batch."""
    rng = np.random.default_rng(seed)
    segments = []
    for ep_id, length in enumerate(lengths):
        obs = rng.normal(size=(length, OBS_DIM)).astype(np.float32)
        next_obs = np.concatenate([obs[1:], rng.normal(size=(1, OBS_DIM))]).astype(np.float32)
        term = np.arange(length) == length - 1
        episode = (obs, rng.integers(0, NUM_ACTIONS, length), rng.normal(size=length).astype(np.float32),
                   next_obs, term & (ep_id % 2 == 0), term & (ep_id % 2 == 1))
        fields, mask = sbb.split_episode(episode, length, L)
        segments.append((fields, mask))
    cat = lambda i: jnp.concatenate([f[i] for f, _ in segments])  # noqa: E731
    return sbb.Batch(*(cat(i) for i in range(6)), jnp.concatenate([m for _, m in segments]))


def sbb_loss_and_grads(params, target, batch, scan="sequential"):
    return jax.jit(jax.value_and_grad(sbb.td_loss, has_aux=True), static_argnums=(3, 4))(
        params, target, batch, 0.9, scan)


@pytest.mark.parametrize("memory", ["lru"])  # the masking is the same code for every memory
def test_padded_steps_cannot_change_loss_or_gradients(memory, sbb_params):
    params = sbb_params[memory]
    target = sbb_init(memory, 3)
    batch = sbb_random_batch([7, 3, 10], L=4)
    pad = ~np.asarray(batch.mask)
    assert pad.any() and np.asarray(batch.mask)[:, 0].all()
    for name in ("obs", "next_obs", "reward", "action", "terminated", "truncated"):
        assert not np.asarray(getattr(batch, name))[pad].any(), f"padded {name} is not 0"
    (loss, q), grads = sbb_loss_and_grads(params, target, batch)
    rng = np.random.default_rng(1)
    noise = lambda x, scale: jnp.where(  # noqa: E731
        jnp.asarray(pad).reshape(pad.shape + (1,) * (x.ndim - 2)),
        jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype), x)
    perturbed = batch._replace(obs=noise(batch.obs, 100.0), next_obs=noise(batch.next_obs, 100.0),
                               reward=noise(batch.reward, 1e3),
                               action=jnp.where(pad, NUM_ACTIONS - 1, batch.action),
                               terminated=jnp.where(pad, True, batch.terminated))
    (loss2, q2), grads2 = sbb_loss_and_grads(params, target, perturbed)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(q2), float(q), rtol=1e-6, atol=1e-7)
    assert_tree_close(grads2, grads, rtol=1e-6, atol=1e-7)


def test_masked_loss_equals_tbb_loss_on_the_unpadded_steps(sbb_params):
    """SBB's loss == the (independently tested) TBB loss on a tape of the same real steps, with
    an episode start at every segment start."""
    tbb = tbb_module("ffm")
    params = sbb_params["ffm"]
    target = sbb_init("ffm", 3)
    L = 4
    batch = sbb_random_batch([7, 3, 10], L)
    (loss, q), _ = sbb_loss_and_grads(params, target, batch)
    mask = np.asarray(batch.mask).reshape(-1)
    flat = lambda x: np.asarray(x).reshape((-1,) + x.shape[2:])[mask]  # noqa: E731
    start = (np.arange(mask.size) % L == 0)[mask]
    tape = tbb.Batch(*(jnp.asarray(flat(getattr(batch, n))) for n in tbb.Batch._fields[:6]), jnp.asarray(start))
    expect_loss, expect_q = jax.jit(tbb.td_loss, static_argnums=(3, 4))(params, target, tape, 0.9, "sequential")
    np.testing.assert_allclose(float(loss), float(expect_loss), rtol=1e-5)
    np.testing.assert_allclose(float(q), float(expect_q), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory,scan", [(m, "sequential") for m in MEMORY_NAMES] + [("ffm", "associative")])
def test_no_state_or_gradient_crosses_a_segment(memory, scan, sbb_params):
    params = sbb_params[memory]
    L = 5
    batch = sbb_random_batch([13], L, seed=2)  # one episode: its segments are consecutive
    obs, next_obs = batch.obs, batch.next_obs

    @jax.jit
    def grads(o, n, s, t):
        def out(o, n):
            q, q_next = sbb.q_segments(params, o, n, scan)
            return q[s, t].sum() + q_next[s, t].sum()

        return jax.grad(out, argnums=(0, 1))(o, n)

    both = sbb_q_segments_jit(params, obs, next_obs, scan)
    for s, t in ((1, 0), (1, 3), (2, 2)):  # outputs of segment s, step t
        g_obs, g_next = map(np.asarray, grads(obs, next_obs, s, t))
        others = np.arange(len(obs)) != s
        assert np.all(g_obs[others] == 0.0) and np.all(g_next[others] == 0.0)
        assert np.all(g_obs[s, t + 1:] == 0.0) and np.all(g_next[s, :t] == 0.0)  # causal
        assert np.any(g_obs[s, : t + 1] != 0.0)  # the test can fail
        # Segment s alone, from the identity, gives the same Q values as inside the batch.
        alone = sbb_q_segments_jit(params, obs[s : s + 1], next_obs[s : s + 1], scan)
        assert_tree_close(jax.tree.map(lambda x: x[0], alone), jax.tree.map(lambda x: x[s], both))


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------
TINY_SBB = {"ffm": ["--trace-size", "8", "--context-size", "2"],
            "lru": ["--state-size", "8", "--num-layers", "1"],
            "linear_transformer": ["--key-size", "8", "--value-size", "8"]}


def test_sbb_smoke_runs(tmp_path):
    """One tiny run per memory (at L = 10, 20, 50), started together to share the wait."""
    runs = {(memory, L): subprocess.Popen(
        [sys.executable, os.path.join(HERE, "sbb_baseline_dqn.py"), *TINY, *TINY_SBB[memory],
         "--memory", memory, "--segment-length", str(L), "--output-dir", str(tmp_path / memory)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        for memory, L in (("ffm", 10), ("lru", 20), ("linear_transformer", 50))}
    for (memory, L), proc in runs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        (run_dir,) = [os.path.join(tmp_path, memory, d) for d in os.listdir(tmp_path / memory)]
        for f in ("args.json", "metrics.csv", "learning_curve.png"):
            assert os.path.isfile(os.path.join(run_dir, f)), f
        rows = read_metrics(run_dir)
        assert len(rows) == 3 and int(rows[-1]["global_step"]) == 3000
        for r in rows:
            assert all(np.isfinite(float(r[k])) for k in ("td_loss", "eval_return", "q_values"))
            assert 0.0 < float(r["density"]) <= 1.0


def test_sbb_shared_blocks_are_the_tbb_text():
    assert shared_blocks("sbb_baseline_dqn.py") == {
        "environments": shared_blocks("ffm_tbb_dqn.py")["environments"]}


SBB_BAD_INPUT = [
    (["--segment-length", "0"], "--segment-length must be in", 2),
    (["--segment-length", "1001"], "--segment-length must be in", 2),
    (["--memory", "gru"], "invalid choice", 2),
    (["--batch-size", "20", "--segment-length", "10"], "smaller than the longest episode", 2),
    (["--buffer-size", "51", "--segment-length", "50"], "holds 1 segments", 2),
    (["--state-size", "0"], "--state-size must be positive", 2),
    (["--learning-rate", "1e30", *TINY, "--segment-length", "16"], "non-finite", 1),
]


@pytest.mark.parametrize("flags,message,code", SBB_BAD_INPUT, ids=[b[1] for b in SBB_BAD_INPUT])
def test_sbb_bad_input_is_one_clear_line(flags, message, code, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sbb.run([*flags, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


# ---------------------------------------------------------------------------------------------
# discounted_return_scan.py: the return-to-go memoroid against plain loops
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# vml_analysis.py: the value-memory-length analysis
# ---------------------------------------------------------------------------------------------
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


def test_vml_sensitivity_is_zero_across_an_episode_start(ffm_params):
    obs, _, _ = random_tape_obs([6, 9], seed=5)
    start = jnp.asarray(episode_starts([6, 9]))
    q_fn = jax.jit(lambda o: ffm.q_tape(ffm_params, o, o, start[: o.shape[0]], "sequential")[0])
    for t in (6, 10, 14):  # steps of the second episode, which starts at 6
        sens = vml.sensitivity(q_fn, obs, t)
        assert np.all(sens[t - 6 + 1 :] == 0.0) and np.all(sens[: t - 6 + 1] > 0.0)


def test_vml_script_smoke(tmp_path):
    p = run_script("vml_analysis.py", "--total-timesteps", "3000", "--episodes", "2",
                   "--final-steps", "2", "--hidden-size", "32", "--trace-size", "8",
                   "--context-size", "2", "--output-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "RML = 11 observations" in p.stdout and p.stdout.count("VML = ") == 2
    with open(tmp_path / "vml.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["tbb_cumulative"]) == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "vml.png").stat().st_size > 0


def test_vml_bad_flag_is_one_line(capsys):
    with pytest.raises(vml.tbb.UsageError, match="--k must be positive"):
        vml.parse_args(["--k", "0"])


# ---------------------------------------------------------------------------------------------
# benchmarks/reproduce.py: the TBB-vs-SBB grid runner (its bookkeeping, not its training)
# ---------------------------------------------------------------------------------------------
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


def write_fake_run(out, steps, returns, density=None):
    run_dir = os.path.join(out, "Task__x__1__0")
    os.makedirs(run_dir)
    extra = "" if density is None else f",{density}"  # only SBB logs a density
    with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
        f.write("global_step,updates,eval_return,elapsed_s" + (",density" if extra else "") + "\n")
        for i, (s, r) in enumerate(zip(steps, returns)):
            f.write(f"{s},{10 * i},{r},{60.0 * i}{extra}\n")


def test_reproduce_resumes_and_tabulates(tmp_path, monkeypatch):
    rep = load_reproduce()
    grid = str(tmp_path / "grid")
    flags = ["--tasks", "RepeatFirstEasy", "--models", "ffm", "--batchings", "tbb", "sbb10",
             "--seeds", "2", "--total-timesteps", "300", "--grid-dir", grid,
             "--figure", str(tmp_path / "f.png"), "--table", str(tmp_path / "t.md")]
    args = rep.parse_args(flags)
    curves = {("tbb", 1): [0.0, 0.5, 1.0], ("tbb", 2): [0.0, 0.25, 0.5],
              ("sbb10", 1): [0.0, 0.0, 0.25]}
    for (batching, seed), returns in curves.items():
        out, _ = rep.command("RepeatFirstEasy", "ffm", batching, seed, args)
        write_fake_run(out, [100, 200, 300], returns, None if batching == "tbb" else 0.8)
    # sbb10 seed 2 stopped early: it is run again; the finished runs are not.
    out, _ = rep.command("RepeatFirstEasy", "ffm", "sbb10", 2, args)
    write_fake_run(out, [100, 200], [0.0, 0.0], 0.8)
    ran = []
    monkeypatch.setattr(rep.subprocess, "run",
                        lambda cmd, **kw: ran.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    rep.run_grid(args)
    assert len(ran) == 1 and ran[0][ran[0].index("--seed") + 1] == "2"
    assert os.path.basename(ran[0][1]) == "sbb_baseline_dqn.py"

    rep.summarise(args)
    rows = [line.split("|")[1:-1] for line in (tmp_path / "t.md").read_text().splitlines()[2:]]
    by_batching = {r[2].strip(): [c.strip() for c in r] for r in rows}
    tbb, sbb10 = by_batching["tbb"], by_batching["sbb10"]
    assert tbb[3] == "2" and sbb10[3] == "1"  # the unfinished seed is left out
    assert tbb[4].startswith("+0.750 (+0.500, +1.000)")  # mean of the last evals 1.0 and 0.5
    assert tbb[5].startswith(f"{np.mean([0.5, 0.25]):+.3f}")  # area: the mean of each curve
    assert sbb10[4].startswith("+0.250 (+0.250, +0.250)")
    assert tbb[7] == "1.00" and sbb10[7] == "0.80" and tbb[6] == "20" and tbb[8] == "2.0"
    assert (tmp_path / "f.png").stat().st_size > 0


def test_reproduce_rejects_an_unknown_batching(capsys):
    with pytest.raises(SystemExit) as e:
        load_reproduce().parse_args(["--batchings", "tbb", "segments"])
    assert e.value.code == 2 and "unknown batching 'segments'" in capsys.readouterr().err
