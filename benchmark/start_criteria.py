"""
Label-free criteria for choosing among the starts of a discrete run (--starts), next to the
labelled metrics, at two steps of each start: how well would each criterion choose?

    python benchmark/start_criteria.py --task grid --seed 0 --base runs/grid_pathfinding/base
    python benchmark/start_criteria.py --task add --seed 1 --steps 300 600 --out criteria.jsonl

For each start (seed, seed+1000, ..) of `disentangle.py --task TASK --seed SEED` it trains the
recipe to each step in --steps and prints one JSON line: on the 512 "select" pairs the run's
choice reads, the hard-EM objective under the posterior (the recipe's tie-break among the starts
that agree, disentangle.choose_start), under the router and under a uniform router, the log
marginal likelihood and the posterior entropy; on held-out inputs, alignment, coverage and router
accuracy. A last line gives the agreement of the starts' partitions at the first step and the
start the recipe goes on with (disentangle.choose_start). About 10 minutes per start on grid, on
one core.
"""

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import disentangle as D  # noqa: E402
from evaluate import (factorization_metrics, hard_em_objective, latent_log_likelihoods,  # noqa: E402
                      posterior_distribution, router_distribution)

LABELLED = ("alignment_one_to_one", "local_strategy_full_coverage_rate", "router/answer_accuracy")


def criteria(fact, task, pairs):
    """The label-free scores of a factorization on pairs (higher is better, but for the entropy)."""
    latent_logp = latent_log_likelihoods(fact, task, pairs)  # (N, K)
    router_logp = router_distribution(fact, task, [x for x, _ in pairs]).log()  # (N, K)
    joint = latent_logp + router_logp
    posterior = joint.log_softmax(1)
    posterior_logq = posterior_distribution(fact, task, pairs).clamp(min=1e-12).log()  # (N, K)
    return {"hard_em_posterior": hard_em_objective(latent_logp, posterior_logq),
            "hard_em": hard_em_objective(latent_logp, router_logp),
            "hard_em_uniform_router": hard_em_objective(latent_logp, torch.full_like(joint, -math.log(fact.K))),
            "log_marginal": torch.logsumexp(joint, 1).mean().item(),
            "posterior_entropy": -(posterior.exp() * posterior).sum(1).mean().item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="", help="base run folder (default runs/<task>/base)")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 600], help="where to score each start")
    parser.add_argument("--inputs", type=int, default=200, help="held-out inputs of the labelled metrics")
    parser.add_argument("--out", default="", help="also append the lines to this file")
    args = parser.parse_args(argv)
    steps = sorted(args.steps)
    cfg, given = D.parse_config(D.Config, ["--task", args.task, "--latent", "discrete", "--seed", str(args.seed),
                                           "--base", args.base, "--starts", str(args.starts),
                                           "--start-steps", str(steps[0])])
    D.apply_recipe(cfg, given)
    cfg.validate(given, len(D.get_task(cfg.task).strategies))
    cfg.precision = D.resolve_precision(cfg.precision, "cpu")
    base, task, base_dir, base_ckpt = D.load_base(cfg, "cpu")
    pairs = D.training_pairs(task, base, cfg, 0, "cpu", "select", D.CLUSTER_PAIRS)
    starts = []
    for start in range(args.starts):
        trained = D.train_start(cfg, base, task, base_dir, base_ckpt, "cpu", start)  # to steps[0]
        starts.append(trained)  # its objective and assignment stay those of steps[0]
        start_cfg = D.replace(cfg, seed=D.start_seed(cfg.seed, start))
        for first, step in zip([steps[0]] + steps, steps):
            trained.fact.train()
            D.train_steps(trained.fact, base, task, trained.optimizer, start_cfg, "cpu", first, step, lambda r: None)
            scores = criteria(trained.fact, task, pairs)
            metrics, _ = factorization_metrics(trained.fact, task, args.inputs, cfg.seed)
            report({"task": task.name, "seed": args.seed, "start": start, "step": step, **scores,
                    **{k: metrics[k] for k in LABELLED}}, args.out)
    choice = D.choose_start(starts)  # the recipe's choice at steps[0]
    report({"task": task.name, "seed": args.seed, "step": steps[0], "start/agreement": choice.agreement,
            "start/support": choice.support, "start/chosen": choice.chosen}, args.out)
    return 0


def report(record, out):
    """Print one JSON line, and append it to the file out when given."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    sys.exit(main())
