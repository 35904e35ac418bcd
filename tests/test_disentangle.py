"""disentangle.py: the ELBO terms are exact, the auxiliary terms do what they say, a tiny run works."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch

import disentangle as D
from evaluate import record_log_probs
from model import GPT, GPTConfig, save_checkpoint, token_log_probs
from tasks import LATENT_TOKENS, STOI, VOCAB, get_task


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """An untrained tiny base model saved as runs/<task>/base/ckpt.pt would be."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(VOCAB), block_size=96, n_layer=1, n_head=2, n_embd=32))
    folder = tmp_path_factory.mktemp("base")
    save_checkpoint(str(folder / "ckpt.pt"), model, VOCAB, "grid_pathfinding", task_options={"mixture": "uniform"})
    return folder


def tiny_fact(tiny_base, latent="discrete", K=3):
    ckpt = torch.load(tiny_base / "ckpt.pt", weights_only=True)
    torch.manual_seed(0)
    return D.Factorization(ckpt, latent, K, 4, "tiny", n_codes=3), ckpt


def grid_pairs(n=6, seed=0):
    task, rng = get_task("grid"), random.Random(seed)
    return task, [(x, y) for x, _, y in (task.sample(rng) for _ in range(n))]


def test_exact_reconstruction_equals_a_loop_over_latents(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    task, pairs = grid_pairs()
    batch = D.make_batch(task, pairs, 3, "cpu")
    weights = batch["base_mask"].float()
    _, _, gen_logp_raw, gen_logp, *_ = D.discrete_pass(fact, batch, weights, batch["y_state_mask"])
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    for k in range(3):
        loop = record_log_probs(fact.lm, task, xs, ys, latent_tokens=[LATENT_TOKENS[k]] * len(xs))
        # the batched value counts y and </y> <eos>, like record_log_probs
        assert torch.allclose(gen_logp_raw[:, k], loop, atol=1e-4)
    assert torch.allclose(gen_logp, gen_logp_raw)


def test_shrinking_latent_noise_returns_the_latents_to_the_base_model(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    task, pairs = grid_pairs()
    batch = D.make_batch(task, pairs, 3, "cpu")
    emb, rows = fact.lm.tok_emb.weight, [STOI[t] for t in LATENT_TOKENS[:3]]
    offsets = (emb[rows] - emb[STOI["<z_empty>"]]).norm(dim=1)
    fact.shrink_latent_noise(0.5)
    assert torch.allclose((emb[rows] - emb[STOI["<z_empty>"]]).norm(dim=1), offsets / 2)
    fact.shrink_latent_noise(0.0)  # every <zk> is now <z_empty>: each latent's y-loss is the no-latent one
    assert D.init_loss_ratios(fact, fact.lm, batch, D.Config()) == pytest.approx([1.0] * 3, abs=1e-6)


def test_copy_latent_makes_the_generator_decode_alike_under_both(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    task, pairs = grid_pairs()
    batch = D.make_batch(task, pairs, 3, "cpu")
    gen_logp_raw = D.discrete_pass(fact, batch, batch["base_mask"].float(), batch["y_state_mask"])[2]  # (B, K)
    assert not torch.allclose(gen_logp_raw[:, 0], gen_logp_raw[:, 2])
    fact.copy_latent(0, 2)
    gen_logp_raw = D.discrete_pass(fact, batch, batch["base_mask"].float(), batch["y_state_mask"])[2]
    assert torch.allclose(gen_logp_raw[:, 0], gen_logp_raw[:, 2])
    assert not torch.allclose(gen_logp_raw[:, 0], gen_logp_raw[:, 1])


def test_elbo_bounds_the_exact_marginal_and_is_tight_at_the_exact_posterior():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(5, 4, generator=g), -1)  # router
    gen_logp = -10 * torch.rand(5, 4, generator=g)  # log p(y|x,k)
    exact = torch.logsumexp(log_p + gen_logp, -1)
    for _ in range(20):
        log_q = torch.log_softmax(torch.randn(5, 4, generator=g), -1)
        elbo = -(D.recon_loss(log_q.exp(), gen_logp) + D.categorical_kl(log_q, log_p))
        assert (elbo <= exact + 1e-5).all()
    log_post = torch.log_softmax(log_p + gen_logp, -1)
    elbo = -(D.recon_loss(log_post.exp(), gen_logp) + D.categorical_kl(log_post, log_p))
    assert torch.allclose(elbo, exact, atol=1e-5)


def test_auxiliary_terms_hand_checked():
    K = 4
    uniform = torch.full((2, K), -math.log(K))
    assert torch.allclose(D.posterior_entropy_loss(uniform), torch.full((2,), math.log(K)))
    assert torch.allclose(D.router_support_loss(torch.tensor([0.5])), torch.tensor([math.log(2)]))
    collapsed = torch.log(torch.tensor([[1.0, 1e-30, 1e-30, 1e-30]] * 3))  # every x on z1
    assert math.isclose(float(D.router_marginal_kl_loss(collapsed)), math.log(K), rel_tol=1e-5)
    assert float(D.router_marginal_kl_loss(uniform)) == pytest.approx(0.0, abs=1e-6)
    # two latents with disjoint one-hot next-token distributions: JSD = log 2 at each of the 2 targets
    logits = torch.full((2, 3, 5), -1e4)
    logits[0, :, 1] = 0
    logits[1, :, 2] = 0
    assert torch.allclose(D.jsd_loss(logits, torch.ones(1, 2), 2), torch.tensor([2 * math.log(2)]))
    # ... but 0 when the prefix posterior puts all weight on one latent: nothing to compare
    one_latent = torch.log(torch.tensor([1.0, 1e-30]))[None, :, None].expand(1, 2, 2)
    assert float(D.jsd_loss(logits, torch.ones(1, 2), 2, log_pi=one_latent)) == pytest.approx(0.0, abs=1e-6)
    # prefix posterior: router 1/2 each; latent 0 wrote y_0 with prob 1, latent 1 with prob 1/4
    tok = torch.log(torch.tensor([[[1.0, 0.5], [0.25, 0.5]]]))  # (B=1, K=2, T-1=2)
    log_pi = D.prefix_posterior(torch.log(torch.tensor([[0.5, 0.5]])), tok, torch.ones(1, 2))
    assert torch.allclose(log_pi.exp()[0, :, 0], torch.tensor([0.5, 0.5]))  # nothing written yet
    assert torch.allclose(log_pi.exp()[0, :, 1], torch.tensor([0.8, 0.2]))  # 1 : 1/4
    # Gaussian KL in closed form against a sampled estimate
    mu_q, lv_q, mu_p, lv_p = torch.tensor([[0.5, -1.0]]), torch.tensor([[-0.5, 0.3]]), torch.tensor([[0.0, 0.2]]), \
        torch.tensor([[0.1, -0.4]])
    z = mu_q + (0.5 * lv_q).exp() * torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    log_n = lambda z, m, lv: (-0.5 * (lv + math.log(2 * math.pi) + (z - m) ** 2 / lv.exp())).sum(-1)
    assert float(D.gaussian_kl(mu_q, lv_q, mu_p, lv_p)) == pytest.approx(
        float((log_n(z, mu_q, lv_q) - log_n(z, mu_p, lv_p)).mean()), abs=0.01)
    assert float(D.gaussian_marginal_kl_loss(torch.zeros(8, 3), torch.zeros(8, 3))) == pytest.approx(0.0)


def test_entropy_pooling_weights_the_tokens_where_the_base_model_chose():
    # record <bos> a b c with y = (b, c): targets 1, 2 are y; the base model's entropy share is
    # 2 when it chose b and 0 when it chose c (c was determined)
    batch = {"y_state_mask": torch.tensor([[False, False, True, True]]),
             "base_mask": torch.tensor([[False, True, True]])}
    share = torch.tensor([[0.0, 2.0, 0.0]])
    assert D.pool_weights(batch, share, "mean").tolist() == [[0.0, 0.0, 1.0, 1.0]]
    # the state reading b (position 2) gets (1 + 2) / 2, the state reading c (1 + 0) / 2
    assert D.pool_weights(batch, share, "entropy").tolist() == [[0.0, 0.0, 1.5, 0.5]]


def test_beta_schedules():
    cfg = D.Config(beta=2.0, beta_warmup=10)
    cfg.beta_schedule = "linear"
    assert [D.beta_at(s, cfg) for s in (0, 5, 10, 20)] == [0.0, 1.0, 2.0, 2.0]
    cfg.beta_schedule = "cyclical"
    assert [D.beta_at(s, cfg) for s in (0, 2, 5, 9, 10)] == [0.0, 0.8, 2.0, 2.0, 0.0]


def test_posterior_entropy_flag_lowers_posterior_entropy(tiny_base):
    fact, ckpt = tiny_fact(tiny_base)
    base = D.model_from_checkpoint(ckpt).eval()
    task, pairs = grid_pairs(8)
    batch = D.make_batch(task, pairs, 3, "cpu")
    cfg = D.Config(posterior_entropy=5.0, beta=0.0)

    def entropy():
        with torch.no_grad():
            log_q = D.discrete_pass(fact, batch, batch["base_mask"].float(), batch["y_state_mask"])[-1]
        return float(D.posterior_entropy_loss(log_q).mean())

    before = entropy()
    opt = torch.optim.Adam(fact.parameters(), lr=3e-3)
    for _ in range(5):
        loss, _ = D.objective(fact, base, batch, cfg, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert entropy() < before - 0.05


def test_reparameterised_recon_matches_a_per_sample_loop(tiny_base):
    fact, _ = tiny_fact(tiny_base, latent="continuous")
    with torch.no_grad():  # make z matter: a non-zero E(z) and a posterior that depends on y
        fact.lm.latent_proj.weight.normal_(std=1.0)
        fact.post_head.weight.normal_(std=1.0)
    task, pairs = grid_pairs()
    batch = D.make_batch(task, pairs, 0, "cpu")
    S = 16
    torch.manual_seed(1)
    with torch.no_grad():
        gen_logp_raw, _, mu_q, logvar_q, _, _ = D.continuous_pass(fact, batch, batch["base_mask"].float(), batch["y_state_mask"], S)
    torch.manual_seed(1)
    eps = torch.randn(len(pairs), S, mu_q.shape[-1])  # the same noise, one sample at a time
    per_sample = []
    with torch.no_grad():
        for s in range(S):
            z = mu_q + (0.5 * logvar_q).exp() * eps[:, s]
            logits = fact.lm(batch["base_idx"], latent=z, latent_pos=batch["slot_pos"])
            per_sample.append((D.token_log_probs(logits, batch["base_idx"]) * batch["base_mask"]).sum(-1))
    per_sample = torch.stack(per_sample, 1)  # (B, S)
    assert per_sample.std(1).min() > 1e-3  # z really changes log p(y|x,z)
    assert torch.allclose(gen_logp_raw, per_sample.mean(1), atol=1e-4)


def test_posterior_variance_flag_lowers_posterior_variance(tiny_base):
    fact, ckpt = tiny_fact(tiny_base, latent="continuous")
    base = D.model_from_checkpoint(ckpt).eval()
    task, pairs = grid_pairs(8)
    batch = D.make_batch(task, pairs, 0, "cpu")
    cfg = D.Config(latent="continuous", posterior_variance=5.0, beta=0.0, samples=2)

    def variance():
        with torch.no_grad():
            _, logvar = fact.posterior_params(batch["base_idx"], batch["y_state_mask"]).chunk(2, -1)
        return float(logvar.exp().mean())

    before = variance()
    opt = torch.optim.Adam(fact.parameters(), lr=3e-3)
    for _ in range(5):
        loss, _ = D.objective(fact, base, batch, cfg, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert variance() < 0.9 * before


def test_jsd_flag_separates_latents(tiny_base):
    """Five steps with the JSD term end with more divergent latents than five steps without it."""
    task, pairs = grid_pairs(8)
    batch = D.make_batch(task, pairs, 3, "cpu")

    def train(weight):
        fact, ckpt = tiny_fact(tiny_base)
        base = D.model_from_checkpoint(ckpt).eval()
        with torch.no_grad():  # JSD is flat where the latents agree exactly: start them apart
            fact.lm.tok_emb.weight[[D.STOI[t] for t in LATENT_TOKENS[:3]]] += \
                0.5 * torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
        opt = torch.optim.Adam(fact.parameters(), lr=3e-3)
        for _ in range(5):
            loss, _ = D.objective(fact, base, batch, D.Config(jsd=weight, beta=0.0), 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(D.jsd_loss(fact.lm(batch["gen_idx"]), batch["base_mask"].float(), 3).mean())

    assert train(100.0) > 4 * train(0.0)


def test_choose_split_finds_the_latent_that_mixes_strategies():
    twins = [[1, 0.0, 0.02], [0.0, 1, 0.95], [0.02, 0.95, 1]]  # z2 and z3 decode alike, z1 differently
    assert D.choose_split(twins, [0.25, 0.38, 0.37]) == (1, 2, (1, 2))  # mixed twins: two strategies' mass
    assert D.choose_split(twins, [0.69, 0.20, 0.11]) == (0, 2, (0,))  # pure twins: z1 holds two, z3 is lighter
    assert D.choose_split([[1, 0.0, 0.1], [0.0, 1, 0.3], [0.1, 0.3, 1]], [0.3, 0.4, 0.3]) is None  # no twins
    assert D.choose_split([[1, 0.9, 0.8], [0.9, 1, 0.95], [0.8, 0.95, 1]], [0.3, 0.4, 0.3]) is None  # all alike
    four = [[1, 0.9, 0, 0], [0.9, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert D.choose_split(four, [0.3, 0.3, 0.2, 0.2]) == (0, 1, (0, 1))
    assert D.choose_split(four, [0.1, 0.2, 0.5, 0.2]) == (2, 0, (2,))
    near = [[1, 0.6, 0.65, 0.6], [0.6, 1, 0.6, 0.6], [0.65, 0.6, 1, 0.95], [0.6, 0.6, 0.95, 1]]
    assert D.choose_split(near, [0.4, 0.3, 0.2, 0.1]) == (0, 3, (0,))  # apart by the margin, not below 0.5
    assert D.choose_split([[1, 0.0, 0.0], [0.0, 1, 0.3], [0.0, 0.3, 1]], [0.61, 0.01, 0.38]) == (0, 1, (0,))  # dead z2


def test_split_posterior_sends_two_clusters_to_two_latents(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(32, generator=g), dim=0)
    side = torch.tensor([1.0, -1.0]).repeat(50)  # (100,) two clusters along `direction`
    features = 0.3 * torch.randn(100, 32, generator=g) + 3 * side[:, None] * direction + 1.0
    for start_from in [(0, 2), (1,)]:  # the two latents' own mass, or another latent's
        with torch.no_grad():
            held = fact.post_head(features)[:, list(start_from)].mean(1)  # (100,)
        fact.split_posterior(0, 2, features, torch.ones(100), start_from=start_from, margin=1.0)
        with torch.no_grad():
            logits = fact.post_head(features)
        gap = logits[:, 0] - logits[:, 2]
        assert ((gap > 0) == (side > 0)).all() or ((gap > 0) == (side < 0)).all()
        assert float(gap.std(unbiased=False)) == pytest.approx(2.0, rel=1e-3)  # 2 margin at one std
        assert torch.allclose((logits[:, 0] + logits[:, 2]) / 2, held, atol=1e-5)  # centred where they were


def test_split_posterior_leaves_other_latents_pairs_alone(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    g = torch.Generator().manual_seed(0)
    direction, away = torch.nn.functional.normalize(torch.randn(2, 32, generator=g), dim=1)
    away = torch.nn.functional.normalize(away - (away @ direction) * direction, dim=0)
    side = torch.tensor([1.0, -1.0]).repeat(50)  # (100,) the cluster to split, two halves
    cluster = 0.3 * torch.randn(100, 32, generator=g) + 3 * side[:, None] * direction
    other = 0.3 * torch.randn(50, 32, generator=g) + 12 * away + 6 * direction  # held by another latent
    features = torch.cat([cluster, other])  # (150, d)
    fact.split_posterior(0, 2, features, torch.cat([torch.ones(100), torch.zeros(50)]), start_from=(0,))
    with torch.no_grad():
        gap = fact.post_head(features)[:, 0] - fact.post_head(features)[:, 2]
    assert ((gap[:100] > 0) == (side > 0)).all() or ((gap[:100] > 0) == (side < 0)).all()
    assert float(gap[100:].abs().mean()) < 0.5 < float(gap[:100].abs().mean())  # the other pairs stay centred


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    points = torch.cat([c + 0.5 * torch.randn(40, 2, generator=g) for c in centres])  # (120, 2)
    found = D.kmeans(points, 3, torch.Generator().manual_seed(0))
    nearest = torch.cdist(centres, found).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2]  # one centroid per cluster
    assert torch.allclose(found[nearest], centres, atol=0.3)


def test_posterior_from_centroids_is_a_gaussian_mixture(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    g = torch.Generator().manual_seed(0)
    features, mean = torch.randn(20, 32, generator=g), torch.randn(32, generator=g)
    whiten, centroids = torch.randn(32, 5, generator=g), torch.randn(3, 5, generator=g)
    z = (features - mean) @ whiten  # (20, 5)
    for temperature in (1.0, 4.0):
        fact.posterior_from_centroids(centroids, whiten, mean, temperature)
        with torch.no_grad():
            logits = fact.post_head(features)  # (20, 3)
        expected = -0.5 * torch.cdist(z, centroids) ** 2 / temperature
        gaps = logits - logits[:, :1]  # the posterior sees logits up to a shared term
        assert torch.allclose(gaps, expected - expected[:, :1], atol=1e-3)


def test_cluster_posterior_starts_confident_but_not_saturated(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    cfg = D.Config(data="dgp", cluster_init=4)
    shares = D.cluster_posterior(fact, None, get_task("grid"), cfg)
    assert sum(shares) == pytest.approx(1.0) and len(shares) == 3
    pairs = D.training_pairs(get_task("grid"), None, D.replace(cfg, batch_size=D.CLUSTER_PAIRS), -1_000_000, "cpu")
    q = D.posterior_of(fact, None, get_task("grid"), pairs, "mean")  # (N, K), the clustered pairs
    assert float(q.max(1).values.mean()) == pytest.approx(D.CLUSTER_CONFIDENCE, abs=1e-3)
    assert torch.bincount(q.argmax(1), minlength=3).div(len(q)).tolist() == pytest.approx(shares)


def test_simplex_vertices_are_equidistant_and_centred():
    for n in (2, 3, 5):
        corners = D.simplex_vertices(n)  # (n, n-1)
        assert corners.shape == (n, n - 1)
        assert torch.allclose(torch.cdist(corners, corners), 1 - torch.eye(n), atol=1e-5)
        assert torch.allclose(corners.mean(0), torch.zeros(n - 1), atol=1e-6)


def test_nearest_centroid_rate_hand_checked():
    task = get_task("grid")  # strategies: right-first, down-first, alternating
    mu = torch.tensor([[0.0, 0.0], [0.2, 0.0], [4.0, 0.0], [0.0, 4.0]])  # (4, 2) posterior means
    labels = torch.tensor([0, 0, 1, 2])  # centroids (0.1, 0), (4, 0), (0, 4)
    z = torch.tensor([[0.0, 0.5], [3.0, 0.0], [1.0, 3.0], [2.2, 2.0]])  # nearest: 0, 1, 2, 1
    decoded = [frozenset({"right-first"}), frozenset({"down-first"}), frozenset({"right-first"}),
               frozenset({"down-first", "alternating"})]  # hit, hit, wrong strategy, ambiguous
    assert D.nearest_centroid_rate(task, z, decoded, mu, labels) == 0.5


def test_continuous_cluster_posterior_gives_each_cluster_a_corner(tiny_base):
    fact, _ = tiny_fact(tiny_base, "continuous", K=0)
    cfg = D.Config(data="dgp", latent="continuous", cluster_init=4, dz=4)
    shares = D.cluster_posterior(fact, None, get_task("grid"), cfg)
    assert sum(shares) == pytest.approx(1.0) and len(shares) == 3  # one cluster per strategy
    pairs = D.training_pairs(get_task("grid"), None, D.replace(cfg, batch_size=D.CLUSTER_PAIRS), -1_000_000, "cpu")
    mu, logvar = D.posterior_of(fact, None, get_task("grid"), pairs, "mean")  # (N, dz) each
    std = (0.5 * logvar).exp()
    assert torch.allclose(std[:, :2], torch.full_like(std[:, :2], D.CLUSTER_STD))  # the simplex's plane
    assert torch.allclose(std[:, 2:], torch.ones_like(std[:, 2:])) and mu[:, 2:].abs().max() == 0  # the prior
    assert torch.allclose(mu[:, :2].mean(0), torch.zeros(2), atol=1e-4)  # centred like the corners
    corners = D.CLUSTER_SPACING * D.simplex_vertices(3)  # (3, 2)
    corners = corners - torch.tensor(shares) @ corners  # centred on the pairs, as the fit's targets were
    nearest = torch.cdist(mu[:, :2], corners).argmin(1)  # each pair lands nearest its cluster's corner
    assert torch.bincount(nearest, minlength=3).div(len(mu)).tolist() == pytest.approx(shares, abs=0.05)


def test_latent_log_likelihoods_equal_one_pair_and_one_latent_at_a_time(tiny_base):
    task, pairs = grid_pairs(3)
    z = torch.randn(2, 4)  # (C, dz)
    for latent in ("discrete", "continuous"):
        fact, _ = tiny_fact(tiny_base, latent)
        table = D.latent_log_likelihoods(fact, task, pairs, None if latent == "discrete" else z, batch_pairs=2)
        assert table.shape == (3, 3 if latent == "discrete" else 2)
        for i, (x, y) in enumerate(pairs):
            for c in range(table.shape[1]):
                if latent == "discrete":
                    expected = record_log_probs(fact.lm, task, [x], [y], [LATENT_TOKENS[c]])[0]
                else:
                    batch = D.make_batch(task, [(x, y)], 0, "cpu")
                    logits = fact.lm(batch["base_idx"], latent=z[c:c + 1], latent_pos=batch["slot_pos"])
                    expected = (token_log_probs(logits, batch["base_idx"]) * batch["base_mask"]).sum()
                assert table[i, c].item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("latent", ["discrete", "continuous"])
def test_tiny_end_to_end_run(tiny_base, tmp_path, latent):
    out = tmp_path / latent
    args = ["--task", "grid", "--latent", latent, "--base", str(tiny_base), "--out", str(out), "--data", "dgp",
            "--steps", "4", "--batch-size", "4", "--eval-interval", "2", "--eval-inputs", "12", "--dz", "4",
            "--samples", "2", "--device", "cpu", "--token-weighted", "--normalized-recon", "--jsd", "0.1",
            "--posterior-entropy", "0.1", "--router-support", "0.1", "--router-marginal-kl", "0.1",
            "--posterior-variance", "0.1", "--free-bits", "0.1", "--beta-schedule", "linear",
            "--posterior-pool", "entropy", "--split-twins", "2"]
    args += ["--cluster-init", "4", "--cluster-hold", "2", "--reassign", "2"]
    assert D.main(args) == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    ratios = log[0]["init/y_loss_ratio"]
    assert all(abs(r - 1) < 0.05 for r in ratios)  # starts where the base model is
    assert any("loss/total" in r for r in log)
    assert any("split/agreement" in r for r in log) == (latent == "discrete")  # the twin check ran
    assert any("init/cluster_shares" in r for r in log)
    assert any("reassign/moved" in r for r in log)
    metrics = json.load(open(out / "metrics.json"))
    key = "alignment_one_to_one" if latent == "discrete" else "sampled_z_probe_acc"
    assert key in metrics
    # rescoring the finished run on the same inputs gives the same numbers
    assert D.main(["--score", str(out), "--eval-inputs", "12", "--device", "cpu"]) == 0
    rescored = json.load(open(out / "metrics_12.json"))
    assert rescored["step"] == 4
    assert {k: v for k, v in rescored.items() if k in metrics} == {k: v for k, v in metrics.items() if k != "train_seconds"}


@pytest.mark.parametrize("args, message", [
    (["--latent", "continuous", "--cluster-init", "8", "--dz", "1"], "--dz must be at least 2, got 1"),
    (["--cluster-init", "33"], "--cluster-init must be at most the model width 32"),
    (["--split-twins", "-1"], "--split-twins must be >= 0"),
    (["--reassign", "100"], "--reassign needs --cluster-init"),
    (["--score", "/nonexistent/run"], "no checkpoint there"),
])
def test_user_errors_are_one_clear_line(tiny_base, tmp_path, args, message):
    command = [sys.executable, "disentangle.py", "--base", str(tiny_base), "--out", str(tmp_path / "run"), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
