"""disentangle.py: the ELBO terms are exact, the auxiliary terms do what they say, a tiny run works
and resumes exactly, the defaults are the recipe."""

import json
import math
import random
import zlib
from dataclasses import replace

import pytest
import torch

import disentangle as D
import evaluate
from evaluate import record_log_probs
from model import GPT, Factorization, GPTConfig, parse_config, run_main, save_checkpoint, token_log_probs
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
    ids = [STOI[t] for t in LATENT_TOKENS[:K]] if latent == "discrete" else []
    return Factorization(ckpt, "tiny", latent, ids, STOI["<z_empty>"], 4, D.cluster_codes(3, 4)), ckpt


def grid_pairs(n=6, seed=0):
    task, rng = get_task("grid"), random.Random(seed)
    return task, [(x, y) for x, _, y in (task.sample(rng) for _ in range(n))]


# ----------------------------------------------------------------------------------------------
# The terms of the objective


def test_exact_reconstruction_equals_a_loop_over_latents(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    task, pairs = grid_pairs()
    p = D.discrete_pass(fact, D.make_batch(task, pairs, 3, "cpu"))
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    for k in range(3):
        loop = record_log_probs(fact.lm, task, xs, ys, latent_tokens=[LATENT_TOKENS[k]] * len(xs))
        # the batched value counts y and </y> <eos>, like record_log_probs
        assert torch.allclose(p.token_logp[:, k].sum(-1), loop, atol=1e-4)


def test_the_hard_em_pass_trains_the_assigned_latent_as_the_full_pass_with_its_one_hot_would(tiny_base):
    """Same loss and same gradients as a backward through all K latents weighted by the assignment."""
    fact, _ = tiny_fact(tiny_base)
    task, pairs = grid_pairs()
    batch, weights = D.make_batch(task, pairs, 3, "cpu"), torch.rand(len(pairs), 1) + 0.5

    def loss_and_grads(e_step):
        fact.zero_grad(set_to_none=True)
        p = D.discrete_pass(fact, batch, e_step=e_step)
        if e_step is None:  # the full pass, R weighted by the assignment the hard pass made
            p.recon_q = assigned
        loss = D.discrete_recon_loss(p.recon_q, p.recon_token_logp, weights).mean() + p.router_logp.logsumexp(-1).mean()
        loss.backward()
        return loss.item(), p, {n: w.grad.clone() for n, w in fact.named_parameters() if w.grad is not None}

    seen = []

    def e_step(token_logp, posterior_logq):
        seen.append(token_logp.requires_grad)
        return torch.eye(3)[torch.arange(len(pairs)) % 3]  # every latent assigned some pairs

    hard_loss, hard, hard_grads = loss_and_grads(e_step)
    assigned = hard.recon_q
    full_loss, full, full_grads = loss_and_grads(None)
    assert seen == [False] and hard.gen_logits is None  # the evidence carries no gradient
    assert hard_loss == pytest.approx(full_loss, abs=1e-5)
    assert torch.allclose(hard.router_logp, full.router_logp, atol=1e-5)
    assert torch.equal((hard.recon_token_logp != 0).any(-1), assigned.bool())  # the assigned latent's column only
    assert hard_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        assert torch.allclose(hard_grads[name], grad, atol=1e-5), name


def test_shrinking_latent_noise_returns_the_latents_to_the_base_model(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    task, pairs = grid_pairs()
    emb, rows = fact.lm.tok_emb.weight, [STOI[t] for t in LATENT_TOKENS[:3]]
    offsets = (emb[rows] - emb[STOI["<z_empty>"]]).norm(dim=1)
    assert evaluate.latent_loss_ratios(fact, fact.lm, task, pairs) != pytest.approx([1.0] * 3, abs=1e-6)
    fact.shrink_latent_noise(0.5)
    assert torch.allclose((emb[rows] - emb[STOI["<z_empty>"]]).norm(dim=1), offsets / 2)
    fact.shrink_latent_noise(0.0)  # every <zk> is now <z_empty>: each latent's y-loss is the no-latent one
    assert evaluate.latent_loss_ratios(fact, fact.lm, task, pairs) == pytest.approx([1.0] * 3, abs=1e-6)


def test_elbo_bounds_the_exact_marginal_and_is_tight_at_the_exact_posterior():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(5, 4, generator=g), -1)  # router
    token_logp = -5 * torch.rand(5, 4, 2, generator=g)  # (B, K, T-1): log p(y|x,k) over 2 tokens
    ones = torch.ones(5, 2)
    exact = torch.logsumexp(log_p + token_logp.sum(-1), -1)
    for _ in range(20):
        log_q = torch.log_softmax(torch.randn(5, 4, generator=g), -1)
        elbo = -(D.discrete_recon_loss(log_q.exp(), token_logp, ones) + D.categorical_kl(log_q, log_p))
        assert (elbo < exact - 1e-4).all()  # strictly below, away from the exact posterior
    log_post = torch.log_softmax(log_p + token_logp.sum(-1), -1)
    elbo = -(D.discrete_recon_loss(log_post.exp(), token_logp, ones) + D.categorical_kl(log_post, log_p))
    assert torch.allclose(elbo, exact, atol=1e-5)


def test_token_weights_have_mean_one_on_y_and_lean_on_decisions():
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])
    entropy = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0]])  # the base model's entropy at each target
    share = entropy / (entropy.sum(1, keepdim=True) / mask.sum(1, keepdim=True))  # H_t / mean_t H
    recon_w, jsd_w = D.token_weights(mask, share, token_weighted=True)
    assert recon_w.tolist() == [[0.0, 2.0, 0.5, 1.0, 0.5]]  # (1 + H_t / mean H) / 2
    assert float(recon_w.sum() / mask.sum()) == pytest.approx(1.0)
    assert jsd_w.tolist() == [[0.0, 3.0, 0.0, 1.0, 0.0]]
    assert D.token_weights(mask, share, token_weighted=False)[0].tolist() == mask.tolist()


def test_discrete_auxiliary_terms_hand_checked():
    K = 4
    uniform = torch.full((2, K), -math.log(K))
    assert torch.allclose(D.posterior_entropy_loss(uniform), torch.full((2,), math.log(K)))
    assert torch.allclose(D.router_support_loss(torch.tensor([0.5])), torch.tensor([math.log(2)]))
    collapsed = torch.log(torch.tensor([[1.0, 1e-30, 1e-30, 1e-30]] * 3))  # every x on z1
    assert math.isclose(float(D.router_marginal_kl_loss(collapsed)), math.log(K), rel_tol=1e-5)
    assert float(D.router_marginal_kl_loss(uniform)) == pytest.approx(0.0, abs=1e-6)
    # two inputs on opposite latents of K = 2: the batch mean is uniform, so no marginal KL
    opposite = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    assert float(D.router_marginal_kl_loss(opposite)) == pytest.approx(0.0, abs=1e-6)
    # prefix posterior: router 1/2 each; latent 0 wrote y_0 with prob 1, latent 1 with prob 1/4
    tok = torch.log(torch.tensor([[[1.0, 0.5], [0.25, 0.5]]]))  # (B=1, K=2, T-1=2)
    log_pi = D.prefix_posterior(torch.log(torch.tensor([[0.5, 0.5]])), tok, torch.ones(1, 2))
    assert torch.allclose(log_pi.exp()[0, :, 0], torch.tensor([0.5, 0.5]))  # nothing written yet
    assert torch.allclose(log_pi.exp()[0, :, 1], torch.tensor([0.8, 0.2]))  # 1 : 1/4


def test_jsd_hand_checked_with_support_and_prefix_weights():
    # two latents with disjoint one-hot next-token distributions: JSD = log 2 at each of the 2 targets
    logits = torch.full((2, 3, 5), -1e4)
    logits[0, :, 1] = 0
    logits[1, :, 2] = 0
    assert torch.allclose(D.jsd_loss(logits, torch.ones(1, 2), 2), torch.tensor([2 * math.log(2)]))
    # ... but 0 when the prefix posterior puts all weight on one latent: nothing to compare
    one_latent = torch.log(torch.tensor([1.0, 1e-30]))[None, :, None].expand(1, 2, 2)
    assert float(D.jsd_loss(logits, torch.ones(1, 2), 2, log_pi=one_latent)) == pytest.approx(0.0, abs=1e-6)
    # support renormalisation: latent 0 puts 1/2 on token 0 (outside the base model's support)
    # and 1/2 on token 1, latent 1 all on token 1. On the support {1, 2} both are one-hot on
    # token 1, so the JSD is 0; without the support it is H(3/4, 1/4) - H(1/2, 1/2) / 2.
    logits = torch.full((2, 2, 5), -1e4)
    logits[0, :, 0] = logits[0, :, 1] = 0
    logits[1, :, 1] = 0
    support = torch.zeros(1, 1, 5, dtype=torch.bool)
    support[..., 1:3] = True
    h = lambda *p: -sum(x * math.log(x) for x in p)
    assert float(D.jsd_loss(logits, torch.ones(1, 1), 2)) == pytest.approx(h(0.75, 0.25) - h(0.5, 0.5) / 2, abs=1e-5)
    assert float(D.jsd_loss(logits, torch.ones(1, 1), 2, support=support)) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_terms_against_closed_forms_and_samples():
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q, mu_p, lv_p = torch.tensor([[0.5, -1.0]]), torch.tensor([[-0.5, 0.3]]), torch.tensor([[0.0, 0.2]]), \
        torch.tensor([[0.1, -0.4]])
    z = mu_q + (0.5 * lv_q).exp() * torch.randn(200_000, 2, generator=g)
    log_n = lambda z, m, lv: (-0.5 * (lv + math.log(2 * math.pi) + (z - m) ** 2 / lv.exp())).sum(-1)
    assert float(D.gaussian_kl(mu_q, lv_q, mu_p, lv_p).sum()) == pytest.approx(
        float((log_n(z, mu_q, lv_q) - log_n(z, mu_p, lv_p)).mean()), abs=0.01)
    # router marginal KL, routers spread apart (var mu > 0): the batch moments are m = (1, 0) and
    # v = mean sigma^2 + var mu = (0.5 + 4, 2 + 0) per dimension, against N(0, I)
    mu = torch.tensor([[3.0, 0.0], [-1.0, 0.0]])
    logvar = torch.log(torch.tensor([[0.5, 2.0], [0.5, 2.0]]))
    m, v = torch.tensor([1.0, 0.0]), torch.tensor([4.5, 2.0])
    expected = 0.5 * (v + m ** 2 - 1 - v.log()).sum()
    assert float(D.gaussian_marginal_kl_loss(mu, logvar)) == pytest.approx(float(expected), rel=1e-6)
    assert float(D.gaussian_marginal_kl_loss(torch.zeros(8, 3), torch.zeros(8, 3))) == pytest.approx(0.0)
    assert D.posterior_variance_loss(logvar).tolist() == pytest.approx([1.25, 1.25])


def test_mixture_kl_with_one_component_is_the_gaussian_kl_in_expectation():
    g = torch.Generator().manual_seed(0)
    mu_q, lv_q = torch.tensor([[0.5, -1.0], [0.0, 2.0]]), torch.tensor([[-0.5, 0.3], [0.2, -1.0]])
    mu_p, lv_p = torch.tensor([[[0.0, 0.2]], [[1.0, 1.0]]]), torch.tensor([[[0.1, -0.4]], [[0.0, 0.5]]])  # (B, 1, dz)
    z = mu_q[:, None] + (0.5 * lv_q[:, None]).exp() * torch.randn(2, 100_000, 2, generator=g)  # (B, S, dz)
    estimate = D.mixture_kl(z, mu_q, lv_q, torch.zeros(2, 1), mu_p, lv_p)
    closed = D.gaussian_kl(mu_q, lv_q, mu_p[:, 0], lv_p[:, 0]).sum(-1)
    assert estimate.tolist() == pytest.approx(closed.tolist(), abs=0.02)


def test_mixture_kl_against_numerical_integration_and_its_gradients():
    """dz = 1, two components: KL(q || p) = int q log q/p dz on a fine grid."""
    mu_q, lv_q = torch.tensor([[0.3]]), torch.tensor([[math.log(0.25)]])
    log_pi = torch.log(torch.tensor([[0.3, 0.7]]))
    mu_p, lv_p = torch.tensor([[[-1.0], [1.5]]]), torch.tensor([[[0.0], [math.log(0.5)]]])  # (1, 2, 1)
    grid = torch.linspace(-8, 8, 160_001, dtype=torch.float64)
    n = lambda z, m, lv: torch.exp(-0.5 * (math.log(2 * math.pi) + lv + (z - m) ** 2 / math.exp(lv)))
    q = n(grid, 0.3, math.log(0.25))
    p = 0.3 * n(grid, -1.0, 0.0) + 0.7 * n(grid, 1.5, math.log(0.5))
    exact = float(torch.trapezoid(q * (q.log() - p.log()), grid))
    mu_q.requires_grad_(True)
    mu_p.requires_grad_(True)
    eps = torch.randn(1, 200_000, 1, generator=torch.Generator().manual_seed(0))
    z = mu_q[:, None] + (0.5 * lv_q[:, None]).exp() * eps
    estimate = D.mixture_kl(z, mu_q, lv_q, log_pi, mu_p, lv_p)
    assert estimate.item() == pytest.approx(exact, abs=0.01)
    estimate.sum().backward()
    assert mu_q.grad.abs().sum() > 0 and mu_p.grad.abs().sum() > 0  # it trains router and posterior alike


def test_mixture_router_starts_uniform_with_components_at_the_codes(tiny_base):
    ckpt = torch.load(tiny_base / "ckpt.pt", weights_only=True)
    codes = D.cluster_codes(3, 4)
    fact = Factorization(ckpt, "tiny", "continuous", [], STOI["<z_empty>"], 4, codes, router="mixture", components=3)
    log_pi, mu, logvar = fact.router_params(torch.randn(5, 32))
    assert log_pi.shape == (5, 3) and mu.shape == (5, 3, 4) and logvar.shape == (5, 3, 4)
    assert torch.allclose(log_pi.exp(), torch.full((5, 3), 1 / 3))
    assert torch.allclose(mu, codes.expand(5, -1, -1)) and torch.allclose(logvar, torch.zeros(5, 3, 4))
    gaussian, _ = tiny_fact(tiny_base, "continuous")
    log_pi, mu, logvar = gaussian.router_params(torch.randn(5, 32))
    assert log_pi.tolist() == [[0.0]] * 5 and mu.shape == (5, 1, 4)


def test_free_bits_floor_the_batch_kl_and_stop_its_gradient():
    kl = torch.tensor([0.1, 0.3], requires_grad=True)  # mean 0.2
    assert D.free_bits_kl(kl, 0.0).item() == pytest.approx(0.2)
    floored = D.free_bits_kl(kl, 0.5)
    assert floored.item() == pytest.approx(0.5)
    floored.backward()
    assert kl.grad.abs().sum() == 0  # below the floor the KL exerts no pull
    assert float(D.free_bits_kl(torch.tensor([0.8, 1.0]), 0.5)) == pytest.approx(0.9)


def test_normalized_recon_divides_by_the_base_loss():
    assert D.normalized_recon(torch.tensor([2.0, 3.0]), torch.tensor([4.0, 3.0])).tolist() == [0.5, 1.0]


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
        p = D.continuous_pass(fact, batch, S)
    torch.manual_seed(1)
    eps = torch.randn(len(pairs), S, p.posterior_mu.shape[-1])  # the same noise, one sample at a time
    per_sample = []
    with torch.no_grad():
        for s in range(S):
            z = p.posterior_mu + (0.5 * p.posterior_logvar).exp() * eps[:, s]
            logits = fact.lm(batch["base_idx"], latent=z, latent_pos=batch["slot_pos"])
            per_sample.append((D.token_log_probs(logits, batch["base_idx"]) * batch["base_mask"]).sum(-1))
    per_sample = torch.stack(per_sample, 1)  # (B, S)
    assert per_sample.std(1).min() > 1e-3  # z really changes log p(y|x,z)
    recon = D.continuous_recon_loss(p.token_logp, batch["base_mask"].float())
    assert torch.allclose(recon, -per_sample.mean(1), atol=1e-4)


def train_a_few_steps(fact, base, batch, cfg, steps=5):
    opt = torch.optim.Adam(fact.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = D.objective(fact, base, batch, cfg).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_posterior_entropy_flag_lowers_posterior_entropy(tiny_base):
    task, pairs = grid_pairs(8)
    batch = D.make_batch(task, pairs, 3, "cpu")

    def entropy_after(weight):
        fact, ckpt = tiny_fact(tiny_base)
        train_a_few_steps(fact, D.model_from_checkpoint(ckpt).eval(), batch, D.Config(posterior_entropy=weight, beta=0))
        with torch.no_grad():
            return float(D.posterior_entropy_loss(D.discrete_pass(fact, batch).posterior_logq).mean())

    assert entropy_after(5.0) < entropy_after(0.0) - 0.05


def test_posterior_variance_flag_lowers_posterior_variance(tiny_base):
    task, pairs = grid_pairs(8)
    batch = D.make_batch(task, pairs, 0, "cpu")

    def variance_after(weight):
        fact, ckpt = tiny_fact(tiny_base, latent="continuous")
        torch.manual_seed(0)
        cfg = D.Config(latent="continuous", posterior_variance=weight, beta=0.0, samples=2)
        train_a_few_steps(fact, D.model_from_checkpoint(ckpt).eval(), batch, cfg)
        with torch.no_grad():
            return float(D.continuous_pass(fact, batch, 1).posterior_logvar.exp().mean())

    assert variance_after(5.0) < 0.9 * variance_after(0.0)


def test_jsd_flag_separates_latents(tiny_base):
    """Five steps with the JSD term end with more divergent latents than five steps without it."""
    task, pairs = grid_pairs(8)
    batch = D.make_batch(task, pairs, 3, "cpu")

    def jsd_after(weight):
        fact, ckpt = tiny_fact(tiny_base)
        with torch.no_grad():  # JSD is flat where the latents agree exactly: start them apart
            fact.lm.tok_emb.weight[[D.STOI[t] for t in LATENT_TOKENS[:3]]] += \
                0.5 * torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
        train_a_few_steps(fact, D.model_from_checkpoint(ckpt).eval(), batch, D.Config(jsd=weight, beta=0.0))
        with torch.no_grad():
            return float(D.jsd_loss(fact.lm(batch["gen_idx"]), batch["base_mask"].float(), 3).mean())

    assert jsd_after(100.0) > 4 * jsd_after(0.0)


def test_a_frozen_posterior_reads_the_base_models_states(tiny_base):
    fact, ckpt = tiny_fact(tiny_base)
    task, pairs = grid_pairs(4)
    batch = D.make_batch(task, pairs, 3, "cpu")
    stats = D.base_token_stats(D.model_from_checkpoint(ckpt).eval(), batch)
    own = fact.posterior_params(batch["base_idx"], batch["y_state_mask"])
    assert torch.allclose(fact.posterior_params(batch["base_idx"], batch["y_state_mask"], stats.states), own,
                          atol=1e-6)


def test_hard_assignment_is_the_latent_the_generator_rates_highest():
    token_logp = torch.tensor([[[-1.0, -2.0], [-0.5, -0.4], [-3.0, 0.0]],
                               [[-0.1, -0.1], [-2.0, -2.0], [-0.3, -0.2]]], requires_grad=True)  # (B=2, K=3, T=2)
    # summed over y: pair 0 rates latent 1 (-0.9) highest, pair 1 latent 0 (-0.2) by 0.3 nats
    scores = D.assignment_scores(token_logp)  # (B, K)
    assert D.hard_assignment(scores).tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    assert not scores.requires_grad


def test_posterior_vote_keeps_a_near_tie_on_its_cluster_and_yields_to_a_clear_margin():
    token_logp = torch.tensor([[[-1.0], [-0.9]],  # pair 0: the generators prefer latent 1 by 0.1 nats
                               [[-5.0], [-0.9]]])  # pair 1: ... by 4.1 nats, (B=2, K=2, T=1)
    posterior_logq = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))  # q: both pairs on cluster 0
    assert D.hard_assignment(D.assignment_scores(token_logp)).argmax(1).tolist() == [1, 1]
    # log 0.9 - log 0.1 = 2.2 nats outweighs 0.1, not 4.1
    assert D.hard_assignment(D.assignment_scores(token_logp, posterior_logq)).argmax(1).tolist() == [0, 1]


def test_per_input_assignment_sends_an_inputs_distinct_traces_to_distinct_latents():
    loglik = torch.tensor([[-0.1, -0.5, -3.0],  # input 0, trace a: prefers latent 0
                           [-0.2, -0.9, -0.4],  # input 0, trace b: also prefers latent 0, by more
                           [-0.1, -0.5, -3.0],  # input 0, trace a again: follows its first copy
                           [-0.3, -2.0, -2.0],  # input 3, trace c: alone on its input, keeps its argmax
                           [-0.3, -0.1, -2.0]])  # input 3, trace d: distinct from c, so not latent 0
    assign = D.per_input_assignment(loglik, [0, 0, 0, 3, 3], [0, 1, 0, 3, 4])
    # input 0: (a->0, b->2) totals -0.5 against (a->1, b->0) -0.7; input 3: c->0 and d->1
    assert assign.argmax(1).tolist() == [0, 2, 0, 0, 1]
    # one trace per input is the plain hard assignment
    assert torch.equal(D.per_input_assignment(loglik, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), D.hard_assignment(loglik))


def test_batches_of_several_traces_per_input_hold_distinct_traces_and_keep_one_trace_batches():
    task, cfg = get_task("sum"), D.Config(task="sum", hard_em=True)
    rng = random.Random("train/0/7")
    assert D.training_pairs(task, None, cfg, 7, "cpu") == [(x, y) for x, _, y in
                                                           (task.sample(rng, "train") for _ in range(16))]
    pairs = D.training_pairs(task, None, replace(cfg, traces_per_input=2), 7, "cpu")
    batch = D.make_batch(task, pairs, 3, "cpu")
    assert batch["input_id"] == [i - i % 2 for i in range(16)]  # 8 inputs, two traces each
    assert batch["trace_id"] == list(range(16))  # every sum input has three distinct traces


def test_base_model_data_samples_each_input_traces_per_input_times(monkeypatch):
    task, cfg = get_task("sum"), D.Config(task="sum", data="model", hard_em=True, traces_per_input=2)
    # a base model that always writes pairwise: the two samples of an input are one trace
    monkeypatch.setattr(D, "generate_ys", lambda base, task, xs, **_: [task.trace(x, "pairwise") for x in xs])
    batch = D.make_batch(task, D.training_pairs(task, None, cfg, 0, "cpu"), 3, "cpu")
    assert batch["input_id"] == batch["trace_id"] == [i - i % 2 for i in range(16)]


def test_hard_em_trains_only_the_latent_the_generator_rates_highest(tiny_base):
    fact, ckpt = tiny_fact(tiny_base)
    task, pairs = grid_pairs(4)
    batch = D.make_batch(task, pairs, 3, "cpu")
    base = D.model_from_checkpoint(ckpt).eval()
    p = D.discrete_pass(fact, batch)
    best = p.token_logp.sum(-1).argmax(-1)  # (B,)
    stats = D.base_token_stats(base, batch)
    weights, _ = D.token_weights(batch["base_mask"].float(), stats.entropy_share, True)
    best_recon = -(p.token_logp[torch.arange(4), best] * weights).sum(-1).mean()
    hard = D.objective(fact, base, batch, D.Config(hard_em=True))
    soft = D.objective(fact, base, batch, D.Config())
    assert float(hard.terms["loss/recon"]) == pytest.approx(best_recon.item(), rel=1e-5)
    assert float(hard.terms["loss/recon"]) != pytest.approx(float(soft.terms["loss/recon"]), rel=1e-5)
    assert float(hard.terms["loss/kl"]) == pytest.approx(float(soft.terms["loss/kl"]), rel=1e-6)  # KL keeps q


def test_objective_is_the_sum_of_its_terms(tiny_base):
    fact, ckpt = tiny_fact(tiny_base)
    task, pairs = grid_pairs(4)
    cfg = D.Config(jsd=1.0, router_marginal_kl=10.0, router_support=0.1, posterior_entropy=0.5, beta=2.0)
    obj = D.objective(fact, D.model_from_checkpoint(ckpt).eval(), D.make_batch(task, pairs, 3, "cpu"), cfg)
    assert set(obj.terms) == {"loss/recon", "loss/kl", "aux/jsd", "aux/router_marginal_kl", "aux/router_support",
                              "aux/posterior_entropy"}
    assert obj.loss.item() == pytest.approx(float(sum(obj.terms.values())), rel=1e-6)
    assert float(obj.terms["loss/kl"]) == pytest.approx(2.0 * float(obj.diagnostics["loss/kl_raw"]), rel=1e-6)
    record = D.log_record(obj)
    assert sum(v for k, v in record.items() if k.startswith("share/")) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# Starting from clusters and hard-EM moves


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    points = torch.cat([c + 0.5 * torch.randn(40, 2, generator=g) for c in centres])  # (120, 2)
    found = D.kmeans(points, 3, torch.Generator().manual_seed(0))
    nearest = torch.cdist(centres, found).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2]  # one centroid per cluster
    assert torch.allclose(found[nearest], centres, atol=0.3)


def test_kmeans_stopping_at_a_fixed_point_finds_what_every_iteration_would():
    points = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))  # no clusters: many iterations
    generator, best = torch.Generator().manual_seed(0), None
    for _ in range(D.KMEANS_RESTARTS):  # Lloyd's algorithm run to KMEANS_ITERS, as kmeans would without its stop
        centroids = points[torch.randperm(len(points), generator=generator)[:4]]
        for _ in range(D.KMEANS_ITERS):
            centroids = D.cluster_means(points, torch.cdist(points, centroids).argmin(1), centroids)
        inertia = torch.cdist(points, centroids).min(1).values.pow(2).sum().item()
        best = min(best or (inertia, centroids), (inertia, centroids), key=lambda run: run[0])
    assert torch.equal(D.kmeans(points, 4, torch.Generator().manual_seed(0)), best[1])


def test_posterior_to_centroids_is_a_gaussian_mixture_at_the_set_confidence(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    g = torch.Generator().manual_seed(0)
    features, mean = torch.randn(60, 32, generator=g), torch.randn(32, generator=g)
    whiten, centroids = torch.randn(32, 5, generator=g), torch.randn(3, 5, generator=g)
    points = (features - mean) @ whiten  # (60, 5)
    D.posterior_to_centroids(fact, points, centroids, whiten, mean)
    with torch.no_grad():
        logits = fact.post_head(features)  # (60, 3)
    sq_dist = torch.cdist(points, centroids) ** 2
    gaps = (logits - logits[:, :1])[:, 1:]  # the posterior sees logits up to a shared term
    expected = -0.5 * (sq_dist - sq_dist[:, :1])[:, 1:]  # the same, times 1 / temperature
    temperature = float((expected * gaps).sum() / (gaps * gaps).sum())
    assert temperature > 0 and torch.allclose(gaps * temperature, expected, atol=1e-2 * temperature)
    assert float(logits.softmax(-1).max(1).values.mean()) == pytest.approx(D.CLUSTER_CONFIDENCE, abs=1e-3)


def test_posterior_to_labels_fits_the_assignment_at_the_set_confidence(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(3, 32, generator=g)
    assign = torch.arange(90) % 3  # three groups, apart along their own direction
    features = 5.0 + torch.randn(90, 32, generator=g) + 2 * directions[assign]
    D.posterior_to_labels(fact, features, assign)
    with torch.no_grad():
        q = fact.post_head(features).softmax(-1)  # (90, 3)
    assert torch.equal(q.argmax(1), assign)
    assert float(q.max(1).values.mean()) == pytest.approx(D.CLUSTER_CONFIDENCE, abs=1e-3)


def test_trace_contrast_finds_the_direction_in_which_an_inputs_traces_differ():
    g = torch.Generator().manual_seed(0)
    inputs = torch.nn.functional.pad(10 * torch.randn(200, 10, generator=g), (0, 6))  # (P, d): the largest variance
    strategy = torch.zeros(16)
    strategy[12] = 1.0  # the traces of one input differ along this direction only
    features = torch.cat([inputs + strategy, inputs - strategy]) + 0.1 * torch.randn(400, 16, generator=g)  # (N, d)
    contrasts = torch.stack([torch.arange(200), torch.arange(200, 400)], 1)  # (P, 2): one input's two traces
    mean, whiten, points = D.trace_contrast(features, contrasts, 1)
    top = whiten[:, 0] / whiten[:, 0].norm()
    assert abs(float(top[12])) > 0.99  # where the top principal components follow the inputs
    assert torch.allclose(points, (features - mean) @ whiten)
    assert float(points[:, 0].var()) == pytest.approx(1.0, abs=0.02)  # unit variance along the direction
    assert float(points[:200, 0].sign().mul(points[200:, 0].sign()).eq(-1).float().mean()) == 1.0  # sides split


def test_cluster_posterior_starts_confident_but_not_saturated(tiny_base):
    fact, _ = tiny_fact(tiny_base)
    cfg = D.Config(data="dgp", cluster_init=4)
    shares = D.cluster_posterior(fact, None, get_task("grid"), cfg)
    assert sum(shares) == pytest.approx(1.0) and len(shares) == 3
    pairs = D.training_pairs(get_task("grid"), None, cfg, 0, "cpu", "clusters", D.CONTRAST_PAIRS, per_input=2)
    q = evaluate.posterior_distribution(fact, get_task("grid"), pairs)  # (N, K), the clustered pairs
    assert float(q.max(1).values.mean()) == pytest.approx(D.CLUSTER_CONFIDENCE, abs=1e-3)
    assert torch.bincount(q.argmax(1), minlength=3).div(len(q)).tolist() == pytest.approx(shares)


def test_cluster_split_rate_is_the_share_of_inputs_whose_two_traces_fall_in_two_clusters(tiny_base, monkeypatch):
    fact, _ = tiny_fact(tiny_base)
    task, cfg = get_task("grid"), D.Config(data="dgp")

    def posterior_by(cluster_of_pair):
        def posterior_distribution(fact, task, pairs):
            return torch.nn.functional.one_hot(torch.tensor([cluster_of_pair(x, y) for x, y in pairs]), 3).float()  # (N, K)
        return posterior_distribution

    strategy = lambda x, y: min(task.strategies.index(s) for s in task.check(x, y).strategies)
    digest = lambda item: zlib.crc32(str(item).encode()) % 3
    monkeypatch.setattr(D, "posterior_distribution", posterior_by(strategy))  # the clusters are the strategies
    assert D.cluster_split_rate(fact, None, task, cfg) == 1.0
    monkeypatch.setattr(D, "posterior_distribution", posterior_by(lambda x, y: digest(x)))  # clusters of inputs
    assert D.cluster_split_rate(fact, None, task, cfg) == 0.0
    monkeypatch.setattr(D, "posterior_distribution", posterior_by(lambda x, y: digest(y)))  # at random
    assert 0.5 < D.cluster_split_rate(fact, None, task, cfg) < 0.8  # about 1 - 1/3


def test_the_posterior_votes_only_where_its_clusters_split_inputs_and_a_resume_keeps_the_vote(tiny_base, tmp_path,
                                                                                             monkeypatch):
    args = lambda out, *extra: tiny_args(tiny_base, out, "discrete", "--posterior-vote", "4", *extra)
    assert D.main(args(tmp_path / "untrained")) == 0  # an untrained base's clusters split at chance
    init = next(r for r in read_log(tmp_path / "untrained" / "log.jsonl") if "init/cluster_split" in r)
    assert init["init/cluster_split"] < D.VOTE_SPLIT and init["init/posterior_vote"] == 0
    assert D.main(tiny_args(tiny_base, tmp_path / "no_vote", "discrete", "--posterior-vote", "0")) == 0
    losses = lambda log: [r["loss/recon"] for r in log if "loss/recon" in r]
    assert losses(read_log(tmp_path / "untrained" / "log.jsonl")) == \
        losses(read_log(tmp_path / "no_vote" / "log.jsonl"))  # the check alone changes nothing
    monkeypatch.setattr(D, "VOTE_SPLIT", 0.0)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert D.main(args(straight)) == 0
    log = read_log(straight / "log.jsonl")
    assert next(r for r in log if "init/posterior_vote" in r)["init/posterior_vote"] == 4
    assert losses(log) != losses(read_log(tmp_path / "untrained" / "log.jsonl"))  # the vote changes training
    run_killed_at_step_3(monkeypatch, args(stopped))  # inside the vote
    assert D.main(args(stopped, "--resume")) == 0
    assert read_log(stopped / "log.jsonl") == log


def test_simplex_vertices_are_equidistant_and_centred():
    for n in (2, 3, 5):
        corners = D.simplex_vertices(n)  # (n, n-1)
        assert corners.shape == (n, n - 1)
        assert torch.allclose(torch.cdist(corners, corners), 1 - torch.eye(n), atol=1e-5)
        assert torch.allclose(corners.mean(0), torch.zeros(n - 1), atol=1e-6)


def test_continuous_cluster_posterior_gives_each_cluster_a_corner(tiny_base):
    fact, _ = tiny_fact(tiny_base, "continuous", K=0)
    cfg = D.Config(data="dgp", latent="continuous", cluster_init=4, dz=4)
    shares = D.cluster_posterior(fact, None, get_task("grid"), cfg)
    assert sum(shares) == pytest.approx(1.0) and len(shares) == 3  # one cluster per strategy
    pairs = D.training_pairs(get_task("grid"), None, cfg, 0, "cpu", "clusters", D.CONTRAST_PAIRS, per_input=2)
    mu, logvar = evaluate.posterior_distribution(fact, get_task("grid"), pairs)  # (N, dz) each
    std = (0.5 * logvar).exp()
    assert torch.allclose(std[:, :2], torch.full_like(std[:, :2], D.CLUSTER_STD))  # the simplex's plane
    assert torch.allclose(std[:, 2:], torch.ones_like(std[:, 2:])) and mu[:, 2:].abs().max() == 0  # the prior
    assert torch.allclose(mu[:, :2].mean(0), torch.zeros(2), atol=1e-4)  # centred like the corners
    corners = D.CLUSTER_SPACING * D.simplex_vertices(3)  # (3, 2)
    corners = corners - torch.tensor(shares) @ corners  # centred on the pairs, as the fit's targets were
    nearest = torch.cdist(mu[:, :2], corners).argmin(1)  # each pair lands nearest its cluster's corner
    assert torch.bincount(nearest, minlength=3).div(len(mu)).tolist() == pytest.approx(shares, abs=0.05)


def test_continuous_start_score_reads_each_pair_at_its_clusters_centroid(tiny_base):
    fact, _ = tiny_fact(tiny_base, "continuous", K=0)
    task, pairs = grid_pairs(24)
    D.cluster_posterior(fact, None, task, D.Config(data="dgp", latent="continuous", cluster_init=4, dz=4))
    clusters = D.posterior_clusters(fact, task, pairs)
    mu = evaluate.posterior_distribution(fact, task, pairs)[0]  # (N, dz)
    assert clusters.assign.tolist() == torch.cdist(mu, fact.codes).argmin(1).tolist()
    assert len(set(clusters.assign.tolist())) > 1  # the k-means start spread the pairs
    for c in set(clusters.assign.tolist()):
        assert torch.allclose(clusters.centroids[c], mu[clusters.assign == c].mean(0))
    table = evaluate.latent_log_likelihoods(fact, task, pairs, clusters.centroids)  # (N, C)
    own = table.gather(1, clusters.assign[:, None]).mean().item()  # q one-hot on the pair's cluster
    score = D.score_start(fact, task, pairs)
    assert score.hard_em_objective == pytest.approx(own, rel=1e-4)
    assert score.assignment.tolist() == table.argmax(1).tolist()


def test_latent_log_likelihoods_equal_one_pair_and_one_latent_at_a_time(tiny_base):
    task, pairs = grid_pairs(3)
    z = torch.randn(2, 4)  # (C, dz)
    for latent in ("discrete", "continuous"):
        fact, _ = tiny_fact(tiny_base, latent)
        table = evaluate.latent_log_likelihoods(fact, task, pairs, None if latent == "discrete" else z)
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


def test_nearest_centroid_rate_hand_checked():
    task = get_task("grid")  # strategies: right-first, down-first, alternating
    mu = torch.tensor([[0.0, 0.0], [0.2, 0.0], [4.0, 0.0], [0.0, 4.0]])  # (4, 2) posterior means
    labels = torch.tensor([0, 0, 1, 2])  # centroids (0.1, 0), (4, 0), (0, 4)
    z = torch.tensor([[0.0, 0.5], [3.0, 0.0], [1.0, 3.0], [2.2, 2.0]])  # nearest: 0, 1, 2, 1
    decoded = [frozenset({"right-first"}), frozenset({"down-first"}), frozenset({"right-first"}),
               frozenset({"down-first", "alternating"})]  # hit, hit, wrong strategy, ambiguous
    assert evaluate.nearest_centroid_rate(task, z, decoded, mu, labels) == 0.5


# ----------------------------------------------------------------------------------------------
# The defaults are the recipe


def resolved(argv):
    cfg, given = parse_config(D.Config, argv)
    D.apply_recipe(cfg, given)
    return cfg


def test_no_flag_config_is_the_recipe():
    for task in ("grid", "sort", "add", "linear", "sum", "base"):
        for latent in ("discrete", "continuous"):
            cfg = resolved(["--task", task, "--latent", latent])
            expected = {**vars(D.Config(task=task, latent=latent)), **D.RECIPES[(get_task(task).name, latent)]}
            assert vars(cfg) == expected
    assert resolved([]) == resolved(["--task", "grid", "--latent", "discrete"])
    sort = resolved(["--task", "sort"])
    assert (sort.cluster_init, sort.reassign, sort.steps, sort.jsd, sort.hard_em, sort.token_weighted) == \
        (24, 300, 2400, 0.0, True, True)
    discrete = {task: resolved(["--task", task]) for task in ("grid", "sort", "add", "linear", "sum", "base")}
    one_recipe = {task: {k: v for k, v in vars(cfg).items() if k not in ("task", "steps", "cluster_init")}
                  for task, cfg in discrete.items()}
    assert all(settings == one_recipe["grid"] for settings in one_recipe.values())  # one discrete recipe
    assert {task: cfg.cluster_init for task, cfg in discrete.items()} == \
        {"grid": 16, "sort": 24, "add": 16, "linear": 16, "sum": 16, "base": 16}  # 4 (S + 1) for S strategies
    assert (discrete["grid"].starts, discrete["grid"].start_steps, discrete["grid"].hard_em,
            discrete["grid"].traces_per_input) == (6, 600, True, 2)
    grid = resolved(["--latent", "continuous"])
    assert (grid.router_marginal_kl, grid.jsd, grid.cluster_init, grid.reassign, grid.router, grid.data, grid.starts) == \
        (1.0, 0.0, 16, 300, "mixture", "dgp", 4)
    sum_ = resolved(["--task", "sum", "--latent", "continuous"])
    assert replace(sum_, task="grid", posterior_thaw=False, steps=1200) == grid  # grid's, and q trains late
    assert (sum_.posterior_thaw, sum_.steps) == (True, 2400)
    assert replace(resolved(["--task", "base", "--latent", "continuous"]), task="grid", steps=1200) == grid


def test_a_given_flag_overrides_the_recipe():
    cfg = resolved(["--task", "sort", "--steps", "50", "--cluster-init", "8", "--no-token-weighted", "--jsd", "0"])
    assert (cfg.steps, cfg.cluster_init, cfg.token_weighted, cfg.jsd, cfg.reassign) == (50, 8, False, 0.0, 300)


def test_the_advice_of_an_error_is_accepted():
    # "--cluster-init 0" alone is refused with "add --reassign 0 --posterior-vote 0"; with it, the config is valid
    cfg, given = parse_config(D.Config, ["--cluster-init", "0", "--reassign", "0", "--posterior-vote", "0"])
    D.apply_recipe(cfg, given)
    cfg.validate(given, 3)
    assert (cfg.cluster_init, cfg.reassign, cfg.posterior_vote) == (0, 0, 0)


# ----------------------------------------------------------------------------------------------
# Whole runs


def tiny_args(tiny_base, out, latent, *extra):
    args = ["--task", "grid", "--latent", latent, "--base", str(tiny_base), "--out", str(out), "--steps", "4",
            "--batch-size", "4", "--eval-interval", "2", "--eval-inputs", "12", "--final-inputs", "12",
            "--log-interval", "1", "--device", "cpu", "--cluster-init", "4", "--cluster-hold", "2", "--reassign", "2",
            "--starts", "1"]
    if latent == "continuous":
        args += ["--dz", "4", "--samples", "2", "--posterior-variance", "0.1"]
    else:
        args += ["--posterior-entropy", "0.1"]
    return args + ["--normalized-recon", "--free-bits", "0.1", "--beta", "0.5", *extra]


def run_killed_at_step_3(monkeypatch, argv):
    """D.main(argv) stopped by a kill in step 3, after the checkpoint at step 2 (eval interval 2)."""
    train_step = D.train_step

    def killed_at_step_3(*args):
        if args[5] == 3:
            raise KeyboardInterrupt
        return train_step(*args)

    monkeypatch.setattr(D, "train_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        D.main(argv)
    monkeypatch.setattr(D, "train_step", train_step)


def read_log(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("latent, extra", [("discrete", []), ("continuous", []),
                                           ("continuous", ["--router", "mixture"])])
def test_tiny_end_to_end_run(tiny_base, tmp_path, latent, extra):
    out = tmp_path / latent
    assert D.main(tiny_args(tiny_base, out, latent, *extra)) == 0
    log = read_log(out / "log.jsonl")
    assert all(abs(r - 1) < 0.05 for r in log[0]["init/y_loss_ratio"])  # starts where the base model is
    assert [r["step"] for r in log if "loss/total" in r] == [1, 2, 3, 4]
    assert any("init/cluster_shares" in r for r in log) and any("reassign/moved" in r for r in log)
    config = json.load(open(out / "config.json"))
    assert config["router_marginal_kl"] == (10.0 if latent == "discrete" else 1.0)  # from the recipe
    metrics = json.load(open(out / "metrics.json"))
    assert ("alignment_one_to_one" if latent == "discrete" else "sampled_z_probe_acc") in metrics
    if extra:  # the router's draws came from all three components
        assert len(metrics["router_component_usage"]) == 3 and "usage/router_components" in log[-2]
    # rescoring the finished run on the same inputs gives the same numbers
    assert evaluate.main([str(out), "--inputs", "12", "--device", "cpu"]) == 0
    rescored = json.load(open(out / "metrics_12.json"))
    assert rescored["step"] == 4
    same = lambda a, b: a == b or (a != a and b != b)  # NaN equals NaN here
    assert all(same(rescored[k], v) for k, v in metrics.items() if k != "train_seconds")


def test_a_run_too_small_for_the_probes_still_finishes(tiny_base, tmp_path):
    """Two held-out inputs leave the continuous probes nothing to train on: NaN, not a crash."""
    args = tiny_args(tiny_base, tmp_path / "run", "continuous", "--eval-inputs", "2", "--final-inputs", "2")
    assert D.main(args) == 0
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["sampled_z_probe_acc"] != metrics["sampled_z_probe_acc"]  # NaN


@pytest.mark.parametrize("latent", ["discrete", "continuous"])
def test_resume_after_a_kill_is_exact_and_the_log_has_no_duplicate(tiny_base, tmp_path, monkeypatch, latent):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert D.main(tiny_args(tiny_base, straight, latent)) == 0
    run_killed_at_step_3(monkeypatch, tiny_args(tiny_base, stopped, latent))
    with open(stopped / "log.jsonl", "a") as f:  # a line written after the checkpoint, then the kill
        f.write(json.dumps({"step": 3, "loss/total": 0.0}) + "\n")
    moved = tmp_path / "moved"
    stopped.rename(moved)  # a run folder can be moved and resumed
    assert D.main(tiny_args(tiny_base, moved, latent, "--resume")) == 0
    drop = lambda m: {k: v for k, v in m.items() if k != "train_seconds"}
    assert json.dumps(drop(json.load(open(moved / "metrics.json")))) == \
        json.dumps(drop(json.load(open(straight / "metrics.json"))))
    log = read_log(moved / "log.jsonl")
    assert log == read_log(straight / "log.jsonl")  # every line once, in order, as if never stopped
    assert not list(moved.glob("*.tmp.*"))


def test_the_thawed_posterior_backbone_trains_only_after_the_refits_and_resumes_exactly(tiny_base, tmp_path,
                                                                                       monkeypatch):
    args = lambda out, *extra: tiny_args(tiny_base, out, "continuous", "--eval-interval", "1", *extra)
    frozen_at, train_step = [], D.train_step  # (step, frozen) as each step begins

    def recording(*a):
        frozen_at.append((a[5], D.posterior_frozen(a[0])))
        return train_step(*a)

    monkeypatch.setattr(D, "train_step", recording)
    assert D.main(args(tmp_path / "frozen")) == 0
    assert D.main(args(tmp_path / "thawed", "--posterior-thaw")) == 0
    monkeypatch.setattr(D, "train_step", train_step)
    # 4 steps, refits at step 2 (--reassign 2): the backbone trains in steps 2 and 3 only
    assert frozen_at == [(s, True) for s in range(4)] + [(0, True), (1, True), (2, False), (3, False)]
    backbone = lambda run: {k: v for k, v in torch.load(run / "ckpt.pt", weights_only=True)["model"].items()
                            if k.startswith("posterior.")}
    base = {"posterior." + k: v for k, v in torch.load(tiny_base / "ckpt.pt", weights_only=True)["model"].items()}
    assert all(torch.equal(v, base[k]) for k, v in backbone(tmp_path / "frozen").items())
    assert not all(torch.equal(v, base[k]) for k, v in backbone(tmp_path / "thawed").items())
    stopped = tmp_path / "stopped"
    run_killed_at_step_3(monkeypatch, args(stopped, "--posterior-thaw"))  # its last checkpoint: after the thaw
    assert D.main(args(stopped, "--posterior-thaw", "--resume")) == 0
    assert read_log(stopped / "log.jsonl") == read_log(tmp_path / "thawed" / "log.jsonl")
    with pytest.raises(ValueError, match="no effect with --cluster-init 0"):
        D.Config(posterior_thaw=True).validate({"posterior_thaw"}, 3)


def test_assignment_agreement_is_one_for_the_same_partition_under_other_names():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert D.assignment_agreement(a, torch.tensor([2, 2, 0, 0, 1, 1])) == 1.0
    assert D.assignment_agreement(a, torch.tensor([2, 2, 0, 1, 1, 0])) == pytest.approx(4 / 6)
    assert D.assignment_agreement(a, torch.zeros(6, dtype=torch.long)) == pytest.approx(2 / 6)  # one latent for all


def test_the_chosen_start_is_the_partition_most_starts_reach_then_the_best_objective():
    strategy = torch.arange(300) % 3  # (N,) the "select" pairs' strategies; the first 150 inputs have a carry
    carry = torch.arange(300) < 150
    rename = lambda order: torch.tensor(order)[strategy]
    swapped = torch.where(carry & (strategy < 2), 1 - strategy, strategy)  # latents 0 and 1 trade on a group
    noisy = rename([1, 2, 0]).clone()
    noisy[:20] = 0  # a start still settling: agrees with the others on 0.96 of pairs
    start = lambda objective, assignment: D.Start(None, None, [], None, 0, objective, assignment)
    entangled = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(0))  # pairs split at random
    starts = [start(-0.44, rename([0, 1, 2])), start(-0.34, rename([2, 0, 1])), start(-1.60, entangled),
              start(-0.27, swapped), start(-0.30, noisy), start(-0.41, rename([1, 0, 2]))]
    choice = D.choose_start(starts)
    assert choice.support == [3, 3, 0, 0, 3, 3]
    assert choice.chosen == 4  # not the swap, whose objective is the highest
    assert choice.agreement[3][0] == pytest.approx(1 - 100 / 300)  # the swap moves 100 of 300 pairs
    agreeing = [start(-0.5, rename([0, 1, 2])), start(-0.2, rename([1, 2, 0])), start(-0.3, rename([2, 1, 0]))]
    assert D.choose_start(agreeing).chosen == 1  # all reach one partition: the objective decides


@pytest.mark.parametrize("latent", ["discrete", "continuous"])
def test_starts_continue_the_chosen_one_and_resume_exactly(tiny_base, tmp_path, monkeypatch, latent):
    args = lambda out, *extra: tiny_args(tiny_base, out, latent, "--starts", "3", "--start-steps", "2", *extra)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert D.main(args(straight)) == 0
    log = read_log(straight / "log.jsonl")
    choice = next(r for r in log if "start/chosen" in r)
    scores, support = choice["start/hard_em_objective"], choice["start/support"]
    assert len(scores) == 3 and len(set(scores)) == 3  # three different starts
    assert choice["start/chosen"] == max(range(3), key=lambda i: (support[i], scores[i]))
    assert [r["step"] for r in log if "loss/total" in r] == [1, 2, 3, 4]  # the chosen start's lines only
    assert [r["step"] for r in log if "eval_inputs" in r] == [2, 4]
    alone = tmp_path / "alone"  # the chosen start trains as the run with its seed would
    assert D.main(tiny_args(tiny_base, alone, latent, "--seed", str(D.start_seed(0, choice["start/chosen"])))) == 0
    losses = lambda log: [r for r in log if "loss/total" in r]
    assert losses(read_log(alone / "log.jsonl")) == losses(log)
    run_killed_at_step_3(monkeypatch, args(stopped))  # after the choice
    assert D.main(args(stopped, "--resume")) == 0  # continues the chosen start, on its seed's data
    assert read_log(stopped / "log.jsonl") == log
    drop = lambda m: {k: v for k, v in m.items() if k != "train_seconds"}
    assert json.dumps(drop(json.load(open(stopped / "metrics.json")))) == \
        json.dumps(drop(json.load(open(straight / "metrics.json"))))


def test_a_kill_between_starts_resumes_at_the_next_start_and_ends_as_if_never_stopped(tiny_base, tmp_path,
                                                                                      monkeypatch):
    args = lambda out, *extra: tiny_args(tiny_base, out, "discrete", "--starts", "3", "--start-steps", "2", *extra)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert D.main(args(straight)) == 0
    train_start, trained = D.train_start, []

    def killed_in_start_2(*a):  # the first time only
        trained.append(a[-1])
        if trained == [0, 1, 2]:
            raise KeyboardInterrupt
        return train_start(*a)

    monkeypatch.setattr(D, "train_start", killed_in_start_2)
    with pytest.raises(KeyboardInterrupt):
        D.main(args(stopped))
    with pytest.raises(ValueError, match="stopped while choosing its start \\(2 of 3 trained\\)"):
        evaluate.main([str(stopped), "--inputs", "4", "--device", "cpu"])
    trained.clear()
    assert D.main(args(stopped, "--resume")) == 0
    assert trained == [2]  # starts 0 and 1 were kept, not trained again
    assert read_log(stopped / "log.jsonl") == read_log(straight / "log.jsonl")
    drop = lambda m: {k: v for k, v in m.items() if k != "train_seconds"}
    assert json.dumps(drop(json.load(open(stopped / "metrics.json")))) == \
        json.dumps(drop(json.load(open(straight / "metrics.json"))))


@pytest.mark.parametrize("args, message", [
    (["--latent", "continuous", "--cluster-init", "8", "--dz", "1"], "--dz must be at least 2, got 1"),
    (["--cluster-init", "33"], "--cluster-init must be at most the model width 32"),
    (["--cluster-init", "0", "--reassign", "100"], "--reassign has no effect with --cluster-init 0"),
    (["--cluster-init", "0"], "need --cluster-init; add --reassign 0 --posterior-vote 0"),
    (["--cluster-init", "0", "--reassign", "0"], "--posterior-vote (from the recipe) need --cluster-init"),
    (["--latent", "continuous", "--posterior-vote", "100"], "--posterior-vote has no effect with --latent continuous"),
    (["--latent", "continuous", "--jsd", "1"], "--jsd has no effect with --latent continuous"),
    (["--jsd", "1"], "--jsd trains every latent's generator, hard EM only each pair's assigned one: add --no-hard-em"),
    (["--latent", "continuous", "--k", "5"], "--k has no effect with --latent continuous"),
    (["--posterior-variance", "1"], "--posterior-variance has no effect with --latent discrete"),
    (["--router", "mixture"], "--router has no effect with --latent discrete"),
    (["--starts", "1", "--start-steps", "100"], "--start-steps has no effect with --starts 1"),
    (["--latent", "continuous", "--starts", "3", "--cluster-init", "0", "--reassign", "0"], "it needs --cluster-init"),
    (["--starts", "2", "--steps", "300"], "--start-steps must be below --steps 300, got 600"),
    (["--steps", "300"], "got 600 (--starts 6 is the recipe's; add --starts 1)"),
    (["--batch-size", "15"], "--batch-size 15 must be a multiple of --traces-per-input 2"),
    (["--no-hard-em", "--traces-per-input", "2"], "--traces-per-input has no effect with --no-hard-em"),
    (["--latent", "continuous", "--router", "gaussian", "--components", "2"],
     "--components has no effect with --router gaussian"),
    (["--latent", "continuous", "--router", "flow"], "--router must be one of gaussian, mixture"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--beta", "nan"], "--beta must be a finite number"),
    (["--grad-clip", "0"], "--grad-clip must be positive"),
    (["--steps", "-3"], "--steps must be"),
    (["--latent", "gaussian"], "--latent must be one of discrete, continuous"),
    (["--precision", "fp16"], "--precision must be one of auto, bf16, fp32"),
    (["--resume"], "no checkpoint there"),
])
def test_user_errors_are_one_clear_line(tiny_base, tmp_path, capsys, args, message):
    argv = ["--base", str(tiny_base), "--out", str(tmp_path / "run"), *args]
    try:
        code = run_main(D.main, argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    stderr = capsys.readouterr().err
    assert code == 2
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run").exists()
