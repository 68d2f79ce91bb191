"""What a trained model costs, measured once per trial: multiply-accumulates per image and inference
latency. Plain PyTorch (the trial runs it in its worker, on the device it trains on)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

LATENCY_WARMUP = 2  # untimed forward passes first (allocator, cuDNN autotuning, lazy init)
LATENCY_REPEATS = 7  # timed ones; the median is reported


def macs_per_image(model: nn.Module, *, in_channels: int, image_size: int) -> int:
    """Multiply-accumulates of one image's forward pass, as ``cifar-tune model-info`` counts them."""
    from cifar_tune.engine.models import model_info

    return int(model_info(model, in_channels=in_channels, image_size=image_size)["macs"])


def latency_ms(model: nn.Module, *, batch_size: int, in_channels: int, image_size: int, device: torch.device,
               channels_last: bool = False, autocast: Any = None, repeats: int = LATENCY_REPEATS) -> float:
    """Median wall time (ms) of one inference forward pass over a batch of ``batch_size`` images, in
    eval mode without gradients, on ``device``, the way validation runs it (memory format and
    autocast); CUDA work is synchronised before each clock read. The model's mode is restored."""
    x = torch.zeros(batch_size, in_channels, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.no_grad():
            for i in range(LATENCY_WARMUP + repeats):
                _sync(device)
                t0 = time.perf_counter()
                with autocast if autocast is not None else _nothing():
                    model(x)
                _sync(device)
                if i >= LATENCY_WARMUP:
                    times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.train(was_training)
    return float(statistics.median(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
