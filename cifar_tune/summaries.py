"""A trial's summary columns, derived from its epoch rows only (``trials.parquet`` can always be
recomputed from ``epochs.parquet``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

SUMMARY_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_top5")


def summarise_epochs(rows: list[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any]:
    """A trial's summary columns, derived only from the epoch rows of the attempt that counts.

    ``epochs_run`` is the epoch the trial's model reached (its last row's epoch). The rows are the
    epochs this trial trained: after a PBT exploit it continues from the donor's checkpoint at the
    donor's epoch, so its rows may jump (1, 2, 5, 6: it copied an epoch-4 checkpoint); the row after a
    jump names the donor in ``restored_from``, and the donor's earlier epochs stay the donor's rows.
    ``best_*`` are the validation metrics at the first epoch with the best ``metric`` among the
    epochs trained since the trial's last exploit (the model and config it ends with: an epoch
    trained before an exploit belonged to another model under another config); ``last_*`` those of
    the last row; times are sums over the rows (what this trial spent). Nothing carries over from
    anything else, so ``trials.parquet`` can always be recomputed from ``epochs.parquet``.
    """
    rows = sorted(rows, key=lambda r: r["epoch"])
    out: dict[str, Any] = {
        "epochs_run": int(rows[-1]["epoch"]) if rows else 0,
        "best_epoch": None,
        **{f"best_{k}": None for k in ("val_acc", "val_loss", "val_top5")},
        **{f"last_{k}": None for k in SUMMARY_METRICS},
        "train_time_s": float(sum(_num(r.get("train_time_s")) or 0.0 for r in rows)),
        "epoch_time_s": float(sum(_num(r.get("epoch_time_s")) or 0.0 for r in rows)),
    }
    if not rows:
        return out
    last = rows[-1]
    out.update({f"last_{k}": _num(last.get(k)) for k in SUMMARY_METRICS})
    out["node_id"] = last.get("node_id")
    sign = 1.0 if mode == "max" else -1.0
    best: Mapping[str, Any] | None = None
    for r in since_last_exploit(rows):  # strict improvement: ties go to the earlier epoch
        v = _num(r.get(metric))
        if v is not None and math.isfinite(v) and (best is None or sign * v > sign * best[metric]):
            best = r
    if best is not None:
        out["best_epoch"] = int(best["epoch"])
        out.update({f"best_{k}": _num(best.get(k)) for k in ("val_acc", "val_loss", "val_top5")})
    return out


def since_last_exploit(rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The epoch rows (sorted by epoch) trained under the trial's final model lineage and config: from
    its last row that continued from another trial's checkpoint (a PBT exploit) on; all rows if none."""
    start = max((i for i, r in enumerate(rows) if r.get("restored_from")), default=0)
    return rows[start:]



def _num(v: Any) -> float | None:
    """A metric as a float, or None when missing (NaN read back from parquet counts as missing)."""
    if v is None or is_missing(v):
        return None
    return float(v)


def is_missing(v: Any) -> bool:
    """None, NaN or NaT (as parquet gives back a missing value); False for anything pandas cannot judge."""
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False
