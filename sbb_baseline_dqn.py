"""Double DQN with a memoroid and Segment-Based Batching (SBB): the baseline TBB replaces.

The batching that the memoroids paper (Morad et al., NeurIPS 2024, Sec. 4.2) argues against,
built as a TBB script with its buffer and loss swapped, so that a comparison changes the
batching and nothing else. --memory picks the script (ffm_tbb_dqn.py, lru_tbb_dqn.py or
linear_transformer_tbb_dqn.py); its network, flags, envs, acting, evaluation and outputs are
used as they are. SBB changes five functions of it (and adds its flags to the parser, and a
line about its segments to the run's first output):

  init_tape    -> a ring of segment slots of --segment-length L steps, each with a mask of
                  the steps that are trained on;
  add_episode  -> cut a finished episode into segments, the last one zero-padded, and store
                  them over the oldest segments;
  sample_tape  -> draw --batch-size // L segments uniformly: the slots, padding included, of a
                  TBB tape of --batch-size transitions (where L divides it), so compute per
                  update is equal;
  td_loss      -> scan every segment on its own from the identity (no stored state, no
                  burn-in: a step sees at most the L-1 steps before it in its segment), average
                  the same Huber TD error over real steps only, and log the density
                  (trained steps / slots);
  check_sizes  -> the ring holds the longest episode's segments (parse_args: a batch holds
                  one segment).

R2D2's remedies (Kapturowski et al., ICLR 2019), off by default, as the same five functions:
  --stored-state  each segment starts from the memory's state before its first step, computed
                  when its episode is stored, and stale by the time it is trained on;
  --burn-in N     each segment also holds the up to N steps before it in its episode, scanned
                  from the stored state only to refresh it: they carry no loss, and the state
                  enters the L trained steps through a stop gradient. A batch holds
                  --batch-size // (L + N) segments of L + N slots.

Run:   python sbb_baseline_dqn.py --memory ffm --segment-length 10
       python sbb_baseline_dqn.py --memory lru --segment-length 50 --env-id CountRecallEasy
       python sbb_baseline_dqn.py --segment-length 10 --stored-state --burn-in 10
Help:  python sbb_baseline_dqn.py --memory lru --help      (with that memory's model flags)
"""

import importlib.util
import os
import signal
import sys
from functools import partial
from typing import NamedTuple


def exit_at_once(signum, frame):
    """Ctrl-C while jax loads (before train() takes the signals) or a second one: one line,
    exit 130 at once, as the TBB scripts do (their exit_at_once() tells why)."""
    print(f"{os.path.basename(sys.argv[0])}: error: interrupted", file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, exit_at_once)

import jax  # noqa: E402  (after the handler above)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import ffm_tbb_dqn  # noqa: E402
from ffm_tbb_dqn import td_targets  # noqa: E402  (the same text in every TBB script)


# =============================================================================================
# The segment buffer (paper Sec. 4.2, the baseline). A ring of C = --buffer-size // L segment
# slots on the device, each of W = N + L steps (N = --burn-in, 0 by default) with a mask of
# the steps trained on. A finished episode of n steps is written as its ceil(n / L) segments
# in order: segment k trains on steps kL .. kL+L-1, after its burn-in, the up to N steps
# before kL (from step max(kL - N, 0), so never the previous episode's); slots past its last
# step are zero-padded (every field 0, mask False). With --stored-state each slot also keeps
# the memory's state before its first step. The ring overwrites the oldest *segments*, so the
# oldest episode may keep only its later segments: no segment needs another.
# =============================================================================================
class Segments(NamedTuple):
    steps: NamedTuple  # the TBB script's Transition, each column [C, W, ...]
    mask: jax.Array  # [C, W] bool: a step trained on (False: burn-in or padding)
    next: jax.Array  # [] int32: the slot the next segment is written to
    size: jax.Array  # [] int32: number of stored segments
    state: object = None  # --stored-state: the memory's state before each first step [C, ...]


def init_segments(steps, state=None):
    """An empty ring, given Transition columns of zeros [C, W, ...] (and states [C, ...])."""
    return Segments(steps, jnp.zeros(steps.action.shape, bool), jnp.int32(0), jnp.int32(0),
                    state)


def first_steps(num_segments, segment_length, burn_in):
    """The episode step at each segment's first slot: kL - N, or 0 near the episode's start."""
    return jnp.maximum(jnp.arange(num_segments) * segment_length - burn_in, 0)


def split_episode(episode, length, segment_length, burn_in=0):
    """Transition columns [T, ...] (the first `length` real) -> (columns [K, N + L, ...], mask
    [K, N + L] of trained steps) with K = ceil(T / L); padding, and anything the rows held past
    `length`, is 0."""
    T, L = episode.obs.shape[0], segment_length
    K = -(-T // L)
    k = jnp.arange(K)[:, None]
    t = first_steps(K, L, burn_in)[:, None] + jnp.arange(burn_in + L)  # [K, W]: episode steps
    real = t < jnp.minimum(k * L + L, length)  # up to the segment's last trained step

    def cut(x):
        flag = real.reshape(real.shape + (1,) * (x.ndim - 1))
        return jnp.where(flag, x[jnp.minimum(t, T - 1)], jnp.zeros_like(x[0]))

    return jax.tree.map(cut, episode), real & (t >= k * L)


# --stored-state: the states are recomputed by the online network when the episode is stored,
# not recorded by the actor as R2D2 does. Parameters change only in train phases, so the ones
# that act now give every segment of the episode the state under one network, as fresh as a
# stored state can be (the actor's carry would mix every network the episode acted with: if
# anything this favours SBB), and exact until the next update (which the tests check). Acting
# stays the TBB script's, whose loop hands SBB only its parameters; the price is one forward
# scan of each stored episode (its rows up to the cap), a small share of the updates' work.
def states_before(q_step, initial_carry, params, obs, steps):
    """The memory's state before each of `steps` of an episode [T, ...]: the acting path q_step
    run once over it with `params`, from the identity (the state before step 0)."""
    def step(carry, o):  # emits the state before o
        return q_step(params, carry, o[None], jnp.zeros(1, bool))[1], carry

    before = jax.lax.scan(step, initial_carry(params, 1), obs)[1]  # leaves [T, 1, ...]
    return jax.tree.map(lambda x: x[steps, 0], before)


@partial(jax.jit, static_argnames=("stored_states", "burn_in"), donate_argnums=0)
def add_segments(buffer, episode, length, params=None, stored_states=None, burn_in=0):
    """Append one episode's ceil(length / L) segments, and with `stored_states` (states_before
    bound to the TBB script) their states under `params`. The ring must hold ceil(T / L)."""
    capacity, width = buffer.mask.shape
    L = width - burn_in
    steps, mask = split_episode(episode, length, L, burn_in)
    count = (length + L - 1) // L
    k = jnp.arange(mask.shape[0])
    idx = jnp.where(k < count, (buffer.next + k) % capacity, capacity)  # past the end: dropped
    put = lambda column, new: column.at[idx].set(new.astype(column.dtype), mode="drop")  # noqa: E731
    state = buffer.state if stored_states is None else jax.tree.map(
        put, buffer.state, stored_states(params, episode.obs, first_steps(len(k), L, burn_in)))
    return Segments(jax.tree.map(put, buffer.steps, steps), put(buffer.mask, mask),
                    (buffer.next + count) % capacity, jnp.minimum(buffer.size + count, capacity),
                    state)


def sample_segments(buffer, key, num_segments):
    """`num_segments` stored segments, drawn uniformly with replacement: the steps [S, W, ...],
    the mask [S, W] and, with --stored-state, the states [S, ...]. Until the ring is full the
    stored segments are slots 0 .. size-1."""
    idx = jax.random.randint(key, (num_segments,), 0, buffer.size)
    take = partial(jax.tree.map, lambda column: column[idx])
    return (take(buffer.steps), buffer.mask[idx]) + (
        () if buffer.state is None else (take(buffer.state),))


# =============================================================================================
# The loss: the TBB scripts' double-DQN Huber loss on segments, averaged over trained steps
# only. The target of a step uses Q(o_k..o_t, o_t+1): its segment's prefix state combined with
# the stored next observation, so the last real step of a segment cut mid-episode still
# bootstraps. segment_q(params, batch, scan) gives both Q's of every slot: q_segments, or
# q_stored with --stored-state.
# =============================================================================================
def q_segments(q_tape, params, batch, scan):
    """The TBB script's q_tape on every segment [L] of a batch [S, L, ...] on its own, from the
    identity (vmap over segments): Q(o_k..o_t) and Q(o_k..o_t, o_t+1), each [S, L, actions],
    where o_k is the segment's first step."""
    obs, next_obs = batch[0].obs, batch[0].next_obs
    start = jnp.arange(obs.shape[1]) == 0  # one start, at each segment's first step
    return jax.vmap(q_tape, in_axes=(None, 0, 0, None, None))(params, obs, next_obs, start, scan)


def flat(x):
    """[A, C, ...] -> [A C, ...]: the two leading axes (segments and slots) as one."""
    return x.reshape((-1,) + x.shape[2:])


def q_stored(q_step, params, batch, scan=None):
    """--stored-state: Q(o_j..o_t) and Q(o_j..o_t, o_t+1), each [S, W, actions], of every
    segment continued from its stored state (the state before its first slot o_j) by the TBB
    script's q_step, its one function that starts from a given state: one step at a time, so
    --scan is not used. The carry passes a stop gradient where the trained steps begin, so the
    burn-in before them only refreshes the stale state; the target network refreshes it with its
    own parameters, as in R2D2's implementations."""
    steps, mask, state = batch
    trained_from = jnp.argmax(mask, axis=1)  # the first trained slot (every segment has one)
    no_start = jnp.zeros(mask.shape[0], bool)

    def step(carry, slot):
        i, obs = slot
        at = i == trained_from
        carry = jax.tree.map(lambda c: jnp.where(at.reshape(at.shape + (1,) * (c.ndim - 1)),
                                                 jax.lax.stop_gradient(c), c), carry)
        q, carry = q_step(params, carry, obs, no_start)
        return carry, (q, carry)

    time_major = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  [S, W, ...] <-> [W, S, ...]
    _, (q, carries) = jax.lax.scan(step, state, (jnp.arange(mask.shape[1]), time_major(steps.obs)))
    # Q(o_j..o_t, o_t+1): one more step from every slot's carry after o_t, all at once
    q_next, _ = q_step(params, jax.tree.map(flat, carries), flat(time_major(steps.next_obs)),
                       jnp.zeros(mask.size, bool))
    return time_major(q), time_major(q_next.reshape(q.shape))


def taken_q_and_targets(segment_q, params, target_params, batch, gamma, scan):
    """Q of the taken actions, their double-DQN targets and the trained-step mask, each [S W]."""
    steps, mask = batch[:2]
    q, q_next_online = map(flat, segment_q(params, batch, scan))
    _, q_next_target = segment_q(target_params, batch, scan)
    target = jax.lax.stop_gradient(td_targets(q_next_online, flat(q_next_target),
                                              flat(steps.reward), flat(steps.terminated), gamma))
    return jnp.take_along_axis(q, flat(steps.action)[:, None], axis=-1)[:, 0], target, flat(mask)


def masked_td_loss(segment_q, params, target_params, batch, gamma, scan):
    """Mean Huber TD error over the trained steps of a batch of segments, and metrics to log.

    Padded steps enter neither: they come after every real step of their segment (so the
    causal scan keeps them out of real steps' Q), and their errors are selected away. That
    holds for finite padding, which the buffer's zeros are: a NaN or inf in a padded slot would
    still give a NaN gradient, as jnp.where differentiates both of its branches. Burn-in steps
    enter neither too: their errors are selected away, and q_stored's stop gradient keeps them
    out of the gradient of the trained steps' Q, which they change only through the state.
    """
    q_taken, target, mask = taken_q_and_targets(segment_q, params, target_params, batch, gamma,
                                                scan)
    trained = jnp.maximum(mask.sum(), 1)
    loss = jnp.where(mask, optax.huber_loss(q_taken, target), 0.0).sum() / trained
    return loss, {"q_values": jnp.where(mask, q_taken, 0.0).sum() / trained,
                  "density": mask.mean()}


# =============================================================================================
# The TBB script with its buffer, its loss and its size check swapped for SBB's.
# =============================================================================================
def segment_script(memory, segment_length, args=None):
    """The TBB script of `memory` with Segment-Based Batching at L = `segment_length`, and with
    `args` (parse_args's) its --stored-state and --burn-in."""
    tbb, L = load_script(memory), segment_length
    stored, N = (args.stored_state, args.burn_in) if args else (False, 0)

    def init_tape(capacity, obs_dim):
        C, state = capacity // L, None
        if stored:  # the state's shape follows the model flags alone: 1 input, 1 action will do
            state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
                lambda: tbb.initial_carry(tbb.init_params(jax.random.PRNGKey(0), 1, 1, args), C)))
        return init_segments(tbb.zero_transitions((C, N + L), obs_dim), state)

    tbb.check_sizes, tbb.init_tape = check_segment_sizes, init_tape
    tbb.add_episode = partial(add_segments, stored_states=partial(
        states_before, tbb.q_step, tbb.initial_carry), burn_in=N) if stored else add_segments
    tbb.sample_tape = lambda buffer, key, batch_size: sample_segments(buffer, key,
                                                                      batch_size // (N + L))
    tbb.td_loss = partial(masked_td_loss, partial(q_stored, tbb.q_step) if stored
                          else partial(q_segments, tbb.q_tape))
    return tbb


# =============================================================================================
# ==== Plumbing: not needed to follow the method ====
MEMORIES = {"ffm": "ffm_tbb_dqn", "lru": "lru_tbb_dqn",
            "linear_transformer": "linear_transformer_tbb_dqn"}


def load_script(memory):
    """A private copy of the TBB script of `memory`: swapping its functions leaves the imported
    module, and any TBB run in the same process, untouched."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), MEMORIES[memory] + ".py")
    spec = importlib.util.spec_from_file_location(f"sbb_{memory}", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def check_segment_sizes(args, cap):
    """SBB's size rule, in place of TBB's (a tape and a batch each hold a whole episode): the
    ring holds the segments of the longest episode, and a batch one segment (parse_args)."""
    L = args.segment_length
    capacity, needed = args.buffer_size // L, -(-cap // L)
    if capacity < needed:
        ffm_tbb_dqn.fail(f"--buffer-size {args.buffer_size} holds {capacity} segments of {L} "
                         f"steps; the longest episode of {args.env_id} ({cap} steps) needs "
                         f"{needed}")


def parse_args(argv=None):
    pre = ffm_tbb_dqn.Parser(add_help=False)
    pre.add_argument("--memory", choices=MEMORIES, default="ffm")
    tbb = load_script(pre.parse_known_args(argv)[0].memory)
    make_tbb_parser = tbb.make_parser

    def make_parser():
        p = make_tbb_parser()
        p.description = __doc__.split("\n")[0]
        g = p.add_argument_group("Segment-Based Batching", "the ring keeps --buffer-size // L "
                                 "segments; a batch draws --batch-size // (L + N) segments of "
                                 "L + N slots, padding and burn-in included")
        g.add_argument("--memory", choices=MEMORIES, default="ffm",
                       help="the memoroid: that TBB script's network and model flags")
        g.add_argument("--segment-length", type=int, default=10, help="segment length L")
        g.add_argument("--stored-state", action="store_true", help="start each segment from "
                       "the memory's state before it, computed by the acting network when its "
                       "episode is stored (R2D2's remedy); else from the identity")
        g.add_argument("--burn-in", type=tbb.NON_NEGATIVE_INT, default=0, help="N: with "
                       "--stored-state, refresh that state over the up to N steps before each "
                       "segment; those steps carry no loss")
        p.set_defaults(exp_name=None)  # then sbb_<memory>_L<segment length>[_stored[_burninN]]
        return p

    tbb.make_parser = make_parser
    args = tbb.parse_args(argv)
    L, N, B = args.segment_length, args.burn_in, args.batch_size
    if N and not args.stored_state:
        tbb.fail(f"--burn-in {N} needs --stored-state: it refreshes the state stored with each "
                 "segment")
    if not 0 < L <= B - N:  # a batch holds one segment
        tbb.fail(f"--segment-length must be in [1, --batch-size {B}"
                 + (f" - --burn-in {N}" if N else "") + f"], got {L}")
    args.exp_name = args.exp_name or (f"sbb_{args.memory}_L{L}"
                                      + "_stored" * args.stored_state + f"_burnin{N}" * bool(N))
    return args


def train(args, tbb=None):
    """Run SBB: `tbb` is segment_script(args.memory, L, args) unless given (ablations change
    it)."""
    L, N = args.segment_length, args.burn_in
    tbb = tbb or segment_script(args.memory, L, args)  # its check_sizes checks the ring
    line = (f"SBB with {args.memory}: batches of {args.batch_size // (L + N)} segments of {L} "
            f"steps{f' after up to {N} burn-in steps' if N else ''}"
            f"{', each from its stored state' if args.stored_state else ''}, a ring of "
            f"{args.buffer_size // L} segments")
    start_run = tbb.start_run

    def start_run_then_say(run_args, **extra):  # the line once the run starts: after every check
        started = start_run(run_args, **extra)
        print(line)
        return started

    tbb.start_run = start_run_then_say
    return tbb.train(args)


if __name__ == "__main__":
    train(parse_args())
