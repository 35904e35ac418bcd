"""
Stage 1: train the entangled base model p_theta(y|x) on a mixture of strategies.

Each record is drawn from the data-generating process: x from the task's training split,
s ~ p*(s|x), y = trace(x, s). The model sees

    <bos> <x> ... </x> <z> <z_empty> </z> <y> ... </y> <eos>

and is trained by maximum likelihood on the y tokens only (y, </y>, <eos>):

    L(theta) = - E_{x, s, y} [ sum_t log p_theta(y_t | x, y_<t) ]

At the few tokens where x's traces part, the sampled token is replaced by its expectation, the
data's exact next-token distribution q_t = p*(. | x, y_<t) (Task.branch_targets, y_loss):

    L(theta) = - E_{x, s, y} [ sum_t sum_v q_t(v) log p_theta(v | x, y_<t) ]

the same loss in expectation, without the noise of which strategy each record drew, which
otherwise leaves the model's branch probabilities several points off (docs/experiments.md).
The strategy is never shown, so the model learns the mixture p(y|x) = sum_s p*(s|x) p(y|x,s):
one entangled distribution with no explicit strategy knob. The `<z> <z_empty> </z>` slot is a
no-op here; stage 2 writes a latent into it.

Records are generated on the fly (batch i depends only on seed and i, so --resume is exact),
grouped by length so padding wastes little compute. Every eval_interval steps the run samples
held-out inputs at temperature 1, scores them with evaluate.py, saves a checkpoint and a probe
snapshot (Key Figure 1 over training).

    python train_base.py --task grid                # 2-core CPU: 8 minutes alone, 13 beside another run
    python train_base.py --task sort --device cuda  # GPU, a minute or two
    python train_base.py --task add --task-options n_digits=2 --out runs/multidigit_addition/base2
    python evaluate.py runs/grid_pathfinding/base   # rescore the final checkpoint

Writes runs/<task>/base/: ckpt.pt, config.json, log.jsonl, metrics.json, probes.npz.
"""

import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluate import base_metrics, first_decodable_position, probe_grid, save_probe_snapshot
from model import (GPT, GPTConfig, append_jsonl, arg, autocast, check_numbers, configure_optimizer, learning_rate,
                   machine_info, open_run, pad_batch, parse_config, pick_device, resolve_precision, run_main,
                   save_checkpoint, seed_everything, write_json)
from tasks import (PAD, VOCAB, check_task, encode, get_task, parse_task_options, prompt_tokens, record_tokens,
                   task_options_text)

# ----------------------------------------------------------------------------------------------
# Configuration

# training steps per task when --steps is 0 (docs/results.md has what each reaches)
TASK_STEPS = {"list_summation": 5000, "sorting_algorithms": 8000, "grid_pathfinding": 3500,
              "linear_equation_solving": 3000, "base_conversion": 15000, "multidigit_addition": 10000}


@dataclass
class Config:
    task: str = arg("grid", "task name or alias: sum sort grid linear base add")
    mixture: str = arg("uniform", "ground-truth p*(s|x): uniform or input-dependent")
    task_options: str = arg("", "the task's integer knobs as key=value[,key=value], e.g. n_digits=2 for add")
    out: str = arg("", "run folder (default runs/<task>/base)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda or mps")
    seed: int = arg(0, "seed for initialisation, data and evaluation")
    steps: int = arg(0, "optimisation steps (0: the task's default in TASK_STEPS)")
    batch_size: int = arg(64, "records per step")
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "attention heads")
    n_embd: int = arg(128, "residual stream width")
    exact_branches: bool = arg(True, "at tokens where x's traces part, train on the data's exact next-token "
                                     "distribution p*(y_t | x, y_<t) rather than the sampled token")
    lr: float = arg(2e-3, "peak learning rate (linear warm-up, cosine decay to lr/10)")
    warmup: int = arg(100, "warm-up steps")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    eval_interval: int = arg(500, "steps between evaluations, checkpoints and probe snapshots")
    eval_inputs: int = arg(500, "held-out inputs sampled per evaluation during training")
    final_inputs: int = arg(1000, "held-out inputs of the final evaluation (500 leave strategy_tv about 0.03 of noise)")
    probe_inputs: int = arg(1200, "held-out DGP samples for each probe snapshot (2/3 train the probes)")
    log_interval: int = arg(50, "steps between log lines")
    resume: bool = arg(False, "continue the run in --out from its checkpoint")
    precision: str = arg("auto", "training matmuls: auto (bf16 where the hardware computes it, else fp32), "
                                 "bf16 or fp32; evaluation is fp32")

    def validate(self):
        check_numbers(self, positive=("batch_size", "n_layer", "n_head", "n_embd", "eval_interval", "eval_inputs",
                                      "final_inputs", "probe_inputs", "log_interval", "lr", "grad_clip"),
                      at_most={"batch_size": 4096, "n_layer": 64, "n_head": 64, "n_embd": 4096,
                               "eval_inputs": 100_000, "final_inputs": 100_000, "probe_inputs": 100_000})
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")


# ----------------------------------------------------------------------------------------------
# Data: length-bucketed batches that depend only on (seed, step)

POOL_BATCHES = 32  # records for this many batches are drawn at once and grouped by length


class Record(NamedTuple):
    ids: list  # the encoded record
    loss_start: int  # index of its first y token
    branches: dict  # y position -> {token: p*(token | x, y_<t)} where x's traces part (Task.branch_targets)


def batch_pool(task, seed, pool_index, batch_size, exact_branches):
    """POOL_BATCHES batches of Records, each of similar lengths, in shuffled order (branches only if exact)."""
    rng = random.Random(seed * 1_000_003 + pool_index)
    records = []
    for _ in range(POOL_BATCHES * batch_size):
        x, _, y = task.sample(rng, split="train")
        x_tokens = task.input_tokens(x)
        records.append(Record(encode(record_tokens(x_tokens, y)), len(prompt_tokens(x_tokens)),
                              task.branch_targets(x, y) if exact_branches else {}))
    records.sort(key=lambda r: len(r.ids))
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]
    rng.shuffle(batches)
    return batches


class Batch(NamedTuple):
    idx: torch.Tensor  # (B, T) token ids
    mask: torch.Tensor  # (B, T-1) which next-token targets are y tokens
    targets: torch.Tensor  # (B, T-1, V) next-token distributions: one-hot, or p* at branches if exact
    real: float  # fraction of idx that is not padding


class BatchStream:
    """batch(step) -> Batch; pools are cached."""

    def __init__(self, task, seed, batch_size, exact_branches):
        self.task, self.seed, self.batch_size, self.exact_branches = task, seed, batch_size, exact_branches
        self.pool_index, self.pool = None, None

    def batch(self, step, device):
        pool_index = step // POOL_BATCHES
        if pool_index != self.pool_index:
            self.pool_index, self.pool = pool_index, batch_pool(self.task, self.seed, pool_index, self.batch_size,
                                                             self.exact_branches)
        rows = self.pool[step % POOL_BATCHES]
        idx, mask = pad_batch([r.ids for r in rows], PAD, [r.loss_start for r in rows], device)
        targets = F.one_hot(idx[:, 1:], len(VOCAB)).float()  # (B, T-1, V)
        for b, record in enumerate(rows):  # exact branches: p* where x's traces part (none otherwise)
            for t, token_probs in record.branches.items():
                row = targets[b, record.loss_start - 1 + t]  # the target that predicts y_t
                row.zero_()
                row[encode(list(token_probs))] = torch.tensor(list(token_probs.values()), device=device)
        real = sum(len(r.ids) for r in rows) / idx.numel()
        return Batch(idx, mask, targets, real)


def y_loss(model, batch):
    """Mean cross-entropy of the y tokens against their targets q_t (one-hot: the sampled token):
    -(1/#y) sum_t sum_v q_t(v) log p_theta(v | x, y_<t). With exact branches q_t = p*(. | x, y_<t),
    whose expectation the one-hot target has, so the loss is the same in expectation, with less noise."""
    logp = F.log_softmax(model(batch.idx)[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return -((batch.targets * logp).sum(-1) * batch.mask).sum() / batch.mask.sum()


# ----------------------------------------------------------------------------------------------
# Training


def main(argv=None):
    cfg, _ = parse_config(Config, argv, description=__doc__.split("\n\n")[0])
    cfg.validate()
    task_options = {"mixture": cfg.mixture, **parse_task_options(cfg.task, cfg.task_options)}
    task = get_task(cfg.task, **task_options)
    model_cfg = GPTConfig(vocab_size=len(VOCAB), n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    longest = check_task(task)  # before any work: the options leave both splits non-empty
    if longest > model_cfg.block_size:
        raise ValueError(f"{task.name} records reach {longest} tokens with options ({task_options_text(task)}), "
                         f"more than the model's block size {model_cfg.block_size}")
    out = cfg.out or os.path.join("runs", task.name, "base")
    total_steps = cfg.steps or TASK_STEPS[task.name]
    device = pick_device(cfg.device)
    cfg.precision = resolve_precision(cfg.precision, device)
    ckpt_path, log_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.jsonl")
    seed_everything(cfg.seed)

    model = GPT(model_cfg).to(device)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay)
    ckpt = open_run(out, cfg.resume, model, optimizer, asdict(cfg), VOCAB, task.name,
                    {**asdict(cfg), "steps": total_steps, "task_revision": task.revision, "model": asdict(model_cfg),
                     "machine": machine_info(device)})
    # a resumed run keeps its time and its count of training tokens (padding excluded)
    start_step, seconds, train_tokens = ckpt.get("step", 0), ckpt.get("train_seconds", 0.0), ckpt.get("train_tokens", 0)

    def checkpoint(step, metrics):
        save_checkpoint(ckpt_path, model, VOCAB, task.name, task_options=task_options, optimizer=optimizer.state_dict(),
                        train_config=asdict(cfg), step=step, metrics=metrics,
                        train_seconds=seconds + time.perf_counter() - t0, train_tokens=train_tokens)

    def evaluate_and_snapshot(step):
        n_inputs = cfg.final_inputs if step == total_steps else cfg.eval_inputs
        metrics = {"eval_inputs": n_inputs, "train_tokens": train_tokens,
                   **base_metrics(model, task, n_inputs, cfg.seed)}
        probes = probe_grid(model, task, n=cfg.probe_inputs, seed=cfg.seed)
        metrics["probe_first_position_95"] = first_decodable_position(probes["acc"])
        save_probe_snapshot(os.path.join(out, "probes.npz"), step, probes)
        model.train()
        metrics["train_seconds"] = seconds + time.perf_counter() - t0  # wall-clock so far, evaluations included
        return metrics

    t0 = time.perf_counter()
    if start_step == 0:
        append_jsonl(log_path, {"step": 0, **evaluate_and_snapshot(0)})
    stream = BatchStream(task, cfg.seed, cfg.batch_size, cfg.exact_branches)
    model.train()
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc=f"base {task.alias}",
               disable=None)
    tokens, rate_t0, metrics = 0, time.perf_counter(), {}
    for step in bar:
        batch = stream.batch(step, device)
        lr = learning_rate(step, cfg.lr, cfg.warmup, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, cfg.precision):
            loss = y_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        tokens += batch.idx.numel()
        train_tokens += round(batch.real * batch.idx.numel())
        done = step + 1
        if done % cfg.log_interval == 0 or done == total_steps:
            rate = tokens / (time.perf_counter() - rate_t0)
            bar.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{rate:.0f}")
            append_jsonl(log_path, {"step": done, "loss/y": loss.item(), "lr": lr, "real_token_frac": batch.real,
                                    "tokens_per_s": rate})
        if done % cfg.eval_interval == 0 or done == total_steps:
            metrics = evaluate_and_snapshot(done)
            append_jsonl(log_path, {"step": done, **metrics})
            checkpoint(done, metrics)
            tqdm.write(f"step {done}: acc {metrics['answer_accuracy']:.3f} parse {metrics['parse_rate']:.3f} "
                       f"tv {metrics['strategy_tv']:.3f} excess_nll {metrics['excess_nll']:.4f} "
                       f"probe95@{metrics['probe_first_position_95']}")
    if metrics:
        write_json(os.path.join(out, "metrics.json"), metrics)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
