"""figures.py renders every key figure from a small synthetic run folder, headless."""

import numpy as np
import pytest

import figures
from tasks import get_task


def make_runs(root, latents):
    """A fake runs/grid_pathfinding/ with probe snapshots and posterior snapshots."""
    rng = np.random.default_rng(0)
    task = get_task("grid")
    base = root / task.name / "base"
    base.mkdir(parents=True)
    acc = rng.uniform(0.3, 1.0, size=(3, 5, 12))
    acc[:, :, -2:] = np.nan  # positions past the longest y
    np.savez(base / "probes.npz", steps=np.array([0, 10, 20]), acc=acc, acc_shuffled=acc * 0 + 0.33, chance=0.34)
    for latent in latents:
        folder = root / task.name / latent
        folder.mkdir()
        snaps = {}
        for step in (0, 5, 10):
            labels = rng.integers(0, 3, 60)
            snaps[f"strategy@{step}"] = labels
            if latent == "discrete":
                q = rng.dirichlet(np.ones(3), 60)
                snaps[f"q@{step}"] = q
                snaps[f"contingency@{step}"] = rng.integers(0, 20, (3, 3)).astype(float)
                snaps[f"posterior_contingency@{step}"] = rng.integers(0, 20, (3, 3)).astype(float)
            else:
                snaps[f"mu@{step}"] = rng.normal(size=(60, 4)) + labels[:, None] * step / 5
                snaps[f"z_sampled@{step}"] = rng.normal(size=(50, 4)) + labels[:50, None] * step / 5
                snaps[f"z_strategy@{step}"] = labels[:50]
        np.savez(folder / "posterior.npz", **snaps)


@pytest.mark.parametrize("latents", [("discrete",), ("continuous",), ("discrete", "continuous")])
def test_renders_every_figure(tmp_path, latents):
    make_runs(tmp_path, latents)
    assert figures.main(["--task", "grid", "--runs", str(tmp_path)]) == 0
    out = tmp_path / "grid_pathfinding" / "figures"
    expected = ["kf1_probe_layer_position.png", "kf1_probe_over_training.png", "kf1_probe.gif"]
    for latent in latents:
        expected += [f"kf3_{latent}_centroids.png", f"kf3_{latent}_posterior.png", f"kf3_{latent}_posterior.gif"]
        expected += [f"kf2_{latent}_contingency.png", f"kf2_{latent}_contingency.gif"] if latent == "discrete" else \
            [f"kf2_{latent}_z.png", f"kf2_{latent}_z.gif", f"kf2_{latent}_router_draws.png",
             f"kf2_{latent}_router_draws.gif"]
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:4] == (b"\x89PNG" if name.endswith(".png") else b"GIF8"), name
        assert len(data) > 5_000, name  # a real picture, not an empty canvas


def test_missing_stage_is_named(tmp_path, capsys):
    assert figures.main(["--task", "sort", "--runs", str(tmp_path)]) == 2
    assert "run stage 1 first" in capsys.readouterr().err
