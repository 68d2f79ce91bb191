"""Reading back what the trackers recorded, per trial: MLflow (its client), W&B (offline run files)
and TensorBoard (event files), keyed by our trial id and by step."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from cifar_tune.watch import tracking


def read_wandb_records(path: Path) -> list[Any]:
    """The records of an offline ``.wandb`` file: W&B's LevelDB-style log (7-byte file header, 32 KiB
    blocks, 7-byte chunk headers) of protobuf ``Record``s, as ``wandb sync`` reads it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        else:  # last
            chunks.append(pending + chunk)
    records = []
    for raw in chunks:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def mlflow_search_runs(uri_dir: Path, experiment: str) -> tuple[Any, list[Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking.mlflow_uri(str(uri_dir)))
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`cifar_tune.phase` = 'search'", max_results=1000)
    return client, runs


def mlflow_steps(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wandb_runs_by_id(directory: Path) -> dict[str, dict[str, Any]]:
    """W&B run id -> {names, files, config (last values), steps: [(_step, items)] over every offline
    file of that run (a resumed run writes a second file with the same id)}."""
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"names": set(), "files": 0, "config": {}, "steps": []})
    for f in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        run_id, items_seen = None, []
        config: dict[str, Any] = {}
        name = None
        for rec in read_wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_id, name = rec.run.run_id, rec.run.display_name
                config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                items_seen.append((int(items["_step"]), items))
        run = out[run_id]
        run["names"].add(name)
        run["files"] += 1
        run["config"].update(config)
        run["steps"] += items_seen
    return dict(out)


def tensorboard_scalars(root: Path, trial_dir_name: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` in every events file of a trial's directories under ``root`` (every
    driver run of the search has its own)."""
    from tensorboardX.proto import event_pb2

    out = []
    for events in sorted(root.rglob(f"{trial_dir_name}/events.out.tfevents*")):
        data, pos = events.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            out += [(int(event.step), v.simple_value) for v in event.summary.value if v.tag == tag]
    return sorted(out)


def run_in_own_session(cmd: list[str], *, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """``subprocess.run`` for a search driver: on a timeout the driver's whole process group (the Ray
    instance it started) is killed, not the driver alone."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
