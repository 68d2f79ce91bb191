"""`--address`: the same search on an existing two-node Ray cluster started with `ray start`."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = shutil.which("ray", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}") or "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _kill_cluster(port: int) -> None:
    """Stop only this cluster (``ray stop`` would stop every Ray instance on the machine)."""
    subprocess.run(["pkill", "-9", "-f", f"gcs_server_port={port}|:{port}"], check=False)
    time.sleep(1)


@pytest.fixture
def cluster() -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    ip = "127.0.0.1"
    head = [RAY, "start", "--head", f"--port={port}", f"--node-ip-address={ip}", "--num-cpus=1",
            "--include-dashboard=false", "--disable-usage-stats"]
    worker = [RAY, "start", f"--address={ip}:{port}", f"--node-ip-address={ip}", "--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=120)
        yield f"{ip}:{port}"
    finally:
        _kill_cluster(port)


def test_search_runs_on_both_nodes_of_a_cluster(cluster: str, tmp_path: Path) -> None:
    spec = yaml.safe_load((Path(__file__).parents[2] / "search_spaces" / "smoke.yaml").read_text())
    spec["search"].update(num_samples=4, max_concurrent=2, scheduler={"name": "fifo", "max_epochs": 2})
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_tune", "search", str(path), "--address", cluster, "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_AUTH_MODE": "token"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ": 2 nodes" in proc.stdout and "Ray cluster at" in proc.stdout
    trials = pd.read_parquet(tmp_path / "smoke" / "trials.parquet")
    print(trials[["trial_id", "status", "node_id"]].to_string())
    assert (trials.status == "completed").all()
    assert trials.node_id.nunique() == 2  # trials ran on the head and on the worker node
    # checkpoints from both nodes reach the shared storage; one row per (trial, epoch)
    epochs = pd.read_parquet(tmp_path / "smoke" / "epochs.parquet")
    assert not epochs.duplicated(["trial_id", "epoch"]).any() and len(epochs) == 4 * 2
    assert (trials.checkpoint_epoch == 2).all()
    assert all((tmp_path / "smoke" / c / "trial.pt").is_file() for c in trials.checkpoint)


@pytest.fixture
def head_with_dashboard() -> Iterator[str]:
    """A one-node cluster with the dashboard (the job server), every port of its own (others share this machine)."""
    port, dash, agent = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    head = [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats"]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dash}"
    finally:
        _kill_cluster(port)


def smoke_spec() -> dict:
    return yaml.safe_load((Path(__file__).parents[2] / "search_spaces" / "smoke.yaml").read_text())


def test_search_runs_as_a_ray_job(head_with_dashboard: str, tmp_path: Path) -> None:
    """`ray job submit -- cifar-tune search ...`: the driver joins the job's cluster (RAY_ADDRESS) and the
    live table, with each trial's worker lines named after the trial, is in the job's logs (the Jobs page)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    spec = smoke_spec()
    spec["search"].update(num_samples=2, scheduler={"name": "fifo", "max_epochs": 2})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    submit = [RAY, "job", "submit", "--address", head_with_dashboard, "--",
              sys.executable, "-m", "cifar_tune", "search", str(path), "--storage", str(tmp_path), "--progress-every", "1"]
    deadline = time.monotonic() + 180
    while True:  # the job agent takes a while to come up after `ray start` on a busy machine
        proc = subprocess.run(submit, capture_output=True, text=True, timeout=300, env=env)
        if "No available agent" not in proc.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)  # Ray colours the worker prefixes
    assert "Ray cluster at" in out and "local Ray instance" not in out  # joined the job's cluster
    assert "2/2 finished (2 completed)" in out  # the live table is in the job's logs
    trials = pd.read_parquet(tmp_path / "smoke" / "trials.parquet")
    for tid in trials.trial_id:
        assert re.search(rf"\({tid}-\w+-\w+ pid=\d+\) cifar-tune: trial {tid}-", out), tid  # prefixed by the trial's name
    assert (trials.status == "completed").all()
