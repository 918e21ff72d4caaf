"""Discounted return-to-go as a resettable memoroid, checked and timed against real baselines.

A tape concatenates many episodes. Step t has a reward r_t and a flag e_t that marks
the last step of an episode (terminated or truncated). The return-to-go is

    G_t = r_t + gamma * (1 - e_t) * G_{t+1},        G_T = 0,

so it never crosses an episode boundary. The last step of the tape always ends an
episode, because there is no data beyond it.

The monoid. A segment of steps t..u is summarised by a (discount, value) pair

    (d, v) = (gamma^(u-t+1), sum_{k=t..u} gamma^(k-t) r_k),   so that   G_t = v + d * G_{u+1}.

Two adjacent segments, a before b, compose like affine maps:

    a • b = (d_a * d_b, v_a + d_a * v_b),          identity (1, 0).

This is associative, so any scan order gives the same answer. One step is (gamma, r_t).
The product over a suffix t..T-1 has value G_t: return-to-go is a suffix scan, which is
a reverse scan. The product over a prefix s..t has value P_t = sum_{k=s..t} gamma^(k-s) r_k,
the forward discounted prefix sum (the paper's variant). At an episode's last step it
equals the return of the whole episode, G_s, but it is not the return-to-go elsewhere.

Resets (Morad et al. 2024). Pair each element with a flag and use

    (a, s_a) • (b, s_b) = (b if s_b else a • b, s_a or s_b),    identity ((1, 0), False).

The wrapped op is again a monoid. Here a comes first in scan order. In a forward scan
s marks the first step of an episode, so the product forgets everything before it. A
reverse scan reads the tape from its end: a is the later segment, b the earlier one,
"a • b" means return_op(b, a), and s marks the last step of an episode, so the product
forgets everything after it. (For return-to-go alone a zero discount at episode ends
would do the same job; the flag is kept because the prefix sum needs it.)

Truncation vs termination. Both end the episode, so both set e_t. By default the
return-to-go stops at the boundary: G_t = r_t at any episode end. For a truncated end
you can pass `bootstrap`, an estimate V(s_{t+1}) of the value after step t. It is used
only at episode ends (and at the tape's last step), as G_t = r_t + gamma * bootstrap_t.
Pass 0 at terminated ends: a terminal state is worth nothing.

    episode_end = terminated | truncated
    bootstrap = np.where(truncated & ~terminated, next_value, 0.0)

Methods timed, all computing the same numbers (checked before timing):

    numpy_loop    a Python loop over each episode's steps, on NumPy arrays
    jit_episode   one jitted lax.scan call per episode (the paper's "serial" baseline)
    lax_scan      one jitted reverse lax.scan over the whole tape, reset at episode ends
    associative   discounted_return with jax.lax.associative_scan: O(log T) sequential depth
    blocked       discounted_return with blocked_scan: short scans inside blocks, all blocks
                  at once, then the same over block totals: O(B log_B T) sequential depth

Run it as a script to check every method against a float64 loop and time them:

    python discounted_return_scan.py --output-dir figures

On CPU the plain sequential lax.scan wins; on a GPU the parallel scan should win at
large sizes. jax.lax.associative_scan also compiles slowly (jax issues #18221, #14190),
so compile time is reported separately.
"""

import argparse
import csv
import os
import platform
import sys
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

BASELINES = ("numpy_loop", "jit_episode", "lax_scan")
METHOD_NAMES = BASELINES + ("associative", "blocked")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit code 2, instead of the usage dump.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _float(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _integer(minimum):
    """Parser for an integer >= minimum; accepts 1e6."""

    def parse(text):
        value = _float(text)
        if not (value >= minimum and value.is_integer()):
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return int(value)

    return parse


_count = _integer(1)


def _counts(text):
    return [_count(part) for part in text.split(",")]


def _gamma(text):
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"gamma must be in [0, 1], got {text!r}")
    return value


def _budget(text):
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _methods(text):
    names = list(dict.fromkeys(text.split(",")))
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(map(repr, unknown))}; choose from {','.join(METHOD_NAMES)}")
    return names


def parse_args(argv=None):
    parser = _Parser(description="Time the discounted return-to-go as a memoroid against baselines.",
                     allow_abbrev=False)  # no abbreviations: a typo is an error, not another flag
    add = parser.add_argument
    add("--gamma", type=_gamma, default=0.99, help="discount factor in [0, 1] (default 0.99)")
    add("--repeats", type=_count, default=5,
        help="timed calls per method and case; the median is reported (default 5)")
    add("--max-transitions", type=_count, default=1_000_000,
        help="cap on tape length: whole episodes are kept up to this many steps (default 1e6)")
    add("--seed", type=_integer(0), default=0, help="seed for episode lengths and rewards (default 0)")
    add("--output-dir", default=".",
        help="folder for returns_timing.csv and returns_timing.png (default: current folder)")
    add("--methods", type=_methods, default=list(METHOD_NAMES),
        help=f"comma-separated subset of {','.join(METHOD_NAMES)} (default: all)")
    add("--episode-lengths", type=_counts, default=[10, 100, 1000],
        help="comma-separated maximum episode lengths; each episode's length is uniform in "
             "1..max (default 10,100,1000)")
    add("--episode-counts", type=_counts, default=[10, 100, 1000, 10000],
        help="comma-separated numbers of episodes per tape (default 10,100,1000,10000)")
    add("--block-size", type=_integer(2), default=64,
        help="block length for the blocked scan, at least 2 (default 64)")
    add("--budget", type=_budget, default=10.0,
        help="skip a method on a case when its estimated time for warm-up plus repeats exceeds "
             "this many seconds (default 10)")
    args = parser.parse_args(argv)
    if max(args.episode_lengths) > args.max_transitions:  # its first episode is kept whole
        parser.error(f"--episode-lengths {max(args.episode_lengths):,d} is longer than "
                     f"--max-transitions {args.max_transitions:,d}: a tape holds whole episodes")
    return args


# ---------------------------------------------------------------------------- the monoid


def return_op(a, b):
    """a • b = (d_a d_b, v_a + d_a v_b) on (discount, value) pairs, segment a before segment b."""
    d_a, v_a = a
    d_b, v_b = b
    return d_a * d_b, v_a + d_a * v_b


def reset_return_op(a, b, reverse=False):
    """(a, s_a) • (b, s_b) = (b if s_b else a • b, s_a or s_b), with a first in scan order.

    reverse=True is the op a reverse scan needs: a is later in time than b, so a • b = return_op(b, a).
    """
    (x_a, s_a), (x_b, s_b) = a, b
    x_ab = return_op(x_b, x_a) if reverse else return_op(x_a, x_b)
    return jax.tree.map(partial(jnp.where, s_b), x_b, x_ab), s_a | s_b


def discounted_return(rewards, episode_end, gamma, bootstrap=None, scan=jax.lax.associative_scan):
    """Return-to-go G_t = r_t + gamma * (1 - e_t) * G_{t+1}, as a reverse scan of the resettable monoid.

    rewards: (T,), cast to float32 unless floating; episode_end: bool (T,), True at the last step
    of each episode (the tape's last step counts as one); bootstrap: optional float (T,), the value
    after step t, giving G_t = r_t + gamma * bootstrap_t at episode ends (pass 0 where terminated);
    scan: any function with the signature of jax.lax.associative_scan, e.g. blocked_scan or
    sequential_scan.
    """
    rewards = jnp.asarray(rewards)
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        # full_like below would round gamma to the integer dtype (0.5 -> 0).
        rewards = rewards.astype(jnp.float32)
    ends = jnp.asarray(episode_end, bool).at[-1].set(True)
    if bootstrap is not None:
        # G_t = r_t + gamma * V at an end is just a larger last reward.
        rewards = rewards + gamma * jnp.where(ends, jnp.asarray(bootstrap, rewards.dtype), 0)
    steps = (jnp.full_like(rewards, gamma), rewards)
    (_, returns), _ = scan(partial(reset_return_op, reverse=True), (steps, ends), reverse=True)
    return returns


def discounted_prefix_sum(rewards, episode_end, gamma, scan=jax.lax.associative_scan):
    """Forward discounted prefix sum P_t = sum_{k=s..t} gamma^(k-s) r_k, s the first step of t's episode.

    P_t = P_{t-1} + gamma^(t-s) r_t; at an episode's last step P equals the episode's return G_s.
    Same arguments as discounted_return.
    """
    rewards = jnp.asarray(rewards)
    if not jnp.issubdtype(rewards.dtype, jnp.floating):
        # full_like below would round gamma to the integer dtype (0.5 -> 0).
        rewards = rewards.astype(jnp.float32)
    ends = jnp.asarray(episode_end, bool)
    starts = jnp.concatenate([jnp.ones(1, bool), ends[:-1]])
    steps = (jnp.full_like(rewards, gamma), rewards)
    (_, prefix), _ = scan(reset_return_op, (steps, starts))
    return prefix


# --------------------------------------------------------------- exact scan evaluations


def sequential_scan(fn, elems, reverse=False):
    """Inclusive scan that folds fn along axis 0 with lax.scan; the contract of lax.associative_scan."""
    take = (lambda e: e[-1]) if reverse else (lambda e: e[0])
    drop = (lambda e: e[:-1]) if reverse else (lambda e: e[1:])
    first = jax.tree.map(take, elems)

    def step(carry, x):
        carry = fn(carry, x)
        return carry, carry

    _, rest = jax.lax.scan(step, first, jax.tree.map(drop, elems), reverse=reverse)
    join = (lambda f, r: [r, f[None]]) if reverse else (lambda f, r: [f[None], r])
    return jax.tree.map(lambda f, r: jnp.concatenate(join(f, r)), first, rest)


def blocked_scan(fn, elems, reverse=False, block_size=64):
    """Exact blocked scan with the contract of jax.lax.associative_scan.

    Cut the tape into blocks of B steps. (1) Scan inside every block at once: B sequential steps,
    each a vector op across the T/B blocks. (2) Scan the T/B block totals, recursively in the same
    way. (3) Combine each element with the product of all earlier blocks. Only associativity is
    used, so the result is the same monoid product as any other scan, in about B * log_B(T)
    sequential steps instead of T, and with a much cheaper compile than associative_scan.
    """
    if block_size < 2:
        # Blocks of one step never shorten the tape, so the recursion would not end.
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if reverse:
        # A reverse scan is a forward scan of the flipped tape with the same fn.
        flip = partial(jax.tree.map, lambda e: e[::-1])
        return flip(blocked_scan(fn, flip(elems), block_size=block_size))
    length = jax.tree.leaves(elems)[0].shape[0]
    block_size = min(block_size, max(length, 2))  # a block longer than the tape is the tape
    num_blocks = -(-length // block_size)
    pad = num_blocks * block_size - length

    def to_blocks(e):
        # Padding goes after the tape, where it cannot change any earlier prefix.
        e = jnp.pad(e, [(0, pad)] + [(0, 0)] * (e.ndim - 1))
        return e.reshape(num_blocks, block_size, *e.shape[1:]).swapaxes(0, 1)

    local = sequential_scan(fn, jax.tree.map(to_blocks, elems))  # (B, num_blocks, ...)
    across = partial(blocked_scan, block_size=block_size) if num_blocks > block_size else sequential_scan
    block_prefix = across(fn, jax.tree.map(lambda e: e[-1], local))
    earlier = jax.tree.map(lambda p: p[None, :-1], block_prefix)
    carried = fn(earlier, jax.tree.map(lambda e: e[:, 1:], local))
    out = jax.tree.map(lambda e, c: jnp.concatenate([e[:, :1], c], axis=1), local, carried)
    return jax.tree.map(lambda e: e.swapaxes(0, 1).reshape(-1, *e.shape[2:])[:length], out)


# ------------------------------------------------------------------------------ baselines


def episode_bounds(episode_end):
    """(start, stop) of every episode on a host tape; the tape's end closes the last one."""
    stops = np.flatnonzero(episode_end[:-1]) + 1
    return zip(np.r_[0, stops], np.r_[stops, len(episode_end)])


def float_dtype(rewards):
    """The dtype of the returns: the rewards' if floating, else float32 (ints and bools)."""
    return rewards.dtype if np.issubdtype(rewards.dtype, np.floating) else np.float32


def numpy_loop_returns(rewards, episode_end, gamma):
    """Baseline 1: G_t = r_t + gamma * G_{t+1}, a Python loop over each episode's steps, backwards."""
    returns = np.empty(len(rewards), float_dtype(rewards))
    for start, stop in episode_bounds(episode_end):
        g = 0.0
        for t in range(stop - 1, start - 1, -1):
            g = rewards[t] + gamma * g
            returns[t] = g
    return returns


def lax_scan_returns(rewards, episode_end, gamma):
    """Baseline 3: G_t = r_t + gamma * (1 - e_t) * G_{t+1} as one reverse lax.scan over the tape."""

    def step(g, x):
        r, end = x
        g = r + gamma * jnp.where(end, 0.0, g)
        return g, g

    rewards = rewards.astype(float_dtype(rewards))
    _, returns = jax.lax.scan(step, jnp.zeros((), rewards.dtype), (rewards, episode_end), reverse=True)
    return returns


jit_lax_scan_returns = jax.jit(lax_scan_returns)
jit_discounted_return = jax.jit(discounted_return, static_argnames="scan")


def jit_episode_returns(rewards, episode_end, gamma):
    """Baseline 2 (the paper's "serial"): one jitted lax.scan call per episode, from a host tape.

    Each episode is zero-padded to the next power of two, which leaves its returns unchanged
    and bounds the number of compiled shapes by log2(max length) + 1.
    """
    returns = np.empty(len(rewards), float_dtype(rewards))
    for start, stop in episode_bounds(episode_end):
        length = stop - start
        size = 1 << int(length - 1).bit_length()
        padded = np.zeros(size, returns.dtype)
        padded[:length] = rewards[start:stop]
        episode = jit_lax_scan_returns(padded, np.zeros(size, bool), gamma)
        returns[start:stop] = np.asarray(episode)[:length]
    return returns


# ------------------------------------------------------------------------- timing harness


def make_methods(block_size):
    """name -> (function of (rewards, episode_end, gamma), whether it takes device arrays, not NumPy)."""
    blocked = partial(blocked_scan, block_size=block_size)
    return {
        "numpy_loop": (numpy_loop_returns, False),
        "jit_episode": (jit_episode_returns, False),
        "lax_scan": (jit_lax_scan_returns, True),
        "associative": (partial(jit_discounted_return, scan=jax.lax.associative_scan), True),
        "blocked": (partial(jit_discounted_return, scan=blocked), True),
    }


def make_tape(max_length, num_episodes, max_transitions, seed):
    """Episode lengths uniform in 1..max_length, rewards uniform in [0, 1), cut to whole episodes."""
    rng = np.random.default_rng([seed, max_length, num_episodes])
    # more episodes than the cap has steps could never be kept: not drawn (nor allocated)
    lengths = rng.integers(1, max_length + 1, size=min(num_episodes, max_transitions))
    lengths = lengths[: max(1, np.searchsorted(np.cumsum(lengths), max_transitions, side="right"))]
    episode_end = np.zeros(lengths.sum(), bool)
    episode_end[np.cumsum(lengths) - 1] = True
    rewards = rng.random(lengths.sum(), dtype=np.float32)
    return rewards, episode_end


def median_time(fn, repeats):
    """Median wall time in seconds of `repeats` calls, each waited for with block_until_ready."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_grid(args):
    """Check and time every method on every case, smallest tape first; returns a list of row dicts."""
    cases = [(length, count, *make_tape(length, count, args.max_transitions, args.seed))
             for length in args.episode_lengths for count in args.episode_counts]
    cases.sort(key=lambda case: len(case[2]))
    methods = make_methods(args.block_size)
    last_run = {}  # method -> (transitions, episodes, median) of its last timed case, to extrapolate
    rows = []
    for length, count, rewards, episode_end in cases:
        transitions, episodes = len(rewards), int(episode_end.sum())
        # Rewards are non-negative, so there is no cancellation and a relative tolerance is fair.
        reference = numpy_loop_returns(rewards.astype(np.float64), episode_end, args.gamma)
        device_tape = (jnp.asarray(rewards), jnp.asarray(episode_end))
        case_rows = []
        for name in args.methods:
            row = dict(max_episode_length=length, episodes=episodes, transitions=transitions,
                       method=name, status="ok", median_s=np.nan, compile_s=np.nan)
            if name in last_run:
                prev_transitions, prev_episodes, prev_median = last_run[name]
                growth = max(transitions / prev_transitions, episodes / prev_episodes)
                estimate = prev_median * growth * (args.repeats + 1)
                if estimate > args.budget:
                    row["status"] = f"skipped (est. {estimate:.2g} s > budget {args.budget:g} s)"
                    case_rows.append(row)
                    continue
            fn, on_device = methods[name]
            call = partial(fn, *(device_tape if on_device else (rewards, episode_end)), args.gamma)
            start = time.perf_counter()
            result = jax.block_until_ready(call())
            first = time.perf_counter() - start
            np.testing.assert_allclose(np.asarray(result), reference, rtol=1e-4, atol=1e-6, err_msg=name)
            median = median_time(call, args.repeats)
            # First call minus a warm call: tracing and compilation (and for numpy, nothing).
            row.update(median_s=median, compile_s=max(first - median, 0.0))
            last_run[name] = (transitions, episodes, median)
            case_rows.append(row)
        medians = {row["method"]: row["median_s"] for row in case_rows}
        for row in case_rows:
            for base in BASELINES:
                row[f"speedup_vs_{base}"] = medians.get(base, np.nan) / row["median_s"]
        rows += case_rows
    return rows


def format_table(rows):
    """Fixed-width text table; speed-up vs_X = time of baseline X / time of the method."""
    header = (f"{'max_len':>7} {'episodes':>8} {'steps':>9} {'method':<12} {'time_ms':>10} "
              f"{'compile_s':>9} " + " ".join(f"{'vs_' + base:>14}" for base in BASELINES))
    legend = "vs_X = time of baseline X / time of this method (above 1: faster than X)"
    lines = [legend, header, "-" * len(header)]
    for row in rows:
        start = (f"{row['max_episode_length']:>7} {row['episodes']:>8} {row['transitions']:>9} "
                 f"{row['method']:<12} ")
        if row["status"] != "ok":
            lines.append(start + row["status"])
            continue
        speedups = " ".join("{:>14}".format("-" if np.isnan(s) else f"{s:.2f}")
                            for s in (row[f"speedup_vs_{base}"] for base in BASELINES))
        lines.append(start + f"{row['median_s'] * 1e3:>10.3f} {row['compile_s']:>9.2f} " + speedups)
    return "\n".join(lines)


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path, title):
    """Log-log time vs transitions, one panel per maximum episode length, one line per method."""
    lengths = sorted({row["max_episode_length"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    fig = Figure(figsize=(4.2 * len(lengths), 3.8), layout="constrained")
    axes = fig.subplots(1, len(lengths), sharey=True, squeeze=False)[0]
    lines = {}  # method -> a line, for one legend across panels
    for ax, length in zip(axes, lengths):
        for method in methods:
            points = sorted((r["transitions"], r["median_s"]) for r in rows if r["status"] == "ok"
                            and (r["max_episode_length"], r["method"]) == (length, method))
            if points:
                lines[method], = ax.plot(*zip(*points), marker="o", color=f"C{methods.index(method)}")
        ax.set(xscale="log", yscale="log", xlabel="transitions in tape",
               title=f"max episode length {length}")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short ranges
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median time per call (s)")
    axes[-1].legend(lines.values(), lines.keys(), fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    try:  # a folder it cannot write to is found now, not after the benchmark
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()
    except OSError as error:
        print(f"discounted_return_scan.py: error: --output-dir {args.output_dir}: cannot write there "
              f"({error.strerror})", file=sys.stderr)
        sys.exit(2)
    cpu = platform.processor() or platform.machine()
    device = f"{jax.devices()[0].platform.upper()} ({os.cpu_count()} cores, {cpu})"
    print(f"jax {jax.__version__} on {device}; gamma={args.gamma}, repeats={args.repeats}, "
          f"max_transitions={args.max_transitions}, block_size={args.block_size}, "
          f"budget={args.budget:g} s")
    # Say up front which files it writes, and which of them it replaces (--output-dir figures
    # replaces the committed ones).
    outputs = [os.path.join(args.output_dir, f"returns_timing.{ext}") for ext in ("csv", "png")]
    for path in outputs:
        if os.path.isdir(path):
            print(f"discounted_return_scan.py: error: --output-dir {args.output_dir}: "
                  f"{os.path.basename(path)} there is a folder", file=sys.stderr)
            sys.exit(2)
    replaced = [path for path in outputs if os.path.exists(path)]
    files = " and ".join(outputs) + (f", replacing {' and '.join(replaced)}" if replaced else "")
    print(f"writes {files}")
    rows = run_grid(args)
    print(format_table(rows))
    write_csv(rows, outputs[0])
    plot(rows, outputs[1], f"Discounted return-to-go, {device}")
    print(f"wrote {files}")


if __name__ == "__main__":
    main()
