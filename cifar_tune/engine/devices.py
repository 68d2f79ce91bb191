"""Which accelerator a trial may use, how much of its memory, and what a config will need. No Ray here.

Ray decides placement; this module turns its decision into a ``torch.device`` (``tuning.cluster`` reads
``ray.get_gpu_ids()`` and ``CUDA_VISIBLE_DEVICES`` and calls :func:`device_for_gpus`). A worker that
Ray gave no GPU trains on the CPU even on a GPU host: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for such
workers, so "cuda if available" would put every CPU trial on GPU 0 behind the scheduler's back.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

MIB = 2**20
# Not seen by PyTorch's allocator but taken on the GPU by every process: the CUDA context with its
# kernel images and the cuBLAS/cuDNN handles. A reviewer's figure for an H200 with torch 2.11 / CUDA 13;
# experiments/gpu_check.sh measures it (bench_gpu.json, "memory").
CUDA_CONTEXT_MB = 600.0
# cuBLAS's workspace, which PyTorch allocates through its caching allocator once per (handle, stream)
# and keeps across ``empty_cache()``: ``:SIZE_KIB:COUNT`` pairs, PyTorch's default by architecture
# (Hopper and later: 4096 KiB x 8 = 32 MiB; before: 4096 x 2 + 16 x 8 KiB = 8.125 MiB), unless the user
# sets CUBLAS_WORKSPACE_CONFIG.
_CUBLAS_DEFAULT_SM90 = ":4096:8"
_CUBLAS_DEFAULT_OLDER = ":4096:2:16:8"


# glibc's mallopt parameters (malloc.h) and its ceiling for the mmap threshold on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX_BYTES = 32 * MIB
_host_memory_kept = False


def keep_host_memory(trim_threshold_bytes: int = 1024 * MIB) -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of handing it back to the OS; True if set.

    PyTorch has no caching allocator for CPU tensors. By default glibc serves a tensor over 128 KiB-32 MiB
    either with a fresh ``mmap`` or from heap top it trims after each free, so every temporary of the
    batched augmentation (a [256, 32, 32] float plane is 1 MiB) is new memory and page-faults on first
    touch: the exact hue kernel ran ~4x slower for it (README, Performance). Serving such blocks from the
    heap and trimming only above ``trim_threshold_bytes`` keeps a training process's peak resident,
    which it reaches again every step anyway. Off with ``CIFAR_TUNE_KEEP_HOST_MEMORY=0``; a no-op off
    glibc (macOS, Windows, musl).
    """
    global _host_memory_kept
    if _host_memory_kept or os.environ.get("CIFAR_TUNE_KEEP_HOST_MEMORY", "1") == "0" or sys.platform != "linux":
        return _host_memory_kept
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _host_memory_kept = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes))
    return _host_memory_kept


def device_for_gpus(gpu_ids: Sequence[int | str], *, visible_devices: str | None,
                    cuda_available: bool | None = None) -> torch.device:
    """The device of a worker that Ray assigned ``gpu_ids`` (``ray.get_gpu_ids()``).

    No GPU assigned -> CPU. Ray normally narrows ``CUDA_VISIBLE_DEVICES`` to the assigned ids, so the
    assigned GPU is ``cuda:<its index in that list>``; with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES``
    the variable is unset and the physical id is the torch index.
    """
    if not gpu_ids:
        return torch.device("cpu")
    if len(gpu_ids) > 1:
        raise ValueError(f"a trial trains on one device, but Ray assigned GPUs {list(gpu_ids)}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not available:
        raise RuntimeError(f"Ray assigned GPU {gpu_ids[0]} but torch {torch.__version__} sees no CUDA device "
                           "(a CPU-only torch build in the workers?)")
    gid = str(gpu_ids[0])
    if not visible_devices:
        return torch.device(f"cuda:{gid}")
    visible = [v.strip() for v in visible_devices.split(",")]
    if gid not in visible:
        raise RuntimeError(f"Ray assigned GPU {gid} but CUDA_VISIBLE_DEVICES is {visible_devices!r}")
    return torch.device(f"cuda:{visible.index(gid)}")


def placement(gpu_ids: Sequence[int | str], visible_devices: str | None, gpu_amount: float,
              cuda_available: bool | None = None) -> tuple[torch.device, float | None]:
    """(device, memory fraction) of a worker from Ray's assignment: its GPU ids, the CUDA_VISIBLE_DEVICES
    Ray set, and the amount of GPU it reserved. The fraction caps a trial's share of a shared GPU; None
    when it has the GPU to itself or trains on the CPU."""
    device = device_for_gpus(gpu_ids, visible_devices=visible_devices, cuda_available=cuda_available)
    return device, (gpu_amount if device.type == "cuda" and 0 < gpu_amount < 1 else None)


def parse_device(name: str | None) -> torch.device:
    """``--device`` of ``train``/``evaluate``: cpu, cuda, cuda:N; None: cuda if available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: '{name}' is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"--device {name}: torch {torch.__version__} sees no CUDA device")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: only {count} CUDA device{'s' if count != 1 else ''} visible (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise ValueError(f"--device: '{name}': only cpu and cuda are supported")
    return device


# ------------------------------------------------------------------------------------ one trial's memory


def cublas_workspace_mb(capability: tuple[int, int] | None = None, config: str | None = None) -> float:
    """MiB of cuBLAS workspace PyTorch's allocator holds per stream: from ``config`` (the syntax of
    CUBLAS_WORKSPACE_CONFIG; default: that variable) or PyTorch's default for a GPU of ``capability``
    (default: this machine's first GPU; Hopper's, the larger, without one)."""
    config = config if config is not None else os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if not config:
        if capability is None and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability(0)
        config = _CUBLAS_DEFAULT_OLDER if capability is not None and capability[0] < 9 else _CUBLAS_DEFAULT_SM90
    numbers = [int(v) for v in config.strip(":").split(":") if v]
    if len(numbers) % 2:
        raise ValueError(f"CUBLAS_WORKSPACE_CONFIG {config!r}: expected :SIZE_KIB:COUNT pairs")
    return sum(size * count for size, count in zip(numbers[::2], numbers[1::2], strict=True)) / 1024


def allocator_fraction(share: float, total_mb: float, context_mb: float = CUDA_CONTEXT_MB) -> float:
    """The fraction of a GPU a trial's allocator may reserve so that the trial's whole footprint, the
    allocator's blocks plus the CUDA context its process holds outside them, fits its ``share``.

    ``set_per_process_memory_fraction`` caps the allocator only: 16 trials at 1/16 each would otherwise
    hold 16 contexts (~10 GB on an H200) beyond the card.
    """
    fraction = (share * total_mb - context_mb) / total_mb
    if fraction <= 0:
        raise ValueError(f"a {share:g} share of a {total_mb:,.0f} MiB GPU ({share * total_mb:,.0f} MiB) does not hold "
                         f"even the ~{context_mb:,.0f} MiB CUDA context of a process: pack fewer trials per GPU")
    return fraction


def begin_trial(device: torch.device, memory_fraction: float | None) -> None:
    """Before a trial on a (possibly reused, possibly shared) GPU worker: cap its memory, reset the peak.

    The cap makes a trial that outgrows its share of a packed GPU fail alone with an out-of-memory error
    instead of pushing its neighbours over; Ray's fractional GPUs divide scheduling, not memory. The
    share covers the process's CUDA context too (:func:`allocator_fraction`).
    """
    if device.type != "cuda":
        return
    if memory_fraction is not None and 0 < memory_fraction < 1:
        total_mb = torch.cuda.get_device_properties(device).total_memory / MIB
        torch.cuda.set_per_process_memory_fraction(allocator_fraction(memory_fraction, total_mb), device)
    torch.cuda.reset_peak_memory_stats(device)


def end_trial(device: torch.device, compiled: bool = False) -> None:
    """After a trial on a reused worker: drop its graphs and cached blocks so the next trial starts clean.

    The caller must have dropped its own references (model, optimizer) first.
    """
    if compiled:
        torch._dynamo.reset()  # compiled graphs hold the old model's parameters alive
    gc.collect()
    if device.type == "cuda":
        # cuBLAS's workspaces live in the allocator and survive empty_cache() (32 MiB per stream on
        # Hopper): freed too, so a reused worker holds only what the next trial needs
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()  # give the blocks back to the GPU, for the neighbours sharing it


# ------------------------------------------------------------------------------------ a worker's CPUs

COMPILE_THREADS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"


def limit_compile_threads(cpus: float) -> int:
    """Inductor's compile workers for a process holding ``cpus`` CPUs: that many (at least 1), unless the
    user set TORCHINDUCTOR_COMPILE_THREADS. Call before the first ``torch.compile``.

    By default Inductor starts a worker per core in every process that compiles: 16 packed trials on a
    16-core machine would start 256 compile processes at once. Inductor reads the variable when its
    config is imported; if that already happened in this process, its value is set as well.
    """
    if os.environ.get(COMPILE_THREADS_ENV):
        return int(os.environ[COMPILE_THREADS_ENV])
    threads = max(1, int(cpus))
    os.environ[COMPILE_THREADS_ENV] = str(threads)
    config = sys.modules.get("torch._inductor.config")
    if config is not None:
        config.compile_threads = threads
    return threads


def cpus_for_trials(cores: int) -> int:
    """Of a machine's ``cores``, how many a local Ray instance offers trials: the rest is left to Ray's
    own processes (GCS, raylet, dashboard agent), the driver and Tune's event loop, which a search
    whose trials hold every core (16 packed GPU trials on 16 cores) would starve: their heartbeats and
    result handling then wait behind trial processes. One core in eight is kept, none below 4 cores."""
    if cores < 4:
        return max(1, cores)
    return cores - max(1, cores // 8)


# ---------------------------------------------------------------------------------------------- MPS


MPS_CONTROL = "nvidia-cuda-mps-control"


def mps_available() -> bool:
    return shutil.which(MPS_CONTROL) is not None


def mps_wanted(mode: str, *, gpus_per_trial: float, gpu_here: bool, available: bool) -> tuple[bool, str]:
    """Whether a search starts the CUDA MPS daemon for its trials, and why (``search.resources.mps``).

    Without MPS, processes sharing a GPU take turns (time slices); with it their kernels run at the same
    time, which is what packed trials of small models need to fill a large GPU. ``auto`` starts it when
    trials share a GPU of this machine and the control binary is there; ``on`` insists; ``off`` never.
    """
    packed = 0 < gpus_per_trial < 1
    if mode == "off":
        return False, "search.resources.mps is off"
    if not packed or not gpu_here:
        why = "trials do not share a GPU" if not packed else "no GPU on this machine"
        if mode == "on":
            raise ValueError(f"search.resources.mps is on but {why}")
        return False, why
    if not available:
        if mode == "on":
            raise ValueError(f"search.resources.mps is on but {MPS_CONTROL} is not on PATH")
        return False, f"{MPS_CONTROL} not found"
    return True, f"{1 / gpus_per_trial:g} trials share each GPU"


@contextlib.contextmanager
def mps_daemon(enabled: bool) -> Iterator[None]:
    """Run the CUDA MPS control daemon inside the block; processes that start CUDA inside use it.

    Its pipe and log directories go to a private temporary directory unless CUDA_MPS_PIPE_DIRECTORY /
    CUDA_MPS_LOG_DIRECTORY are set (the defaults under /tmp and /var/log may not be writable); the
    variables are exported, so Ray workers started inside find the daemon.
    """
    if not enabled:
        yield
        return
    if not mps_available():
        raise RuntimeError(f"{MPS_CONTROL} is not on PATH")
    saved = {k: os.environ.get(k) for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")}
    root = tempfile.mkdtemp(prefix="cifar-tune-mps-")
    for key, sub in (("CUDA_MPS_PIPE_DIRECTORY", "pipe"), ("CUDA_MPS_LOG_DIRECTORY", "log")):
        if not os.environ.get(key):
            os.environ[key] = os.path.join(root, sub)
        os.makedirs(os.environ[key], exist_ok=True)
    try:
        subprocess.run([MPS_CONTROL, "-d"], check=True, capture_output=True, timeout=30)
        try:
            yield
        finally:
            subprocess.run([MPS_CONTROL], input=b"quit\n", capture_output=True, timeout=60)
            time.sleep(1.0)  # the daemon exits asynchronously
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak memory the allocator reserved on ``device`` since the trial began (host-side, no sync).

    Reserved rather than allocated: that is what the process holds and what its memory cap counts.
    """
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / MIB


# ----------------------------------------------------------------------------------- memory estimate


_STATE_COPIES = {"sgd": 1, "adam": 2, "adamw": 2, "rmsprop": 1, "adagrad": 1}  # fp32 state tensors per param


def optimizer_state_copies(optimizer: Mapping[str, Any]) -> int:
    name = optimizer.get("name", "sgd")
    copies = _STATE_COPIES.get(name, 2)
    if name == "sgd" and not optimizer.get("momentum", 0):
        copies = 0
    if name == "rmsprop" and optimizer.get("momentum", 0):
        copies += 1
    if name in ("adam", "adamw") and optimizer.get("amsgrad", False):
        copies += 1
    return copies


@contextlib.contextmanager
def _hooks(model: nn.Module, fn: Any) -> Iterator[None]:
    handles = [m.register_forward_hook(fn) for m in model.modules() if not list(m.children())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def activation_elements(model: nn.Module, *, in_channels: int, image_size: int) -> int:
    """Elements of every leaf module's output for one image: what autograd keeps for backward, roughly."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    total = 0

    def hook(_m: nn.Module, _inputs: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    with _hooks(model, hook), torch.no_grad():
        model.train()(torch.zeros(2, in_channels, image_size, image_size, device=device))
    return total // 2  # batch of 2: BatchNorm needs more than one value per channel in train mode


def estimate_trial_memory_mb(model: nn.Module, *, optimizer: Mapping[str, Any], batch_size: int,
                             in_channels: int, image_size: int, data_images: int, bf16: bool,
                             workspace_mb: float | None = None) -> dict[str, float]:
    """A trial's GPU memory, by part: weights + grads + optimizer state, activations, batch, data, context.

    ``model`` may live on the meta device (free). Activations are every leaf module's output at the batch
    size, in bf16 under autocast; this over-counts in-place ops and under-counts cuDNN workspaces, so the
    estimate is checked against measured peaks in the GPU benchmark. ``workspace_mb``: cuBLAS's workspace
    in the allocator (default :func:`cublas_workspace_mb`), which dwarfs a small model's own memory.
    """
    params = sum(p.numel() for p in model.parameters())
    weights = params * 4 * (2 + optimizer_state_copies(optimizer))  # fp32 weights, grads, state
    act = activation_elements(model, in_channels=in_channels, image_size=image_size) * batch_size * (2 if bf16 else 4)
    batch = batch_size * in_channels * image_size * image_size * 4 * 3  # uint8 gather -> float augment copies
    data = data_images * in_channels * image_size * image_size  # resident uint8 train + val
    parts = {"weights_mb": weights / MIB, "activations_mb": act / MIB, "batch_mb": batch / MIB,
             "data_mb": data / MIB, "workspace_mb": cublas_workspace_mb() if workspace_mb is None else workspace_mb,
             "context_mb": CUDA_CONTEXT_MB}
    parts["total_mb"] = sum(parts.values())
    return parts


def estimate_config_memory_mb(config: Mapping[str, Any], *, num_classes: int, in_channels: int, image_size: int,
                              data_images: int) -> dict[str, float]:
    """:func:`estimate_trial_memory_mb` for a sampled trial config, its model built on the meta device."""
    from cifar_tune.engine.models import build_model

    with torch.device("meta"):
        model = build_model(config["model"], num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    train = config.get("train", {})
    return estimate_trial_memory_mb(
        model, optimizer=config.get("optimizer", {"name": "sgd", "momentum": 0.9}),
        batch_size=int(train.get("batch_size", 128)), in_channels=in_channels, image_size=image_size,
        data_images=data_images, bf16=train.get("precision", "auto") != "fp32",
    )


def gpu_memory_mb() -> float | None:
    """Total memory of this machine's first GPU, or None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / MIB
