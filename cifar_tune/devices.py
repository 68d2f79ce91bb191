"""Which accelerator a trial may use, how much of its memory, and what a config will need. No Ray here.

Ray decides placement; this module turns its decision into a ``torch.device`` (``tuner.py`` reads
``ray.get_gpu_ids()`` and ``CUDA_VISIBLE_DEVICES`` and calls :func:`device_for_gpus`). A worker that
Ray gave no GPU trains on the CPU even on a GPU host: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for such
workers, so "cuda if available" would put every CPU trial on GPU 0 behind the scheduler's back.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

MIB = 2**20
# Not seen by PyTorch's allocator but taken on the GPU by every process: CUDA context, cuBLAS/cuDNN
# handles and workspaces. Measured on an H200 with torch 2.11 / CUDA 13 (experiments/results/bench_gpu.md).
CUDA_CONTEXT_MB = 600.0


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
            raise ValueError(f"--device {name}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise ValueError(f"--device: '{name}': only cpu and cuda are supported")
    return device


# ------------------------------------------------------------------------------------ one trial's memory


def begin_trial(device: torch.device, memory_fraction: float | None) -> None:
    """Before a trial on a (possibly reused, possibly shared) GPU worker: cap its memory, reset the peak.

    The cap makes a trial that outgrows its share of a packed GPU fail alone with an out-of-memory error
    instead of pushing its neighbours over; Ray's fractional GPUs divide scheduling, not memory.
    """
    if device.type != "cuda":
        return
    if memory_fraction is not None and 0 < memory_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(memory_fraction, device)
    torch.cuda.reset_peak_memory_stats(device)


def end_trial(device: torch.device, compiled: bool = False) -> None:
    """After a trial on a reused worker: drop its graphs and cached blocks so the next trial starts clean.

    The caller must have dropped its own references (model, optimizer) first.
    """
    if compiled:
        torch._dynamo.reset()  # compiled graphs hold the old model's parameters alive
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the blocks back to the GPU, for the neighbours sharing it


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
                             in_channels: int, image_size: int, data_images: int, bf16: bool) -> dict[str, float]:
    """A trial's GPU memory, by part: weights + grads + optimizer state, activations, batch, data, context.

    ``model`` may live on the meta device (free). Activations are every leaf module's output at the batch
    size, in bf16 under autocast; this over-counts in-place ops and under-counts cuDNN workspaces, so the
    estimate is checked against measured peaks in the GPU benchmark.
    """
    params = sum(p.numel() for p in model.parameters())
    weights = params * 4 * (2 + optimizer_state_copies(optimizer))  # fp32 weights, grads, state
    act = activation_elements(model, in_channels=in_channels, image_size=image_size) * batch_size * (2 if bf16 else 4)
    batch = batch_size * in_channels * image_size * image_size * 4 * 3  # uint8 gather -> float augment copies
    data = data_images * in_channels * image_size * image_size  # resident uint8 train + val
    parts = {"weights_mb": weights / MIB, "activations_mb": act / MIB, "batch_mb": batch / MIB,
             "data_mb": data / MIB, "context_mb": CUDA_CONTEXT_MB}
    parts["total_mb"] = sum(parts.values())
    return parts


def estimate_config_memory_mb(config: Mapping[str, Any], *, num_classes: int, in_channels: int, image_size: int,
                              data_images: int) -> dict[str, float]:
    """:func:`estimate_trial_memory_mb` for a sampled trial config, its model built on the meta device."""
    from cifar_tune.models import build_model

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
