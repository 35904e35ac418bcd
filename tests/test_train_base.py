"""train_base.py: a short run learns, --resume is exact, user errors are one clear line."""

import json
import subprocess
import sys

import pytest
import torch

import train_base
from model import load_checkpoint, model_from_checkpoint, pad_batch
from tasks import PAD, VOCAB, encode, get_task, record_tokens

TINY = ["--task", "grid", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "16",
        "--eval-inputs", "16", "--final-inputs", "16", "--probe-inputs", "60", "--log-interval", "5",
        "--device", "cpu"]


def run_tiny(out, steps, *extra, eval_interval=0):
    """A tiny run that evaluates at its last step only (or every eval_interval steps)."""
    every = str(eval_interval or steps)
    return train_base.main(TINY + ["--out", str(out), "--steps", str(steps), "--eval-interval", every, *extra])


def y_token_accuracy(model, task, n=64):
    """Teacher-forced argmax accuracy on the y tokens of DGP records."""
    import random
    rng = random.Random(0)
    records, starts = [], []
    for _ in range(n):
        x, _, y = task.sample(rng, "test")
        records.append(encode(record_tokens(task.input_tokens(x), y)))
        starts.append(len(task.input_tokens(x)) + 7)
    idx, mask = pad_batch(records, PAD, starts)
    with torch.no_grad():
        hits = model(idx)[:, :-1].argmax(-1) == idx[:, 1:]
    return float((hits & mask).sum() / mask.sum())


def test_short_run_lowers_loss_and_beats_chance(tmp_path):
    assert run_tiny(tmp_path, 60, "--lr", "3e-3") == 0
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    losses = [r["loss/y"] for r in log if "loss/y" in r]
    assert losses[-1] < 0.6 * losses[0]
    model = model_from_checkpoint(load_checkpoint(str(tmp_path / "ckpt.pt"), vocab=VOCAB)).eval()
    assert y_token_accuracy(model, get_task("grid")) > 5 / len(VOCAB)  # chance is 1/V
    assert {"answer_accuracy", "strategy_tv", "excess_nll", "probe_first_position_95"} <= set(log[-1])
    seconds = [r["train_seconds"] for r in log if "answer_accuracy" in r]  # minutes-to-target reads these
    assert len(seconds) == 2 and 0 < seconds[0] < seconds[1]
    assert json.load(open(tmp_path / "metrics.json"))["train_seconds"] == seconds[1]
    probes = __import__("numpy").load(tmp_path / "probes.npz")
    assert list(probes["steps"]) == [0, 60]


def test_exact_branches_replace_the_sampled_token_by_p_star_only_where_traces_part():
    task = get_task("grid")
    sampled = train_base.BatchStream(task, 0, 16, exact_branches=False).batch(0, "cpu")
    exact = train_base.BatchStream(task, 0, 16, exact_branches=True).batch(0, "cpu")
    assert torch.equal(sampled.idx, exact.idx)
    differs = (sampled.targets != exact.targets).any(-1)  # (B, T-1)
    assert differs.any() and not (differs & ~sampled.mask).any()
    assert torch.allclose(exact.targets[differs].sum(-1), torch.ones(int(differs.sum())))
    assert {round(p, 4) for p in exact.targets[differs].max(-1).values.tolist()} <= {0.5, 0.6667}  # grid, uniform p*
    model = train_base.GPT(train_base.GPTConfig(vocab_size=len(VOCAB), n_layer=1, n_head=2, n_embd=32))
    gathered = torch.log_softmax(model(sampled.idx)[:, :-1], -1).gather(-1, sampled.idx[:, 1:, None])[..., 0]
    assert torch.isclose(train_base.y_loss(model, sampled), -(gathered * sampled.mask).sum() / sampled.mask.sum())


def test_task_options_reach_the_checkpoint(tmp_path):
    assert run_tiny(tmp_path, 2, "--task-options", "size=5") == 0
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["task_options"] == {"mixture": "uniform", "size": 5}


def test_resume_gives_the_same_weights(tmp_path, monkeypatch):
    assert run_tiny(tmp_path / "straight", 20, eval_interval=10) == 0

    batch = train_base.BatchStream.batch

    def interrupted(self, step, device):
        if step == 15:
            raise KeyboardInterrupt
        return batch(self, step, device)

    monkeypatch.setattr(train_base.BatchStream, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "resumed", 20, eval_interval=10)
    monkeypatch.setattr(train_base.BatchStream, "batch", batch)
    assert run_tiny(tmp_path / "resumed", 20, "--resume", eval_interval=10) == 0

    a = load_checkpoint(str(tmp_path / "straight" / "ckpt.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert steps == sorted(steps)  # the log has no lines from after the interruption twice


@pytest.mark.parametrize("args, message", [
    (["--task", "chess"], "unknown task 'chess'"),
    (["--steps", "-3"], "--steps must be in [0, 10^7], got -3"),
    (["--batch-size", "many"], "invalid int value"),
    (["--resume", "--out", "/nonexistent/run"], "no checkpoint there"),
    (["--task", "add", "--task-options", "digits=2"], "has no integer option 'digits'; its options: n_digits=3"),
])
def test_user_errors_are_one_clear_line(args, message):
    result = subprocess.run([sys.executable, "train_base.py", *args], capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
