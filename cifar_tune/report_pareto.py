"""The report's Pareto section (searches with several objectives): the front on validation and, after
``retrain``, on test accuracy, with dominated trials greyed, and the hypervolume over the search.

``report`` passes its plotting helpers in (``Plots``), so this module does not import it back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cifar_tune.pareto import hypervolume_frame, objective_column, pareto_columns
from cifar_tune.results import HYPERVOLUME_FILE, Experiment


@dataclass(frozen=True)
class Plots:
    pyplot: Callable[[], Any]  # matplotlib.pyplot on a non-interactive backend
    save: Callable[[Experiment, Any, str], str]  # (exp, figure, file name) -> the name written
    image: Callable[[str, str | None, str], list[str]]  # (title, file or None, caption) -> markdown lines


LABELS = {"val_acc": "validation accuracy", "val_loss": "validation loss", "val_top5": "validation top-5",
          "params": "parameters", "macs": "MACs per image", "latency_ms": "latency per eval batch (ms)",
          "train_time_s": "training time (s)"}


def _front_plot(kit: Plots, exp: Experiment, df: pd.DataFrame, y: str, y_label: str, costs: list[str], name: str,
                title: str) -> str | None:
    """``y`` against each cost (one panel each); front members (``pareto_rank`` 0) in colour and labelled,
    the rest grey. Ranks are over every objective, so a front member may look dominated in one panel."""
    df = df[pd.to_numeric(df[y], errors="coerce").notna()]
    if df.empty or not costs:
        return None
    plt = kit.pyplot()
    fig, axes = plt.subplots(1, len(costs), figsize=(5.2 * len(costs), 4), squeeze=False)
    front = df["pareto_rank"].fillna(-1).astype(int) == 0
    for ax, cost in zip(axes[0], costs, strict=True):
        x = pd.to_numeric(df[cost], errors="coerce")
        ax.scatter(x[~front], df.loc[~front, y].astype(float), s=18, color="0.7", label="dominated")
        ax.scatter(x[front], df.loc[front, y].astype(float), s=30, color="tab:blue", label="Pareto front", zorder=3)
        on = df[front].assign(_x=x[front]).sort_values("_x")
        if len(costs) == 1:  # (with more costs the front is not a staircase in any one panel)
            ax.step(on["_x"], on[y].astype(float), where="post", color="tab:blue", alpha=0.4)
        for _, r in on.iterrows():
            ax.annotate(str(r["trial_id"]), (r["_x"], float(r[y])), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if cost in ("params", "macs") and (x > 0).all():
            ax.set_xscale("log")
        ax.set(xlabel=LABELS.get(cost, cost), ylabel=y_label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return kit.save(exp, fig, name)


def _hypervolume_plot(kit: Plots, exp: Experiment, hv: pd.DataFrame) -> str | None:
    if hv.empty:
        return None
    plt = kit.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(hv["epochs_done"], hv["hypervolume_fraction"], drawstyle="steps-post")
    ax.set(xlabel="epochs trained by the search", ylabel="hypervolume (fraction of the box)",
           title="Hypervolume of the front so far")
    ax.grid(alpha=0.3)
    return kit.save(exp, fig, "report_hypervolume.png")


def pareto_section(kit: Plots, exp: Experiment, stored: Any, trials: pd.DataFrame, epochs: pd.DataFrame) -> list[str]:
    _image = kit.image
    objectives = tuple(stored.search.objectives)
    if len(objectives) < 2:
        return []
    df = pareto_columns(trials, objectives)
    primary = next(o for o in objectives if not o.is_cost)
    costs = [o.metric for o in objectives if o.is_cost]
    y = objective_column(primary.metric)
    for c in costs:
        df[c] = df[objective_column(c)]
    names = ", ".join(f"{o.metric} ({o.resolved_mode})" for o in objectives)
    n_front = int((df["pareto_rank"] == 0).sum())
    md = ["## Pareto front", "",
          f"Objectives: {names}. {n_front} of {int(df['pareto_rank'].notna().sum())} ranked trials are on the front "
          "(completed or stopped trials with every objective; validation metrics at each trial's best epoch)."]
    md += _image("Front on validation", _front_plot(kit, exp, df, y, LABELS.get(primary.metric, primary.metric), costs,
                                                    "report_pareto_val.png", "search: validation"),
                 "Each searched trial; blue: rank 0 over all objectives, grey: dominated.")
    hv = exp.read_table(HYPERVOLUME_FILE) if exp.has(HYPERVOLUME_FILE) else hypervolume_frame(epochs, trials, objectives)
    if len(hv):
        ref = ", ".join(f"{o.metric} {0.0 + hv[f'ref_{o.metric}'].iloc[-1]:.4g}" for o in objectives if f"ref_{o.metric}" in hv)
        md += _image("Hypervolume", _hypervolume_plot(kit, exp, hv),
                     f"Hypervolume of the front of every trial so far after each epoch, as a fraction of the box between the "
                     f"ideal point (accuracy 1, costs 0) and the reference point ({ref}); final {hv['hypervolume_fraction'].iloc[-1]:.4f}.")
    if exp.has("retrain.parquet"):
        from cifar_tune.pareto import rank_and_crowding, to_minimise

        rt = exp.read_table("retrain.parquet")
        ok = rt[rt["status"] == "completed"]
        if len(ok):
            by = ok.groupby("trial_id", sort=True)["test_acc"].mean().rename("test_acc").reset_index()
            test = by.merge(df[["trial_id", *costs]], on="trial_id", how="left")
            modes = ["max", *[o.resolved_mode for o in objectives if o.is_cost]]
            ranks, _ = rank_and_crowding(to_minimise(test[["test_acc", *costs]].to_numpy(dtype=float), modes))
            test["pareto_rank"] = np.where(ranks >= 0, ranks, np.nan)
            md += _image("Front on test", _front_plot(kit, exp, test, "test_acc", "test accuracy (mean over seeds)", costs,
                                                      "report_pareto_test.png", "retrained: test"),
                         "The retrained configs' test accuracy against the same costs; blue: the front among them.")
    return md
