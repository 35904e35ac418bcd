"""
Benchmarks of this machine for the project's models, printed as one JSON line (under a minute
on a 2-core CPU).

- training: forward + backward + AdamW step at n_layer=4, n_head=4, n_embd=128, T=128, batch 64;
  tokens/s, achieved GFLOP/s (6 N per token for the matmuls plus 12 L T d for attention), the
  machine's float32 matmul GFLOP/s measured in the same run, and their ratio (MFU);
- sampling: batch 128, prompt 16, 64 new tokens, KV cache against full recomputation;
- stage 2: optimisation steps per second of the discrete recipe with K=3 (grid) and K=5 (sort)
  and of the continuous recipe (grid), from an untrained base of the default size, at the
  precision stage 2 trains in (--precision, resolved as disentangle.py does).

    python bench.py                 # CPU
    python bench.py --device cuda
    python bench.py --precision fp32
"""

import argparse
import json
import random
import sys
import time

import torch

import disentangle as D
from model import GPT, GPTConfig, configure_optimizer, pick_device, resolve_precision, run_main
from tasks import VOCAB, get_task


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def matmul_gflops(device, n=1024, repeats=20):
    """Peak-ish float32 matmul rate: an n x n by n x n product is 2 n^3 flops."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeats) / 1e9


def training_throughput(device, steps):
    cfg = GPTConfig(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg).to(device)
    opt = configure_optimizer(model, 1e-3, 0.1)
    B, T = 64, 128
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        logits = model(idx)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    seconds = timed(step, device, steps)
    n_params = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    flops_per_token = 6 * n_params + 12 * cfg.n_layer * T * cfg.n_embd
    return B * T / seconds, B * T * flops_per_token / seconds / 1e9


def sampling_speedup(device, repeats):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=128, n_layer=4, n_head=4, n_embd=128)).to(device).eval()
    prompts = torch.randint(3, 64, (128, 16)).tolist()
    run = lambda cache: model.generate(prompts, 64, eos_id=-1, pad_id=0, temperature=1.0,
                                       generator=torch.Generator(device=device).manual_seed(0), use_cache=cache)
    return timed(lambda: run(True), device, repeats), timed(lambda: run(False), device, repeats, warmup=0)


def stage2_steps_per_s(device, task_name, latent, steps, precision):
    """Optimisation steps per second of the (task, latent) recipe, on batches of DGP pairs."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=len(VOCAB))).to(device).eval()
    base_ckpt = {"model": base.state_dict(), "model_config": vars(base.config)}
    cfg = D.Config(task=task_name, latent=latent, precision=precision)
    D.apply_recipe(cfg, set())
    task = get_task(task_name)
    fact = D.build_factorization(cfg, task, ".", base_ckpt, device)
    optimizer = configure_optimizer(fact, cfg.lr, cfg.weight_decay)
    step = iter(range(10 ** 6))
    seconds = timed(lambda: D.train_step(fact, base, task, optimizer, cfg, next(step), device, False), device, steps)
    return 1 / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each training benchmark")
    parser.add_argument("--precision", default="auto", help="stage 2's: auto, bf16 or fp32")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    random.seed(0)
    tokens_per_s, achieved = training_throughput(device, args.steps)
    peak = matmul_gflops(device)
    cached, full = sampling_speedup(device, 1)
    stage2 = {f"stage2_{latent}_{name}_steps_per_s": round(stage2_steps_per_s(device, task, latent, args.steps,
                                                                              precision), 2)
              for name, task, latent in (("k3", "grid", "discrete"), ("k5", "sort", "discrete"),
                                         ("grid", "grid", "continuous"))}
    print(json.dumps({"device": device, "threads": torch.get_num_threads(),
                      "train_tokens_per_s": round(tokens_per_s), "train_gflops": round(achieved, 1),
                      "matmul_gflops": round(peak, 1), "mfu_vs_matmul": round(achieved / peak, 3),
                      "sample_cached_s": round(cached, 3), "sample_full_s": round(full, 3),
                      "kv_cache_speedup": round(full / cached, 2), "stage2_precision": precision, **stage2}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
