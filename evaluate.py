"""
Every metric and probe of the project, and a CLI that scores a checkpoint.

    python evaluate.py runs/grid/base            # writes runs/grid/base/metrics.json

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
Linear probes (Key Figure 1): a logistic probe per (layer, y-position) from the residual stream
to the strategy that wrote y, trained and scored on disjoint inputs; the shuffled-label probe
and the majority-class rate are the baselines.
"""

import itertools
import json
import os
import random
import sys
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from model import load_checkpoint, model_from_checkpoint, pad_batch, pick_device, run_main, token_log_probs
from tasks import EOS, PAD, VOCAB, decode, encode, get_task, prompt_tokens, record_tokens, sample_split_input

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
def record_log_probs(model, task, xs, ys, latent_tokens=None, batch_size=256):
    """log p_theta(y </y> <eos> | prompt) for each (x, y) by teacher forcing: a tensor (N,)."""
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
        out[rows] = (token_log_probs(model(idx), idx) * mask).sum(-1).cpu()
    return out


# ----------------------------------------------------------------------------------------------
# Metrics


def tv_distance(p, q):
    """Total variation 0.5 * sum_k |p_k - q_k| between two dicts of probabilities."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def strategy_credit(task, x, matched):
    """Split one generation among the strategies whose trace it equals, in proportion to p*."""
    if not matched:
        return {"none": 1.0}
    probs = task.strategy_probs(x)
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


def train_probes(features, labels, valid, n_classes, is_train, steps=300, lr=0.05, l2=1e-3):
    """
    One logistic probe per group, all trained at once: features (G, N, d), labels (N,), valid
    (G, N) marks usable samples, is_train (N,) the split. Features are standardised with training
    statistics. Returns test accuracy per group (G,), NaN where fewer than 10 test samples or
    fewer than two classes among them (late y-positions where only the longest strategy's traces
    are still running: accuracy there would be 1.0 and say nothing).
    """
    G, N, d = features.shape
    train_w = (valid & is_train[None]).float()  # (G, N)
    test_w = (valid & ~is_train[None]).float()
    denom = train_w.sum(1, keepdim=True).clamp(min=1)[..., None]
    mean = (features * train_w[..., None]).sum(1, keepdim=True) / denom
    std = (((features - mean) ** 2 * train_w[..., None]).sum(1, keepdim=True) / denom).sqrt() + 1e-5
    Xt = ((features - mean) / std).transpose(1, 2).contiguous()  # (G, d, N): logits come out (G, C, N)
    Wt = torch.zeros(G, n_classes, d, requires_grad=True)
    b = torch.zeros(G, n_classes, 1, requires_grad=True)
    opt = torch.optim.Adam([Wt, b], lr=lr)
    target = labels[None].expand(G, N)
    for _ in range(steps):
        logits = Wt @ Xt + b  # (G, C, N)
        nll = F.cross_entropy(logits, target, reduction="none")  # (G, N)
        loss = (nll * train_w).sum() / train_w.sum().clamp(min=1) + l2 * (Wt ** 2).sum() / G
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        correct = ((Wt @ Xt + b).argmax(1) == target).float()
        n_test = test_w.sum(1)
        acc = (correct * test_w).sum(1) / n_test.clamp(min=1)
        classes_present = ((F.one_hot(labels, n_classes).float()[None] * test_w[..., None]).sum(1) > 0).sum(1)
        acc[(n_test < 10) | (classes_present < 2)] = float("nan")
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
    acc = train_probes(groups, labels, group_valid, S, is_train).view(L1, P)
    # control: labels permuted across samples (train and test alike) carry no information
    shuffled = labels[torch.randperm(N, generator=torch.Generator().manual_seed(seed))]
    acc_shuffled = train_probes(groups, shuffled, group_valid, S, is_train).view(L1, P)
    chance = Counter(labels[~is_train].tolist()).most_common(1)[0][1] / int((~is_train).sum())
    return {"acc": acc, "acc_shuffled": acc_shuffled, "chance": chance,
            "n_train": int(is_train.sum()), "n_test": int((~is_train).sum())}


def split_by_input(task, xs, test_fraction):
    """A boolean train mask (N,) that puts every copy of an input on the same side."""
    keys = list(dict.fromkeys(tuple(task.input_tokens(x)) for x in xs))
    test_keys = set(keys[:max(1, int(len(keys) * test_fraction))])
    return torch.tensor([tuple(task.input_tokens(x)) not in test_keys for x in xs])


def save_probe_snapshot(path, step, probes):
    """Append one probe grid (L+1, P) to probes.npz (arrays padded to the widest grid)."""
    snaps = dict(np.load(path)) if os.path.exists(path) else {}
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
# Scoring a base model


def base_metrics(model, task, n_inputs=500, seed=0):
    """Every base-model metric on held-out inputs (temperature-1 generation, teacher forcing)."""
    xs = heldout_inputs(task, n_inputs, seed)
    ys = generate_ys(model, task, xs, temperature=1.0, seed=seed)
    metrics = generation_metrics(task, xs, ys)
    metrics["excess_nll"] = excess_nll(model, task, dgp_samples(task, xs, seed + 1))
    metrics["strategy_tv_per_input"] = strategy_tv_per_input(model, task, xs)
    return metrics


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="Score a run folder's checkpoint; writes metrics.json there.")
    parser.add_argument("run", help="a run folder holding ckpt.pt, e.g. runs/grid/base")
    parser.add_argument("--inputs", type=int, default=500, help="held-out inputs to generate for")
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs and sampling")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    path = os.path.join(args.run, "ckpt.pt")
    ckpt = load_checkpoint(path, vocab=VOCAB)
    if "latent" in ckpt.get("train_config", {}):
        raise ValueError(f"{path} is a stage-2 run: disentangle.py scores it into its metrics.json")
    task = get_task(ckpt["task"], **ckpt.get("task_options", {}))
    model = model_from_checkpoint(ckpt, path).to(pick_device(args.device))
    metrics = base_metrics(model, task, args.inputs, args.seed)
    probes = probe_grid(model, task, seed=args.seed)
    save_probe_snapshot(os.path.join(args.run, "probes.npz"), ckpt.get("step", 0), probes)  # refresh the last
    metrics["probe_first_position_95"] = first_decodable_position(probes["acc"])
    metrics["probe_chance"] = probes["chance"]
    with open(os.path.join(args.run, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
