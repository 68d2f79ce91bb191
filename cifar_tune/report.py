"""``cifar-tune report``: ``report.md`` plus PNG plots of a search (and its retrain, if one ran).

Everything is read from the experiment directory (spec.yaml, trials.parquet, epochs.parquet,
retrain.parquet, leaderboard.md); nothing is trained and the test split is not read here.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from cifar_tune.engine.features import TSNE_TABLE
from cifar_tune.errors import UserError
from cifar_tune.plots import (
    MAX_LABELLED_CLASSES,
    hyperparameter_figure,
    is_log_scale,  # noqa: F401 - part of the report's interface
    isna,
    per_class_figure,
    pyplot,
)
from cifar_tune.report_pareto import Plots, pareto_section
from cifar_tune.results import Experiment
from cifar_tune.retrain import rank_trials, ranking_rule
from cifar_tune.spec.stored import StoredSpec, load_stored_spec
from cifar_tune.text import plural, summarize_config

Printer = Callable[[str], None]
STATUS_COLORS = {"completed": "tab:green", "stopped": "tab:blue", "diverged": "tab:red", "error": "tab:gray", "oom": "tab:purple"}


# ---------------------------------------------------------------------------------------- helpers


def _save(exp: Experiment, fig: Any, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    exp.write_bytes(name, buf.getvalue())
    return name


def varying_config_columns(trials: pd.DataFrame) -> list[str]:
    """The flattened ``config.*`` columns with more than one distinct value: what was searched."""
    out = []
    for col in trials.columns:
        if not col.startswith("config."):
            continue
        values = {json.dumps(v, default=str) for v in trials[col] if not isna(v)}
        if len(values) > 1:
            out.append(col)
    return out


def _class_names(exp: Experiment, stored: StoredSpec, num_classes: int, retrain: pd.DataFrame | None) -> list[str]:
    """From the dataset (CIFAR needs no files), else from a checkpoint, else class_<i>."""
    from cifar_tune.engine import data as data_mod

    try:
        names = list(data_mod.dataset_info(stored.data).classes)
        if len(names) == num_classes:
            return names
    except Exception:  # noqa: BLE001 - an npz file that is gone: fall back below
        pass
    if retrain is not None and "checkpoint" in retrain:
        for rel in retrain["checkpoint"].dropna():
            try:
                import torch

                ckpt = torch.load(io.BytesIO(exp.read_bytes(rel)), map_location="cpu", weights_only=True)
                return [str(c) for c in ckpt["classes"]]
            except Exception:  # noqa: BLE001
                continue
    return [f"class_{i}" for i in range(num_classes)]


# ------------------------------------------------------------------------------------------ plots


def plot_val_curves(exp: Experiment, epochs: pd.DataFrame, trials: pd.DataFrame, metric: str, best_id: str | None) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    status = dict(zip(trials["trial_id"], trials["status"], strict=False))
    for tid, g in epochs.dropna(subset=[metric]).groupby("trial_id"):
        g = g.sort_values("epoch")
        best = tid == best_id
        ax.plot(g["epoch"], g[metric], marker="o" if len(g) == 1 else None, markersize=3,
                color="black" if best else STATUS_COLORS.get(status.get(tid, ""), "tab:gray"),
                linewidth=2.2 if best else 1.0, alpha=1.0 if best else 0.6, zorder=3 if best else 2)
    handles = [plt.Line2D([], [], color=c, label=s) for s, c in STATUS_COLORS.items() if s in set(status.values())]
    if best_id:
        handles.append(plt.Line2D([], [], color="black", linewidth=2.2, label=f"best ({best_id})"))
    ax.legend(handles=handles, fontsize=8)
    ax.set(xlabel="epoch", ylabel=metric, title=f"Validation {metric} per trial (short lines: stopped early)")
    ax.grid(alpha=0.3)
    return _save(exp, fig, "report_val_curves.png")


def pbt_lineage(epochs: pd.DataFrame) -> list[dict[str, Any]]:
    """One entry per PBT exploit, in epoch order: which trial copied which, at which epoch, with what
    new values (from ``restored_from`` / ``config_changes`` of epochs.parquet)."""
    if "restored_from" not in epochs:
        return []
    rows = epochs[epochs["restored_from"].notna()].sort_values(["epoch", "trial_id"])
    return [{"trial_id": str(r.trial_id), "epoch": int(r.epoch), "from": str(r.restored_from),
             "changes": json.loads(r.config_changes) if isinstance(r.config_changes, str) else {}}
            for r in rows.itertuples()]


def _lineage_table(events: list[dict[str, Any]], k: int = 30) -> list[str]:
    lines = ["| epoch | trial | copied | new values |", "|---:|---|---|---|"]
    for ev in events[:k]:
        vals = ", ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in ev["changes"].items())
        lines.append(f"| {ev['epoch']} | {ev['trial_id']} | {ev['from']} | {vals or '(same config)'} |")
    if len(events) > k:
        lines.append(f"| | | | ... {len(events) - k} more in epochs.parquet |")
    return lines


def plot_pbt(exp: Experiment, epochs: pd.DataFrame, metric: str, events: list[dict[str, Any]]) -> str:
    """Left: the metric per trial, with an arrow from the copied trial to the copier at each exploit
    (the curves jump there). Right: the learning rate each trial trained with, stepping at exploits."""
    plt = pyplot()
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(13, 5))
    curves = {tid: g.sort_values("epoch") for tid, g in epochs.groupby("trial_id")}
    colors = {tid: plt.cm.tab10(i % 10) for i, tid in enumerate(sorted(curves))}
    for tid, g in curves.items():
        ax.plot(g["epoch"], g[metric], color=colors[tid], linewidth=1.2, label=tid)
        ax_lr.step(g["epoch"], g["lr"], where="post", color=colors[tid], linewidth=1.2)
    for ev in events:
        donor = curves.get(ev["from"])
        mine = curves[ev["trial_id"]].set_index("epoch")
        before = donor[donor["epoch"] <= ev["epoch"] - 1] if donor is not None else None
        if before is None or not len(before) or ev["epoch"] not in mine.index:
            continue
        x0, y0 = before["epoch"].iloc[-1], before[metric].iloc[-1]
        ax.annotate("", xy=(ev["epoch"], mine.loc[ev["epoch"], metric]), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "->", "color": colors[ev["trial_id"]], "lw": 1.4})
        ax_lr.plot([ev["epoch"]], [mine.loc[ev["epoch"], "lr"]], "o", color=colors[ev["trial_id"]], markersize=4)
    ax.set(xlabel="epoch", ylabel=metric, title=f"PBT: {metric} per trial; arrows: copied trial -> copier")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    if (epochs["lr"] > 0).all():
        ax_lr.set_yscale("log")
    ax_lr.set(xlabel="epoch", ylabel="lr", title="learning rate in force (dots: after an exploit)")
    ax_lr.grid(alpha=0.3)
    return _save(exp, fig, "report_pbt_lineage.png")


def survival_counts(trials: pd.DataFrame, max_epochs: int) -> list[int]:
    """Trials still training at each epoch 1..max_epochs (a trial that ran e epochs is alive at 1..e)."""
    ran = pd.to_numeric(trials["epochs_run"], errors="coerce").fillna(0)
    return [int((ran >= e).sum()) for e in range(1, max_epochs + 1)]


def plot_survival(exp: Experiment, trials: pd.DataFrame, stored: StoredSpec) -> str:
    plt = pyplot()
    sched = stored.search.scheduler
    counts = survival_counts(trials, sched.max_epochs)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(1, len(counts) + 1), counts, color="tab:blue", alpha=0.8)
    if sched.name in ("asha", "mo_asha", "hyperband"):  # (mo_asha: the same rungs)
        rung = float(sched.grace_period)
        while rung < sched.max_epochs:  # ASHA compares trials when they reach these epochs
            ax.axvline(rung + 0.5, color="tab:red", linestyle="--", linewidth=1)
            rung *= sched.reduction_factor
    ax.set(xlabel="epoch", ylabel="trials alive",
           title=f"{sched.name} survival: trials still training per epoch (dashed: rungs)")
    ax.grid(axis="y", alpha=0.3)
    return _save(exp, fig, "report_rung_survival.png")


def plot_hyperparameters(exp: Experiment, trials: pd.DataFrame, cols: list[str], score_col: str) -> str | None:
    fig = hyperparameter_figure(trials, cols, score_col)
    return None if fig is None else _save(exp, fig, "report_hyperparameters.png")


def plot_optimizers(exp: Experiment, trials: pd.DataFrame, score_col: str) -> str | None:
    col = "config.optimizer.name"
    if col not in trials or score_col not in trials:
        return None
    scored = trials[pd.to_numeric(trials[score_col], errors="coerce").notna()]
    if scored.empty:
        return None
    plt = pyplot()
    names = sorted(scored[col].dropna().astype(str).unique())
    groups = [scored.loc[scored[col].astype(str) == n, score_col].astype(float).to_numpy() for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names)), 4))
    ax.boxplot(groups, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    rng = np.random.default_rng(0)
    for i, g in enumerate(groups, start=1):  # the points too: a box of 2 trials says little alone
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(g)), g, s=16, alpha=0.7, color="tab:orange", zorder=3)
    ax.set(ylabel=score_col, title=f"{score_col} by optimizer (n = {', '.join(str(len(g)) for g in groups)})")
    ax.grid(axis="y", alpha=0.3)
    return _save(exp, fig, "report_optimizers.png")


def plot_per_class(exp: Experiment, acc: np.ndarray, names: list[str], title: str) -> str:
    return _save(exp, per_class_figure(acc, names, title), "report_per_class.png")


def plot_confusion(exp: Experiment, cm: np.ndarray, names: list[str], title: str) -> str:
    plt = pyplot()
    rows = cm / np.clip(cm.sum(1, keepdims=True), 1, None)  # each true class sums to 1: recall on the diagonal
    n = len(cm)
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.5 * n), min(10, 1.5 + 0.45 * n)))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    if n <= MAX_LABELLED_CLASSES:
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if rows[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, label="fraction of the true class", shrink=0.8)
    return _save(exp, fig, "report_confusion.png")


# ------------------------------------------------------------------------------------- importance

IMPORTANCE_MIN_TRIALS = 5  # PED-ANOVA compares the top quantile with the rest: fewer says nothing


@dataclass(frozen=True)
class Importance:
    title: str  # "all trials" or "optimizer = sgd"
    trials: int
    values: dict[str, float]  # parameter -> importance (sums to 1), most important first
    note: str = ""


def importance_epoch(epochs: pd.DataFrame, metric: str) -> tuple[int, int, int] | None:
    """(epoch, trials that reached it, trials with any result): the fidelity importance is computed at.

    The last epoch that at least half of the trials (and at least IMPORTANCE_MIN_TRIALS) reached
    with a finite metric: later epochs have fewer, better trials (ASHA stopped the rest), so
    comparing them would measure survival, not the hyperparameters.
    """
    ok = epochs[np.isfinite(pd.to_numeric(epochs[metric], errors="coerce").astype(float))] if metric in epochs else epochs.iloc[:0]
    total = ok["trial_id"].nunique()
    if total < IMPORTANCE_MIN_TRIALS:
        return None
    need = max(IMPORTANCE_MIN_TRIALS, math.ceil(total / 2))
    counts = ok.groupby("epoch")["trial_id"].nunique()
    reached = counts[counts >= need]
    return (int(reached.index.max()), int(reached.loc[reached.index.max()]), total) if len(reached) else None


def _importance_study(rows: list[tuple[list[Any], float]], mode: str) -> Any:
    """An in-memory Optuna study of (searched params, value) pairs; one range per parameter."""
    import optuna

    from cifar_tune.spec.searched import Param

    bounds: dict[str, tuple[float, float]] = {}
    for params, _ in rows:
        for p in params:
            if p.kind != "categorical":
                lo, hi = bounds.get(p.name, (p.low, p.high))
                bounds[p.name] = (min(lo, p.low), max(hi, p.high))
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for params, value in rows:
        same = [p if p.kind == "categorical" else Param(p.name, p.kind, p.value, *bounds[p.name], p.log) for p in params]
        study.add_trial(optuna.trial.create_trial(
            params={p.name: p.value for p in same}, distributions={p.name: p.distribution() for p in same}, value=value))
    return study


def _ped_anova(rows: list[tuple[list[Any], float]], mode: str, params: list[str]) -> dict[str, float]:
    import warnings

    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = _importance_study(rows, mode)
    with warnings.catch_warnings():  # few trials per region: Optuna warns, the table states the counts
        warnings.simplefilter("ignore")
        # the top 10 % as in the paper, but at least 2 trials: a region of one trial has no density
        evaluator = PedAnovaImportanceEvaluator(target_quantile=min(0.5, max(0.1, 2 / len(rows))))
        return dict(get_param_importances(study, evaluator=evaluator, params=params, normalize=True))


def hyperparameter_importance(space: dict[str, Any], trials: pd.DataFrame, epochs: pd.DataFrame, metric: str,
                              mode: str, epoch: int) -> list[Importance]:
    """PED-ANOVA importance of the searched parameters for ``metric`` at ``epoch``: over all trials
    (the parameters every trial has) and then per branch of each choice (its own parameters)."""
    from cifar_tune.spec.searched import branch_of, searched_params

    at = epochs[(epochs["epoch"] == epoch)].set_index("trial_id")[metric]
    rows = []
    for r in trials.to_dict("records"):
        v = at.get(r["trial_id"])
        if v is not None and np.isfinite(float(v)):
            rows.append((searched_params(space, json.loads(r["config"])), float(v)))
    out = [_importance_section("all trials", rows, mode)]
    branches = sorted({b for params, _ in rows for p in params if (b := branch_of(p.name))})
    for choice, label in branches:
        sub = [(ps, v) for ps, v in rows if any(p.name == choice and str(p.value) == label for p in ps)]
        out.append(_importance_section(f"{choice} = {label}", sub, mode))
    return out


def _importance_section(title: str, rows: list[tuple[list[Any], float]], mode: str) -> Importance:
    if len(rows) < IMPORTANCE_MIN_TRIALS:
        return Importance(title, len(rows), {}, f"too few trials (needs {IMPORTANCE_MIN_TRIALS})")
    # the parameters every one of these trials has (a branch's own live in its section) that vary
    common = set.intersection(*({p.name for p in ps} for ps, _ in rows))
    names = [p.name for p in rows[0][0] if p.name in common
             and len({json.dumps(q.value) for ps, _ in rows for q in ps if q.name == p.name}) > 1]
    if not names:
        return Importance(title, len(rows), {}, "no parameter shared by all these trials varies")
    return Importance(title, len(rows), _ped_anova(rows, mode, names))


def _importance_lines(exp: Experiment, trials: pd.DataFrame, epochs: pd.DataFrame, metric: str, mode: str) -> list[str]:
    md = ["## Hyperparameter importance", ""]
    try:
        import optuna  # noqa: F401
    except ImportError:
        return md + ["Needs Optuna: `pip install 'cifar-tune[dashboard]'` and run `cifar-tune report` again.", ""]
    fid = importance_epoch(epochs, metric)
    if fid is None:
        return md + [f"Not computed: fewer than {plural(IMPORTANCE_MIN_TRIALS, 'trial')} reached a common epoch.", ""]
    epoch, n_at, total = fid
    from cifar_tune.watch.dashboard import stored_space

    sections = hyperparameter_importance(stored_space(exp), trials, epochs, metric, mode, epoch)
    md += [
        f"PED-ANOVA (`optuna.importance.PedAnovaImportanceEvaluator`, the evaluator optuna-dashboard uses) of "
        f"{metric} at epoch {epoch}: the last epoch that at least half of the {total} trials with results reached "
        f"({n_at} did). One fidelity, so trials stopped later by the scheduler count like the rest. Importances of a "
        "section sum to 1. A parameter inside one option of a choice (`optimizer[sgd].lr`) exists only in that "
        "branch: it is ranked in the branch's own section, with the trials that took that branch.",
        "",
    ]
    for sec in sections:
        md += [f"### {sec.title} ({plural(sec.trials, 'trial')})", ""]
        if not sec.values:
            md += [sec.note, ""]
            continue
        md += ["| parameter | importance |", "|---|---:|"]
        md += [f"| `{name}` | {value:.3f} |" for name, value in sec.values.items()]
        md += [""]
    return md


# ----------------------------------------------------------------------------------------- report


def plot_feature_map(exp: Experiment, points: pd.DataFrame) -> str:
    """Scatter of retrain's t-SNE points (``tsne.parquet``), one colour per class, with a legend of names."""
    plt = pyplot()
    classes = points.drop_duplicates("label").sort_values("label")
    fig, ax = plt.subplots(figsize=(7.5, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, (label, name) in enumerate(zip(classes["label"], classes["class"], strict=True)):
        sel = points["label"] == label
        ax.scatter(points.loc[sel, "x"], points.loc[sel, "y"], s=8, alpha=0.7, color=cmap(i % cmap.N), label=str(name))
    if len(classes) <= 20:  # a legend of 100 CIFAR-100 names would cover the plot
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{points['trial_id'].iloc[0]}: t-SNE of penultimate features, {len(points)} test images")
    return _save(exp, fig, "report_tsne.png")


def _stack(values: pd.Series) -> np.ndarray:
    return np.stack([np.asarray(json.loads(v) if isinstance(v, str) else [np.asarray(r) for r in v], dtype=float) for v in values])


def best_retrained(retrain: pd.DataFrame) -> tuple[str, int, np.ndarray, np.ndarray] | None:
    """(trial id, seeds, mean per-class accuracy, summed confusion) of the rank-1 config's completed seeds."""
    ok = retrain[retrain["status"] == "completed"]
    if ok.empty:
        return None
    top = ok[ok["rank"] == ok["rank"].min()]
    per_class = _stack(top["per_class_acc"]).mean(0)
    confusion = _stack(top["confusion"]).sum(0)
    return str(top["trial_id"].iloc[0]), len(top), per_class, confusion


def _status_line(trials: pd.DataFrame) -> str:
    counts = trials["status"].value_counts()
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _search_table(ranked: pd.DataFrame, metric: str, rank_by: str, k: int = 10) -> list[str]:
    lines = [f"| rank | trial | {rank_by} {metric} | epochs run | status | params | config |", "|---:|---|---:|---:|---|---:|---|"]
    for r in ranked.head(k).to_dict("records"):
        params = f"{int(r['params']):,}" if not isna(r.get("params")) else "–"
        lines.append(f"| {r['rank']} | {r['trial_id']} | {float(r[f'{rank_by}_{metric}']):.4f} | {int(r['epochs_run'])} "
                     f"| {r['status']} | {params} | {summarize_config(json.loads(r['config']))} |")
    return lines


def _image(title: str, rel: str | None, why: str) -> list[str]:
    return [f"## {title}", "", why, "", f"![{title}]({rel})", ""] if rel else [f"## {title}", "", "(nothing to plot)", ""]


def build_report(exp: Experiment, out: Printer = print) -> str:
    """Write the plots and ``report.md``; returns report.md's text."""
    stored = load_stored_spec(exp)
    if not exp.has("trials.parquet"):
        raise UserError(f"experiment '{exp.name}' has no trials.parquet (the search has not run)")
    trials = exp.read_table("trials.parquet")
    epochs = exp.read_table("epochs.parquet") if exp.has("epochs.parquet") else pd.DataFrame(columns=["trial_id", "epoch"])
    metric, mode, rank_by = stored.search.metric, stored.search.resolved_mode, stored.retrain.rank_by
    score_col = f"best_{metric}"
    ranked = rank_trials(trials, metric=metric, mode=mode, rank_by=rank_by)
    best_id = str(ranked["trial_id"].iloc[0]) if len(ranked) else None
    cols = varying_config_columns(trials)
    sched = stored.search.scheduler

    md = [
        f"# Report: {exp.name}",
        "",
        f"- data: {stored.data.dataset}; metric: {metric} ({mode}); {stored.search.algorithm} search, "
        f"{sched.name} scheduler up to {sched.max_epochs} epochs",
        f"- trials: {len(trials)} ({_status_line(trials)})",
        f"- searched hyperparameters: {', '.join(c.removeprefix('config.') for c in cols) or 'none'}",
        "",
        "## Search leaderboard",
        "",
        f"Ranking rule: {ranking_rule(metric, mode, rank_by)}.",
        "",
        *(_search_table(ranked, metric, rank_by) if len(ranked) else ["No trial is eligible for ranking."]),
        "",
    ]
    if metric in epochs and len(epochs):
        md += _image("Validation curves", plot_val_curves(exp, epochs, trials, metric, best_id),
                     "Every trial's validation metric per epoch; trials stopped early by the scheduler end early. Black: the top-ranked trial.")
    if events := pbt_lineage(epochs):
        md += _image("PBT lineage", plot_pbt(exp, epochs, metric, events),
                     f"{len(events)} exploits: a trial in the bottom quantile copied the checkpoint (weights, optimizer, RNGs) "
                     "and config of a top trial, then perturbed the mutated keys. Each row below is one copy.")
        md += [*_lineage_table(events), ""]
    md += _image("Rung survival", plot_survival(exp, trials, stored),
                 "How many trials were still training at each epoch; dashed lines mark the scheduler's rungs.")
    md += _image("Hyperparameters vs. the metric", plot_hyperparameters(exp, trials, cols, score_col),
                 f"{score_col} of each trial against each searched hyperparameter (log x for learning-rate-like values); "
                 "colour: epochs run, since stopped trials had less time to reach their best.")
    md += _image("Optimizers", plot_optimizers(exp, trials, score_col), f"{score_col} per optimizer: box and individual trials.")
    md += _importance_lines(exp, trials, epochs, metric, mode)
    md += pareto_section(Plots(pyplot, _save, _image), exp, stored, trials, epochs)  # (several objectives only)
    md += _retrain_section(exp, stored, out)
    text = "\n".join(md)
    exp.write_text("report.md", text)
    out(f"report: {exp.uri('report.md')}")
    return text


def _retrain_section(exp: Experiment, stored: StoredSpec, out: Printer) -> list[str]:
    if not exp.has("retrain.parquet"):
        return ["## Retrain", "", f"Retrain has not run yet: `cifar-tune retrain {exp.name} --top K` refits the best configs "
                "on train+val and evaluates them on the test split; run `report` again afterwards.", ""]
    retrain = exp.read_table("retrain.parquet")
    md = ["## Retrain", ""]
    if exp.has("leaderboard.md"):
        board = exp.read_text("leaderboard.md").splitlines()
        md += [ln.replace("# Retrain leaderboard", "### Retrain leaderboard", 1) for ln in board] + [""]
    best = best_retrained(retrain)
    if best is None:
        return md + ["No retrain run completed.", ""]
    trial_id, n, per_class, confusion = best
    names = _class_names(exp, stored, len(per_class), retrain)
    order = np.argsort(per_class)
    md += [f"### Per-class test accuracy of the top config ({trial_id}, mean over {plural(n, 'seed')})", ""]
    if len(order) <= 10:  # best 5 and worst 5 would overlap: list every class
        md += ["All classes, best first: " + ", ".join(f"{names[i]} {per_class[i]:.3f}" for i in order[::-1]), ""]
    else:
        md += ["Best 5 classes: " + ", ".join(f"{names[i]} {per_class[i]:.3f}" for i in order[::-1][:5]), "",
               "Worst 5 classes: " + ", ".join(f"{names[i]} {per_class[i]:.3f}" for i in order[:5]), ""]
    md += [
        f"![per-class accuracy]({plot_per_class(exp, per_class, names, f'{trial_id}: per-class test accuracy')})",
        "",
        f"![confusion matrix]({plot_confusion(exp, confusion, names, f'{trial_id}: test confusion (summed over seeds)')})",
        "",
    ]
    if exp.has(TSNE_TABLE):
        points = exp.read_table(TSNE_TABLE)
        md += ["### Feature map (t-SNE)", "",
               f"2-D t-SNE of the penultimate-layer features (input of the last Linear) of {points['trial_id'].iloc[0]}, "
               f"retrained, on a stratified sample of {len(points)} test images; colour: true class. Written by retrain "
               "(which reads the test split); nearby points are images the model represents alike.", "",
               f"![t-SNE feature map]({plot_feature_map(exp, points)})", ""]
    return md
