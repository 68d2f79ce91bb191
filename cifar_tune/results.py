"""The experiment directory: resolved spec, ``trials.parquet`` and ``epochs.parquet``.

Files are replaced atomically (write a temporary file, then rename), so a reader, or a driver killed
mid-write, never sees a truncated parquet file. ``--storage`` may be a local directory or a pyarrow
filesystem URI (``s3://bucket/prefix``, ``gs://...``, ``file:///shared/exp``) for clusters.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
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
from cifar_tune.spec import check_name

DEFAULT_ROOT = "experiments"
FINISHED = ("completed", "stopped", "diverged", "error", "oom")
EPOCH_KEYS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr",
    "train_time_s", "epoch_time_s", "images_per_s", "status", "node_id", "pid", "worker_data_loads",
)


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
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

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
        return pq.read_table(io.BytesIO(self.read_bytes(rel))).to_pandas()

    def list_dirs(self) -> list[tuple[str, float]]:
        sel = pafs.FileSelector(self.base, allow_not_found=True)
        return [(i.base_name, i.mtime.timestamp() if i.mtime else 0.0) for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory]


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

    def local_dir(self) -> Path:
        """For outputs that need a real directory (plots, checkpoints) on local storage."""
        if not self.storage.local:
            raise UserError(f"{self.uri()}: this command needs local storage")
        return Path(self.uri())


def find_experiment(storage_root: str, name: str | None) -> Experiment:
    """``name`` or, if None, the most recently modified experiment under the storage root."""
    if name is None:
        storage = Storage(storage_root)
        dirs = [(n, t) for n, t in storage.list_dirs() if storage.exists(f"{n}/spec.yaml")]
        if not dirs:
            raise UserError(f"no experiment under {storage.uri()} (run `cifar-tune search SPACE.yaml` first)")
        name = max(dirs, key=lambda d: d[1])[0]
    exp = Experiment(storage_root, name)
    if not exp.exists():
        raise UserError(f"experiment '{name}' not found under {exp.storage.uri()} (no spec.yaml)")
    return exp


def run_metadata() -> dict[str, Any]:
    """Library versions and code revision, stored next to the resolved spec."""
    from importlib.metadata import PackageNotFoundError, version

    import cifar_tune

    def installed(dist: str) -> str | None:  # without importing it (Ray stays in tuner.py)
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
        "cifar_tune": cifar_tune.__version__,
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
    """

    def __init__(
        self, exp: Experiment, *, metric: str, mode: str, max_epochs: int, flush_every_s: float = 2.0,
        trials: pd.DataFrame | None = None, epochs: pd.DataFrame | None = None,
    ) -> None:
        self.exp, self.metric, self.mode, self.max_epochs = exp, metric, mode, max_epochs
        self.flush_every_s = flush_every_s
        self.rows: dict[str, dict[str, Any]] = {}
        self.epochs: list[dict[str, Any]] = []
        self._last_flush = 0.0
        if trials is not None:
            for row in trials.to_dict("records"):
                self.rows[row["trial_id"]] = {k: (None if _isna(v) else v) for k, v in row.items()}
        if epochs is not None:
            self.epochs = [r for r in epochs.to_dict("records") if r["trial_id"] in self.rows]

    # -- events from the tuner -------------------------------------------------------------
    def add_pending(self, trial_id: str, index: int, config: dict[str, Any], params: int | None) -> None:
        self.rows[trial_id] = {
            "trial_id": trial_id, "sample_index": index, "status": "pending", "error": None,
            "params": params, "epochs_run": 0, "max_epochs": self.max_epochs, "attempts": 0,
            "config": json.dumps(config), **flatten(config),
        }

    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None:
        row = self.rows[trial_id]
        row.update(status="running", started_at=time.time(), ended_at=None, epochs_run=0, attempts=(row.get("attempts") or 0) + 1)
        self.epochs = [e for e in self.epochs if e["trial_id"] != trial_id]  # a retry starts over
        self.flush(force=True)

    def trial_result(self, trial_id: str, metrics: dict[str, Any]) -> None:
        row = self.rows[trial_id]
        epoch_row = {"trial_id": trial_id, **{k: metrics.get(k) for k in EPOCH_KEYS}}
        self.epochs.append(epoch_row)
        row["epochs_run"] = int(metrics.get("epoch") or 0)
        row["node_id"] = metrics.get("node_id")
        row["params"] = metrics.get("params", row.get("params"))
        row["train_time_s"] = (row.get("train_time_s") or 0.0) + float(metrics.get("epoch_time_s") or 0.0)
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5"):
            if metrics.get(k) is not None:
                row[f"last_{k}"] = metrics[k]
        # best_*: all validation metrics at the best epoch by the search metric
        if metrics.get(self.metric) is not None and self._better(metrics[self.metric], row.get(f"best_{self.metric}")):
            row["best_epoch"] = row["epochs_run"]
            for k in ("val_acc", "val_loss", "val_top5"):
                row[f"best_{k}"] = metrics.get(k)
        self.flush()

    def trial_finished(self, trial_id: str, last: dict[str, Any]) -> None:
        row = self.rows[trial_id]
        status = last.get("status")
        if status not in ("diverged", "oom"):
            status = "completed" if (row.get("epochs_run") or 0) >= self.max_epochs else "stopped"
        row.update(status=status, ended_at=time.time(), error=last.get("error"))
        self.flush(force=True)

    def trial_errored(self, trial_id: str, message: str) -> None:
        row = self.rows[trial_id]
        oom = "out of memory" in message.lower()
        row.update(status="oom" if oom else "error", error=message, ended_at=time.time())
        self.flush(force=True)

    def trial_retried(self, trial_id: str) -> None:
        self.rows[trial_id]["status"] = "pending"

    # -- queries ---------------------------------------------------------------------------
    def _better(self, value: float, best: float | None) -> bool:
        if best is None or _isna(best):
            return True
        return value > best if self.mode == "max" else value < best

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
        return df

    def epochs_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.epochs, columns=["trial_id", *EPOCH_KEYS])

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_every_s:
            return
        self._last_flush = now
        self.exp.write_table("epochs.parquet", self.epochs_frame())
        self.exp.write_table("trials.parquet", self.trials_frame())


def _isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False
