"""``cifar-tune bench``: how close a trial's training epoch runs to the hardware limit, in one process.

Rows (same model, batch size, thread count and seed-000 augmentations for every row):

    a  limit        forward + backward + optimizer step on pre-normalised float batches already on the device
    b  ours         ``train.fit`` epochs (val=None): shuffle, gather from resident uint8 data, batched
                    augmentation, step; the real code path, timed by fit's own per-epoch clock
    c  seed-style   torchvision per-image PIL transforms through a DataLoader (num_workers=2, as the
                    seeds do) feeding the same step
    d  augmentation alone: our batched transform vs the PIL transforms in a Python loop (no DataLoader)
    e  a short real ASHA search on Ray Tune: efficiency and trial start-up on a reused worker
    f  augmentation policies alone (RandAugment 2 ops / magnitude 9, AutoAugment CIFAR-10, TrivialAugmentWide):
       our batched per-image-random ``cifar_tune.engine.policies`` vs torchvision's ``transforms.v2`` policy applied
       image by image to uint8 tensors

The machine is shared and noisy, so variants are interleaved round by round (a, b, c, a, b, c, ...)
and the report gives medians; ratios are medians of the per-round ratios, so slow spells cancel out.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_tune.bench.common import BenchOptions
from cifar_tune.bench.efficiency import measure_search
from cifar_tune.bench.ops import _target_checks, compile_vs_eager, measure_ops
from cifar_tune.bench.speed import measure_policies, measure_throughput
from cifar_tune.engine.devices import keep_host_memory


def run_bench(opts: BenchOptions, out: Callable[[str], None] = print) -> dict[str, Any]:
    keep_host_memory()  # as every training process does (Trainer): all rows run under the same allocator
    report: dict[str, Any] = {"options": asdict(opts), "env": environment(opts.device)}
    report["ops"] = measure_ops(opts, out)
    report["ops_per_step"] = report["ops"]["ops_per_step"]
    if opts.only_ops:
        report.update(threads=opts.threads or torch.get_num_threads(), rows={}, ratios={}, targets=[])
        if opts.compile:
            report["compile_vs_eager"] = compile_vs_eager(opts, out=out)
        return report
    if opts.only_policies:
        report.update(threads=opts.threads or torch.get_num_threads(), rows={}, ratios={})
    else:
        report.update(measure_throughput(opts, out))
    if opts.policies or opts.only_policies:
        report["policies"] = measure_policies(opts, out)
    if opts.search and not opts.only_policies:
        # a trial gets 1 CPU (OMP_NUM_THREADS=1): size its data by one thread's share of row b
        b_1t = report["rows"]["b"]["images_per_s"] / report["threads"]
        report["search"] = measure_search(opts, b_1t, out)
    ratios = {**report["ratios"], **report.get("policies", {}).get("ratios", {})}
    report["targets"] = _target_checks(opts.model, ratios, report.get("search"))
    return report


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "host_memory_kept": keep_host_memory(),
                           "machine": platform.machine(), "cores": os.cpu_count(),
                           "load_avg_1m": round(os.getloadavg()[0], 1)}  # the machine may be shared
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver())
    return env


def _nvidia_driver() -> str | None:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_benches(opts: list[BenchOptions], out: Callable[[str], None] = print) -> dict[str, Any]:
    """One report per model, run one after the other in this process."""
    return {"runs": [run_bench(o, out) for o in opts]}


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict[str, Any], command: str | None = None) -> str:
    """The tables of one model's report, or of each run of ``run_benches``."""
    if "runs" in report:
        from cifar_tune.bench.pack import markdown as pack_markdown

        head = [f"command: `{command}`", ""] if command else []
        return "\n".join(head + [f"### {r['options']['model']}\n\n{markdown(r)}" for r in report["runs"]]
                         + pack_markdown(report)) + "\n"
    o = report["options"]
    env = report["env"]
    gpu = f", {env['gpu']} (driver {env.get('driver')}, CUDA {env.get('cuda')})" if "gpu" in env else ""
    lines = [f"model `{o['model']}`, device {o['device']}{gpu}, batch {o['batch_size']}, {report['threads']} torch threads "
             f"for {'the fast-path runs' if o.get('only_ops') else 'rows a-d'}, {o['epoch_images']} images per epoch, median of {o['rounds']} interleaved rounds; "
             f"torch {env['torch']}, {env['cores']} cores", ""]
    if "ops" in report:
        ops = report["ops"]
        lines += [f"ATen ops per training step (one eager step, batch {ops['batch_size']}, seed-000 augmentation, "
                  f"{ops['optimizer']['name']}, dispatched ops counted by a TorchDispatchMode):", "",
                  "| part | ops | of which views | most frequent |", "|---|---:|---:|---|"]
        lines += [f"| {k} | {v} | {ops['views_per_step'][k]} | "
                  + ", ".join(f"{name} {n}" for name, n in list(ops["top_ops"][k].items())[:5]) + " |"
                  for k, v in ops["ops_per_step"].items()]
        lines += [f"| total | {sum(ops['ops_per_step'].values())} | {sum(ops['views_per_step'].values())} | |", ""]
    if "compile_vs_eager" in report:
        c = report["compile_vs_eager"]
        lines += [f"`train.fast_path` modes, epochs of {c['epoch_images']} images (epoch 1 includes the compilation "
                  "or the capture); one-off cost = epoch 1 minus eager's epoch 1:", "",
                  "| mode | ran as | epoch times (s) | steady speedup | one-off cost (s) | break-even (epochs) "
                  "| break-even (images) |", "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {m} | {r['ran_as']} | {', '.join(f'{v:.2f}' for v in r['epoch_s'])} | {_fmt(r['steady_speedup'])} "
                  f"| {_fmt(r['setup_overhead_s'])} | {_fmt(r['break_even_epochs'])} | {_fmt(r['break_even_images'], 0)} |"
                  for m, r in c["modes"].items()]
        lines += ["", f"augmentation alone (dense stages, batch {o['batch_size']}): eager "
                  f"{c['augment_dense_ms']['eager']:.2f} ms, compiled {c['augment_dense_ms']['compiled']:.2f} ms per "
                  f"batch, median of {o['rounds']} interleaved rounds of 20 batches", ""]
    if o.get("only_ops"):
        return "\n".join(lines) + "\n"
    if o.get("only_policies"):  # rows a-d did not run: describe row f's setting instead
        lines = [f"row f only: device {o['device']}{gpu}, batch {o['batch_size']}, {o['augment_images']} images per "
                 f"round, median of {o['rounds']} interleaved rounds; torch {env['torch']}, {env['cores']} cores, "
                 f"1-minute load average {env.get('load_avg_1m', '?')} at the start", ""]
    if command:
        lines += [f"command: `{command}`", ""]
    if report["rows"]:  # absent with --only-policies
        lines += ["| row | what | images/s |", "|---|---|---:|"]
        for key, row in report["rows"].items():
            lines.append(f"| {key} | {row['what']} | {row['images_per_s']:,.0f} |")
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in report["ratios"].items()]
    if "policies" in report:
        pol = report["policies"]
        lines += ["", f"row f, policies ({pol['threads']} torch threads for `batched`):", "",
                  "| row | what | images/s |", "|---|---|---:|"]
        lines += [f"| {k} | {r['what']} | {r['images_per_s']:,.0f} |" for k, r in pol["rows"].items()]
        lines += ["", "| ratio | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in pol["ratios"].items()]
    if "search" in report:
        s = report["search"]
        lines += ["", "| search (e) | value |", "|---|---:|"]
        for key in ("trials", "slots", "epochs_run", "median_epoch_s", "wall_s", "trial_time_s", "efficiency",
                    "run_search_s", "efficiency_incl_ray_start", "fresh_worker_start_s", "reused_starts",
                    "reused_worker_start_s", "reused_setup_s", "reused_gap_s", "reused_overhead_s", "reused_start_max_s"):
            lines.append(f"| {key} | {_fmt(s.get(key))} |")
    if "compile" in report:
        c = report["compile"]
        lines += ["", "| torch.compile (fit, default mode) | value |", "|---|---:|"]
        for key in ("eager_images_per_s", "steady_images_per_s", "first_epoch_s", "compile_overhead_s", "break_even_epochs",
                    "break_even_images"):
            lines.append(f"| {key} | {_fmt(c.get(key))} |")
    lines += ["", "| target | value | wanted | met |", "|---|---:|---|---|"]
    lines += [f"| {t['metric']} | {_fmt(t['value'])} | {t['target']} | {'yes' if t['met'] else 'NO'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], json_path: str | Path, command: str | None = None) -> Path:
    """``OUT.json`` and, next to it, ``OUT.md`` with the tables."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**report, "command": command}, indent=2, default=str) + "\n")
    md = path.with_suffix(".md")
    md.write_text(markdown(report, command))
    return md
