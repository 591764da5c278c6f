"""Figures for the evaluation: predicted vs actual scatter, recall curves, accuracy after removal,
and grids of task images with their (possibly corrupted) labels.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas — pyplot's global
state and interactive backends are never touched, so this is safe in scripts, tests and notebooks —
rendered to PNG in memory and written atomically (temporary file in the same folder, then
``os.replace``). Every function returns the path it wrote.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import SettingsError
from ..evaluation.metrics import _as_float, _to_numpy, pearson, spearman
from ..io import atomic_write_bytes

__all__ = ["scatter_predicted_vs_actual", "recall_curves", "accuracy_vs_removed", "task_image_grid"]

_DPI = 110


def _new_figure(width: float, height: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _check_png_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise SettingsError(f"figure path {p} does not end in .png; figures are written as PNG, name them *.png")
    return p


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    fig.clear()
    return atomic_write_bytes(path, buf.getvalue())


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def scatter_predicted_vs_actual(pred: Any, actual: Any, path: str | os.PathLike, title: str = "",
                                xlabel: str = "predicted change", ylabel: str = "actual change") -> Path:
    """Scatter of predicted (x) against actual (y) values with the y = x line; the title carries
    Pearson r, Spearman ρ and n. Both inputs are 1-D of equal length."""
    p = _check_png_path(path)
    x = _as_float(pred, "pred")
    y = _as_float(actual, "actual")
    if x.shape[0] != y.shape[0]:
        raise SettingsError(f"pred has {x.shape[0]} entries but actual has {y.shape[0]}; pass one value per item in both")
    if x.shape[0] == 0:
        raise SettingsError("nothing to plot: pred and actual are empty")
    r, rho = (pearson(x, y), spearman(x, y)) if x.shape[0] >= 2 else (float("nan"), float("nan"))

    fig = _new_figure(4.8, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    lo = float(min(x.min(), y.min()))
    hi = float(max(x.max(), y.max()))
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.5", linestyle="--", linewidth=1, label="y = x", zorder=1)
    ax.scatter(x, y, s=18, alpha=0.75, color="tab:blue", edgecolors="none", zorder=2)
    ax.axhline(0.0, color="0.85", linewidth=0.8, zorder=0)
    ax.axvline(0.0, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    stats = f"Pearson r = {_fmt(r)}, Spearman ρ = {_fmt(rho)}, n = {x.shape[0]}"
    ax.set_title(f"{title}\n{stats}" if title else stats, fontsize=10)
    ax.legend(loc="best", fontsize=8, frameon=False)
    ax.grid(True, alpha=0.25)
    return _save(fig, p)


def recall_curves(curves: Mapping[str, tuple[Any, Any]], path: str | os.PathLike, corrupted_fraction: float | None = None,
                  title: str = "Mislabeled detection", xlabel: str = "fraction of tasks inspected") -> Path:
    """Recall of corrupted items against the fraction inspected, one line per method
    (``curves[name] = (fractions, recall)`` as returned by :func:`metrics.recall_curve`), with the
    random-inspection diagonal and, if given, a vertical line at the corrupted fraction."""
    p = _check_png_path(path)
    if not curves:
        raise SettingsError("recall_curves got no curves; pass {method name: (fractions, recall)}")
    fig = _new_figure(5.2, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.5", linestyle=":", linewidth=1.2, label="random")
    for name, pair in curves.items():
        try:
            fr, rec = pair
        except (TypeError, ValueError):
            raise SettingsError(f"curve {name!r} is not a (fractions, recall) pair; pass the output of recall_curve") from None
        fr = _as_float(fr, f"fractions of {name!r}")
        rec = _as_float(rec, f"recall of {name!r}")
        if fr.shape != rec.shape:
            raise SettingsError(f"curve {name!r} has {fr.shape[0]} fractions but {rec.shape[0]} recall values; pass equal lengths")
        ax.plot(fr, rec, linewidth=1.8, label=str(name), drawstyle="steps-post" if fr.shape[0] > 30 else "default")
    if corrupted_fraction is not None:
        cf = float(corrupted_fraction)
        if not 0.0 <= cf <= 1.0:
            raise SettingsError(f"corrupted_fraction={corrupted_fraction!r} is outside [0, 1]; pass the fraction of corrupted items")
        ax.axvline(cf, color="tab:red", linestyle="--", linewidth=1, label=f"corrupted fraction = {cf:.2f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("recall of corrupted items")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.25)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, p)


def accuracy_vs_removed(results: Mapping[str, tuple[Any, Any, Any]], path: str | os.PathLike,
                        title: str = "Meta-test accuracy after removal", xlabel: str = "fraction removed",
                        ylabel: str = "meta-test accuracy") -> Path:
    """Accuracy against the fraction of data removed, one line per method with its 95% band
    (``results[name] = (fractions, acc, ci)``, ``ci`` the half-widths or None)."""
    p = _check_png_path(path)
    if not results:
        raise SettingsError("accuracy_vs_removed got no results; pass {method name: (fractions, acc, ci)}")
    fig = _new_figure(5.2, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for name, triple in results.items():
        try:
            fr, acc, ci = triple
        except (TypeError, ValueError):
            raise SettingsError(f"result {name!r} is not a (fractions, acc, ci) triple; pass ci=None if there is no interval") from None
        fr = _as_float(fr, f"fractions of {name!r}")
        acc = _as_float(acc, f"accuracy of {name!r}")
        if fr.shape != acc.shape:
            raise SettingsError(f"result {name!r} has {fr.shape[0]} fractions but {acc.shape[0]} accuracies; pass equal lengths")
        line, = ax.plot(fr, acc, marker="o", markersize=4, linewidth=1.6, label=str(name))
        if ci is not None:
            half = _to_numpy(ci, f"ci of {name!r}").astype(np.float64)
            if half.shape != acc.shape:
                raise SettingsError(f"result {name!r} has {acc.shape[0]} accuracies but ci of shape {half.shape}; pass one half-width per point")
            ok = np.isfinite(half)
            if ok.any():
                ax.fill_between(fr[ok], (acc - half)[ok], (acc + half)[ok], color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.25)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, p)


def _as_images(x: Any) -> np.ndarray:
    """(tasks, examples, C, H, W) float in [0, 1]; flat square features (tasks, examples, H·H) become 1×H×H."""
    arr = _to_numpy(x, "tasks")
    if arr.ndim == 3:
        side = int(round(math.sqrt(arr.shape[2])))
        if side * side != arr.shape[2]:
            raise SettingsError(f"tasks has shape {tuple(arr.shape)}; pass images shaped (tasks, examples, C, H, W)")
        arr = arr.reshape(arr.shape[0], arr.shape[1], 1, side, side)
    elif arr.ndim == 4:  # (tasks, examples, H, W)
        arr = arr[:, :, None]
    if arr.ndim != 5 or arr.shape[2] not in (1, 3):
        raise SettingsError(f"tasks has shape {tuple(arr.shape)}; pass images shaped (tasks, examples, C, H, W) with C = 1 or 3")
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
    return np.clip(arr, 0.0, 1.0)


def _as_labels(x: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    arr = _to_numpy(x, name)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.shape != shape:
        raise SettingsError(f"{name} has shape {tuple(arr.shape)} but the images are {shape[0]} tasks × {shape[1]} examples; pass one label per image")
    return arr


def task_image_grid(tasks: Any, path: str | os.PathLike, given_labels: Any = None, true_labels: Any = None,
                    title: str | None = None,
                    n_support: int | None = None, task_ids: Sequence[int] | None = None,
                    max_tasks: int = 4, max_examples: int = 20) -> Path:
    """A grid with one row per task (at most ``max_tasks``) and one image per example, each
    annotated with its given label and, where it differs, the true label in red (with a red frame).
    ``title`` defaults to a legend of these marks; pass "" for none.

    ``tasks``: images (tasks, examples, C, H, W) in [0, 1] (C = 1 grayscale or 3 RGB; (tasks,
    examples, H, W) and flat square features are accepted too) with ``given_labels`` (tasks,
    examples); the first ``n_support`` examples are marked S (support), the rest Q (query).
    A :class:`~metainfluence.tasks.tensors.TaskTensors` can be passed instead: its support and query
    are concatenated and its labels are the given labels. ``task_ids`` names the rows (pool ids).
    """
    p = _check_png_path(path)
    if hasattr(tasks, "support_x") and hasattr(tasks, "query_x"):
        import torch

        n_support = tasks.support_x.shape[1]
        images = torch.cat([tasks.support_x, tasks.query_x], dim=1)
        if given_labels is None:
            given_labels = torch.cat([tasks.support_y, tasks.query_y], dim=1)
    else:
        images = tasks
    if given_labels is None:
        raise SettingsError("task_image_grid needs given_labels shaped (tasks, examples); pass the labels the learner saw")
    imgs = _as_images(images)
    n_tasks, n_ex = imgs.shape[:2]
    given = _as_labels(given_labels, "given_labels", (n_tasks, n_ex))
    truth = _as_labels(true_labels, "true_labels", (n_tasks, n_ex)) if true_labels is not None else None
    if n_support is not None and not 0 <= int(n_support) <= n_ex:
        raise SettingsError(f"n_support={n_support} is outside 0..{n_ex}; pass the number of support examples per task")
    if task_ids is not None and len(task_ids) != n_tasks:
        raise SettingsError(f"task_ids has {len(task_ids)} entries for {n_tasks} tasks; pass one id per task")
    if n_tasks == 0 or n_ex == 0:
        raise SettingsError("nothing to plot: the task tensor has no tasks or no examples")

    rows = min(n_tasks, max(1, int(max_tasks)))
    cols = min(n_ex, max(1, int(max_examples)))
    cell = 1.05
    fig = _new_figure(cols * cell + 0.6, rows * (cell + 0.25) + 0.5, layout="constrained")
    for r in range(rows):
        for c in range(cols):
            ax = fig.add_subplot(rows, cols, r * cols + c + 1)
            img = imgs[r, c]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.imshow(np.transpose(img, (1, 2, 0)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            part = "" if n_support is None else ("S " if c < int(n_support) else "Q ")
            label = given[r, c]
            wrong = truth is not None and truth[r, c] != label
            text = f"{part}{_label_str(label)}" + (f" (true {_label_str(truth[r, c])})" if wrong else "")
            ax.set_title(text, fontsize=7, color="red" if wrong else "black", pad=2)
            if wrong:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(2)
            if c == 0:
                name = f"task {task_ids[r]}" if task_ids is not None else f"task {r}"
                ax.set_ylabel(name, fontsize=8)
    if title is None:
        notes = (["S = support, Q = query"] if n_support is not None else []) + (["red = given label differs from the true label"] if truth is not None else [])
        title = "Tasks" + (f" ({'; '.join(notes)})" if notes else "")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, p)


def _label_str(v: Any) -> str:
    if isinstance(v, (np.floating, float)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, np.floating):
        return f"{float(v):.2g}"
    return str(v.item() if hasattr(v, "item") else v)
