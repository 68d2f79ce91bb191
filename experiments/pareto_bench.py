"""Hypervolume reached by mo_asha, by asha on accuracy alone, and by random search without early
stopping (fifo), at equal epoch budgets, on the offline smoke space (``search_spaces/smoke_pareto.yaml``).

For each seed, the three searches sample the same configs (same ``search.seed``: trial i is the same config
in all three) and differ only in which trials the scheduler lets train on. Each search's
``hypervolume.parquet`` gives the hypervolume of its front after every epoch it trained; the comparison is
at the budget every method reached (the fewest epochs any of the three spent, for that seed), and at the
end. Every search uses the same fixed reference point (``--ref-*``), so hypervolumes compare across
searches. One local Ray instance serves all searches.

Latency is measured by each search on a shared, loaded machine, so the same config gets a different
latency in each of the three searches. The table therefore also gives the hypervolume with each config's
latency pooled (the median of its three measurements, recomputed from the records with
``pareto.hypervolume_frame``), which compares the schedulers without that noise.

    python experiments/pareto_bench.py --seeds 0 1 2 --samples 12 --out experiments/results/pareto.md
    python experiments/pareto_bench.py --seeds 0 1 2 --samples 12 --report-only   # the tables again
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "smoke_pareto.yaml"

METHODS = {  # label -> (experiment name part, overrides)
    "mo_asha": ("mo_asha", ["search.scheduler.name=mo_asha"]),
    "asha (val_acc only)": ("asha", ["search.scheduler.name=asha"]),
    "random, no early stopping": ("fifo", ["search.scheduler.name=fifo"]),
}


def _objectives(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"metric": "val_acc"}, {"metric": "params", "ref": args.ref_params},
            {"metric": "latency_ms", "ref": args.ref_latency_ms}]


def run(seed: int, short: str, extra: list[str], args: argparse.Namespace) -> float:
    """One search; its wall time (s)."""
    from cifar_tune.spec.parse import load_spec
    from cifar_tune.tuning.driver import run_search

    overrides = [f"search.seed={seed}", f"search.num_samples={args.samples}", f"search.objectives={json.dumps(_objectives(args))}",
                 f"search.scheduler.max_epochs={args.max_epochs}", *extra]
    name = f"pareto-bench-s{seed}-{short}"
    shutil.rmtree(Path(args.storage) / name, ignore_errors=True)
    t0 = time.perf_counter()
    run_search(load_spec(SPACE, overrides), storage=args.storage, name=name, dashboard=False, out=lambda s: None)
    return time.perf_counter() - t0


def at_budget(curve: list[tuple[int, float]], budget: int) -> float:
    """The hypervolume after the ``budget``-th epoch of the search (the front so far then)."""
    return max((hv for n, hv in curve if n <= budget), default=0.0)


def analyse(seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per method: its hypervolume curve as recorded, and with latencies pooled across the three searches."""
    import pandas as pd

    from cifar_tune.pareto import hypervolume_frame
    from cifar_tune.results import Experiment
    from cifar_tune.spec.schema import ObjectiveSpec

    objectives = tuple(ObjectiveSpec(**o) for o in _objectives(args))
    exps = {m: Experiment(args.storage, f"pareto-bench-s{seed}-{short}") for m, (short, _) in METHODS.items()}
    tables = {m: (e.read_table("trials.parquet"), e.read_table("epochs.parquet")) for m, e in exps.items()}
    latencies = pd.concat([t[["trial_id", "latency_ms"]] for t, _ in tables.values()])
    pooled = latencies.groupby("trial_id")["latency_ms"].median()
    out = {}
    for m, e in exps.items():
        trials, epochs = tables[m]
        hv = e.read_table("hypervolume.parquet")
        hv_pooled = hypervolume_frame(epochs, trials.assign(latency_ms=trials.trial_id.map(pooled)), objectives)
        out[m] = {"curve": list(zip(hv.epochs_done, hv.hypervolume_fraction, strict=True)),
                  "pooled": list(zip(hv_pooled.epochs_done, hv_pooled.hypervolume_fraction, strict=True)),
                  "epochs": int(hv.epochs_done.max()), "front": int((trials.pareto_rank == 0).sum())}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--max-epochs", type=int, default=4)
    p.add_argument("--ref-params", type=float, default=120_000.0)
    p.add_argument("--ref-latency-ms", type=float, default=100.0)
    p.add_argument("--storage", default="/tmp/pareto-bench")
    p.add_argument("--report-only", action="store_true", help="analyse the searches already in --storage")
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args()

    walls: dict[tuple[int, str], float] = {}
    if not args.report_only:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            for seed in args.seeds:
                for method, (short, extra) in METHODS.items():
                    walls[seed, method] = run(seed, short, extra, args)
                    print(f"seed {seed} {method}: {walls[seed, method]:.0f} s", flush=True)
        finally:
            ray.shutdown()

    lines = [
        "# Hypervolume: mo_asha vs asha on accuracy vs random search without early stopping",
        "",
        f"Command: `python experiments/pareto_bench.py --seeds {' '.join(map(str, args.seeds))} --samples {args.samples} "
        f"--max-epochs {args.max_epochs} --ref-params {args.ref_params:g} --ref-latency-ms {args.ref_latency_ms:g}`",
        "",
        f"Space: `search_spaces/smoke_pareto.yaml` (synthetic 16x16 data, LeNets and MLPs), {args.samples} trials of up to "
        f"{args.max_epochs} epochs per search, 2 at a time on 2 CPUs; objectives val_acc (max), params (min), latency_ms "
        f"(min). Reference point: val_acc 0, params {args.ref_params:g}, latency {args.ref_latency_ms:g} ms. Hypervolume as "
        "the fraction of the box between the ideal point (accuracy 1, zero cost) and the reference point. Per seed, the "
        "three searches sample the same configs; the budget is the fewest epochs any of the three trained for that seed. "
        "'pooled' recomputes each curve with every config's latency replaced by the median of its three measurements.",
        "",
        "| seed | method | epochs trained | hypervolume at the budget | pooled latency: at the budget | final | pooled: final | trials on the front | wall (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    at: dict[str, list[float]] = {m: [] for m in METHODS}
    at_pooled: dict[str, list[float]] = {m: [] for m in METHODS}
    for seed in args.seeds:
        by = analyse(seed, args)
        budget = min(r["epochs"] for r in by.values())
        for method, r in by.items():
            at[method].append(at_budget(r["curve"], budget))
            at_pooled[method].append(at_budget(r["pooled"], budget))
            wall = f"{walls[seed, method]:.0f}" if (seed, method) in walls else "–"
            lines.append(f"| {seed} | {method} | {r['epochs']} | {at[method][-1]:.4f} (at {budget}) | {at_pooled[method][-1]:.4f} "
                         f"| {r['curve'][-1][1]:.4f} | {r['pooled'][-1][1]:.4f} | {r['front']} | {wall} |")
    lines += ["", "Mean ± sample std over seeds of the hypervolume at the budget (as recorded; with pooled latency):", ""]
    for method in METHODS:
        def ms(v: list[float]) -> str:
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            return f"{statistics.mean(v):.4f} ± {sd:.4f}"
        lines.append(f"- {method}: {ms(at[method])}; pooled {ms(at_pooled[method])} (n = {len(at[method])})")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
