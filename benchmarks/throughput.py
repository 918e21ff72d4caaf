"""Throughput of the TBB scripts: collection, one update at several tape sizes, whole runs.

    python benchmarks/throughput.py                   # all models; whole runs for FFM only
    python benchmarks/throughput.py --run-models      # only collection and update timings
    python benchmarks/throughput.py --networks-only   # the default network vs first_network
    python benchmarks/throughput.py --r2d2-only       # SBB's stored states and burn-in: costs

Prints tables; nothing is asserted. Timings exclude compilation, which is reported apart.
The whole-run rows call the scripts as subprocesses and read their metrics.csv, so they time
exactly what a user runs.
"""

import argparse
import csv
import importlib
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ffm_tbb_dqn import POSITIVE_INT, Parser, fail  # noqa: E402  (one-line errors)

MODELS = {"ffm": "ffm_tbb_dqn", "lru": "lru_tbb_dqn", "linear_transformer": "linear_transformer_tbb_dqn"}
# The paper code's recipe on RepeatFirstEasy: 5000 random episodes,
# then one B=1000 update per 51-step episode: 16 updates every 816 steps (16 episodes).
PAPER_RECIPE = ["--learning-starts", "255000", "--train-frequency", "816", "--updates-per-train",
                "16", "--buffer-size", "500000", "--eval-every", "5000", "--log-every", "5000"]


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def filled_tape(mod, capacity, obs_dim, episode_length, seed=0, params=None):
    """A full buffer of random episodes of one length (RepeatFirstEasy's 51): a TBB tape, or
    the segment ring of an SBB script (capacity in slots), through the script's own functions
    (`params`: the acting network, which SBB's --stored-state runs over each episode)."""
    rng = np.random.default_rng(seed)
    tape = mod.init_tape(capacity, obs_dim)
    for _ in range(capacity // episode_length):
        obs = rng.normal(size=(episode_length, obs_dim)).astype(np.float32)
        episode = mod.Transition(obs, rng.integers(0, 4, episode_length, dtype=np.int32),
                                 rng.normal(size=episode_length).astype(np.float32),
                                 np.roll(obs, -1, 0), np.arange(episode_length) == episode_length - 1,
                                 np.zeros(episode_length, bool))
        tape = mod.add_episode(tape, episode, np.int32(episode_length), params)
    return tape


def one_update(mod, batch_size, scan, obs_dim, num_actions, episode_length):
    """A script's train phase of one update at --batch-size B, a fresh state and a full tape."""
    args = mod.parse_args(["--batch-size", str(batch_size), "--updates-per-train", "1"])
    params = mod.init_params(jax.random.PRNGKey(0), obs_dim, num_actions, args)
    optimizer = mod.make_optimizer(args)
    state = mod.TrainState(params, jax.tree.map(jnp.copy, params), optimizer.init(params))
    tape = filled_tape(mod, max(4 * batch_size, 20_000), obs_dim, episode_length, params=params)
    return mod.make_train_phase(optimizer, args, scan), state, tape


def update_timings(mod, batch_sizes, scans, repeats, obs_dim=10, num_actions=4, episode_length=51):
    """One update of a script (TBB, or SBB from sbb.segment_script) at each --batch-size B.
    Returns rows (B, scan, ms/update, compile s, measured density)."""
    rows = []
    for batch_size in batch_sizes:
        for scan in scans:
            train_phase, state, tape = one_update(mod, batch_size, scan, obs_dim, num_actions,
                                                  episode_length)
            t = time.perf_counter()
            state, metrics = train_phase(state, tape, jax.random.PRNGKey(1))
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - t
            keys, densities = iter(jax.random.split(jax.random.PRNGKey(2), repeats)), []

            def one():
                nonlocal state
                state, m = train_phase(state, tape, next(keys))
                densities.append(m.get("density", 1.0))  # TBB's: every slot a real step
                return m

            ms = median_ms(one, repeats)
            rows.append((batch_size, scan, ms, compile_s, float(np.mean(densities))))
    return rows


def sbb_update_timings(memory, batch_sizes, segment_lengths, scans, repeats, obs_dim=10,
                       num_actions=4, episode_length=51):
    """One SBB update (sample + masked loss + AdamW + target) at --batch-size B slots, i.e.
    B // L segments of L steps, on a buffer of `episode_length`-step episodes (RepeatFirstEasy's
    51). Returns rows (B, L, scan, ms/update, compile s, measured density, expected density)."""
    sbb = importlib.import_module("sbb_baseline_dqn")
    scripts = {L: sbb.segment_script(memory, L) for L in segment_lengths}
    rows = []
    for batch_size in batch_sizes:
        for L, mod in scripts.items():
            expected = episode_length / (L * -(-episode_length // L))
            for _, scan, ms, compile_s, density in update_timings(
                    mod, [batch_size], scans, repeats, obs_dim, num_actions, episode_length):
                rows.append((batch_size, L, scan, ms, compile_s, density, expected))
    return rows


def print_sbb_update_timings(models, batch_sizes, segment_lengths, scans, repeats, with_tbb=True):
    """The SBB table; with_tbb adds the TBB script's time at the same B (equal slots)."""
    print("\nSBB: one update at equal slots (B // L segments of L steps = the slots of a TBB tape"
          " of B), default model sizes, 51-step episodes, median ms")
    print(f"{'model':<20}{'B':>7}{'L':>5}{'scan':>13}{'SBB ms':>9}{'TBB ms':>9}"
          f"{'SBB/TBB':>9}{'compile s':>11}{'density':>9}{'expected':>10}")
    for model in models:
        tbb_ms = {}
        if with_tbb:
            mod = importlib.import_module(MODELS[model])
            tbb_ms = {(b, s): ms for b, s, ms, _, _ in update_timings(mod, batch_sizes, scans, repeats)}
        for b, L, scan, ms, compile_s, density, expected in sbb_update_timings(
                model, batch_sizes, segment_lengths, scans, repeats):
            tbb = tbb_ms.get((b, scan), float("nan"))
            print(f"{model:<20}{b:>7}{L:>5}{scan:>13}{ms:>9.1f}{tbb:>9.1f}{ms / tbb:>9.2f}"
                  f"{compile_s:>11.1f}{density:>9.3f}{expected:>10.3f}", flush=True)


def r2d2_costs(memory, batch_size, segment_lengths, repeats, obs_dim=10, num_actions=4,
               episode_length=51):
    """What R2D2's pieces cost at equal slots (issue 37): TBB, and SBB from the identity, from
    stored states, and from stored states after a burn-in of N = L steps. Per variant: ms per
    update, ms to store one episode (stored states are computed then, by the acting network),
    bytes kept per segment for its state, and the share of slots trained on (measured)."""
    sbb = importlib.import_module("sbb_baseline_dqn")
    scan = "sequential" if jax.default_backend() == "cpu" else "associative"  # --scan auto
    variants = {"TBB": importlib.import_module(MODELS[memory])}
    for L in segment_lengths:
        for name, flags in (("", []), (" stored", ["--stored-state"]),
                            (" stored + burn-in", ["--stored-state", "--burn-in", str(L)])):
            args = sbb.parse_args(["--memory", memory, "--segment-length", str(L), *flags])
            variants[f"SBB L={L}{name}"] = sbb.segment_script(memory, L, args)
    print(f"\nR2D2's costs at B = {batch_size} slots ({memory}, {scan} scan, {episode_length}-step"
          f" episodes), median ms of {repeats}")
    print(f"{'variant':<28}{'ms/update':>10}{'ms/episode stored':>19}{'state bytes':>13}"
          f"{'trained share':>15}")
    for name, mod in variants.items():
        (_, _, ms, _, density), = update_timings(mod, [batch_size], (scan,), repeats, obs_dim,
                                                  num_actions, episode_length)
        params = mod.init_params(jax.random.PRNGKey(0), obs_dim, num_actions, mod.parse_args([]))
        tape = filled_tape(mod, 20_000, obs_dim, episode_length, params=params)
        episode = jax.tree.map(lambda x: x[:episode_length], mod.zero_transitions(
            (episode_length,), obs_dim, np.zeros))

        def store():
            nonlocal tape
            tape = mod.add_episode(tape, episode, np.int32(episode_length), params)
            return tape

        store()  # compiled apart
        stored = "stored" in name
        state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
            jax.eval_shape(lambda p: mod.initial_carry(p, 1), params))) if stored else 0
        print(f"{name:<28}{ms:>10.1f}{median_ms(store, repeats):>19.2f}{state:>13,d}"
              f"{density:>15.3f}", flush=True)


def run_script(script, flags):
    """Run a script to completion; return its metrics rows and peak RSS (MiB)."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *flags,
                                 "--output-dir", out], stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"{script} {' '.join(flags)} failed")
        (run_dir,) = os.listdir(out)
        with open(os.path.join(out, run_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
    return rows, usage.ru_maxrss / 1024


def first_reaching(rows, threshold):
    for r in rows:
        if r["eval_return"] != "nan" and float(r["eval_return"]) >= threshold:
            return int(r["global_step"]), float(r["elapsed_s"])
    return None, None


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                   help="memoroids to time")
    p.add_argument("--batch-sizes", type=POSITIVE_INT, nargs="+", default=[1000, 4000, 16000],
                   help="tape sizes B of the update-time table")
    p.add_argument("--repeats", type=POSITIVE_INT, default=10, help="timed repeats (median)")
    p.add_argument("--collect-steps", type=int, default=100_000,
                   help="env steps of the collection-only run (at least 64 x 51: every env, up "
                        "to 64, ends a 51-step episode before the one train phase)")
    p.add_argument("--run-models", nargs="*", default=["ffm"], choices=list(MODELS),
                   help="models for the whole-run rows (default flags, paper recipe); "
                        "give the flag alone to skip them")
    p.add_argument("--networks-only", action="store_true",
                   help="only the update time of the default network against first_network")
    p.add_argument("--r2d2-only", action="store_true", help="only the costs of SBB's stored "
                   "states and burn-in (FFM, B = 1000, L = 10 and 50)")
    args = p.parse_args(argv)
    if args.collect_steps < 64 * 51:  # the runs' progress lines come every --collect-steps // 5
        fail(f"--collect-steps must be at least {64 * 51:,d} (64 envs, 51-step episodes), got "
             f"{args.collect_steps}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores")
    if args.networks_only:
        return network_update_times(args.models, args.repeats)
    if args.r2d2_only:
        return r2d2_costs("ffm", 1000, (10, 50), args.repeats)

    present = {m: s for m, s in MODELS.items()
               if m in args.models and os.path.exists(os.path.join(ROOT, s + ".py"))}
    print("\nCollection with network acting (script run with no training), RepeatFirstEasy;")
    print("steady state: steps / seconds between the first and the next-to-last progress line")
    print(f"{'model':<20}{'envs':>6}{'env-steps/s':>14}{'peak RSS MiB':>14}")
    for model, script in present.items():
        for num_envs in (16, 32, 64):
            # One train phase and the one evaluation, both at the last step, after `last`
            # (the scripts refuse a run without an update).
            rows, rss = run_script(script + ".py", [
                "--total-timesteps", str(args.collect_steps), "--learning-starts",
                str(args.collect_steps - 1), "--num-envs", str(num_envs), "--eval-every",
                str(args.collect_steps), "--log-every", str(args.collect_steps // 5)])
            first, last = rows[0], rows[-2]
            sps = ((int(last["global_step"]) - int(first["global_step"]))
                   / (float(last["elapsed_s"]) - float(first["elapsed_s"])))
            print(f"{model:<20}{num_envs:>6}{sps:>14,.0f}{rss:>14,.0f}")

    if args.run_models:
        whole_runs(present, args.run_models)
    # In-process timings last: a child forked from a large parent would report the parent's
    # pages in its peak RSS.
    print("\nOne update (sample + loss + AdamW + target), default model sizes, median ms")
    print(f"{'model':<20}{'B':>7}{'scan':>13}{'ms/update':>11}{'compile s':>11}")
    for model, script in present.items():
        mod = importlib.import_module(script)
        for batch_size, scan, ms, compile_s, _ in update_timings(
                mod, args.batch_sizes, ("associative", "sequential"), args.repeats):
            print(f"{model:<20}{batch_size:>7}{scan:>13}{ms:>11.1f}{compile_s:>11.1f}")

    if "ffm" in present:
        print_sbb_update_timings(["ffm"], args.batch_sizes, [10, 50], ("associative", "sequential"),
                                 args.repeats)


def update_flops(mod, batch_size, scan, obs_dim=10, num_actions=4):
    """The floating-point operations of one update as XLA counts them in the compiled program:
    the work, free of the machine's noise (a loop body counts once; ours are the cheap scans)."""
    train_phase, state, tape = one_update(mod, batch_size, scan, obs_dim, num_actions, 51)
    cost = train_phase.lower(state, tape, jax.random.PRNGKey(1)).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def network_update_times(models, repeats, batch_size=1000):
    """One update at B = 1000 of each model with the default network and with first_network
    (the network before issue 25), in the same process, alternating so that a slower stretch of
    the machine falls on both; the ratio is what to read."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ablations

    scan = "sequential" if jax.default_backend() == "cpu" else "associative"  # --scan auto
    print(f"\nOne update at B = {batch_size} ({scan} scan), default network vs first_network, "
          f"median ms of {repeats} (compile apart)")
    print(f"{'model':<20}{'params':>9}{'first params':>14}{'ms':>8}{'first ms':>10}{'ratio':>8}"
          f"{'GFLOP':>8}{'first GFLOP':>13}{'ratio':>8}")
    for model in models:
        mods = {"default": importlib.import_module(MODELS[model]),
                "first": ablations.ablated_script("first_network", model)}
        times = {name: [] for name in mods}
        sizes = {}
        for _ in range(3):  # alternate: three medians each, the median of those
            for name, mod in mods.items():
                (_, _, ms, _, _), = update_timings(mod, [batch_size], (scan,), repeats)
                times[name].append(ms)
                args = mod.parse_args([])
                sizes[name] = sum(x.size for x in jax.tree.leaves(
                    mod.init_params(jax.random.PRNGKey(0), 10, 4, args)))
        ms = {name: float(np.median(t)) for name, t in times.items()}
        flops = {name: update_flops(mod, batch_size, scan) / 1e9 for name, mod in mods.items()}
        print(f"{model:<20}{sizes['default']:>9,d}{sizes['first']:>14,d}{ms['default']:>8.1f}"
              f"{ms['first']:>10.1f}{ms['default'] / ms['first']:>8.2f}{flops['default']:>8.2f}"
              f"{flops['first']:>13.2f}{flops['default'] / flops['first']:>8.2f}")


def whole_runs(present, run_models):
    print("\nWhole runs on RepeatFirstEasy (wall time includes compilation)")
    print(f"{'model':<20}{'recipe':<14}{'SPS':>8}{'steps to 0.9':>14}{'s to 0.9':>10}"
          f"{'s to 0.99':>11}{'final eval':>12}{'peak RSS MiB':>14}")
    for model, script in present.items():
        if model not in run_models:
            continue
        for recipe, flags in (("default", []), ("paper", PAPER_RECIPE + ["--total-timesteps", "400000"])):
            rows, rss = run_script(script + ".py", flags)
            step90, t90 = first_reaching(rows, 0.9)
            _, t99 = first_reaching(rows, 0.99)
            fmt = lambda x, f: "never" if x is None else format(x, f)  # noqa: E731
            print(f"{model:<20}{recipe:<14}{float(rows[-1]['sps']):>8,.0f}{fmt(step90, ',d'):>14}"
                  f"{fmt(t90, '.0f'):>10}{fmt(t99, '.0f'):>11}"
                  f"{float(rows[-1]['eval_return']):>12.3f}{rss:>14,.0f}")


if __name__ == "__main__":
    main()
