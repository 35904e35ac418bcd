"""
Tokens-to-target of stage-1 runs: the four targets at every evaluation against the training
tokens seen (padding excluded), and the first evaluation at which each target, and all four,
is met. A change to stage 1 is judged by how many tokens it needs, not by one end point.

    python benchmark/tokens_to_target.py runs/grid_pathfinding/base runs/benchmark/grid_pathfinding/base
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import run  # noqa: E402  (benchmark/run.py, beside this file)
from model import OneLineParser, run_main  # noqa: E402

TARGETS = run.TARGETS["base"]  # the stage-1 targets


def report(folder):
    rows = run.evaluations(folder)
    if not rows:
        raise ValueError(f"{folder}/log.jsonl has no evaluation yet")
    print(folder)
    print(f"  {'step':>6} {'tokens':>10} {'minutes':>8} " + " ".join(f"{k:>15}" for k in TARGETS))
    for r in rows:
        tokens, seconds = r.get("train_tokens"), r.get("train_seconds")
        print(f"  {r['step']:>6} {'-' if tokens is None else f'{tokens / 1e6:.2f}M':>10} "
              f"{'-' if seconds is None else f'{seconds / 60:.1f}':>8} "
              + " ".join(f"{r[k]:>14.4f}{'*' if run.meets(r, k, TARGETS[k]) else ' '}" for k in TARGETS))
    for key in [*TARGETS, "all four"]:
        print(f"  first meets {key}: {run.where_met(run.first_meeting(rows, TARGETS if key == 'all four' else [key]))}")


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="stage-1 run folders")
    for folder in parser.parse_args(argv).runs:
        report(folder)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
