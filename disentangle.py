"""
Stage 2: factorize the entangled base model into a router and a strategy-conditioned generator.

    discrete:    p(y|x) = sum_z  p_psi(y|x,z) p_phi(z|x),      z in {<z1> .. <zK>}
    continuous:  p(y|x) = int dz p_psi(y|x,z) p_phi(z|x),      z in R^dz

One causal LM, initialised from the base model, is both the router and the generator:

    router     <bos> <x> .. </x> <z>                   next token, restricted to <z1>..<zK>
               (continuous: N(mu_phi(x), sigma_phi(x)^2) from a head on the hidden state at <z>)
    generator  <bos> <x> .. </x> <z> <zk> </z> <y> .. </y> <eos>
               (continuous: <z_empty> in the slot, plus E(z) added to its embedding)

A separate backbone, also initialised from the base model, reads the whole (x, y) record and a
pooling head gives the posterior q_xi(z|x,y): K logits, or (mu, log var). It pools the states of
the y tokens, equally (mean) or, with --posterior-pool entropy, weighted like --token-weighted by
the base model's entropy when it chose each token: the states where a trace commits to its
strategy then dominate the pooled vector instead of being averaged with the dozens of tokens
every strategy writes alike.

Training maximises the conditional ELBO on pairs x ~ task, y ~ p_base(y|x) (or the true mixture
with --data dgp). The loss, one named function per term:

    J = R + beta K + aux                                                          (total_loss)
    R  = -E_q[log p_psi(y|x,z)]                                                   (recon_loss)
         discrete: exactly sum_k q(k|x,y) log p_psi(y|x,k), all K latents in one batched forward
         continuous: (1/S) sum_s log p_psi(y|x, mu_xi + sigma_xi * eps_s), eps_s ~ N(0, I)
    K  = KL(q_xi(z|x,y) || p_phi(z|x))                                            (kl_loss)
         discrete: sum_k q_k (log q_k - log p_k); continuous: the Gaussian KL in closed form
    aux, each behind its flag with a weight:
      --token-weighted       R with per-token weights w_t = (1 + H_t / mean H) / 2 from the z-free
                             base model's entropy H_t, so strategy-deciding tokens count most
                             (and JSD weighted by H_t / mean H: latents should differ at decisions)
      --normalized-recon     R / R_base, R_base = -log p_base(y|x) (same weights): restores the
                             recon-to-KL balance when the initialiser already reconstructs well
      --posterior-entropy    + w H(q(z|x,y))                         (discrete; sharper posteriors)
      --router-support       + w (-log sum_k p_full(<zk>|x))         (discrete; router mass on latents)
      --router-marginal-kl   + w KL(E_x p_phi(z|x) || Unif(K))       (discrete; no usage collapse)
                             + w KL(N(mean mu, mean sigma^2 + var mu) || N(0, I))   (continuous)
      --jsd                  - w sum_t JSD(p_psi(y_t|x,y_<t,z=1..K))  (discrete; latents differ),
                             each p_psi renormalised on the base model's support (tokens >= 1%),
                             latents weighted by their posterior given y_<t (--no-jsd-prefix: uniform)
      --posterior-variance   + w mean_d sigma_xi,d^2                  (continuous; tight posteriors)
    additions beyond the method: a beta schedule (constant, linear warm-up, cyclical), free
    bits (the KL term is max(K, free_bits) on the batch mean), a cosine learning-rate decay,
    --cluster-init M, a k-means start (cluster_posterior): the posterior head begins as K
    clusters of the posterior backbone's pooled features, found on their top M principal
    components scaled to unit variance (continuous: one cluster per strategy, each mapped to a
    corner of a simplex in z), and stays on them for --cluster-hold steps while the generators
    learn them (the backbone stays frozen throughout),
    --reassign N, the classification step of hard EM (reassign_clusters; after --cluster-init):
    every N steps of the first half, fresh pairs join the latent under which the generator rates
    their y highest (continuous: the cluster at whose posterior centroid it does), and the head
    is set from that assignment again, so traces k-means put in the wrong group move to their own,
    --split-twins N, the split move of divisive clustering (choose_split, split_twins): every N
    steps of the first half, if two latents decode alike (or one holds no posterior mass), the
    posterior mass that mixes strategies (the pair's own, or the heaviest other latent's) is
    split in two along the top principal direction of the posterior's features, each half to a
    latent of its own (a twin on a single strategy, or a dead latent, takes half of a third
    latent's mass, starting as that latent's copy), and the posterior is frozen for N/2 steps:
    the generators learn from the split's assignment before the ELBO, symmetric between two
    identical latents, can pull the posterior back.

    python disentangle.py --task grid --latent discrete --token-weighted --jsd 1 \
        --router-marginal-kl 10 --router-support 0.1 --lr-decay --data dgp --steps 1200   # the recipe
                                     # linear equations: the same
                                     # addition: the same plus --cluster-init 16 (2-digit base: --steps 1800)
                                     # sorting: the same plus --cluster-init 24 --steps 2400 (two seeds of five;
                                     #   with --reassign 300 also seeds 0 and 4, not seed 1)
    python disentangle.py --latent continuous --token-weighted --router-marginal-kl 1 \
        --lr-decay --data dgp --steps 1200                    # the continuous recipe (grid)
                                     # linear equations: the same plus --cluster-init 16
                                     # 2-digit addition: --cluster-init 16 --posterior-variance 2 (edge of the targets)
                                     # sorting: --cluster-init 24 --reassign 300 --steps 2400 (all but sampled_z)
    python disentangle.py --task sort --k 8                   # more latents than strategies
    python disentangle.py --score runs/grid_pathfinding/continuous --eval-inputs 500   # rescore a finished run

Reads runs/<task>/base/ckpt.pt; writes runs/<task>/<latent>/: ckpt.pt, config.json, log.jsonl,
metrics.json, posterior.npz (snapshots of the posterior over training, for the figures);
--score adds metrics_<N>.json.
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from evaluate import (alignment_one_to_one, contingency, dgp_samples, generate_ys, generation_metrics,
                      heldout_inputs, local_coverage, split_by_input, train_probes)
from model import (arg, autocast, check_resume_config, configure_optimizer, learning_rate, load_checkpoint,
                   model_from_checkpoint, pad_batch, parse_config, pick_device, router_log_probs, run_main,
                   save_checkpoint, seed_everything, token_log_probs)
from tasks import PAD, STOI, VOCAB, LATENT_TOKENS, MAX_LATENTS, encode, get_task, record_tokens

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class Config:
    task: str = arg("grid", "task name or alias: sum sort grid linear base add")
    latent: str = arg("discrete", "discrete (tokens <z1>..<zK>) or continuous (a vector at <z_empty>)")
    k: int = arg(0, "discrete latents K (0: the task's number of strategies)")
    dz: int = arg(8, "continuous latent dimension")
    base: str = arg("", "base run folder (default runs/<task>/base)")
    out: str = arg("", "run folder (default runs/<task>/<latent>)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda or mps")
    seed: int = arg(0, "seed for initialisation, data and evaluation")
    data: str = arg("model", "where y comes from: model (sampled from the base) or dgp (the true mixture)")
    steps: int = arg(500, "optimisation steps")
    batch_size: int = arg(16, "(x, y) pairs per step")
    lr: float = arg(5e-4, "AdamW learning rate (peak, after a linear warm-up)")
    warmup: int = arg(50, "learning-rate warm-up steps")
    lr_decay: bool = arg(False, "cosine-decay the learning rate to lr/10 at the last step (off: constant)")
    weight_decay: float = arg(0.0, "AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    samples: int = arg(4, "continuous: reparameterised samples S per pair")
    beta: float = arg(1.0, "weight of KL(q || p_phi)")
    beta_schedule: str = arg("constant", "constant, linear (0 -> beta over --beta-warmup) or cyclical")
    beta_warmup: int = arg(200, "steps of the linear ramp, or the cycle length of the cyclical schedule")
    free_bits: float = arg(0.0, "the KL term is max(KL, free_bits) on the batch mean (0: off)")
    token_weighted: bool = arg(False, "weight recon tokens by the base model's predictive entropy")
    normalized_recon: bool = arg(False, "divide recon by the base model's loss on the same y")
    posterior_entropy: float = arg(0.0, "discrete: weight of H(q(z|x,y))")
    router_support: float = arg(0.0, "discrete: weight of -log p(latent tokens | router prompt)")
    router_marginal_kl: float = arg(0.0, "weight of KL(batch-mean router || prior)")
    jsd: float = arg(0.0, "discrete: weight of the inter-latent token-level JSD (maximised)")
    jsd_prefix: bool = arg(True, "weight latents in the JSD by their posterior given the y prefix (off: uniform)")
    cluster_init: int = arg(0, "start the posterior head from k-means on this many whitened principal components of the posterior backbone's pooled features, and keep that backbone frozen (0: off)")
    cluster_hold: int = arg(100, "with --cluster-init: steps the posterior stays on the clusters while the generators learn them")
    split_twins: int = arg(0, "discrete: every N steps of the first half, split the mass that latents decoding alike leave mixed (choose_split; 0: off)")
    posterior_pool: str = arg("mean", "how the posterior pools y states: mean, or entropy (weighted like --token-weighted)")
    posterior_variance: float = arg(0.0, "continuous: weight of mean posterior variance")
    reassign: int = arg(0, "with --cluster-init: every N steps of the first half, set the posterior from the clusters the generator assigns fresh pairs to (reassign_clusters; 0: off)")
    eval_interval: int = arg(100, "steps between evaluations, checkpoints and posterior snapshots")
    eval_inputs: int = arg(200, "held-out inputs per evaluation")
    log_interval: int = arg(10, "steps between log lines")
    resume: bool = arg(False, "continue the run in --out from its checkpoint")
    bf16: bool = arg(False, "bf16 autocast (CUDA only)")
    score: str = arg("", "no training: score the stage-2 run in this folder at its checkpoint on --eval-inputs "
                         "held-out inputs (its other settings are its own); writes metrics_<N>.json there")

    def validate(self, n_strategies, width):
        if self.latent not in ("discrete", "continuous"):
            raise ValueError(f"--latent must be discrete or continuous, got {self.latent!r}")
        if self.data not in ("model", "dgp"):
            raise ValueError(f"--data must be model or dgp, got {self.data!r}")
        if self.posterior_pool not in ("mean", "entropy"):
            raise ValueError(f"--posterior-pool must be mean or entropy, got {self.posterior_pool!r}")
        if self.beta_schedule not in ("constant", "linear", "cyclical"):
            raise ValueError(f"--beta-schedule must be constant, linear or cyclical, got {self.beta_schedule!r}")
        if self.latent == "discrete" and not 2 <= (self.k or n_strategies) <= MAX_LATENTS:
            raise ValueError(f"--k must be between 2 and {MAX_LATENTS}, got {self.k}")
        for name in ("steps", "batch_size", "dz", "samples", "eval_interval", "eval_inputs", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("split_twins", "cluster_init", "cluster_hold", "reassign"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.cluster_init and self.latent == "continuous" and n_strategies - 1 > self.dz:
            raise ValueError(f"--cluster-init puts {n_strategies} strategies on a simplex: --dz must be at least "
                             f"{n_strategies - 1}, got {self.dz}")
        if self.reassign and not self.cluster_init:
            raise ValueError("--reassign needs --cluster-init: it moves pairs between the clusters")
        if self.cluster_init > width:  # there are no more principal components than feature dimensions
            raise ValueError(f"--cluster-init must be at most the model width {width}, got {self.cluster_init}")
        for name in ("beta", "free_bits", "posterior_entropy", "router_support", "router_marginal_kl", "jsd",
                     "posterior_variance", "lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# The factorization: shared router/generator LM, posterior backbone with a pooling head


class Factorization(nn.Module):
    """
    lm:          router p_phi(z|x) and generator p_psi(y|x,z), one causal LM from the base
    posterior:   a second copy of the base backbone; post_head maps the pooled y-state to
                 K logits (discrete) or (mu, log sigma^2) (continuous)
    router_head: continuous only, (mu, log sigma^2) of p_phi(z|x) from the LM's state at <z>
    codes:       continuous only, the n_codes corners (n_codes, dz) --cluster-init sends the
                 posterior's clusters to
    seed:        draws the noise that tells the K latent embeddings apart at step 0
    """

    def __init__(self, base_ckpt, latent, K, dz, path, seed=0, n_codes=0):
        super().__init__()
        self.latent, self.K, self.dz = latent, K, dz
        extra = {"latent_dim": dz} if latent == "continuous" else {}
        self.lm = model_from_checkpoint(base_ckpt, path, **extra)
        self.posterior = model_from_checkpoint(base_ckpt, path)
        self.config = self.lm.config  # saved with checkpoints
        d = self.lm.config.n_embd
        out = K if latent == "discrete" else 2 * dz
        self.post_head = nn.Linear(d, out)
        nn.init.normal_(self.post_head.weight, std=0.02)
        nn.init.zeros_(self.post_head.bias)
        if latent == "continuous":
            self.router_head = nn.Linear(d, 2 * dz)
            nn.init.zeros_(self.router_head.weight)  # p_phi starts at N(0, I) for every x
            nn.init.zeros_(self.router_head.bias)
            # fixed by (n_codes, dz), so not saved: a resumed or rescored run rebuilds them
            self.register_buffer("codes", cluster_codes(n_codes, dz), persistent=False)
        else:
            self.router_head = None
            # each <zk> starts as the base model's no-op <z_empty> plus a little noise, so every
            # latent reproduces the base model at step 0 and the noise breaks their symmetry
            with torch.no_grad():
                emb = self.lm.tok_emb.weight
                g = torch.Generator().manual_seed(seed)
                noise = torch.randn(K, emb.shape[1], generator=g) * 3 * emb[STOI["<z_empty>"]].std()
                emb[[STOI[t] for t in LATENT_TOKENS[:K]]] = emb[STOI["<z_empty>"]] + noise.to(emb.device)

    @torch.no_grad()
    def shrink_latent_noise(self, factor):
        """Move each <zk> embedding towards <z_empty> by factor (discrete; used at step 0 only)."""
        emb, empty = self.lm.tok_emb.weight, STOI["<z_empty>"]
        rows = [STOI[t] for t in LATENT_TOKENS[:self.K]]
        emb[rows] = emb[empty] + factor * (emb[rows] - emb[empty])

    @torch.no_grad()
    def copy_latent(self, source, target):
        """<z_target> takes <z_source>'s embedding: the generator decodes alike under both (discrete)."""
        emb = self.lm.tok_emb.weight
        emb[STOI[LATENT_TOKENS[target]]] = emb[STOI[LATENT_TOKENS[source]]]

    @torch.no_grad()
    def split_posterior(self, a, b, features, weights, start_from, margin=1.0):
        """
        Send a cluster of pairs to latent a or b (discrete), along the top principal direction u
        of their pooled posterior features (N, d), each pair weighted (N,) by the cluster's mass
        in [0, 1]: the logit rows of a and b become the mean row of the latents `start_from` (those
        that held the cluster) +- (margin / std) u, so the logits of a and b differ by 2 margin at
        one standard deviation from the mean. The split of divisive clustering. u is first made
        orthogonal to the difference between the rest of the pairs and the cluster, so the pairs
        other latents hold are not flung to a or b by a direction fitted on the cluster alone.
        """
        w = weights.to(features.device)
        rest = 1 - w
        w = w / w.sum()  # (N,)
        mean = (w[:, None] * features).sum(0)  # (d,)
        u = torch.linalg.svd((features - mean) * w.sqrt()[:, None], full_matrices=False)[2][0]  # (d,)
        if rest.sum() > 1e-3:
            gap = F.normalize((rest[:, None] * features).sum(0) / rest.sum() - mean, dim=0)  # (d,)
            u = F.normalize(u - (u @ gap) * gap, dim=0)
        scale = margin / ((w * ((features - mean) @ u) ** 2).sum().sqrt() + 1e-8)
        post = self.post_head
        row, bias = post.weight[list(start_from)].mean(0), post.bias[list(start_from)].mean(0)
        post.weight[a], post.weight[b] = row + scale * u, row - scale * u
        post.bias[a], post.bias[b] = bias - scale * (mean @ u), bias + scale * (mean @ u)

    @torch.no_grad()
    def posterior_from_centroids(self, centroids, whiten, mean, temperature=1.0):
        """
        Set the posterior head to a mixture of Gaussians of variance `temperature` at centroids
        (K, m) in the whitened feature space z = (f - mean) @ whiten, whiten (d, m):
        logit_k = -|z - c_k|^2 / (2 temperature) up to a term shared by every k, that is
        (z . c_k - |c_k|^2 / 2) / temperature, linear in the pooled features f.
        """
        weight = centroids @ whiten.T  # (K, d)
        self.post_head.weight.copy_(weight / temperature)
        self.post_head.bias.copy_((-0.5 * (centroids ** 2).sum(1) - weight @ mean) / temperature)

    @torch.no_grad()
    def posterior_gaussians_at(self, project, mean, std):
        """
        Set the continuous posterior to mu_xi = (f - mean) @ project on the first n dimensions
        (project (d, n): a linear map of the pooled features f) and 0 on the rest, with
        sigma_xi = std on those n and 1, the prior's, on the rest.
        """
        n = project.shape[1]
        weight, bias = self.post_head.weight, self.post_head.bias
        weight.zero_()
        bias.zero_()
        weight[:n] = project.T
        bias[:n] = -mean @ project
        bias[self.dz:self.dz + n] = 2 * math.log(std)

    def posterior_features(self, idx, pool_weights):
        """Pool the posterior backbone's final states with weights (B, T) -> (B, d)."""
        _, hidden = self.posterior(idx, return_hidden=True)
        h = self.posterior.ln_f(hidden[:, -1])  # (B, T, d)
        w = pool_weights.float() / pool_weights.sum(1, keepdim=True)  # (B, T)
        return (h * w.unsqueeze(-1)).sum(1)

    def posterior_params(self, idx, pool_weights):
        """The posterior head on the pooled states: (B, out), K logits or (mu, log sigma^2)."""
        return self.post_head(self.posterior_features(idx, pool_weights))


# ----------------------------------------------------------------------------------------------
# A batch of (x, y) pairs as tensors

SLOT_OFFSET = 4  # prompt = <bos> <x> x.. </x> <z> SLOT </z> <y>: <z> at len(x)+3, slot at len(x)+4


def make_batch(task, pairs, K, device):
    """
    pairs: list of (x, y tokens). Returns a dict of tensors:
      base_idx (B, T), base_mask (B, T-1): the record with <z_empty>, y targets marked
      y_state_mask (B, T): positions whose state pools into the posterior (the y tokens)
      gen_idx (B*K, T), gen_mask (B*K, T-1): row b*K+k has <zk> in the slot (discrete only)
      route_pos (B,), slot_pos (B,)
    """
    x_tokens = [task.input_tokens(x) for x, _ in pairs]
    records = [encode(record_tokens(xt, y)) for xt, (_, y) in zip(x_tokens, pairs)]
    starts = [len(xt) + 7 for xt in x_tokens]  # first y token
    base_idx, base_mask = pad_batch(records, PAD, starts, device)
    T = base_idx.shape[1]
    y_state_mask = torch.zeros(len(pairs), T, dtype=torch.bool, device=device)
    y_state_mask[:, 1:] = base_mask
    batch = {"base_idx": base_idx, "base_mask": base_mask, "y_state_mask": y_state_mask,
             "route_pos": torch.tensor([len(xt) + 3 for xt in x_tokens], device=device),
             "slot_pos": torch.tensor([len(xt) + SLOT_OFFSET for xt in x_tokens], device=device)}
    if K:
        gen_idx = base_idx.repeat_interleave(K, dim=0)  # (B*K, T)
        latent_ids = torch.tensor([STOI[t] for t in LATENT_TOKENS[:K]], device=device).repeat(len(pairs))
        gen_idx[torch.arange(len(gen_idx), device=device), batch["slot_pos"].repeat_interleave(K)] = latent_ids
        batch["gen_idx"], batch["gen_mask"] = gen_idx, base_mask.repeat_interleave(K, dim=0)
    return batch


SUPPORT_THRESHOLD = 0.01  # JSD compares latents on the tokens the base model gives >= 1%


@torch.no_grad()
def base_token_stats(base, batch):
    """
    The z-free base model on y. Returns per-token log p_base (B, T-1); its support (B, T-1, V):
    the tokens it gives at least SUPPORT_THRESHOLD; and the entropy share H_t / mean_t H (B, T-1)
    of each y target. H_t is the base model's predictive entropy: high where the strategy is
    decided, ~0 where the next token is determined.
    """
    logits = base(batch["base_idx"])
    logp_tok = token_log_probs(logits, batch["base_idx"])
    mask = batch["base_mask"].float()
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    support = logp > math.log(SUPPORT_THRESHOLD)  # tokens the base model finds plausible
    entropy = -(logp.exp() * logp).sum(-1) * mask  # (B, T-1)
    entropy_share = entropy / (entropy.sum(1, keepdim=True) / mask.sum(1, keepdim=True)).clamp(min=1e-8)
    return logp_tok, support, entropy_share


def token_weights(batch, entropy_share, token_weighted):
    """
    Weights of the y targets (B, T-1): for recon, 1 everywhere or (token_weighted)
    w_t = (1 + H_t / mean_t H) / 2; for JSD, 1 everywhere or (token_weighted) H_t / mean_t H,
    so JSD rewards latents that differ at decisions rather than latents that write different garbage.
    """
    mask = batch["base_mask"].float()
    if not token_weighted:
        return mask, mask
    return 0.5 * (mask + entropy_share), entropy_share


def pool_weights(batch, entropy_share, posterior_pool):
    """
    Weights (B, T) of the states the posterior pools: the y tokens equally (mean), or (entropy)
    each y token by (1 + H / mean H) / 2, H the base model's entropy when it chose that token,
    so the few tokens where a trace commits to its strategy are not averaged away.
    """
    weights = batch["y_state_mask"].float()
    if posterior_pool == "entropy":  # the state at t+1 reads the token chosen at target t
        weights[:, 1:] = 0.5 * (batch["base_mask"].float() + entropy_share)
    return weights


# ----------------------------------------------------------------------------------------------
# The objective: one function per term


def recon_loss(q, gen_logp):
    """R = -E_q[log p_psi(y|x,z)] = -sum_k q_k log p_psi(y|x,k) per pair: q (B, K), gen_logp (B, K)."""
    return -(q * gen_logp).sum(-1)


def categorical_kl(log_q, log_p):
    """K = KL(q || p) = sum_k q_k (log q_k - log p_k) per pair: (B, K) -> (B,)."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def gaussian_kl_per_dim(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)) per dimension, in closed form: (B, dz) -> (B, dz)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """K = KL(q || p) for diagonal Gaussians, summed over dimensions: (B, dz) -> (B,)."""
    return gaussian_kl_per_dim(mu_q, logvar_q, mu_p, logvar_p).sum(-1)


def posterior_entropy_loss(log_q):
    """H(q(z|x,y)) = -sum_k q_k log q_k per pair."""
    return -(log_q.exp() * log_q).sum(-1)


def router_support_loss(outside_mass):
    """-log of the router's probability mass on the K latent tokens, per pair."""
    return -torch.log1p(-outside_mass.clamp(max=1 - 1e-6))


def router_marginal_kl_loss(router_log_p):
    """KL(mean_x p_phi(z|x) || Unif(K)) = sum_k pbar_k log(K pbar_k), over the batch."""
    p_bar = router_log_p.exp().mean(0)
    return (p_bar * torch.log(p_bar.clamp(min=1e-12) * p_bar.numel())).sum()


def gaussian_marginal_kl_loss(mu, logvar):
    """KL(N(mean mu, mean sigma^2 + var mu) || N(0, I)): batch-mean router moments against the prior."""
    m = mu.mean(0)
    v = logvar.exp().mean(0) + mu.var(0, unbiased=False)
    return 0.5 * (v + m ** 2 - 1 - v.log()).sum()


def jsd_loss(gen_logits, weights, K, support=None, log_pi=None):
    """
    Inter-latent token-level Jensen-Shannon divergence, per pair: at each y position t,

        JSD_t = H(sum_k pi_k p_k) - sum_k pi_k H(p_k),   p_k = p_psi(. | x, y_<t, z=k)

    summed over the y positions with weights (B, T-1) (1 on y tokens, or the base entropy share),
    so it is on the per-record scale of the reconstruction, which it must outweigh to split
    latents apart (the exact ELBO is indifferent between entangled and disentangled solutions).
    pi_k is uniform, or (log_pi, (B, K, T-1)) each latent's posterior given the prefix y_<t:
    latents are then compared only on prefixes they could have written themselves. With support
    (B, T-1, V), each p_k is first renormalised on the tokens the base model finds plausible, so
    a latent cannot raise the JSD by writing tokens no strategy writes.
    """
    logits = gen_logits[:, :-1].float()
    B = logits.shape[0] // K
    logits = logits.view(B, K, *logits.shape[1:])  # (B, K, T-1, V)
    if support is not None:  # renormalise on the base model's support: no reward for garbage
        logits = logits.masked_fill(~support[:, None], -1e9)
    logp = F.log_softmax(logits, dim=-1)
    if log_pi is None:
        log_pi = torch.full(logp.shape[:3], -math.log(K), device=logp.device)
    log_mix = torch.logsumexp(log_pi[..., None] + logp, dim=1)  # (B, T-1, V)
    h_mix = -(log_mix.exp() * log_mix).sum(-1)
    h_each = (log_pi.exp() * -(logp.exp() * logp).sum(-1)).sum(1)
    return ((h_mix - h_each) * weights).sum(-1)


def prefix_posterior(router_logp, tok, mask):
    """
    log pi_{k,t} = log p(z=k | x, y_<t) proportional to log p_phi(k|x) + sum_{t'<t} log p_psi(y_t'|x,y_<t',k),
    from the router (B, K) and per-token log-probs (B, K, T-1) on the y targets (mask (B, T-1)).
    Detached: it says where to compare latents, it is not itself optimised.
    """
    with torch.no_grad():
        written = (tok * mask[:, None]).cumsum(-1) - tok * mask[:, None]  # exclusive: y_<t only
        return F.log_softmax(router_logp[..., None] + written, dim=1)


def beta_at(step, cfg):
    """constant; linear 0 -> beta over beta_warmup; cyclical: ramp over the first half of each cycle."""
    if cfg.beta_schedule == "linear":
        return cfg.beta * min(1.0, step / max(1, cfg.beta_warmup))
    if cfg.beta_schedule == "cyclical":
        return cfg.beta * min(1.0, 2 * (step % cfg.beta_warmup) / cfg.beta_warmup)
    return cfg.beta


def discrete_pass(fact, batch, weights, pool):
    """
    All K latents in one batched forward, with recon weights (B, T-1) and the posterior's pooling
    weights pool (B, T). Returns gen_logits (B*K, T, V), the per-token log-probs (B, K, T-1),
    log p_psi(y|x,k) raw and with recon weights (B, K), the router log p_phi(k|x) (B, K) with its
    outside mass (B,), and the posterior log q(k|x,y) (B, K).
    """
    B, K = batch["base_idx"].shape[0], fact.K
    gen_logits = fact.lm(batch["gen_idx"])  # (B*K, T, V)
    tok = token_log_probs(gen_logits, batch["gen_idx"]).view(B, K, -1)  # (B, K, T-1)
    gen_logp_raw = (tok * batch["gen_mask"].view(B, K, -1)).sum(-1)  # (B, K) log p_psi(y|x,k)
    gen_logp = (tok * weights[:, None]).sum(-1)  # (B, K) with recon weights
    # the router position precedes the latent token, so any of the K copies gives p_phi(z|x)
    route_logits = gen_logits.view(B, K, *gen_logits.shape[1:])[:, 0][torch.arange(B), batch["route_pos"]]
    router_logp, outside = router_log_probs(route_logits, [STOI[t] for t in LATENT_TOKENS[:K]])
    log_q = F.log_softmax(fact.posterior_params(batch["base_idx"], pool).float(), -1)
    return gen_logits, tok, gen_logp_raw, gen_logp, router_logp, outside, log_q


def continuous_pass(fact, batch, weights, pool, S):
    """
    S reparameterised samples z_s = mu_q + sigma_q * eps_s per pair, in one batched forward
    (weights and pool as in discrete_pass).
    Returns (1/S) sum_s log p_psi(y|x,z_s) raw and weighted (B,), posterior (mu, logvar) and
    router (mu, logvar), each (B, dz).
    """
    B = batch["base_idx"].shape[0]
    mu_q, logvar_q = fact.posterior_params(batch["base_idx"], pool).float().chunk(2, dim=-1)
    eps = torch.randn(B, S, mu_q.shape[-1], device=mu_q.device)  # (B, S, dz)
    z = (mu_q[:, None] + (0.5 * logvar_q[:, None]).exp() * eps).reshape(B * S, -1)  # (B*S, dz)
    gen_idx = batch["base_idx"].repeat_interleave(S, dim=0)  # (B*S, T)
    logits, hidden = fact.lm(gen_idx, latent=z, latent_pos=batch["slot_pos"].repeat_interleave(S),
                             return_hidden=True)
    tok = token_log_probs(logits, gen_idx).view(B, S, -1)  # (B, S, T-1)
    gen_logp = (tok * weights[:, None]).sum(-1).mean(1)
    gen_logp_raw = (tok * batch["base_mask"][:, None]).sum(-1).mean(1)
    # the router reads the state at <z>, before the slot, so it never sees z
    route_state = fact.lm.ln_f(hidden[::S, -1][torch.arange(B), batch["route_pos"]])  # (B, d)
    mu_p, logvar_p = fact.router_head(route_state).float().chunk(2, dim=-1)
    return gen_logp_raw, gen_logp, mu_q, logvar_q, mu_p, logvar_p


def objective(fact, base, batch, cfg, beta):
    """
    The loss J = recon + beta * kl + aux for one batch, and a dict of every term (raw and
    weighted) for logging. Discrete latents are enumerated exactly; continuous ones sampled.
    """
    base_logp, support, entropy_share = base_token_stats(base, batch)
    weights, jsd_weights = token_weights(batch, entropy_share, cfg.token_weighted)
    pool = pool_weights(batch, entropy_share, cfg.posterior_pool)
    base_recon = -(base_logp * weights).sum(-1)  # (B,) the z-free baseline's (weighted) y-loss
    logs, aux = {}, {}
    if cfg.latent == "discrete":
        gen_logits, tok, gen_logp_raw, gen_logp, router_logp, outside, log_q = discrete_pass(fact, batch, weights, pool)
        q = log_q.exp()
        recon, raw_recon = recon_loss(q, gen_logp), recon_loss(q, gen_logp_raw)
        kl = categorical_kl(log_q, router_logp)
        if cfg.posterior_entropy:
            aux["aux/posterior_entropy"] = cfg.posterior_entropy * posterior_entropy_loss(log_q).mean()
        if cfg.router_support:
            aux["aux/router_support"] = cfg.router_support * router_support_loss(outside).mean()
        if cfg.router_marginal_kl:
            aux["aux/router_marginal_kl"] = cfg.router_marginal_kl * router_marginal_kl_loss(router_logp)
        if cfg.jsd:
            log_pi = prefix_posterior(router_logp, tok, batch["base_mask"].float()) if cfg.jsd_prefix else None
            aux["aux/jsd"] = -cfg.jsd * jsd_loss(gen_logits, jsd_weights, fact.K, support, log_pi).mean()
        log_marginal = torch.logsumexp(router_logp + gen_logp_raw, dim=-1)  # exact log p(y|x)
        logs.update({"diag/log_marginal": log_marginal.mean().item(),
                     "diag/elbo_gap": (log_marginal + raw_recon + kl).mean().item(),
                     "diag/router_outside_mass": outside.mean().item(),
                     **{f"usage/router_z{k + 1}": v for k, v in enumerate(router_logp.exp().mean(0).tolist())},
                     **{f"usage/posterior_z{k + 1}": v for k, v in enumerate(q.mean(0).tolist())}})
    else:
        gen_logp_raw, gen_logp, mu_q, logvar_q, mu_p, logvar_p = continuous_pass(fact, batch, weights, pool, cfg.samples)
        recon, raw_recon = -gen_logp, -gen_logp_raw
        kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p)
        if cfg.posterior_variance:
            aux["aux/posterior_variance"] = cfg.posterior_variance * logvar_q.exp().mean()
        if cfg.router_marginal_kl:
            aux["aux/router_marginal_kl"] = cfg.router_marginal_kl * gaussian_marginal_kl_loss(mu_p, logvar_p)
        logs.update({"diag/posterior_var": logvar_q.exp().mean().item(),
                     "diag/router_var": logvar_p.exp().mean().item(),
                     "diag/elbo": -(raw_recon + kl).mean().item()})

    if cfg.normalized_recon:
        recon = recon / base_recon.clamp(min=1e-3)
    recon_term, kl_mean = recon.mean(), kl.mean()
    kl_term = beta * torch.clamp(kl_mean, min=cfg.free_bits) if cfg.free_bits else beta * kl_mean
    total = recon_term + kl_term + sum(aux.values())  # J = R + beta K + aux
    logs.update({"loss/total": total.item(), "loss/recon": recon_term.item(), "loss/recon_raw": raw_recon.mean().item(),
                 "loss/recon_base": -(base_logp * batch["base_mask"]).sum(-1).mean().item(),
                 "loss/kl": kl_mean.item(), "loss/kl_weighted": kl_term.item(), "beta": beta,
                 **{k: v.item() for k, v in aux.items()}})
    magnitude = abs(recon_term.item()) + abs(kl_term.item()) + sum(abs(v.item()) for v in aux.values())
    for name, value in [("loss/recon", recon_term), ("loss/kl", kl_term), *aux.items()]:
        logs["share/" + name.split("/")[1]] = abs(value.item()) / max(magnitude, 1e-12)
    return total, logs


# ----------------------------------------------------------------------------------------------
# Data: pairs (x, y) with y from the base model or from the true mixture


def training_pairs(task, base, cfg, step, device):
    """Batch `step`'s pairs: inputs from the training split, y ~ p_base(y|x) (or the DGP)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    if cfg.data == "dgp":
        return [(x, y) for x, _, y in (task.sample(rng, "train") for _ in range(cfg.batch_size))]
    xs = [task.sample(rng, "train")[0] for _ in range(cfg.batch_size)]
    ys = generate_ys(base, task, xs, temperature=1.0, seed=cfg.seed * 1_000_003 + step)
    return [(x, y) for x, y in zip(xs, ys) if y is not None]


# ----------------------------------------------------------------------------------------------
# Evaluation: router-sampled generation, controlled latents, the posterior


@torch.no_grad()
def router_distribution(fact, task, xs):
    """Discrete: p_phi(z|x) (N, K). Continuous: (mu, logvar) (N, dz) each."""
    device = fact.lm.tok_emb.weight.device
    pairs = [(x, []) for x in xs]
    batch = make_batch(task, pairs, 0, device)
    logits, hidden = fact.lm(batch["base_idx"], return_hidden=True)
    rows = torch.arange(len(xs), device=device)
    if fact.latent == "discrete":
        latent_ids = [STOI[t] for t in LATENT_TOKENS[:fact.K]]
        return router_log_probs(logits[rows, batch["route_pos"]], latent_ids)[0].exp().cpu()
    state = fact.lm.ln_f(hidden[:, -1][rows, batch["route_pos"]])
    return tuple(t.cpu() for t in fact.router_head(state).float().chunk(2, dim=-1))


@torch.no_grad()
def posterior_of(fact, base, task, pairs, posterior_pool, features=False):
    """
    q(z|x,y) for pairs: probabilities (N, K), or (mu, logvar) (N, dz) each; with features, also
    the pooled states (N, d) the posterior head reads.
    """
    device = fact.lm.tok_emb.weight.device
    pooled = []
    for i in range(0, len(pairs), 256):
        batch = make_batch(task, pairs[i:i + 256], 0, device)
        share = base_token_stats(base, batch)[2] if posterior_pool == "entropy" else None  # mean: no base pass
        pooled.append(fact.posterior_features(batch["base_idx"], pool_weights(batch, share, posterior_pool)))
    pooled = torch.cat(pooled)
    out = fact.post_head(pooled).float().cpu()
    out = F.softmax(out, -1) if fact.latent == "discrete" else tuple(out.chunk(2, dim=-1))
    return (out, pooled) if features else out


def evaluate_factorization(fact, base, task, cfg, seed):
    """Every stage-2 metric on held-out inputs, plus the snapshot arrays for the figures."""
    fact.eval()
    xs = heldout_inputs(task, cfg.eval_inputs, seed)
    samples = [s for s in dgp_samples(task, xs, seed + 1) if len(task.check(s[0], s[2]).strategies) == 1]
    labels = torch.tensor([task.strategies.index(s) for _, s, _ in samples])
    gen = torch.Generator().manual_seed(seed)
    metrics, snap = {}, {"strategy": labels.numpy()}
    if fact.latent == "discrete":
        K = fact.K
        router_p = router_distribution(fact, task, xs)  # (N, K)
        z_idx = torch.multinomial(router_p, 1, generator=gen).squeeze(1).tolist()
        ys = generate_ys(fact.lm, task, xs, [LATENT_TOKENS[k] for k in z_idx], seed=seed)
        metrics.update({f"router/{k}": v for k, v in generation_metrics(task, xs, ys).items()})
        # controlled latents: one greedy decode per latent value per input
        ys_per_latent = [generate_ys(fact.lm, task, xs, [LATENT_TOKENS[k]] * len(xs), temperature=0.0)
                         for k in range(K)]
        C = contingency(task, xs * K, sum(ys_per_latent, []), [k for k in range(K) for _ in xs], K)
        metrics["alignment_one_to_one"] = alignment_one_to_one(C, total=K * len(xs))
        metrics["local_strategy_coverage_mean"], metrics["local_strategy_full_coverage_rate"] = \
            local_coverage(task, xs, ys_per_latent)
        metrics["controlled_answer_accuracy"] = sum(
            task.check(x, y).correct for ys in ys_per_latent for x, y in zip(xs, ys) if y is not None) / (K * len(xs))
        metrics["contingency"] = C.tolist()
        q = posterior_of(fact, base, task, [(x, y) for x, _, y in samples], cfg.posterior_pool)  # (N, K)
        q_argmax = q.argmax(-1)
        Cq = torch.zeros(K, len(task.strategies))
        Cq.index_put_((q_argmax, labels), torch.ones(len(labels)), accumulate=True)
        metrics["posterior_accuracy"] = alignment_one_to_one(Cq)
        metrics["router_usage"] = router_p.mean(0).tolist()
        snap.update({"q": q.numpy(), "contingency": C.numpy(), "posterior_contingency": Cq.numpy()})
    else:
        mu_p, logvar_p = router_distribution(fact, task, xs)
        z = mu_p + (0.5 * logvar_p).exp() * torch.randn(mu_p.shape, generator=gen)  # z ~ p_phi(z|x)
        ys = generate_ys(fact.lm, task, xs, latent=z, seed=seed)
        metrics.update({f"router/{k}": v for k, v in generation_metrics(task, xs, ys).items()})
        sampled_labels = [task.check(x, y).strategies if y is not None else frozenset() for x, y in zip(xs, ys)]
        keep = [i for i, s in enumerate(sampled_labels) if len(s) == 1]
        z_labels = torch.tensor([task.strategies.index(next(iter(sampled_labels[i]))) for i in keep])
        metrics["sampled_z_probe_acc"] = linear_probe_accuracy(task, [xs[i] for i in keep], z[keep], z_labels)
        mu_q, logvar_q = posterior_of(fact, base, task, [(x, y) for x, _, y in samples], cfg.posterior_pool)
        sample_xs = [x for x, _, _ in samples]
        metrics["posterior_mu_probe_acc"] = linear_probe_accuracy(task, sample_xs, mu_q, labels)
        metrics["posterior_sampled_gap"] = metrics["posterior_mu_probe_acc"] - metrics["sampled_z_probe_acc"]
        metrics.update(centroid_geometry(mu_q, labels, len(task.strategies)))
        mu_ps, logvar_ps = router_distribution(fact, task, sample_xs)  # the prior of each posterior row
        kl_dims = gaussian_kl_per_dim(mu_q, logvar_q, mu_ps, logvar_ps).mean(0)  # (dz,)
        metrics["kl_per_dim"] = kl_dims.tolist()
        metrics["active_units"] = int((mu_q.var(0) > 0.01).sum())
        metrics.update(centroid_control(fact, task, xs, mu_q, labels))
        metrics["router_nearest_centroid_rate"] = nearest_centroid_rate(task, z, sampled_labels, mu_q, labels)
        snap.update({"mu": mu_q.numpy(), "z_sampled": z[keep].numpy(), "z_strategy": z_labels.numpy()})
    fact.train()
    return metrics, snap


def linear_probe_accuracy(task, xs, features, labels, test_fraction=1 / 3):
    """A logistic probe from features (N, d) to strategy labels, scored on inputs it never saw."""
    if len(labels) < 20:
        return float("nan")
    is_train = split_by_input(task, xs, test_fraction)
    valid = torch.ones(1, len(labels), dtype=torch.bool)
    return float(train_probes(features[None].float(), labels, valid, len(task.strategies), is_train)[0])


def strategy_centroids(mu, labels, n_classes, min_count=1):
    """The mean of mu (N, dz) over each strategy with at least min_count rows: (present, (C, dz))."""
    present = [c for c in range(n_classes) if (labels == c).sum() >= min_count]
    return present, torch.stack([mu[labels == c].mean(0) for c in present])


def centroid_geometry(mu, labels, n_classes):
    """Mean pairwise distance of per-strategy centroids over the mean within-strategy spread."""
    present, centroids = strategy_centroids(mu, labels, n_classes, min_count=2)
    spread = torch.stack([(mu[labels == c] - centroids[i]).norm(dim=-1).mean() for i, c in enumerate(present)])
    dists = torch.pdist(centroids) if len(present) > 1 else torch.zeros(1)
    return {"centroid_distance": float(dists.mean() / spread.mean().clamp(min=1e-8)),
            "within_strategy_spread": float(spread.mean()), "centroid_pairwise_distance": float(dists.mean())}


def centroid_control(fact, task, xs, mu, labels):
    """Decode from each strategy's posterior centroid: the share of inputs that follow that strategy."""
    shares = {}
    present, centroids = strategy_centroids(mu, labels, len(task.strategies))
    for c, centroid in zip(present, centroids):
        s = task.strategies[c]
        z = centroid.expand(len(xs), -1)
        ys = generate_ys(fact.lm, task, xs, latent=z, temperature=0.0)
        shares[s] = sum(y is not None and s in task.check(x, y).strategies for x, y in zip(xs, ys)) / len(xs)
    return {"centroid_control": shares, "centroid_control_mean": sum(shares.values()) / max(1, len(shares))}


def nearest_centroid_rate(task, z, decoded, mu, labels):
    """
    The share of router draws z (N, dz) whose decode follows the strategy of the posterior centroid
    nearest to z: 1 when the router's z space carries the posterior's code, lower when draws land
    between centroids, where the generator was not trained. decoded: each draw's matched strategies.
    """
    present, centroids = strategy_centroids(mu, labels, len(task.strategies))  # (C, dz)
    nearest = torch.cdist(z.float(), centroids).argmin(1).tolist()  # (N,)
    hits = [decoded[i] == {task.strategies[present[k]]} for i, k in enumerate(nearest)]
    return sum(hits) / max(1, len(hits))


def save_snapshot(path, step, snap):
    """Append one evaluation's arrays to an .npz, one key per (array, step): 'q@300'."""
    data = dict(np.load(path)) if os.path.exists(path) else {}
    data = {k: v for k, v in data.items() if "@" not in k or int(k.split("@")[1]) < step}
    data.update({f"{k}@{step}": v for k, v in snap.items()})
    tmp = path + ".tmp.npz"
    np.savez(tmp, **data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Starting from clusters (--cluster-init): k-means before the first gradient step


CLUSTER_PAIRS = 512  # training pairs the step-0 clustering sees
CLUSTER_CONFIDENCE = 0.9  # mean max q(z|x,y) of the clustered posterior: sure, yet not saturated
CLUSTER_SPACING, CLUSTER_STD = 3.0, 0.5  # continuous: codes 3 prior sds apart, each 0.5 wide
KMEANS_RESTARTS, KMEANS_ITERS = 10, 100


def kmeans(points, K, generator):
    """Lloyd's algorithm on points (N, m) from KMEANS_RESTARTS random starts: the centroids (K, m)
    of the run with the least within-cluster sum of squares."""
    best, best_inertia = None, float("inf")
    for _ in range(KMEANS_RESTARTS):
        centroids = points[torch.randperm(len(points), generator=generator)[:K]]  # (K, m)
        for _ in range(KMEANS_ITERS):
            assign = torch.cdist(points, centroids).argmin(1)  # (N,)
            centroids = torch.stack([points[assign == k].mean(0) if (assign == k).any() else centroids[k]
                                     for k in range(K)])
        inertia = torch.cdist(points, centroids).min(1).values.pow(2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


def simplex_vertices(n):
    """n points (n, n - 1) at distance 1 from each other, centred on the origin."""
    centred = torch.eye(n) - 1 / n  # the corners of the (n-1)-simplex in R^n, less their mean
    u, s, _ = torch.linalg.svd(centred)
    return u[:, :n - 1] * s[:n - 1] / math.sqrt(2)  # the same points in the n-1 dimensions they span


def cluster_codes(n, dz):
    """The continuous codes of n clusters (n, dz): a simplex with edge CLUSTER_SPACING in the first
    n - 1 dimensions of z, 0 in the rest (no codes, (0, dz), for n < 2 or dz < n - 1)."""
    if n < 2 or dz < n - 1:
        return torch.zeros(0, dz)
    return F.pad(CLUSTER_SPACING * simplex_vertices(n), (0, dz - (n - 1)))


@torch.no_grad()
def cluster_posterior(fact, base, task, cfg):
    """
    The posterior starts from clusters of CLUSTER_PAIRS training pairs: k-means on the top
    cfg.cluster_init principal components of the pooled posterior features, each scaled to unit
    variance. The largest directions of the features follow the input (its numbers, its length);
    whitened, the few directions along which the traces fall into groups count as much, and
    the groups are the strategies where the base model's states tell them apart.
    Discrete: K clusters, and the head becomes their Gaussian mixture, at the temperature that
    makes the mean largest q(z|x,y) CLUSTER_CONFIDENCE: a saturated softmax passes the ELBO almost
    no gradient for the pairs the clustering got wrong.
    Continuous: one cluster per strategy, each given a corner of a simplex with edge
    CLUSTER_SPACING in the first C-1 dimensions of z, and mu_xi becomes the least-squares linear
    map from the pooled features to their cluster's corner, with sigma_xi = CLUSTER_STD: the
    generator is shown well-separated codes from the first step, instead of means that start
    together and that a strong decoder never needs to pull apart.
    Returns the share of pairs in each cluster, for the log.
    """
    device = fact.lm.tok_emb.weight.device
    pairs = training_pairs(task, base, replace(cfg, batch_size=CLUSTER_PAIRS), -1_000_000, device)
    _, features = posterior_of(fact, base, task, pairs, cfg.posterior_pool, features=True)  # (N, d)
    mean, whiten, points = whitened(features, cfg.cluster_init)
    n_clusters = fact.K or len(task.strategies)
    centroids = kmeans(points, n_clusters, torch.Generator().manual_seed(cfg.seed))  # (C, m)
    assign = torch.cdist(points, centroids).argmin(1)  # (N,)
    if fact.latent == "discrete":
        posterior_to_centroids(fact, points, centroids, whiten, mean)
    else:
        posterior_to_codes(fact, features, assign)
    return (torch.bincount(assign, minlength=n_clusters).float() / len(assign)).tolist()


def whitened(features, m):
    """The top m principal components of features (N, d), each scaled to unit variance: the
    mean (d,), the map whiten (d, m), and the points (N, m) = (features - mean) @ whiten."""
    mean = features.mean(0)  # (d,)
    _, singular, basis = torch.linalg.svd(features - mean, full_matrices=False)
    whiten = basis[:m].T * (len(features) ** 0.5 / singular[:m])  # (d, m): unit variance per component
    return mean, whiten, (features - mean) @ whiten


def posterior_to_centroids(fact, points, centroids, whiten, mean):
    """
    Discrete: the head becomes the Gaussian mixture of centroids (K, m) in the whitened space,
    at the temperature that makes the mean largest q(z|x,y) over points (N, m) CLUSTER_CONFIDENCE.
    """
    sq_dist = torch.cdist(points, centroids) ** 2  # (N, K)
    lo, hi = -8.0, 8.0  # bisect log temperature: the confidence falls as the temperature rises
    for _ in range(40):
        log_t = (lo + hi) / 2
        confident = F.softmax(-sq_dist / (2 * math.exp(log_t)), -1).max(1).values.mean() > CLUSTER_CONFIDENCE
        lo, hi = (log_t, hi) if confident else (lo, log_t)
    fact.posterior_from_centroids(centroids, whiten, mean, temperature=math.exp(lo))


def posterior_to_codes(fact, features, assign):
    """
    Continuous: mu_xi becomes the least-squares linear map from the pooled features (N, d) to the
    code of each pair's cluster (assign (N,)), with sigma_xi = CLUSTER_STD.
    """
    C = fact.codes.shape[0]
    corners = fact.codes[:, :C - 1].to(features)  # (C, C-1)
    targets = corners[assign] - corners[assign].mean(0)  # (N, C-1), centred like the features
    mean = features.mean(0)  # (d,)
    # the map reads all d feature directions, not just the M the clusters were found on:
    # held-out traces of one strategy then land closer together (linear: spread 0.30 vs 0.58)
    fit = torch.linalg.lstsq(features - mean, targets).solution  # (d, C-1)
    fact.posterior_gaussians_at(fit, mean, CLUSTER_STD)


def cluster_means(points, assign, empty):
    """The mean of points (N, m) in each cluster of assign (N,); a cluster with none takes its row of empty (C, m)."""
    return torch.stack([points[assign == c].mean(0) if (assign == c).any() else empty[c] for c in range(len(empty))])


@torch.no_grad()
def latent_log_likelihoods(fact, task, pairs, z=None, batch_pairs=64):
    """
    log p_psi(y|x, latent) of each pair (x, y) at each latent: the K tokens (discrete), or the C
    vectors z (C, dz) (continuous). Returns (N, K) or (N, C).
    """
    device = fact.lm.tok_emb.weight.device
    out = []
    for i in range(0, len(pairs), batch_pairs):
        if z is None:  # row b*K+k of gen_idx is pair b with <zk> in the slot
            batch = make_batch(task, pairs[i:i + batch_pairs], fact.K, device)
            idx, mask, n = batch["gen_idx"], batch["gen_mask"], fact.K
            logits = fact.lm(idx)
        else:  # row b*C+c is pair b with z_c added at the slot
            batch = make_batch(task, pairs[i:i + batch_pairs], 0, device)
            n = len(z)
            idx, mask = batch["base_idx"].repeat_interleave(n, dim=0), batch["base_mask"].repeat_interleave(n, dim=0)
            logits = fact.lm(idx, latent=z.to(device).repeat(len(batch["base_idx"]), 1),
                             latent_pos=batch["slot_pos"].repeat_interleave(n))
        out.append((token_log_probs(logits, idx) * mask).sum(-1).view(-1, n).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def reassign_clusters(fact, base, task, cfg, step):
    """
    The classification step of hard EM, with the generator as the judge (after --cluster-init):
    each of CLUSTER_PAIRS fresh training pairs joins the latent under which the generator gives
    its y the highest likelihood (continuous: the cluster at whose posterior centroid it does),
    and the posterior head is set from that assignment again (discrete: the Gaussian mixture of
    the clusters' means in the whitened features; continuous: each cluster sent to its code).
    k-means on the base model's features puts some traces with the wrong group; a generator
    trained on the whole group decodes that group's strategy, so it rates a stray trace higher
    under its own strategy's latent. Returns the share of pairs that changed cluster.
    """
    pairs = training_pairs(task, base, replace(cfg, batch_size=CLUSTER_PAIRS), -1_000_000 - step,
                            fact.lm.tok_emb.weight.device)
    posterior, features = posterior_of(fact, base, task, pairs, cfg.posterior_pool, features=True)
    if fact.latent == "discrete":
        features = features.cpu()
        current = posterior.argmax(1)  # (N,)
        assign = latent_log_likelihoods(fact, task, pairs).argmax(1)  # (N,)
        mean, whiten, points = whitened(features, cfg.cluster_init)
        centroids = cluster_means(points, assign, torch.zeros(fact.K, points.shape[1]))  # (K, m)
        posterior_to_centroids(fact, points, centroids, whiten, mean)
    else:
        mu, codes = posterior[0], fact.codes.cpu()
        current = torch.cdist(mu, codes).argmin(1)  # (N,) the cluster the posterior puts each pair in
        centroids = cluster_means(mu, current, codes)  # (C, dz)
        assign = latent_log_likelihoods(fact, task, pairs, centroids).argmax(1)  # (N,)
        posterior_to_codes(fact, features, assign.to(features.device))
    return (assign != current).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Splitting twin latents (--split-twins): a move between gradient steps


TWIN_AGREEMENT = 0.5  # two latents whose greedy decodes coincide on half the inputs are twins
TWIN_MARGIN = 0.25  # a third latent stands apart from twins that coincide this much more often
DEAD_USAGE = 0.02  # a latent with less posterior mass than this learns from no pairs


def choose_split(agreement, usage):
    """
    Which posterior mass to split, and between which two latents, for the traps in which a latent
    holds more than one strategy. From the (K, K) share of inputs on which two latents' greedy
    decodes coincide and each latent's posterior mass (K,): take the most alike pair (i, j); if
    they are twins (alike on at least TWIN_AGREEMENT of inputs) and some other latent stands apart
    from both (alike on less than TWIN_AGREEMENT, or TWIN_MARGIN less than the twins: the latents
    have begun to specialise), one latent holds more than one strategy's mass:
      - mixed twins, the pair holds more mass than any latent apart (it shares two strategies):
        split the pair's mass between i and j;
      - pure twins, a latent m apart holds more (the pair shares one strategy, m mixes two):
        split m's mass between m and the lighter twin, which leaves its strategy to the other twin.
    Without twins, a dead latent (posterior mass under DEAD_USAGE) leaves its strategy to another:
    split the heaviest latent's mass between it and the dead one. When b takes half of a's own
    mass (cluster == (a,)), split_twins first makes b a copy of a.
    Returns (a, b, cluster), the latents whose mass is split between a and b, or None.
    """
    K = len(usage)
    i, j = max(((i, j) for i in range(K) for j in range(i + 1, K)), key=lambda ij: agreement[ij[0]][ij[1]])
    twins = agreement[i][j]
    apart = [k for k in range(K) if k not in (i, j)
             and max(agreement[k][i], agreement[k][j]) < max(TWIN_AGREEMENT, twins - TWIN_MARGIN)]
    if twins >= TWIN_AGREEMENT and apart:
        m = max(apart, key=lambda k: usage[k])
        if usage[i] + usage[j] >= usage[m]:
            return i, j, (i, j)
        return m, min((i, j), key=lambda k: usage[k]), (m,)
    dead = min(range(K), key=lambda k: usage[k])
    if usage[dead] < DEAD_USAGE:
        m = max(range(K), key=lambda k: usage[k])
        return m, dead, (m,)
    return None


@torch.no_grad()
def split_twins(fact, base, task, cfg, step, n_inputs=128):
    """
    choose_split on n_inputs fresh training pairs, then split_posterior: the pairs of the mass
    being split go to one latent or the other, so the two learn from different traces. Returns a
    dict for the log.
    """
    pairs = training_pairs(task, base, replace(cfg, batch_size=n_inputs), -2 - step, fact.lm.tok_emb.weight.device)
    xs = [x for x, _ in pairs]
    ys = [generate_ys(fact.lm, task, xs, [LATENT_TOKENS[k]] * len(xs), temperature=0.0) for k in range(fact.K)]
    agreement = [[sum(a is not None and a == b for a, b in zip(ys[i], ys[j])) / len(xs) for j in range(fact.K)]
                 for i in range(fact.K)]
    q, features = posterior_of(fact, base, task, pairs, cfg.posterior_pool, features=True)  # (N, K), (N, d)
    fact.train()  # generate_ys left the model in eval mode, which the posterior above is read in
    usage = q.mean(0).tolist()
    move = choose_split(agreement, usage)
    if move is not None:
        a, b, cluster = move
        if cluster == (a,):  # b takes half of a's mass: it starts as a's twin, as good on it as a
            fact.copy_latent(a, b)
        fact.split_posterior(a, b, features, q[:, list(cluster)].sum(1), start_from=cluster)
    return {"split/agreement": agreement, "split/usage": usage, "split/move": move}


# ----------------------------------------------------------------------------------------------
# Training


INIT_TOLERANCE = 0.05  # at step 0 every latent's y-loss is within 5% of the base model's


@torch.no_grad()
def init_loss_ratios(fact, base, batch, cfg):
    """y-loss of the generator under each latent (continuous: one z ~ N(0, I)) / the base model's."""
    base_loss = -(token_log_probs(base(batch["base_idx"]), batch["base_idx"]) * batch["base_mask"]).sum()
    if fact.K:
        gen = token_log_probs(fact.lm(batch["gen_idx"]), batch["gen_idx"]) * batch["gen_mask"]
        per_latent = -gen.view(len(batch["base_idx"]), fact.K, -1).sum((0, 2))  # (K,)
    else:
        z = torch.randn(len(batch["base_idx"]), cfg.dz, device=batch["base_idx"].device)
        logits = fact.lm(batch["base_idx"], latent=z, latent_pos=batch["slot_pos"])
        per_latent = -(token_log_probs(logits, batch["base_idx"]) * batch["base_mask"]).sum()[None]
    return (per_latent / base_loss).tolist()


def load_base(cfg, device):
    """The frozen base model, its task (with the options it was trained on), its folder and checkpoint."""
    task_name = get_task(cfg.task).name
    base_dir = cfg.base or os.path.join("runs", task_name, "base")
    base_path = os.path.join(base_dir, "ckpt.pt")
    base_ckpt = load_checkpoint(base_path, vocab=VOCAB, task=task_name)
    task = get_task(task_name, **base_ckpt.get("task_options", {}))
    cfg.validate(len(task.strategies), base_ckpt["model_config"]["n_embd"])
    base = model_from_checkpoint(base_ckpt, base_path).to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    return base, task, base_dir, base_ckpt


def score_run(run, eval_inputs, device_name):
    """Rescore a stage-2 run at its checkpoint on more (or other) held-out inputs; same seed, same scores."""
    ckpt_path = os.path.join(run, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, vocab=VOCAB)
    saved = ckpt.get("train_config", {})
    if "latent" not in saved:
        raise ValueError(f"{ckpt_path} is not a stage-2 run (python evaluate.py {run} scores a base model)")
    with open(os.path.join(run, "config.json")) as f:
        run_config = json.load(f)
    known = {k: v for k, v in saved.items() if k in Config.__dataclass_fields__}
    cfg = replace(Config(**known), base=run_config["base"], eval_inputs=eval_inputs, device=device_name, score="")
    device = pick_device(device_name)
    base, task, _, base_ckpt = load_base(cfg, device)
    fact = Factorization(base_ckpt, cfg.latent, run_config["k"], cfg.dz, ckpt_path, seed=cfg.seed,
                         n_codes=len(task.strategies)).to(device)
    fact.load_state_dict(ckpt["model"])
    metrics, _ = evaluate_factorization(fact, base, task, cfg, cfg.seed)
    with open(os.path.join(run, f"metrics_{eval_inputs}.json"), "w") as f:
        json.dump({"step": ckpt["step"], "eval_inputs": eval_inputs, **metrics}, f, indent=2)
    summary = {k: v for k, v in metrics.items() if isinstance(v, float)}
    print(f"step {ckpt['step']}, {eval_inputs} inputs: " + " ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    return 0


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__.split("\n\n")[0])
    if cfg.score:
        return score_run(cfg.score, cfg.eval_inputs, cfg.device)
    device = pick_device(cfg.device)
    base, task, base_dir, base_ckpt = load_base(cfg, device)
    task_name = task.name
    base_path = os.path.join(base_dir, "ckpt.pt")
    K = (cfg.k or len(task.strategies)) if cfg.latent == "discrete" else 0
    out = cfg.out or os.path.join("runs", task_name, cfg.latent)
    ckpt_path, log_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.jsonl")
    seed_everything(cfg.seed)

    fact = Factorization(base_ckpt, cfg.latent, K, cfg.dz, base_path, seed=cfg.seed,
                         n_codes=len(task.strategies)).to(device)
    if cfg.cluster_init:  # the clusters live in the base model's features: keep them, train the head
        fact.posterior.requires_grad_(False)
    optimizer = configure_optimizer(fact, cfg.lr, cfg.weight_decay)
    start_step, posterior_frozen_until = 0, 0
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path, vocab=VOCAB, task=task_name)
        check_resume_config(ckpt["train_config"], asdict(cfg))
        fact.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, posterior_frozen_until = ckpt["step"], ckpt.get("posterior_frozen_until", 0)
        torch.set_rng_state(ckpt["torch_rng"])
    elif os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} exists; pass --resume to continue it or --out for a new run")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**asdict(cfg), "k": K, "base": base_dir}, f, indent=2)
    log = open(log_path, "a")

    def evaluate_and_snapshot(step):
        metrics, snap = evaluate_factorization(fact, base, task, cfg, cfg.seed)
        save_snapshot(os.path.join(out, "posterior.npz"), step, snap)
        log.write(json.dumps({"step": step, **metrics}) + "\n")
        log.flush()
        return metrics

    if start_step == 0:
        # the factorization must start where the base model is: y-loss per latent within
        # INIT_TOLERANCE of the base model's; latent noise that breaks it is halved until it holds
        batch = make_batch(task, training_pairs(task, base, cfg, -1, device), K, device)
        ratio, noise_scale = init_loss_ratios(fact, base, batch, cfg), 1.0
        while K and max(ratio) > 1 + INIT_TOLERANCE and noise_scale > 1 / 64:
            fact.shrink_latent_noise(0.5)
            ratio, noise_scale = init_loss_ratios(fact, base, batch, cfg), noise_scale / 2
        tqdm.write(f"step 0: y-loss per latent / base y-loss = {[round(r, 4) for r in ratio]}"
                   + (f" (latent noise x{noise_scale:g})" if noise_scale < 1 else ""))
        log.write(json.dumps({"step": 0, "init/y_loss_ratio": ratio, "init/noise_scale": noise_scale}) + "\n")
        if cfg.cluster_init:
            shares = cluster_posterior(fact, base, task, cfg)
            posterior_frozen_until = cfg.cluster_hold
            tqdm.write(f"step 0: posterior from k-means, cluster shares {[round(v, 2) for v in shares]}, "
                       f"frozen to step {posterior_frozen_until}")
            log.write(json.dumps({"step": 0, "init/cluster_shares": shares}) + "\n")
        metrics = evaluate_and_snapshot(0)

    fact.train()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               desc=f"{cfg.latent} {task.alias}", disable=None)
    t0, metrics = time.perf_counter(), {}
    for step in bar:
        pairs = training_pairs(task, base, cfg, step, device)
        batch = make_batch(task, pairs, K, device)
        lr = learning_rate(step, cfg.lr, cfg.warmup, cfg.steps, decay=cfg.lr_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, cfg.bf16):
            loss, logs = objective(fact, base, batch, cfg, beta_at(step, cfg))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step < posterior_frozen_until:  # after a split the generators learn from its assignment
            for p in [*fact.posterior.parameters(), *fact.post_head.parameters()]:
                p.grad = None
        torch.nn.utils.clip_grad_norm_(fact.parameters(), cfg.grad_clip)
        optimizer.step()
        done = step + 1
        if K > 2 and cfg.split_twins and done % cfg.split_twins == 0 and done <= cfg.steps // 2:
            split = split_twins(fact, base, task, cfg, done)
            if split["split/move"] is not None:
                a, b, cluster = split["split/move"]
                posterior_frozen_until = max(posterior_frozen_until, done + cfg.split_twins // 2)
                held = " and ".join(f"z{k + 1}" for k in cluster)
                tqdm.write(f"step {done}: the pairs {held} held split between z{a + 1} and z{b + 1}, "
                           f"posterior frozen to step {posterior_frozen_until}")
            log.write(json.dumps({"step": done, **split}) + "\n")
        if cfg.reassign and done % cfg.reassign == 0 and done <= cfg.steps // 2:
            moved = reassign_clusters(fact, base, task, cfg, done)
            tqdm.write(f"step {done}: {moved:.1%} of pairs moved to the cluster the generator rates highest")
            log.write(json.dumps({"step": done, "reassign/moved": moved}) + "\n")
        if done % cfg.log_interval == 0 or done == cfg.steps:
            bar.set_postfix(loss=f"{logs['loss/total']:.3f}", kl=f"{logs['loss/kl']:.3f}")
            log.write(json.dumps({"step": done, "lr": lr, **logs}) + "\n")
            log.flush()
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            metrics = evaluate_and_snapshot(done)
            save_checkpoint(ckpt_path, fact, VOCAB, task_name, optimizer=optimizer.state_dict(),
                            train_config=asdict(cfg), step=done, torch_rng=torch.get_rng_state(),
                            posterior_frozen_until=posterior_frozen_until)
            summary = {k: v for k, v in metrics.items() if isinstance(v, float)}
            tqdm.write(f"step {done}: " + " ".join(f"{k}={v:.3f}" for k, v in summary.items()))
    if metrics:
        metrics["train_seconds"] = time.perf_counter() - t0
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
