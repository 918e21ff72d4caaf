"""Double DQN with a memoroid and Segment-Based Batching (SBB): the baseline TBB replaces.

The batching that the memoroids paper (Morad et al., NeurIPS 2024, Sec. 4.2) argues against,
built as a TBB script with its buffer and loss swapped, so that a comparison changes the
batching and nothing else. --memory picks the script (ffm_tbb_dqn.py, lru_tbb_dqn.py or
linear_transformer_tbb_dqn.py); its network, flags, envs, acting, evaluation and outputs are
used as they are. SBB changes five functions of it (and adds its flags to the parser):

  init_tape    -> a ring of segments: each finished episode is cut into segments of
                  --segment-length L steps, the last one zero-padded, with a mask of real steps;
  add_episode  -> store an episode's segments, overwriting the oldest segments;
  sample_tape  -> draw --batch-size // L segments uniformly: the slots, padding included, of a
                  TBB tape of --batch-size transitions (where L divides it), so compute per
                  update is equal;
  td_loss      -> scan every segment on its own from the identity (no stored state, no
                  burn-in: a step sees at most the L-1 steps before it in its segment), average
                  the same Huber TD error over real steps only, and log the density
                  (real steps / slots);
  check_sizes  -> the ring holds one episode's segments, a batch one segment.

Run:   python sbb_baseline_dqn.py --memory ffm --segment-length 10
       python sbb_baseline_dqn.py --memory lru --segment-length 50 --env-id CountRecallEasy
Help:  python sbb_baseline_dqn.py --memory lru --help      (with that memory's model flags)
"""

import importlib.util
import os
import signal
import sys
from functools import partial
from typing import NamedTuple


def interrupted(signum, frame):
    """Ctrl-C before train() takes the signals (while jax loads): stop at once, in one line, as
    the TBB scripts do (their interrupted() tells why)."""
    print(f"{os.path.basename(sys.argv[0])}: error: interrupted", file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted)

import jax  # noqa: E402  (after the handler above)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import ffm_tbb_dqn  # noqa: E402
from ffm_tbb_dqn import td_targets  # noqa: E402  (the same text in every TBB script)

MEMORIES = {"ffm": "ffm_tbb_dqn", "lru": "lru_tbb_dqn",
            "linear_transformer": "linear_transformer_tbb_dqn"}


# =============================================================================================
# The segment buffer (paper Sec. 4.2, the baseline). A ring of C = --buffer-size // L segment
# slots on the device, each [L, ...] with a mask. A finished episode of n steps is written as
# its ceil(n / L) segments in order: segment k holds steps kL .. kL+L-1, and the last one is
# zero-padded (every field 0, mask False) where there is no step. The ring overwrites the
# oldest *segments*, so the oldest episode may keep only its later segments: every segment
# starts from the identity, so no segment needs another.
# =============================================================================================
class Segments(NamedTuple):
    steps: NamedTuple  # the TBB script's Transition, each column [C, L, ...]
    mask: jax.Array  # [C, L] bool: a real step (False: padding)
    next: jax.Array  # [] int32: the slot the next segment is written to
    size: jax.Array  # [] int32: number of stored segments


def init_segments(steps):
    """An empty ring, given Transition columns of zeros [C, L, ...]."""
    return Segments(steps, jnp.zeros(steps.action.shape, bool), jnp.int32(0), jnp.int32(0))


def split_episode(episode, length, segment_length):
    """Transition columns [T, ...] (the first `length` real) -> (columns [K, L, ...], mask
    [K, L]) with K = ceil(T / L); padding, and anything the rows held past `length`, is 0."""
    T, L = episode.obs.shape[0], segment_length
    K = -(-T // L)
    mask = jnp.arange(K * L) < length

    def cut(x):
        x = jnp.pad(x, [(0, K * L - T)] + [(0, 0)] * (x.ndim - 1))
        x = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
        return x.reshape((K, L) + x.shape[1:])

    return jax.tree.map(cut, episode), mask.reshape(K, L)


@partial(jax.jit, donate_argnums=0)  # donated: the ring is updated in place, not copied
def add_segments(buffer, episode, length):
    """Append one episode's ceil(length / L) segments. The ring must hold ceil(T / L)."""
    capacity, L = buffer.mask.shape
    steps, mask = split_episode(episode, length, L)
    count = (length + L - 1) // L
    k = jnp.arange(mask.shape[0])
    idx = jnp.where(k < count, (buffer.next + k) % capacity, capacity)  # past the end: dropped
    put = lambda column, new: column.at[idx].set(new.astype(column.dtype), mode="drop")  # noqa: E731
    return Segments(jax.tree.map(put, buffer.steps, steps), put(buffer.mask, mask),
                    (buffer.next + count) % capacity, jnp.minimum(buffer.size + count, capacity))


def sample_segments(buffer, key, num_segments):
    """`num_segments` stored segments, drawn uniformly with replacement: the steps [S, L, ...]
    and the mask [S, L]. Until the ring is full the stored segments are slots 0 .. size-1."""
    idx = jax.random.randint(key, (num_segments,), 0, buffer.size)
    return jax.tree.map(lambda column: column[idx], buffer.steps), buffer.mask[idx]


# =============================================================================================
# The loss: the TBB scripts' double-DQN Huber loss on segments, averaged over real steps only.
# The target of a step uses Q(o_k..o_t, o_t+1): its segment's prefix state combined with the
# stored next observation, so the last real step of a segment cut mid-episode still bootstraps.
# =============================================================================================
def q_segments(q_tape, params, obs, next_obs, scan):
    """The TBB script's q_tape on every segment [L] of a batch [S, L, ...] on its own, from the
    identity (vmap over segments): Q(o_k..o_t) and Q(o_k..o_t, o_t+1), each [S, L, actions],
    where o_k is the segment's first step."""
    start = jnp.arange(obs.shape[1]) == 0  # one start, at each segment's first step
    return jax.vmap(q_tape, in_axes=(None, 0, 0, None, None))(params, obs, next_obs, start, scan)


def taken_q_and_targets(q_tape, params, target_params, batch, gamma, scan):
    """Q of the taken actions, their double-DQN targets and the real-step mask, each [S L]."""
    steps, mask = batch
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731  [S, L, ...] -> [S L, ...]
    q, q_next_online = map(flat, q_segments(q_tape, params, steps.obs, steps.next_obs, scan))
    _, q_next_target = q_segments(q_tape, target_params, steps.obs, steps.next_obs, scan)
    target = jax.lax.stop_gradient(td_targets(q_next_online, flat(q_next_target),
                                              flat(steps.reward), flat(steps.terminated), gamma))
    return jnp.take_along_axis(q, flat(steps.action)[:, None], axis=-1)[:, 0], target, flat(mask)


def masked_td_loss(q_tape, params, target_params, batch, gamma, scan):
    """Mean Huber TD error over the real steps of a batch of segments, and metrics to log.

    Padded steps enter neither: they come after every real step of their segment (so the
    causal scan keeps them out of real steps' Q), and their errors are selected away. That
    holds for finite padding, which the buffer's zeros are: a NaN or inf in a padded slot would
    still give a NaN gradient, as jnp.where differentiates both of its branches.
    """
    q_taken, target, mask = taken_q_and_targets(q_tape, params, target_params, batch, gamma, scan)
    real = jnp.maximum(mask.sum(), 1)
    # jnp.where, not a product with the mask: a padded step's (finite) error cannot reach the
    # loss or its gradient, whatever its size
    loss = jnp.where(mask, optax.huber_loss(q_taken, target), 0.0).sum() / real
    return loss, {"q_values": jnp.where(mask, q_taken, 0.0).sum() / real, "density": mask.mean()}


# =============================================================================================
# The TBB script with its tape swapped for segments, and its command line with two more flags.
# =============================================================================================
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


def segment_script(memory, segment_length):
    """The TBB script of `memory` with Segment-Based Batching at L = `segment_length`."""
    tbb, L = load_script(memory), segment_length
    tbb.check_sizes = check_segment_sizes
    tbb.init_tape = lambda capacity, obs_dim: init_segments(
        tbb.zero_transitions((capacity // L, L), obs_dim))
    tbb.add_episode = add_segments
    tbb.sample_tape = lambda buffer, key, batch_size: sample_segments(buffer, key, batch_size // L)
    tbb.td_loss = partial(masked_td_loss, tbb.q_tape)
    return tbb


def parse_args(argv=None):
    pre = ffm_tbb_dqn.Parser(add_help=False)
    pre.add_argument("--memory", choices=MEMORIES, default="ffm")
    tbb = load_script(pre.parse_known_args(argv)[0].memory)
    make_tbb_parser = tbb.make_parser

    def make_parser():
        p = make_tbb_parser()
        p.description = __doc__.split("\n")[0]
        g = p.add_argument_group("Segment-Based Batching", "--buffer-size and --batch-size "
                                 "count slots of segments, padding included")
        g.add_argument("--memory", choices=MEMORIES, default="ffm",
                       help="the memoroid: that TBB script's network and model flags")
        g.add_argument("--segment-length", type=int, default=10, help="segment length L")
        p.set_defaults(exp_name=None)  # then sbb_<memory>_L<segment length>
        return p

    tbb.make_parser = make_parser
    args = tbb.parse_args(argv)
    if not 0 < args.segment_length <= args.batch_size:  # a batch holds one segment
        tbb.fail(f"--segment-length must be in [1, --batch-size {args.batch_size}], "
                 f"got {args.segment_length}")
    args.exp_name = args.exp_name or f"sbb_{args.memory}_L{args.segment_length}"
    return args


def train(args, tbb=None):
    """Run SBB: `tbb` is segment_script(args.memory, L) unless given (ablations change it)."""
    L = args.segment_length
    tbb = tbb or segment_script(args.memory, L)
    _, cap = tbb.resolve_env(args.env_id, args.max_episode_steps, args.env_kwargs,
                             args.prev_action)
    check_segment_sizes(args, cap)  # here too, to check before the line below
    print(f"SBB with {args.memory}: batches of {args.batch_size // L} segments of {L} steps, "
          f"a ring of {args.buffer_size // L} segments")
    return tbb.train(args)


if __name__ == "__main__":
    train(parse_args())
