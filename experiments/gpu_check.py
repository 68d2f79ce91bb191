"""Helpers of experiments/gpu_check.sh: the environment and memory probe, and the final summary.

    python3 experiments/gpu_check.py env --out OUT/env.json --device cuda
    python3 experiments/gpu_check.py aggregate --out OUT [--dry 1] [--total-s S]

``aggregate`` reads what the steps left in OUT (env.json, steps.tsv, gpu_tests.xml, bench_rows.json,
bench_pack.json, bench_workflow.json; any may be missing) and writes OUT/bench_gpu.json and
OUT/bench_gpu.md: GPU, driver, torch/CUDA versions, each step's status and every figure, the full
seed-000 workflow projected from the measured packing rates, and the GPU targets side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _smi(query: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (subprocess.SubprocessError, IndexError):
        return None


def _used_mb() -> float | None:
    used = _smi("memory.used")
    return float(used) if used else None


def env(device: str) -> dict[str, Any]:
    """Versions, the GPU and its driver, MPS, and what a CUDA process holds outside PyTorch's allocator."""
    used_before = _used_mb()  # before this process touches CUDA
    import torch

    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cores": os.cpu_count(), "device": device, "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                           "mps_control": shutil.which("nvidia-cuda-mps-control"),
                           "smi": _smi("name,driver_version,memory.total,compute_mode")}
    for mod in ("ray", "ray.dashboard.optional_deps", "pytest", "torchvision"):
        try:
            __import__(mod)
            out[f"import {mod}"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            out[f"import {mod}"] = f"{type(e).__name__}: {e}"[:160]
    if device != "cuda" or not torch.cuda.is_available():
        return out
    from cifar_tune.engine import devices

    props = torch.cuda.get_device_properties(0)
    out.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
               gpu_memory_mb=props.total_memory / 2**20, cudnn=torch.backends.cudnn.version())
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    ctx = _used_mb()
    a0 = torch.cuda.memory_allocated()
    w = torch.randn(256, 256, device="cuda")
    (w @ w).sum()
    torch.cuda.synchronize()
    workspace = torch.cuda.memory_allocated() - a0 - w.numel() * 4
    with torch.autocast("cuda", dtype=torch.bfloat16):
        conv = torch.nn.Conv2d(64, 64, 3, padding=1).cuda()
        conv(torch.randn(128, 64, 32, 32, device="cuda")).float().sum().backward()
    torch.cuda.synchronize()
    handles = _used_mb()
    del w, conv
    devices.end_trial(torch.device("cuda"))
    mb = 2**20
    out["memory"] = {
        "context_mb_smi": None if None in (ctx, used_before) else ctx - used_before,
        "context_cublas_cudnn_mb_smi": None if None in (handles, used_before) else handles - used_before,
        "assumed_context_mb": devices.CUDA_CONTEXT_MB,
        "cublas_workspace_allocated_mb": workspace / mb,
        "cublas_workspace_expected_mb": devices.cublas_workspace_mb(),
        "allocated_after_end_trial_mb": torch.cuda.memory_allocated() / mb,
    }
    return out


# ------------------------------------------------------------------------------------------- summary


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(path: Path) -> dict[str, Any] | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            el = case.find("failure") if case.find("failure") is not None else case.find("error")
            failed.append({"test": case.get("name"), "message": (el.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failed}


def _steps(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()[1:]
    except OSError:
        return []
    return [dict(zip(("step", "status", "seconds", "limit_s"), ln.split("\t"), strict=False)) for ln in lines if ln]


def summarise(out_dir: Path, dry: bool, total_s: float | None) -> dict[str, Any]:
    from cifar_tune.bench.pack import project_workflow

    report: dict[str, Any] = {"dry_run": dry, "total_s": total_s, "env": _read_json(out_dir / "env.json"),
                              "steps": _steps(out_dir / "steps.tsv"), "gpu_tests": _tests(out_dir / "gpu_tests.xml")}
    rows = _read_json(out_dir / "bench_rows.json")
    if rows:
        report["rows"] = {r["options"]["model"]: {"images_per_s": {k: v["images_per_s"] for k, v in r["rows"].items()},
                                                   "ratios": r["ratios"], "targets": r.get("targets"),
                                                   **({"ops_per_step": r["ops_per_step"]} if "ops_per_step" in r else {})}
                          for r in rows.get("runs", [])}
    for name in ("bench_pack.json", "bench_pack_mps.json"):  # without MPS, then with it
        pack = _read_json(out_dir / name)
        if pack and "packing" in pack:
            merged = report.setdefault("packing", {**pack["packing"], "rows": []})
            merged["rows"] += pack["packing"]["rows"]
            report.setdefault("packing_errors", []).extend(pack.get("packing_errors", []))
    base = {r["k"]: r for r in report.get("packing", {}).get("rows", []) if not r["mps"]}
    if 1 in base:
        report["packing"]["aggregate_over_one"] = {
            f"{r['k']}{'+mps' if r['mps'] else ''}": r["aggregate_images_per_s"] / base[1]["aggregate_images_per_s"]
            for r in report["packing"]["rows"]}
    workflow = _read_json(out_dir / "bench_workflow.json")
    if workflow and "workflow" in workflow:
        report["workflow"] = workflow["workflow"]
    prows = report.get("packing", {}).get("rows", [])
    if prows:  # the full seed-000 workflow, from the per-trial rates of the better MPS setting
        best = max({r["mps"] for r in prows}, key=lambda m: sum(r["aggregate_images_per_s"] for r in prows if r["mps"] == m))
        rates = {r["k"]: r["per_trial_images_per_s"] for r in prows if r["mps"] == best}
        wf = report.get("workflow")
        overhead = 0.0
        if wf:
            overhead = max(0.0, wf["total_s"] - wf["search_train_time_s"] / min(wf["trials"], 16)
                           - max(wf["retrain_train_time_s"], default=0.0))
        report["projection"] = {"mps": best, **project_workflow(rates, overhead_s=overhead)}
    report["targets"] = targets(report)
    return report


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark targets for one H200, against what was measured (None: not measured)."""
    cnn6 = report.get("rows", {}).get("seed000", {})
    prows = [r for r in report.get("packing", {}).get("rows", [])]
    one = next((r for r in prows if r["k"] == 1 and not r["mps"]), None)
    sixteen = max((r for r in prows if r["k"] == 16), key=lambda r: r["aggregate_images_per_s"], default=None)
    proj = report.get("projection")
    b = cnn6.get("images_per_s", {}).get("b")

    def t(what: str, value: float | None, goal: float, above: bool = True) -> dict[str, Any]:
        # a dry run's CPU figures say nothing about an H200: no verdict
        ok = None if value is None or report["dry_run"] else (value >= goal if above else value < goal)
        return {"target": what, "value": value, "goal": goal, "met": ok}

    return [
        t("CNN6: ours / seed-style DataLoader (b/c)", cnn6.get("ratios", {}).get("b_over_c"), 5.0),
        t("CNN6: one trial, images/s at batch 128 (row b)", b, 60_000),
        t("16 packed trials: aggregate / one trial", None if not (one and sixteen) else
          sixteen["aggregate_images_per_s"] / one["aggregate_images_per_s"], 3.0),
        t("16 packed trials: aggregate images/s", None if sixteen is None else sixteen["aggregate_images_per_s"], 150_000),
        t("full seed-000 workflow, projected minutes", None if proj is None else proj["total_s"] / 60, 10.0, above=False),
    ]


def _f(v: Any, spec: str = ",.0f") -> str:
    return "not measured" if v is None else (format(v, spec) if isinstance(v, int | float) else str(v))


def markdown(report: dict[str, Any]) -> str:
    env = report.get("env") or {}
    lines = ["# GPU check (experiments/gpu_check.sh)" + (" - DRY RUN on CPU, tiny sizes: no GPU figure" if report["dry_run"] else ""),
             "",
             f"GPU: {env.get('gpu', 'none')}; nvidia-smi: {env.get('smi') or 'absent'}; torch {env.get('torch')}, CUDA "
             f"{env.get('cuda')}, cuDNN {env.get('cudnn')}, Python {env.get('python')}, {env.get('cores')} cores; "
             f"MPS control: {env.get('mps_control') or 'absent'}; run at {env.get('time_utc')} UTC, "
             f"{_f(report.get('total_s'), '.0f')} s in all", "",
             "| step | status | seconds | limit s |", "|---|---|---:|---:|"]
    lines += [f"| {s.get('step')} | {s.get('status')} | {s.get('seconds')} | {s.get('limit_s')} |" for s in report["steps"]]
    mem = env.get("memory")
    if mem:
        lines += ["", "| memory | MiB |", "|---|---:|"] + [f"| {k} | {_f(v, ',.1f')} |" for k, v in mem.items()]
    tests = report.get("gpu_tests")
    lines += ["", "GPU tests: " + ("not run" if tests is None else
                                   f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")]
    for f in (tests or {}).get("failures", []):
        lines.append(f"- FAILED {f['test']}: {f['message']}")
    for model, r in report.get("rows", {}).items():
        lines += ["", f"### rows a-c: `{model}`", "", "| row | images/s |", "|---|---:|"]
        lines += [f"| {k} | {_f(v)} |" for k, v in r["images_per_s"].items() if k in ("a", "b", "c")]
        lines += [f"| b/a | {_f(r['ratios'].get('b_over_a'), '.2f')} |", f"| b/c | {_f(r['ratios'].get('b_over_c'), '.2f')} |"]
        if "ops_per_step" in r:
            lines.append(f"| ATen ops per step | {r['ops_per_step']} |")
    if report.get("packing"):
        from cifar_tune.bench.pack import markdown as pack_markdown

        lines += pack_markdown({k: report[k] for k in ("packing", "packing_errors", "workflow", "projection") if k in report})
    lines += ["", "### targets (one H200)", "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {_f(t['value'], ',.2f')} | {_f(t['goal'], ',.0f')} | "
                     f"{'-' if t['met'] is None else ('yes' if t['met'] else 'NO')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("env", "aggregate"))
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry", default="0")
    p.add_argument("--total-s", type=float, default=None)
    args = p.parse_args()
    if args.what == "env":
        Path(args.out).write_text(json.dumps(env(args.device), indent=2, default=str) + "\n")
        return
    out = Path(args.out)
    report = summarise(out, args.dry == "1", args.total_s)
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "bench_gpu.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
