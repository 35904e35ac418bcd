"""
Stage 2: factorize the entangled base model into a router and a strategy-conditioned generator.

    discrete:    p(y|x) = sum_z  p_psi(y|x,z) p_phi(z|x),      z in {<z1> .. <zK>}
    continuous:  p(y|x) = int dz p_psi(y|x,z) p_phi(z|x),      z in R^dz

One causal LM, initialised from the base model, is router and generator. The router reads
<bos> <x> .. </x> <z> and predicts <zk> (continuous: N(mu_phi(x), sigma_phi(x)^2) from a head on
that state, or with --router mixture sum_m pi_m(x) N(mu_m(x), sigma_m(x)^2)); the generator
continues <zk> </z> <y> .. </y> <eos> (continuous: <z_empty>, plus E(z) added to its embedding).
A second copy of the base backbone, pooled over the y tokens, gives the posterior q_xi(z|x,y).
Training minimises the conditional ELBO on pairs x ~ task, y ~ p*(y|x) (--data model: y ~ p_base):

    J = R + beta K + aux                                                             objective
    R  -E_q[log p_psi(y|x,z)], tokens weighted by token_weights, optionally normalized_recon
       discrete: sum_k q(k|x,y) log p_psi(y|x,k), all K in one forward      discrete_recon_loss
       --hard-em: q = one_hot(argmax_k log p_psi(y|x,k)), classification EM          hard_assignment
       --traces-per-input G: an input's G distinct traces to distinct latents   per_input_assignment
       --posterior-vote N: for N steps argmax_k [log p_psi(y|x,k) + log q(k|x,y)]   assignment_scores
       continuous: (1/S) sum_s log p_psi(y|x, mu_xi + sigma_xi eps_s)        continuous_recon_loss
    K  KL(q_xi(z|x,y) || p_phi(z|x))   categorical_kl, gaussian_kl, mixture_kl (sampled); free_bits_kl
    aux, each behind its flag, times that flag's weight:
      --posterior-entropy   + H(q(z|x,y))                                  posterior_entropy_loss
      --router-support      - log sum_k p_full(<zk>|x)                     router_support_loss
      --router-marginal-kl  + KL(mean_x p_phi(z|x) || Unif(K))             router_marginal_kl_loss
                            Gaussian: the batch's router moments vs N(0, I)  gaussian_marginal_kl_loss
                            mixture: mean_x pi(x) vs Unif(M)                 router_marginal_kl_loss
      --jsd                 - sum_t JSD_t(p_psi(y_t|x,y_<t,z=1..K))        jsd_loss, prefix_posterior
      --posterior-variance  + mean_d sigma_xi,d^2                          posterior_variance_loss

Three moves outside the gradient make discovery reliable where the ELBO alone stalls
(docs/experiments.md): --cluster-init M starts the posterior from k-means on its features along the
M directions in which two traces of one input differ most (trace_contrast, cluster_posterior);
--reassign N, the classification step of hard EM, sends pairs to the latent whose generator rates
them highest (reassign_clusters); --starts N trains N starts to --start-steps and goes on with
the one whose partition of 512 pairs among the latents (score_start) the most other
starts reached, and among those the one whose hard-EM objective under the posterior,
max_k [log p_psi(y|x,k) + log q(k|x,y)], is highest (choose_start, score_start;
continuous: k runs over the posterior's clusters), all without labels. The k-means start and the
refits read the frozen base model's features; --posterior-thaw trains the posterior backbone with
the rest once the refits end (refits_end), where q needs more than those features tell it.
With --hard-em (classification EM, the discrete recipe) each pair trains only the generator of
k* = argmax_k log p_psi(y|x,k) (hard_assignment), and q is refitted to that assignment. With
--traces-per-input G each batch holds G distinct traces of each input, and the assignment is the
injective one of highest likelihood among them (per_input_assignment): two latents cannot both
keep one strategy of an input, so no generator learns a blend of two. With --posterior-vote N the
E-step of the first N steps maximises log p_psi(y|x,k) + log q(k|x,y) (assignment_scores), so
that the generators start from the k-means clusters rather than from their own near-ties, but
only where those clusters separate the two traces of at least VOTE_SPLIT of inputs
(cluster_split_rate): two distinct traces of one input are two strategies, no label is read.

The defaults are the recipe (Config, then RECIPES[(task, latent)]); a flag overrides both.

    python disentangle.py --task grid --latent discrete   # 12-15 minutes on one core beside other runs (sum 11-15)
    python disentangle.py --latent continuous             # grid, 13 minutes on one core (four starts)
    python evaluate.py runs/grid_pathfinding/discrete --inputs 1000   # rescore a finished run

Reads runs/<task>/base/ckpt.pt; writes runs/<task>/<latent>/: ckpt.pt, config.json (the resolved
values), log.jsonl, metrics.json (the final evaluation on --final-inputs inputs), posterior.npz.
"""

import itertools
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluate import (alignment_one_to_one, factorization_metrics, fit_probes, generate_ys, hard_em_objective,
                      latent_log_likelihoods, latent_loss_ratios, posterior_distribution, record_log_probs,
                      save_posterior_snapshot)
from model import (Factorization, append_jsonl, arg, autocast, check_numbers, configure_optimizer, learning_rate,
                   load_checkpoint, machine_info, model_from_checkpoint, open_run, pad_batch, parse_config,
                   pick_device, resolve_precision, router_log_probs, run_main, save_checkpoint, seed_everything,
                   token_log_probs, truncate_log, write_json)
from tasks import (PAD, STOI, TASKS, VOCAB, LATENT_TOKENS, MAX_LATENTS, encode, get_task, record_tokens,
                   sample_split_input)

# ----------------------------------------------------------------------------------------------
# Configuration: the defaults every recipe shares; RECIPES adds what a (task, latent) pair needs


@dataclass
class Config:
    task: str = arg("grid", "task name or alias: sum sort grid linear base add")
    latent: str = arg("discrete", "discrete (tokens <z1>..<zK>) or continuous (a vector at <z_empty>)")
    k: int = arg(0, "discrete: latents K (0: the task's number of strategies)")
    dz: int = arg(8, "continuous: latent dimension")
    base: str = arg("", "base run folder (default runs/<task>/base)")
    out: str = arg("", "run folder (default runs/<task>/<latent>)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda or mps")
    seed: int = arg(0, "seed for initialisation, data and evaluation")
    data: str = arg("dgp", "where y comes from: dgp (the true mixture) or model (sampled from the base)")
    steps: int = arg(1200, "optimisation steps")
    batch_size: int = arg(16, "(x, y) pairs per step")
    lr: float = arg(5e-4, "AdamW peak learning rate, after a linear warm-up")
    warmup: int = arg(50, "learning-rate warm-up steps")
    lr_decay: bool = arg(True, "cosine-decay the learning rate to lr/10 at the last step (off: constant)")
    weight_decay: float = arg(0.0, "AdamW weight decay on matrices")
    grad_clip: float = arg(1.0, "gradient-norm clip")
    samples: int = arg(4, "continuous: reparameterised samples S per pair")
    router: str = arg("gaussian", "continuous: p_phi(z|x) a gaussian, or a mixture of --components gaussians")
    components: int = arg(0, "continuous, --router mixture: components M (0: the task's number of strategies)")
    beta: float = arg(1.0, "weight of KL(q || p_phi)")
    free_bits: float = arg(0.0, "the KL term is max(mean KL, free_bits) over the batch (0: off)")
    token_weighted: bool = arg(True, "weight recon tokens by the base model's predictive entropy")
    normalized_recon: bool = arg(False, "divide recon by the base model's loss on the same y")
    posterior_entropy: float = arg(0.0, "discrete: weight of H(q(z|x,y))")
    router_support: float = arg(0.0, "discrete: weight of -log p(latent tokens | router prompt)")
    router_marginal_kl: float = arg(0.0, "weight of KL(batch-mean router || prior)")
    jsd: float = arg(0.0, "discrete: weight of the inter-latent token-level JSD (maximised)")
    jsd_prefix: bool = arg(True, "discrete: weight latents in the JSD by their posterior given the y prefix")
    posterior_variance: float = arg(0.0, "continuous: weight of the mean posterior variance")
    cluster_init: int = arg(0, "k-means start of the posterior along this many trace_contrast directions; "
                              "freezes its backbone")
    posterior_thaw: bool = arg(False, "with --cluster-init: the posterior backbone trains once the refits end")
    cluster_hold: int = arg(100, "with --cluster-init: steps the posterior head stays on the clusters")
    reassign: int = arg(0, "with --cluster-init: every N steps of the first half (--hard-em: of the run), "
                           "a hard-EM reassignment (0: off)")
    hard_em: bool = arg(False, "discrete: recon trains only each pair's latent of highest log p_psi(y|x,k)")
    posterior_vote: int = arg(0, "discrete, --hard-em: for this many first steps the E-step adds log q(k|x,y) "
                                 "to log p_psi(y|x,k)")
    traces_per_input: int = arg(1, "discrete, --hard-em: each batch holds this many distinct traces of each "
                                   "input, which go to distinct latents")
    starts: int = arg(1, "train this many starts (seeds seed, seed+1000, ..), go on with one (choose_start)")
    start_steps: int = arg(600, "with --starts > 1: the steps each start trains before the choice")
    eval_interval: int = arg(300, "steps between evaluations, checkpoints and posterior snapshots")
    eval_inputs: int = arg(200, "held-out inputs per evaluation during training")
    final_inputs: int = arg(500, "held-out inputs of the final evaluation (metrics.json)")
    log_interval: int = arg(10, "steps between log lines")
    resume: bool = arg(False, "continue the run in --out from its checkpoint")
    precision: str = arg("auto", "training matmuls: auto (bf16 where the hardware has it), bf16 or fp32")

    def ignored(self):
        """The settings that this configuration does not read: {name: the setting that makes it so}."""
        other = {"discrete": ("dz", "samples", "posterior_variance", "router", "components"),
                 "continuous": ("k", "posterior_entropy", "router_support", "jsd", "jsd_prefix", "hard_em",
                                "traces_per_input", "posterior_vote")}[self.latent]
        ignored = {name: f"--latent {self.latent}" for name in other}
        ignored.update({name: "--cluster-init 0" for name in ("cluster_hold", "reassign", "posterior_vote",
                                                              "posterior_thaw") if not self.cluster_init})
        ignored.update({"start_steps": "--starts 1"} if self.starts == 1 else {})
        ignored.update({"jsd_prefix": "--jsd 0"} if not self.jsd else {})
        ignored.update({name: "--no-hard-em" for name in ("traces_per_input", "posterior_vote")
                        if not self.hard_em and self.latent == "discrete"})
        ignored.update({"components": "--router gaussian"} if self.router == "gaussian" else {})
        return ignored

    def validate(self, given, n_strategies):
        """Every value in range, and no flag that this configuration would ignore, before any work."""
        for name, allowed in {"latent": ("discrete", "continuous"), "data": ("dgp", "model"),
                              "router": ("gaussian", "mixture")}.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        check_numbers(self, positive=("steps", "batch_size", "traces_per_input", "dz", "samples", "eval_interval",
                                      "eval_inputs", "final_inputs", "log_interval", "lr", "grad_clip", "starts",
                                      "start_steps"),
                      at_most={"batch_size": 4096, "samples": 256, "dz": 1024, "eval_inputs": 100_000,
                               "final_inputs": 100_000, "cluster_init": 4096, "components": 64, "starts": 64})
        if self.latent == "discrete" and not 2 <= (self.k or n_strategies) <= MAX_LATENTS:
            raise ValueError(f"--k must be between 2 and {MAX_LATENTS}, got {self.k}")
        for name, reason in self.ignored().items():
            if name in given and getattr(self, name):  # an ignored setting switched off is consistent
                raise ValueError(f"--{name.replace('_', '-')} has no effect with {reason}")
        if self.hard_em and self.batch_size % self.traces_per_input:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --traces-per-input "
                             f"{self.traces_per_input}")
        if self.starts > 1 and self.start_steps >= self.steps:
            recipe = "" if "starts" in given else f" (--starts {self.starts} is the recipe's; add --starts 1)"
            raise ValueError(f"--start-steps must be below --steps {self.steps}, got {self.start_steps}{recipe}")
        needs_clusters = [f"--{name.replace('_', '-')}" for name in ("reassign", "posterior_vote")
                          if getattr(self, name) and not self.cluster_init]
        if needs_clusters:
            raise ValueError(f"{' and '.join(needs_clusters)} (from the recipe) need --cluster-init; add "
                             + " ".join(f"{flag} 0" for flag in needs_clusters))
        if self.latent == "discrete" and self.hard_em and self.jsd:
            raise ValueError("--jsd trains every latent's generator, hard EM only each pair's assigned one: "
                             "add --no-hard-em")
        if self.latent == "continuous" and self.starts > 1 and not self.cluster_init:
            raise ValueError("--starts scores the posterior's clusters around the codes: it needs --cluster-init")
        if self.cluster_init and self.latent == "continuous" and n_strategies - 1 > self.dz:
            raise ValueError(f"--cluster-init puts {n_strategies} strategies on a simplex: --dz must be at least "
                             f"{n_strategies - 1}, got {self.dz}")


def latent_recipe(latent, n_strategies):
    """What a latent type adds to the Config defaults on every task (docs/experiments.md). Discrete:
    classification EM without the JSD, the posterior started by k-means on 4 (S + 1) components and
    refitted every 300 steps, six starts chosen at step 600, two distinct traces of each input per batch."""
    if latent == "discrete":
        return {"hard_em": True, "router_marginal_kl": 10.0, "router_support": 0.1,
                "cluster_init": 4 * (n_strategies + 1), "reassign": 300, "starts": 6, "traces_per_input": 2,
                "posterior_vote": 300}
    return {"router_marginal_kl": 1.0}


# What a (task, latent) pair adds: steps that follow from the trace length; continuous, per task.
# CLUSTERED_MIXTURE: the k-means start with reassignment, the mixture router and four starts
CLUSTERED_MIXTURE = {"cluster_init": 16, "reassign": 300, "router": "mixture", "starts": 4}
TASK_RECIPES = {
    ("grid_pathfinding", "continuous"): CLUSTERED_MIXTURE,
    ("linear_equation_solving", "continuous"): {"cluster_init": 16, "router": "mixture"},
    ("list_summation", "continuous"): {**CLUSTERED_MIXTURE, "posterior_thaw": True, "steps": 2400},
    ("base_conversion", "discrete"): {"steps": 3000},
    ("base_conversion", "continuous"): {**CLUSTERED_MIXTURE, "steps": 3000},
    ("multidigit_addition", "discrete"): {"steps": 1800},
    ("multidigit_addition", "continuous"): {"cluster_init": 16, "posterior_variance": 2.0, "router": "mixture",
                                           "starts": 4},
    ("sorting_algorithms", "discrete"): {"steps": 2400},
    ("sorting_algorithms", "continuous"): {"cluster_init": 24, "reassign": 300, "steps": 2400, "router": "mixture"},
}
RECIPES = {(task, latent): {**latent_recipe(latent, len(cls.strategies)), **TASK_RECIPES.get((task, latent), {})}
           for task, cls in TASKS.items() for latent in ("discrete", "continuous")}
RECIPES_HELP = "defaults: the values shown, then RECIPES for the task and latent:\n" + "\n".join(
    f"  {task}, {latent}: {extra}" for (task, latent), extra in RECIPES.items())


# Raised when a change alters what the same command computes, numerics included (not its speed
# alone); config.json records it, and the benchmark shows the runs of an earlier revision apart.
# discrete 2: hard EM trains each pair's assigned latent in a forward of its own (discrete_pass)
# discrete 3, continuous 2: the k-means start clusters along the trace_contrast directions
# discrete 4, continuous 3: the run goes on with the start whose partition most starts reach (choose_start)
REVISIONS = {"discrete": 4, "continuous": 3}


def apply_recipe(cfg, given):
    """Set every recipe field that the command line did not give."""
    for name, value in RECIPES.get((get_task(cfg.task).name, cfg.latent), {}).items():
        if name not in given:
            setattr(cfg, name, value)


# ----------------------------------------------------------------------------------------------
# Batches: streams of training pairs, their tensors, the base model's token statistics


def latent_ids(K):
    return [STOI[t] for t in LATENT_TOKENS[:K]]


def training_pairs(task, base, cfg, step, device, stream="train", n=0, per_input=0):
    """n (default batch_size) pairs, x from the training split, y ~ p*(y|x) (or y ~ p_base), per_input
    distinct traces of each input. Each stream ("train", "init", "clusters", "split", "reassign")
    draws from (seed, stream, step) alone. per_input 0: under --hard-em the "train" stream holds
    traces_per_input traces of each of its inputs, the others one."""
    rng, n = random.Random(f"{stream}/{cfg.seed}/{step}"), n or cfg.batch_size
    per_input = per_input or (cfg.traces_per_input if stream == "train" and cfg.hard_em else 1)
    if cfg.data == "dgp":
        inputs = (sample_split_input(task, rng, "train") for _ in range(n // per_input))
        return [(x, y) for x in inputs for y in distinct_traces(task, x, rng, per_input)]
    xs = [x for x in (task.sample(rng, "train")[0] for _ in range(n // per_input)) for _ in range(per_input)]
    ys = generate_ys(base, task, xs, temperature=1.0, seed=rng.getrandbits(62))
    if all(y is None for y in ys):
        raise ValueError(f"the base model closed none of {n} samples with </y> <eos>: train it longer, "
                         f"or take y from the true mixture (--data dgp)")
    return [(x, y) for x, y in zip(xs, ys) if y is not None]


DISTINCT_DRAWS = 8  # draws per wanted trace before an input with fewer distinct traces makes do


def distinct_traces(task, x, rng, n):
    """n draws y ~ p*(y|x), distinct ones while the input has them (no strategy labels read)."""
    ys = []
    for _ in range(DISTINCT_DRAWS * n):
        y = task.trace(x, task.sample_strategy(x, rng))
        if y not in ys:
            ys.append(y)
        if len(ys) == n:
            return ys
    return ys + [ys[-1]] * (n - len(ys))


def make_batch(task, pairs, K, device):
    """pairs: list of (x, y tokens). Returns a dict of tensors: base_idx (B, T) and base_mask
    (B, T-1) (the record with <z_empty>; y targets), y_state_mask (B, T) (the states the posterior
    pools), route_pos and slot_pos (B,); input_id and trace_id, lists of B ints for
    per_input_assignment; discrete: gen_idx (B*K, T) and gen_mask (B*K, T-1), row b*K+k with <zk>
    in the slot."""
    x_tokens = [task.input_tokens(x) for x, _ in pairs]
    records = [encode(record_tokens(xt, y)) for xt, (_, y) in zip(x_tokens, pairs)]
    base_idx, base_mask = pad_batch(records, PAD, [len(xt) + 7 for xt in x_tokens], device)  # from the first y
    batch = {"base_idx": base_idx, "base_mask": base_mask, "y_state_mask": F.pad(base_mask, (1, 0)),
             "route_pos": torch.tensor([len(xt) + 3 for xt in x_tokens], device=device),  # <z>
             "slot_pos": torch.tensor([len(xt) + 4 for xt in x_tokens], device=device),  # <z_empty> or <zk>
             "input_id": first_index([tuple(xt) for xt in x_tokens]),  # (B,) the first pair with this x
             "trace_id": first_index(records)}  # (B,) the first pair with this (x, y)
    if K:
        gen_idx = base_idx.repeat_interleave(K, dim=0)  # (B*K, T)
        ids = torch.tensor(latent_ids(K), device=device).repeat(len(pairs))
        gen_idx[torch.arange(len(gen_idx), device=device), batch["slot_pos"].repeat_interleave(K)] = ids
        batch["gen_idx"], batch["gen_mask"] = gen_idx, base_mask.repeat_interleave(K, dim=0)
    return batch


def first_index(items):
    """For each item, the index of its first occurrence: a list of ints."""
    first = {}
    return [first.setdefault(tuple(item), i) for i, item in enumerate(items)]


SUPPORT_THRESHOLD = 0.01  # JSD compares latents on the tokens the base model gives >= 1%


@dataclass
class BaseTokenStats:
    token_logp: torch.Tensor  # (B, T-1) log p_base(y_t | x, y_<t)
    support: torch.Tensor  # (B, T-1, V) the tokens the base model gives at least SUPPORT_THRESHOLD
    entropy_share: torch.Tensor  # (B, T-1) H_t / mean_t H: high where the strategy is decided
    states: torch.Tensor  # (B, T, d) its final states, which a frozen posterior backbone would recompute


@torch.no_grad()
def base_token_stats(base, batch):
    logits, last = base(batch["base_idx"], last_hidden=True)
    mask = batch["base_mask"].float()
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    entropy = -(logp.exp() * logp).sum(-1) * mask  # (B, T-1)
    share = entropy / (entropy.sum(1, keepdim=True) / mask.sum(1, keepdim=True)).clamp(min=1e-8)
    return BaseTokenStats(token_log_probs(logits, batch["base_idx"]), logp > math.log(SUPPORT_THRESHOLD), share,
                          base.ln_f(last))


# ----------------------------------------------------------------------------------------------
# The objective: one function per term, each per pair (B,) unless it is a batch-level term


def token_weights(mask, entropy_share, token_weighted):
    """Weights of the y targets (B, T-1) for recon (1, or w_t = (1 + H_t / mean H) / 2, mean 1 on y)
    and for the JSD (1, or H_t / mean H: latents should differ at decisions, not write garbage)."""
    mask = mask.float()
    return (0.5 * (mask + entropy_share), entropy_share) if token_weighted else (mask, mask)


def discrete_recon_loss(q, token_logp, weights):
    """R = -sum_k q_k sum_t w_t log p_psi(y_t|x,y_<t,k): q (B, K), token_logp (B, K, T-1), weights (B, T-1)."""
    return -(q * (token_logp * weights[:, None]).sum(-1)).sum(-1)


def assignment_scores(token_logp, posterior_logq=None):
    """What the classification E-step maximises, (B, K), no gradient: log p_psi(y|x,k), summed over
    y from token_logp (B, K, T-1); with posterior_logq (B, K) (--posterior-vote), the hard-EM
    objective under the posterior, log p_psi(y|x,k) + log q(k|x,y). Early on the generators are
    still the base model and rate every latent almost alike, so their argmax scatters the k-means
    start; the vote keeps a pair on its cluster until a generator rates it clearly elsewhere."""
    scores = token_logp.detach().sum(-1)
    return scores if posterior_logq is None else scores + posterior_logq.detach()


def hard_assignment(scores):
    """The classification E-step: one_hot(argmax_k scores) (B, K) from assignment_scores (B, K).
    The prior is uniform (the router is left out), so no latent wins pairs by its prior alone. A
    latent that writes a strategy slightly more often gets more of its traces and writes it more
    often still."""
    return F.one_hot(scores.argmax(-1), scores.shape[1]).float()


def per_input_assignment(scores, input_id, trace_id):
    """hard_assignment, but the distinct traces of one input go to distinct latents: the injective
    map from an input's (first K) distinct traces to the K latents with the highest summed scores
    (B, K). input_id, trace_id (B ints): the first pair with the same x, the same (x, y); a repeated
    trace follows its first copy. Two latents that write one strategy of x cannot both keep its
    trace, so an input's distinct traces teach different generators."""
    K, assign = scores.shape[1], scores.argmax(-1)  # (B,)
    traces_of = {}
    for pair, (first_of_input, first_of_trace) in enumerate(zip(input_id, trace_id)):
        if first_of_trace == pair:  # one pair per distinct trace
            traces_of.setdefault(first_of_input, []).append(pair)
    trace_id = torch.tensor(trace_id, device=scores.device)  # (B,)
    for traces in traces_of.values():
        traces = traces[:K]
        maps = torch.tensor(list(itertools.permutations(range(K), len(traces))), device=scores.device)  # (P, n)
        map_scores = scores[traces][torch.arange(len(traces)), maps].sum(1)  # (P,)
        best = maps[map_scores.argmax()]  # (n,) the latent of each trace
        for trace, latent in zip(traces, best):
            assign[trace_id == trace] = latent
    return F.one_hot(assign, K).float()


def continuous_recon_loss(token_logp, weights):
    """R ~ -(1/S) sum_s sum_t w_t log p_psi(y_t|x,y_<t,z_s): token_logp (B, S, T-1), weights (B, T-1)."""
    return -(token_logp * weights[:, None]).sum(-1).mean(1)


def normalized_recon(recon, base_recon):
    """R / R_base, R_base the base model's (weighted) y-loss: it already reconstructs well."""
    return recon / base_recon.clamp(min=1e-3)


def categorical_kl(log_q, log_p):
    """K = KL(q || p) = sum_k q_k (log q_k - log p_k): (B, K) -> (B,)."""
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)) of diagonal Gaussians per dimension, in closed form:
    (B, dz) -> (B, dz); K is its sum over dimensions."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1)


def free_bits_kl(kl, free_bits):
    """The batch KL term max(mean K, free_bits): below free_bits nats the KL exerts no pull."""
    return kl.mean().clamp(min=free_bits) if free_bits > 0 else kl.mean()


def posterior_entropy_loss(log_q):
    """H(q(z|x,y)) = -sum_k q_k log q_k: (B, K) -> (B,)."""
    return -(log_q.exp() * log_q).sum(-1)


def router_support_loss(outside_mass):
    """-log of the router's probability mass on the K latent tokens: (B,) -> (B,)."""
    return -torch.log1p(-outside_mass.clamp(max=1 - 1e-6))


def router_marginal_kl_loss(router_log_p):
    """KL(mean_x p_phi(z|x) || Unif(K)) = sum_k pbar_k log(K pbar_k): a batch-level scalar."""
    p_bar = router_log_p.exp().mean(0)
    return (p_bar * torch.log(p_bar.clamp(min=1e-12) * p_bar.numel())).sum()


def gaussian_marginal_kl_loss(mu, logvar):
    """KL(N(m, v) || N(0, I)), m = mean mu, v = mean sigma^2 + var mu: the moments of the batch's router mixture."""
    m, v = mu.mean(0), logvar.exp().mean(0) + mu.var(0, unbiased=False)
    return 0.5 * (v + m ** 2 - 1 - v.log()).sum()


def gaussian_log_density(z, mu, logvar):
    """log N(z; mu, diag exp(logvar)), summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


def mixture_kl(z, mu_q, logvar_q, log_pi, mu_p, logvar_p):
    """KL(q || p_phi) for the mixture router, which has no closed form, estimated with the posterior's
    reparameterised samples z (B, S, dz) (as VampPrior does for its mixture prior):
    (1/S) sum_s [log q(z_s|x,y) - log sum_m pi_m N(z_s; mu_m, sigma_m^2)]; q (B, dz), p_phi (B, M[, dz]) -> (B,)."""
    log_q = gaussian_log_density(z, mu_q[:, None], logvar_q[:, None])  # (B, S)
    log_p = torch.logsumexp(log_pi[:, None] + gaussian_log_density(z[:, :, None], mu_p[:, None], logvar_p[:, None]),
                            dim=-1)  # (B, S)
    return (log_q - log_p).mean(1)


def posterior_variance_loss(logvar):
    """mean_d sigma_xi,d^2: (B, dz) -> (B,)."""
    return logvar.exp().mean(-1)


def jsd_loss(gen_logits, weights, K, support=None, log_pi=None):
    """Inter-latent token-level Jensen-Shannon divergence per pair, summed over y with weights (B, T-1):

        JSD_t = H(sum_k pi_k p_k) - sum_k pi_k H(p_k),   p_k = p_psi(. | x, y_<t, z=k)

    on the scale of the reconstruction, which it must outweigh to pull latents apart (the exact
    ELBO is indifferent between entangled and disentangled solutions). pi_k is uniform, or log_pi
    (B, K, T-1). With support (B, T-1, V) each p_k is renormalised on the base model's plausible
    tokens, so a latent cannot raise the JSD by writing tokens no strategy writes."""
    logits = gen_logits[:, :-1].float()
    logits = logits.view(logits.shape[0] // K, K, *logits.shape[1:])  # (B, K, T-1, V)
    if support is not None:
        logits = logits.masked_fill(~support[:, None], -1e9)
    logp = F.log_softmax(logits, dim=-1)
    if log_pi is None:
        log_pi = torch.full(logp.shape[:3], -math.log(K), device=logp.device)
    log_mix = torch.logsumexp(log_pi[..., None] + logp, dim=1)  # (B, T-1, V)
    h_mix = -(log_mix.exp() * log_mix).sum(-1)
    h_each = (log_pi.exp() * -(logp.exp() * logp).sum(-1)).sum(1)
    return ((h_mix - h_each) * weights).sum(-1)


@torch.no_grad()
def prefix_posterior(router_logp, token_logp, mask):
    """log pi_{k,t} = log p(z=k | x, y_<t) from the router (B, K) and token log-probs (B, K, T-1):
    latents are compared on prefixes each could have written (not itself optimised)."""
    written = (token_logp * mask[:, None]).cumsum(-1) - token_logp * mask[:, None]  # y_<t only
    return F.log_softmax(router_logp[..., None] + written, dim=1)


@dataclass
class DiscretePass:
    gen_logits: torch.Tensor  # (B*K, T, V) the generator under each latent (None under hard EM)
    token_logp: torch.Tensor  # (B, K, T-1) log p_psi(y_t | x, y_<t, k), 0 off the y targets
    router_logp: torch.Tensor  # (B, K) log p_phi(k|x)
    router_outside: torch.Tensor  # (B,) router mass on tokens that are not latents
    posterior_logq: torch.Tensor  # (B, K) log q(k|x,y)
    recon_q: torch.Tensor  # (B, K) the weights R trains with: q, or under hard EM the E-step's one-hot
    recon_token_logp: torch.Tensor  # (B, K, T-1) what R reads: token_logp, or under hard EM the assigned latent's


def discrete_pass(fact, batch, posterior_states=None, e_step=None):
    """All K latents in one batched forward over B*K rows (row b*K + k holds <zk>); the router is
    read off the same forward. With e_step (hard EM: (token_logp, posterior_logq) -> a one-hot
    assignment (B, K)) that forward is the E-step's evidence and carries no gradient; a second
    forward over each pair's assigned row alone carries it, so the backward runs through B rows,
    not B*K (the same loss, in about half the time of a step; benchmark/stage2_profile.py)."""
    B, K = batch["base_idx"].shape[0], fact.K
    log_q = F.log_softmax(fact.posterior_params(batch["base_idx"], batch["y_state_mask"], posterior_states).float(), -1)
    with torch.set_grad_enabled(e_step is None and torch.is_grad_enabled()):
        gen_logits = fact.lm(batch["gen_idx"])  # (B*K, T, V)
        token_logp = (token_log_probs(gen_logits, batch["gen_idx"]) * batch["gen_mask"]).view(B, K, -1)
    if e_step is None:
        recon_q, recon_token_logp = log_q.exp(), token_logp
        # the router position precedes the latent token, so any of the K copies gives p_phi(z|x)
        route_logits = gen_logits.view(B, K, *gen_logits.shape[1:])[:, 0]  # (B, T, V)
    else:
        recon_q = e_step(token_logp, log_q)  # (B, K)
        assigned_idx = batch["gen_idx"].view(B, K, -1)[recon_q.bool()]  # (B, T) each pair under its latent
        route_logits, gen_logits = fact.lm(assigned_idx), None  # (B, T, V)
        assigned_logp = token_log_probs(route_logits, assigned_idx) * batch["base_mask"]  # (B, T-1)
        recon_token_logp = recon_q[..., None] * assigned_logp[:, None]  # (B, K, T-1), 0 off the assigned latent
    router_logp, outside = router_log_probs(route_logits[torch.arange(B), batch["route_pos"]], latent_ids(K))
    return DiscretePass(gen_logits, token_logp, router_logp, outside, log_q, recon_q, recon_token_logp)


@dataclass
class ContinuousPass:
    token_logp: torch.Tensor  # (B, S, T-1) log p_psi(y_t | x, y_<t, z_s), 0 off the y targets
    posterior_mu: torch.Tensor  # (B, dz)
    posterior_logvar: torch.Tensor  # (B, dz)
    z: torch.Tensor  # (B, S, dz) the posterior samples
    router_log_pi: torch.Tensor  # (B, M) log pi_m(x), 0 for the Gaussian router (M = 1)
    router_mu: torch.Tensor  # (B, M, dz)
    router_logvar: torch.Tensor  # (B, M, dz)


def continuous_pass(fact, batch, S, posterior_states=None):
    """S reparameterised samples z_s = mu_xi + sigma_xi eps_s per pair, in one batched forward."""
    B = batch["base_idx"].shape[0]
    posterior_params = fact.posterior_params(batch["base_idx"], batch["y_state_mask"], posterior_states)
    mu_q, logvar_q = posterior_params.float().chunk(2, dim=-1)  # (B, dz) each
    eps = torch.randn(B, S, mu_q.shape[-1], device=mu_q.device)  # (B, S, dz)
    z = (mu_q[:, None] + (0.5 * logvar_q[:, None]).exp() * eps).reshape(B * S, -1)  # (B*S, dz)
    gen_idx = batch["base_idx"].repeat_interleave(S, dim=0)  # (B*S, T)
    logits, last = fact.lm(gen_idx, latent=z, latent_pos=batch["slot_pos"].repeat_interleave(S), last_hidden=True)
    token_logp = token_log_probs(logits, gen_idx).view(B, S, -1) * batch["base_mask"][:, None]
    # the router reads the state at <z>, before the slot, so it never sees z
    route_state = fact.lm.ln_f(last[::S][torch.arange(B), batch["route_pos"]])  # (B, d)
    return ContinuousPass(token_logp, mu_q, logvar_q, z.view(B, S, -1), *fact.router_params(route_state))


@dataclass
class Objective:
    loss: torch.Tensor  # J = R + beta K + aux, the scalar to minimise
    terms: dict  # the weighted terms of J, detached: loss/recon, loss/kl, aux/<name>
    diagnostics: dict  # detached tensors for the log, turned into floats only when logged


def objective(fact, base, batch, cfg, posterior_votes=False):
    """The loss J = R + beta K + aux on one batch; discrete latents enumerated, continuous sampled.
    posterior_votes: the hard-EM E-step adds log q(k|x,y) (--posterior-vote)."""
    stats, mask = base_token_stats(base, batch), batch["base_mask"].float()
    weights, jsd_weights = token_weights(mask, stats.entropy_share, cfg.token_weighted)
    posterior_states = stats.states if posterior_frozen(fact) else None  # a frozen posterior backbone is the base
    aux = {}
    if cfg.latent == "discrete":
        def e_step(token_logp, posterior_logq):  # classification EM: (B, K) one-hot
            scores = assignment_scores(token_logp, posterior_logq if posterior_votes else None)
            return per_input_assignment(scores, batch["input_id"], batch["trace_id"]) \
                if cfg.traces_per_input > 1 else hard_assignment(scores)

        p = discrete_pass(fact, batch, posterior_states, e_step if cfg.hard_em else None)
        q = p.posterior_logq.exp()
        recon = discrete_recon_loss(p.recon_q, p.recon_token_logp, weights)
        raw_recon = discrete_recon_loss(q, p.token_logp, mask)  # the ELBO's, for the log
        kl = categorical_kl(p.posterior_logq, p.router_logp)
        if cfg.posterior_entropy:
            aux["aux/posterior_entropy"] = cfg.posterior_entropy * posterior_entropy_loss(p.posterior_logq).mean()
        if cfg.router_support:
            aux["aux/router_support"] = cfg.router_support * router_support_loss(p.router_outside).mean()
        if cfg.router_marginal_kl:
            aux["aux/router_marginal_kl"] = cfg.router_marginal_kl * router_marginal_kl_loss(p.router_logp)
        if cfg.jsd:
            log_pi = prefix_posterior(p.router_logp, p.token_logp, mask) if cfg.jsd_prefix else None
            aux["aux/jsd"] = -cfg.jsd * jsd_loss(p.gen_logits, jsd_weights, fact.K, stats.support, log_pi).mean()
        log_marginal = torch.logsumexp(p.router_logp + p.token_logp.sum(-1), dim=-1)  # exact log p(y|x)
        diagnostics = {"diag/log_marginal": log_marginal.mean(),
                       "diag/elbo_gap": (log_marginal + raw_recon + kl).mean(),
                       "diag/router_outside_mass": p.router_outside.mean(),
                       "usage/router": p.router_logp.exp().mean(0), "usage/posterior": q.mean(0)}
    else:
        p = continuous_pass(fact, batch, cfg.samples, posterior_states)
        recon, raw_recon = continuous_recon_loss(p.token_logp, weights), continuous_recon_loss(p.token_logp, mask)
        if fact.router == "gaussian":
            kl_dims = gaussian_kl(p.posterior_mu, p.posterior_logvar, p.router_mu[:, 0], p.router_logvar[:, 0])
            kl, diagnostics = kl_dims.sum(-1), {"diag/kl_per_dim": kl_dims.mean(0)}  # kl_dims (B, dz)
        else:
            kl = mixture_kl(p.z, p.posterior_mu, p.posterior_logvar, p.router_log_pi, p.router_mu, p.router_logvar)
            diagnostics = {"usage/router_components": p.router_log_pi.exp().mean(0)}
        if cfg.posterior_variance:
            variance = posterior_variance_loss(p.posterior_logvar).mean()
            aux["aux/posterior_variance"] = cfg.posterior_variance * variance
        if cfg.router_marginal_kl:
            # the batch's router moments against N(0, I); a mixture's aggregate is uniform over its components
            marginal = gaussian_marginal_kl_loss(p.router_mu[:, 0], p.router_logvar[:, 0]) \
                if fact.router == "gaussian" else router_marginal_kl_loss(p.router_log_pi)
            aux["aux/router_marginal_kl"] = cfg.router_marginal_kl * marginal
        diagnostics.update({"diag/posterior_var": p.posterior_logvar.exp().mean(),
                            "diag/router_var": p.router_logvar.exp().mean(), "diag/elbo": -(raw_recon + kl).mean()})
    if cfg.normalized_recon:
        recon = normalized_recon(recon, -(stats.token_logp * weights).sum(-1))
    recon_term, kl_term = recon.mean(), cfg.beta * free_bits_kl(kl, cfg.free_bits)
    loss = recon_term + kl_term + sum(aux.values())  # J = R + beta K + aux
    diagnostics.update({"loss/recon_raw": raw_recon.mean(), "loss/kl_raw": kl.mean(),
                        "loss/recon_base": -(stats.token_logp * mask).sum(-1).mean()})
    terms = {"loss/recon": recon_term, "loss/kl": kl_term, **aux}
    return Objective(loss, {k: v.detach() for k, v in terms.items()}, {k: v.detach() for k, v in diagnostics.items()})


def log_record(obj):
    """The floats of one log line: loss/total, each term and its share of sum |term|, the diagnostics."""
    terms = {k: v.item() for k, v in obj.terms.items()}
    magnitude = max(sum(abs(v) for v in terms.values()), 1e-12)
    record = {"loss/total": obj.loss.item(), **terms,
              **{"share/" + k.split("/")[1]: abs(v) / magnitude for k, v in terms.items()}}
    return {**record, **{k: v.item() if v.numel() == 1 else v.tolist() for k, v in obj.diagnostics.items()}}


# ----------------------------------------------------------------------------------------------
# Starting from clusters (--cluster-init) and hard-EM moves (--reassign), between gradient steps


CLUSTER_PAIRS = 512  # training pairs each reassignment, the split check and the start score see
CONTRAST_PAIRS = 2048  # the k-means start's: with fewer, the trace_contrast directions fit their sample
CLUSTER_CONFIDENCE = 0.9  # mean max q(z|x,y) of the clustered posterior: sure, yet not saturated
CLUSTER_SPACING, CLUSTER_STD = 3.0, 0.5  # continuous: codes 3 prior sds apart, each 0.5 wide
KMEANS_RESTARTS, KMEANS_ITERS = 10, 100


def kmeans(points, K, generator):
    """Lloyd's algorithm on points (N, m) from KMEANS_RESTARTS random starts: the centroids (K, m)
    of the run with the least within-cluster sum of squares."""
    best, best_inertia = None, float("inf")
    for _ in range(KMEANS_RESTARTS):
        centroids, assign = points[torch.randperm(len(points), generator=generator)[:K]], None  # (K, m)
        for _ in range(KMEANS_ITERS):
            moved = torch.cdist(points, centroids).argmin(1)  # (N,)
            if assign is not None and torch.equal(moved, assign):
                break  # a fixed point: no later iteration moves a centroid
            centroids, assign = cluster_means(points, moved, centroids), moved
        inertia = torch.cdist(points, centroids).min(1).values.pow(2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


def cluster_means(points, assign, empty):
    """The mean of points (N, m) in each cluster of assign (N,); a cluster with none keeps its row of empty (C, m)."""
    return torch.stack([points[assign == c].mean(0) if (assign == c).any() else empty[c] for c in range(len(empty))])


def simplex_vertices(n):
    """n points (n, n - 1) at distance 1 from each other, centred on the origin."""
    u, s, _ = torch.linalg.svd(torch.eye(n) - 1 / n)  # the simplex's corners in R^n, less their mean
    return u[:, :n - 1] * s[:n - 1] / math.sqrt(2)  # the same points in the n-1 dimensions they span


def cluster_codes(n, dz):
    """The codes of n clusters (n, dz): a simplex of edge CLUSTER_SPACING in the first n - 1
    dimensions of z, 0 in the rest (none, (0, dz), for n < 2 or dz < n - 1)."""
    if n < 2 or dz < n - 1:
        return torch.zeros(0, dz)
    return F.pad(CLUSTER_SPACING * simplex_vertices(n), (0, dz - (n - 1)))


def trace_contrast(features, contrasts, m):
    """The m directions along which two distinct traces of one input differ most, relative to how
    the features vary overall: the top solutions w of S_contrast w = lambda S_total w, where
    S_contrast is the second moment of the differences f(x, y) - f(x, y') over the index pairs
    contrasts (P, 2) and S_total the covariance of all features (N, d). Two distinct traces of
    one input share its numbers and differ in strategy, so these directions follow the strategies
    where the largest directions of the features follow the input. Returns the mean (d,), the map
    whiten (d, m), scaled so the points have unit variance along each, and the points (N, m) =
    (features - mean) @ whiten."""
    features, contrasts = features.double(), contrasts.to(features.device)
    mean = features.mean(0)  # (d,)
    total = torch.cov(features.T)  # (d, d)
    ridge = 1e-4 * total.diagonal().mean()  # a flat direction of the features stays invertible
    total += ridge * torch.eye(len(total), dtype=total.dtype, device=total.device)
    differences = features[contrasts[:, 0]] - features[contrasts[:, 1]]  # (P, d)
    scale, basis = torch.linalg.eigh(total)
    unit = basis / scale.sqrt()  # (d, d): S_total becomes the identity
    _, contrast_basis = torch.linalg.eigh(unit.T @ (differences.T @ differences / len(differences)) @ unit)
    whiten = (unit @ contrast_basis[:, -m:].flip(1)).float()  # (d, m), the largest lambda first
    return mean.float(), whiten, (features.float() - mean.float()) @ whiten


def traces_by_input(task, pairs):
    """{input tokens: {trace: the index of its first pair}} of pairs (x, y)."""
    traces = {}
    for i, (x, y) in enumerate(pairs):
        traces.setdefault(tuple(task.input_tokens(x)), {}).setdefault(tuple(y), i)
    return traces


def confident_scale(logits):
    """The factor s at which softmax(s * logits) (N, K) has mean largest probability CLUSTER_CONFIDENCE:
    sure, yet not saturated, since a saturated softmax passes almost no gradient to the pairs put wrong."""
    lo, hi = -8.0, 8.0  # bisect log s: the confidence rises with s
    for _ in range(40):
        log_s = (lo + hi) / 2
        confident = F.softmax(logits * math.exp(log_s), -1).max(1).values.mean() > CLUSTER_CONFIDENCE
        lo, hi = (lo, log_s) if confident else (log_s, hi)
    return math.exp(hi)


@torch.no_grad()
def set_posterior_head(fact, weight, bias, logits):
    """Discrete: post_head becomes (weight (K, d), bias (K,)) times the confident_scale of the logits (N, K)."""
    scale = confident_scale(logits)
    fact.post_head.weight.copy_(weight * scale)
    fact.post_head.bias.copy_(bias * scale)


def posterior_to_centroids(fact, points, centroids, whiten, mean):
    """Discrete: the head becomes the Gaussian mixture of centroids (K, m) in the whitened space,
    logit_k = -|z - c_k|^2 / 2t + const = (z . c_k - |c_k|^2 / 2) / t, linear in the features f
    (z = (f - mean) @ whiten), at the confident_scale 1 / t of the points (N, m)."""
    weight = centroids @ whiten.T  # (K, d)
    set_posterior_head(fact, weight, -0.5 * (centroids ** 2).sum(1) - weight @ mean,
                       -torch.cdist(points, centroids) ** 2 / 2)


def posterior_to_labels(fact, features, assign):
    """Discrete: the head becomes a logistic regression from the pooled features (N, d), every direction
    of them, to each pair's latent (assign (N,)): the M-step of hard EM for a discriminative posterior."""
    probe = fit_probes(features[None].float().cpu(), assign, torch.ones(1, len(assign)), fact.K)
    weight = probe.weight[0] / probe.std[0]  # (K, d): the standardisation folded into the head
    set_posterior_head(fact, weight, probe.bias[0, :, 0] - weight @ probe.mean[0, 0],
                       probe.logits(features[None].float().cpu())[0].T)


@torch.no_grad()
def posterior_to_codes(fact, features, assign):
    """Continuous: mu_xi becomes the least-squares linear map from the features (N, d) to each pair's
    cluster code (assign (N,)), sigma_xi = CLUSTER_STD on the codes' C-1 dimensions, 1 elsewhere."""
    C = fact.codes.shape[0]
    corners = fact.codes[:, :C - 1].to(features)  # (C, C-1)
    targets = corners[assign] - corners[assign].mean(0)  # (N, C-1), centred like the features
    mean = features.mean(0)  # (d,)
    # gelsd (SVD, minimum norm) on the CPU: the default driver's answer on rank-deficient features
    # varies from call to call, and CUDA has no SVD-based driver
    fit = torch.linalg.lstsq((features - mean).cpu(), targets.cpu(), driver="gelsd").solution.to(features)  # (d, C-1)
    weight, bias = fact.post_head.weight, fact.post_head.bias
    weight.zero_()
    bias.zero_()
    weight[:C - 1], bias[:C - 1] = fit.T, -mean @ fit
    bias[fact.dz:fact.dz + C - 1] = 2 * math.log(CLUSTER_STD)


@torch.no_grad()
def cluster_posterior(fact, base, task, cfg):
    """k-means on the features of CONTRAST_PAIRS pairs, two distinct traces of each input, along
    their top cfg.cluster_init trace_contrast directions: the pooled posterior features vary most
    with the input (its numbers, its length), an input's two traces differ by their strategies.
    Discrete: K clusters, the head their Gaussian mixture. Continuous: one cluster per strategy,
    each sent to a corner of a simplex. Returns the share of pairs in each cluster."""
    device = fact.lm.tok_emb.weight.device
    pairs = training_pairs(task, base, cfg, 0, device, "clusters", CONTRAST_PAIRS, per_input=2)
    n_clusters = fact.K or len(task.strategies)
    if len(pairs) < 2 * max(cfg.cluster_init, n_clusters):
        raise ValueError(f"the base model closed only {len(pairs)} of {CONTRAST_PAIRS} samples, too few to "
                         f"cluster: train it longer, or take y from the true mixture (--data dgp)")
    contrasts = torch.tensor([list(traces.values())[:2] for traces in traces_by_input(task, pairs).values()
                              if len(traces) > 1])  # (P, 2)
    if len(contrasts) < 2:
        raise ValueError("fewer than two inputs have two distinct traces among the clustered pairs: "
                         "there is nothing to tell the strategies apart by")
    features = posterior_distribution(fact, task, pairs, features=True)[1].float()  # (N, d)
    mean, whiten, points = trace_contrast(features, contrasts, cfg.cluster_init)
    centroids = kmeans(points, n_clusters, torch.Generator().manual_seed(cfg.seed))  # (C, m)
    assign = torch.cdist(points, centroids).argmin(1)  # (N,)
    if fact.latent == "discrete":
        posterior_to_centroids(fact, points, centroids, whiten, mean)
    else:
        posterior_to_codes(fact, features, assign)
    return (torch.bincount(assign, minlength=n_clusters).float() / len(assign)).tolist()


VOTE_SPLIT = 0.9  # the k-means start votes when it separates at least this share of inputs' two traces


@torch.no_grad()
def cluster_split_rate(fact, base, task, cfg):
    """The share of inputs whose two distinct traces the posterior puts in different clusters, on
    CLUSTER_PAIRS fresh pairs. Two distinct traces of one input are two strategies, so the share is
    1 when the clusters are the strategies, and about 1 - 1/K by chance, less when the clusters
    group inputs: a read of the k-means start without labels."""
    pairs = training_pairs(task, base, cfg, 0, fact.lm.tok_emb.weight.device, "split", CLUSTER_PAIRS, per_input=2)
    clusters = posterior_distribution(fact, task, pairs).argmax(1).tolist()  # (N,)
    split = [len({clusters[i] for i in traces.values()}) > 1 for traces in traces_by_input(task, pairs).values()
             if len(traces) > 1]
    return sum(split) / max(len(split), 1)


@dataclass
class PosteriorClusters:
    assign: torch.Tensor  # (N,) each pair's cluster: that of the code nearest its posterior mean
    centroids: torch.Tensor  # (C, dz) the mean of mu_xi over each cluster (its code where it has none)
    features: torch.Tensor  # (N, d) the pooled y-states the posterior head reads


@torch.no_grad()
def posterior_clusters(fact, task, pairs):
    """Continuous: the clusters the posterior puts pairs in, one per code (fact.codes)."""
    (mu, _), features = posterior_distribution(fact, task, pairs, features=True)
    codes = fact.codes.cpu()
    assign = torch.cdist(mu, codes).argmin(1)  # (N,)
    return PosteriorClusters(assign, cluster_means(mu, assign, codes), features)


@torch.no_grad()
def reassign_clusters(fact, base, task, cfg, step):
    """The classification step of hard EM, the generator as the judge: each of CLUSTER_PAIRS fresh
    pairs joins the latent under which the generator rates its y highest (continuous: the cluster
    at whose posterior centroid it does), and the head is set from that assignment again. A
    generator trained on a k-means group decodes the group's strategy, so a stray trace rates
    higher under its own strategy's latent. Returns the share of pairs that changed cluster."""
    pairs = training_pairs(task, base, cfg, step, fact.lm.tok_emb.weight.device, "reassign", CLUSTER_PAIRS)
    if fact.latent == "discrete":
        posterior, features = posterior_distribution(fact, task, pairs, features=True)
        current = posterior.argmax(1)  # (N,)
        assign = latent_log_likelihoods(fact, task, pairs).argmax(1)  # (N,)
        posterior_to_labels(fact, features, assign)
    else:
        clusters = posterior_clusters(fact, task, pairs)
        current = clusters.assign
        assign = latent_log_likelihoods(fact, task, pairs, clusters.centroids).argmax(1)  # (N,)
        posterior_to_codes(fact, clusters.features, assign.to(clusters.features.device))
    fact.train()  # the likelihoods were read in eval mode
    return (assign != current).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Training


INIT_TOLERANCE = 0.05  # at step 0 every latent's y-loss is within 5% of the base model's
INIT_PAIRS = 256  # pairs that check: on one batch the ratio's own noise can exceed the tolerance


@dataclass
class Initialisation:
    records: list  # the log records of step 0
    posterior_vote: int  # the steps the posterior votes in the E-step: --posterior-vote, or 0 (cluster_split_rate)


def start_at_base(fact, base, task, cfg, device):
    """Step 0: the y-loss under every latent within INIT_TOLERANCE of the base model's (latent
    noise that breaks it is halved until it holds), then the k-means start. With --posterior-vote
    the posterior votes only if its clusters separate at least VOTE_SPLIT of inputs' two traces:
    clusters that are not the strategies would teach the generators their own split."""
    pairs = training_pairs(task, base, cfg, 0, device, "init", INIT_PAIRS)
    ratio, noise_scale = latent_loss_ratios(fact, base, task, pairs), 1.0
    while fact.K and max(ratio) > 1 + INIT_TOLERANCE and noise_scale > 1 / 64:
        fact.shrink_latent_noise(0.5)
        ratio, noise_scale = latent_loss_ratios(fact, base, task, pairs), noise_scale / 2
    tqdm.write(f"step 0: y-loss per latent / base y-loss = {[round(r, 4) for r in ratio]}"
               + (f" (latent noise x{noise_scale:g})" if noise_scale < 1 else ""))
    records = [{"step": 0, "init/y_loss_ratio": ratio, "init/noise_scale": noise_scale}]
    if cfg.cluster_init:
        shares = cluster_posterior(fact, base, task, cfg)
        tqdm.write(f"step 0: posterior from k-means, cluster shares {[round(v, 2) for v in shares]}")
        records.append({"step": 0, "init/cluster_shares": shares})
    posterior_vote = cfg.posterior_vote if cfg.latent == "discrete" and cfg.hard_em else 0
    if posterior_vote:
        split = cluster_split_rate(fact, base, task, cfg)
        posterior_vote = posterior_vote if split >= VOTE_SPLIT else 0
        tqdm.write(f"step 0: the clusters separate the two traces of {split:.1%} of inputs; the posterior votes "
                   f"for {posterior_vote} steps")
        records.append({"step": 0, "init/cluster_split": split, "init/posterior_vote": posterior_vote})
    return Initialisation(records, posterior_vote)


def load_base(cfg, device):
    """The frozen base model, its task (with the options it was trained on), folder and checkpoint."""
    task_name = get_task(cfg.task).name
    base_dir = cfg.base or os.path.join("runs", task_name, "base")
    base_ckpt = load_checkpoint(os.path.join(base_dir, "ckpt.pt"), vocab=VOCAB, task=task_name)
    base = model_from_checkpoint(base_ckpt, os.path.join(base_dir, "ckpt.pt")).to(device).eval()
    base.requires_grad_(False)
    return base, get_task(task_name, **base_ckpt.get("task_options", {})), base_dir, base_ckpt


def build_factorization(cfg, task, base_dir, base_ckpt, device):
    """The factorization initialised from the base model (model.Factorization), on device."""
    K = (cfg.k or len(task.strategies)) if cfg.latent == "discrete" else 0
    fact = Factorization(base_ckpt, os.path.join(base_dir, "ckpt.pt"), cfg.latent, latent_ids(K), STOI["<z_empty>"],
                         cfg.dz, cluster_codes(len(task.strategies), cfg.dz), seed=cfg.seed, router=cfg.router,
                         components=cfg.components or len(task.strategies)).to(device)
    if cfg.cluster_init:  # the clusters live in the base model's features: keep them, train the head
        fact.posterior.requires_grad_(False)
    return fact


def posterior_frozen(fact):
    """Whether the posterior backbone is the base model's, untrained (--cluster-init, until --posterior-thaw)."""
    return not next(fact.posterior.parameters()).requires_grad


def refits_end(cfg):
    """The last step of a --reassign refit: half way, or under hard EM, whose generators learn their
    own assignment, which q's refits can follow, the end of the run."""
    return cfg.steps if cfg.hard_em else cfg.steps // 2


def build_optimizer(fact, cfg):
    """AdamW over what trains (model.configure_optimizer). A posterior backbone that --posterior-thaw
    trains later is in it from the start: AdamW passes over a weight without a gradient, and the
    optimizer's state keeps one layout, which a resumed run loads before or after the thaw."""
    frozen = posterior_frozen(fact)
    fact.posterior.requires_grad_(cfg.posterior_thaw or not frozen)
    optimizer = configure_optimizer(fact, cfg.lr, cfg.weight_decay)
    fact.posterior.requires_grad_(not frozen)
    return optimizer


def train_step(fact, base, task, optimizer, cfg, step, device, hold_posterior):
    """One gradient step on batch `step`; returns its Objective."""
    batch = make_batch(task, training_pairs(task, base, cfg, step, device), fact.K, device)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg.lr, cfg.warmup, cfg.steps, decay=cfg.lr_decay)
    with autocast(device, cfg.precision):
        obj = objective(fact, base, batch, cfg, posterior_votes=step < cfg.posterior_vote)
    optimizer.zero_grad(set_to_none=True)
    obj.loss.backward()
    if hold_posterior:  # the generators first learn the clusters the posterior starts from
        for p in fact.post_head.parameters():
            p.grad = None
    torch.nn.utils.clip_grad_norm_(fact.parameters(), cfg.grad_clip)
    optimizer.step()
    return obj


def train_steps(fact, base, task, optimizer, cfg, device, first, last, log, after_step=lambda done: None):
    """Gradient steps first .. last-1 and the reassignments among them; log(record) takes each log line."""
    for step in tqdm(range(first, last), initial=first, total=last, desc=f"{cfg.latent} {task.alias}", disable=None):
        if cfg.posterior_thaw and step >= refits_end(cfg) and posterior_frozen(fact):
            # the refits read the base model's features; the ELBO can now sharpen q's own
            fact.posterior.requires_grad_(True)
            tqdm.write(f"step {step}: the posterior backbone trains from here")
        obj = train_step(fact, base, task, optimizer, cfg, step, device, cfg.cluster_init and step < cfg.cluster_hold)
        done = step + 1
        if cfg.reassign and done % cfg.reassign == 0 and done <= refits_end(cfg):
            moved = reassign_clusters(fact, base, task, cfg, done)
            tqdm.write(f"step {done}: {moved:.1%} of pairs moved to the cluster the generator rates highest")
            log({"step": done, "reassign/moved": moved})
        if done % cfg.log_interval == 0 or done == cfg.steps:
            log({"step": done, "lr": optimizer.param_groups[0]["lr"], **log_record(obj)})
        after_step(done)


# ----------------------------------------------------------------------------------------------
# Label-free model selection (--starts): a short first phase from several seeds, one kept


@dataclass
class Start:
    fact: Factorization  # after cfg.start_steps steps
    optimizer: torch.optim.Optimizer
    records: list  # its log lines
    torch_rng: torch.Tensor  # the RNG state to continue from
    posterior_vote: int  # the steps its posterior votes (Initialisation)
    hard_em_objective: float  # under the posterior, on the "select" pairs, which every start shares
    assignment: torch.Tensor  # (N,) each "select" pair's latent under the generator (score_start)

    def state(self):
        """What a checkpoint keeps of the start (restore_start reads it back)."""
        return {"model": self.fact.state_dict(), "optimizer": self.optimizer.state_dict(), "records": self.records,
                "torch_rng": self.torch_rng, "posterior_vote": self.posterior_vote,
                "hard_em_objective": self.hard_em_objective, "assignment": self.assignment}


@dataclass
class StartScore:
    hard_em_objective: float  # mean_n max_k [log p_psi(y|x,k) + log q(k|x,y)] (evaluate.hard_em_objective)
    assignment: torch.Tensor  # (N,) each pair's latent under the generator: the partition the start reached


@torch.no_grad()
def score_start(fact, task, pairs):
    """What choose_start reads of a start on pairs, from one pass of the generator under every
    latent: the hard-EM objective under the posterior, and the latent under which the generator
    rates each pair's y highest. Continuous: k runs over the posterior's clusters, the generator
    read at each cluster's centroid, and q is one-hot on the pair's own cluster (posterior_clusters),
    so the objective is mean_n log p_psi(y_n|x_n, z = its cluster's centroid)."""
    if fact.latent == "discrete":
        latent_logp = latent_log_likelihoods(fact, task, pairs)  # (N, K)
        posterior_logq = posterior_distribution(fact, task, pairs).clamp(min=1e-12).log()  # (N, K)
        return StartScore(hard_em_objective(latent_logp, posterior_logq), latent_logp.argmax(1))
    clusters = posterior_clusters(fact, task, pairs)
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    objective = record_log_probs(fact.lm, task, xs, ys, latent=clusters.centroids[clusters.assign]).mean().item()
    return StartScore(objective, latent_log_likelihoods(fact, task, pairs, clusters.centroids).argmax(1))


def assignment_agreement(a, b):
    """The share of pairs on which two assignments (N,) agree once the latents of b are renamed to
    match a's best (one-to-one): 1 for the same partition under other names."""
    n = int(max(a.max(), b.max())) + 1
    together = torch.zeros(n, n).index_put_((a, b), torch.ones(len(a)), accumulate=True)  # (n, n)
    return alignment_one_to_one(together)


SAME_OUTCOME = 0.9  # two starts reached the same partition when their assignments agree on this share of pairs


@dataclass
class Choice:
    chosen: int  # the index of the start the run goes on with
    agreement: list  # (starts, starts) assignment_agreement of each pair of starts
    support: list  # for each start, the other starts that reached its partition (agreement >= SAME_OUTCOME)


def choose_start(starts):
    """The start whose partition of the "select" pairs the most other starts reached, and among
    those the one with the highest hard-EM objective. A partition that most starts reach is the
    strategies: latents that swap strategies on a group of inputs do so along a feature of the
    input that each start picks at random, and entangled latents split the pairs at random, while
    the hard-EM objective alone rates a swap as high as the strategies (docs/experiments.md)."""
    agreement = [[assignment_agreement(s.assignment, other.assignment) for other in starts] for s in starts]
    support = [sum(value >= SAME_OUTCOME for j, value in enumerate(row) if j != i) for i, row in enumerate(agreement)]
    chosen = max(range(len(starts)), key=lambda i: (support[i], starts[i].hard_em_objective))
    return Choice(chosen, agreement, support)


def start_seed(seed, start):
    return seed + 1000 * start  # start 0 is the run's own seed


def train_start(cfg, base, task, base_dir, base_ckpt, device, start):
    """The first cfg.start_steps steps of the run with seed start_seed(cfg.seed, start) (initialisation,
    clusters and data), read on the "select" pairs (score_start)."""
    start_cfg = replace(cfg, seed=start_seed(cfg.seed, start))
    seed_everything(start_cfg.seed)
    fact = build_factorization(start_cfg, task, base_dir, base_ckpt, device)
    optimizer = build_optimizer(fact, cfg)
    init = start_at_base(fact, base, task, start_cfg, device)
    start_cfg, records = replace(start_cfg, posterior_vote=init.posterior_vote), init.records
    fact.train()
    train_steps(fact, base, task, optimizer, start_cfg, device, 0, cfg.start_steps, records.append)
    torch_rng = torch.get_rng_state()
    pairs = training_pairs(task, base, cfg, 0, device, "select", CLUSTER_PAIRS)
    score = score_start(fact, task, pairs)
    fact.train()
    return Start(fact, optimizer, records, torch_rng, init.posterior_vote, score.hard_em_objective, score.assignment)


def restore_start(state, cfg, task, base_dir, base_ckpt, device, start):
    """A Start from its checkpointed state (Start.state)."""
    fact = build_factorization(replace(cfg, seed=start_seed(cfg.seed, start)), task, base_dir, base_ckpt, device)
    fact.load_state_dict(state["model"])
    optimizer = build_optimizer(fact, cfg)
    optimizer.load_state_dict(state["optimizer"])
    return Start(fact, optimizer, state["records"], state["torch_rng"], state["posterior_vote"],
                 state["hard_em_objective"], state["assignment"])


def select_start(cfg, base, task, base_dir, base_ckpt, device, starts=(), after_start=lambda starts: None):
    """Train cfg.starts starts (those after `starts`, which a resumed run brings); after each,
    after_start(the starts so far) checkpoints them. Returns the Choice among them, logged in the
    chosen start's records, and the chosen Start."""
    starts = list(starts)
    for start in range(len(starts), cfg.starts):
        starts.append(train_start(cfg, base, task, base_dir, base_ckpt, device, start))
        tqdm.write(f"step {cfg.start_steps}: start {start} has hard-EM objective {starts[-1].hard_em_objective:.4f}")
        after_start(starts)
    choice = choose_start(starts)
    tqdm.write(f"step {cfg.start_steps}: starts that reached each start's partition {choice.support}; "
               f"going on with start {choice.chosen}")
    best = starts[choice.chosen]
    best.records.append({"step": cfg.start_steps, "start/hard_em_objective": [s.hard_em_objective for s in starts],
                         "start/agreement": choice.agreement, "start/support": choice.support,
                         "start/chosen": choice.chosen})
    return choice, best


# ----------------------------------------------------------------------------------------------
# The run


def main(argv=None):
    cfg, given = parse_config(Config, argv, description=__doc__.split("\n\n")[0], epilog=RECIPES_HELP)
    apply_recipe(cfg, given)
    cfg.validate(given, len(get_task(cfg.task).strategies))
    device = pick_device(cfg.device)
    cfg.precision = resolve_precision(cfg.precision, device)
    base, task, base_dir, base_ckpt = load_base(cfg, device)
    if cfg.cluster_init > base.config.n_embd:  # no more directions than feature dimensions
        raise ValueError(f"--cluster-init must be at most the model width {base.config.n_embd}, "
                         f"got {cfg.cluster_init}")
    out = cfg.out or os.path.join("runs", task.name, cfg.latent)
    ckpt_path, log_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "log.jsonl")
    seed_everything(cfg.seed)
    fact = build_factorization(cfg, task, base_dir, base_ckpt, device)
    optimizer = build_optimizer(fact, cfg)
    ckpt = open_run(out, cfg.resume, fact, optimizer, asdict(cfg), VOCAB, task.name,
                    {**asdict(cfg), "k": fact.K, "base": base_dir, "revision": REVISIONS[cfg.latent],
                     "machine": machine_info(device)})
    start_step, seconds, t0 = ckpt.get("step", 0), ckpt.get("train_seconds", 0.0), time.perf_counter()
    chosen, posterior_vote = ckpt.get("start", 0), ckpt.get("posterior_vote", 0)

    def evaluate_and_checkpoint(step):
        n_inputs = cfg.final_inputs if step == cfg.steps else cfg.eval_inputs
        metrics, snapshot = factorization_metrics(fact, task, n_inputs, cfg.seed)
        save_posterior_snapshot(os.path.join(out, "posterior.npz"), step, snapshot)
        append_jsonl(log_path, {"step": step, "eval_inputs": n_inputs, **metrics})
        elapsed = seconds + time.perf_counter() - t0
        if step:
            save_checkpoint(ckpt_path, fact, VOCAB, task.name, optimizer=optimizer.state_dict(), step=step,
                            train_config=asdict(cfg), torch_rng=torch.get_rng_state(), train_seconds=elapsed,
                            start=chosen, posterior_vote=posterior_vote)
        tqdm.write(f"step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
        if step == cfg.steps:
            write_json(os.path.join(out, "metrics.json"),
                       {**metrics, "eval_inputs": n_inputs, "train_seconds": elapsed})

    def checkpoint_start_phase(starts):  # a kill between starts costs only the start it stopped
        save_checkpoint(ckpt_path, starts[-1].fact, VOCAB, task.name, optimizer=starts[-1].optimizer.state_dict(),
                        step=0, train_config=asdict(cfg), train_seconds=seconds + time.perf_counter() - t0,
                        start_states=[s.state() for s in starts])

    if start_step == 0 and cfg.starts > 1:  # the first phase ran in each start; the chosen one goes on
        truncate_log(log_path, -1)  # the log begins once the choice is made
        trained = [restore_start(state, cfg, task, base_dir, base_ckpt, device, start)
                   for start, state in enumerate(ckpt.get("start_states", []))]  # a run stopped between starts
        choice, best = select_start(cfg, base, task, base_dir, base_ckpt, device, trained, checkpoint_start_phase)
        chosen, fact, optimizer = choice.chosen, best.fact, best.optimizer
        start_step, posterior_vote = cfg.start_steps, best.posterior_vote
        torch.set_rng_state(best.torch_rng)
        for record in best.records:
            append_jsonl(log_path, record)
        evaluate_and_checkpoint(start_step)
    elif start_step == 0:
        init = start_at_base(fact, base, task, cfg, device)
        posterior_vote = init.posterior_vote
        for record in init.records:
            append_jsonl(log_path, record)
        evaluate_and_checkpoint(0)

    def after_step(done):
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            evaluate_and_checkpoint(done)

    fact.train()  # the training data and the vote of the chosen start (the run's own with --starts 1)
    run_cfg = replace(cfg, seed=start_seed(cfg.seed, chosen), posterior_vote=posterior_vote)
    train_steps(fact, base, task, optimizer, run_cfg, device, start_step, cfg.steps,
                lambda record: append_jsonl(log_path, record), after_step)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
