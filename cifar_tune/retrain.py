"""``cifar-tune retrain`` and ``evaluate``: refit the best searched configs on train+val, test once.

The search selects on the validation split and never reads the test split. Here the top-K configs
(see :func:`ranking_rule`) are refit on the whole training set (``data.load_trainval``, no
validation) for E epochs with S seeds each, as Ray tasks, and each refit model is evaluated on the
test split exactly once. The driver reads the test split once and shares it with the tasks through
the object store, so the only ``load_test`` calls happen in the process that runs this command.

Outputs (in the experiment directory, all written atomically through ``results.Experiment``):
``retrain.parquet`` (one row per (trial, seed)), ``leaderboard.md`` and
``checkpoints/<trial_id>_seed<s>.pt`` (tensors and plain Python only: ``weights_only=True`` loads).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cifar_tune.engine import data as data_mod
from cifar_tune.engine.features import TSNE_TABLE
from cifar_tune.errors import UserError
from cifar_tune.pareto import pareto_rule, select_pareto
from cifar_tune.results import Experiment
from cifar_tune.spec.schema import DataSpec
from cifar_tune.spec.stored import StoredSpec, data_spec_from_dict, load_stored_spec
from cifar_tune.text import plural, summarize_config
from cifar_tune.tuning.trial import CHECKPOINT_FILE, CHECKPOINT_FORMAT
from cifar_tune.watch import tracking

Printer = Callable[[str], None]
ELIGIBLE = ("completed", "stopped")  # diverged/error/oom/pending/running/interrupted cannot be ranked


# ------------------------------------------------------------------------------------------ ranking


def ranking_rule(metric: str, mode: str, rank_by: str) -> str:
    """The rule :func:`rank_trials` applies, in words (printed by retrain, stated in leaderboard.md)."""
    direction = "highest" if mode == "max" else "lowest"
    return (
        f"eligible: trials with status completed or stopped and a finite {rank_by}_{metric} "
        f"(diverged, error, oom and unfinished trials are excluded); order: most epochs run first "
        f"(trials that reached the highest ASHA rung; completed before stopped), then {direction} "
        f"{rank_by}_{metric} (the {'best-epoch' if rank_by == 'best' else 'last-epoch'} validation "
        f"{metric.removeprefix('val_')}), then fewer parameters, then lower trial id; "
        f"trials with identical configs collapse to the best-ranked one"
    )


def canonical_config(config_json: str) -> str:
    """Key order must not make two equal configs look different."""
    return json.dumps(json.loads(config_json), sort_keys=True, separators=(",", ":"))


def rank_trials(trials: pd.DataFrame, *, metric: str, mode: str, rank_by: str = "best") -> pd.DataFrame:
    """Eligible, de-duplicated trials in ranking order with a 1-based ``rank`` column first."""
    col = f"{rank_by}_{metric}"
    df = trials.copy()
    for needed in (col, "params", "epochs_run"):
        if needed not in df:
            df[needed] = np.nan
    score = pd.to_numeric(df[col], errors="coerce")
    df = df[df["status"].isin(ELIGIBLE) & np.isfinite(score.fillna(np.nan).astype(float))]
    score = pd.to_numeric(df[col]).astype(float)
    df = df.assign(
        _epochs=-pd.to_numeric(df["epochs_run"], errors="coerce").fillna(0),
        _stopped=(df["status"] != "completed").astype(int),
        _score=-score if mode == "max" else score,
        _params=pd.to_numeric(df["params"], errors="coerce").fillna(np.inf),
    )
    df = df.sort_values(["_epochs", "_stopped", "_score", "_params", "trial_id"], kind="stable")
    df = df.assign(_key=[canonical_config(c) for c in df["config"]]).drop_duplicates("_key", keep="first")
    df = df.drop(columns=["_epochs", "_stopped", "_score", "_params", "_key"]).reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df


def select_top(trials: pd.DataFrame, *, top: int, metric: str, mode: str, rank_by: str, experiment: str) -> pd.DataFrame:
    ranked = rank_trials(trials, metric=metric, mode=mode, rank_by=rank_by)
    if top > len(ranked):
        raise UserError(
            f"--top {top} is more than the {len(ranked)} usable trials in experiment '{experiment}' "
            f"(completed/stopped with a {rank_by}_{metric}, duplicate configs collapsed)"
        )
    return ranked.head(top)


# ------------------------------------------------------------------------------------- one refit


def retrain_seed(search_seed: int, trial_id: str, seed_index: int) -> int:
    """A stable per-(trial, seed) torch seed, distinct from the search trial's own seed."""
    return zlib.crc32(f"retrain:{search_seed}:{trial_id}:{seed_index}".encode()) & 0x7FFFFFFF


def checkpoint_name(trial_id: str, seed_index: int) -> str:
    return f"checkpoints/{trial_id}_seed{seed_index}.pt"


def retrain_one(
    *,
    trial_id: str,
    seed_index: int,
    seed: int,
    config: dict[str, Any],
    data: DataSpec,
    epochs: int,
    test: data_mod.Split,
    threads: int = 1,
    report: Callable[[dict[str, Any]], Any] | None = None,
    device: torch.device | None = None,
    memory_fraction: float | None = None,
) -> dict[str, Any]:
    """Runs in a Ray task: fit on train+val, evaluate on ``test`` once. Never raises for a bad run.

    ``device``: what Ray assigned the task (CPU if None); ``memory_fraction``: its share of that GPU.
    """
    from cifar_tune.engine import devices
    from cifar_tune.engine.models import build_model, model_info
    from cifar_tune.engine.train import evaluate, fit
    from cifar_tune.engine.transfer import apply as apply_transfer

    torch.set_num_threads(max(1, threads))  # as many threads as the task reserved CPUs
    t0 = time.perf_counter()
    out: dict[str, Any] = {"trial_id": trial_id, "seed": seed_index, "torch_seed": seed, "status": "error", "error": None,
                           "pid": os.getpid()}  # which worker ran it: workers are reused across refits
    device = device or torch.device("cpu")
    out["device"] = str(device)
    model = None
    try:
        devices.begin_trial(device, memory_fraction)
        info = data_mod.dataset_info(data)
        trainval = data_mod.load_trainval(data, device)
        torch.manual_seed(seed)
        model = build_model(config["model"], num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size)
        model = apply_transfer(model, config["model"], log=lambda line: print(f"{trial_id} seed {seed_index} {line}", flush=True))
        out["params"] = model_info(model, in_channels=info.channels, image_size=info.image_size)["params"]

        def on_epoch(m: dict[str, Any]) -> None:
            if report is not None:
                report({"trial_id": trial_id, "seed": seed_index, "epochs": epochs, **m})

        result = fit(model, trainval, None, config, epochs=epochs, num_classes=info.num_classes,
                     mean=info.mean, std=info.std, seed=seed, device=device, on_epoch=on_epoch)
        out.update(status=result.status, epochs_run=result.epochs_run, train_time_s=result.train_time_s)
        if result.status == "completed":
            ev = evaluate(model, test, mean=info.mean, std=info.std, num_classes=info.num_classes, device=device)
            out.update(test_acc=ev.top1, test_top5=ev.top5, test_loss=ev.loss, per_class_acc=ev.per_class_acc,
                       confusion=ev.confusion, num_test_images=ev.num_images)
            out["state_dict"] = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            out["info"] = info
    except Exception as e:  # noqa: BLE001 - one failed refit must not lose the others' results
        message = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        out.update(status="oom" if "out of memory" in message.lower() else "error", error=message)
    finally:
        peak_mb = devices.peak_memory_mb(device)
        if peak_mb is not None:
            out["gpu_mem_peak_mb"] = peak_mb
        del model
        devices.end_trial(device, compiled=bool(config.get("train", {}).get("compile")))
    out["wall_time_s"] = time.perf_counter() - t0
    return out


# ------------------------------------------------------------------------------------ checkpoints


def make_checkpoint(result: dict[str, Any], *, config: dict[str, Any], data: DataSpec, epochs: int) -> dict[str, Any]:
    """Tensors and plain Python only, so ``torch.load(path, weights_only=True)`` can read it."""
    info: data_mod.DatasetInfo = result["info"]
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": result["state_dict"],
        "config": config,
        "num_classes": int(info.num_classes),
        "in_channels": int(info.channels),
        "image_size": int(info.image_size),
        "mean": [float(v) for v in info.mean],
        "std": [float(v) for v in info.std],
        "classes": [str(c) for c in info.classes],
        "data": asdict(data),
        "trial_id": result["trial_id"],
        "seed": int(result["seed"]),
        "torch_seed": int(result["torch_seed"]),
        "epochs": int(epochs),
        "test_acc": float(result["test_acc"]),
    }


def _checkpoint_bytes(ckpt: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir() and (p / CHECKPOINT_FILE).is_file():  # a search trial's Ray Tune checkpoint directory
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise UserError(f"{p}: no such checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{p}: not a loadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{p}: not a cifar-tune checkpoint (written by `cifar-tune retrain`)")
    return ckpt


# --------------------------------------------------------------------------------------- the table


RETRAIN_COLUMNS = (
    "trial_id", "rank", "seed", "torch_seed", "epochs", "epochs_run", "params", "test_acc", "test_top5",
    "test_loss", "per_class_acc", "confusion", "num_test_images", "train_time_s", "wall_time_s", "status",
    "error", "checkpoint", "config", "rank_by", "search_status", "search_epochs_run", "device", "gpu_mem_peak_mb",
    "macs", "latency_ms", "pareto_rank",  # (with several objectives: the search's measured costs and front)
)


def _row(result: dict[str, Any], trial: dict[str, Any], *, epochs: int, metric: str, rank_by: str, checkpoint: str | None) -> dict[str, Any]:
    row = {k: result.get(k) for k in RETRAIN_COLUMNS if k in result}
    row.update(
        rank=int(trial["rank"]), epochs=epochs, checkpoint=checkpoint, config=trial["config"], rank_by=rank_by,
        search_status=trial["status"], search_epochs_run=int(trial.get("epochs_run") or 0),
    )
    row.setdefault("params", trial.get("params"))
    for k in ("macs", "latency_ms", "pareto_rank"):
        row[k] = _num(trial.get(k))
    for k in ("best", "last"):
        row[f"search_{k}_{metric}"] = _num(trial.get(f"{k}_{metric}"))
    return row


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def retrain_frame(rows: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    cols = [*RETRAIN_COLUMNS, f"search_best_{metric}", f"search_last_{metric}"]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["rank", "seed"], kind="stable").reset_index(drop=True)


def write_retrain_table(exp: Experiment, df: pd.DataFrame) -> None:
    """Written with pyarrow directly: per_class_acc and confusion stay real (nested) list columns."""
    schema_overrides = {
        "per_class_acc": pa.list_(pa.float64()),
        "confusion": pa.list_(pa.list_(pa.int64())),
    }
    arrays, names = [], []
    for col in df.columns:
        values = [None if _missing(v) else v for v in df[col]]
        typ = schema_overrides.get(col)
        arrays.append(pa.array(values, type=typ) if typ else pa.array(values, from_pandas=True))
        names.append(col)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, names=names), buf)
    exp.write_bytes("retrain.parquet", buf.getvalue())


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# ------------------------------------------------------------------------------------- leaderboard


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """Per config: mean and sample std (ddof=1) of the test metrics over its completed seeds."""
    ok = df[df["status"] == "completed"]
    rows = []
    for (rank, trial_id), g in df.groupby(["rank", "trial_id"], sort=True):
        good = ok[(ok["rank"] == rank) & (ok["trial_id"] == trial_id)]
        acc = good["test_acc"].astype(float)
        rows.append({
            "rank": int(rank), "trial_id": trial_id, "seeds": len(g), "seeds_ok": len(good),
            "test_acc_mean": acc.mean() if len(acc) else np.nan,
            "test_acc_std": acc.std(ddof=1) if len(acc) > 1 else np.nan,
            "test_top5_mean": good["test_top5"].astype(float).mean() if len(good) else np.nan,
            "test_loss_mean": good["test_loss"].astype(float).mean() if len(good) else np.nan,
            "params": g["params"].iloc[0],
            "macs": g["macs"].iloc[0] if "macs" in g else np.nan,
            "latency_ms": g["latency_ms"].iloc[0] if "latency_ms" in g else np.nan,
            "pareto_rank": g["pareto_rank"].iloc[0] if "pareto_rank" in g else np.nan,
            "train_time_s_mean": pd.to_numeric(g["train_time_s"], errors="coerce").mean(),
            "config": g["config"].iloc[0],
        })
    return pd.DataFrame(rows)


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def num_classes_of(df: pd.DataFrame) -> int | None:
    """Classes of the test split, from a completed run's per-class accuracies (None if none completed)."""
    for v in df.get("per_class_acc", pd.Series(dtype=object)):
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return len(json.loads(v) if isinstance(v, str) else v)
    return None


def shows_top5(num_classes: int | None) -> bool:
    """Top-5 accuracy says something only with more than 5 classes (with 5 or fewer it is always 1)."""
    return num_classes is None or num_classes > 5


def leaderboard_markdown(df: pd.DataFrame, *, experiment: str, metric: str, rule: str, epochs: int) -> str:
    board = leaderboard(df)
    metric_cols = [c for c in df.columns if c.startswith("search_best_")]
    several_seeds = bool((board["seeds"] > 1).any()) if len(board) else False
    top5 = shows_top5(num_classes_of(df))
    acc_head = "test acc (mean ± std)" if several_seeds else "test acc"
    lines = [
        f"# Retrain leaderboard: {experiment}",
        "",
        f"Each config was refit on train+val for {plural(epochs, 'epoch')} per seed and evaluated once on the test split.",
        "Test accuracy is the mean ± sample standard deviation over seeds (– with a single seed)." if several_seeds
        else "Each config was refit with one seed: the test accuracy is that run's (no spread over seeds to show).",
        "",
        f"**Ranking rule** (which search trials were retrained, by rank): {rule}.",
        "",
    ]
    costs = "pareto_rank" in df and df["pareto_rank"].notna().any()  # retrained from a Pareto front
    extra = " MACs | latency (ms) | Pareto rank |" if costs else ""
    lines += [
        f"| rank | trial | {acc_head} | seeds |" + (" test top-5 |" if top5 else "")
        + f" test loss | params |{extra} train time (s) | search {metric} | config |",
        "|---:|---|---|---:|" + ("---:|" if top5 else "") + "---:|---:|" + ("---:|---:|---:|" if costs else "") + "---:|---:|---|",
    ]
    for b in board.to_dict("records"):
        search_metric = df.loc[df["trial_id"] == b["trial_id"], metric_cols[0]].iloc[0] if metric_cols else None
        acc = _fmt(b["test_acc_mean"])
        if several_seeds:
            acc += f" ± {_fmt(b['test_acc_std'])}" if not math.isnan(b["test_acc_std"]) else " (1 seed)"
        seeds = f"{b['seeds_ok']}/{b['seeds']}" if b["seeds_ok"] != b["seeds"] else str(b["seeds"])
        params = f"{int(b['params']):,}" if _num(b["params"]) is not None else "–"
        cost_cells = ""
        if costs:
            macs = f"{int(b['macs']):,}" if _num(b["macs"]) is not None else "–"
            rank = str(int(b["pareto_rank"])) if _num(b["pareto_rank"]) is not None else "–"
            cost_cells = f" {macs} | {_fmt(_num(b['latency_ms']), '.2f')} | {rank} |"
        lines.append(
            f"| {b['rank']} | {b['trial_id']} | {acc} | {seeds} |" + (f" {_fmt(b['test_top5_mean'])} |" if top5 else "")
            + f" {_fmt(b['test_loss_mean'])} | {params} |{cost_cells} {_fmt(b['train_time_s_mean'], '.1f')} | {_fmt(_num(search_metric))} "
            f"| {summarize_config(json.loads(b['config']))} |"
        )
    failed = df[df["status"] != "completed"]
    if len(failed):
        lines += ["", "Runs that did not complete (not in the means):", ""]
        lines += [f"- {r['trial_id']} seed {r['seed']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "") for r in failed.to_dict("records")]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ driver


def _epoch_printer(out: Printer) -> Callable[[dict[str, Any]], None]:
    def show(m: dict[str, Any]) -> None:
        out(f"    {m['trial_id']} seed {m['seed']}  epoch {m['epoch']:>3}/{m['epochs']}  train_loss {m['train_loss']:.4f}  "
            f"train_acc {m['train_acc']:.4f}  lr {m['lr']:.2e}  {m.get('epoch_time_s', 0.0):.1f}s")

    return show


def _resolve(value: int | None, default: int, flag: str) -> int:
    v = default if value is None else value
    if v < 1:
        raise UserError(f"{flag} must be >= 1, got {v}")
    return v


def run_retrain(
    exp: Experiment,
    *,
    top: int | None = None,
    epochs: int | None = None,
    seeds: int | None = None,
    rank_by: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool = False,
    pareto: bool = False,
    tsne: bool = True,
    out: Printer = print,
) -> pd.DataFrame:
    """Refit the top configs of ``exp`` and test them; returns the retrain.parquet table. ``pareto``: the
    trials on the search's Pareto front instead (with ``top``: the first ``top`` by rank, then crowding).
    ``tsne``: also compute the rank-1 model's t-SNE feature map (``tsne.parquet``; seconds to minutes on a CPU)."""
    stored = load_stored_spec(exp)
    metric, mode = stored.search.metric, stored.search.resolved_mode
    if pareto:
        if top is not None:
            _resolve(top, 1, "--top")
    else:
        top = _resolve(top, stored.retrain.top, "--top")
    epochs = _resolve(epochs, stored.retrain.epochs, "--epochs")
    seeds = _resolve(seeds, stored.retrain.seeds, "--seeds")
    rank_by = rank_by or stored.retrain.rank_by
    if not exp.has("trials.parquet"):
        raise UserError(f"experiment '{exp.name}' has no trials.parquet (the search has not run)")
    if pareto:
        chosen = select_pareto(exp.read_table("trials.parquet"), objectives=stored.search.pareto_objectives, top=top, experiment=exp.name)
        rule, rank_by = pareto_rule(stored.search.objectives, top), "pareto"
    else:
        chosen = select_top(exp.read_table("trials.parquet"), top=top, metric=metric, mode=mode, rank_by=rank_by, experiment=exp.name)
        rule = ranking_rule(metric, mode, rank_by)
    out(f"ranking rule: {rule}")
    for t in chosen.to_dict("records"):
        col = f"best_{metric}" if pareto else f"{rank_by}_{metric}"
        out(f"  {t['rank']:>2}. {t['trial_id']}  {col} {float(t[col]):.4f}  "
            f"{t['status']} after {plural(int(t['epochs_run']), 'epoch')}  {summarize_config(json.loads(t['config']))}")
    return _refit(exp, stored, chosen, epochs=epochs, seeds=seeds, rank_by=rank_by, rule=rule,
                  address=address, num_cpus=num_cpus, out=out, dashboard=dashboard, tsne=tsne)


def _refit(
    exp: Experiment, stored: StoredSpec, chosen: pd.DataFrame, *, epochs: int, seeds: int, rank_by: str, rule: str,
    address: str | None, num_cpus: int | None, out: Printer, dashboard: bool = False, tsne: bool = True,
) -> pd.DataFrame:
    from cifar_tune.tuning import cluster as cluster_mod
    from cifar_tune.tuning import tasks, tuner
    from cifar_tune.tuning.driver import print_cluster, search_mps

    data_mod.prepare(stored.data)
    test = data_mod.load_test(stored.data)  # the one read of the test split, here in the driver
    # refits packed on a GPU share it like the search's trials: MPS as the search had it, except that a
    # retrain on a machine that cannot run it (the search's `on` on another machine) goes on without
    res_spec = stored.search.resources
    mps, _ = search_mps(replace(res_spec, mps="auto" if res_spec.mps == "on" else res_spec.mps),
                        joins=cluster_mod.joins_cluster(address))
    from cifar_tune.engine.usermodels import factory_files

    configs = [json.loads(c)["model"] for c in chosen["config"]]
    cluster = cluster_mod.connect(address, dashboard=dashboard, num_cpus=num_cpus, mps=mps, out=out,
                                  py_modules=factory_files(configs))
    print_cluster(cluster, out)
    try:
        res = tuner.trial_resources(stored.search.resources, cluster)
        test_ref = tasks.put(test)  # stored once, shared by every task
        trials = chosen.to_dict("records")
        calls = [
            {"trial_id": t["trial_id"], "seed_index": s, "seed": retrain_seed(stored.search.seed, t["trial_id"], s),
             "config": json.loads(t["config"]), "data": stored.data, "epochs": epochs, "test": test_ref,
             "threads": max(1, int(res["cpu"]))}
            for t in trials for s in range(seeds)
        ]
        out(f"retraining {plural(len(trials), 'config')} x {plural(seeds, 'seed')} = {plural(len(calls), 'run')} of "
            f"{plural(epochs, 'epoch')} on train+val "
            f"({plural(res['cpu'], 'CPU')}" + (f", {plural(res['gpu'], 'GPU')}" if res["gpu"] else "")
            + f" each, {plural(cluster.cpus, 'CPU')} in the cluster)")
        top: list[tuple[dict[str, Any], dict[str, Any]]] = []  # the rank-1 config's first completed run
        rows = _collect(exp, stored, trials, calls, res, epochs=epochs, rank_by=rank_by, out=out, top=top)
    finally:
        if cluster.started_here:
            cluster_mod.shutdown()
    if not tsne:
        if exp.has(TSNE_TABLE):  # a map of an earlier retrain would show a model this run did not produce
            exp.delete_file(TSNE_TABLE)
        out("t-SNE feature map: skipped (--no-tsne)")
    elif top:  # t-SNE of the top model's penultimate features on the test split read above (cifar_tune.engine.features)
        from cifar_tune.engine.features import write_feature_map

        (result, config), = top
        write_feature_map(exp, result["state_dict"], config, result["info"], test, trial_id=result["trial_id"], out=out)
    df = retrain_frame(rows, stored.search.metric)
    for line in tracking.log_retrain(stored.tracking, exp, df.to_dict("records")):
        out(line)
    exp.write_text("leaderboard.md", leaderboard_markdown(df, experiment=exp.name, metric=stored.search.metric, rule=rule, epochs=epochs))
    out(f"results: {exp.uri('retrain.parquet')}  leaderboard: {exp.uri('leaderboard.md')}  checkpoints: {exp.uri('checkpoints')}")
    return df


def _collect(
    exp: Experiment, stored: StoredSpec, trials: list[dict[str, Any]], calls: list[dict[str, Any]],
    res: dict[str, float], *, epochs: int, rank_by: str, out: Printer,
    top: list[tuple[dict[str, Any], dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Checkpoint and record each run as it finishes; the table is rewritten after every run. ``top``
    receives (result, config) of the rank-1 config's lowest completed seed (for the feature map)."""
    from cifar_tune.tuning import tasks

    by_id = {t["trial_id"]: t for t in trials}
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for i, result in tasks.run_tasks(retrain_one, calls, cpus=res["cpu"], gpus=res["gpu"], on_progress=_epoch_printer(out)):
        trial = by_id[result["trial_id"]]
        ckpt = None
        if result["status"] == "completed":
            ckpt = checkpoint_name(result["trial_id"], result["seed"])
            exp.write_bytes(ckpt, _checkpoint_bytes(make_checkpoint(result, config=calls[i]["config"], data=stored.data, epochs=epochs)))
            if top is not None and result["trial_id"] == trials[0]["trial_id"] and (
                    not top or result["seed"] < top[0][0]["seed"]):
                top[:] = [(result, calls[i]["config"])]
        rows.append(_row(result, trial, epochs=epochs, metric=stored.search.metric, rank_by=rank_by, checkpoint=ckpt))
        write_retrain_table(exp, retrain_frame(rows, stored.search.metric))
        if result["status"] == "completed":
            top5 = f"  top5 {result['test_top5']:.4f}" if shows_top5(len(result["per_class_acc"])) else ""
            detail = f"test_acc {result['test_acc']:.4f}{top5}  loss {result['test_loss']:.4f}"
        else:
            detail = result.get("error") or ""
        out(f"  [{len(rows)}/{len(calls)} {time.monotonic() - t0:5.0f}s] {result['trial_id']} seed {result['seed']}: "
            f"{result['status']}  {detail}  ({result.get('train_time_s') or 0.0:.1f}s training)")
    return rows


# ----------------------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class CheckpointEval:
    data: DataSpec
    split: str
    top1: float
    top5: float
    loss: float
    num_images: int


def override_data(ckpt_data: DataSpec, value: str) -> DataSpec:
    """``--data``: a dataset name (cifar10, synthetic, ...), a path to an .npz file or an image folder."""
    if Path(value).is_dir():  # an image folder (train/<class>/..., test/<class>/...)
        return DataSpec(dataset="imagefolder", path=str(Path(value).expanduser().resolve()), root=ckpt_data.root,
                        image_size=ckpt_data.image_size)
    if value.endswith(".npz") or Path(value).is_file():
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"--data {value}: no such .npz file")
        return DataSpec(dataset="npz", path=str(path.resolve()), root=ckpt_data.root)
    if value not in data_mod.DATASETS:
        raise UserError(f"--data {value}: {data_mod.DATASETS.unknown_message(value)} (or give a path to an .npz file)")
    if value == ckpt_data.dataset:
        return ckpt_data
    return replace(ckpt_data, dataset=value, path=None, subset=None)


def evaluate_checkpoint(ckpt: dict[str, Any], data: DataSpec, split: str, where: str,
                        device: torch.device | None = None) -> CheckpointEval:
    """Rebuild the model from the checkpoint and evaluate it with the normalisation it was trained with."""
    from cifar_tune.engine.devices import parse_device
    from cifar_tune.engine.models import build_model
    from cifar_tune.engine.train import evaluate

    info = data_mod.dataset_info(data)
    want = (ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"])
    got = (info.num_classes, info.channels, info.image_size)
    if want != got:
        raise UserError(f"{where}: the model expects {want[0]} classes of {want[1]}x{want[2]}x{want[2]} images; "
                        f"{data.dataset} has {got[0]} classes of {got[1]}x{got[2]}x{got[2]}")
    model = build_model(ckpt["config"]["model"], num_classes=want[0], in_channels=want[1], image_size=want[2])
    model.load_state_dict(ckpt["state_dict"])
    device = device or parse_device(None)
    model.to(device)
    data_mod.prepare(data)
    if split == "val":  # the search's validation split: same data spec, same seeded split
        part = data_mod.load_splits(data)[1]
    else:
        part = data_mod.load_test(data) if split == "test" else data_mod.load_trainval(data)
    ev = evaluate(model, part, mean=tuple(ckpt["mean"]), std=tuple(ckpt["std"]), num_classes=want[0], device=device)
    return CheckpointEval(data=data, split=split, top1=ev.top1, top5=ev.top5, loss=ev.loss, num_images=ev.num_images)


def run_evaluate(path: str, data_values: list[str] | None, split: str, out: Printer = print,
                 device: torch.device | None = None) -> list[CheckpointEval]:
    ckpt = load_checkpoint(path)
    base = data_spec_from_dict(ckpt["data"], path)
    targets = [override_data(base, v) for v in data_values] if data_values else [base]
    what = "search trial, after" if "trainer" in ckpt else f"seed {ckpt['seed']},"
    out(f"{path}: {ckpt['trial_id']} {what} {plural(ckpt['epochs'], 'epoch')}, {summarize_config(ckpt['config'])}")
    results = []
    for data in targets:
        r = evaluate_checkpoint(ckpt, data, split, path, device)
        name = data.path if data.dataset == "npz" else data.dataset
        top5 = f"  top-5 {r.top5:.4f}" if shows_top5(ckpt["num_classes"]) else ""
        out(f"  {name} {split} ({r.num_images:,} images): top-1 {r.top1:.4f}{top5}  loss {r.loss:.4f}")
        results.append(r)
    return results
