"""Reproduce the paper's TBB-vs-SBB comparison with our scripts (paper Sec. 6, Fig. 3).

Runs a grid of tasks x models x batchings x seeds by calling the scripts as subprocesses with
identical flags apart from the batching, then plots mean eval return vs env steps with 95%
bootstrapped confidence bands (one panel per model and task, one colour per batching) and
writes a table of final and area-under-curve returns. With --recipe paper and no --batchings,
--figure or --table it draws README section 5's table and figure instead (--course-table,
--course-figure): the cells of COURSE_CELLS, TBB and SBB at L = 10, 50, 100, the paper's code
and its Fig. 3. Every file written is named on stdout.

    python benchmarks/reproduce.py --jobs 2      # the default grid: 108 runs, ~1 h 40 min on 2 cores
    python benchmarks/reproduce.py --recipe paper --tasks CountRecallEasy --models ffm
                                                 # the paper's own settings, task by task
    python benchmarks/reproduce.py --recipe paper --plot-only
                                                 # README section 5 from the kept curves
    python benchmarks/reproduce.py --recipe paper --plot-only --curves benchmarks/curves_first_network.csv
                                                 # the same from our first network's curves
                                                 # (beside the runs: figures/ is README's)
    python benchmarks/reproduce.py --recipe paper --r2d2 --jobs 2
                                                 # TBB against R2D2's SBB (README), then its table

    python benchmarks/reproduce.py --recipe paper --commands | parallel -j 8
                                                 # the unfinished runs, one shell line each

A batching may carry variants after "+": ablations of benchmarks/ablations.py (e.g.
tbb+first_network) and flags of the scripts (one_env: the paper's collection, --num-envs 1;
the LRU rings *_lru_init), e.g. tbb+first_network+one_env. A run is the same run only if its
whole command is the same (every flag but its folder) and so are the training script's defaults
of the flags it leaves out: its settings. Each run folder keeps
them (command.json), and each finished run's eval curve is copied with a hash of them into
--curves, a committed CSV, so the figure and table can be redrawn without runs/ (which is not
committed). A run already finished with the same settings is skipped, so the grid resumes;
one kept with other settings (another --extra, --total-timesteps, an older recipe) is run
again, and its old curve stays kept beside the new one but is never drawn for these settings.
"""

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ablations.py's, kept equal by a test
ABLATIONS = ("sbb_loss", "rescan_target", "lt_normaliser", "episodes_by_length", "first_network",
             "small_head_init", "head_layernorm", "paper_lt_block", "fixed_eval_seeds")
TBB_SCRIPTS = {"ffm": "ffm_tbb_dqn.py", "lru": "lru_tbb_dqn.py",
               "linear_transformer": "linear_transformer_tbb_dqn.py"}
# The paper's settings that differ by task (its RepeatPrevious runs use gamma 0.5 and
# epsilon 0.2 -> 0.1; everything else gamma 0.99 and the scripts' defaults).
TASK_FLAGS = {"RepeatPreviousEasy": ["--gamma", "0.5", "--end-e", "0.1"]}
# Variants that are flags of the scripts. The LRU's starting rings (issue 36 chose among them):
# first_lru_init, our first (r in [0.9, 0.999], phases up to pi/10); paper_lru_init, the paper
# code's (r in [0, 1), phases up to 2 pi; the default of issue 25), r_max just below 1; the two
# crossed (small_phase_: all radii, small phases; slow_radius_: slow radii, all phases); and
# split_lru_init, half of each block's states on the paper code's ring, half on ours (the default
# since issue 36: the kept rows made before are labelled +paper_lru_init). stored_state:
# R2D2's SBB, each segment from its stored state (with burn-in=N, after an N-step burn-in).
FLAG_VARIANTS = {"one_env": ["--num-envs", "1"], "stored_state": ["--stored-state"],
                 "first_lru_init": ["--r-min", "0.9", "--r-max", "0.999", "--max-phase", "0.314159"],
                 "paper_lru_init": ["--r-min", "0", "--r-max", "0.9999", "--max-phase", "6.28"],
                 "small_phase_lru_init": ["--r-min", "0", "--r-max", "0.9999",
                                          "--max-phase", "0.314159"],
                 "slow_radius_lru_init": ["--r-min", "0.9", "--r-max", "0.9999",
                                          "--max-phase", "6.28"],
                 "split_lru_init": ["--r-min", "0", "0.9", "--r-max", "0.9999", "0.999",
                                    "--max-phase", "6.28", "0.314159"]}
# Ablations that became the defaults in issue 25; the curves of the code before it keep them
# in their labels (benchmarks/curves_first_network.csv), so they can still be plotted.
RETIRED = ("paper_network", "uniform_episodes")
COLOURS = {"tbb": "tab:blue", "sbb10": "tab:orange", "sbb20": "tab:olive", "sbb50": "tab:red",
           "sbb100": "tab:purple", "paper-tbb": "black", "paper-sbb50": "tab:gray",
           "paper-sbb10": "silver", "paper-sbb100": "saddlebrown",
           "tbb+paper_network": "tab:cyan", "sbb50+paper_network": "tab:pink",
           "tbb+one_env": "tab:brown", "tbb+paper_network+one_env": "tab:green",
           "tbb+small_head_init": "tab:olive", "sbb50+sbb_loss": "navy",
           "tbb+paper_lru_init": "darkgreen", "sbb10+stored_state": "tab:green",
           "sbb10+stored_state+burn-in=10": "tab:cyan", "sbb50+stored_state": "tab:brown",
           "sbb50+stored_state+burn-in=50": "tab:pink",
           "sbb50+paper_network+paper_lt_block+lt_normaliser+rescan_target": "gold",
           "sbb50+paper_network+paper_lt_block+lt_normaliser+sbb_loss+rescan_target": "magenta"}

# --recipe paper: the settings of the paper's experiment configs (experiments/<task>/*.yaml of
# proroklab/memory-monoids) as flags of our scripts, which count steps where the paper counts
# episodes: E random-action episodes of R steps (E * R steps of --learning-starts), then E
# training episodes of T steps with one B = 1000 update after each (--train-frequency T, one
# update per phase), epsilon 0.2 -> final linearly over the training steps, an evaluation of 20
# greedy episodes every 10 episodes, and a buffer that never evicts (the paper's holds 4M
# transitions; ours twice the run's steps, for SBB's padding). R = T where every episode has
# the same length. PositionOnlyCartPole's do not: R is the mean length of a random episode
# (22.2 steps over 3,000), T the cap of 200 that a balancing policy reaches, so it gets the
# paper's 10,000 updates but, while its episodes are short, fewer than one per episode.
# task label -> (env id, --env-kwargs, R, T, E, gamma, final epsilon, --prev-action)
PAPER_TASKS = {
    "RepeatFirstEasy": ("RepeatFirstEasy", {}, 51, 51, 5000, 0.99, 0.01, "auto"),
    "RepeatPrevious2x10": ("RepeatPreviousEasy", {"num_decks": 2, "k": 10}, 103, 103, 5000, 0.5,
                           0.1, "auto"),
    "CountRecallEasy": ("CountRecallEasy", {}, 51, 51, 10000, 0.99, 0.01, "on"),
    "PositionOnlyCartPoleEasy": ("PositionOnlyCartPoleEasy", {}, 22, 200, 10000, 0.99, 0.01,
                                 "on"),
}
PAPER_FLAGS = ["--learning-rate", "1e-4", "--lr-warmup-updates", "200", "--max-grad-norm",
               "0.01", "--tau", "0.005", "--start-e", "0.2", "--exploration-fraction", "1.0",
               "--updates-per-train", "1", "--batch-size", "1000", "--eval-episodes", "20"]
# Its FFM on RepeatPrevious has 16 traces x 16 frequencies (elsewhere 64 x 4, our default).
PAPER_MODEL_FLAGS = {("RepeatPrevious2x10", "ffm"): ["--trace-size", "16", "--context-size", "16"]}
# The paper's Fig. 3, end of training, read by eye (10 seeds, best-so-far curves; the same
# figure is its code's figures/plots.png).
# (task, model) -> {batching: value}; "sbb" stands for every segment length not listed.
PAPER_FIG3 = {
    ("CountRecallEasy", "ffm"): {"tbb": "~+0.6", "sbb": "~-0.65"},
    ("CountRecallEasy", "lru"): {"tbb": "~+0.3", "sbb": "~-0.8"},
    ("CountRecallEasy", "linear_transformer"): {"tbb": "~-0.5", "sbb": "~-0.85"},
    ("RepeatFirstEasy", "ffm"): {"tbb": "~1.0", "sbb10": "~0.9", "sbb": "~1.0"},
    ("RepeatFirstEasy", "lru"): {"tbb": "~1.0", "sbb": "<= ~0.6"},
    ("RepeatFirstEasy", "linear_transformer"): {"tbb": "~1.0", "sbb": "~-0.25"},
    ("RepeatPrevious2x10", "ffm"): {"tbb": "~0.0", "sbb": "~-0.35 to -0.45"},
    ("RepeatPrevious2x10", "lru"): {"tbb": "~1.0", "sbb10": "below 1", "sbb": "~1.0"},
    ("RepeatPrevious2x10", "linear_transformer"): {"tbb": "~-0.42", "sbb": "~-0.49"},
    ("PositionOnlyCartPoleEasy", "ffm"): {"tbb": "~1.0 by ~2,000 eps", "sbb": "slower to ~1.0"},
    ("PositionOnlyCartPoleEasy", "lru"): {"tbb": "~1.0 by ~2,500 eps", "sbb10": "~0.97, slowest",
                                          "sbb": "slower to ~1.0"},
    ("PositionOnlyCartPoleEasy", "linear_transformer"): {"tbb": "~1.0 by ~2,000 eps",
                                                         "sbb10": "~0.6", "sbb": "slower"},
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, without argparse's usage block
        print(f"reproduce.py: error: {message}", file=sys.stderr)
        sys.exit(2)


def positive(text):
    """An argparse type: an integer > 0."""
    if not text.lstrip("+").isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=("short", "paper"), default="short",
                   help="short: our 300k-step study; paper: the paper's settings per task "
                        "(then --tasks are keys of PAPER_TASKS, and the defaults below change)")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="POPGym env ids (paper: PAPER_TASKS keys), one column of panels each; "
                        "None: all four Easy tasks (paper: all of PAPER_TASKS)")
    p.add_argument("--models", nargs="+", default=list(TBB_SCRIPTS), choices=list(TBB_SCRIPTS),
                   help="memoroids, one row of panels each")
    p.add_argument("--batchings", nargs="+", default=None,
                   help="tbb, or sbbL for segments of L steps; None: tbb sbb10 sbb50 "
                        "(paper: tbb sbb10 sbb50 sbb100)")
    p.add_argument("--seeds", type=positive, default=3, help="seeds 1..N of every configuration")
    p.add_argument("--total-timesteps", type=positive, default=300_000,
                   help="env steps of every run (the short recipe's)")
    p.add_argument("--extra", default="", help="more flags for every run, e.g. '--num-envs 16'")
    p.add_argument("--jobs", type=positive, default=1, help="runs at once")
    p.add_argument("--grid-dir", default=None,
                   help="where the runs go (not committed); None: runs/reproduce[_paper]")
    p.add_argument("--figure", default=None, help="learning curves of every batching, one panel "
                   "per model and task, with 95%% bootstrap bands; None: figures/tbb_vs_sbb.png "
                   "for the whole short grid, GRID_DIR/tbb_vs_sbb.png for any other (paper: "
                   "GRID_DIR/tbb_vs_sbb_paper.png if --batchings is given, else none)")
    p.add_argument("--table", default=None, help="markdown table of final and area-under-curve "
                   "returns of every batching; None: as --figure, .md")
    p.add_argument("--course-figure", default=None, help="README section 5's figure (paper "
                   "recipe): one panel per cell of COURSE_CELLS that has runs, TBB and SBB at "
                   "each L; None: figures/results.png if --recipe paper is given without "
                   "--batchings, --figure and --table (GRID_DIR/results.png for a subset of the "
                   "cells or seeds, other --curves, a --variant or --extra), else none")
    p.add_argument("--course-table", default=None, help="README section 5's table (paper "
                   "recipe), the same cells and batchings, the paper's code and its figure; "
                   "None: figures/results.md, on the same terms as --course-figure")
    p.add_argument("--r2d2", action="store_true", help="README's R2D2 section instead of "
                   "section 5 (paper recipe): the cells of R2D2_CELLS, TBB and SBB from zero, "
                   "from stored states and with a burn-in; the grid runs them, --course-table "
                   "and --course-figure default to figures/r2d2.md and .png")
    p.add_argument("--variant", default="",
                   help="variants joined to our batchings with +, e.g. first_network: "
                        "tbb+first_network, sbb10+first_network, ... (the paper's code stays)")
    p.add_argument("--curves", default=None, help="CSV of every finished run's eval curve, "
                   "kept across grids; None: figures/tbb_vs_sbb[_paper]_curves.csv")
    p.add_argument("--plot-only", action="store_true", help="do not run, only plot and tabulate")
    p.add_argument("--commands", action="store_true", help="do not run: print the shell line of "
                   "every unfinished run, exactly as the runner would start it (for GNU parallel "
                   "or a job array; run them from this folder, then --plot-only)")
    args = p.parse_args(argv)
    if args.plot_only and args.commands:
        p.error("--commands prints the runs to make, --plot-only draws those made: give one")
    if args.curves is not None and (not args.curves.strip() or os.path.isdir(args.curves)):
        p.error(f"--curves {args.curves!r}: a CSV file is needed")
    paper = args.recipe == "paper"
    suffix = "_paper" if paper else ""
    # Committed files (figures/) are the defaults of the documented commands alone: any other
    # set of runs (a subset, other curves, a variant, other flags) is drawn beside its runs.
    documented = (args.tasks is None and args.models == list(TBB_SCRIPTS) and not args.extra
                  and args.curves is None and not args.variant and args.seeds == 3
                  and (paper or args.batchings is None and args.total_timesteps == 300_000))
    # The paper recipe draws the course's table and figure, unless asked for the full ones.
    course = paper and args.batchings is None and args.figure is None and args.table is None
    if args.r2d2 and not course:
        p.error("--r2d2 picks its cells and batchings and draws --course-table and "
                "--course-figure: add --recipe paper, leave out --batchings, --figure, --table")
    detail = not paper or args.batchings is not None or args.figure or args.table
    args.tasks = args.tasks or (list(PAPER_TASKS) if paper else [
        "RepeatFirstEasy", "RepeatPreviousEasy", "CountRecallEasy", "PositionOnlyCartPoleEasy"])
    args.batchings = args.batchings or ["tbb", "sbb10", "sbb50"] + ["sbb100"] * paper
    if args.variant:
        args.batchings = [b if b.startswith("paper-") else f"{b}+{args.variant}"
                          for b in args.batchings]
    args.grid_dir = args.grid_dir or os.path.join("runs", "reproduce" + suffix)
    if detail:  # the paper recipe's are always subsets
        folder = "figures" if documented and not paper else args.grid_dir
        args.figure = args.figure or os.path.join(folder, f"tbb_vs_sbb{suffix}.png")
        args.table = args.table or os.path.join(folder, f"tbb_vs_sbb{suffix}.md")
    if course:  # README's files
        folder = "figures" if documented else args.grid_dir
        name = "r2d2" if args.r2d2 else "results"
        args.course_figure = args.course_figure or os.path.join(folder, f"{name}.png")
        args.course_table = args.course_table or os.path.join(folder, f"{name}.md")
    if (args.course_figure or args.course_table) and not paper:
        p.error("--course-figure and --course-table draw the paper recipe's cells: add "
                "--recipe paper")
    args.curves = args.curves or os.path.join("figures", f"tbb_vs_sbb{suffix}_curves.csv")
    if paper and not set(args.tasks) <= set(PAPER_TASKS):
        p.error(f"--recipe paper knows the tasks {', '.join(PAPER_TASKS)}")
    if not paper and not args.plot_only:
        unknown = [t for t in args.tasks if not known_env(t)]
        if unknown:
            p.error(f"--tasks: {', '.join(unknown)} is neither a POPGym class nor a gymnasium "
                    "id (e.g. RepeatFirstEasy, CartPole-v1)")
    for path, flag in ((args.figure, "--figure"), (args.course_figure, "--course-figure")):
        if path and os.path.splitext(path)[1].lower() not in (".png", ".pdf", ".svg"):
            p.error(f"{flag} {path}: name a .png, .pdf or .svg file")
    if args.r2d2 and not course_cells(args):
        p.error("--r2d2: none of its cells (FFM on RepeatFirstEasy, RepeatPrevious2x10, "
                "CountRecallEasy) is among --tasks and --models")
    for batching in args.batchings:
        b, *variants = batching.removeprefix("paper-").split("+")  # paper-: the paper's own
        # code, plotted, never run (official.py)
        if b != "tbb" and not (b.startswith("sbb") and b[3:].isdigit() and int(b[3:]) > 0):
            p.error(f"unknown batching {b!r}: use tbb or sbbL, e.g. sbb10 (or paper-tbb ...)")
        named = {v for v in variants if not flag_variant(v)}
        if not named <= set(ABLATIONS) | set(FLAG_VARIANTS) | set(RETIRED * args.plot_only):
            p.error(f"{batching}: the variants after + are flag=value (any flag of the "
                    f"scripts, e.g. learning-rate=3e-5), {', '.join(FLAG_VARIANTS)} and "
                    f"{', '.join(ABLATIONS)}")
        lru_ring = any(v.endswith("_lru_init") for v in variants)
        if lru_ring and args.models != ["lru"] and not args.plot_only:  # else the run fails
            p.error(f"{batching}: an LRU starting ring, for --models lru alone")
    if not args.plot_only:
        check_run_flags(args, p)
    return args


# Flags the grid sets for each run; in --extra or a variant they would make every seed (or
# task) one run, or put it where the grid never looks.
GRID_FLAGS = ("--env-id", "--seed", "--total-timesteps", "--exp-name", "--output-dir")


def check_run_flags(args, p):
    """Refuse now, in one line, a flag of --extra or of a variant that every run would stop on
    (unknown, malformed, refused by the training script) or that the grid sets itself."""
    try:
        extra = shlex.split(args.extra)
    except ValueError as e:
        p.error(f"--extra {args.extra!r}: {e}")
    variants = [f for b in args.batchings for v in b.split("+")[1:] for f in flag_variant(v) or []]
    for flag in (f.split("=")[0] for f in extra + variants if f.startswith("--")):
        if flag in GRID_FLAGS:
            p.error(f"{flag} is set for each run by the grid (see --tasks, --seeds, "
                    "--total-timesteps, --grid-dir): leave it out of --extra and the variants")
    for key in (key for key in grid(args) if key[3] == 1):  # seeds differ in --seed alone
        cmd = command(*key, args)[1]
        if cmd is None or os.path.basename(cmd[1]) == "ablations.py":  # its flags: checked
            continue  # as it starts
        flags, err = settings(cmd)["command"][1:], io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                training_parser("--segment-length" in flags, key[1])(flags)
        except SystemExit:
            said = (err.getvalue().strip().splitlines() or ["(no message)"])[-1]
            p.error(f"every run of {key[2]} on {key[0]} ({key[1]}) would stop at once"
                    f"{f' (with --extra {args.extra!r})' if args.extra else ''}: "
                    f"{os.path.basename(cmd[1])}: {said.split(': error: ', 1)[-1]}")


def known_env(name):
    import gymnasium
    import popgym.envs
    return hasattr(popgym.envs, name) or name in gymnasium.registry


def flag_variant(variant):
    """A variant flag=value, e.g. learning-rate=3e-5, as the flags ["--learning-rate", "3e-5"];
    None for any other variant."""
    name, equals, value = variant.partition("=")
    if equals and value and name.replace("-", "").isalpha():
        return [f"--{name}", value]
    return None


def task_flags(task, args, model=None):
    """-> (the flags of `task` (and `model`) under the recipe, its budget in env steps)."""
    if args.recipe == "short":
        return TASK_FLAGS.get(task, []), args.total_timesteps
    env_id, kwargs, R, T, episodes, gamma, end_e, prev_action = PAPER_TASKS[task]
    total = episodes * (R + T)
    flags = ["--env-kwargs", json.dumps(kwargs), "--prev-action", prev_action,
             "--learning-starts", str(episodes * R), "--train-frequency", str(T),
             "--eval-every", str(10 * T), "--log-every", str(10 * T), "--gamma", str(gamma),
             "--end-e", str(end_e), "--buffer-size", str(2 * total), *PAPER_FLAGS,
             *PAPER_MODEL_FLAGS.get((task, model), [])]
    return flags, total


def command(task, model, batching, seed, args):
    """The subprocess for one run: same flags for every batching, apart from the batching.
    None for the paper's own code (benchmarks/official.py puts its curves there)."""
    out = os.path.join(args.grid_dir, task, model, batching, f"seed{seed}")
    if batching.startswith("paper-"):
        return out, None
    base, *variants = batching.split("+")
    if base == "tbb":
        script, batching_flags = TBB_SCRIPTS[model], []
    else:
        script, batching_flags = "sbb_baseline_dqn.py", ["--memory", model,
                                                         "--segment-length", base[3:]]
    ablation = "+".join(v for v in variants if v not in FLAG_VARIANTS and not flag_variant(v))
    if ablation:  # ablations.py runs the script with those functions swapped
        script = os.path.join("benchmarks", "ablations.py")
        if base == "tbb":  # ablations.py picks the TBB script by --memory, as SBB does
            batching_flags = ["--memory", model]
    batching_flags += [f for v in variants for f in FLAG_VARIANTS.get(v, flag_variant(v) or [])]
    flags, total = task_flags(task, args, model)
    env_id = PAPER_TASKS[task][0] if args.recipe == "paper" else task
    return out, [sys.executable, os.path.join(ROOT, script), *([ablation] if ablation else []),
                 "--env-id", env_id, "--seed", str(seed), "--total-timesteps", str(total),
                 "--exp-name", base, "--output-dir", out, *flags, *batching_flags,
                 *shlex.split(args.extra)]


def settings(cmd):
    """What a run is made with: its command without the interpreter and the run's folder, the
    script relative to the project, and the defaults of the flags it leaves out as the training
    script has them now (so a run made before a default changed is another run). Two runs are
    the same run only if these are equal."""
    i = cmd.index("--output-dir")
    flags = [*cmd[2:i], *cmd[i + 2:]]
    memory = flags[flags.index("--memory") + 1] if "--memory" in flags else next(
        m for m, script in TBB_SCRIPTS.items() if script == os.path.basename(cmd[1]))
    sbb_run = "--segment-length" in flags  # SBB, or an ablation of it
    given = {f[2:].split("=")[0].replace("-", "_") for f in flags if f.startswith("--")}
    return {"command": [os.path.relpath(cmd[1], ROOT), *flags],
            "defaults": {k: v for k, v in training_defaults(sbb_run, memory).items()
                         if k not in given | {"output_dir"}}}


@lru_cache(maxsize=None)
def training_parser(sbb_run, memory):
    """parse_args of the script that trains a run (SBB's, or the TBB script of `memory`)."""
    sys.path.insert(0, ROOT)
    import sbb_baseline_dqn as sbb  # jax loads only where settings are needed
    sys.path.remove(ROOT)
    return sbb.parse_args if sbb_run else sbb.load_script(memory).parse_args


@lru_cache(maxsize=None)
def training_defaults(sbb_run, memory):
    """Every flag's default in the script that trains a run (SBB's: with that memory's)."""
    return vars(training_parser(sbb_run, memory)(["--memory", memory] if sbb_run else []))


def settings_id(key, args):
    """The kept curves' name for the settings of run `key` under args: a hash of them, or
    "official" for the paper's own code (its curves are imported by official.py, never run)."""
    cmd = command(*key, args)[1]
    if cmd is None:
        return "official"
    return hashlib.sha256(json.dumps(settings(cmd)).encode()).hexdigest()[:12]


def shell_line(out, cmd):
    """The one shell line that makes a run, from the folder the runner was started in: the run
    folder, its settings in command.json (so that --plot-only knows what it was made with), then
    the run, its output in log.txt. The runner starts exactly these; --commands prints them."""
    q = shlex.quote
    return (f"mkdir -p {q(out)} && printf '%s\\n' {q(json.dumps(settings(cmd)))} > "
            f"{q(os.path.join(out, 'command.json'))} && {shlex.join(cmd)} > "
            f"{q(os.path.join(out, 'log.txt'))} 2>&1")


def read_curve(out, cmd=None):
    """The eval rows of the newest run in `out` as {column: array}, or None if there is none or
    the folder's settings (command.json) are not those of `cmd` (None: the paper's own code)."""
    try:
        if cmd is not None:
            with open(os.path.join(out, "command.json")) as f:
                if json.load(f) != settings(cmd):
                    return None
        runs = [os.path.join(out, d) for d in os.listdir(out)]
    except (OSError, ValueError):  # no settings kept (made by another runner), or no folder
        return None
    runs = [d for d in runs if os.path.isfile(os.path.join(d, "metrics.csv"))]
    if not runs:
        return None
    path = os.path.join(max(runs, key=os.path.getmtime), "metrics.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["eval_return"] != "nan"]
    if not rows:
        return None
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


CURVE = ("global_step", "updates", "eval_return", "density", "elapsed_s")  # what summarise reads
KEY = ("task", "model", "batching", "seed")
RECORD_LOCK = threading.Lock()


def kept_curves(path):
    """{(task, model, batching, seed, settings): eval curve} as kept in the curves CSV `path`.
    Settings "" marks a curve kept before they were recorded (benchmarks/curves_first_network.csv)."""
    rows = {}
    try:
        with open(path) as f:
            for r in csv.DictReader(f):
                key = (r["task"], r["model"], r["batching"], int(r["seed"]), r.get("settings", ""))
                rows.setdefault(key, []).append([float(r[c]) for c in CURVE])
    except FileNotFoundError:  # none kept yet
        pass
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, OSError) as e:
        stop(f"--curves {path}: not a curves CSV of reproduce.py ({type(e).__name__}: {e})")
    return {key: dict(zip(CURVE, np.array(v).T)) for key, v in rows.items()}


def record_curves(args):
    """Copy into args.curves the curves of this grid's runs that have finished in runs/, with a
    hash of their settings. -> (curves, notes): {(task, model, batching, seed): eval curve} of
    the runs asked for that were kept with the settings args asks for (or before settings were
    recorded), always as kept, so that a table from runs/ equals one made later from the CSV
    alone; and one line each on the runs asked for that were kept only with other settings,
    and on those drawn unchecked."""
    kept = kept_curves(args.curves)
    found = {}
    for key in grid(args):
        out, cmd = command(*key, args)
        curve = read_curve(out, cmd)
        if curve is not None and curve["global_step"][-1] >= task_flags(key[0], args)[1]:
            nan = np.full(len(curve["global_step"]), np.nan)  # e.g. the paper code's density
            found[key + (settings_id(key, args),)] = {c: curve.get(c, nan) for c in CURVE}
    if found.keys() - kept.keys():
        write_curves(args.curves, kept | found)
        kept = kept_curves(args.curves)
    return asked_curves(kept, args)


def write_curves(path, kept):
    """Write {(task, model, batching, seed, settings): eval curve} as the curves CSV `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two grids may share the CSV
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(KEY + ("settings",) + CURVE)
        for key in sorted(kept):
            for step, updates, *values in zip(*(kept[key][c] for c in CURVE)):
                writer.writerow([*key, f"{step:.0f}", f"{updates:.0f}",
                                 *(f"{v:.6g}" for v in values)])
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def asked_curves(kept, args):
    """-> (curves, notes) of record_curves, from the kept curves `kept`."""
    asked = set(grid(args)) | set(course_keys(args))
    curves, unchecked, other = {}, {}, set()
    for (*key, made_with), curve in kept.items():
        key = tuple(key)
        if key not in asked:
            continue
        if made_with == settings_id(key, args):
            curves[key] = curve
        elif made_with == "":
            unchecked[key] = curve
        else:
            other.add(key)
    said = {"were kept only with other settings than these: not drawn, and run again by the "
            "grid": sorted(other - curves.keys() - unchecked.keys()),
            "were kept before settings were recorded: drawn unchecked":
            sorted(unchecked.keys() - curves.keys())}
    notes = [f"{len(runs)} of the runs asked for {what} (e.g. {' '.join(map(str, runs[0]))})"
             for what, runs in said.items() if runs]
    return unchecked | curves, notes


def grid(args):
    if args.r2d2:  # no product: each cell has its own L (and two cells share one TBB)
        return list(dict.fromkeys((t, m, ours(b, args), s) for t, m, batchings, _ in
                                  course_cells(args) for b in batchings
                                  for s in range(1, args.seeds + 1)))
    return [(task, model, batching, seed) for task in args.tasks for model in args.models
            for batching in args.batchings for seed in range(1, args.seeds + 1)]


def bootstrap_ci(values, rng, resamples=2000):
    """Mean over seeds (axis 0) and its 95% bootstrap interval (resampling seeds)."""
    values = np.asarray(values)
    idx = rng.integers(0, len(values), (resamples, len(values)))
    means = values[idx].mean(axis=1)
    return values.mean(axis=0), np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def unfinished(args):
    """-> ([(run folder, shell line)] of the grid's runs not yet finished with these settings,
    the notes of record_curves)."""
    curves, notes = record_curves(args)
    todo = [command(*key, args) for key in grid(args) if key not in curves]
    return [(out, shell_line(out, cmd)) for out, cmd in todo if cmd is not None], notes


def last_line(path):
    """The last non-empty line of a run's log, which names what went wrong."""
    try:
        with open(path, errors="replace") as log:
            return ([line.strip() for line in log if line.strip()] or ["(no output)"])[-1]
    except OSError as e:
        return f"(no log: {e.strerror})"


def run_grid(args):
    todo, notes = unfinished(args)
    print(f"{len(todo)} runs to do" + "".join(f"; {note}" for note in notes), flush=True)

    def one(job):
        out, line = job  # exactly what --commands prints
        code = subprocess.run(line, shell=True, executable="/bin/bash").returncode
        print(f"done: {out}" if code == 0 else
              f"FAILED ({code}): {out}: {last_line(os.path.join(out, 'log.txt'))}", flush=True)
        with RECORD_LOCK:
            record_curves(args)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))


def finished_curves(curves, task, model, batching, args):
    seeds = [(task, model, batching, s) for s in range(1, args.seeds + 1)]
    return [curves[key] for key in seeds if key in curves]


def first_reaching(curve, level):
    """Updates before the first evaluation at `level` or more (how fast), or "never"."""
    reached = np.flatnonzero(curve["eval_return"] >= level)
    return f"{curve['updates'][reached[0]]:,.0f}" if reached.size else "never"


def stop(message):
    """One line on stderr, exit code 2."""
    print(f"reproduce.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_outputs(args):
    """Stop now, in one line that names the flag, if a file or folder this call will write
    cannot be written: not after the runs."""
    paths = [("--curves", args.curves), ("--figure", args.figure), ("--table", args.table),
             ("--course-figure", args.course_figure), ("--course-table", args.course_table)]
    folders = [("--grid-dir", args.grid_dir)] * (not args.plot_only)
    for flag, folder in folders + [(f, os.path.dirname(p) or ".") for f, p in paths if p]:
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except (FileExistsError, NotADirectoryError):
            stop(f"{flag} {folder}: cannot write there (a file is in the way)")
        except OSError as e:
            stop(f"{flag} {folder}: cannot write there ({e.strerror or e})")
    for flag, path in paths:
        if path and os.path.isdir(path):
            stop(f"{flag} {path} is a folder: name a file")


def nothing_to_plot(args, what):
    """Stop with one line on stderr (exit code 2) that names what is missing."""
    where = (f"--curves {args.curves} does not exist" if not os.path.isfile(args.curves)
             else f"--curves {args.curves} has none")
    short = "" if args.recipe == "paper" else (
        "; the 300k-step study's curves were never kept (its figure and table are "
        "figures/tbb_vs_sbb.png and .md): run the grid first")
    stop(f"nothing to plot: no finished runs of {what} under {args.grid_dir}, and {where}{short}")


def modified(path):
    return os.stat(path).st_mtime_ns if os.path.isfile(path) else None


def summarise(args, curves_before=False):
    """Record the finished runs' curves, then draw what args asks for and say what was written:
    the curves CSV if it changed since `curves_before` (its modified() before the runs; by
    default, now), the figure and table of every batching (--figure, --table) and README's
    (--course-figure, --course-table)."""
    before = modified(args.curves) if curves_before is False else curves_before
    curves, notes = record_curves(args)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    wrote = [args.curves] if modified(args.curves) != before else []
    if args.figure or args.table:
        wrote += summarise_batchings(curves, args)
    if args.course_figure or args.course_table:
        wrote += summarise_course(curves, args)
    for path in wrote:
        print(f"wrote {path}")


def summarise_batchings(curves, args):
    """One panel per (model, task), one colour per batching; a markdown table of the same runs."""
    runs = {(m, t, b): finished_curves(curves, t, m, b, args)
            for m in args.models for t in args.tasks for b in args.batchings}
    if not any(runs.values()):
        nothing_to_plot(args, f"--batchings {' '.join(args.batchings)}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    rows, cols = len(args.models), len(args.tasks)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    lines = ["| task | model | batching | seeds | final return (95% CI) | area under curve (95% CI)"
             " | updates | density | minutes per run | final best-so-far (95% CI) | paper |"
             " updates to the first eval >= 0.9, per seed | mean eval after the first update"
             " (95% CI) |", "|---" * 13 + "|"]
    for i, model in enumerate(args.models):
        for j, task in enumerate(args.tasks):
            ax = axes[i][j]
            for batching in args.batchings:
                curves = runs[model, task, batching]
                if not curves:
                    continue
                n = min(len(c["global_step"]) for c in curves)  # same log points for every seed
                steps = curves[0]["global_step"][:n]
                returns = np.stack([c["eval_return"][:n] for c in curves])
                mean, low, high = bootstrap_ci(returns, rng)
                colour = COLOURS.get(batching)
                own, *variants = batching.removeprefix("paper-").split("+")
                label = ("TBB" if own == "tbb" else f"SBB, L = {own[3:]}") + "".join(
                    f" + {v}" for v in variants) + (
                    ", the paper's code" if batching.startswith("paper-") else "")
                label = textwrap.fill(label, 34)  # a long list of variants: several lines
                ax.plot(steps, mean, color=colour, label=label)
                ax.fill_between(steps, low, high, color=colour, alpha=0.2)
                # The paper plots the best eval so far; dashed, so that both can be compared.
                best = np.maximum.accumulate(returns, axis=1)
                ax.plot(steps, best.mean(axis=0), color=colour, linestyle="--", linewidth=0.8)
                final_best = bootstrap_ci(best[:, -1], rng)
                paper = PAPER_FIG3.get((task, model), {})
                paper = paper.get(own, paper.get("sbb" if own != "tbb" else "", ""))
                final = bootstrap_ci(returns[:, -1], rng)
                auc = bootstrap_ci(returns.mean(axis=1), rng)
                # Compute is equal by construction: the same updates of the same B slots.
                updates = np.mean([c["updates"][-1] for c in curves])
                density = np.concatenate([c["density"] for c in curves])
                density = (np.nanmean(density) if np.isfinite(density).any()
                           else 1.0 if batching == "tbb" else np.nan)
                minutes = np.mean([c["elapsed_s"][-1] for c in curves]) / 60
                # learning fast and staying learned (the random phase's evaluations left out)
                after = bootstrap_ci([np.mean(c["eval_return"][c["updates"] >= 1])
                                      if (c["updates"] >= 1).any() else np.nan
                                      for c in curves], rng)
                lines.append(f"| {task} | {model} | {batching} | {len(curves)} | "
                             f"{final[0]:+.3f} ({final[1]:+.3f}, {final[2]:+.3f}) | "
                             f"{auc[0]:+.3f} ({auc[1]:+.3f}, {auc[2]:+.3f}) | "
                             f"{updates:,.0f} | {density:.2f} | {minutes:.1f} | "
                             f"{final_best[0]:+.3f} ({final_best[1]:+.3f}, {final_best[2]:+.3f})"
                             f" | {paper if args.recipe == 'paper' else ''} | "
                             f"{', '.join(first_reaching(c, 0.9) for c in curves)} | "
                             f"{after[0]:+.3f} ({after[1]:+.3f}, {after[2]:+.3f}) |")
            ax.set_title(f"{task} ({model})", fontsize=10)
            ax.set(xlabel="environment steps" if i == rows - 1 else None,
                   ylabel="mean greedy eval return" if j == 0 else None)
            ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
            ax.grid(alpha=0.3)
    labels = {}  # every batching once, from whichever panel drew it
    for ax in axes.flat:
        if not ax.lines:
            ax.set_visible(False)  # no finished run for this model and task
        labels |= dict(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(labels.values(), labels.keys(), loc="lower center", ncol=min(len(labels), 4),
               fontsize=8, title="mean over seeds (the table gives how many), 95% CI; "
               "dashed: best so far", title_fontsize=8)
    extra_lines = sum(label.count("\n") for label in labels)
    legend_inches = 0.2 * (2 + (len(labels) - 1) // 4 + extra_lines)  # title, rows of four
    fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
    for path in (args.figure, args.table):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(args.figure, dpi=110)
    plt.close(fig)
    with open(args.table, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return [args.figure, args.table]


# README section 5: the 12 cells of the paper's Fig. 3, at its recipe, and its batchings.
COURSE_CELLS = tuple((task, model) for task in PAPER_TASKS for model in TBB_SCRIPTS)
COURSE_BATCHINGS = ("tbb", "sbb10", "sbb50", "sbb100")
COURSE_SMOOTHING = 21  # evaluations in the course figure's moving mean (210 updates)
MODEL_NAMES = {"ffm": "FFM", "lru": "LRU", "linear_transformer": "linear transformer"}
# README's R2D2 section (issue 37): FFM where SBB from zero lost most to TBB, (task, model, L);
# each cell's columns are TBB, SBB at L from zero, from stored states, and with a burn-in N = L.
R2D2_CELLS = (("RepeatFirstEasy", "ffm", 10), ("RepeatPrevious2x10", "ffm", 10),
              ("CountRecallEasy", "ffm", 10), ("CountRecallEasy", "ffm", 50))
R2D2_COLUMNS = ("TBB", "SBB from zero", "SBB from stored states", "stored + burn-in N = L")


def course_cells(args):
    """The cells README draws under args: [(task, model, its batchings, one per column, name)]."""
    if args.r2d2:
        return [(t, m, r2d2_batchings(L), f"{t}, {MODEL_NAMES[m]}, L = {L}")
                for t, m, L in R2D2_CELLS if t in args.tasks and m in args.models]
    return [(t, m, COURSE_BATCHINGS, f"{t}, {MODEL_NAMES[m]}") for t, m in COURSE_CELLS
            if t in args.tasks and m in args.models]


def r2d2_batchings(L):
    return ("tbb", f"sbb{L}", f"sbb{L}+stored_state", f"sbb{L}+stored_state+burn-in={L}")


def course_columns(args):
    """-> (the column names of README's table under args, their colours in its figure)."""
    names, batchings = ((R2D2_COLUMNS, r2d2_batchings(10)) if args.r2d2 else
                        (tuple(map(batching_name, COURSE_BATCHINGS)), COURSE_BATCHINGS))
    return names, [COLOURS[b] for b in batchings]


def course_keys(args):
    """Every run README may draw under args: ours and the paper code's (section 5), per seed."""
    if args.recipe != "paper":
        return []
    paper = () if args.r2d2 else ("paper-",)  # the paper never ran R2D2's SBB
    return [(t, m, b, s) for t, m, batchings, _ in course_cells(args) for own in batchings
            for b in (ours(own, args), *(f"{p}{own}" for p in paper))
            for s in range(1, args.seeds + 1)]


def ours(batching, args):
    """Our batching as the kept curves label it under --variant."""
    return f"{batching}+{args.variant}" if args.variant else batching


def batching_name(batching):
    return "TBB" if batching == "tbb" else f"SBB L = {batching[3:]}"


def course_table(curves, args):
    """README section 5's table, as markdown, two rows per cell: our final eval (mean over
    seeds, 95% bootstrap interval) and each seed's updates to the first eval >= 0.9; then the
    paper's code run here (final eval; updates to 0.9) and the paper's Fig. 3, for TBB and SBB
    at each L. A batching without finished runs says so; every cell of COURSE_CELLS has its
    rows. With --r2d2, R2D2's table: our row alone, for every cell of R2D2_CELLS."""
    def updates(runs):
        reached = [first_reaching(c, 0.9) for c in runs]
        return "never" if set(reached) == {"never"} else ", ".join(reached)

    head = (["cell: final eval (95% CI); updates to 0.9"] if args.r2d2 else  # one row a cell
            ["cell of Fig. 3", "row"]) + list(course_columns(args)[0])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for task, model, batchings, name in course_cells(args):
        ours_row, paper_row = [], []
        paper = PAPER_FIG3.get((task, model), {})
        for b in batchings:
            runs = finished_curves(curves, task, model, ours(b, args), args)
            if runs:
                last = np.array([c["eval_return"][-1] for c in runs])
                mean, low, high = bootstrap_ci(last, np.random.default_rng(0))
                ours_row.append(f"{mean:+.2f} ({low:+.2f}, {high:+.2f})" if len(runs) == args.seeds
                                else f"{mean:+.2f} ({len(runs)} seed{'s' * (len(runs) > 1)})")
                ours_row[-1] += f"; {updates(runs)}"
            else:
                ours_row.append("no run kept")
            runs = finished_curves(curves, task, model, f"paper-{b}", args)
            mean = np.mean([c["eval_return"][-1] for c in runs]) if runs else 0.0
            code = (f"{mean:+.2f}{f' (mean of {len(runs)})' * (len(runs) > 1)}; "
                    f"{updates(runs)}" if runs else "no run kept")
            figure = paper.get(b, paper.get("sbb" if b != "tbb" else "", "not read"))
            paper_row.append(f"{code} / {figure}")
        if args.r2d2:
            lines.append(f"| {name} | " + " | ".join(ours_row) + " |")
            continue
        for label, row in (("ours: final eval (95% CI); updates to 0.9", ours_row),
                           ("paper's code here (final; updates to 0.9) / Fig. 3", paper_row)):
            lines.append(f"| {name} | {label} | " + " | ".join(row) + " |")
            name = ""
    return "\n".join(lines) + "\n"


def smoothed(values, window):
    """Centred moving mean along the last axis: each point the mean of the `window` points
    around it (window odd; fewer at either end)."""
    half, n = window // 2, values.shape[-1]
    total = np.concatenate([np.zeros(values.shape[:-1] + (1,)), np.cumsum(values, axis=-1)], -1)
    lo, hi = np.maximum(np.arange(n) - half, 0), np.minimum(np.arange(n) + half + 1, n)
    return (total[..., hi] - total[..., lo]) / (hi - lo)


def course_figure(curves, args, path):
    """README section 5's figure: one panel per cell that has runs, x from the first update,
    one colour per batching, the mean over seeds of each seed's moving-mean curve with a 95%
    bootstrap band. -> the cells drawn, [(task, model), ...]; no file if none."""
    panels = []
    names, colours = course_columns(args)
    for task, model, batchings, title in course_cells(args):
        lines = {}
        for column, b in enumerate(batchings):
            runs = finished_curves(curves, task, model, ours(b, args), args)
            if runs:
                n = min(len(c["updates"]) for c in runs)
                keep = runs[0]["updates"][:n] >= 1  # from the first update on
                returns = np.stack([c["eval_return"][:n][keep] for c in runs])
                lines[column] = (runs[0]["updates"][:n][keep],
                                 smoothed(returns, COURSE_SMOOTHING))
        if lines:
            panels.append((task, model, title, lines))
    if not panels:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {m for _, m, _, _ in panels}
    if len(panels) == len(models) * len({t for t, _, _, _ in panels}) > 6:
        cols = len(models)  # every cell of a tasks x models grid: a row per task, as Fig. 3
    else:
        cols = 2 if len(panels) == 4 else min(len(panels), 4 if len(panels) > 6 else 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows + 0.6), squeeze=False)
    for ax, (task, model, title, lines) in zip(axes.flat, panels):
        for column, (x, returns) in lines.items():
            mean, low, high = bootstrap_ci(returns, np.random.default_rng(0))
            ax.plot(x, mean, color=colours[column], linewidth=1.2)
            ax.fill_between(x, low, high, color=colours[column], alpha=0.2, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max(x[-1] for x, _ in lines.values()))
        ax.set_xlabel("updates", fontsize=9)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("greedy eval return", fontsize=9)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.legend([plt.Line2D([], [], color=c) for c in colours], names, loc="upper center",
               ncol=len(names), fontsize=9, frameon=False)
    variant = f", our batchings +{args.variant}" if args.variant else ""
    caption = textwrap.wrap(f"The paper's recipe{variant}: mean over seeds (the table says how "
                            f"many) of each seed's centred moving mean over {COURSE_SMOOTHING} "
                            f"evaluations ({10 * COURSE_SMOOTHING} updates), 95% bootstrap band",
                            60 * cols)  # as many lines as the figure's width needs
    fig.suptitle("\n".join(caption), y=0.005, va="bottom", fontsize=8)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, (0.05 + 0.15 * len(caption)) / height, 1, 1 - 0.2 / height), pad=0.6)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [(task, model) for task, model, _, _ in panels]


def summarise_course(curves, args):
    """README section 5's table (printed, and written to --course-table) and figure."""
    if not any(finished_curves(curves, t, m, ours(b, args), args)
               for t, m, batchings, _ in course_cells(args) for b in batchings):
        nothing_to_plot(args, "the course cells with " + " ".join(sorted(
            {ours(b, args) for _, _, batchings, _ in course_cells(args) for b in batchings})))
    wrote = []
    if args.course_table:
        table = course_table(curves, args)
        os.makedirs(os.path.dirname(args.course_table) or ".", exist_ok=True)
        with open(args.course_table, "w") as f:
            f.write(table)
        print(table, end="")
        wrote.append(args.course_table)
    if args.course_figure and course_figure(curves, args, args.course_figure):
        wrote.append(args.course_figure)
    return wrote


if __name__ == "__main__":
    a = parse_args()
    if a.commands:
        try:
            print("\n".join(line for _, line in unfinished(a)[0]), flush=True)
        except BrokenPipeError:  # | head: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit()
    check_outputs(a)
    curves_before = modified(a.curves)
    if not a.plot_only:
        run_grid(a)
    summarise(a, curves_before)
