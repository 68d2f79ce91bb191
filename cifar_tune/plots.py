"""The report's figures that carry their own logic (returned as matplotlib figures, so tests can read
their labels): the hyperparameter panels and the per-class accuracy; plus the small helpers the report's
other plots share. ``cifar_tune.report`` saves them."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from cifar_tune.text import compact

LOG_HINTS = ("lr", "learning_rate", "weight_decay", "wd", "eps")  # names that are searched on a log scale
MAX_LABELLED_CLASSES = 20  # beyond this, axis labels are unreadable


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def isna(v: Any) -> bool:
    if isinstance(v, list | tuple | np.ndarray | dict):
        return False
    if isinstance(v, str):  # parquet stores mixed-type config columns as JSON text: NaN/null mean absent
        return v in ("NaN", "null")
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def numeric(series: pd.Series) -> pd.Series | None:
    """The column as floats if every present value is a real number (not a bool), else None."""
    present = [v for v in series if not isna(v)]
    if not present or any(isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.integer | np.floating) for v in present):
        return None
    return pd.to_numeric(series, errors="coerce").astype(float)


def is_log_scale(col: str, values: pd.Series) -> bool:
    """lr-like names, or positive values spanning more than two decades."""
    v = values.dropna()
    if len(v) == 0 or (v <= 0).any():
        return False
    leaf = col.rsplit(".", 1)[-1].lower()
    return leaf in LOG_HINTS or leaf.endswith("_lr") or v.max() / v.min() > 100


@dataclass(frozen=True)
class Panel:
    """One panel of the hyperparameter figure: ``col`` over the trials of one branch (or all)."""

    col: str
    title: str
    branch: tuple[str, str] | None = None  # (column, value): only trials with that optimizer / model family


BRANCH_COLUMNS = {"config.optimizer.": "config.optimizer.name", "config.model.": "config.model.family"}


def _distinct(values: pd.Series) -> int:
    return len({json.dumps(v, default=str) for v in values if not isna(v)})


def hyperparameter_panels(trials: pd.DataFrame, cols: list[str]) -> list[Panel]:
    """A panel per searched column; a knob of an optimizer (or model family) gets one panel per branch
    where it varies, when the search chose between several: ``lr`` of SGD and of AdamW are searched over
    different ranges and are not one axis, and ``momentum`` exists only in SGD's trials."""
    panels = []
    for col in cols:
        branch_col = next((b for prefix, b in BRANCH_COLUMNS.items() if col.startswith(prefix) and col != b), None)
        names = sorted(trials[branch_col].dropna().astype(str).unique()) if branch_col in trials else []
        if len(names) < 2:
            panels.append(Panel(col, col.removeprefix("config.")))
            continue
        knob = col.removeprefix(branch_col.rsplit(".", 1)[0] + ".")
        section = branch_col.split(".")[1]
        for name in names:
            if _distinct(trials.loc[trials[branch_col].astype(str) == name, col]) > 1:
                panels.append(Panel(col, f"{section} {name}: {knob}", (branch_col, name)))
    return panels


def tick_label(value: Any, max_chars: int = 14) -> str:
    """A short label for a categorical or list-valued knob: ``blocks: [{channels: [16]}, ...]`` -> ``[16,32,64]``."""
    if isinstance(value, str) and value[:1] in "[{":
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    text = compact(value)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _natural(label: str) -> tuple[int, float, str]:
    """Numbers in numeric order (64 before 128), then the rest alphabetically."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def hyperparameter_figure(trials: pd.DataFrame, cols: list[str], score_col: str) -> Any | None:
    """The figure of :func:`plot_hyperparameters` (returned, not saved, so tests can read its labels)."""
    scored = trials[pd.to_numeric(trials[score_col], errors="coerce").notna()] if score_col in trials else trials.iloc[:0]
    panels = hyperparameter_panels(scored, cols)
    if not panels or scored.empty:
        return None
    plt = pyplot()
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.6 * nrows), squeeze=False, layout="constrained")
    vmax = max(1.0, float(pd.to_numeric(scored["epochs_run"], errors="coerce").fillna(0).max()))
    rng = np.random.default_rng(0)
    sc = None
    for ax, panel in zip(axes.flat, panels, strict=False):
        part = scored if panel.branch is None else scored[scored[panel.branch[0]].astype(str) == panel.branch[1]]
        part = part[[not isna(v) for v in part[panel.col]]]
        y = part[score_col].astype(float)
        colors = pd.to_numeric(part["epochs_run"], errors="coerce").fillna(0)
        num = numeric(part[panel.col])
        if num is not None:
            sc = ax.scatter(num, y, c=colors, cmap="viridis", s=18, vmin=0, vmax=vmax)
            if is_log_scale(panel.col, num):
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(numticks=4))
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow range overlap
            else:
                ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        else:
            labels = [tick_label(v) for v in part[panel.col]]
            cats = sorted(set(labels), key=_natural)
            pos = {c: i for i, c in enumerate(cats)}
            xs = [pos[lab] + rng.uniform(-0.15, 0.15) for lab in labels]
            sc = ax.scatter(xs, y, c=colors, cmap="viridis", s=18, vmin=0, vmax=vmax)
            # upright labels while they fit side by side, else vertical (a slanted label's box covers its neighbour's)
            ax.set_xticks(range(len(cats)), cats, rotation=0 if sum(map(len, cats)) <= 24 else 90, fontsize=7)
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.set_title(panel.title, fontsize=9)
        ax.set_ylabel(score_col, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if sc is not None:
        fig.colorbar(sc, ax=axes, label="epochs run", shrink=0.8)
    return fig


def per_class_figure(acc: np.ndarray, names: list[str], title: str) -> Any:
    """Bars of per-class accuracy, worst at the bottom, one colour, with the mean over all classes."""
    plt = pyplot()
    order = np.argsort(acc)
    shown = "all classes"
    if len(acc) > MAX_LABELLED_CLASSES:
        order = np.concatenate([order[:5], order[-5:]])  # the worst and the best five
        shown = f"worst and best 5 of {len(acc)} classes"
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.32 * len(order) + 1)), layout="constrained")
    ax.barh(range(len(order)), acc[order], color="tab:blue")
    ax.axvline(float(np.mean(acc)), color="black", linestyle="--", linewidth=1,
               label=f"mean over all classes {np.mean(acc):.3f}")
    ax.set_yticks(range(len(order)), [names[i] for i in order], fontsize=8)
    ax.set(xlim=(0, 1), xlabel="test accuracy", title=f"{title} ({shown})")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig
