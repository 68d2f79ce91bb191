"""The experiment directory: resolved spec, ``trials.parquet`` and ``epochs.parquet``.

Files are replaced atomically (write a temporary file, then rename), so a reader, or a driver killed
mid-write, never sees a truncated parquet file. ``--storage`` may be a local directory or a pyarrow
filesystem URI (``s3://bucket/prefix``, ``gs://...``, ``file:///shared/exp``) for clusters.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cifar_tune.errors import UserError
from cifar_tune.pareto import hypervolume_frame, pareto_columns
from cifar_tune.spec.fields import check_name
from cifar_tune.spec.schema import ObjectiveSpec
from cifar_tune.summaries import is_missing, summarise_epochs

DEFAULT_ROOT = "experiments"
FINISHED = ("completed", "stopped", "diverged", "error", "oom")
EPOCH_KEYS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr",
    "train_time_s", "epoch_time_s", "images_per_s", "status", "node_id", "pid", "worker_data_loads",
    "device", "gpu_mem_peak_mb", "ended_at",
    "restored_from", "config_changes",
)
EPOCH_COLUMNS = ("trial_id", *EPOCH_KEYS, "attempt")  # attempt: which start of the trial wrote the row
MEASURED_COSTS = ("macs", "latency_ms")  # objectives a trial measures once (params it always reports)
HYPERVOLUME_FILE = "hypervolume.parquet"  # with several objectives: the front's hypervolume after every epoch


class Storage:
    """A directory on the local disk or on a pyarrow filesystem; paths inside it are relative."""

    def __init__(self, root: str) -> None:
        if "://" in root and not root.startswith("file://"):
            self.fs, self.base = pafs.FileSystem.from_uri(root)
            self.local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root.removeprefix("file://")).expanduser().resolve())
            self.local = True
        self.root = root

    def uri(self, rel: str = "") -> str:
        """The path or URI Ray Tune and users see."""
        if self.local:
            return str(Path(self.base, rel)) if rel else self.base
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def path(self, rel: str) -> str:
        p = os.path.normpath(f"{self.base}/{rel}") if self.local else f"{self.base}/{rel}"
        if self.local and not (p == self.base or p.startswith(self.base + os.sep)):
            raise UserError(f"{rel}: path escapes the storage root {self.base}")
        return p

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.local:  # object stores replace whole objects atomically
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:  # disk full, Ctrl-C, ...: the old file stays, and no temporary file is left
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def write_table(self, rel: str, df: pd.DataFrame) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(_parquet_safe(df), preserve_index=False), buf)
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pd.DataFrame:
        # one file, read whole: pq.read_table would scan it as a dataset with readahead threads, which
        # have aborted a driver at exit ("arrow::Future" destructors after the interpreter began to stop)
        return pq.ParquetFile(io.BytesIO(self.read_bytes(rel))).read().to_pandas()

    def list_dirs(self, rel: str = "") -> list[tuple[str, float]]:
        sel = pafs.FileSelector(self.path(rel) if rel else self.base, allow_not_found=True)
        return [(i.base_name, i.mtime.timestamp() if i.mtime else 0.0) for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory]

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    def delete_file(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_file(self.path(rel))

    def relative(self, fs_path: str) -> str | None:
        """A path on this storage's filesystem (as Ray Tune reports it) relative to the root, if inside."""
        base = os.path.normpath(self.base) if self.local else self.base.rstrip("/")
        fs_path = os.path.normpath(fs_path) if self.local else fs_path
        return fs_path[len(base) + 1 :] if fs_path.startswith(base + "/") else None


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Columns mixing types (e.g. a knob that is an int in one trial, a list in another) -> JSON text."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            kinds = {type(v) for v in out[col] if v is not None and not (isinstance(v, float) and pd.isna(v))}
            if len(kinds) > 1 or kinds & {list, dict, tuple}:
                out[col] = [None if v is None else json.dumps(v, default=str) for v in out[col]]
    return out


def flatten(config: Mapping[str, Any], prefix: str = "config") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"config.optimizer.lr": 0.1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def trial_label(trial_id: str, config: dict[str, Any]) -> str:
    """How a trial shows up in Ray's dashboard, TensorBoard and our tables: t0007-vgg-sgd."""
    fam = config.get("model", {}).get("family", "model")
    opt = config.get("optimizer", {}).get("name", "opt")
    return f"{trial_id}-{fam}-{opt}"


class Experiment:
    """``<storage>/<name>/``: where one search keeps everything it writes."""

    def __init__(self, storage_root: str, name: str) -> None:
        if problem := check_name(name, "experiment name"):
            raise UserError(problem)
        self.storage = Storage(storage_root)
        self.name = name
        self.rel = name

    def __repr__(self) -> str:
        return f"Experiment({self.uri()})"

    def uri(self, rel: str = "") -> str:
        return self.storage.uri(f"{self.rel}/{rel}" if rel else self.rel)

    def exists(self) -> bool:
        return self.storage.exists(f"{self.rel}/spec.yaml")

    def has(self, rel: str) -> bool:
        return self.storage.exists(f"{self.rel}/{rel}")

    def write_text(self, rel: str, text: str) -> None:
        self.storage.write_text(f"{self.rel}/{rel}", text)

    def read_text(self, rel: str) -> str:
        return self.storage.read_text(f"{self.rel}/{rel}")

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.storage.write_bytes(f"{self.rel}/{rel}", data)

    def read_bytes(self, rel: str) -> bytes:
        return self.storage.read_bytes(f"{self.rel}/{rel}")

    def write_table(self, rel: str, df: pd.DataFrame) -> None:
        self.storage.write_table(f"{self.rel}/{rel}", df)

    def read_table(self, rel: str) -> pd.DataFrame:
        return self.storage.read_table(f"{self.rel}/{rel}")

    def relative(self, fs_path: str) -> str | None:
        rel = self.storage.relative(fs_path)
        return rel[len(self.rel) + 1 :] if rel and rel.startswith(self.rel + "/") else None

    def delete_dir(self, rel: str) -> None:
        self.storage.delete_dir(f"{self.rel}/{rel}")

    def delete_file(self, rel: str) -> None:
        self.storage.delete_file(f"{self.rel}/{rel}")

    def list_dirs(self, rel: str) -> list[str]:
        return [name for name, _ in self.storage.list_dirs(f"{self.rel}/{rel}")]

    def local_dir(self) -> Path:
        """For outputs that need a real directory (plots, checkpoints) on local storage."""
        if not self.storage.local:
            raise UserError(f"{self.uri()}: this command needs local storage")
        return Path(self.uri())


def experiment_at(path: str) -> Experiment:
    """The experiment in directory ``path`` (what ``search`` prints: ``/data/runs/quickstart``, a
    relative path, or a URI such as ``s3://bucket/runs/quickstart``)."""
    if "://" in path and not path.startswith("file://"):
        root, _, name = path.rstrip("/").rpartition("/")
    else:
        where = Path(path.removeprefix("file://")).expanduser().resolve()
        root, name = str(where.parent), where.name
    try:
        exp = Experiment(root, name)
    except UserError:
        raise UserError(f"{path}: not an experiment directory (no spec.yaml)") from None
    if not exp.exists():
        raise UserError(f"{path}: not an experiment directory (no spec.yaml)")
    return exp


def _is_path(name: str, storage_root: str) -> bool:
    """An argument with a slash (names cannot have one), or a directory here that is not a name in the
    storage root, is the experiment's directory."""
    if "/" in name or os.sep in name or name in (".", ".."):
        return True
    return not Storage(storage_root).exists(f"{name}/spec.yaml") and Path(name, "spec.yaml").is_file()


def find_experiment(storage_root: str, name: str | None) -> Experiment:
    """``name`` under the storage root, the experiment directory ``name`` (a path), or, if None, the most
    recently modified experiment under the storage root."""
    if name is not None and _is_path(name, storage_root):
        return experiment_at(name)
    if name is None:
        storage = Storage(storage_root)
        dirs = [(n, t) for n, t in storage.list_dirs() if storage.exists(f"{n}/spec.yaml")]
        if not dirs:
            raise UserError(f"no experiment under {storage.uri()} (run `cifar-tune search SPACE.yaml` first)")
        name = max(dirs, key=lambda d: d[1])[0]
    exp = Experiment(storage_root, name)
    if not exp.exists():
        from cifar_tune.registry import did_you_mean

        hint = did_you_mean(name, experiment_names(storage_root))
        raise UserError(f"experiment '{name}' not found under {exp.storage.uri()} (no spec.yaml){hint}")
    return exp


def experiment_names(storage_root: str) -> list[str]:
    """Names of the experiments under a storage root (directories with a spec.yaml), oldest first."""
    storage = Storage(storage_root)
    try:
        dirs = storage.list_dirs()
    except (FileNotFoundError, OSError):
        return []
    return [n for n, _ in sorted(dirs, key=lambda d: d[1]) if storage.exists(f"{n}/spec.yaml")]


def run_metadata() -> dict[str, Any]:
    """Library versions and code revision, stored next to the resolved spec."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str | None:  # without importing it (Ray stays in the tuning layer)
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    rev = None
    try:
        here = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True, timeout=5).stdout
        if rev and dirty.strip():
            rev += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        # the package is loaded (this is its submodule); importing it here would loop through its API
        "cifar_tune": sys.modules["cifar_tune"].__version__,
        "code_revision": rev,
        "python": platform.python_version(),
        **{dist: installed(dist) for dist in ("torch", "torchvision", "ray", "pandas", "pyarrow", "optuna")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
    }


class TrialLog:
    """The search's record of every trial and epoch, flushed to parquet as the search runs.

    ``trials.parquet`` is rewritten at most every ``flush_every_s`` seconds while results stream in,
    and at once whenever a trial starts, finishes or fails, so a killed driver loses at most the
    last few seconds of epoch rows of trials that were still running (and those are rerun anyway).

    Each trial's epoch rows are those of its current attempt only (a retry or a rerun after
    ``--resume`` starts over), and its summary columns are recomputed from them on every change
    (``summarise_epochs``): a dead attempt can never leave a better ``best_val_acc`` behind.
    """

    def __init__(
        self, exp: Experiment, *, metric: str, mode: str, max_epochs: int, flush_every_s: float = 2.0,
        trials: pd.DataFrame | None = None, epochs: pd.DataFrame | None = None,
        objectives: tuple[ObjectiveSpec, ...] = (),
    ) -> None:
        self.exp, self.metric, self.mode, self.max_epochs = exp, metric, mode, max_epochs
        # several objectives: trials.parquet gains obj_* and the front, hypervolume.parquet is written
        self.objectives = objectives
        self.flush_every_s = flush_every_s
        # PBT: a trial may still continue from a finished trial's earlier checkpoint (it was told to copy
        # it before the donor finished), so finished trials keep theirs until the search ends
        self.trim_at_end = False
        self.rows: dict[str, dict[str, Any]] = {}
        self._epochs: dict[str, list[dict[str, Any]]] = {}
        self._last_flush = 0.0
        self._last_change = 0.0  # a throttled flush skipped changes made at this time
        if trials is not None:
            for row in trials.to_dict("records"):
                self.rows[row["trial_id"]] = {k: (None if is_missing(v) else v) for k, v in row.items()}
        records = [] if epochs is None else epochs.to_dict("records")
        self.epochs = [{k: (None if is_missing(v) else v) for k, v in r.items()} for r in records]

    @property
    def epochs(self) -> list[dict[str, Any]]:
        """Every trial's epoch rows (of its current attempt), trial by trial."""
        return [r for rows in self._epochs.values() for r in rows]

    @epochs.setter
    def epochs(self, rows: list[dict[str, Any]]) -> None:
        """Replace the epoch rows (e.g. on resume: only finished trials keep theirs); summaries follow."""
        self._epochs = {}
        for r in rows:
            if r["trial_id"] in self.rows and r.get("epoch") is not None:
                self._epochs.setdefault(r["trial_id"], []).append(r)
        for tid in self.rows:
            self._summarise(tid)

    def trial_epochs(self, trial_id: str) -> list[dict[str, Any]]:
        return list(self._epochs.get(trial_id, []))

    def _summarise(self, trial_id: str) -> None:
        self.rows[trial_id].update(summarise_epochs(self._epochs.get(trial_id, []), self.metric, self.mode))

    # -- events from the tuner -------------------------------------------------------------
    def add_pending(self, trial_id: str, index: int, config: dict[str, Any], params: int | None) -> None:
        self.rows[trial_id] = {
            "trial_id": trial_id, "sample_index": index, "status": "pending", "error": None,
            "params": params, "max_epochs": self.max_epochs, "attempts": 0,
            "config": json.dumps(config), **flatten(config),
        }
        self._summarise(trial_id)

    def trial_started(self, trial_id: str, config: dict[str, Any], *, resumed_from_epoch: int | None = None) -> None:
        """A new attempt: epoch rows after ``resumed_from_epoch`` (all, without a checkpoint) are dropped.
        By default that is the trial's last checkpoint: where a retry (Tune restores it) or a resumed
        search (``--resume`` passes it) continues."""
        row = self.rows[trial_id]
        if resumed_from_epoch is None:
            resumed_from_epoch = int(row.get("checkpoint_epoch") or 0) if row.get("checkpoint") else 0
        row.update(status="running", started_at=time.time(), ended_at=None, error=None, attempts=(row.get("attempts") or 0) + 1)
        self._epochs[trial_id] = [e for e in self._epochs.get(trial_id, []) if e["epoch"] <= resumed_from_epoch]
        self._summarise(trial_id)
        self.flush(force=True)

    def trial_result(self, trial_id: str, metrics: dict[str, Any]) -> None:
        row = self.rows[trial_id]
        row["params"] = metrics.get("params", row.get("params"))
        row.update({c: metrics[c] for c in MEASURED_COSTS if metrics.get(c) is not None})  # measured once, sent always
        if metrics.get("epoch") is None:  # an OOM/error report: no epoch was completed
            self.flush()
            return
        epoch_row = {"trial_id": trial_id, **{k: metrics.get(k) for k in EPOCH_KEYS}, "attempt": row.get("attempts")}
        epoch_row["epoch"] = int(epoch_row["epoch"])
        if metrics.get("config_json"):  # continued from a checkpoint: did PBT change the config in force?
            before, now = flatten(json.loads(row["config"]), ""), flatten(json.loads(metrics["config_json"]), "")
            changes = {k.lstrip("."): v for k, v in now.items() if k not in before or before[k] != v}
            # a key the new config lacks (a VGG config copied into a LeNet one: no model.blocks) maps to null
            changes.update({k.lstrip("."): None for k in before if k not in now})
            if changes:  # the epoch row says what changed; the trial row keeps the config in force
                epoch_row["config_changes"] = json.dumps(changes, sort_keys=True)
                for key in [k for k in row if k.startswith("config.")]:  # no column of a key that is gone
                    del row[key]
                row.update(config=metrics["config_json"], **flatten(json.loads(metrics["config_json"])))
        # an epoch reported again (a restored attempt) replaces the earlier attempt's row and those after it
        rows = [e for e in self._epochs.get(trial_id, []) if e["epoch"] < epoch_row["epoch"]]
        self._epochs[trial_id] = [*rows, epoch_row]
        self._summarise(trial_id)
        self.flush()

    def trial_resumed(self, trial_id: str) -> None:
        """Continued after a pause (hyperband) or a PBT exploit: the same attempt."""
        self.rows[trial_id]["status"] = "running"

    def trial_checkpoint(self, trial_id: str, fs_path: str, epoch: int) -> None:
        """Tune saved a checkpoint: remember the latest (``--resume`` continues from it)."""
        rel = self.exp.relative(fs_path)
        if rel is None:
            return
        row = self.rows[trial_id]
        previous = row.get("checkpoint")
        row.update(checkpoint=rel, checkpoint_epoch=epoch)
        if previous and previous.rsplit("/", 1)[0] != rel.rsplit("/", 1)[0]:
            self._delete_checkpoints(trial_id, keep=rel, runs_other_than=rel.split("/")[1])  # Tune trims its own run's only
        # at once, not throttled: Tune deletes the older checkpoints as new ones come, so a driver killed
        # later must find on disk the checkpoint trials.parquet names (and the epoch rows up to it)
        self.flush(force=True)

    def _delete_checkpoints(self, trial_id: str, keep: str, runs_other_than: str | None = None) -> None:
        """Delete this trial's checkpoints in ``ray/<run>/<trial_id>-*/`` but ``keep``."""
        for run in self.exp.list_dirs("ray"):
            if run == runs_other_than:
                continue
            for trial_dir in self.exp.list_dirs(f"ray/{run}"):
                if trial_dir.startswith(f"{trial_id}-"):
                    for name in self.exp.list_dirs(f"ray/{run}/{trial_dir}"):
                        rel = f"ray/{run}/{trial_dir}/{name}"
                        if name.startswith("checkpoint_") and rel != keep:
                            self.exp.delete_dir(rel)

    def _keep_last_checkpoint(self, trial_id: str) -> None:
        """A finished trial keeps one checkpoint, its latest (``cifar-tune evaluate`` reads it)."""
        latest = self.rows[trial_id].get("checkpoint")
        if latest and not self.trim_at_end:
            self._delete_checkpoints(trial_id, keep=latest)

    def check_checkpoint(self, trial_id: str) -> None:
        """Before ``--resume`` continues an unfinished trial: the checkpoint trials.parquet names must be on
        disk (a trials.parquet written before checkpoints were recorded at once may name one Tune has
        deleted since). If it is not, the trial continues from its newest checkpoint that is on disk and
        whose epoch row is recorded; with none, it starts over."""
        from cifar_tune.tuning.trial import CHECKPOINT_FILE

        row = self.rows[trial_id]
        if not row.get("checkpoint") or self.exp.has(f"{row['checkpoint']}/{CHECKPOINT_FILE}"):
            return
        recorded = {int(e["epoch"]) for e in self._epochs.get(trial_id, [])}
        found: list[tuple[int, str]] = []
        for run in self.exp.list_dirs("ray"):
            for trial_dir in self.exp.list_dirs(f"ray/{run}"):
                if trial_dir.startswith(f"{trial_id}-"):
                    for name in self.exp.list_dirs(f"ray/{run}/{trial_dir}"):
                        rel = f"ray/{run}/{trial_dir}/{name}"
                        if name.startswith("checkpoint_") and self.exp.has(f"{rel}/{CHECKPOINT_FILE}"):
                            found.append((_checkpoint_epoch(self.exp.read_bytes(f"{rel}/{CHECKPOINT_FILE}")), rel))
        usable = [(e, rel) for e, rel in found if e in recorded]
        epoch, rel = max(usable, default=(0, None))
        row.update(checkpoint=rel, checkpoint_epoch=epoch if rel else None)

    def trim_checkpoints(self) -> None:
        """At the end of the search (``trim_at_end``): every finished trial keeps its latest checkpoint only."""
        self.trim_at_end = False
        for tid, row in self.rows.items():
            if row["status"] in FINISHED:
                self._keep_last_checkpoint(tid)

    def trial_finished(self, trial_id: str, last: dict[str, Any]) -> None:
        row = self.rows[trial_id]
        status = last.get("status")
        if status not in ("diverged", "oom"):
            status = "completed" if (row.get("epochs_run") or 0) >= self.max_epochs else "stopped"
        row.update(status=status, ended_at=time.time(), error=last.get("error"))
        if status == "oom":  # the failed epoch has no row: its peak (what the memory cap stopped) is kept here
            row["oom_gpu_mem_peak_mb"] = last.get("gpu_mem_peak_mb")
        self._keep_last_checkpoint(trial_id)
        self.flush(force=True)
        self.write_hypervolume()

    def trial_errored(self, trial_id: str, message: str) -> None:
        row = self.rows[trial_id]
        oom = "out of memory" in message.lower()
        row.update(status="oom" if oom else "error", error=message, ended_at=time.time())
        self._keep_last_checkpoint(trial_id)
        self.flush(force=True)

    def trial_retried(self, trial_id: str) -> None:
        self.rows[trial_id]["status"] = "pending"

    # -- queries ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows.values():
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def best(self) -> dict[str, Any] | None:
        scored = [r for r in self.rows.values() if r.get(f"best_{self.metric}") is not None]
        if not scored:
            return None
        sign = 1 if self.mode == "max" else -1
        return max(scored, key=lambda r: (sign * r[f"best_{self.metric}"], -r["sample_index"]))

    def trials_frame(self) -> pd.DataFrame:
        rows = sorted(self.rows.values(), key=lambda r: r["sample_index"])
        df = pd.DataFrame(rows)
        for col in ("started_at", "ended_at"):
            if col in df:
                df[col] = pd.to_numeric(df[col], errors="coerce")
        if "started_at" in df and "ended_at" in df:
            df["wall_time_s"] = df["ended_at"] - df["started_at"]
        if self.objectives:
            df = pareto_columns(df, self.objectives)
        return df

    def write_hypervolume(self) -> None:
        """``hypervolume.parquet``, recomputed from the epoch rows and costs (several objectives only)."""
        if self.objectives:
            self.exp.write_table(HYPERVOLUME_FILE, hypervolume_frame(self.epochs_frame(), self.trials_frame(), self.objectives))

    def epochs_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.epochs, columns=EPOCH_COLUMNS)

    def flush(self, force: bool = False, *, idle: bool = False) -> None:
        """``idle``: only write what a throttled flush left unwritten (the driver's loop calls it)."""
        now = time.monotonic()
        if idle and self._last_flush >= self._last_change:
            return
        if not force and now - self._last_flush < self.flush_every_s:
            self._last_change = now
            return
        self._last_flush = now
        self.exp.write_table("epochs.parquet", self.epochs_frame())
        self.exp.write_table("trials.parquet", self.trials_frame())


def _checkpoint_epoch(blob: bytes) -> int:
    """The epoch a trial checkpoint was saved after (tensors and plain Python only: no code unpickled)."""
    import torch

    return int(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)["epochs"])
