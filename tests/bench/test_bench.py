"""`cifar-tune bench` machinery on tiny sizes (no timing assertions), and torch.compile training on CPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from cifar_tune.bench import common, efficiency, speed
from cifar_tune.bench import run as bench
from cifar_tune.cli import main
from cifar_tune.engine.data import Split
from cifar_tune.engine.models import build_model
from cifar_tune.engine.train import fit

TINY = common.BenchOptions(model="lenet", batch_size=32, epoch_images=128, rounds=1, augment_images=64, search=False)


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


def test_throughput_report_has_every_row_and_sane_numbers(tmp_path: Path) -> None:
    report = bench.run_bench(TINY, out=lambda line: None)
    assert set(report["rows"]) == {"a", "b", "c", "d_batched", "d_batched_1t", "d_per_image"}
    for key, row in report["rows"].items():
        assert len(row["samples"]) == TINY.rounds, key
        assert _positive(row["images_per_s"]), key
    assert set(report["ratios"]) == {"b_over_a", "b_over_c", "d_batched_over_per_image", "d_batched_1t_over_per_image"}
    assert all(_positive(v) for v in report["ratios"].values())
    assert {t["metric"] for t in report["targets"]} == {"b_over_a", "b_over_c", "d_batched_over_per_image",
                                                        "f_randaugment_batched_over_per_image"}
    pol = report["policies"]  # row f: every policy batched, batched on 1 thread, and torchvision per image
    assert set(pol["rows"]) == {f"f_{p}_{v}" for p in speed.POLICIES for v in ("batched", "batched_1t", "per_image")}
    assert all(len(r["samples"]) == TINY.rounds and _positive(r["images_per_s"]) for r in pol["rows"].values())
    assert all(_positive(v) for v in pol["ratios"].values()) and len(pol["ratios"]) == 2 * len(speed.POLICIES)
    md = bench.write_report(report, tmp_path / "bench.json", "cifar-tune bench --model lenet")
    assert json.loads((tmp_path / "bench.json").read_text())["command"] == "cifar-tune bench --model lenet"
    text = md.read_text()
    for key in [*report["rows"], *pol["rows"]]:
        assert f"| {key} |" in text


def test_search_efficiency_from_records() -> None:
    # two slots, four trials: t0/t1 on fresh workers (pids 1, 2), t2/t3 reuse them
    trials = pd.DataFrame({
        "trial_id": ["t0", "t1", "t2", "t3"],
        "started_at": [0.0, 0.0, 2.5, 2.2],
        "ended_at": [2.4, 2.0, 4.5, 4.4],
        "epoch_time_s": [2.0, 2.0, 1.8, 2.0],
    })
    epochs = pd.DataFrame({"trial_id": ["t0", "t0", "t1", "t1", "t2", "t2", "t3", "t3"], "epoch_time_s": [1.0] * 8})
    ray = {t: [{"pid": pid, "time_this_iter_s": 1.3, "epoch_time_s": 1.0, "setup_time_s": 0.1}]
           for t, pid in (("t0", 1), ("t1", 2), ("t2", 1), ("t3", 2))}
    s = efficiency.search_efficiency(trials, epochs, ray, slots=2)
    assert s["wall_s"] == pytest.approx(4.5)
    assert s["efficiency"] == pytest.approx(7.8 / 9.0)
    assert (s["fresh_workers"], s["reused_starts"]) == (2, 2)
    assert s["reused_gap_s"] == pytest.approx(0.15)  # t2: 2.5 - 2.4, t3: 2.2 - 2.0
    assert s["reused_worker_start_s"] == pytest.approx(0.3)
    assert s["reused_start_max_s"] == pytest.approx(0.2 + 0.2)  # t3: gap 0.2 + 4.4 - 2.2 - 2.0


def test_model_argument() -> None:
    assert common.model_config("lenet")["family"] == "lenet"
    assert main(["bench", "--model", "no-such-model.yaml", "--no-search"]) == 2


@pytest.mark.slow
def test_compile_trains_on_cpu() -> None:
    """``train.compile: true`` must work without a GPU (inductor's C++ backend)."""
    x = torch.randint(0, 256, (128, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(128) % 4
    config = {"optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "augment": {"hflip": True},
              "train": {"batch_size": 32, "compile": True}}
    model = build_model({"family": "lenet", "channels": [4, 8], "padding": 2, "hidden": [16]}, num_classes=4,
                        image_size=16)
    result = fit(model, Split(x, y), Split(x[:32], y[:32]), config, epochs=2, num_classes=4,
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device="cpu")
    assert result.status == "completed" and result.epochs_run == 2
    assert all(math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) for h in result.history)


# ------------------------------------------------------------------------- packing and workflow


def test_packing_rates_from_epoch_rows() -> None:
    from cifar_tune.bench.pack import packing_rates

    # two trials, 3 epochs each; epoch 1 is left out; epochs 2-3 of both run in [10, 14] seconds
    rows = [("t0", 1, 5.0, 1.0, 9.0), ("t0", 2, 7.0, 2.0, 500.0), ("t0", 3, 9.0, 2.0, 500.0),
            ("t1", 1, 6.0, 1.0, 9.0), ("t1", 2, 8.0, 2.0, 400.0), ("t1", 3, 10.0, 2.0, 600.0)]
    ep = pd.DataFrame([{"trial_id": t, "epoch": e, "ended_at": 4.0 + end, "epoch_time_s": dur, "images_per_s": ips,
                        "gpu_mem_peak_mb": 100.0 + e} for t, e, end, dur, ips in rows])
    r = packing_rates(ep, images_per_epoch=1000)
    assert r["trials"] == 2 and r["window_s"] == pytest.approx(14.0 - 9.0)
    assert r["aggregate_images_per_s"] == pytest.approx(4 * 1000 / 5.0)
    assert r["per_trial_images_per_s"] == pytest.approx(500.0)  # medians 500 and 500
    assert r["per_trial_min_images_per_s"] == pytest.approx(500.0)
    assert r["gpu_mem_peak_mb"] == 103.0 and r["overlap"] is True
    ep.loc[ep["trial_id"] == "t1", "ended_at"] += 100  # t1 ran after t0: not concurrent
    assert packing_rates(ep, images_per_epoch=1000)["overlap"] is False


def test_workflow_projection_walks_the_asha_rungs() -> None:
    from cifar_tune.bench.pack import project_workflow

    # 4 trials, ASHA to 2 epochs: all 4 run epoch 1 (4 at once, 100 img/s each), 2 run epoch 2 (200 img/s each);
    # the retrain's 3 refits run at the rate of the next measured level up, 4 (100 img/s)
    p = project_workflow({1: 400.0, 2: 200.0, 4: 100.0}, num_samples=4, max_concurrent=4, max_epochs=2,
                         train_images=1000, retrain_top=3, retrain_epochs=1, retrain_images=1000, overhead_s=2.0)
    assert p["rungs"] == [(1, 4), (2, 2)]
    assert p["search_s"] == pytest.approx(1000 / 100 + 1000 / 200)
    assert p["retrain_s"] == pytest.approx(1000 / 100)
    assert p["total_s"] == pytest.approx(15 + 10 + 2)
    # more trials than run at once go in waves
    waves = project_workflow({2: 100.0}, num_samples=4, max_concurrent=2, max_epochs=1, train_images=1000,
                             retrain_top=1, retrain_epochs=1, retrain_images=1000)
    assert waves["search_s"] == pytest.approx(2 * 1000 / 100)


@pytest.mark.ray
@pytest.mark.slow
def test_bench_packing_smoke_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cifar-tune bench --pack` on the CPU: real searches at 1 and 2 trials, the table written."""
    out = tmp_path / "pack.json"
    assert main(["bench", "--device", "cpu", "--no-throughput", "--pack", "1,2", "--pack-model", "lenet",
                 "--pack-epochs", "2", "--images", "600", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["packing"]["rows"]
    assert [r["k"] for r in rows] == [1, 2] and all(r["devices"] == ["cpu"] for r in rows)
    assert all(r["statuses"] == {"completed": r["k"]} for r in rows)
    assert all(_positive(r["aggregate_images_per_s"]) and _positive(r["per_trial_images_per_s"]) for r in rows)
    assert report["packing"]["aggregate_over_one"]["1"] == pytest.approx(1.0)
    assert "| 2 | off |" in out.with_suffix(".md").read_text()
