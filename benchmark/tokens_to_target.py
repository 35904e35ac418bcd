"""
Tokens-to-target of stage-1 runs: the four targets at every evaluation against the training
tokens seen (padding excluded), and the first evaluation at which each target, and all four,
is met. A change to stage 1 is judged by how many tokens it needs, not by one end point.

    python benchmark/tokens_to_target.py runs/grid_pathfinding/base runs/benchmark/grid_pathfinding/base
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # noqa: E402  (benchmark/run.py, beside this file)
from model import OneLineParser, run_main  # noqa: E402

TARGETS = run.TARGETS["base"]  # the stage-1 targets


def meets(record, key):
    return run.meets(record, key, TARGETS[key])


def evaluations(folder):
    """The evaluation records of a run's log.jsonl (those with answer_accuracy), in step order."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{folder} has no log.jsonl: give a stage-1 run folder")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "answer_accuracy" in r]


def report(folder):
    rows = evaluations(folder)
    if not rows:
        raise ValueError(f"{folder}/log.jsonl has no evaluation yet")
    print(folder)
    print(f"  {'step':>6} {'tokens':>10} " + " ".join(f"{k:>15}" for k in TARGETS))
    for r in rows:
        tokens = r.get("train_tokens")
        print(f"  {r['step']:>6} {'-' if tokens is None else f'{tokens / 1e6:.2f}M':>10} "
              + " ".join(f"{r[k]:>14.4f}{'*' if meets(r, k) else ' '}" for k in TARGETS))
    for key in [*TARGETS, "all four"]:
        first = next((r for r in rows if all(meets(r, k) for k in (TARGETS if key == "all four" else [key]))), None)
        tokens = "" if first is None or "train_tokens" not in first else f", {first['train_tokens'] / 1e6:.2f}M tokens"
        where = "not met" if first is None else f"step {first['step']}{tokens}"
        print(f"  first meets {key}: {where}")


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="stage-1 run folders")
    for folder in parser.parse_args(argv).runs:
        report(folder)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
