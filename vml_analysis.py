"""Value memory length: how far back does a learned Q function look? TBB vs SBB.

The paper's analysis (Morad et al. 2024, Sec. 6): train a Q network on RepeatPrevious with
Tape-Based Batching and with Segment-Based Batching (segments of L steps), then measure how
strongly Q at the last steps of an episode depends on each earlier observation:

    sensitivity(i) = mean over episodes e and final steps t of  sum_f |dQ_t(a*_t) / d o_{t-i, f}|,

with a*_t the greedy action. The normalised cumulative sensitivity C(i) = sum_{j<=i} s(j) / sum_j s(j)
says how much of Q's dependence lies within the last i+1 observations; the value memory
length VML is the smallest age i with C(i) >= --threshold (default 0.95), counted in
observations (age 0 is the current one, so VML = i + 1).

popgym's RepeatPrevious(k) rewards the action that names the suit of the observation k - 1
steps before the current one (k = 1: the current card; a test checks it on the env), so the
reward memory length RML, the observations an optimal Q needs, is k (ages 0..k-1). With
k = 10, an SBB segment of L = 10 holds them only at its last step; L = 20 at its last 11.
Each network's final greedy eval return is printed and plotted beside its curve: the VML of a
network that did not learn the task says little.

Run:   python vml_analysis.py                     # --seeds 3 of TBB, SBB L = 10 and L = 20
       python vml_analysis.py --memory ffm --seeds 1 --total-timesteps 600000
Flags the analysis does not know go to every training run (model sizes, lr, ...), but for
those it sets itself (the seed, env, run name and folder). Runs of at most 100,000 steps (the
scripts' --learning-starts) start to learn after a third of them.
A finished run under --output-dir/runs is reused only if it was made with the same settings
(its args.json), so a second call only analyses; with other settings (e.g. another --k or a
changed default) the run is trained again, beside the old one.
"""

import argparse
import csv
import importlib
import json
import os
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import ffm_tbb_dqn as tbb  # for the command-line helpers, the same in every script
import sbb_baseline_dqn as sbb


# lru_tbb_dqn.py's default rings since issue 36 (half the states on the paper code's ring,
# |lambda| up to 0.9999 and phases up to 2 pi; half on our first, |lambda| 0.9-0.999 and phases
# up to pi/10), given explicitly so that these runs stay the same if that default moves.
MEMORY_FLAGS = {"lru": ["--r-min", "0", "0.9", "--r-max", "0.9999", "0.999",
                        "--max-phase", "6.28", "0.314159"]}
# Training-script flags that this script sets for each run: given, they would win in every run.
SET_FOR_EACH_RUN = ("--seed", "--env-id", "--env-kwargs", "--exp-name", "--save-model",
                    "--segment-length")


def parse_args(argv=None):
    p = tbb.Parser(description=__doc__.split("\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add, positive = p.add_argument, tbb.POSITIVE_INT  # positive: a range-checked argparse type
    add("--memory", choices=sbb.MEMORIES, default="lru", help="the memoroid of every network")
    add("--k", type=positive, default=10, help="RepeatPrevious: repeat the suit k steps ago")
    add("--num-decks", type=positive, default=2, help="RepeatPrevious: decks (episode length)")
    add("--gamma", type=tbb.UNIT, default=0.5, help="discount of every training run")
    # With the default rings every TBB seed of our LRU first evaluated >= 0.99 by 130k steps
    add("--total-timesteps", type=positive, default=300_000, help="env steps of every run")
    add("--segment-lengths", type=positive, nargs="+", default=[10, 20], help="SBB's L")
    add("--seeds", type=positive, default=3, help="seeds 1..N of every batching")
    add("--episodes", type=positive, default=16, help="greedy episodes analysed per network")
    add("--final-steps", type=positive, default=8,
        help="last steps t of each episode whose Q is differentiated")
    add("--threshold", type=tbb.OPEN_UNIT, default=0.95,
        help="share of cumulative sensitivity that defines the VML")
    add("--output-dir", default=".", help="folder for vml.csv, vml.png and the runs")
    args, script_flags = p.parse_known_args(argv)
    for flag in (f.split("=")[0] for f in script_flags):
        if flag in SET_FOR_EACH_RUN:
            tbb.fail(f"{flag} is set for each run by this script (see --seeds, --k, --num-decks, "
                     "--segment-lengths)")
    for name in ("vml.csv", "vml.png"):  # found now, not after the runs
        if os.path.isdir(os.path.join(args.output_dir, name)):
            tbb.fail(f"--output-dir {args.output_dir}: {name} there is a folder")
    if args.k >= 52 * args.num_decks:
        tbb.fail("--k must be smaller than the number of cards (52 per deck)")
    args.env_kwargs = kwargs = {"num_decks": args.num_decks, "k": args.k}
    episode_length = tbb.resolve_env("RepeatPreviousEasy", env_kwargs=kwargs)[1]
    if args.final_steps > episode_length:
        tbb.fail(f"--final-steps {args.final_steps} is more than the {episode_length} steps of an "
                 f"episode (--num-decks {args.num_decks})")
    script = importlib.import_module(sbb.MEMORIES[args.memory])
    # the scripts' random warm-up (100,000 steps), or a third of a run not longer than that
    warm_up = script.make_parser().get_default("learning_starts")
    warm_up = warm_up if warm_up < args.total_timesteps else args.total_timesteps // 3
    args.run_flags = ["--env-id", "RepeatPreviousEasy", "--env-kwargs", json.dumps(kwargs),
                      "--gamma", str(args.gamma), "--total-timesteps", str(args.total_timesteps),
                      "--learning-starts", str(warm_up)]
    # given flags come last, so they win; checked now by the script's own parser, not after a run
    args.script_flags = MEMORY_FLAGS.get(args.memory, []) + script_flags
    batch_size = script.parse_args(args.run_flags + args.script_flags).batch_size
    for L in args.segment_lengths:
        if L > batch_size:
            tbb.fail(f"--segment-lengths {L} is larger than --batch-size {batch_size}: an SBB "
                     "batch holds at least one segment")
    return args


# ---------------------------------------------------------------------------------------------
# The analysis, for any Q function of an observation sequence
# ---------------------------------------------------------------------------------------------
def sensitivity(q_fn, obs, t):
    """s(i) = sum_f |dQ_t(a*) / d o_{t-i, f}| for i = 0..t, where q_fn(obs) -> Q [T, actions]
    of one episode's observations obs [T, obs_dim] and a* = argmax_a Q_t(a). q_fn must be
    causal (Q_t sees only obs[0..t], as every memory here), so the whole episode can be fed;
    pass the same q_fn for every t (it is compiled once per function and episode length)."""
    grad = input_gradient(q_fn, jnp.asarray(obs), t)
    return np.abs(np.asarray(grad)[: t + 1]).sum(-1)[::-1]  # reversed: index i is age i


@partial(jax.jit, static_argnums=0)  # one compile per network and episode length, not per t
def input_gradient(q_fn, obs, t):
    """dQ_t(a*) / d obs, zero after t."""
    action = jnp.argmax(q_fn(obs)[t])
    return jax.grad(lambda o: q_fn(o)[t, action])(obs)


def mean_sensitivity(q_fn, episodes, final_steps):
    """s(i) averaged over episodes and over their last `final_steps` steps, for the ages that
    every one of those steps has."""
    rows = [sensitivity(q_fn, obs, t) for obs in episodes
            for t in range(len(obs) - final_steps, len(obs))]
    ages = min(len(r) for r in rows)
    return np.mean([r[:ages] for r in rows], axis=0)


def value_memory_length(sens, threshold):
    """Normalised cumulative sensitivity C(i), and VML = 1 + the first age with C(i) >= threshold."""
    cumulative = np.cumsum(sens) / sens.sum()
    # The tolerance absorbs float rounding, so that a threshold of 1 is reachable.
    return cumulative, int(np.flatnonzero(cumulative >= threshold - 1e-6)[0]) + 1


def q_fn_of(script, params):
    """Q of a network (TBB's or SBB's: the network is the same) over one episode."""
    def q_fn(obs):
        start = jnp.zeros(obs.shape[0], bool).at[0].set(True)
        return script.q_tape(params, obs, obs, start, "sequential")[0]
    return jax.jit(q_fn)


# ---------------------------------------------------------------------------------------------
# Training (the scripts' own code), or the finished run, and greedy episodes
# ---------------------------------------------------------------------------------------------
def finished(run_dir, run_args):
    """A run that went the whole way with the settings `run_args` (the parsed flags it would be
    trained with): params.npz, its args.json equal to them but for the folder, and a last
    metrics row at the budget (an interrupted run keeps its params.npz too)."""
    made_with = json.loads(json.dumps(vars(run_args)))  # as args.json writes them: lists, ...
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        if not os.path.isfile(os.path.join(run_dir, "params.npz")) or not rows:
            return False
        return (all(saved.get(k) == v for k, v in made_with.items() if k != "output_dir")
                and int(rows[-1]["global_step"]) >= run_args.total_timesteps)
    except (OSError, ValueError, KeyError, AttributeError):  # not a finished run of ours
        return False


def trained_run(args, batching, seed, run_flags):
    """The run folder of (batching, seed): reused when it finished with these settings, else
    trained."""
    out = os.path.join(args.output_dir, "runs", batching, f"seed{seed}")
    flags = [*run_flags, "--seed", str(seed), "--save-model", "--output-dir", out,
             "--exp-name", batching, *args.script_flags]
    if batching == "tbb":
        script = importlib.import_module(sbb.MEMORIES[args.memory])
        run_args = script.parse_args(flags)
    else:
        script = sbb
        run_args = sbb.parse_args([*flags, "--memory", args.memory, "--segment-length",
                                   batching[3:]])
    done = [os.path.join(out, d) for d in sorted(os.listdir(out))] if os.path.isdir(out) else []
    done = [d for d in done if finished(d, run_args)]
    return done[-1] if done else script.train(run_args)


def final_eval_return(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        returns = [float(r["eval_return"]) for r in csv.DictReader(f) if r["eval_return"] != "nan"]
    return returns[-1]


def greedy_episodes(script, params, make_env, num_episodes, seed):
    """Observations of one greedy episode in each of `num_episodes` envs, [T, obs_dim] each."""
    envs = script.make_vector_env(make_env, num_episodes)
    obs, _ = envs.reset(seed=seed)
    carry = script.initial_carry(params, num_episodes)
    start, running = np.ones(num_episodes, bool), np.ones(num_episodes, bool)
    seen = [[] for _ in range(num_episodes)]
    while running.any():
        for i in np.flatnonzero(running):
            seen[i].append(obs[i].astype(np.float32))
        actions, carry = script.act(params, carry, obs, start, 0.0, jax.random.PRNGKey(0), 0)
        obs, _, terminated, truncated, _ = envs.step(np.asarray(actions))
        start = terminated | truncated
        running &= ~start
    envs.close()
    return [np.stack(s) for s in seen]


def plot(results, args, rml, path):
    """Mean normalised cumulative sensitivity per batching, with its range over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), layout="tight")
    for batching, runs in results.items():
        ages = min(len(r["cumulative"]) for r in runs)
        curves = np.stack([r["cumulative"][:ages] for r in runs])
        returns = [r["eval_return"] for r in runs]
        label = ("TBB" if batching == "tbb" else f"SBB, L = {batching[3:]}") + (
            f" (eval return {np.mean(returns):+.2f}, {min(returns):+.2f} to {max(returns):+.2f})")
        line, = ax.plot(np.arange(1, ages + 1), curves.mean(0), "o-", ms=3, label=label)
        ax.fill_between(np.arange(1, ages + 1), curves.min(0), curves.max(0),
                        color=line.get_color(), alpha=0.2)
    ax.axvline(rml, color="k", ls="--", lw=1, label=f"RML = {rml}")
    for L in args.segment_lengths:
        ax.axvline(L, color="r", ls=":", lw=1)
    ax.set(xlabel="observations back (1 = the current one); red: segment lengths L",
           ylabel="normalised cumulative |dQ/do|", ylim=(0, 1.02),
           title=f"Value memory length, {args.memory} on RepeatPrevious "
                 f"({len(results['tbb'])} seeds: mean and range)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    make_env, cap = tbb.resolve_env("RepeatPreviousEasy", env_kwargs=args.env_kwargs)
    probe = make_env()
    obs_dim, num_actions = probe.observation_space.shape[0], int(probe.action_space.n)
    script = importlib.import_module(sbb.MEMORIES[args.memory])
    sizes = script.parse_args(args.script_flags)
    template = jax.eval_shape(lambda key: script.init_params(key, obs_dim, num_actions, sizes),
                              jax.random.PRNGKey(0))  # shapes only: what load_params checks
    rml = args.k  # the observations at ages 0..k-1
    results = {b: [] for b in ["tbb"] + [f"sbb{L}" for L in args.segment_lengths]}
    for seed in range(1, args.seeds + 1):
        for batching, runs in results.items():
            run_dir = trained_run(args, batching, seed, args.run_flags)
            params = script.load_params(template, os.path.join(run_dir, "params.npz"))
            episodes = greedy_episodes(script, params, make_env, args.episodes, 2_000_000 + seed)
            sens = mean_sensitivity(q_fn_of(script, params), episodes, args.final_steps)
            cumulative, vml = value_memory_length(sens, args.threshold)
            runs.append({"seed": seed, "sensitivity": sens, "cumulative": cumulative, "vml": vml,
                         "eval_return": final_eval_return(run_dir)})
            print(f"{batching} seed {seed}: eval return {runs[-1]['eval_return']:+.3f}, "
                  f"VML = {vml} observations", flush=True)
    print(f"RepeatPrevious(num_decks={args.num_decks}, k={args.k}): episodes of {cap} steps, "
          f"RML = {rml} observations; {args.memory}, {args.seeds} seeds (mean, min to max):")
    for batching, runs in results.items():
        def stat(values, fmt):
            return f"{np.mean(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"
        older = {n: [1 - r["cumulative"][min(n, len(r["cumulative"])) - 1] for r in runs]
                 for n in sorted({rml, *args.segment_lengths})}
        print(f"  {batching:>7}: eval return {stat([r['eval_return'] for r in runs], '+.3f')}; "
              f"VML ({args.threshold:.0%}) {stat([r['vml'] for r in runs], '.1f')}; share older "
              + "; ".join(f"than {n}: {stat(v, '.3f')}" for n, v in older.items()))
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "vml.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batching", "seed", "eval_return", "observations_back", "sensitivity",
                    "cumulative"])
        for batching, runs in results.items():
            for r in runs:
                for i, (s, c) in enumerate(zip(r["sensitivity"], r["cumulative"])):
                    w.writerow([batching, r["seed"], r["eval_return"], i + 1, s, c])
    plot(results, args, rml, os.path.join(args.output_dir, "vml.png"))
    print(f"wrote vml.csv and vml.png in {args.output_dir}")


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
