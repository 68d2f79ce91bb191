"""experiments/gpu_check.sh, the prepared GPU check, dry-run on the CPU: its steps, deadline and summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "experiments" / "gpu_check.sh"


def _run(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_DRY": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


def _steps(out: Path) -> dict[str, str]:
    return {s["step"]: s["status"] for s in json.loads((out / "bench_gpu.json").read_text())["steps"]}


def test_the_deadline_skips_steps_and_the_summary_is_still_written(tmp_path: Path) -> None:
    proc = _run(tmp_path, GPU_CHECK_BUDGET_S="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = _steps(tmp_path)
    assert list(steps) == ["env", "gpu_tests", "rows", "packing", "packing_mps", "workflow"]
    assert set(steps.values()) == {"skipped (deadline)"}
    md = (tmp_path / "bench_gpu.md").read_text()
    assert "DRY RUN" in md and "not measured" in md


@pytest.mark.slow
def test_dry_run_of_the_first_steps(tmp_path: Path) -> None:
    """The environment probe and the GPU tests (all skipped without CUDA) through the real script; the
    benchmark steps are the ``cifar-tune bench`` commands tested in test_bench.py."""
    proc = _run(tmp_path, GPU_CHECK_ONLY="env,gpu_tests")
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = _steps(tmp_path)
    assert steps["env"] == "ok" and steps["gpu_tests"] == "ok", steps
    assert {steps[s] for s in ("rows", "packing", "packing_mps", "workflow")} == {"not selected"}
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["dry_run"] is True and report["env"]["torch"] == torch.__version__
    tests = report["gpu_tests"]
    assert tests["skipped"] > 0 and tests["passed"] == tests["failed"] == 0  # no CUDA here: every GPU test skips
    assert all(t["met"] is None for t in report["targets"])  # a dry run's figures are no verdict
