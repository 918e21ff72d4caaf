"""Double DQN with a Linear Recurrent Unit (LRU) memoroid and Tape-Based Batching.

Reference implementation of "Recurrent Reinforcement Learning with Memoroids"
(Morad et al., NeurIPS 2024), with the LRU of "Resurrecting Recurrent Neural Networks for Long
Sequences" (Orvieto et al., ICML 2023) as its memory, to be read top to bottom:

  (1) the LRU memoroid and its resettable scan         paper Sec. 3, 4.1; Orvieto et al. Sec. 3
  (2) the recurrent Q network                          paper Sec. 5
  (3) the tape: whole episodes on one ring buffer      paper Sec. 4.2 (Tape-Based Batching)
  (4) the double-DQN loss                              paper Sec. 5
  (5) the jitted train phase, and the loop that collects, stores and trains
  then, below one marker, the plumbing: checks, command line, environments, outputs.

Run:   python lru_tbb_dqn.py                          # learns RepeatFirstEasy
       python lru_tbb_dqn.py --env-id CountRecallEasy --total-timesteps 1000000
Help:  python lru_tbb_dqn.py --help

The text between "# ==== shared" markers is the same in all three TBB scripts (a test checks).
"""

import argparse
import csv
import difflib
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace
from typing import NamedTuple


def exit_at_once(signum, frame):
    """Ctrl-C while jax loads, or a second one: one line and exit 130, not a jax traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: interrupted", file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, exit_at_once)

import jax  # noqa: E402  (after the handler above)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


# =============================================================================================
# (1) The LRU memoroid (paper Sec. 3 and 4.1; LRU: Orvieto et al. 2023, Sec. 3)
#
# An LRU keeps N complex states h_t = lambda * h_{t-1} + gamma * (B u_t), a diagonal linear
# recurrence with a learned lambda = exp(-exp(nu_log) + i exp(theta_log)), so |lambda| < 1 for
# every nu_log (in exact arithmetic): stable by construction. As a monoid over elements
# (A, h) -- the decay accumulated over a span and the state it produces from a zero start --
#
#     (A_a, h_a) • (A_b, h_b) = (A_b A_a,  A_b h_a + h_b),     identity e = (1, 0).
#
# The op has no parameters: lambda enters through the input map, which gives every step the
# element (lambda, gamma B u_t). Associativity lets jax.lax.associative_scan compute all prefix
# states in O(log n) depth.
def monoid_op(a, b):
    """(A_a, h_a) • (A_b, h_b) = (A_b A_a, A_b h_a + h_b): the older span a, then the newer b."""
    decay_a, h_a = a
    decay_b, h_b = b
    return decay_b * decay_a, decay_b * h_a + h_b


def identity_like(elements):
    """e = (1, 0), shaped like `elements`: e • x = x • e = x."""
    decay, h = elements
    return jnp.ones_like(decay), jnp.zeros_like(h)


# ==== shared: scan and layers ====
def reset_op(a, b):
    """The op on (element, start) pairs, which forgets at an episode start (paper Sec. 4.1):

        (x_a, s_a) • (x_b, s_b) = (x_b if s_b else x_a • x_b,  s_a or s_b).

    Still associative, so one scan over concatenated episodes never carries memory across a
    start. Works on single elements and on batches (leading axis).
    """
    (x_a, start_a), (x_b, start_b) = a, b
    merged = monoid_op(x_a, x_b)

    def pick(new, both):  # the flag is per step: broadcast it over each leaf's other axes
        flag = start_b.reshape(start_b.shape + (1,) * (new.ndim - start_b.ndim))
        return jnp.where(flag, new, both)

    return jax.tree.map(pick, x_b, merged), start_a | start_b


def resettable_scan(elements, start, scan="associative"):
    """All prefix states e • x_t0 • ... • x_t (t0 the last start <= t) along a tape.

    `elements` is a pytree with a leading time axis, `start` a bool vector over time. Both
    ways evaluate the same op: "associative" in O(log n) depth (fast on accelerators),
    "sequential" as a lax.scan (fewer operations, fast on a CPU).
    """
    if scan == "associative":
        return jax.lax.associative_scan(reset_op, (elements, start))[0]
    def scan_step(carry, x):
        carry = reset_op(carry, x)
        return carry, carry[0]

    identity = identity_like(jax.tree.map(lambda x: x[0], elements))
    return jax.lax.scan(scan_step, (identity, jnp.zeros((), bool)), (elements, start))[1]


# =============================================================================================
# (2) The Q network (paper Sec. 5), its parameters a plain pytree of arrays:
#     observation -> block -> memory -> block -> block -> dueling head,
# with block = Linear -> LayerNorm -> leaky ReLU: the paper code's network (its modules.py).
# The embedding and the head are the same for every memory; the memory's maps follow them.
def init_linear(key, n_in, n_out, scale=1.0, bias="zero"):
    """Weight uniform in +-scale/sqrt(n_in); bias zero, or uniform in +-1/sqrt(n_in)."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / np.sqrt(n_in)
    return {"w": scale * jax.random.uniform(kw, (n_in, n_out), minval=-bound, maxval=bound),
            "b": jnp.zeros(n_out) if bias == "zero"
            else jax.random.uniform(kb, (n_out,), minval=-bound, maxval=bound)}


def linear(p, x):
    return x @ p["w"] + p["b"]


def layer_norm(x, p=None, eps=1e-5):
    """LayerNorm over the last axis; with a learned scale and bias if `p` is given."""
    x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + eps)
    return x if p is None else x * p["scale"] + p["bias"]


def init_embed_and_head(key, obs_dim, num_actions, width):
    """The embedding and head parameters, started as in the paper code: the head's blocks as
    equinox's Linear (uniform biases), V and A 10x smaller with zero bias, so Q starts near 0."""
    k = jax.random.split(key, 5)
    return {"embed": init_linear(k[0], obs_dim, width),
            "head": {"block0": init_linear(k[1], width, width, bias="uniform"),
                     "block1": init_linear(k[2], width, width, bias="uniform"),
                     "value": init_linear(k[3], width, 1, scale=0.1),
                     "advantage": init_linear(k[4], width, num_actions, scale=0.1)}}


def block(p, x):
    """Linear -> LayerNorm (no learned scale or bias) -> leaky ReLU."""
    return jax.nn.leaky_relu(layer_norm(linear(p, x)))


def embed(params, obs):
    """Observation o_t -> embedding x_t, the memory's input."""
    return block(params["embed"], obs)


def q_head(params, y):
    """Dueling head on the memory's output y_t: two blocks, then Q = V + A - mean(A)."""
    p = params["head"]
    hidden = block(p["block1"], block(p["block0"], y))
    advantage = linear(p["advantage"], hidden)
    return linear(p["value"], hidden) + advantage - advantage.mean(-1, keepdims=True)
# ==== end shared: scan and layers ====


# The memory is --num-layers of Orvieto et al.'s blocks: pre-LayerNorm, LRU, GELU, gated linear
# unit, residual. With x_t the block input (the embedding, for the first block):
#     u_t = LN(x_t)                                             (a learned scale and bias)
#     h_t = lambda * h_{t-1} + gamma * (B u_t)                 (input map, then the scan)
#     y_t = Re(C h_t) + D * u_t                                 (output map)
#     x_t <- x_t + W_a z_t * sigmoid(W_g z_t),  z_t = GELU(y_t)
# In code vectors are rows: B u is u @ B, C h is h @ C. B and C are complex but stored as real
# matrices, so that each product is one real matmul: B as [Re B | Im B] (width x 2N), giving
# [Re, Im] of B u; C as [Re C; -Im C] (2N x width), since Re(C h) = Re C Re h - Im C Im h.
def init_lru_block(key, args):
    width, n, k = args.hidden_size, args.state_size, jax.random.split(key, 5)
    # Rings (Orvieto et al. Sec. 3): |lambda|^2 uniform on [r_min^2, r_max^2], arg(lambda) on
    # [0, max_phase]; one ring per value of the flags, each taking the next n / rings states.
    ring = np.arange(n) * len(args.r_min) // n
    r_min, r_max, max_phase = np.array([args.r_min, args.r_max, args.max_phase])[:, ring]
    u_radius, u_phase = jax.random.uniform(k[0], (2, n), minval=1e-6)  # > 0: both enter logs
    radius_sq = r_min**2 + u_radius * (r_max**2 - r_min**2)
    return {
        "norm": {"scale": jnp.ones(width), "bias": jnp.zeros(width)},
        "nu_log": jnp.log(-0.5 * jnp.log(radius_sq)),
        "theta_log": jnp.log(max_phase * u_phase),
        # The LRU paper's input gain gamma (no discount) = sqrt(1 - |lambda|^2) keeps the state
        # as large as a white-noise input whatever the radius; then learned, as in that paper.
        "gamma_log": 0.5 * jnp.log1p(-radius_sq),
        "B": jax.random.normal(k[1], (width, 2 * n)) / np.sqrt(2 * width),
        "C": jax.random.normal(k[2], (2 * n, width)) / np.sqrt(n),  # B, C, D as Orvieto et al.
        "D": jax.random.normal(k[3], (width,)),
        "glu": init_linear(k[4], width, 2 * width),  # W_a and W_g
    }


def init_params(key, obs_dim, num_actions, args):
    k = jax.random.split(key, 1 + args.num_layers)
    return init_embed_and_head(k[0], obs_dim, num_actions, args.hidden_size) | {
        "lru": [init_lru_block(kb, args) for kb in k[1:]]}


def lru_lambda(p):
    """lambda = exp(-exp(nu_log) + i exp(theta_log)), one per state."""
    return jnp.exp(-jnp.exp(p["nu_log"]) + 1j * jnp.exp(p["theta_log"]))


def input_map(p, u):
    """Normalised block input u [..., width] -> element (lambda, gamma B u), each [..., N]."""
    bu_re, bu_im = jnp.split(u @ p["B"], 2, axis=-1)
    bu = jnp.exp(p["gamma_log"]) * jax.lax.complex(bu_re, bu_im)
    return jnp.broadcast_to(lru_lambda(p), bu.shape), bu  # lambda once a call: exp is costly


def output_map(p, state, x, u):
    """Prefix state (A, h), block input x and its norm u -> block output (only h is read)."""
    _, h = state
    y = jnp.concatenate([h.real, h.imag], axis=-1) @ p["C"] + p["D"] * u
    value, gate = jnp.split(linear(p["glu"], jax.nn.gelu(y)), 2, axis=-1)
    return x + value * jax.nn.sigmoid(gate)


def q_tape(params, obs, next_obs, start, scan):
    """Q(o_0..o_t) and Q(o_0..o_t, o_t+1) at every step t of a tape of B steps: [B, actions].

    One scan per block gives every prefix state; in every block the second path combines the
    prefix state after o_t with o_t+1's element (one more op, no reset) and feeds the next
    block's second path, so the target's memory sees the whole episode.
    """
    x, x_next = embed(params, obs), embed(params, next_obs)
    for p in params["lru"]:
        u, u_next = layer_norm(x, p["norm"]), layer_norm(x_next, p["norm"])
        states = resettable_scan(input_map(p, u), start, scan)
        states_next = monoid_op(states, input_map(p, u_next))
        x, x_next = output_map(p, states, x, u), output_map(p, states_next, x_next, u_next)
    return q_head(params, x), q_head(params, x_next)


def initial_carry(params, num_envs):
    """The recurrent state of `num_envs` envs before their first step: the identity, per block."""
    return tuple(identity_like((jnp.zeros((num_envs,) + p["nu_log"].shape, jnp.complex64),) * 2)
                 for p in params["lru"])


def q_step(params, carry, obs, start):
    """One step of every env, with the scan's own reset op, so acting and training agree."""
    x, new_carry = embed(params, obs), []
    for p, state in zip(params["lru"], carry):
        u = layer_norm(x, p["norm"])
        state, _ = reset_op((state, start), (input_map(p, u), start))  # only b's flag counts
        x = output_map(p, state, x, u)
        new_carry.append(state)
    return q_head(params, x), tuple(new_carry)


# ==== shared: tape, loss, training, plumbing ====
# =============================================================================================
# (3) The tape (paper Sec. 4.2): one flat ring of transitions on the device. Episodes are
# stored whole and contiguously (modulo the ring), oldest first; adding one evicts the oldest
# *whole* episodes until it fits, so no stored episode is ever partly overwritten. A second
# ring lists where each stored episode starts: with the lengths, all sampling and eviction need.
class Transition(NamedTuple):
    """One step; the tape holds each field as a column with a leading [N] axis."""
    obs: jax.Array  # [obs_dim] float32
    action: jax.Array  # [] int32
    reward: jax.Array  # [] float32
    next_obs: jax.Array  # [obs_dim] float32: the true next observation, at the end too
    terminated: jax.Array  # [] bool: the episode ended here, so no bootstrap
    truncated: jax.Array  # [] bool: cut here (unread: only `terminated` stops the bootstrap)


def zero_transitions(shape, obs_dim, zeros=jnp.zeros):
    """Transition columns of zeros, each `shape` + the field's own shape."""
    obs = lambda: zeros(shape + (obs_dim,), jnp.float32)  # noqa: E731
    return Transition(obs(), zeros(shape, jnp.int32), zeros(shape, jnp.float32), obs(),
                      zeros(shape, bool), zeros(shape, bool))


class Tape(NamedTuple):
    steps: Transition  # columns [N, ...], a ring
    episode_length: jax.Array  # [N] int32: length of the step's episode
    first_step: jax.Array  # [N] int32: a ring of the stored episodes' first steps, oldest first
    oldest: jax.Array  # [] int32: where in `first_step` the oldest stored episode is
    count: jax.Array  # [] int32: number of stored episodes (each has >= 1 step, so <= N)
    size: jax.Array  # [] int32: number of stored steps


def init_tape(capacity, obs_dim):
    ints = lambda: jnp.zeros(capacity, jnp.int32)  # noqa: E731  (own arrays: all are donated)
    return Tape(zero_transitions((capacity,), obs_dim), ints(), ints(), *jnp.zeros(3, jnp.int32))


@partial(jax.jit, donate_argnums=0)  # donated: the ring is updated in place, not copied
def add_episode(tape, episode, length, params=None):
    """Append one episode: a Transition of [T, ...] columns whose first `length` rows are real.
    `params` (the acting network's) are unread: sbb_baseline_dqn.py --stored-state reads them."""
    capacity = tape.first_step.shape[0]

    def evict_oldest(ring):
        oldest, count, size = ring
        evicted = tape.episode_length[tape.first_step[oldest]]
        return (oldest + 1) % capacity, count - 1, size - evicted

    oldest, count, size = jax.lax.while_loop(lambda ring: ring[2] + length > capacity,
                                             evict_oldest, (tape.oldest, tape.count, tape.size))
    write = (tape.first_step[oldest] + size) % capacity  # after the newest (anywhere if empty)
    t = jnp.arange(episode.obs.shape[0])
    idx = jnp.where(t < length, (write + t) % capacity, capacity)  # padding rows: dropped
    put = lambda column, new: column.at[idx].set(new.astype(column.dtype), mode="drop")  # noqa: E731
    first_step = tape.first_step.at[(oldest + count) % capacity].set(write)
    return Tape(jax.tree.map(put, tape.steps, episode), put(tape.episode_length, length),
                first_step, oldest, count + 1, size + length)


def sample_tape(tape, key, batch_size):
    """A training tape: whole episodes concatenated into exactly `batch_size` steps; only the
    last one may be cut. Episodes are drawn uniformly, with replacement (as in the paper), and
    each is taken whole, so every stored step is equally likely to be trained on, as in uniform
    replay (not so if episodes were drawn by length; the cut at the end takes a little from
    late steps of long episodes). -> (steps [B, ...], episode-start flags [B])."""
    capacity = tape.first_step.shape[0]
    # B draws always suffice: each episode gives at least one step.
    drawn = (tape.oldest + jax.random.randint(key, (batch_size,), 0, tape.count)) % capacity
    begin = tape.first_step[drawn]
    length = tape.episode_length[begin]
    ends = jnp.cumsum(length)
    slot = jnp.arange(batch_size)
    k = jnp.searchsorted(ends, slot, side="right")  # the drawn episode that fills each slot
    offset = slot - (ends[k] - length[k])
    idx = (begin[k] + offset) % capacity
    return jax.tree.map(lambda column: column[idx], tape.steps), offset == 0


# =============================================================================================
# (4) The loss: double DQN with a Polyak-averaged target network, Huber loss over the tape.
def td_targets(q_next_online, q_next_target, reward, terminated, gamma):
    """y_t = r_t + gamma (1 - terminated_t) Q_target(o_..t+1, argmax_a Q_online(o_..t+1, a)).

    Truncation still bootstraps (the episode was cut, not ended); termination does not.
    """
    best = jnp.argmax(q_next_online, axis=-1)
    q_next = jnp.take_along_axis(q_next_target, best[:, None], axis=-1)[:, 0]
    return reward + gamma * (1.0 - terminated) * q_next


def td_loss(params, target_params, batch, gamma, scan):
    """Mean Huber TD error over all B steps of a sampled tape, and metrics to log."""
    steps, start = batch
    q, q_next_online = q_tape(params, steps.obs, steps.next_obs, start, scan)
    _, q_next_target = q_tape(target_params, steps.obs, steps.next_obs, start, scan)
    target = jax.lax.stop_gradient(td_targets(q_next_online, q_next_target, steps.reward,
                                              steps.terminated, gamma))
    q_taken = jnp.take_along_axis(q, steps.action[:, None], axis=-1)[:, 0]
    return optax.huber_loss(q_taken, target).mean(), {"q_values": q_taken.mean()}


# =============================================================================================
# (5) Training. A train phase -- sample a tape, TD loss, Adam step, Polyak target update,
# repeated --updates-per-train times -- is ONE jitted call; the loop around it collects.
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
    def update(train_state, tape, key):
        batch = sample_tape(tape, key, args.batch_size)
        (loss, metrics), grads = jax.value_and_grad(td_loss, has_aux=True)(
            train_state.params, train_state.target_params, batch, args.gamma, scan)
        updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params)
        params = optax.apply_updates(train_state.params, updates)
        target = optax.incremental_update(params, train_state.target_params, args.tau)
        return TrainState(params, target, opt_state), {"td_loss": loss, **metrics}

    @partial(jax.jit, donate_argnums=0)
    def train_phase(train_state, tape, key):
        keys = jax.random.split(key, args.updates_per_train)
        train_state, metrics = jax.lax.scan(lambda s, k: update(s, tape, k), train_state, keys)
        return train_state, jax.tree.map(jnp.mean, metrics)

    return train_phase


@jax.jit
def act(params, carry, obs, start, epsilon, key, step):
    """Epsilon-greedy actions for all envs, one recurrent step each."""
    q, carry = q_step(params, carry, obs, start)
    # Folding the step into the key here saves a host-side split per env step.
    k_explore, k_action = jax.random.split(jax.random.fold_in(key, step))
    explore = jax.random.uniform(k_explore, (obs.shape[0],)) < epsilon
    random_action = jax.random.randint(k_action, (obs.shape[0],), 0, q.shape[-1])
    return jnp.where(explore, random_action, jnp.argmax(q, axis=-1)), carry


def epsilon_at(step, args):
    """1 during the random warm-up, then linear from --start-e to --end-e over a fraction of
    the remaining steps (CleanRL anneals from step 0; here it starts when learning does)."""
    if step < args.learning_starts:
        return 1.0
    duration = args.exploration_fraction * max(args.total_timesteps - args.learning_starts, 1)
    progress = (step - args.learning_starts) / duration
    return args.end_e if progress >= 1 else args.start_e + (args.end_e - args.start_e) * progress


def train(args):
    """The algorithm box: act in all envs with the recurrent policy (at random until
    --learning-starts), put every finished episode on the tape whole, from then on run one train
    phase every --train-frequency steps, and evaluate the greedy policy every --eval-every steps
    and at the end. Setup and teardown: plumbing, below the marker."""
    with stops_cleanly() as stop:  # Ctrl-C or SIGTERM fills `stop`: the run ends after a step
        key, init_key, act_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
        run = set_up(args, init_key)  # params: init_params(init_key, ...), or --load-model's
        optimizer = make_optimizer(args)
        target = jax.jit(partial(jax.tree.map, jnp.copy))(run.params)  # own buffers: donated
        train_state = TrainState(run.params, target, jax.jit(optimizer.init)(run.params))
        train_phase = make_train_phase(optimizer, args, run.scan)
        tape = init_tape(args.buffer_size, run.obs_dim)
        # Each env's episode so far, on the host, in rows padded to the cap (one compile of
        # add_episode), until it ends and goes onto the tape whole.
        unfinished = zero_transitions((args.num_envs, run.cap), run.obs_dim, np.zeros)
        env_index, length = np.arange(args.num_envs), np.zeros(args.num_envs, np.int32)

        obs, _ = run.envs.reset(seed=args.seed)
        carry, start = initial_carry(run.params, args.num_envs), np.ones(args.num_envs, bool)
        ep_return, returns, metrics = np.zeros(args.num_envs), [], []
        step = episodes = phases = 0
        eval_return, interrupted = float("nan"), False
        while step < args.total_timesteps and not interrupted:
            # Collect: one step in every env.
            epsilon = epsilon_at(step, args)
            actions, carry = act(train_state.params, carry, obs, start, epsilon, act_key, step)
            actions = np.asarray(actions)
            next_obs, reward, terminated, truncated, info = run.envs.step(actions)
            done = terminated | truncated
            true_next_obs = next_obs.copy()  # SAME_STEP autoreset: a finished env's is in info
            if done.any():
                true_next_obs[done] = np.stack(info["final_obs"][done])
            transition = (obs, actions, reward, true_next_obs, terminated, truncated)
            for column, value in zip(unfinished, transition):
                column[env_index, length] = value
            length += 1
            ep_return += reward
            # Store: every finished episode goes onto the tape whole.
            for i in np.flatnonzero(done):
                tape = add_episode(tape, Transition(*(c[i] for c in unfinished)), length[i],
                                   train_state.params)
                returns.append(ep_return[i])
                length[i], ep_return[i] = 0, 0.0
                episodes += 1
            obs, start = next_obs, done
            step += args.num_envs
            # Train: one phase for every --train-frequency steps from --learning-starts on
            # (once a stored episode can be sampled; phases missed until then run at once).
            while episodes and phases <= (step - args.learning_starts) // args.train_frequency:
                key, phase_key = jax.random.split(key)
                train_state, phase_metrics = train_phase(train_state, tape, phase_key)
                metrics.append(phase_metrics)
                phases += 1
            # Evaluate and log where these steps passed a multiple of --eval-every/--log-every.
            interrupted = bool(stop)  # read once a step, so that the step that stops also logs
            last_step = step >= args.total_timesteps or interrupted
            if step % args.eval_every < args.num_envs or last_step:
                eval_return = evaluate(train_state.params, run.eval_envs, args.eval_episodes)
            if step % args.log_every < args.num_envs or last_step:
                # Metrics stay on the device until here: one sync per log line, not per phase.
                run.log(step, episodes, phases * args.updates_per_train, returns, eval_return,
                        epsilon, metrics)
                returns, metrics, eval_return = [], [], float("nan")
        return finish(args, run, train_state.params, step, interrupted)


# =============================================================================================
# ==== Plumbing: not needed to follow the method ====
def set_up(args, init_key):
    """What train() needs before its loop, made once every input is checked (sizes, memory)."""
    make_env, cap = resolve_env(args.env_id, args.max_episode_steps, args.env_kwargs,
                                args.prev_action)
    check_sizes(args, cap)
    probe = make_env()  # one env for the sizes: nothing large is made before the checks
    obs_dim, num_actions = probe.observation_space.shape[0], int(probe.action_space.n)
    auto = "sequential" if jax.default_backend() == "cpu" else "associative"
    scan = auto if args.scan == "auto" else args.scan
    init = jax.jit(lambda k: init_params(k, obs_dim, num_actions, args))  # one compile, not dozens
    shapes, meta = jax.eval_shape(init, init_key), checkpoint_meta(args, obs_dim, num_actions)
    check_memory(args, cap, obs_dim, shapes)  # the checks need the shapes only: no compute
    params = load_params(shapes, args.load_model, meta) if args.load_model else init(init_key)
    # Made only now that every input is checked: bad input leaves no empty run folder.
    folder, log = start_run(args, scan_used=scan, episode_cap=cap)
    envs = make_vector_env(make_env, args.num_envs)
    eval_envs = make_vector_env(make_env, args.eval_episodes)
    eval_envs.reset(seed=args.seed + 1_000_000)  # seeded apart; later resets continue it
    return SimpleNamespace(envs=envs, eval_envs=eval_envs, params=params, obs_dim=obs_dim,
                           cap=cap, scan=scan, folder=folder, log=log, meta=meta)


def finish(args, run, params, step, interrupted):
    """After the loop: close the envs, save params.npz and the plot, exit 130 if stopped."""
    run.envs.close()
    run.eval_envs.close()
    # What was learned first; the plot is optional, so a failing one costs a warning only.
    if args.save_model:
        save_params(params, os.path.join(run.folder, "params.npz"), run.meta)
    try:
        plot_learning_curve(run.folder, f"{args.exp_name} on {args.env_id}")
    except Exception as e:  # noqa: BLE001  (matplotlib and a full disk raise many kinds)
        print(f"warning: no learning_curve.png ({type(e).__name__}: {e})", file=sys.stderr)
    if interrupted:
        print(f"interrupted at step {step:,d}; results in {run.folder}")
        sys.exit(130)  # 128 + SIGINT: the shell's code for an interrupted program
    print(f"done: {step:,d} steps; results in {run.folder}")
    return run.folder


@contextmanager
def stops_cleanly():
    """Yields `stop`, filled by SIGINT (Ctrl-C) or SIGTERM: train() ends after that step as if
    finished and exits 130 (so vml_analysis.py stops too); a second signal stops at once."""
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)
        signal.signal(signum, old[signum])

    main = threading.current_thread() is threading.main_thread()  # the one with signals
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM) if main}
    try:
        yield stop
    except KeyboardInterrupt:  # a second Ctrl-C where train() was imported (no exit_at_once)
        fail("interrupted", code=130)
    except (MemoryError, ValueError, jax.errors.JaxRuntimeError) as e:  # a CPU's: ValueError
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            fail(f"out of memory ({(str(e) or 'MemoryError').splitlines()[0][:200]}); try a "
                 "smaller --batch-size, --buffer-size or --num-envs", code=1)
        raise
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def check_sizes(args, cap):
    """TBB's size rule: the tape and a training tape each hold the longest episode whole."""
    for flag in ("buffer_size", "batch_size"):
        if getattr(args, flag) < cap:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} is smaller than the longest "
                 f"episode of {args.env_id} ({cap} steps)")


def check_memory(args, cap, obs_dim, shapes):
    """Refuse, before anything is made, sizes the device (a CPU: its RAM) cannot hold, counted
    from below: the tape; per batch step a transition, 4 prefix states; per env 2, an episode."""
    bytes_of = lambda make, *shapes: sum(x.size * x.dtype.itemsize  # noqa: E731  (made: none)
                                         for x in jax.tree.leaves(jax.eval_shape(make, *shapes)))
    step_bytes, carry_bytes = 8 * obs_dim + 18, bytes_of(lambda p: initial_carry(p, 1), shapes)
    needs = {"--buffer-size": bytes_of(lambda: init_tape(args.buffer_size, obs_dim)),
             "--batch-size": args.batch_size * (step_bytes + 4 * carry_bytes),
             "--num-envs": args.num_envs * (2 * carry_bytes + cap * step_bytes),
             "--eval-episodes": args.eval_episodes * 2 * carry_bytes}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", ram)
    flag, total = max(needs, key=needs.get), sum(needs.values())
    if total > limit:
        fail(f"{flag} {getattr(args, flag[2:].replace('-', '_')):,d} cannot fit in memory: it "
             f"alone needs over {needs[flag] / 2**30:,.1f} GiB, the run over {total / 2**30:,.1f} "
             f"GiB, and there are {limit / 2**30:,.1f} GiB")


# Command line: every hyperparameter is a flag, checked where declared (or in parse_args).
def fail(message, code=2):
    """Stop with one line on stderr: code 2 for bad input, 1 for a run that failed."""
    message = " ".join(message.split())  # one line, even where it quotes a library's error
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs):  # no abbreviations: --seed is not --seeds, a typo is an error
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, without argparse's usage block
        fail(message)


def checked(cast, ok, must, name=None):
    """An argparse type: `cast` the text, then require `ok(value)`."""
    def parse(text):
        if not ok(value := cast(text)):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value
    parse.__name__ = name or cast.__name__  # argparse says "invalid int value: 'x'"
    return parse


POSITIVE_INT = checked(int, lambda v: v > 0, "positive")
NON_NEGATIVE_INT = checked(int, lambda v: v >= 0, ">= 0")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a larger float is inf on the device
POSITIVE_FLOAT = checked(float, lambda v: 0 < v <= FLOAT32_MAX, "positive and finite")
UNIT = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
OPEN_UNIT = checked(float, lambda v: 0 < v <= 1, "in (0, 1]")
SEED = checked(int, lambda v: 0 <= v < 2**63, "in [0, 2**63 - 1]")  # gymnasium's, jax's range
JSON_OBJECT = checked(json.loads, lambda v: isinstance(v, dict), "a JSON object", "JSON")


def make_parser():
    p = Parser(description=__doc__.split("\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--exp-name", default=os.path.basename(__file__)[:-3], help="part of the run folder name")
    add("--env-id", default="RepeatFirstEasy", help="a POPGym class name or gymnasium id "
        "(popgym-RepeatFirstEasy-v0); any discrete-action env")
    add("--env-kwargs", type=JSON_OBJECT, default={}, help="the env constructor's keyword "
        """arguments as JSON, e.g. '{"num_decks": 2, "k": 10}'""")
    add("--prev-action", choices=("auto", "on", "off"), default="auto", help="popgym's "
        "PreviousAction wrapper (the last action in the observation); auto: where popgym says")
    add("--seed", type=SEED, default=1, help="seed of the network, the envs and sampling")
    add("--total-timesteps", type=POSITIVE_INT, default=300_000, help="env steps over all "
        "envs, rounded up to a multiple of --num-envs")
    add("--num-envs", type=POSITIVE_INT, default=32, help="envs stepped by one batched act call")
    add("--max-episode-steps", type=NON_NEGATIVE_INT, default=0, help="0: the env's own cap")
    add("--buffer-size", type=POSITIVE_INT, default=100_000, help="tape capacity in transitions")
    add("--batch-size", type=POSITIVE_INT, default=1000, help="transitions per training tape B")
    add("--learning-rate", type=POSITIVE_FLOAT, default=1e-3, help="AdamW's, no weight decay")
    add("--lr-warmup-updates", type=NON_NEGATIVE_INT, default=200,
        help="updates N over which the learning rate ramps up linearly, from 1/N of it")
    add("--max-grad-norm", type=POSITIVE_FLOAT, default=1.0, help="global gradient-norm clip")
    add("--gamma", type=UNIT, default=0.99, help="discount factor")
    add("--tau", type=OPEN_UNIT, default=0.005, help="Polyak rate of the target, every update")
    add("--start-e", type=UNIT, default=0.2, help="epsilon when learning starts")
    add("--end-e", type=UNIT, default=0.01, help="final epsilon")
    add("--exploration-fraction", type=OPEN_UNIT, default=0.5,
        help="share of the steps after --learning-starts over which epsilon anneals")
    add("--learning-starts", type=NON_NEGATIVE_INT, default=100_000,
        help="env steps of uniformly random actions before training starts")
    add("--train-frequency", type=POSITIVE_INT, default=256, help="env steps per train phase")
    add("--updates-per-train", type=POSITIVE_INT, default=4, help="updates per train phase")
    add("--scan", choices=("auto", "associative", "sequential"), default="auto",
        help="how to scan a tape; auto: sequential on a CPU, associative on a GPU/TPU")
    add("--eval-every", type=POSITIVE_INT, default=10_000, help="env steps between evaluations")
    add("--eval-episodes", type=POSITIVE_INT, default=32, help="greedy episodes per evaluation")
    add("--log-every", type=POSITIVE_INT, default=10_000, help="env steps between log lines")
    add("--output-dir", default="runs", help="parent folder of the run folder")
    add("--save-model", action="store_true", help="write params.npz into the run folder")
    add("--load-model", default=None, help="a params.npz written by --save-model to start from")
    add_model_flags(p)
    return p


def parse_args(argv=None):
    args = make_parser().parse_args(argv)
    check_model_flags(args)
    if args.load_model is not None and not os.path.isfile(args.load_model):
        fail(f"--load-model {args.load_model!r} is a folder, not a params.npz" if os.path.isdir(
            args.load_model) else f"--load-model: no such file {args.load_model!r}")
    if args.learning_starts >= args.total_timesteps:
        fail(f"--learning-starts {args.learning_starts:,d} is not below --total-timesteps "
             f"{args.total_timesteps:,d}: the run would end as training starts")
    return args


# Environments. POPGym envs get popgym's wrappers: a flat observation, its discrete parts
# one-hot (with an is-first-step flag, and the previous action where the env needs it), one
# Discrete action; a TimeLimit at the cap makes the cap a guarantee.
def resolve_env(env_id, max_episode_steps=0, env_kwargs=None, prev_action="auto"):
    """-> (make_env, cap): a function that builds one wrapped env, and the longest episode."""
    import gymnasium as gym
    from popgym import envs as popgym_envs  # also registers the popgym-*-v0 ids
    from popgym.core.env import POPGymEnv
    from popgym.wrappers import Antialias, DiscreteAction, Flatten, PreviousAction

    cls = getattr(popgym_envs, env_id, None)
    if isinstance(cls, type) and issubclass(cls, POPGymEnv):
        make_raw = partial(cls, **env_kwargs or {})
    elif env_id in gym.registry:
        make_raw = partial(gym.make, env_id, **env_kwargs or {})
    else:
        close = difflib.get_close_matches(env_id, dir(popgym_envs), n=3) or ["RepeatFirstEasy"]
        fail(f"unknown env id {env_id!r}; try {', '.join(close)} "
             "(any POPGym class name or registered gymnasium id)")
    try:
        probe = make_raw()
    except Exception as e:  # noqa: BLE001  (a constructor may raise anything for bad arguments)
        if not env_kwargs or isinstance(e, (ImportError, gym.error.DependencyNotInstalled)):
            fail(f"--env-id {env_id} cannot be made here: {e}")
        fail(f"{env_id} does not take --env-kwargs {json.dumps(env_kwargs)}: {e}")
    is_popgym = isinstance(probe.unwrapped, POPGymEnv)
    space = probe.action_space
    if not (isinstance(space, gym.spaces.Discrete)
            or is_popgym and isinstance(space, gym.spaces.MultiDiscrete)):
        fail(f"{env_id} has action space {space}; DQN needs a discrete action space")
    cap = (max_episode_steps or getattr(probe.unwrapped, "max_episode_length", None)
           or getattr(probe.unwrapped, "episode_length", None)
           or (probe.spec.max_episode_steps if probe.spec else None))
    if not cap:
        fail(f"{env_id} states no episode cap; pass --max-episode-steps")
    if cap < 1:
        fail(f"{env_id} with --env-kwargs {json.dumps(env_kwargs)} has episodes of at most {cap} "
             "steps")

    def make_env():
        env = make_raw()
        if is_popgym:
            env = env.unwrapped  # popgym's wrappers take the raw env
            # popgym's advice: only where the env needs it (it slows stepping), unless told
            if {"auto": env.obs_requires_prev_action, "on": True, "off": False}[prev_action]:
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


def evaluate(params, eval_envs, num_episodes):
    """Plain mean return of one greedy episode in each of the eval envs."""
    obs, _ = eval_envs.reset()
    carry, start = initial_carry(params, num_episodes), np.ones(num_episodes, bool)
    returns, running = np.zeros(num_episodes), np.ones(num_episodes, bool)
    while running.any():
        actions, carry = act(params, carry, obs, start, 0.0, jax.random.PRNGKey(0), 0)  # greedy
        obs, reward, terminated, truncated, _ = eval_envs.step(np.asarray(actions))
        returns += reward * running
        start = terminated | truncated
        running &= ~start
    return float(returns.mean())


def start_run(args, **extra):
    """Make <output-dir>/<env>__<exp-name>__<seed>__<time>/ with args.json. -> (folder, log),
    where log(...) writes a metrics.csv row and prints a progress line."""
    env = args.env_id + "".join(f"-{k}{v}" for k, v in args.env_kwargs.items())
    while True:
        run_name = f"{env}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join(args.output_dir, run_name)
        try:
            os.makedirs(run_dir)
            break
        except FileExistsError:  # a run of this name began this second: take the next second
            time.sleep(0.1)
        except OSError as e:
            fail(f"--output-dir {args.output_dir}: cannot make the run folder there ({e.strerror})")
    atomic_write(os.path.join(run_dir, "args.json"),
                 lambda f: f.write(json.dumps(vars(args) | extra, indent=2).encode()))
    print(f"{run_name}: {args.env_id}, {', '.join(f'{k} {v}' for k, v in extra.items())}, "
          f"backend {jax.default_backend()}, run folder {run_dir}")
    path, fields = os.path.join(run_dir, "metrics.csv"), (
        "global_step", "episodes", "updates", "train_return", "eval_return", "td_loss",
        "q_values", "density", "epsilon", "sps", "elapsed_s")
    file, t0 = open(path, "wb", buffering=0), time.time()  # unbuffered: one write per row

    def write_row(row):  # in one write; a row the disk takes part of is cut off again
        data, written = (",".join(str(row[f]) for f in fields) + "\n").encode(), file.tell()
        try:
            error = None if file.write(data) == len(data) else "disk full"
        except OSError as e:
            error = e.strerror
        if error:
            file.truncate(written)
            fail(f"cannot write {path} ({error}); its earlier rows are whole", code=1)

    write_row(dict(zip(fields, fields)))  # the header
    min_sec = lambda s: f"{max(int(s), 0) // 60}m{max(int(s), 0) % 60:02d}s"  # noqa: E731

    def or_dash(value, spec):  # formatted, or "-" for nan: no episode ended, evaluation, update
        return "-".center(len(format(0.0, spec))) if np.isnan(value) else format(value, spec)

    def log(step, episodes, updates, returns, eval_return, epsilon, metrics):
        """The means of the train returns and the phases' metrics since the last row."""
        nan, elapsed = float("nan"), time.time() - t0
        # density: the share of a batch's slots holding real steps, 1 on a tape (SBB's: <= 1)
        row = {name: float(np.mean([m.get(name, 1.0) for m in metrics])) if metrics else nan
               for name in ("td_loss", "q_values", "density")}
        if metrics and not np.isfinite(row["td_loss"]):
            fail(f"the TD loss became non-finite by step {step}; try a lower --learning-rate or "
                 "--max-grad-norm", code=1)
        row |= dict(global_step=step, episodes=episodes, updates=updates, eval_return=eval_return,
                    train_return=np.mean(returns) if returns else nan, epsilon=epsilon)
        write_row(row | {"sps": step / elapsed, "elapsed_s": elapsed})
        print(f"step {step:>9,d} | SPS {step / elapsed:6.0f} | train return "
              f"{or_dash(row['train_return'], '+.3f')} | eval return "
              f"{or_dash(row['eval_return'], '+.3f')} | loss {or_dash(row['td_loss'], '.2e')} "
              f"| eps {row['epsilon']:.3f} | {min_sec(elapsed)} elapsed, "
              f"ETA {min_sec(elapsed * (args.total_timesteps - step) / step)}", flush=True)
        if step >= args.total_timesteps and not updates:  # the last row
            fail(f"nothing was trained: no episode ended within --total-timesteps "
                 f"{args.total_timesteps:,d} ({step // args.num_envs:,d} steps in each of "
                 f"--num-envs {args.num_envs}); raise it, or lower --num-envs", code=1)

    return run_dir, log


def plot_learning_curve(run_dir, title):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no figure left open

    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["eval_return"] != "nan"]
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.add_subplot()
    ax.plot([int(r["global_step"]) for r in rows], [float(r["eval_return"]) for r in rows], "o-")
    ax.set(xlabel="environment steps", ylabel="mean greedy eval return", title=title)
    ax.grid(alpha=0.3)
    fig.savefig(os.path.join(run_dir, "learning_curve.png"), dpi=120)  # never read: not atomic


def atomic_write(path, write):
    """write(file) to `path`.part, then renamed: a crash or a full disk never leaves half a file
    at `path` (that --load-model would read). Fails in one line."""
    try:
        with open(f"{path}.part", "wb") as f:
            write(f)
        os.replace(f"{path}.part", path)
    except OSError as e:
        fail(f"cannot write {path} ({e.strerror or e})", code=1)
    finally:
        if os.path.exists(f"{path}.part"):
            os.remove(f"{path}.part")


# A checkpoint says what made it (its __meta__ entry), so that --load-model can name what
# differs where a parameter does not fit: the script (memory), the env's sizes, the model flags.
def checkpoint_meta(args, obs_dim, num_actions):
    model = Parser(add_help=False)
    add_model_flags(model)
    return {"script": os.path.basename(__file__), "--env-id": args.env_id,
            "observation inputs": int(obs_dim), "actions": int(num_actions)} | {
        f"--{k.replace('_', '-')}": getattr(args, k) for k in vars(model.parse_args([]))}


def save_params(params, path, meta=None):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v) for k, v in flat}
    atomic_write(path, lambda f: np.savez(f, **arrays, __meta__=json.dumps(meta or {})))


def load_params(template, path, meta=None):
    """Params from a --save-model file, leaf by leaf as the template: a file that fits loads
    (another env of the same sizes, other flags that only start the network); where a leaf does
    not, the error names all that the file's meta and `meta` (this run's) differ in."""
    try:
        stored = dict(np.load(path))
        was = json.loads(str(stored.pop("__meta__", "{}")))
    except Exception:  # noqa: BLE001  (numpy raises several kinds for a file that is no .npz)
        fail(f"--load-model {path}: not a params.npz written by --save-model")
    if not isinstance(was, dict):
        fail(f"--load-model {path}: its __meta__ is not one that --save-model writes")
    differ = meta and ", ".join(f"{k} {v} (this run: {meta.get(k)})" for k, v in was.items()
                                if v != meta.get(k))
    hint = f"it was made with {differ}" if differ else "use the model flags it was trained with"

    def load(key, leaf):
        name = jax.tree_util.keystr(key, simple=True, separator="/")
        value = stored.get(name)
        wrong = ("is missing or shaped differently; " + hint
                 if value is None or value.shape != leaf.shape
                 else f"holds {value.dtype}, not finite floats" if value.dtype.kind != "f"
                 else "holds NaN or inf" if not np.isfinite(value).all() else None)
        if wrong:  # NaN too: else the loss would fail later, with a --learning-rate hint
            fail(f"--load-model {path}: parameter {name} {wrong}")
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(load, template)

# ==== end shared: tape, loss, training, plumbing ====


# The memory's flags (make_parser adds them) and their cross-checks (parse_args runs them).
def add_model_flags(parser):
    g = parser.add_argument_group("LRU model")
    g.add_argument("--hidden-size", type=POSITIVE_INT, default=256,
                   help="width of the embedding, the LRU blocks and the Q head")
    g.add_argument("--state-size", type=POSITIVE_INT, default=128,
                   help="LRU state size N: complex diagonal states per block")
    g.add_argument("--num-layers", type=POSITIVE_INT, default=2, help="stacked LRU blocks")
    # Default: the paper code's ring and our first, chosen on four tasks (README, issue 36).
    g.add_argument("--r-min", type=float, nargs="+", default=[0.0, 0.9],
                   help="smallest |lambda| of each ring (memory ~1/(1-r) steps); k values: k "
                        "rings, of state-size / k states each, in order")
    g.add_argument("--r-max", type=POSITIVE_FLOAT, nargs="+", default=[0.9999, 0.999],
                   help="largest |lambda| of each ring")
    g.add_argument("--max-phase", type=POSITIVE_FLOAT, nargs="+", default=[6.28, 0.314159],
                   help="largest initial phase arg(lambda) of each ring, in radians")


def check_model_flags(args):
    n = len(args.r_min), len(args.r_max), len(args.max_phase)
    if len(set(n)) > 1 or n[0] > args.state_size:
        fail(f"--r-min, --r-max and --max-phase need one value per |lambda| ring each (got {n[0]}, "
             f"{n[1]} and {n[2]} values), at most --state-size {args.state_size} rings")
    if not all(0 <= lo <= hi and np.float32(hi * hi) < 1 for lo, hi in zip(args.r_min, args.r_max)):
        fail(f"need 0 <= --r-min <= --r-max < 1 (in float32) per ring: {args.r_min}, {args.r_max}")


if __name__ == "__main__":
    train(parse_args())
