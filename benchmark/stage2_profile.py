"""
Where a stage-2 recipe run spends its time: the parts of one optimisation step (data, the base
model's pass, the generator's forward over every latent or sample, the posterior, the JSD, the
backward, the optimizer), one evaluation (router samples, controlled decodes, the posterior,
the rest), the k-means start and one hard-EM step, each timed on its own and scaled to the
recipe's counts of steps, evaluations and reassignments.

    python benchmark/stage2_profile.py --task grid --latent discrete --base runs/grid_pathfinding/base
    python benchmark/stage2_profile.py --task sort --latent discrete --precision fp32

Without --base it uses an untrained base model of the default size (the cost per step does not
depend on what the weights are; the y lengths come from the task).
"""

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import disentangle as D  # noqa: E402
import evaluate  # noqa: E402
from model import GPT, GPTConfig, autocast, configure_optimizer, resolve_precision  # noqa: E402
from tasks import VOCAB, get_task  # noqa: E402


def timer(seconds, name, fn):
    """fn, adding the seconds each call takes to seconds[name] (generate_ys: greedy decodes apart)."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[name + (" (greedy, controlled)" if kwargs.get("temperature") == 0.0 else "")] += \
            time.perf_counter() - start
        return out
    return timed


def profile_step(fact, base, task, optimizer, cfg, step, seconds):
    """One train_step, part by part; the parts of the forward are timed again on their own."""
    clock = time.perf_counter()
    batch = D.make_batch(task, D.training_pairs(task, base, cfg, step, "cpu"), fact.K, "cpu")
    seconds["data"] += time.perf_counter() - clock
    with autocast("cpu", cfg.precision):
        stats = D.base_token_stats(base, batch)
        states = stats.states if cfg.cluster_init else None  # a frozen posterior reads the base pass
        parts = {"base pass": lambda: D.base_token_stats(base, batch),
                 "posterior": lambda: fact.posterior_params(batch["base_idx"], batch["y_state_mask"], states)}
        if fact.K:
            logits = fact.lm(batch["gen_idx"])
            if cfg.hard_em:  # the E-step's evidence over all K; the assigned rows are trained after it
                parts["generator forward, no grad"] = torch.no_grad()(lambda: fact.lm(batch["gen_idx"]))
            else:
                parts["generator forward"] = lambda: fact.lm(batch["gen_idx"])
            parts["jsd"] = lambda: D.jsd_loss(logits, batch["base_mask"].float(), fact.K)
        else:
            parts["generator forward"] = lambda: D.continuous_pass(fact, batch, cfg.samples)
        for name, part in parts.items():
            clock = time.perf_counter()
            part()
            seconds[f"  {name} (alone)"] += time.perf_counter() - clock
        clock = time.perf_counter()
        obj = D.objective(fact, base, batch, cfg)
        seconds["objective (forward)"] += time.perf_counter() - clock
    clock = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    obj.loss.backward()
    seconds["backward"] += time.perf_counter() - clock
    clock = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(fact.parameters(), cfg.grad_clip)
    optimizer.step()
    seconds["optimizer"] += time.perf_counter() - clock


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="grid")
    parser.add_argument("--latent", default="discrete")
    parser.add_argument("--base", default="", help="a base run folder (default: an untrained base)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=10, help="steps timed")
    args = parser.parse_args(argv)
    cfg, given = D.parse_config(D.Config, ["--task", args.task, "--latent", args.latent])
    D.apply_recipe(cfg, given)
    cfg.precision = resolve_precision(args.precision, "cpu")
    if args.base:
        base, task, base_dir, base_ckpt = D.load_base(D.Config(task=args.task, base=args.base), "cpu")
    else:
        torch.manual_seed(0)
        base = GPT(GPTConfig(vocab_size=len(VOCAB))).eval()
        task, base_dir, base_ckpt = get_task(args.task), ".", {"model": base.state_dict(),
                                                               "model_config": vars(base.config)}
    fact = D.build_factorization(cfg, task, base_dir, base_ckpt, "cpu")
    optimizer = configure_optimizer(fact, cfg.lr, cfg.weight_decay)
    step_s, once_s, eval_s = defaultdict(float), defaultdict(float), defaultdict(float)
    clock = time.perf_counter()
    D.start_at_base(fact, base, task, cfg, "cpu")
    once_s["step-0 check and k-means start"] = time.perf_counter() - clock
    fact.train()
    profile_step(fact, base, task, optimizer, cfg, 0, defaultdict(float))  # warm-up
    for step in range(1, args.steps + 1):
        profile_step(fact, base, task, optimizer, cfg, step, step_s)
    if cfg.reassign:
        clock = time.perf_counter()
        D.reassign_clusters(fact, base, task, cfg, cfg.reassign)
        once_s["one hard-EM step"] = time.perf_counter() - clock
    for name in ("generate_ys", "posterior_distribution", "router_distribution", "linear_probe_accuracy"):
        setattr(evaluate, name, timer(eval_s, name, getattr(evaluate, name)))
    clock = time.perf_counter()
    evaluate.factorization_metrics(fact, task, cfg.eval_inputs, cfg.seed)
    eval_total = time.perf_counter() - clock
    eval_s["rest"] = eval_total - sum(eval_s.values())

    step = {k: v / args.steps for k, v in step_s.items()}
    step_total = sum(v for k, v in step.items() if not k.startswith("  "))
    # --starts N: each start trains start_steps from its own k-means start, the chosen one goes on to steps
    first = cfg.start_steps if cfg.starts > 1 else 0
    trained = [range(1, first + 1)] * (cfg.starts - 1) + [range(1, cfg.steps + 1)]
    refit_until = cfg.steps if cfg.hard_em else cfg.steps // 2
    n_steps = sum(len(r) for r in trained)
    n_reassign = sum(d % cfg.reassign == 0 and d <= refit_until for r in trained for d in r) if cfg.reassign else 0
    n_evals = (cfg.steps - first) // cfg.eval_interval + 1  # the final one reads final_inputs instead
    run = {"training steps": n_steps * step_total,
           "evaluations": eval_total * (n_evals - 1 + cfg.final_inputs / cfg.eval_inputs),
           "step-0 check and k-means start": cfg.starts * once_s["step-0 check and k-means start"],
           "hard-EM steps": n_reassign * once_s.get("one hard-EM step", 0.0)}
    total = sum(run.values())
    print(f"{task.name}, {cfg.latent}, {cfg.precision}, {torch.get_num_threads()} threads: "
          f"{step_total:.3f} s/step, one evaluation of {cfg.eval_inputs} inputs {eval_total:.1f} s")
    print(f"a recipe run ({cfg.starts} starts, {n_steps} steps, {n_evals} evaluations, {n_reassign} hard-EM "
          f"steps), estimated {total / 60:.1f} min:")
    for name, seconds in run.items():
        print(f"  {name:34s} {seconds:7.1f} s  {seconds / total:6.1%}")
    print("one step:")
    for name, seconds in step.items():
        print(f"  {name:34s} {seconds:7.3f} s  {seconds / step_total:6.1%}")
    print("one evaluation:")
    for name, seconds in eval_s.items():
        print(f"  {name:34s} {seconds:7.2f} s  {seconds / eval_total:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
