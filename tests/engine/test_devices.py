"""Device placement from Ray's assignment, memory hygiene and estimates, GPU warnings: the parts a CPU can test.

The same code on a real GPU is exercised by test_gpu.py (marker ``gpu``).
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import weakref
from typing import Any

import pytest
import torch

from cifar_tune.engine import devices
from cifar_tune.engine.models import build_model
from cifar_tune.errors import UserError
from cifar_tune.spec.parse import parse_spec
from cifar_tune.tuning.driver import gpu_warnings

# ----------------------------------------------------------------------------------- placement


def test_no_gpu_assigned_means_cpu_even_on_a_gpu_host() -> None:
    # Ray leaves CUDA_VISIBLE_DEVICES alone for 0-GPU workers: the old "cuda if available" landed on GPU 0
    assert devices.device_for_gpus([], visible_devices="0,1,2,3", cuda_available=True) == torch.device("cpu")
    assert devices.device_for_gpus([], visible_devices=None, cuda_available=True) == torch.device("cpu")


@pytest.mark.parametrize(("ids", "visible", "expected"), [
    (["2"], "2", "cuda:0"),  # Ray narrowed CUDA_VISIBLE_DEVICES to the assigned GPU
    ([3], "1,3", "cuda:1"),  # a physical id is found by its position in the visible list
    (["1"], None, "cuda:1"),  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: physical id = torch index
    (["GPU-5f2c"], "GPU-a1b2,GPU-5f2c", "cuda:1"),  # UUIDs work the same way
])
def test_assigned_gpu_maps_to_its_torch_index(ids: list[Any], visible: str | None, expected: str) -> None:
    assert devices.device_for_gpus(ids, visible_devices=visible, cuda_available=True) == torch.device(expected)


def test_assigned_gpu_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="Ray assigned GPU 0 but torch .* sees no CUDA device"):
        devices.device_for_gpus(["0"], visible_devices="0", cuda_available=False)
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES is '1'"):
        devices.device_for_gpus(["0"], visible_devices="1", cuda_available=True)
    with pytest.raises(ValueError, match="one device"):
        devices.device_for_gpus(["0", "1"], visible_devices="0,1", cuda_available=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
def test_parse_device_without_cuda() -> None:
    assert devices.parse_device(None) == torch.device("cpu")
    assert devices.parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA device"):
        devices.parse_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        devices.parse_device("gpu0")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        devices.parse_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
@pytest.mark.parametrize("cmd", ["train", "evaluate"])
def test_train_and_evaluate_take_device(cmd: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_tune.cli import main

    args = ([cmd, "search_spaces/smoke.yaml"] if cmd == "train" else [cmd, str(tmp_path / "x.pt")]) + ["--device", "cuda"]
    assert main(args) == 2
    assert "--device cuda: torch" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- resources


def _spec(gpus: float) -> dict[str, Any]:
    return {"space": {"model": {"family": "mlp", "hidden": [8]}}, "search": {"resources": {"gpus_per_trial": gpus}}}


@pytest.mark.parametrize("gpus", [2, 1.5, -0.5])
def test_more_than_one_gpu_per_trial_is_a_validation_error(gpus: float) -> None:
    with pytest.raises(UserError, match=r"search\.resources\.gpus_per_trial: must be between 0 and 1 \(a trial trains on one GPU"):
        parse_spec(_spec(gpus), "x.yaml")


@pytest.mark.parametrize("gpus", [0, 0.0625, 0.25, 1])
def test_fractional_and_whole_gpu_per_trial_are_accepted(gpus: float) -> None:
    assert parse_spec(_spec(gpus), "x.yaml").search.resources.gpus_per_trial == gpus


def test_search_says_when_gpus_sit_idle() -> None:
    assert "GPUs sit idle" in gpu_warnings(1, 0.0, 2)[0]
    assert "1 of the cluster's 4 GPUs" in gpu_warnings(4, 0.25, 4)[0]  # 4 trials x 1/4 GPU on a 4-GPU node
    assert "has no GPU" in gpu_warnings(0, 0.5, 2)[0]
    assert gpu_warnings(1, 0.0625, 16) == []  # 16 x 1/16: the GPU is fully packed
    assert gpu_warnings(0, 0.0, 2) == []


# ------------------------------------------------------------------------------ memory hygiene


def test_end_trial_frees_a_compiled_model() -> None:
    model = torch.nn.Linear(4, 2)
    compiled = torch.compile(model, backend="eager")
    compiled(torch.ones(1, 4))
    ref = weakref.ref(model)
    del model, compiled
    devices.end_trial(torch.device("cpu"), compiled=True)
    gc.collect()
    assert ref() is None  # nothing (dynamo's caches included) keeps the old trial's model alive


def test_cpu_trials_report_no_gpu_memory() -> None:
    assert devices.peak_memory_mb(torch.device("cpu")) is None
    devices.begin_trial(torch.device("cpu"), 0.25)  # a no-op, not an error


# ----------------------------------------------------------------------------- memory estimate


@pytest.mark.parametrize(("opt", "copies"), [
    ({"name": "sgd", "momentum": 0.9}, 1), ({"name": "sgd"}, 0), ({"name": "adam"}, 2), ({"name": "adamw", "amsgrad": True}, 3),
    ({"name": "rmsprop"}, 1), ({"name": "rmsprop", "momentum": 0.5}, 2), ({"name": "adagrad"}, 1),
])
def test_optimizer_state_copies_match_torch(opt: dict[str, Any], copies: int) -> None:
    from cifar_tune.engine.optim import build_optimizer

    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.parameters(), {**opt, "lr": 0.01})
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    # state tensors with the parameter's shape (scalar step counters excluded)
    state = sum(1 for s in optimizer.state[model.weight].values() if torch.is_tensor(s) and s.shape == model.weight.shape)
    assert devices.optimizer_state_copies(opt) == copies == state


def test_activation_elements_count_every_leaf_output() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 5))
    assert devices.activation_elements(model, in_channels=3, image_size=8) == 4 * 64 + 4 * 64 + 4 * 64 + 5


def test_estimate_grows_with_batch_and_model_and_works_on_meta() -> None:
    cfg = {"model": {"family": "vgg", "blocks": [{"channels": [32]}, {"channels": [64]}], "head": [64]},
           "optimizer": {"name": "adam"}, "train": {"batch_size": 128}}
    kw = {"num_classes": 10, "in_channels": 3, "image_size": 32, "data_images": 50_000}
    base = devices.estimate_config_memory_mb(cfg, **kw)
    bigger_batch = devices.estimate_config_memory_mb({**cfg, "train": {"batch_size": 512}}, **kw)
    assert bigger_batch["activations_mb"] == pytest.approx(4 * base["activations_mb"])
    assert base["data_mb"] == pytest.approx(50_000 * 3 * 32 * 32 / 2**20)
    with torch.device("meta"):
        model = build_model(cfg["model"], num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    assert base["weights_mb"] == pytest.approx(params * 4 * 4 / 2**20)  # weights, grads, Adam's two moments
    assert base["total_mb"] == pytest.approx(sum(v for k, v in base.items() if k != "total_mb"))


def test_preview_warns_when_packing_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_tune.cli import main

    args = ["preview", "search_spaces/seed000_cifar100_asha.yaml", "-n", "3"]
    assert main([*args, "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert out.count("GPU memory ~") == 3 and "OVER" not in out
    assert main([*args, "--gpu-memory-gb", "4"]) == 0  # 1/16 of 4 GiB = 256 MiB per trial: too small
    out = capsys.readouterr().out
    assert "OVER its share 256 MiB" in out and "warning: 3 sampled configs need more than their 0.0625 share" in out


# ------------------------------------------------------------------------ Ray's real assignment


@pytest.fixture(scope="module")
def ray_with_a_gpu() -> Any:
    """A local Ray instance told it has one GPU (Ray schedules GPUs as a resource; no hardware needed)."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.parametrize(("gpus", "expected", "share"), [(0.25, "cuda:0", 0.25), (1, "cuda:0", None), (0, "cpu", None)])
def test_placement_from_what_ray_really_assigns(ray_with_a_gpu: Any, gpus: float, expected: str,
                                                share: float | None) -> None:
    from cifar_tune.tuning import cluster

    task = ray_with_a_gpu.remote(num_cpus=1, num_gpus=gpus)(cluster.ray_assignment)
    gpu_ids, visible, amount = ray_with_a_gpu.get(task.remote())
    if gpus == 0:
        assert gpu_ids == [] and amount == 0  # and Ray did not hide the GPU: only our placement keeps it off
    else:
        assert len(gpu_ids) == 1 and visible == str(gpu_ids[0]) and amount == gpus
    assert devices.placement(gpu_ids, visible, amount, cuda_available=True) == (torch.device(expected), share)


_FAULTS_SCRIPT = """
import ctypes, resource, sys
from cifar_tune.engine.devices import keep_host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed-default":
    # glibc's default mmap threshold (128 KiB), set explicitly: that switches off its adaptive raise
    assert libc.mallopt(-3, 128 * 1024) == 1
    kept = False
else:
    kept = keep_host_memory()
SIZE = 4 * 1024 * 1024  # a 4 MiB temporary: above glibc's default threshold, below keep_host_memory's
def cycle():
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)  # touch every page, as a tensor op writing its output does
    libc.free(p)
for _ in range(3):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    cycle()
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_host_memory_stops_page_faults_in_the_augmentation_loop() -> None:
    """A fixed allocation pattern (malloc, touch, free a 4 MiB block, 50 times) in a fresh process each
    (the setting is process-wide): with keep_host_memory the warm loop reuses the same pages, so it
    page-faults (almost) never; with glibc's default threshold held fixed, every block is a fresh mmap
    and faults at least once per cycle. glibc's adaptive threshold is out of play in both, so the
    counts do not depend on what the process allocated before or on the machine's load."""
    def run(mode: str, **env: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        return out[0], int(out[1])

    kept, faults = run("keep")
    off, _ = run("keep", CIFAR_TUNE_KEEP_HOST_MEMORY="0")
    control, faults_control = run("fixed-default")
    assert (kept, off, control) == ("True", "False", "False")
    assert faults_control >= 50  # a fresh mapping per cycle: the pattern does fault without the setting
    assert faults < 5  # kept: the heap top is reused, never trimmed and faulted in again


@pytest.mark.ray
def test_refits_on_gpu_tasks_reuse_their_worker(ray_with_a_gpu: Any) -> None:
    """Two refits that each take the whole (scheduling-only) GPU run one after the other in the same
    worker process: no fresh process, CUDA context and data load per refit (Ray's default for GPU
    tasks). Each worker's Inductor compile threads match the CPUs Ray gave it."""
    from cifar_tune.engine import data as data_mod
    from cifar_tune.retrain import retrain_one
    from cifar_tune.spec.schema import DataSpec, SyntheticSpec
    from cifar_tune.tuning import tasks

    data = DataSpec(dataset="synthetic", synthetic=SyntheticSpec(num_train=64, num_test=16, num_classes=2, image_size=8))
    test = data_mod.load_splits(data)[1]
    config = {"model": {"family": "mlp", "hidden": [8]}, "optimizer": {"name": "sgd", "lr": 0.01},
              "train": {"batch_size": 16}}
    calls = [{"trial_id": "t0000", "seed_index": s, "seed": s, "config": config, "data": data, "epochs": 1,
              "test": test} for s in range(2)]
    cpu = torch.device("cpu")
    results = [r for _, r in tasks.run_tasks(retrain_one, calls, cpus=1, gpus=1, place=lambda: (cpu, None))]
    assert [r["status"] for r in results] == ["completed", "completed"], [r["error"] for r in results]
    assert results[0]["pid"] == results[1]["pid"]
    threads = list(tasks.run_tasks(lambda **_: os.environ.get(devices.COMPILE_THREADS_ENV), [{}], cpus=1, gpus=0,
                                   place=lambda: (cpu, None)))
    assert threads == [(0, "1")]


def test_memory_cap_leaves_room_for_the_cuda_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1/16 share caps the allocator at 1/16 of the card less the process's CUDA context, so 16 packed
    trials with their contexts fit the card (set_per_process_memory_fraction counts allocator blocks only)."""
    total_mb = 143_771.0  # an H200
    calls: list[float] = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: type("P", (), {"total_memory": total_mb * 2**20})())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, _d: calls.append(f))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda _d: None)
    devices.begin_trial(torch.device("cuda:0"), 1 / 16)
    assert calls == [pytest.approx((total_mb / 16 - devices.CUDA_CONTEXT_MB) / total_mb)]
    assert 16 * (calls[0] * total_mb + devices.CUDA_CONTEXT_MB) == pytest.approx(total_mb)
    with pytest.raises(ValueError, match="CUDA context"):
        devices.allocator_fraction(1 / 64, 24_000.0)  # 375 MiB shares: not even a context each


@pytest.mark.parametrize(("capability", "config", "mib"), [
    ((9, 0), None, 32.0), ((10, 0), None, 32.0), ((8, 0), None, 8.125),  # PyTorch's defaults by architecture
    ((9, 0), ":4096:2", 8.0), ((9, 0), ":16:8", 0.125),  # CUBLAS_WORKSPACE_CONFIG wins
])
def test_cublas_workspace_in_the_estimate(capability: tuple[int, int], config: str | None, mib: float,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert devices.cublas_workspace_mb(capability, config) == mib
    if config:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", config)
        assert devices.cublas_workspace_mb(capability) == mib
    est = devices.estimate_config_memory_mb({"model": {"family": "lenet"}}, num_classes=10, in_channels=3, image_size=32,
                                            data_images=100)
    assert est["workspace_mb"] == devices.cublas_workspace_mb() and est["workspace_mb"] > 0
    assert est["total_mb"] == pytest.approx(sum(v for k, v in est.items() if k != "total_mb"))


def test_compile_threads_follow_the_workers_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.config as inductor_config

    monkeypatch.delenv(devices.COMPILE_THREADS_ENV, raising=False)
    # restored by assignment: monkeypatch's undo deletes the override of Inductor's config module, and
    # the setting then "does not exist" for every later compile in this process
    saved = inductor_config.compile_threads
    try:
        assert devices.limit_compile_threads(0.5) == 1  # a packed trial's fraction of a CPU: one worker
        assert os.environ[devices.COMPILE_THREADS_ENV] == "1" and inductor_config.compile_threads == 1
        monkeypatch.setenv(devices.COMPILE_THREADS_ENV, "3")  # the user's choice wins
        assert devices.limit_compile_threads(8) == 3
    finally:
        inductor_config.compile_threads = saved
    assert inductor_config.compile_threads == saved


@pytest.mark.parametrize(("cores", "for_trials"), [(1, 1), (2, 2), (4, 3), (8, 7), (16, 14), (64, 56)])
def test_local_ray_leaves_cpus_to_its_own_processes(cores: int, for_trials: int) -> None:
    assert devices.cpus_for_trials(cores) == for_trials


@pytest.mark.parametrize(("mode", "gpus", "gpu_here", "available", "expected"), [
    ("auto", 0.0625, True, True, True), ("auto", 0.0625, True, False, False), ("auto", 1.0, True, True, False),
    ("auto", 0.25, False, True, False), ("off", 0.25, True, True, False), ("on", 0.25, True, True, True),
])
def test_mps_decision(mode: str, gpus: float, gpu_here: bool, available: bool, expected: bool) -> None:
    started, why = devices.mps_wanted(mode, gpus_per_trial=gpus, gpu_here=gpu_here, available=available)
    assert started is expected and why


@pytest.mark.parametrize(("gpus", "gpu_here", "available"), [(0.25, True, False), (0.25, False, True)])
def test_mps_on_says_why_it_cannot_start(gpus: float, gpu_here: bool, available: bool) -> None:
    with pytest.raises(ValueError, match="mps is on but"):
        devices.mps_wanted("on", gpus_per_trial=gpus, gpu_here=gpu_here, available=available)


def test_mps_is_validated_in_the_spec() -> None:
    base = {"name": "m", "data": {"dataset": "synthetic"}, "space": {"model": {"family": "lenet"}}}
    with pytest.raises(UserError, match=r"search\.resources\.mps: must be one of 'auto' \| 'on' \| 'off'"):
        parse_spec({**base, "search": {"resources": {"gpus_per_trial": 0.25, "mps": "onn"}}}, "<t>")
    with pytest.raises(UserError, match=r"search\.resources\.mps: on needs trials that share a GPU"):
        parse_spec({**base, "search": {"resources": {"gpus_per_trial": 1, "mps": "on"}}}, "<t>")
    assert parse_spec({**base, "search": {"resources": {"gpus_per_trial": 0.25, "mps": "on"}}}, "<t>").search.resources.mps == "on"


@pytest.mark.parametrize("k", [1, 4, 16])
def test_packed_trials_fit_the_cpus_left_after_ray(k: int) -> None:
    """On a 16-core GPU machine, k packed trials (the bench's packing spec) and seed 000's 16 trials all
    run at once on the 14 CPUs a local Ray instance offers trials."""
    from pathlib import Path

    from cifar_tune.bench.pack import packing_spec
    from cifar_tune.spec.parse import load_yaml
    from cifar_tune.tuning.driver import concurrent_slots

    cpus = devices.cpus_for_trials(16)
    res = packing_spec({"family": "lenet"}, k, gpu=True, num_images=1000, epochs=1, batch_size=32, cores=16)["search"]["resources"]
    assert concurrent_slots(cpus, 1.0, {"cpu": res["cpus_per_trial"], "gpu": res["gpus_per_trial"]}) == k
    path = Path(__file__).resolve().parents[2] / "search_spaces" / "seed000_cifar100_asha.yaml"
    seed = load_yaml(path.read_text(), str(path))["search"]["resources"]
    assert concurrent_slots(cpus, 1.0, {"cpu": seed["cpus_per_trial"], "gpu": seed["gpus_per_trial"]}) == 16


def test_end_trial_frees_cublas_workspaces_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuBLAS's workspace lives in PyTorch's allocator and empty_cache() leaves it: end_trial frees it first."""
    calls: list[str] = []
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: calls.append("cublas"), raising=False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    devices.end_trial(torch.device("cuda:0"))
    assert calls == ["cublas", "empty_cache"]


@pytest.mark.parametrize(("mode", "joins", "expected"), [("auto", True, False), ("off", False, False), ("auto", False, False)])
def test_search_resolves_mps_for_this_machine(mode: str, joins: bool, expected: bool) -> None:
    """No GPU here: auto stays off and says why; a joined cluster runs its own daemons."""
    from cifar_tune.spec.schema import ResourcesSpec
    from cifar_tune.tuning.driver import search_mps

    started, why = search_mps(ResourcesSpec(gpus_per_trial=0.25, mps=mode), joins=joins)
    assert started is expected and why


@pytest.mark.parametrize("joins", [True, False])
def test_search_with_mps_on_that_cannot_start_it_is_a_user_error(joins: bool) -> None:
    from cifar_tune.spec.schema import ResourcesSpec
    from cifar_tune.tuning.driver import search_mps

    with pytest.raises(UserError, match="mps"):
        search_mps(ResourcesSpec(gpus_per_trial=0.25, mps="on"), joins=joins)  # no GPU on this machine
