"""
Key Figures 1-3 as PNG and GIF, read from the run folders the two stages wrote.

    Key Figure 1  when does the base model "decide" its strategy? Linear-probe accuracy of the
                  strategy from the residual stream, per layer and y-position (heatmap, chance
                  marked), and the same over base training (checkpoint x position, and a GIF).
    Key Figure 2  does z control the strategy? Discrete: the latent x strategy contingency of
                  controlled decodes over stage-2 training; continuous: posterior means coloured
                  by the true strategy (2-D projection), one facet per snapshot, and a GIF.
    Key Figure 3  the posterior over training: strategy-centroid distance and within-strategy
                  spread, linear decodability of the strategy from the posterior, and the
                  posterior itself as an animated scatter.

    python figures.py --task grid        # reads runs/grid_pathfinding/{base,discrete,continuous}
    python figures.py --all              # every task that has runs

Writes runs/<task>/figures/*.png and *.gif. Only reads run folders; never trains or evaluates.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.animation import FuncAnimation, PillowWriter  # noqa: E402

import torch  # noqa: E402

from evaluate import alignment_one_to_one, centroid_geometry, nearest_centroid_accuracy, read_snapshot  # noqa: E402
from model import OneLineParser  # noqa: E402
from tasks import TASKS, get_task  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Reading snapshots


def load_snapshots(path):
    """posterior.npz holds 'name@step' arrays: returns (sorted steps, {name: [array per step]})."""
    data = read_snapshot(path)
    if not data or any(k.count("@") != 1 or not k.split("@")[1].isdigit() for k in data):
        raise ValueError(f"{path}: not a posterior snapshot of disentangle.py (keys 'name@step')")
    steps = sorted({int(k.split("@")[1]) for k in data})
    names = sorted({k.split("@")[0] for k in data})
    return steps, {n: [data[f"{n}@{s}"] for s in steps if f"{n}@{s}" in data] for n in names}


def check_run_task(run_dir, task):
    """A run folder's config.json must name the task whose figures are being drawn."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f).get("task")
    except FileNotFoundError:
        return
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: unreadable config.json") from None
    if saved is None or get_task(saved).name != task.name:
        raise ValueError(f"{run_dir} holds a run of task {saved!r}, not {task.name}")


def project_2d(points, basis=None):
    """Projection to 2-D on the principal components of basis (default: points themselves), so
    that two sets of points can share axes (points of dimension <= 2 are padded)."""
    basis = points if basis is None else basis
    centred = points - basis.mean(0)
    if centred.shape[1] <= 2:
        return np.pad(centred, ((0, 0), (0, 2 - centred.shape[1])))
    _, _, vt = np.linalg.svd(basis - basis.mean(0), full_matrices=False)
    return centred @ vt[:2].T


def simplex_2d(q):
    """Points on the K-simplex -> 2-D: vertex k of a regular K-gon weighted by q_k."""
    K = q.shape[1]
    angles = 2 * np.pi * np.arange(K) / K
    return q @ np.stack([np.sin(angles), np.cos(angles)], 1)


def save_gif(fig, update, frames, path):
    FuncAnimation(fig, update, frames=frames).save(path, writer=PillowWriter(fps=2))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Key Figure 1: probes of the base model


def key_figure_1(task, base_dir, out):
    snaps = read_snapshot(os.path.join(base_dir, "probes.npz"))
    if not {"steps", "acc", "chance"} <= set(snaps):
        raise ValueError(f"{base_dir}/probes.npz: not a probe snapshot of train_base.py")
    steps, acc, chance = snaps["steps"], snaps["acc"], float(snaps["chance"])  # acc (n, L+1, P)
    run = os.path.relpath(base_dir)
    final = acc[-1]
    P = final.shape[1] - int(np.isnan(final).all(0)[::-1].argmin())  # drop all-NaN trailing positions
    kw = dict(vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")

    fig, ax = plt.subplots(figsize=(9, 3.2))
    im = ax.imshow(final[:, :P], **kw)
    ax.set(xlabel="y-position (0 = <y>, p = after p tokens of y)", ylabel="layer (0 = embeddings)",
           title=f"KF1 {task.name}: strategy probe accuracy, step {steps[-1]} (chance {chance:.2f})\n{run}")
    cbar = fig.colorbar(im, ax=ax, label="held-out accuracy")
    cbar.ax.axhline(chance, color="red", lw=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kf1_probe_layer_position.png"), dpi=110)
    plt.close(fig)

    best = np.nan_to_num(acc[:, :, :P], nan=0.0).max(1)  # (n, P): best layer per position
    fig, ax = plt.subplots(figsize=(9, 3.2))
    im = ax.imshow(best, **kw)
    ax.set_yticks(range(len(steps)), [str(s) for s in steps])
    ax.set(xlabel="y-position", ylabel="training step",
           title=f"KF1 {task.name}: best-layer probe accuracy over base training (chance {chance:.2f})\n{run}")
    fig.colorbar(im, ax=ax, label="held-out accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "kf1_probe_over_training.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 3.2))
    im = ax.imshow(acc[0, :, :P], **kw)
    fig.colorbar(im, ax=ax, label="held-out accuracy")
    ax.set(xlabel="y-position", ylabel="layer")

    def update(i):
        im.set_data(acc[i, :, :P])
        ax.set_title(f"KF1 {task.name}: probe accuracy at step {steps[i]} (chance {chance:.2f})")

    save_gif(fig, update, len(steps), os.path.join(out, "kf1_probe.gif"))


# ----------------------------------------------------------------------------------------------
# Key Figures 2 and 3: the latent under stage 2


def key_figure_2(task, run_dir, latent, out):
    steps, snaps = load_snapshots(os.path.join(run_dir, "posterior.npz"))
    names, run = task.strategies, os.path.relpath(run_dir)
    if latent == "discrete":
        tables = snaps["contingency"]
        K = tables[0].shape[0]
        fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps), 3.8), squeeze=False)
        for ax, step, C in zip(axes[0], steps, tables):
            ax.imshow(C / max(C.sum(1).max(), 1), vmin=0, vmax=1, cmap="Blues")
            ax.set_title(f"step {step}")
            ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
            ax.set_yticks(range(K), [f"z{k + 1}" for k in range(K)])
        axes[0][0].set_ylabel("latent")
        fig.suptitle(f"KF2 {task.name}: strategy of the decode under each latent (controlled)\n{run}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"kf2_{latent}_contingency.png"), dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        im = ax.imshow(tables[0] / max(tables[0].sum(1).max(), 1), vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(K), [f"z{k + 1}" for k in range(K)])
        fig.tight_layout()

        def update(i):
            im.set_data(tables[i] / max(tables[i].sum(1).max(), 1))
            ax.set_title(f"KF2 {task.name}: latent x strategy, step {steps[i]}", fontsize=9)

        save_gif(fig, update, len(steps), os.path.join(out, f"kf2_{latent}_contingency.gif"))
        return
    scatter_over_training(task, steps, snaps["mu"], snaps["strategy"], run, out,
                          f"KF2 {task.name}: posterior mean of z by true strategy", f"kf2_{latent}_z")
    if "z_sampled" in snaps:  # beside them, on the same axes: where the router's draws land
        scatter_over_training(task, steps, snaps["z_sampled"], snaps["z_strategy"], run, out,
                              f"KF2 {task.name}: router draws z ~ p(z|x) by decoded strategy",
                              f"kf2_{latent}_router_draws", basis=snaps["mu"])


def scatter_over_training(task, steps, points, labels, run, out, title, stem, simplex=False, basis=None):
    """One facet per snapshot (PNG) and one frame per snapshot (GIF), coloured by strategy;
    projected on the principal components of basis (one array per snapshot) when given."""
    proj = [simplex_2d(p) if simplex else project_2d(p, b) for p, b in zip(points, basis or points)]
    colors = plt.cm.tab10(np.arange(len(task.strategies)))
    lim = max((np.abs(xy).max() for xy in proj if xy.size), default=1.0) * 1.1 + 1e-6  # one scale for all
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps), 3.0), squeeze=False)
    for ax, step, xy, lab in zip(axes[0], steps, proj, labels):
        for c, name in enumerate(task.strategies):
            ax.scatter(*xy[lab == c].T, s=6, color=colors[c], label=name)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
        ax.set_title(f"step {step}", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="best", markerscale=2)
    fig.suptitle(f"{title}\n{run}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{stem}.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))

    def update(i):
        ax.clear()
        for c, name in enumerate(task.strategies):
            ax.scatter(*proj[i][labels[i] == c].T, s=8, color=colors[c], label=name)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
        ax.legend(fontsize=7, loc="upper right")
        ax.set_title(f"{title.split(':')[0]}: step {steps[i]}", fontsize=9)

    save_gif(fig, update, len(steps), os.path.join(out, f"{stem}.gif"))


def key_figure_3(task, run_dir, latent, out):
    steps, snaps = load_snapshots(os.path.join(run_dir, "posterior.npz"))
    points = snaps["q"] if latent == "discrete" else snaps["mu"]
    labels, run = snaps["strategy"], os.path.relpath(run_dir)
    S = len(task.strategies)
    geometry = [centroid_geometry(torch.from_numpy(p).float(), torch.from_numpy(lab).long(), S)
                for p, lab in zip(points, labels)]
    stats = np.array([[g["centroid_pairwise_distance"], g["within_strategy_spread"]] for g in geometry])  # (n, 2)
    if latent == "discrete":
        decodable = [alignment_one_to_one(torch.from_numpy(C)) for C in snaps["posterior_contingency"]]
        decodable_label = "posterior accuracy (best matching)"
    else:
        decodable = [nearest_centroid_accuracy(torch.from_numpy(p).float(), torch.from_numpy(lab).long(), S)
                     for p, lab in zip(points, labels)]
        decodable_label = "nearest-centroid accuracy of mu"
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.4))
    a1.plot(steps, stats[:, 0], "o-", label="mean centroid distance")
    a1.plot(steps, stats[:, 1], "s-", label="mean within-strategy spread")
    a1.set(xlabel="stage-2 step", ylabel="distance", title="posterior strategy centroids")
    a1.legend(fontsize=8)
    a2.plot(steps, decodable, "o-", color="C2")
    a2.axhline(1 / len(task.strategies), color="gray", ls="--", label="chance")
    a2.set(xlabel="stage-2 step", ylabel=decodable_label, ylim=(0, 1.05), title="strategy decodable from the posterior")
    a2.legend(fontsize=8)
    fig.suptitle(f"KF3 {task.name} ({latent}): posterior over training\n{run}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"kf3_{latent}_centroids.png"), dpi=110)
    plt.close(fig)
    title = f"KF3 {task.name}: q(z|x,y) on the simplex" if latent == "discrete" else \
        f"KF3 {task.name}: posterior mean of z"
    scatter_over_training(task, steps, points, labels, run, out, title, f"kf3_{latent}_posterior",
                          simplex=latent == "discrete")


# ----------------------------------------------------------------------------------------------


def render_task(name, runs="runs"):
    task = get_task(name)
    root = os.path.join(runs, task.name)
    base_dir = os.path.join(root, "base")
    if not os.path.exists(os.path.join(base_dir, "probes.npz")):
        raise FileNotFoundError(f"{base_dir}/probes.npz is missing: run stage 1 first "
                                f"(python train_base.py --task {task.alias})")
    latents = [latent for latent in ("discrete", "continuous")
               if os.path.exists(os.path.join(root, latent, "posterior.npz"))]
    for run_dir in [base_dir] + [os.path.join(root, latent) for latent in latents]:
        check_run_task(run_dir, task)
    out = os.path.join(root, "figures")
    os.makedirs(out, exist_ok=True)
    key_figure_1(task, base_dir, out)
    done = ["Key Figure 1"]
    for latent in latents:
        key_figure_2(task, os.path.join(root, latent), latent, out)
        key_figure_3(task, os.path.join(root, latent), latent, out)
        done.append(f"Key Figures 2-3 ({latent})")
    if len(done) == 1:
        print(f"{task.name}: no stage-2 run yet (python disentangle.py --task {task.alias}); "
              f"rendered Key Figure 1 only")
    print(f"{task.name}: {', '.join(done)} -> {out}")
    return out


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="grid", help="task name or alias")
    parser.add_argument("--all", action="store_true", help="every task that has a runs/<task>/base folder")
    parser.add_argument("--runs", default="runs", help="the folder holding the run folders")
    args = parser.parse_args(argv)
    try:
        if args.all:
            names = [n for n in TASKS if os.path.isdir(os.path.join(args.runs, n, "base"))]
            if not names:
                raise FileNotFoundError(f"no task under {args.runs}/ has a base run yet")
            for name in names:
                render_task(name, args.runs)
        else:
            render_task(args.task, args.runs)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: a snapshot in {args.runs} lacks the array {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
