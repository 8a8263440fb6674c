"""Figures for the report (matplotlib, Agg backend: no display needed). Each function writes one PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_bars(tasks: list[str], methods: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Per-task accuracy (and the average) per method, error bars = std over seeds."""
    columns = tasks + ["avg"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(columns) * max(1, len(methods)) / 2), 3.8))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(columns))
    for i, (label, m) in enumerate(methods.items()):
        cells = [m["per_task"][t] if t != "avg" else m["avg"] for t in columns]
        means = [100 * c["mean"] if c["mean"] is not None else 0.0 for c in cells]
        stds = [100 * c["std"] if c["std"] is not None else 0.0 for c in cells]  # one seed: no bar
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=f"{label} (n={m['n_seeds']})")
    ax.set_xticks(x, columns, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def routing(counts: list[list[float]], path: Path, title: str) -> Path:
    """Expert load heatmap (share of each layer's tokens per expert) and load entropy per layer."""
    arr = np.asarray(counts, dtype=np.float64)
    share = arr / np.maximum(arr.sum(axis=1, keepdims=True), 1)
    experts = arr.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -(np.where(share > 0, share * np.log(share), 0.0)).sum(axis=1) / (math.log(experts) if experts > 1 else 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 0.18 * arr.shape[0] + 2.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    image = left.imshow(share, aspect="auto", cmap="viridis", vmin=0)
    left.set_xlabel("expert")
    left.set_ylabel("layer")
    for axis in (left.xaxis, left.yaxis, right.yaxis):
        axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.set_title("share of tokens", fontsize=9)
    fig.colorbar(image, ax=left)
    right.plot(ent, np.arange(arr.shape[0]), marker=".")
    right.invert_yaxis()
    right.set_xlim(0, 1.02)
    right.set_xlabel("load entropy / log(E)")
    right.set_title("balance per layer (1 = uniform)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def training_curves(curves: dict[str, list[dict[str, float]]], path: Path, title: str) -> Path:
    """LM loss, aux loss and dev accuracy against the global step, one line per run."""
    panels = [("train/lm_loss", "LM loss"), ("train/aux_loss", "router aux loss"), ("val/avg_acc", "dev accuracy")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (key, name) in zip(axes, panels):
        for label, rows in curves.items():
            points = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label, alpha=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not ax.lines:  # e.g. runs without a dev pass
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    labelled = next((ax for ax in axes if ax.lines), None)
    if labelled is not None:
        labelled.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def study_history(study: dict[str, Any], path: Path) -> Path:
    """Objective value per trial and the best so far (first objective)."""
    direction = study["directions"][0]
    done = [t for t in study["trials"] if t["state"] == "COMPLETE" and t["values"]]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    if done:
        xs = [t["number"] for t in done]
        ys = [t["values"][0] for t in done]
        ax.scatter(xs, ys, s=18, label="complete")
        best = np.maximum.accumulate(ys) if direction == "maximize" else np.minimum.accumulate(ys)
        ax.step(xs, best, where="post", color="C1", label="best so far")
    pruned = [t for t in study["trials"] if t["state"] == "PRUNED" and t["intermediate"]]
    if pruned:
        ax.scatter([t["number"] for t in pruned], [t["intermediate"][max(t["intermediate"])] for t in pruned],
                   s=18, marker="x", color="grey", label="pruned (last report)")
    ax.set_xlabel("trial")
    ax.set_ylabel((study.get("objectives") or ["objective"])[0])
    ax.set_title(f"study {study['name']}: optimisation history", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def study_importances(study: dict[str, Any], path: Path) -> Path:
    items = sorted(study["importances"].items(), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(items) + 1.2))
    ax.barh([k for k, _ in items], [v for _, v in items])
    ax.set_xlabel("importance (fANOVA)")
    ax.set_title(f"study {study['name']}: parameter importances", fontsize=10)
    return _save(fig, path)


def study_parallel(study: dict[str, Any], path: Path) -> Path:
    """Parallel coordinates over the searched parameters, coloured by the first objective; for
    multi-objective studies, the first two objectives with the Pareto front marked."""
    done = [t for t in study["trials"] if t["state"] == "COMPLETE" and t["values"]]
    if len(study["directions"]) > 1:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        front = set(study["pareto"])
        for t in done:
            on = t["number"] in front
            ax.scatter(t["values"][0], t["values"][1], color="C3" if on else "C0", s=30 if on else 15)
        names = study.get("objectives") or ["objective 0", "objective 1"]
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        ax.set_title(f"study {study['name']}: Pareto front (red)", fontsize=10)
        ax.grid(alpha=0.3)
        return _save(fig, path)
    params = sorted({k for t in done for k in t["params"]})
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(params)), 4))
    values = [t["values"][0] for t in done]
    lo, hi = (min(values), max(values)) if values else (0, 1)
    cmap = plt.get_cmap("viridis")
    for t in done:
        ys = []
        for p in params:
            column = [u["params"].get(p) for u in done if p in u["params"]]
            v = t["params"].get(p)
            numeric = [c for c in column if isinstance(c, (int, float))]
            if isinstance(v, (int, float)) and numeric and max(numeric) > min(numeric):
                ys.append((math.log(v) - math.log(min(numeric))) / (math.log(max(numeric)) - math.log(min(numeric)))
                          if min(numeric) > 0 else (v - min(numeric)) / (max(numeric) - min(numeric)))
            else:
                ys.append(0.5)
        ax.plot(range(len(params)), ys, color=cmap((t["values"][0] - lo) / (hi - lo) if hi > lo else 0.5), alpha=0.8)
    ax.set_xticks(range(len(params)), [p.rsplit(".", 1)[-1] for p in params])
    ax.set_yticks([0, 1], ["low", "high"])
    ax.set_title(f"study {study['name']}: parallel coordinates (colour: objective, log scale where positive)",
                 fontsize=9)
    return _save(fig, path)


def study_settings(study: dict[str, Any], path: Path) -> Path | None:
    """The objective (top row) and, for MixLoRA trials, the load entropy of the last dev pass (bottom row)
    against each searched setting and the trainable parameters, one point per complete trial."""
    trials = [t for t in study["trials"] if t["state"] == "COMPLETE" and t["values"]]
    if not trials:
        return None
    names = sorted({k for t in trials for k in t["params"]})
    columns = [(n, n.rsplit(".", 1)[-1]) for n in names]
    if any(t["user_attrs"].get("trainable_params") for t in trials):
        columns.append(("trainable_params", "trainable params"))
    has_routing = any((t["user_attrs"].get("routing") or {}).get("load_entropy") is not None for t in trials)
    rows = [("objective", str((study.get("objectives") or ["objective"])[0]))]
    if has_routing:
        rows.append(("load_entropy", "load entropy (dev)"))
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.0 * len(columns), 2.6 * len(rows)), squeeze=False)
    for r, (row_key, row_label) in enumerate(rows):
        for c, (key, label) in enumerate(columns):
            ax = axes[r][c]
            points = []
            for t in trials:
                x = t["user_attrs"].get(key) if key == "trainable_params" else t["params"].get(key)
                y = t["values"][0] if row_key == "objective" else (t["user_attrs"].get("routing") or {}).get(row_key)
                if x is not None and y is not None:
                    points.append((x, float(y)))
            categories = sorted({str(x) for x, _ in points if isinstance(x, (str, bool))})
            if categories:  # named choices: one position each
                ax.scatter([categories.index(str(x)) for x, _ in points], [y for _, y in points], s=22)
                ax.set_xticks(range(len(categories)), categories)
            else:
                xs = [float(x) for x, _ in points]
                ax.scatter(xs, [y for _, y in points], s=22)
                if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels (2x10^1, ...) overlap
            if r == len(rows) - 1:
                ax.set_xlabel(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(row_label, fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{study['name']}: complete trials", fontsize=10)
    return _save(fig, path)
