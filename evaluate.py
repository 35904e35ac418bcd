"""
Every metric and probe of the project, and a CLI that scores a checkpoint of either stage.

    python evaluate.py runs/grid_pathfinding/base                   # writes its metrics.json
    python evaluate.py runs/grid_pathfinding/discrete --inputs 1000  # writes metrics_1000.json

Generation metrics (temperature-1 samples on held-out inputs, attributed with task.check):
    parse_rate, answer_accuracy      share of generations that parse / are correct
    strategy_tv                      TV( generated strategy frequencies , mean_x p*(s|x) )
                                     (an ambiguous y is credited to its strategies in proportion
                                     to p*; an unattributed y goes to a "none" bin p* never has)
    ambiguous_rate, unattributed_rate
Likelihood metrics (teacher forcing, no sampling noise):
    excess_nll                       mean over DGP samples of -log p_theta(y|x) + log p*(y|x)
    strategy_tv_per_input            mean_x TV( p_theta(trace_s(x) | x) , p*(s|x) ), with the
                                     model's mass on non-traces counted as a "none" bin
    branch_calibration               at each token where x's traces part, the model's probability
                                     of each branch against p*  (python evaluate.py RUN --branches)
    departures                       where generations that match no strategy first leave every
                                     trace of x  (python evaluate.py RUN --departures)
Linear probes (Key Figure 1): a logistic probe per (layer, y-position) from the residual stream
to the strategy that wrote y, trained and scored on disjoint inputs; the shuffled-label probe
and the majority-class rate are the baselines.
Stage 2 (factorization_metrics): router/* generation metrics with z ~ p_phi(z|x); discrete:
alignment_one_to_one and local coverage of the controlled decodes, posterior_accuracy;
continuous: sampled_z_probe_acc, posterior_mu_probe_acc, centroid geometry and control.
Every key is defined in docs/metrics.md.
"""

import itertools
import json
import os
import random
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model import (OneLineParser, load_checkpoint, model_from_checkpoint, pad_batch, pick_device,
                   router_log_probs, run_main, token_log_probs, write_json)
from tasks import (EOS, LATENT_TOKENS, PAD, STOI, VOCAB, decode, encode, get_task, prompt_tokens, record_tokens,
                   sample_split_input)

# ----------------------------------------------------------------------------------------------
# Data for evaluation: held-out inputs and DGP samples


def heldout_inputs(task, n, seed):
    """n draws from the held-out split, reproducible from seed (small input spaces repeat inputs)."""
    rng = random.Random(seed)
    return [sample_split_input(task, rng, "test") for _ in range(n)]


def dgp_samples(task, xs, seed):
    """One draw s ~ p*(s|x), y = trace(x, s) per input: a list of (x, s, y)."""
    rng = random.Random(seed)
    return [(x, s, task.trace(x, s)) for x in xs for s in [task.sample_strategy(x, rng)]]


# ----------------------------------------------------------------------------------------------
# Generation and teacher forcing


@torch.no_grad()
def generate_ys(model, task, xs, latent_tokens=None, latent=None, temperature=1.0, seed=0,
                batch_size=256):
    """
    Sample one y per input from <bos> <x> .. </x> <z> latent </z> <y>. latent_tokens: one token
    per input (default <z_empty>); latent (N, dz): a vector added at that slot. Returns token
    lists, or None for a generation that did not close with </y> <eos>.
    """
    model.eval()
    device = model.tok_emb.weight.device
    latent_tokens = latent_tokens or ["<z_empty>"] * len(xs)
    generator = torch.Generator(device=device).manual_seed(seed)
    max_new = model.config.block_size
    ys = []
    for i in range(0, len(xs), batch_size):
        prompts = [encode(prompt_tokens(task.input_tokens(x), lt))
                   for x, lt in zip(xs[i:i + batch_size], latent_tokens[i:i + batch_size])]
        kwargs = {}
        if latent is not None:
            kwargs = {"latent": latent[i:i + batch_size].to(device),
                      "latent_pos": torch.tensor([len(p) - 3 for p in prompts], device=device)}
        outs = model.generate(prompts, max_new, EOS, PAD, temperature, generator, **kwargs)
        for out in outs:
            tokens = decode(out)
            ok = len(tokens) >= 2 and tokens[-2:] == ["</y>", "<eos>"] and "</y>" not in tokens[:-2]
            ys.append(tokens[:-2] if ok else None)
    return ys


@torch.no_grad()
def record_log_probs(model, task, xs, ys, latent_tokens=None, latent=None, batch_size=256):
    """log p_theta(y </y> <eos> | prompt) for each (x, y) by teacher forcing: a tensor (N,).
    latent_tokens: one token per input for the slot (default <z_empty>); latent (N, dz): a vector
    added at the slot."""
    model.eval()
    device = model.tok_emb.weight.device
    latent_tokens = latent_tokens or ["<z_empty>"] * len(xs)
    records = [encode(record_tokens(task.input_tokens(x), y, lt)) for x, y, lt in zip(xs, ys, latent_tokens)]
    starts = [len(prompt_tokens(task.input_tokens(x))) for x in xs]
    order = sorted(range(len(records)), key=lambda i: len(records[i]))  # batch by length
    out = torch.zeros(len(records))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        idx, mask = pad_batch([records[r] for r in rows], PAD, [starts[r] for r in rows], device)
        kwargs = {} if latent is None else {"latent": latent[rows].to(device),
                                            "latent_pos": torch.tensor([starts[r] - 3 for r in rows], device=device)}
        out[rows] = (token_log_probs(model(idx, **kwargs), idx) * mask).sum(-1).cpu()
    return out


# ----------------------------------------------------------------------------------------------
# Metrics


def tv_distance(p, q):
    """Total variation 0.5 * sum_k |p_k - q_k| between two dicts of probabilities."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in sorted(set(p) | set(q)))  # sorted: the same sum


def strategy_credit(task, x, matched):
    """Split one generation among the strategies whose trace it equals, in proportion to p*."""
    if not matched:
        return {"none": 1.0}
    probs = task.strategy_probs(x)
    matched = [s for s in task.strategies if s in matched]  # the task's order, not the set's hash order
    total = sum(probs[s] for s in matched)
    return {s: probs[s] / total for s in matched} if total > 0 else {s: 1 / len(matched) for s in matched}


def generation_metrics(task, xs, ys):
    """parse_rate, answer_accuracy, strategy_tv, ambiguous/unattributed rates, strategy frequencies."""
    n = len(xs)
    checks = [task.check(x, y) if y is not None else None for x, y in zip(xs, ys)]
    generated, expected = Counter(), Counter()
    for x, c in zip(xs, checks):
        for s, w in strategy_credit(task, x, c.strategies if c else frozenset()).items():
            generated[s] += w / n
        for s, p in task.strategy_probs(x).items():
            expected[s] += p / n
    return {
        "parse_rate": sum(bool(c and c.parsed) for c in checks) / n,
        "answer_accuracy": sum(bool(c and c.correct) for c in checks) / n,
        "strategy_tv": tv_distance(generated, expected),
        "ambiguous_rate": sum(bool(c and len(c.strategies) > 1) for c in checks) / n,
        "unattributed_rate": sum(not (c and c.strategies) for c in checks) / n,
        "strategy_freq": {s: generated.get(s, 0.0) for s in (*task.strategies, "none")},
    }


def excess_nll(model, task, samples):
    """mean over DGP samples (x, s, y) of -log p_theta(y|x) + log p*(y|x); 0 is perfect."""
    xs, ys = [x for x, _, _ in samples], [y for _, _, y in samples]
    model_logp = record_log_probs(model, task, xs, ys)
    true_logp = torch.tensor([task.log_prob(x, y) for x, y in zip(xs, ys)])
    return float((true_logp - model_logp).mean())


def strategy_tv_per_input(model, task, xs):
    """mean_x TV(p_theta(trace_s(x)|x), p*(s|x)) over distinct traces, exact (no sampling)."""
    rows, owners = [], []  # one row per distinct trace of each input
    for i, x in enumerate(xs):
        distinct = {}
        for s, t in task.traces(x).items():
            distinct.setdefault(tuple(t), []).append(s)
        for t, strategies in distinct.items():
            rows.append((x, list(t)))
            owners.append((i, strategies))
    model_p = record_log_probs(model, task, [x for x, _ in rows], [y for _, y in rows]).exp()
    tvs = [0.0] * len(xs)
    mass = [0.0] * len(xs)
    for (i, strategies), p in zip(owners, model_p.tolist()):
        probs = task.strategy_probs(xs[i])
        tvs[i] += 0.5 * abs(p - sum(probs[s] for s in strategies))
        mass[i] += p
    return sum(tv + 0.5 * max(0.0, 1.0 - m) for tv, m in zip(tvs, mass)) / len(xs)


@torch.no_grad()
def branch_calibration(model, task, xs):
    """Where the model's strategy mass goes wrong, exactly: the traces of x form a prefix tree, and
    at each branch (a position where the strategies still alive write different tokens) the model's
    probability of each child is compared with the true p*(child | alive) = sum_{s in child} p*(s|x)
    / sum_{s in alive} p*(s|x). Returns {(alive, child): [count, sum of model p, sum of true p]},
    alive and child tuples of strategies."""
    model.eval()
    device, table = model.tok_emb.weight.device, {}
    for x in xs:
        traces = {s: task.trace(x, s) + ["</y>", "<eos>"] for s in task.strategies}
        x_tokens, p_star = task.input_tokens(x), task.strategy_probs(x)
        start = len(prompt_tokens(x_tokens))
        idx, _ = pad_batch([encode(record_tokens(x_tokens, t[:-2])) for t in traces.values()], PAD,
                           [start] * len(traces), device)
        probs = torch.softmax(model(idx).float(), dim=-1).cpu()  # (S, T, V)
        branches = {}  # (alive, position) -> the row of a trace through that node
        for row, trace in enumerate(traces.values()):
            for j in range(len(trace)):
                alive = tuple(s for s in task.strategies if traces[s][:j] == trace[:j])
                if len({traces[s][j] for s in alive}) > 1:
                    branches.setdefault((alive, j), row)
        for (alive, j), row in branches.items():
            for token in dict.fromkeys(traces[s][j] for s in alive):
                child = tuple(s for s in alive if traces[s][j] == token)
                entry = table.setdefault((alive, child), [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += probs[row, start - 1 + j, STOI[token]].item()
                entry[2] += sum(p_star[s] for s in child) / sum(p_star[s] for s in alive)
    return table


def departures(task, xs, ys):
    """Where generations that match no strategy first leave every trace of x: the first token that no
    strategy still alive writes. Returns {(alive, step): count}, alive the tuple of strategies that
    wrote the prefix and step the number of ';'-ended steps before that token."""
    table = Counter()
    for x, y in zip(xs, ys):
        traces = task.traces(x)
        alive = tuple(traces)
        for t, token in enumerate(list(y) + ["</y>"]):
            ahead = tuple(s for s in alive if (traces[s] + ["</y>"])[t:t + 1] == [token])
            if not ahead:
                table[(alive, traces[alive[0]][:t].count(";"))] += 1
                break
            alive = ahead
    return table


# ----------------------------------------------------------------------------------------------
# Linear probes: residual stream at (layer, y-position) -> strategy


@torch.no_grad()
def probe_features(model, task, samples, max_positions, batch_size=128):
    """
    Residual stream at y-positions 0..P-1 for each sample: position 0 is the <y> token, position p
    the p-th y token. Returns features (N, L+1, P, d) and a mask (N, P) of positions inside y.
    """
    model.eval()
    device = model.tok_emb.weight.device
    records = [encode(record_tokens(task.input_tokens(x), y)) for x, _, y in samples]
    y_start = [len(prompt_tokens(task.input_tokens(x))) - 1 for x, _, _ in samples]  # index of <y>
    P, feats = max_positions, []
    valid = torch.tensor([[p <= len(y) for p in range(P)] for _, _, y in samples])  # (N, P)
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        idx, _ = pad_batch(chunk, PAD, [0] * len(chunk), device)
        _, hidden = model(idx, return_hidden=True)  # (B, L+1, T, d)
        pos = torch.tensor([[min(s + p, len(r) - 1) for p in range(P)]
                            for s, r in zip(y_start[i:i + batch_size], chunk)], device=device)  # (B, P)
        gather = pos[:, None, :, None].expand(-1, hidden.shape[1], -1, hidden.shape[-1])
        feats.append(hidden.gather(2, gather).float().cpu())  # (B, L+1, P, d)
    return torch.cat(feats), valid


@dataclass
class Probes:
    weight: torch.Tensor  # (G, C, d) on standardised features
    bias: torch.Tensor  # (G, C, 1)
    mean: torch.Tensor  # (G, 1, d) the training samples' feature mean
    std: torch.Tensor  # (G, 1, d) and standard deviation

    def logits(self, features):
        """(G, N, d) -> (G, C, N)."""
        return self.weight @ ((features - self.mean) / self.std).transpose(1, 2) + self.bias


def fit_probes(features, labels, train_w, n_classes, steps=300, lr=0.05, l2=1e-3):
    """One logistic probe per group, all fitted at once by Adam: features (G, N, d), labels (N,),
    train_w (G, N) 1 on the samples each probe trains on. Features are standardised with those
    samples' statistics. Each probe minimises its own mean NLL + l2 |W|^2, so a probe is the same
    whichever other groups are fitted beside it."""
    with torch.enable_grad():
        G, N, d = features.shape
        n_train = train_w.sum(1).clamp(min=1)  # (G,)
        w, n = train_w[..., None], n_train[:, None, None]  # (G, N, 1), (G, 1, 1)
        mean = (features * w).sum(1, keepdim=True) / n
        std = (((features - mean) ** 2 * w).sum(1, keepdim=True) / n).sqrt() + 1e-5
        Xt = ((features - mean) / std).transpose(1, 2).contiguous()  # (G, d, N): logits come out (G, C, N)
        Wt = torch.zeros(G, n_classes, d, requires_grad=True)
        b = torch.zeros(G, n_classes, 1, requires_grad=True)
        opt = torch.optim.Adam([Wt, b], lr=lr)
        target = labels[None].expand(G, N)
        for _ in range(steps):
            logits = Wt @ Xt + b  # (G, C, N)
            nll = F.cross_entropy(logits, target, reduction="none")  # (G, N)
            loss = ((nll * train_w).sum(1) / n_train).sum() + l2 * (Wt ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return Probes(Wt.detach(), b.detach(), mean, std)


@torch.no_grad()
def train_probes(features, labels, valid, n_classes, is_train, **fit):
    """
    fit_probes on the samples valid (G, N) marks in the training split is_train (N,). Returns
    test accuracy per group (G,), NaN where fewer than 10 test samples or fewer than two classes
    among them (late y-positions where only the longest strategy's traces are still running:
    accuracy there would be 1.0 and say nothing); those groups are not fitted.
    """
    test_w = (valid & ~is_train[None]).float()  # (G, N)
    n_test = test_w.sum(1)
    classes_present = ((F.one_hot(labels, n_classes).float()[None] * test_w[..., None]).sum(1) > 0).sum(1)
    scored = (n_test >= 10) & (classes_present >= 2)  # (G,)
    acc = torch.full((len(features),), float("nan"))
    if scored.any():
        probes = fit_probes(features[scored], labels, (valid[scored] & is_train[None]).float(), n_classes, **fit)
        correct = (probes.logits(features[scored]).argmax(1) == labels[None]).float()  # (G', N)
        acc[scored] = (correct * test_w[scored]).sum(1) / n_test[scored]
    return acc


def probe_grid(model, task, n=1200, test_fraction=1 / 3, seed=0):
    """
    Probe accuracy for every (layer, y-position) on held-out DGP samples split by input.
    Returns accuracy and shuffled-label accuracy (L+1, P), the chance level and counts.
    """
    xs = heldout_inputs(task, n, seed)
    samples = [s for s in dgp_samples(task, xs, seed + 1)
               if len(task.check(s[0], s[2]).strategies) == 1]  # drop ambiguous traces
    labels = torch.tensor([task.strategies.index(s) for _, s, _ in samples])
    P = max(len(y) for _, _, y in samples) + 1
    feats, valid = probe_features(model, task, samples, P)  # (N, L+1, P, d), (N, P)
    N, L1, _, d = feats.shape
    is_train = split_by_input(task, [x for x, _, _ in samples], test_fraction)
    groups = feats.permute(1, 2, 0, 3).reshape(L1 * P, N, d)
    group_valid = valid.T[None].expand(L1, P, N).reshape(L1 * P, N)
    S = len(task.strategies)
    fit = dict(steps=100)  # a third of a lone probe's steps: the grid is fitted again at every evaluation of stage 1
    acc = train_probes(groups, labels, group_valid, S, is_train, **fit).view(L1, P)
    # control: labels permuted across samples (train and test alike) carry no information
    shuffled = labels[torch.randperm(N, generator=torch.Generator().manual_seed(seed))]
    acc_shuffled = train_probes(groups, shuffled, group_valid, S, is_train, **fit).view(L1, P)
    chance = Counter(labels[~is_train].tolist()).most_common(1)[0][1] / int((~is_train).sum())
    return {"acc": acc, "acc_shuffled": acc_shuffled, "chance": chance,
            "n_train": int(is_train.sum()), "n_test": int((~is_train).sum())}


def split_by_input(task, xs, test_fraction):
    """A boolean train mask (N,) that puts every copy of an input on the same side."""
    keys = list(dict.fromkeys(tuple(task.input_tokens(x)) for x in xs))
    test_keys = set(keys[:max(1, int(len(keys) * test_fraction))])
    return torch.tensor([tuple(task.input_tokens(x)) not in test_keys for x in xs])


def read_snapshot(path):
    """An .npz snapshot as a dict of arrays; a ValueError naming the file if it is not one of ours."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: unreadable snapshot (truncated, corrupt or not an .npz): "
                         f"{type(e).__name__}") from None


def save_probe_snapshot(path, step, probes):
    """Append one probe grid (L+1, P) to probes.npz (arrays padded to the widest grid)."""
    snaps = read_snapshot(path) if os.path.exists(path) else {}
    steps = [int(s) for s in snaps.get("steps", []) if s < step] + [step]
    grids = [g for g, s in zip(snaps.get("acc", []), snaps.get("steps", [])) if s < step] + [probes["acc"].numpy()]
    shuffled = [g for g, s in zip(snaps.get("acc_shuffled", []), snaps.get("steps", [])) if s < step]
    shuffled += [probes["acc_shuffled"].numpy()]
    P = max(g.shape[1] for g in grids)
    pad = lambda gs: np.stack([np.pad(g, ((0, 0), (0, P - g.shape[1])), constant_values=np.nan) for g in gs])
    tmp = path + ".tmp.npz"
    np.savez(tmp, steps=np.array(steps), acc=pad(grids), acc_shuffled=pad(shuffled), chance=probes["chance"])
    os.replace(tmp, path)


def first_decodable_position(acc, threshold=0.95):
    """First y-position where some layer's probe reaches threshold, or None."""
    best = torch.nan_to_num(acc, nan=0.0).max(0).values  # (P,)
    hits = (best >= threshold).nonzero()
    return int(hits[0]) if len(hits) else None


# ----------------------------------------------------------------------------------------------
# Latents against strategies: matching, alignment, coverage


def contingency(task, xs, ys, latent_index, K):
    """C[k, s]: generations decoded under latent k credited to strategy s (ambiguous split by p*)."""
    C = torch.zeros(K, len(task.strategies))
    for x, y, k in zip(xs, ys, latent_index):
        matched = task.check(x, y).strategies if y is not None else frozenset()
        for s, w in strategy_credit(task, x, matched).items():
            if s != "none":
                C[k, task.strategies.index(s)] += w
    return C


def best_matching(C):
    """
    The one-to-one assignment latent -> strategy maximising the matched mass sum_k C[k, m(k)],
    exact by enumeration (K and S are small). Returns (dict k -> s index, matched mass).
    Unmatched latents (K > S) or strategies (S > K) are left out.
    """
    K, S = C.shape
    best, best_map = -1.0, {}
    if K <= S:
        for perm in itertools.permutations(range(S), K):
            total = float(sum(C[k, perm[k]] for k in range(K)))
            if total > best:
                best, best_map = total, {k: perm[k] for k in range(K)}
    else:
        for perm in itertools.permutations(range(K), S):
            total = float(sum(C[perm[s], s] for s in range(S)))
            if total > best:
                best, best_map = total, {perm[s]: s for s in range(S)}
    return best_map, best


def alignment_one_to_one(C, total=None):
    """Matched count under the best one-to-one assignment / all decodes (default: C's sum)."""
    total = float(C.sum()) if total is None else total
    return best_matching(C)[1] / total if total > 0 else 0.0


def local_coverage(task, xs, ys_per_latent):
    """
    Per input, the distinct strategies among its K controlled decodes (correct ones only) over
    min(K, S). Returns (mean coverage, fraction of inputs with full coverage).
    """
    K, S = len(ys_per_latent), len(task.strategies)
    target, coverages = min(K, S), []
    for i, x in enumerate(xs):
        seen = set()
        for ys in ys_per_latent:
            c = task.check(x, ys[i]) if ys[i] is not None else None
            if c is not None and c.correct and len(c.strategies) == 1:
                seen |= c.strategies
        coverages.append(min(len(seen), target) / target)
    return sum(coverages) / len(coverages), sum(c == 1.0 for c in coverages) / len(coverages)


# ----------------------------------------------------------------------------------------------
# Reading and scoring a stage-2 factorization. `fact` is model.Factorization; what is read of
# it: fact.latent, fact.K, fact.lm (router and generator), fact.router_head, fact.post_head and
# fact.posterior_features(idx, y_state_mask).


@torch.no_grad()
def router_distribution(fact, task, xs):
    """p_phi(z|x) from the router prompt <bos> <x> .. </x> <z>: probabilities (N, K) (discrete),
    or the mixture's (log pi (N, M), mu (N, M, dz), logvar (N, M, dz)) (continuous; M = 1: Gaussian)."""
    device = fact.lm.tok_emb.weight.device
    prompts = [encode(prompt_tokens(task.input_tokens(x))) for x in xs]
    idx, _ = pad_batch(prompts, PAD, [0] * len(prompts), device)
    route_pos = torch.tensor([len(p) - 4 for p in prompts], device=device)  # <z> of "<z> slot </z> <y>"
    logits, last = fact.lm(idx, last_hidden=True)
    rows = torch.arange(len(xs), device=device)
    if fact.latent == "discrete":
        latent_ids = [STOI[t] for t in LATENT_TOKENS[:fact.K]]
        return router_log_probs(logits[rows, route_pos], latent_ids)[0].exp().cpu()
    state = fact.lm.ln_f(last[rows, route_pos])
    return tuple(t.cpu() for t in fact.router_params(state))


@torch.no_grad()
def posterior_distribution(fact, task, pairs, features=False, batch_size=256):
    """q(z|x,y) of pairs (x, y): probabilities (N, K), or (mu, logvar) (N, dz) each; with
    features, also the pooled y-states (N, d) the posterior head reads."""
    device, pooled = fact.lm.tok_emb.weight.device, []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        records = [encode(record_tokens(task.input_tokens(x), y)) for x, y in chunk]
        starts = [len(prompt_tokens(task.input_tokens(x))) for x, _ in chunk]
        idx, y_mask = pad_batch(records, PAD, starts, device)
        y_state_mask = F.pad(y_mask, (1, 0))  # (B, T): the states that read a y token
        pooled.append(fact.posterior_features(idx, y_state_mask))
    pooled = torch.cat(pooled)
    out = fact.post_head(pooled).float().cpu()
    out = F.softmax(out, -1) if fact.latent == "discrete" else tuple(out.chunk(2, dim=-1))
    return (out, pooled) if features else out


@torch.no_grad()
def latent_log_likelihoods(fact, task, pairs, z=None):
    """log p_psi(y|x, latent) of each pair at each latent: the K tokens (discrete), or the C
    vectors z (C, dz) (continuous). Returns (N, K) or (N, C)."""
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    if z is None:
        return torch.stack([record_log_probs(fact.lm, task, xs, ys, [LATENT_TOKENS[k]] * len(xs))
                            for k in range(fact.K)], 1)
    return torch.stack([record_log_probs(fact.lm, task, xs, ys, latent=zc.expand(len(xs), -1)) for zc in z], 1)


def hard_em_objective(latent_logp, log_prior):
    """mean over pairs of max_k [log p_psi(y|x,k) + log_prior_k], from (N, K) each: the objective of
    a hard assignment, computed without strategy labels. With the router's log p_phi(k|x), deterministic
    traces and a uniform router, it is -log K for a disentangled factorization (each trace written by
    one latent) and -2 log K for an entangled one (every latent writes the mixture). With the
    posterior's log q(k|x,y) it also sees latents that swap names across inputs where q cannot
    follow the swap, but not a swap keyed on something y itself shows, such as sum's carry
    (disentangle.choose_start handles those)."""
    return (latent_logp + log_prior).max(1).values.mean().item()


def latent_loss_ratios(fact, base, task, pairs):
    """y-loss of the generator under each latent (continuous: z ~ N(0, I) per pair) / the base model's."""
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    base_loss = record_log_probs(base, task, xs, ys).sum()
    if fact.K:
        return (latent_log_likelihoods(fact, task, pairs).sum(0) / base_loss).tolist()
    z = torch.randn(len(xs), fact.dz)
    return [(record_log_probs(fact.lm, task, xs, ys, latent=z).sum() / base_loss).item()]


def factorization_metrics(fact, task, n_inputs, seed):
    """Every stage-2 metric on n_inputs held-out inputs, and the arrays the figures draw."""
    fact.eval()
    xs = heldout_inputs(task, n_inputs, seed)
    samples = [s for s in dgp_samples(task, xs, seed + 1) if len(task.check(s[0], s[2]).strategies) == 1]
    labels = torch.tensor([task.strategies.index(s) for _, s, _ in samples], dtype=torch.long)
    pairs = [(x, y) for x, _, y in samples]
    score = discrete_scores if fact.latent == "discrete" else continuous_scores
    metrics, snapshot = score(fact, task, xs, pairs, labels, seed)
    fact.train()
    return metrics, {"strategy": labels.numpy(), **snapshot}


def discrete_scores(fact, task, xs, pairs, labels, seed):
    """Router-sampled generation; controlled latents (one greedy decode per latent per input):
    contingency, alignment, coverage; the posterior's accuracy under the best matching."""
    K = fact.K
    router_p = router_distribution(fact, task, xs)  # (N, K)
    z_idx = torch.multinomial(router_p, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1).tolist()
    ys = generate_ys(fact.lm, task, xs, [LATENT_TOKENS[k] for k in z_idx], seed=seed)
    metrics = {f"router/{k}": v for k, v in generation_metrics(task, xs, ys).items()}
    ys_per_latent = [generate_ys(fact.lm, task, xs, [LATENT_TOKENS[k]] * len(xs), temperature=0.0) for k in range(K)]
    C = contingency(task, xs * K, sum(ys_per_latent, []), [k for k in range(K) for _ in xs], K)
    metrics["alignment_one_to_one"] = alignment_one_to_one(C, total=K * len(xs))
    metrics["local_strategy_coverage_mean"], metrics["local_strategy_full_coverage_rate"] = \
        local_coverage(task, xs, ys_per_latent)
    metrics["controlled_answer_accuracy"] = sum(
        task.check(x, y).correct for ys in ys_per_latent for x, y in zip(xs, ys) if y is not None) / (K * len(xs))
    metrics["contingency"] = C.tolist()
    q = posterior_distribution(fact, task, pairs) if pairs else torch.zeros(0, K)  # (N, K)
    Cq = torch.zeros(K, len(task.strategies))
    Cq.index_put_((q.argmax(-1), labels), torch.ones(len(labels)), accumulate=True)
    metrics["posterior_accuracy"] = alignment_one_to_one(Cq)
    metrics["router_usage"] = router_p.mean(0).tolist()
    if pairs:
        metrics["hard_em_objective"] = hard_em_objective(latent_log_likelihoods(fact, task, pairs),
                                                         router_distribution(fact, task, [x for x, _ in pairs]).log())
    return metrics, {"q": q.numpy(), "contingency": C.numpy(), "posterior_contingency": Cq.numpy()}


def continuous_scores(fact, task, xs, pairs, labels, seed):
    """Router-sampled generation; probes from router draws and from posterior means to the
    strategy; centroid geometry; decodes from each strategy's posterior centroid."""
    log_pi, mu_p, logvar_p = router_distribution(fact, task, xs)  # (N, M), (N, M, dz) each
    component = torch.zeros(len(xs), dtype=torch.long) if log_pi.shape[1] == 1 else \
        torch.multinomial(log_pi.exp(), 1, generator=torch.Generator().manual_seed(seed + 1)).squeeze(1)
    rows = torch.arange(len(xs))
    eps = torch.randn(mu_p[:, 0].shape, generator=torch.Generator().manual_seed(seed))
    z = mu_p[rows, component] + (0.5 * logvar_p[rows, component]).exp() * eps  # (N, dz), z ~ p_phi(z|x)
    ys = generate_ys(fact.lm, task, xs, latent=z, seed=seed)
    metrics = {f"router/{k}": v for k, v in generation_metrics(task, xs, ys).items()}
    decoded = [task.check(x, y).strategies if y is not None else frozenset() for x, y in zip(xs, ys)]
    keep = [i for i, s in enumerate(decoded) if len(s) == 1]
    z_labels = torch.tensor([task.strategies.index(next(iter(decoded[i]))) for i in keep], dtype=torch.long)
    metrics["sampled_z_probe_acc"] = linear_probe_accuracy(task, [xs[i] for i in keep], z[keep], z_labels)
    mu_q = posterior_distribution(fact, task, pairs)[0] if pairs else torch.zeros(0, z.shape[1])  # (len(pairs), dz)
    metrics["posterior_mu_probe_acc"] = linear_probe_accuracy(task, [x for x, _ in pairs], mu_q, labels)
    metrics["posterior_sampled_gap"] = metrics["posterior_mu_probe_acc"] - metrics["sampled_z_probe_acc"]
    metrics.update(centroid_geometry(mu_q, labels, len(task.strategies)))
    metrics["active_units"] = int((mu_q.var(0) > 0.01).sum()) if len(mu_q) > 1 else 0
    metrics.update(centroid_control(fact, task, xs, mu_q, labels))
    metrics["router_nearest_centroid_rate"] = nearest_centroid_rate(task, z, decoded, mu_q, labels)
    metrics["router_component_usage"] = log_pi.exp().mean(0).tolist()
    return metrics, {"mu": mu_q.numpy(), "z_sampled": z[keep].numpy(), "z_strategy": z_labels.numpy()}


def linear_probe_accuracy(task, xs, features, labels, test_fraction=1 / 3):
    """A logistic probe from features (N, d) to strategy labels, scored on inputs it never saw."""
    if len(labels) < 20:
        return float("nan")
    is_train = split_by_input(task, xs, test_fraction)
    valid = torch.ones(1, len(labels), dtype=torch.bool)
    return float(train_probes(features[None].float(), labels, valid, len(task.strategies), is_train)[0])


def strategy_centroids(points, labels, n_classes, min_count=1):
    """The mean of points (N, d) over each strategy with at least min_count rows: (present, (C, d))."""
    present = [c for c in range(n_classes) if int((labels == c).sum()) >= min_count]
    if not present:
        return [], torch.zeros(0, points.shape[1])
    return present, torch.stack([points[labels == c].mean(0) for c in present])


def centroid_geometry(points, labels, n_classes):
    """Mean pairwise distance of per-strategy centroids over the mean within-strategy spread."""
    present, centroids = strategy_centroids(points, labels, n_classes, min_count=2)
    if len(present) < 2:
        return {"centroid_distance": float("nan"), "within_strategy_spread": float("nan"),
                "centroid_pairwise_distance": float("nan")}
    spread = torch.stack([(points[labels == c] - centroids[i]).norm(dim=-1).mean() for i, c in enumerate(present)])
    dists = torch.pdist(centroids)
    return {"centroid_distance": float(dists.mean() / spread.mean().clamp(min=1e-8)),
            "within_strategy_spread": float(spread.mean()), "centroid_pairwise_distance": float(dists.mean())}


def nearest_centroid_accuracy(points, labels, n_classes):
    """The share of points (N, d) nearer their own strategy's centroid than any other's."""
    present, centroids = strategy_centroids(points, labels, n_classes)
    if not present:
        return float("nan")
    nearest = torch.tensor(present)[torch.cdist(points.float(), centroids.float()).argmin(1)]
    return float((nearest == labels).float().mean())


def centroid_control(fact, task, xs, mu, labels):
    """Decode from each strategy's posterior centroid: the share of inputs that follow that strategy."""
    shares = {}
    present, centroids = strategy_centroids(mu, labels, len(task.strategies))
    for c, centroid in zip(present, centroids):
        ys = generate_ys(fact.lm, task, xs, latent=centroid.expand(len(xs), -1), temperature=0.0)
        s = task.strategies[c]
        shares[s] = sum(y is not None and s in task.check(x, y).strategies for x, y in zip(xs, ys)) / len(xs)
    return {"centroid_control": shares, "centroid_control_mean": sum(shares.values()) / max(1, len(shares))}


def nearest_centroid_rate(task, z, decoded, mu, labels):
    """
    The share of router draws z (N, dz) whose decode follows the strategy of the posterior centroid
    nearest to z: 1 when the router's z space carries the posterior's code, lower when draws land
    between centroids, where the generator was not trained. decoded: each draw's matched strategies.
    """
    present, centroids = strategy_centroids(mu, labels, len(task.strategies))  # (C, dz)
    if not present:
        return float("nan")
    nearest = torch.cdist(z.float(), centroids.float()).argmin(1).tolist()  # (N,)
    hits = [decoded[i] == {task.strategies[present[k]]} for i, k in enumerate(nearest)]
    return sum(hits) / max(1, len(hits))


def save_posterior_snapshot(path, step, snapshot):
    """Add one evaluation's arrays to posterior.npz, one key per (array, step): 'q@300'; later steps go."""
    data = read_snapshot(path) if os.path.exists(path) else {}
    data = {k: v for k, v in data.items() if "@" not in k or int(k.split("@")[1]) < step}
    data.update({f"{k}@{step}": v for k, v in snapshot.items()})
    tmp = path + ".tmp.npz"
    np.savez(tmp, **data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Scoring a base model


def base_metrics(model, task, n_inputs=500, seed=0):
    """Every base-model metric on held-out inputs (temperature-1 generation, teacher forcing)."""
    xs = heldout_inputs(task, n_inputs, seed)
    ys = generate_ys(model, task, xs, temperature=1.0, seed=seed)
    metrics = generation_metrics(task, xs, ys)
    metrics["excess_nll"] = excess_nll(model, task, dgp_samples(task, xs, seed + 1))
    metrics["strategy_tv_per_input"] = strategy_tv_per_input(model, task, xs)
    return metrics


def score_stage2_run(run, ckpt, n_inputs, device_name):
    """Rescore a stage-2 run at its checkpoint on n_inputs held-out inputs (its own seed): metrics_<N>.json."""
    from disentangle import Config, build_factorization, load_base  # stage 2 imports this file
    cfg = Config(**{k: v for k, v in ckpt["train_config"].items() if k in Config.__dataclass_fields__})
    if "start_states" in ckpt:
        raise ValueError(f"{run}: stopped while choosing its start ({len(ckpt['start_states'])} of {cfg.starts} "
                         f"trained); finish it with disentangle.py --resume first")
    device = pick_device(device_name)
    _, task, base_dir, base_ckpt = load_base(cfg, device)
    fact = build_factorization(cfg, task, base_dir, base_ckpt, device)
    fact.load_state_dict(ckpt["model"])
    metrics, _ = factorization_metrics(fact, task, n_inputs, cfg.seed)
    step = ckpt["step"]
    write_json(os.path.join(run, f"metrics_{n_inputs}.json"), {"step": step, "eval_inputs": n_inputs, **metrics})
    print(f"step {step}, {n_inputs} inputs: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                        if isinstance(v, float)))
    return 0


def main(argv=None):
    parser = OneLineParser(description="Score a run folder's checkpoint: a base run (metrics.json) "
                                       "or a stage-2 run (metrics_<inputs>.json).")
    parser.add_argument("run", help="a run folder holding ckpt.pt, e.g. runs/grid_pathfinding/base")
    parser.add_argument("--inputs", type=int, default=500, help="held-out inputs to generate for")
    parser.add_argument("--seed", type=int, default=0, help="base runs: seed for inputs and sampling "
                                                            "(a stage-2 run uses its own)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--branches", action="store_true",
                        help="base runs: print branch_calibration on --inputs held-out inputs instead of scoring")
    parser.add_argument("--departures", action="store_true",
                        help="base runs: print where --inputs held-out draws first leave every trace, instead of scoring")
    args = parser.parse_args(argv)
    if not 1 <= args.inputs <= 100_000:
        raise ValueError(f"--inputs must be between 1 and 100000, got {args.inputs}")
    path = os.path.join(args.run, "ckpt.pt")
    ckpt = load_checkpoint(path, vocab=VOCAB)
    if "latent" in (ckpt.get("train_config") or {}):
        if args.branches or args.departures:
            raise ValueError(f"--{'branches' if args.branches else 'departures'} reads a base run; this is a stage-2 run")
        return score_stage2_run(args.run, ckpt, args.inputs, args.device)
    task = get_task(ckpt["task"], **ckpt.get("task_options", {}))
    model = model_from_checkpoint(ckpt, path).to(pick_device(args.device))
    if args.branches:
        table = branch_calibration(model, task, heldout_inputs(task, args.inputs, args.seed))
        print(f"{'count':>6s} {'model p':>8s} {'true p':>7s}  the branch to ... of the strategies alive")
        for (alive, child), (count, model_p, true_p) in sorted(table.items(), key=lambda kv: -kv[1][0]):
            alive_text = "all" if len(alive) == len(task.strategies) else "+".join(alive)
            print(f"{count:6d} {model_p / count:8.3f} {true_p / count:7.3f}  {'+'.join(child)} ... of {alive_text}")
        return 0
    if args.departures:
        xs = heldout_inputs(task, args.inputs, args.seed)
        table = departures(task, xs, generate_ys(model, task, xs, seed=args.seed))
        print(f"{sum(table.values())} of {len(xs)} draws match no strategy; where they first leave every trace:")
        print(f"{'count':>6s}  {'step':>4s}  the strategies alive")
        for (alive, step), count in table.most_common():
            print(f"{count:6d}  {step:4d}  {'all' if len(alive) == len(task.strategies) else '+'.join(alive)}")
        return 0
    metrics = base_metrics(model, task, args.inputs, args.seed)
    probes = probe_grid(model, task, seed=args.seed)
    save_probe_snapshot(os.path.join(args.run, "probes.npz"), ckpt.get("step", 0), probes)  # refresh the last
    metrics["probe_first_position_95"] = first_decodable_position(probes["acc"])
    metrics["probe_chance"] = probes["chance"]
    write_json(os.path.join(args.run, "metrics.json"), metrics)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
