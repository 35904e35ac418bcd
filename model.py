"""
A small GPT written from scratch (after nanoGPT), with the hooks strategy disentanglement needs.

    h_0     = tok_emb(idx) + pos_emb(pos) [+ E(z) at the <z_empty> slot]      (B, T, d)
    h_l     = h_{l-1} + Attn(LN(h_{l-1})),  h_l = h_l + MLP(LN(h_l))          l = 1..L
    logits  = LN(h_L) @ tok_emb^T                                            (B, T, V)

- Discrete latents are ordinary tokens <z1>..<zK>; `router_log_probs` reads p(z|x) off the
  next-token distribution at the routing position, renormalised over the K latent tokens, and
  returns the mass the full softmax puts outside them (the method's "router support").
- The continuous latent is a vector z (B, dz) mapped by a learned E (zero-initialised, so a fresh
  projection changes nothing) and added to the embedding at one position per row.
- `forward(..., return_hidden=True)` also returns the residual stream after the embedding and
  after each block, (B, L+1, T, d), for the linear probes.
- `generate` samples a batch of prompts of different lengths with a KV cache.
- `Factorization` is stage 2's model: the router and generator share one copy of a base model,
  the posterior reads (x, y) through a second copy and a pooling head.
- Checkpoints are plain dicts written atomically and read with `torch.load(weights_only=True)`.

This file knows nothing of the tasks; callers pass the vocabulary size and special token ids.
"""

import argparse
import glob
import json
import math
import os
import platform
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Building blocks


@dataclass
class GPTConfig:
    vocab_size: int  # number of tokens
    block_size: int = 160  # longest sequence (learned positions)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual stream width d
    dropout: float = 0.0  # dropout on attention and MLP outputs
    latent_dim: int = 0  # dz of a continuous latent added at one position (0: none)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, attn_mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:  # write this step's keys and values, attend over everything so far
            k, v = cache.update(k, v)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # the CPU's bf16 attention backward
            q, k, v = q.float(), k.float(), v.float()  # is several times slower than its fp32 one
        with torch.autocast("cpu", enabled=False) if q.device.type == "cpu" else nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x):
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x, attn_mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class LayerCache:
    """Keys and values of one layer for the rows being generated, preallocated to max length."""

    def __init__(self, B, n_head, max_len, head_dim, device, dtype):
        self.k = torch.zeros(B, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k, v):
        T = k.shape[2]
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


# ----------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied input/output embeddings
        self.latent_proj = nn.Linear(cfg.latent_dim, cfg.n_embd) if cfg.latent_dim else None
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2L) so the stream's variance stays O(1)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and name.startswith("blocks."):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if self.latent_proj is not None:  # E(z) starts at 0: injecting a latent changes nothing yet
            nn.init.zeros_(self.latent_proj.weight)
            nn.init.zeros_(self.latent_proj.bias)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, latent=None, latent_pos=None, return_hidden=False, last_hidden=False,
                positions=None, attn_mask=None, caches=None):
        """
        idx (B, T) token ids -> logits (B, T, V) [, hidden (B, L+1, T, d) with return_hidden, or
        with last_hidden only the last block's output (B, T, d), which is all stage 2 reads].
        latent (B, dz) with latent_pos (B,): add E(latent) at that position; rows with
        latent_pos < 0 are untouched. positions (B, T), attn_mask (B, 1, T, Tk) and caches (one
        LayerCache per block) are for generation; training uses the defaults (causal, 0..T-1).
        """
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device).expand(B, T)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, d)
        if latent is not None:
            if self.latent_proj is None:
                raise ValueError("this model has latent_dim=0 and cannot take a continuous latent")
            slot = torch.arange(T, device=idx.device)[None, :] == latent_pos[:, None]  # (B, T)
            x = x + slot.unsqueeze(-1).to(x.dtype) * self.latent_proj(latent).unsqueeze(1)
        hidden = [x]
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, None if caches is None else caches[i])
            if return_hidden:
                hidden.append(x)
        logits = self.lm_head(self.ln_f(x))
        if return_hidden:
            return logits, torch.stack(hidden, dim=1)  # (B, L+1, T, d)
        return (logits, x) if last_hidden else logits

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id, pad_id, temperature=1.0, generator=None,
                 latent=None, latent_pos=None, use_cache=True, return_logits=False):
        """
        Sample continuations of prompts of different lengths in one batch.

        prompts: list of B lists of ids. Rows are left-padded; each row gets positions 0.. from
        its first real token, and pad keys are masked out. A row stops at eos_id; the loop ends
        once every row has. temperature 0 is greedy. latent (B, dz) is added at latent_pos (B,),
        an index into each unpadded prompt. Returns B lists of new ids (up to and with eos), and
        with return_logits also the logits each step sampled from, (B, steps, V).
        """
        device = self.tok_emb.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        if P + max_new_tokens > self.config.block_size:
            max_new_tokens = self.config.block_size - P
        total = P + max_new_tokens
        pad = torch.tensor([P - len(p) for p in prompts], device=device)  # (B,)
        idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        steps = torch.arange(total, device=device)
        positions = (steps[None, :] - pad[:, None]).clamp(min=0)  # (B, total)
        # key j is visible to query i when j <= i and j is not padding; every query sees itself
        # so that padded rows never have an empty softmax
        visible = (steps[None, None, :] <= steps[None, :, None]) & (steps[None, None, :] >= pad[:, None, None])
        visible = (visible | torch.eye(total, dtype=torch.bool, device=device)).unsqueeze(1)  # (B, 1, total, total)
        if latent is not None:
            latent_pos = latent_pos + pad

        caches = None
        if use_cache:
            hd = self.config.n_embd // self.config.n_head
            caches = [LayerCache(B, self.config.n_head, total, hd, device, self.tok_emb.weight.dtype)
                      for _ in self.blocks]
            logits = self(idx, latent, latent_pos, positions=positions[:, :P],
                          attn_mask=visible[:, :, :P, :P], caches=caches)[:, -1]
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        seen_logits = []
        for t in range(max_new_tokens):
            T = P + t
            if not use_cache:  # reference path: recompute the whole sequence every step
                logits = self(idx, latent, latent_pos, positions=positions[:, :T],
                              attn_mask=visible[:, :, :T, :T])[:, -1]
            if return_logits:
                seen_logits.append(logits)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = F.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)  # finished rows emit pad
            out[:, t] = nxt
            done |= nxt == eos_id
            if bool(done.all()):
                break
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if use_cache:
                logits = self(nxt[:, None], positions=positions[:, T:T + 1],
                              attn_mask=visible[:, :, T:T + 1, :T + 1], caches=caches)[:, -1]
        rows = []
        for row in out.tolist():
            rows.append(row[:row.index(eos_id) + 1] if eos_id in row else [t for t in row if t != pad_id])
        return (rows, torch.stack(seen_logits, dim=1)) if return_logits else rows


# ----------------------------------------------------------------------------------------------
# Helpers used by both stages


def token_log_probs(logits, idx):
    """log p(idx[:, t+1] | idx[:, :t+1]) for every t: logits (B, T, V), idx (B, T) -> (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, idx[:, 1:, None]).squeeze(-1)


def router_log_probs(logits, latent_ids):
    """
    p(z|x) from the next-token logits (B, V) at the routing position.
    Returns log p(z=k|x) renormalised over the K latent tokens (B, K) and the probability mass
    the full softmax puts outside them (B,), which the router-support term pushes to 0.
    """
    logp = F.log_softmax(logits.float(), dim=-1)[:, latent_ids]  # (B, K)
    log_inside = torch.logsumexp(logp, dim=-1)  # (B,)
    return logp - log_inside[:, None], -torch.expm1(log_inside)


def pad_batch(sequences, pad_id, loss_starts, device="cpu"):
    """
    Right-pad id lists into idx (B, T) and a loss mask (B, T-1) over targets: target t+1 counts
    when loss_starts[b] <= t+1 < len(sequence b). Returns idx, mask.
    """
    T = max(len(s) for s in sequences)
    idx = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    target_pos = torch.arange(1, T)[None, :]  # (1, T-1)
    lengths = torch.tensor([len(s) for s in sequences])[:, None]
    starts = torch.tensor(loss_starts)[:, None]
    mask = (target_pos >= starts) & (target_pos < lengths)
    return idx.to(device), mask.to(device)


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.99)):
    """AdamW with weight decay on matrices (2-D and up) only, not on biases and LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def learning_rate(step, peak, warmup, total, decay=True):
    """Linear warm-up to peak, then constant or (decay) cosine decay to peak / 10 at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if not decay:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def pick_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu; otherwise the named device (ValueError if absent)."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps was asked for but MPS is not available")
    return name


def machine_info(device):
    """Where and when a run started, for the results tables: device, its name, threads, date, command."""
    return {"device": str(device), "name": torch.cuda.get_device_name(device) if str(device).startswith("cuda")
            else cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]])}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def native_bf16(device):
    """Whether device multiplies bf16 matrices in hardware (a CUDA GPU with bf16, a CPU with
    avx512_bf16 or amx_bf16), where bf16 autocast is faster; elsewhere it is emulated and slower."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if str(device) == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split() for line in f if line.startswith("flags")), [])
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_precision(precision, device):
    """--precision auto|bf16|fp32 -> bf16 or fp32 (auto: bf16 where native_bf16)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--precision must be one of auto, bf16, fp32, got {precision!r}")
    if precision == "bf16" and str(device) == "mps":
        raise ValueError("--precision bf16 needs a CPU or CUDA device")
    return ("bf16" if native_bf16(device) else "fp32") if precision == "auto" else precision


def autocast(device, precision):
    """bf16 autocast (weights, optimizer and losses stay fp32) for precision bf16; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------------
# Checkpoints: plain dicts (weights, config, vocabulary, task, training state), written atomically


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or does not match what the caller expects."""


def save_checkpoint(path, model, vocab, task, **state):
    """Write {model, model_config, vocab, task, **state} to path via a temp file and a rename."""
    ckpt = {"model": model.state_dict(), "model_config": asdict(model.config),
            "vocab": list(vocab), "task": task, **state}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".tmp.*"):  # left by a save that was interrupted
        os.remove(stale)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, vocab=None, task=None):
    """Read a checkpoint dict; CheckpointError naming the file if it is missing, corrupt or mismatched."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or corrupt): "
                              f"{type(e).__name__}") from None
    missing = {"model", "model_config", "vocab", "task"} - set(ckpt) if isinstance(ckpt, dict) else {"all"}
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of this project (missing {sorted(missing)})")
    if vocab is not None and list(ckpt["vocab"]) != list(vocab):
        raise CheckpointError(f"{path}: vocabulary differs from this code's ({len(ckpt['vocab'])} "
                              f"tokens saved, {len(vocab)} now)")
    if task is not None and ckpt["task"] != task:
        raise CheckpointError(f"{path}: checkpoint is for task {ckpt['task']!r}, not {task!r}")
    return ckpt


def resume_checkpoint(path, model, optimizer, train_config, vocab, task):
    """--resume: once train_config matches the run saved at path (check_resume_config), load its
    weights, optimizer state and torch RNG into model and optimizer. Returns the checkpoint."""
    ckpt = load_checkpoint(path, vocab=vocab, task=task)
    check_resume_config(ckpt.get("train_config"), train_config)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if "torch_rng" in ckpt:
        torch.set_rng_state(ckpt["torch_rng"])
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint", **overrides):
    """Build a GPT from a checkpoint's config (fields in overrides replace saved ones) and load it."""
    try:
        cfg = GPTConfig(**{**ckpt["model_config"], **overrides})
    except TypeError as e:  # a field this code does not have, or one missing
        raise CheckpointError(f"{path}: its model_config does not fit this code ({e})") from None
    model = GPT(cfg)
    try:
        result = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{path}: weights do not match the saved config: {str(e).splitlines()[-1].strip()}") from None
    allowed_missing = {"latent_proj.weight", "latent_proj.bias"} if "latent_dim" in overrides else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not match the saved config "
                              f"(missing {result.missing_keys}, unexpected {result.unexpected_keys})")
    return model


# ----------------------------------------------------------------------------------------------
# The factorization of stage 2: router, generator and posterior, all initialised from a base model


class Factorization(nn.Module):
    """
    lm:          router p_phi(z|x) and generator p_psi(y|x,z), one causal LM from the base
    posterior:   a second copy of the base backbone; post_head maps its mean y-state to
                 K logits (discrete) or (mu, log sigma^2) (continuous)
    router_head: continuous only, p_phi(z|x) from the LM's state at <z>: (mu, log sigma^2) of a
                 Gaussian, or (router "mixture") the logits, means and log variances of M
                 Gaussians, the means starting at the codes (router_params reads both)
    codes:       continuous only, the corners (C, dz) a clustered posterior is sent to; fixed by
                 the caller, so not saved
    latent_ids are the K latent tokens (discrete), empty_id the no-op <z_empty> each starts from.
    """

    def __init__(self, base_ckpt, path, latent, latent_ids, empty_id, dz, codes, seed=0, router="gaussian",
                 components=1):
        super().__init__()
        self.latent, self.K, self.dz = latent, len(latent_ids), dz
        self.router, self.components = router, components if router == "mixture" else 1
        self.latent_ids, self.empty_id = list(latent_ids), empty_id
        self.lm = model_from_checkpoint(base_ckpt, path, **({"latent_dim": dz} if latent == "continuous" else {}))
        self.posterior = model_from_checkpoint(base_ckpt, path)
        self.config, d = self.lm.config, self.lm.config.n_embd  # config: saved with checkpoints
        self.post_head = nn.Linear(d, self.K if latent == "discrete" else 2 * dz)
        nn.init.normal_(self.post_head.weight, std=0.02)
        nn.init.zeros_(self.post_head.bias)
        M = self.components
        self.router_head = nn.Linear(d, M * (1 + 2 * dz) if router == "mixture" else 2 * dz) \
            if latent == "continuous" else None
        if latent == "continuous":
            nn.init.zeros_(self.router_head.weight)  # p_phi starts at N(0, I) for every x
            nn.init.zeros_(self.router_head.bias)
            self.register_buffer("codes", codes, persistent=False)
            if router == "mixture":  # components at the codes (seeded draws past them): symmetry broken
                starts = torch.randn(M, dz, generator=torch.Generator().manual_seed(seed))
                starts[:min(M, len(codes))] = codes[:M]
                with torch.no_grad():
                    self.router_head.bias[M:M + M * dz] = starts.flatten()
        else:  # each <zk> starts as the no-op <z_empty> plus noise (seeded) that breaks their symmetry
            with torch.no_grad():
                emb = self.lm.tok_emb.weight
                noise = torch.randn(self.K, emb.shape[1], generator=torch.Generator().manual_seed(seed))
                emb[self.latent_ids] = emb[empty_id] + noise.to(emb.device) * 3 * emb[empty_id].std()

    @torch.no_grad()
    def shrink_latent_noise(self, factor):
        """Move each <zk> embedding towards <z_empty> by factor (discrete; used at step 0 only)."""
        emb, rows = self.lm.tok_emb.weight, self.latent_ids
        emb[rows] = emb[self.empty_id] + factor * (emb[rows] - emb[self.empty_id])

    def router_params(self, state):
        """p_phi(z|x) = sum_m pi_m N(mu_m, diag sigma_m^2) from the LM's states at <z> (B, d): log pi (B, M),
        mu and log sigma^2 (B, M, dz). The Gaussian router is the case M = 1, pi = 1."""
        out = self.router_head(state).float()
        if self.router == "gaussian":
            mu, logvar = out.chunk(2, dim=-1)
            return torch.zeros(len(out), 1, device=out.device), mu[:, None], logvar[:, None]
        M, dz = self.components, self.dz
        logits, mu, logvar = out.split([M, M * dz, M * dz], dim=-1)
        return F.log_softmax(logits, -1), mu.view(-1, M, dz), logvar.view(-1, M, dz)

    def posterior_features(self, idx, y_state_mask, states=None):
        """The posterior backbone's final states (B, T, d) averaged over the y tokens: (B, T) -> (B, d).
        states: those final states, when the caller already has them (a frozen backbone is the base model)."""
        h = self.posterior.ln_f(self.posterior(idx, last_hidden=True)[1]) if states is None else states
        w = y_state_mask.float() / y_state_mask.sum(1, keepdim=True)  # (B, T)
        return (h * w.unsqueeze(-1)).sum(1)

    def posterior_params(self, idx, y_state_mask, states=None):
        """The posterior head on the pooled states: (B, out), K logits or (mu, log sigma^2)."""
        return self.post_head(self.posterior_features(idx, y_state_mask, states))


# ----------------------------------------------------------------------------------------------
# Run utilities shared by the stage scripts: config dataclass -> argparse, seeding, errors


def arg(default, help):
    """A config field whose help text is its --help line."""
    return field(default=default, metadata={"help": help})


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line, without the usage text."""

    def error(self, message):  # one clear line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_config(cls, argv=None, description="", epilog=""):
    """Build an argparse parser from a config dataclass's fields. Returns the config and the set of
    field names the command line gave (so a stage can fill the others from its recipe)."""
    parser = OneLineParser(description=description, epilog=epilog, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        name, help_text = "--" + f.name.replace("_", "-"), f"{f.metadata.get('help', '')} (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(name, type=typ, default=None, help=help_text)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return cls(**given), set(given)


def check_numbers(cfg, positive=(), at_most=None):
    """Every float field finite and in [0, 1e6], every int in [0, 10^7], those named in positive > 0,
    and those in at_most (name -> bound) no larger than what one machine can hold or finish."""
    for f in fields(cfg):
        value, name = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if isinstance(value, float) and not (math.isfinite(value) and 0 <= value <= 1e6):
            raise ValueError(f"{name} must be a finite number in [0, 1e6], got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= 10 ** 7:
            raise ValueError(f"{name} must be in [0, 10^7], got {value}")
        if f.name in positive and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        if f.name in (at_most or {}) and value > at_most[f.name]:
            raise ValueError(f"{name} must be at most {at_most[f.name]}, got {value}")


def open_run(out, resume, model, optimizer, train_config, vocab, task, config_record):
    """Start or resume the run in folder out. A fresh run refuses a folder that holds a checkpoint
    and starts a fresh log; --resume loads the checkpoint (resume_checkpoint) and cuts the log back
    to its step. Writes config.json (config_record). Returns the checkpoint ({} for a fresh run)."""
    ckpt_path, log_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.jsonl")
    if not resume and os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} exists; pass --resume to continue it or --out for a new run")
    ckpt = resume_checkpoint(ckpt_path, model, optimizer, train_config, vocab, task) if resume else {}
    os.makedirs(out, exist_ok=True)
    truncate_log(log_path, ckpt["step"] if resume else -1)
    write_json(os.path.join(out, "config.json"), config_record)
    return ckpt


def check_resume_config(saved, now, free=("resume", "device", "precision", "steps", "out")):
    """--resume must continue the same run: every setting but those in `free` must match."""
    if not isinstance(saved, dict):
        raise CheckpointError("the checkpoint has no train_config to resume from")
    changed = sorted(k for k in now if k not in free and saved.get(k) != now[k])
    if changed:
        raise ValueError(f"--resume with settings that differ from the saved run: {changed}")


def write_json(path, record):
    """Write a JSON file atomically: a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """On resume, drop the log lines written after the checkpoint's step (step -1: all of them)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def seed_everything(seed):
    """Seed Python and torch once per run; data generators take their own random.Random."""
    random.seed(seed)
    torch.manual_seed(seed)


def run_main(main, argv=None):
    """Run a stage's main(); an error the user can cause (a bad value, a checkpoint or snapshot
    that does not fit, a file-system error) becomes one line on stderr and exit status 2."""
    try:
        return main(argv)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept (resume with --resume)", file=sys.stderr)
        return 130
