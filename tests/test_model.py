"""model.py: causality, latent injection, KV-cache sampling, hidden states, checkpoints."""

import pytest
import torch

from model import (GPT, CheckpointError, GPTConfig, autocast, learning_rate, load_checkpoint, model_from_checkpoint,
                   pad_batch, resolve_precision, router_log_probs, save_checkpoint)

V, PAD, EOS = 30, 0, 2


def tiny_model(latent_dim=0, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, block_size=48, n_layer=2, n_head=2, n_embd=32, latent_dim=latent_dim))
    if latent_dim:  # E(z) starts at zero; give it weight so the tests can see it
        torch.nn.init.normal_(model.latent_proj.weight, std=0.5)
    return model.eval()


def test_causality():
    model, idx = tiny_model(), torch.randint(3, V, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_latent_changes_only_its_row_at_and_after_its_slot():
    model, idx = tiny_model(latent_dim=4), torch.randint(3, V, (3, 10))
    z = torch.randn(3, 4)
    plain = model(idx)
    injected = model(idx, latent=z, latent_pos=torch.tensor([4, -1, 6]))
    assert torch.allclose(plain[0, :4], injected[0, :4], atol=1e-6)
    assert not torch.allclose(plain[0, 4:], injected[0, 4:])
    assert torch.allclose(plain[1], injected[1], atol=1e-6)  # row without a latent is untouched
    assert torch.allclose(plain[2, :6], injected[2, :6], atol=1e-6)


def test_kv_cache_logits_match_full_forward_with_ragged_prompts():
    model = tiny_model(latent_dim=4)
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4]]
    z, pos = torch.randn(3, 4), torch.tensor([2, 1, 0])
    out, step_logits = model.generate(prompts, 10, EOS, PAD, generator=torch.Generator().manual_seed(0),
                                      latent=z, latent_pos=pos, return_logits=True)
    for i, (p, new) in enumerate(zip(prompts, out)):
        full = model(torch.tensor([p + new]), latent=z[i:i + 1], latent_pos=pos[i:i + 1])[0]  # the row alone
        for t in range(len(new)):
            assert torch.allclose(step_logits[i, t], full[len(p) + t - 1], atol=1e-4)


def test_greedy_with_and_without_cache_identical():
    model = tiny_model()
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4, 4, 4, 4, 4]]
    a = model.generate(prompts, 20, EOS, PAD, temperature=0)
    b = model.generate(prompts, 20, EOS, PAD, temperature=0, use_cache=False)
    assert a == b


def test_cached_step_logits_equal_full_forward():
    """Drive the cache by hand: every step's logits equal the full forward within 1e-4."""
    from model import LayerCache
    model = tiny_model()
    seq = torch.randint(3, V, (2, 14))
    full = model(seq)
    caches = [LayerCache(2, 2, 14, 16, "cpu", torch.float32) for _ in model.blocks]
    positions = torch.arange(14).expand(2, 14)
    prefix = 5
    visible = torch.tril(torch.ones(14, 14, dtype=torch.bool))[None, None]
    logits = model(seq[:, :prefix], positions=positions[:, :prefix], attn_mask=visible[:, :, :prefix, :prefix],
                   caches=caches)
    assert torch.allclose(logits, full[:, :prefix], atol=1e-4)
    for t in range(prefix, 14):
        step = model(seq[:, t:t + 1], positions=positions[:, t:t + 1], attn_mask=visible[:, :, t:t + 1, :t + 1],
                     caches=caches)
        assert torch.allclose(step[:, 0], full[:, t], atol=1e-4)


def test_hidden_states_give_the_logits():
    model, idx = tiny_model(), torch.randint(3, V, (2, 9))
    logits, hidden = model(idx, return_hidden=True)
    assert hidden.shape == (2, 3, 9, 32)
    assert torch.allclose(model.lm_head(model.ln_f(hidden[:, -1])), logits, atol=1e-6)


def test_bf16_autocast_keeps_fp32_weights_and_gradients_close_to_fp32():
    model, idx = tiny_model().train(), torch.randint(3, V, (4, 20))
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with autocast("cpu", precision):
            logits = model(idx)
        assert logits.dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
        logits.float().logsumexp(-1).mean().backward()
        grads[precision] = model.blocks[0].attn.qkv.weight.grad.clone()
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert torch.allclose(grads["bf16"], grads["fp32"], atol=0.05 * grads["fp32"].abs().max().item())
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="--precision must be one of auto, bf16, fp32"):
        resolve_precision("fp16", "cpu")


def test_router_log_probs_renormalise_over_latents():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    log_p, outside = router_log_probs(logits, [1, 3])
    assert torch.allclose(log_p.exp(), torch.tensor([[0.2 / 0.6, 0.4 / 0.6]]))
    assert torch.allclose(outside, torch.tensor([0.4]))


def test_pad_batch_marks_targets_after_start():
    idx, mask = pad_batch([[1, 2, 3, 4], [1, 2]], PAD, [2, 1])
    assert idx.tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]]
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_learning_rate_warms_up_then_holds_or_decays_to_a_tenth():
    assert learning_rate(0, 1.0, warmup=4, total=20) == pytest.approx(0.25)
    assert learning_rate(3, 1.0, warmup=4, total=20) == pytest.approx(1.0)
    assert learning_rate(4, 1.0, warmup=4, total=20) == pytest.approx(1.0)
    assert learning_rate(12, 1.0, warmup=4, total=20) == pytest.approx(0.55)  # half-way: the cosine's midpoint
    assert learning_rate(20, 1.0, warmup=4, total=20) == pytest.approx(0.1)
    assert learning_rate(20, 1.0, warmup=4, total=20, decay=False) == 1.0


def test_checkpoint_round_trip_and_errors(tmp_path):
    model, idx = tiny_model(), torch.randint(3, V, (2, 9))
    path = str(tmp_path / "ckpt.pt")
    vocab = [f"t{i}" for i in range(V)]
    save_checkpoint(path, model, vocab, "grid_pathfinding", step=7)
    ckpt = load_checkpoint(path, vocab=vocab, task="grid_pathfinding")
    assert ckpt["step"] == 7
    assert torch.equal(model_from_checkpoint(ckpt).eval()(idx), model(idx))

    with pytest.raises(CheckpointError, match="vocabulary differs"):
        load_checkpoint(path, vocab=vocab[:-1])
    with pytest.raises(CheckpointError, match="not 'sorting_algorithms'"):
        load_checkpoint(path, task="sorting_algorithms")
    ckpt["model_config"]["n_embd"] = 64
    with pytest.raises(CheckpointError, match="do not match"):
        model_from_checkpoint(ckpt, path)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt: unreadable"):
        load_checkpoint(str(truncated))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
