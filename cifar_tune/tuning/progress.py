"""What a running search shows: the live table, the leaderboard, checkpoint disk use, and the fan-out of
results to the store, the gauges and the trackers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from cifar_tune.results import FINISHED, TrialLog, trial_label
from cifar_tune.spec.schema import Spec
from cifar_tune.text import plural, summarize_config
from cifar_tune.tuning.sources import Printer

# ------------------------------------------------------------------------------------- progress


class LiveTable:
    """The events sink: records to the TrialLog and prints a compact status table now and then."""

    def __init__(self, log: TrialLog, total: int, out: Printer, every_s: float, progress: Printer | None = None) -> None:
        self.log, self.total, self.out, self.every_s = log, total, out, every_s
        self.progress = progress  # set: each tick sends one status line there instead of the periodic table
        self.t0 = time.monotonic()
        self._last_print = 0.0

    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None:
        self.log.trial_started(trial_id, config)

    def trial_resumed(self, trial_id: str) -> None:
        self.log.trial_resumed(trial_id)

    def trial_result(self, trial_id: str, metrics: dict[str, Any]) -> None:
        self.log.trial_result(trial_id, metrics)
        if metrics.get("restored_from"):  # what changed: the log's epoch row has it (the trial sends the config)
            rows = self.log.trial_epochs(trial_id)
            recorded = rows[-1].get("config_changes") if rows else None
            changes = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in json.loads(recorded or "{}").items())
            self.out(f"  {trial_id} continues from {metrics['restored_from']}'s checkpoint at epoch {metrics.get('epoch')}" + (f" with {changes}" if changes else ""))

    def trial_checkpoint(self, trial_id: str, path: str, epoch: int) -> None:
        self.log.trial_checkpoint(trial_id, path, epoch)

    def trial_finished(self, trial_id: str, last: dict[str, Any]) -> None:
        self.log.trial_finished(trial_id, last)
        self._one_line(trial_id)

    def trial_errored(self, trial_id: str, message: str) -> None:
        self.log.trial_errored(trial_id, message)
        self._one_line(trial_id)

    def trial_retried(self, trial_id: str) -> None:
        self.log.trial_retried(trial_id)
        self.out(f"  {trial_id} failed; retrying")

    def tick(self) -> None:
        self.log.flush(idle=True)  # a checkpoint or result the throttle held back reaches the disk
        if self.progress is not None:
            self.progress(self.status_line())
        elif time.monotonic() - self._last_print >= self.every_s:
            self.print_table()

    def _one_line(self, trial_id: str) -> None:
        r = self.log.rows[trial_id]
        m = self.log.metric
        score = r.get(f"best_{m}")
        detail = f"best {m} {score:.4f} at epoch {r.get('best_epoch')}" if score is not None else (r.get("error") or "")
        n = int(r.get("epochs_run") or 0)
        self.out(f"  {trial_label(trial_id, json.loads(r['config'])):<28} {r['status']:<9} after {n:>3} epoch{'s' if n != 1 else ' '}  {detail}")

    def print_table(self) -> None:
        self._last_print = time.monotonic()
        self.out(self.status_line())
        m = self.log.metric
        for r in self.log.rows.values():
            if r["status"] == "running":
                val = r.get(f"last_{m}")
                val_txt = f"{m} {val:.4f}" if val is not None else ""
                self.out(f"    {trial_label(r['trial_id'], json.loads(r['config'])):<28} epoch {r.get('epochs_run', 0):>3}/{r['max_epochs']}  {val_txt}")

    def status_line(self) -> str:
        c = self.log.counts()
        done = sum(c.get(s, 0) for s in FINISHED)
        best = self.log.best()
        m = self.log.metric
        best_txt = f"best {m} {best[f'best_{m}']:.4f} ({best['trial_id']})" if best else "no results yet"
        parts = ", ".join(f"{c[s]} {s}" for s in FINISHED if c.get(s))
        elapsed = time.monotonic() - self.t0
        return f"[{elapsed:6.0f}s] {c.get('running', 0)} running | {done}/{self.total} finished ({parts or 'none'}) | {best_txt}"


# ------------------------------------------------------------------------------------ checkpoints

# optimizer state per parameter, in parameter-sized tensors (Adam: two moments; SGD: momentum buffer)
OPTIMIZER_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2, "rmsprop": 2, "adagrad": 1}


def checkpoint_bytes(params: int, optimizer: str) -> int:
    """About what one trial checkpoint takes: fp32 weights plus optimizer state (buffers, RNGs and
    history are small next to them)."""
    return 4 * params * (1 + OPTIMIZER_SLOTS.get(optimizer, 2)) + 64 * 1024


def checkpoint_disk(spec: Spec, trials: list[dict[str, Any]], concurrent: int) -> tuple[float, float, float]:
    """(MB per checkpoint on average, MB at the end: one per trial, MB at most while running)."""
    sizes = [checkpoint_bytes(int(t.get("params") or 0), json.loads(t["config"]).get("optimizer", {}).get("name", "sgd")) for t in trials]
    if not sizes:
        return 0.0, 0.0, 0.0
    keep = spec.search.checkpoint.resolved_keep(spec.search.scheduler.name)
    avg = sum(sizes) / len(sizes)
    largest = sorted(sizes, reverse=True)[: max(1, concurrent)]
    peak = sum(sizes) + (keep - 1) * sum(largest)  # running trials hold up to `keep` each
    return avg / 1e6, sum(sizes) / 1e6, peak / 1e6


def checkpoint_disk_line(spec: Spec, trials: list[dict[str, Any]], concurrent: int) -> str | None:
    ck = spec.search.checkpoint
    if ck.every_epochs == 0 or not trials:
        return None
    avg, end, peak = checkpoint_disk(spec, trials, concurrent)
    return (f"checkpoints every {plural(ck.every_epochs, 'epoch')}, keep {ck.resolved_keep(spec.search.scheduler.name)} per running trial: "
            f"~{avg:.1f} MB each, ~{end:.0f} MB on disk at the end (one per trial), up to ~{peak:.0f} MB while running")


class Fanout:
    """The events sink Ray sees: the live table first (it records the statuses the others read)."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def __getattr__(self, event: str) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            for s in self.sinks:  # a sink implements the events it cares about (checkpoints: the log only)
                if (handler := getattr(s, event, None)) is not None:
                    handler(*args, **kwargs)

        return call


class GaugeSink:
    """Keeps the search's Prometheus gauges (trials by status, best metric) in step with the log."""

    STATUSES = ("pending", "running", *FINISHED, "interrupted")

    def __init__(self, log: TrialLog, gauges: Any) -> None:
        self.log, self.gauges = log, gauges

    def _update(self, *_: Any, **__: Any) -> None:
        best = self.log.best()
        self.gauges.update(self.log.counts(), best[f"best_{self.log.metric}"] if best else None)

    trial_started = trial_result = trial_finished = trial_errored = trial_retried = _update

    def tick(self) -> None:
        pass


class Facts:
    """``callbacks.TrialFacts`` from the trial log: what the trackers and TensorBoard record per trial."""

    def __init__(self, log: TrialLog, space: dict[str, Any]) -> None:
        self.log, self.space = log, space

    def status(self, trial_id: str) -> str | None:
        return self.log.rows[trial_id]["status"]

    def hparams(self, trial_id: str) -> dict[str, Any]:
        from cifar_tune.spec.searched import searched_params

        return {p.name: p.value for p in searched_params(self.space, json.loads(self.log.rows[trial_id]["config"]))}

    def summary(self, trial_id: str) -> dict[str, float]:
        r, m = self.log.rows[trial_id], self.log.metric
        return {f"best_{m}": r.get(f"best_{m}"), f"last_{m}": r.get(f"last_{m}"), "epochs_run": r.get("epochs_run")}


def leaderboard_lines(log: TrialLog, k: int = 10) -> list[str]:
    m = log.metric
    sign = -1 if log.mode == "max" else 1
    scored = sorted(
        (r for r in log.rows.values() if r.get(f"best_{m}") is not None),
        key=lambda r: (sign * r[f"best_{m}"], r["sample_index"]),
    )[:k]
    lines = [f"top {len(scored)} by best {m}:", f"  {'rank':<5}{'trial':<10}{m:>9}{'epoch':>7}{'params':>12}  status     config"]
    for i, r in enumerate(scored, 1):
        lines.append(
            f"  {i:<5}{r['trial_id']:<10}{r[f'best_{m}']:>9.4f}{r.get('best_epoch') or 0:>7}{int(r.get('params') or 0):>12,}  "
            f"{r['status']:<10} {summarize_config(json.loads(r['config']))}"
        )
    return lines
