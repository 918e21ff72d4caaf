"""Value memory length: how far back does a learned Q function look? TBB vs SBB.

The paper's analysis (Morad et al. 2024, Sec. 6): train an FFM Q network on RepeatPrevious
with Tape-Based Batching and with Segment-Based Batching (segments of L = 10 steps), then
measure how strongly Q at the last steps of an episode depends on each earlier observation:

    sensitivity(i) = mean over episodes e and final steps t of  sum_f |dQ_t(a*_t) / d o_{t-i, f}|,

with a*_t the greedy action. The normalised cumulative sensitivity C(i) = sum_{j<=i} s(j) / sum_j s(j)
says how much of Q's dependence lies within the last i+1 observations; the value memory
length VML is the smallest age i with C(i) >= --threshold (default 0.95), counted in
observations (age 0 is the current one, so VML = i + 1).

RepeatPrevious(k) rewards the suit seen k steps ago, so the reward memory length RML, the
observations an optimal Q needs, is k + 1 (ages 0..k). With k = 10 > L - 1 = 9, no SBB segment
ever holds the observation the reward is about when its step is trained.

Run:   python vml_analysis.py                      # trains both (about 6 minutes on 2 CPU cores)
       python vml_analysis.py --load-tbb a/params.npz --load-sbb b/params.npz
"""

import argparse
import csv
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import ffm_tbb_dqn as tbb
import sbb_baseline_dqn as sbb


def parse_args(argv=None):
    P, U = tbb.POSITIVE_INT, tbb.UNIT  # range-checked argparse types
    p = tbb.Parser(description=__doc__.split("\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--k", type=P, default=10, help="RepeatPrevious: repeat the suit k steps ago")
    p.add_argument("--num-decks", type=P, default=2, help="RepeatPrevious: decks (episode length)")
    p.add_argument("--gamma", type=U, default=0.5, help="discount of both training runs")
    p.add_argument("--segment-length", type=P, default=10, help="SBB segment length L")
    p.add_argument("--total-timesteps", type=P, default=300_000,
                   help="training budget of each run, in env steps")
    p.add_argument("--seed", type=int, default=1, help="seed of both runs and the analysis episodes")
    p.add_argument("--episodes", type=P, default=16, help="greedy episodes analysed per network")
    p.add_argument("--final-steps", type=P, default=8,
                   help="last steps t of each episode whose Q is differentiated")
    p.add_argument("--threshold", type=tbb.OPEN_UNIT, default=0.95,
                   help="share of cumulative sensitivity that defines the VML")
    p.add_argument("--hidden-size", type=P, default=256, help="FFM network width (both runs)")
    p.add_argument("--trace-size", type=P, default=64, help="FFM trace size m (both runs)")
    p.add_argument("--context-size", type=P, default=4, help="FFM context size c (both runs)")
    p.add_argument("--load-tbb", default=None, help="params.npz of a TBB run (skips its training)")
    p.add_argument("--load-sbb", default=None, help="params.npz of an SBB run (skips its training)")
    p.add_argument("--output-dir", default=".", help="folder for vml.csv, vml.png and the runs")
    args = p.parse_args(argv)
    if args.k >= 52 * args.num_decks:
        tbb.fail("--k must be smaller than the number of cards (52 per deck)")
    for flag, path in (("--load-tbb", args.load_tbb), ("--load-sbb", args.load_sbb)):
        if path is not None and not os.path.isfile(path):
            tbb.fail(f"{flag}: no such file {path!r}")
    return args


# ---------------------------------------------------------------------------------------------
# The analysis, for any Q function of an observation sequence
# ---------------------------------------------------------------------------------------------
def sensitivity(q_fn, obs, t):
    """s(i) = sum_f |dQ_t(a*) / d o_{t-i, f}| for i = 0..t, where q_fn(obs) -> Q [T, actions]
    of the sequence obs[0..t] (one episode) and a* = argmax_a Q_t(a)."""
    seq = jnp.asarray(obs[: t + 1])
    action = jnp.argmax(q_fn(seq)[t])
    grad = jax.grad(lambda o: q_fn(o)[t, action])(seq)
    return np.abs(np.asarray(grad)).sum(-1)[::-1]  # reversed: index i is age i


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


def ffm_q_fn(params):
    """Q of an FFM network (either training's params: the math is the same) over one episode."""
    def q_fn(obs):
        start = jnp.zeros(obs.shape[0], bool).at[0].set(True)
        return tbb.q_tape(params, obs, obs, start, "sequential")[0]
    return jax.jit(q_fn)


# ---------------------------------------------------------------------------------------------
# Training (the scripts' own code) and greedy episodes
# ---------------------------------------------------------------------------------------------
def register_env(k, num_decks):
    """A gymnasium id for RepeatPrevious(num_decks, k), so the scripts' --env-id can take it."""
    import gymnasium as gym
    from popgym.envs import RepeatPrevious

    env_id = f"popgym-RepeatPreviousK{k}D{num_decks}-v0"
    if env_id not in gym.registry:
        gym.register(id=env_id, entry_point=partial(RepeatPrevious, num_decks=num_decks, k=k))
    return env_id


def model_flags(args):
    return ["--hidden-size", str(args.hidden_size), "--trace-size", str(args.trace_size),
            "--context-size", str(args.context_size)]


def train_run(module, env_id, args, extra):
    flags = ["--env-id", env_id, "--gamma", str(args.gamma), "--seed", str(args.seed),
             "--total-timesteps", str(args.total_timesteps), "--save-model",
             "--output-dir", os.path.join(args.output_dir, "runs"), *model_flags(args), *extra]
    run_dir = module.train(module.parse_args(flags))
    return os.path.join(run_dir, "params.npz")


def load_ffm(path, obs_dim, num_actions, args):
    sizes = tbb.parse_args(model_flags(args))
    template = tbb.init_params(jax.random.PRNGKey(0), obs_dim, num_actions, sizes)
    return tbb.load_params(template, path)


def greedy_episodes(params, make_env, num_episodes, seed):
    """Observations of one greedy episode in each of `num_episodes` envs, [T, obs_dim] each."""
    envs = tbb.make_vector_env(make_env, num_episodes)
    obs, _ = envs.reset(seed=seed)
    carry = tbb.initial_carry(params, num_episodes)
    start, running = np.ones(num_episodes, bool), np.ones(num_episodes, bool)
    seen = [[] for _ in range(num_episodes)]
    while running.any():
        for i in np.flatnonzero(running):
            seen[i].append(obs[i].astype(np.float32))
        actions, carry = tbb.act(params, carry, obs, start, 0.0, jax.random.PRNGKey(0), 0)
        obs, _, terminated, truncated, _ = envs.step(np.asarray(actions))
        start = terminated | truncated
        running &= ~start
    envs.close()
    return [np.stack(s) for s in seen]


def plot(curves, rml, segment_length, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, cumulative in curves.items():
        ax.plot(np.arange(1, len(cumulative) + 1), cumulative, "o-", ms=3, label=name)
    ax.axvline(rml, color="k", ls="--", lw=1, label=f"RML = {rml}")
    ax.axvline(segment_length, color="r", ls=":", lw=1, label=f"SBB segment L = {segment_length}")
    ax.set(xlabel="observations back (1 = the current one)", ylim=(0, 1.02),
           ylabel="normalised cumulative |dQ/do|", title="Value memory length, FFM on RepeatPrevious")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    env_id = register_env(args.k, args.num_decks)
    make_env, cap = tbb.resolve_env(env_id)
    rml = args.k + 1
    paths = {"TBB": args.load_tbb or train_run(tbb, env_id, args, []),
             "SBB": args.load_sbb or train_run(sbb, env_id, args, [
                 "--memory", "ffm", "--segment-length", str(args.segment_length)])}
    probe = make_env()
    obs_dim, num_actions = int(np.prod(probe.observation_space.shape)), int(probe.action_space.n)
    curves, summary = {}, []
    for name, path in paths.items():
        params = load_ffm(path, obs_dim, num_actions, args)
        episodes = greedy_episodes(params, make_env, args.episodes, args.seed + 2_000_000)
        sens = mean_sensitivity(ffm_q_fn(params), episodes, args.final_steps)
        cumulative, vml = value_memory_length(sens, args.threshold)
        curves[name] = cumulative
        older_l = 1 - cumulative[args.segment_length - 1]
        older_rml = 1 - cumulative[rml - 1]
        summary.append((name, sens, cumulative))
        print(f"{name}: VML = {vml} observations ({args.threshold:.0%} of the sensitivity); "
              f"share older than L = {args.segment_length}: {older_l:.3f}; "
              f"older than RML = {rml}: {older_rml:.3f}")
    os.makedirs(args.output_dir, exist_ok=True)
    ages = min(len(c) for c in curves.values())
    with open(os.path.join(args.output_dir, "vml.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["observations_back"] + [f"{n.lower()}_{c}" for n, _, _ in summary
                                            for c in ("sensitivity", "cumulative")])
        for i in range(ages):
            w.writerow([i + 1] + [v for _, s, c in summary for v in (s[i], c[i])])
    plot(curves, rml, args.segment_length, os.path.join(args.output_dir, "vml.png"))
    print(f"RepeatPrevious(num_decks={args.num_decks}, k={args.k}): episodes of {cap} steps, "
          f"RML = {rml} observations; wrote vml.csv and vml.png in {args.output_dir}")


if __name__ == "__main__":
    main(parse_args())
