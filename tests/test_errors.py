"""Bad input to the four scripts: one line on stderr, exit status 2, no traceback, no hang, and
nothing written to the run folder the command names. Each case fails before any training; the
scripts run in this process (as `python SCRIPT` runs them, through run_main), the cases that
used to hang in a subprocess with a timeout."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import disentangle as D
import evaluate
import figures
import train_base
from model import GPT, GPTConfig, run_main, save_checkpoint
from tasks import VOCAB

SCRIPTS = {"disentangle.py": D.main, "train_base.py": train_base.main, "evaluate.py": evaluate.main,
           "figures.py": figures.main}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny untrained base (runs/grid_pathfinding/base) and a finished 2-step stage-2 run beside it."""
    root = tmp_path_factory.mktemp("runs")
    base = root / "grid_pathfinding" / "base"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(VOCAB), block_size=96, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(str(base / "ckpt.pt"), model, VOCAB, "grid_pathfinding", task_options={"mixture": "uniform"},
                    train_config={"task": "grid"}, step=0)
    stage2 = root / "grid_pathfinding" / "discrete"
    assert D.main(["--base", str(base), "--out", str(stage2), "--steps", "2", "--starts", "1", "--batch-size", "2",
                   "--eval-inputs", "10", "--final-inputs", "10", "--device", "cpu"]) == 0
    (root / "a_file").write_text("not a folder")
    return root


def folder_state(folder):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def run_script(command, capsys, subprocess_timeout=0):
    """(exit status, stderr) of `python SCRIPT ARGS`, in this process unless a timeout is asked for."""
    if subprocess_timeout:
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=subprocess_timeout)
        return result.returncode, result.stderr
    script, *argv = command
    capsys.readouterr()
    try:
        code = SCRIPTS[script](argv) if script == "figures.py" else run_main(SCRIPTS[script], argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(command, message, untouched, capsys, subprocess_timeout=0):
    before = {str(f): folder_state(f) for f in untouched}
    code, stderr = run_script(command, capsys, subprocess_timeout)
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert message in lines[0], lines[0]
    assert {str(f): folder_state(f) for f in untouched} == before  # nothing written there


def stage2(runs, *args):
    """disentangle.py on the tiny base, --out the finished run: an error must leave it alone."""
    base, out = runs / "grid_pathfinding" / "base", runs / "grid_pathfinding" / "discrete"
    return ["disentangle.py", "--base", str(base), "--out", str(out), "--device", "cpu", *args], [out]


def stage1(runs, *args):
    """train_base.py with --out the tiny base run: an error must leave it alone."""
    base = runs / "grid_pathfinding" / "base"
    return ["train_base.py", "--out", str(base), "--device", "cpu", *args], [base]


NON_FINITE_OR_OUT_OF_RANGE = [
    (stage2, ["--lr", "inf"], "--lr must be a finite number"),
    (stage2, ["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (stage2, ["--beta", "1e300"], "--beta must be a finite number in [0, 1e6]"),
    (stage2, ["--jsd", "nan"], "--jsd must be a finite number"),
    (stage2, ["--grad-clip", "-1"], "--grad-clip must be a finite number in [0, 1e6], got -1.0"),
    (stage2, ["--grad-clip", "0"], "--grad-clip must be positive"),
    (stage2, ["--free-bits", "nan"], "--free-bits must be a finite number"),
    (stage1, ["--lr", "inf"], "--lr must be a finite number"),
    (stage1, ["--grad-clip", "0"], "--grad-clip must be positive"),
]
CONTRADICTIONS = [
    (stage2, ["--latent", "continuous", "--k", "5"], "--k has no effect with --latent continuous"),
    (stage2, ["--latent", "continuous", "--jsd", "1"], "--jsd has no effect with --latent continuous"),
    (stage2, ["--posterior-variance", "1"], "--posterior-variance has no effect with --latent discrete"),
    (stage2, ["--cluster-init", "0", "--cluster-hold", "5"], "--cluster-hold has no effect with --cluster-init 0"),
    (stage1, ["--task", "add", "--task-options", "n_digits=2,n_digits=3"], "task option n_digits is given twice"),
]
HANGS = [
    (stage1, ["--task", "sum", "--task-options", "max_value=1"], "leave too few distinct inputs for a train split"),
    (stage1, ["--task", "base", "--task-options", "max_value=8"], "leave too few distinct inputs for a test split"),
]
SIZES = [
    (stage1, ["--batch-size", "100000000"], "--batch-size must be in [0, 10^7]"),
    (stage1, ["--batch-size", "100000"], "--batch-size must be at most 4096"),
    (stage2, ["--eval-inputs", "1000000"], "--eval-inputs must be at most 100000"),
]
MESSAGES = [
    (stage1, ["--task", "linear", "--task-options", "max_coef=1"], "leave an empty range to draw inputs from"),
    (stage1, ["--task", "sum", "--task-options", "n=60"], "more than the model's block size 160"),
    (stage2, ["--data", "model", "--out", "{new}"], "too few to cluster: train it longer, or take y from"),
    (stage2, ["--steps", "4", "--starts", "1"], "exists; pass --resume to continue it"),
    (stage2, ["--resume", "--steps", "4", "--starts", "1", "--router-support", "2"], "--resume with settings that differ"),
]


@pytest.mark.parametrize("make, args, message", NON_FINITE_OR_OUT_OF_RANGE + CONTRADICTIONS + SIZES + MESSAGES)
def test_bad_values_are_one_clear_line(runs, tmp_path, capsys, make, args, message):
    command, untouched = make(runs, *[str(tmp_path / "new") if a == "{new}" else a for a in args])
    assert_one_line_error(command, message, untouched, capsys)


@pytest.mark.parametrize("make, args, message", HANGS)
def test_empty_splits_fail_fast(runs, capsys, make, args, message):
    command, untouched = make(runs, *args)
    assert_one_line_error(command, message, untouched, capsys, subprocess_timeout=60)


def test_file_system_errors_are_one_clear_line(runs, capsys):
    under_a_file = str(runs / "a_file" / "run")
    assert_one_line_error(["train_base.py", "--out", under_a_file, "--steps", "1"], "a_file",
                          [runs / "grid_pathfinding"], capsys)
    command, untouched = stage2(runs)
    command[command.index("--out") + 1] = under_a_file
    assert_one_line_error(command, "a_file", untouched, capsys)


def test_checkpoint_content_errors_are_one_clear_line(runs, tmp_path, capsys):
    ckpt = torch.load(runs / "grid_pathfinding" / "base" / "ckpt.pt", weights_only=True)
    foreign = tmp_path / "foreign"
    save_checkpoint(str(foreign / "ckpt.pt"), GPT(GPTConfig(vocab_size=len(VOCAB), n_layer=1, n_head=2, n_embd=32)),
                    VOCAB, "grid_pathfinding")
    ckpt_unknown = {**ckpt, "model_config": {**ckpt["model_config"], "rotary": True}}
    (tmp_path / "unknown").mkdir()
    torch.save(ckpt_unknown, tmp_path / "unknown" / "ckpt.pt")
    assert_one_line_error(["evaluate.py", str(tmp_path / "unknown"), "--inputs", "5"],
                          "model_config does not fit this code", [tmp_path / "unknown"], capsys)
    assert_one_line_error(["train_base.py", "--out", str(foreign), "--resume", "--n-layer", "1", "--n-head", "2",
                           "--n-embd", "32"], "no train_config to resume from", [foreign], capsys)
    assert_one_line_error(["evaluate.py", str(runs / "grid_pathfinding" / "discrete"), "--inputs", "0"],
                          "--inputs must be between 1 and 100000", [runs / "grid_pathfinding"], capsys)


def test_snapshot_content_errors_are_one_clear_line(runs, tmp_path, capsys):
    base = tmp_path / "grid_pathfinding" / "base"
    base.mkdir(parents=True)
    (base / "probes.npz").write_bytes(b"PK\x03\x04 truncated")
    assert_one_line_error(["figures.py", "--runs", str(tmp_path)], "unreadable snapshot", [base], capsys)
    (base / "ckpt.pt").write_bytes((runs / "grid_pathfinding" / "base" / "ckpt.pt").read_bytes())
    assert_one_line_error(["evaluate.py", str(base), "--inputs", "5", "--device", "cpu"], "unreadable snapshot",
                          [base], capsys)
    np.savez(base / "probes.npz", something_else=np.zeros(3))
    assert_one_line_error(["figures.py", "--runs", str(tmp_path)], "not a probe snapshot", [base], capsys)


def test_figures_refuse_another_tasks_run(tmp_path, capsys):
    base = tmp_path / "grid_pathfinding" / "base"
    base.mkdir(parents=True)
    np.savez(base / "probes.npz", steps=np.array([0]), acc=np.zeros((1, 2, 3)), acc_shuffled=np.zeros((1, 2, 3)),
             chance=0.3)
    (base / "config.json").write_text(json.dumps({"task": "sort"}))
    assert_one_line_error(["figures.py", "--task", "grid", "--runs", str(tmp_path)],
                          "holds a run of task 'sort', not grid_pathfinding", [base], capsys)
