"""Read a log of the paper's own code into our metrics.csv columns, to plot it beside our runs.

The paper's code (proroklab/memory-monoids, tape_dqn.py / segment_dqn.py) prints little
without wandb. Run it with one line added after its evaluation (never committed here), which
prints, flushed, per evaluation:

    EVAL,<time>,<seconds since start>,epoch=..,train_epoch=..,transitions_collected=..,
    transitions_trained=..,eval_mean=..,eval_best=..,eval_min=..,eval_max=..,train_ep_reward=..,
    loss=..,eps=..,train_time_total=..

(one line; `epoch` counts episodes, random ones included; `train_epoch` counts updates). This
script turns those lines into metrics.csv rows under the folder where benchmarks/reproduce.py
looks for batching `paper-<batching>`, each at the env step where our run of the same recipe
makes the same update: random-action episodes times R plus updates times T (its log cannot
give its own steps: the segment code counts segments). R defaults to T; PositionOnlyCartPole,
whose episodes vary, takes R = 22 and T = 200, as in reproduce.py. E.g.:

    python benchmarks/official.py paper.log --episode-length 51 \\
        --out runs/reproduce_paper/RepeatFirstEasy/ffm/paper-tbb/seed1
"""

import argparse
import csv
import os


NEEDED = ("epoch", "train_epoch", "eval_mean", "eval_best", "loss", "eps")  # what to_metrics reads


def read_evals(lines):
    """The EVAL lines of a log as dicts of floats (plus elapsed_s). A malformed one raises
    ValueError naming its line number."""
    rows = []
    for number, line in enumerate(lines, 1):
        if line.startswith("EVAL,"):
            fields = line.strip().split(",")
            try:
                row = {k: float(v) for k, v in (f.split("=") for f in fields[3:])}
                missing = [k for k in NEEDED if k not in row]
                if missing or len(fields) < 3:
                    raise ValueError(f"no {', '.join(missing) or 'time'}")
                rows.append(row | {"elapsed_s": float(fields[2])})
            except ValueError as e:
                raise ValueError(f"line {number} is not an EVAL line of this script's docstring "
                                 f"({e})") from None
    return rows


def to_metrics(rows, episode_length, random_episode_length):
    return [{"global_step": int(r["epoch"] - r["train_epoch"]) * random_episode_length
             + int(r["train_epoch"]) * episode_length, "episodes": int(r["epoch"]),
             "updates": int(r["train_epoch"]), "eval_return": r["eval_mean"],
             "eval_best": r["eval_best"], "td_loss": r["loss"], "epsilon": r["eps"],
             "elapsed_s": r["elapsed_s"]} for r in rows]


def positive(text):
    """An argparse type: an integer > 0."""
    if not text.lstrip("+").isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, without argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("log", help="a log of the paper's code with EVAL lines")
    p.add_argument("--episode-length", type=positive, required=True,
                   help="T: steps per update in our recipe (the task's episode length)")
    p.add_argument("--random-episode-length", type=positive,
                   help="R: steps per random-action episode in our recipe (default: T)")
    p.add_argument("--out", required=True, help="run folder; metrics.csv goes in out/paper/")
    args = p.parse_args(argv)
    if not args.out.strip():
        p.error("--out: name the run folder")
    try:
        with open(args.log, errors="replace") as f:
            rows = to_metrics(read_evals(f), args.episode_length,
                              args.random_episode_length or args.episode_length)
    except OSError as e:
        p.error(f"log {args.log!r}: cannot read it ({e.strerror})")
    except ValueError as e:
        p.error(f"log {args.log}: {e}")
    if not rows:
        p.error(f"log {args.log}: no EVAL lines")
    try:
        os.makedirs(os.path.join(args.out, "paper"), exist_ok=True)
        with open(os.path.join(args.out, "paper", "metrics.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as e:
        p.error(f"--out {args.out}: cannot write there ({e.strerror or e})")
    print(f"{len(rows)} evaluations, last at episode {rows[-1]['episodes']}: eval mean "
          f"{rows[-1]['eval_return']:+.3f}, best so far {rows[-1]['eval_best']:+.3f}")


if __name__ == "__main__":
    main()
