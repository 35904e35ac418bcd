"""
Benchmarks of model.py on this machine, printed as one JSON line.

- training: forward + backward + AdamW step at n_layer=4, n_head=4, n_embd=128, T=128, batch 64;
  tokens/s, achieved GFLOP/s (6 N per token for the matmuls plus 12 L T d for attention), the
  machine's float32 matmul GFLOP/s measured in the same run, and their ratio (MFU);
- sampling: batch 256, prompt 16, 100 new tokens, KV cache against full recomputation.

    python bench.py                 # CPU
    python bench.py --device cuda
"""

import argparse
import json
import time

import torch

from model import GPT, GPTConfig, configure_optimizer, pick_device


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
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
    prompts = torch.randint(3, 64, (256, 16)).tolist()
    run = lambda cache: model.generate(prompts, 100, eos_id=-1, pad_id=0, temperature=1.0,
                                       generator=torch.Generator(device=device).manual_seed(0), use_cache=cache)
    return timed(lambda: run(True), device, repeats), timed(lambda: run(False), device, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    args = parser.parse_args()
    device = pick_device(args.device)
    tokens_per_s, achieved = training_throughput(device, args.steps)
    peak = matmul_gflops(device)
    cached, full = sampling_speedup(device, 1)
    print(json.dumps({"device": device, "threads": torch.get_num_threads(),
                      "train_tokens_per_s": round(tokens_per_s), "train_gflops": round(achieved, 1),
                      "matmul_gflops": round(peak, 1), "mfu_vs_matmul": round(achieved / peak, 3),
                      "sample_cached_s": round(cached, 3), "sample_full_s": round(full, 3),
                      "kv_cache_speedup": round(full / cached, 2)}))


if __name__ == "__main__":
    main()
