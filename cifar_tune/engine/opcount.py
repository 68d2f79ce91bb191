"""ATen ops per training step, counted with a ``TorchDispatchMode``: the CPU-visible measure of how
host-bound a step is on a GPU, where every dispatched op costs ~5-8 us of host time (a kernel launch
for most; a view costs the dispatch alone). Counted on any device, the same code path as training.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from cifar_tune.engine.train import Trainer


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active (forward, backward and in-place ops alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0  # ops that only alias their input (no kernel)
        # ops that take a host tensor (not a 0-dim scalar) and produce one on another device: a host-to-device
        # copy inside the step (pageable unless pinned; a CUDA graph cannot capture it)
        self.host_inputs: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if func.is_view:
            self.views += 1
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dim() > 0 for t in flat_in) and any(
                isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in torch.utils._pytree.tree_leaves(out)):
            self.host_inputs[name] += 1
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def step_ops(trainer: Trainer, warmup_steps: int = 1) -> dict[str, Any]:
    """Ops of one training step of ``trainer`` (eager path), split into augmentation (gather included),
    forward+backward (loss and ``zero_grad`` included) and optimizer; after ``warmup_steps`` real steps so
    lazily created state (optimizer buffers) is not counted. Trains the model by those steps plus one."""
    n = min(len(trainer.train), trainer.opts.batch_size)
    idx = torch.randperm(len(trainer.train), generator=trainer.gen, device=trainer.gen.device)[:n].to(trainer.device)
    for _ in range(warmup_steps):
        trainer._step(idx)
    counters = {k: OpCounter() for k in ("augment", "model", "optimizer")}
    with counters["augment"]:
        xb, targets = trainer.augment_batch(idx)
    with counters["model"]:
        trainer.forward_backward(xb, targets)
    with counters["optimizer"]:
        trainer.optimizer.step()
    return {
        "ops_per_step": {k: c.total for k, c in counters.items()},
        "views_per_step": {k: c.views for k, c in counters.items()},
        "top_ops": {k: dict(c.ops.most_common(8)) for k, c in counters.items()},
        "host_to_device_per_step": {k: sum(c.host_inputs.values()) for k, c in counters.items()},
    }
