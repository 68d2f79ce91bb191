"""``train.fast_path``: how a training step runs, and the cost model ``auto`` chooses by.

    eager        every ATen op dispatched from Python, one kernel launch each (the reference)
    compiled     ``torch.compile`` (Inductor) of the augmentation's pixel work (its random draws stay
                 outside, in eager code, from the trial's generator) and of the model's forward/backward
    cuda_graphs  on CUDA: the whole step (gather, augmentation with its draws, forward, backward,
                 optimizer, running metrics) captured once in a CUDA graph and replayed per batch
    auto         by the cost model below

Why: on a GPU a small model's step is host-bound. Each dispatched op costs ~5-8 us of host time
(``HOST_S_PER_OP``), so a step of a few hundred ops (``cifar-tune bench`` reports ``ops_per_step``) takes
milliseconds of Python and launches whatever the GPU needs. A graph replay launches the step as one
unit; compiling fuses the elementwise ops into a few kernels. Both have a one-off cost that a short
trial may not win back: ``CAPTURE_S`` (eager warm-up steps and the capture) and the compile time.

The cost model (seconds saved over the trial, minus the one-off cost; the largest positive wins):

    cuda_graphs  total_steps * EAGER_OPS_PER_STEP * HOST_S_PER_OP  -  CAPTURE_S
    compiled     total_steps * (EAGER_OPS_PER_STEP - COMPILED_OPS_PER_STEP) * HOST_S_PER_OP  -  COMPILE_S

On CPU there is no launch overhead to save: an op's cost is its arithmetic, which compiling changes
little. Measured (``experiments/results/fast_path_cpu_{lenet,seed000}.md``): 110-140 s of compilation,
then 1.07x (LeNet: won back after ~2.8M images, ~70 CIFAR epochs) and 0.99x (CNN6: never), so ``auto`` is
``eager`` there. The CUDA constants are estimates until the GPU check
measures them (``experiments/gpu_check.sh``); the model only has to rank the modes, not time them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

FastPath = Literal["auto", "eager", "compiled", "cuda_graphs"]
FAST_PATHS: tuple[str, ...] = ("auto", "eager", "compiled", "cuda_graphs")

HOST_S_PER_OP = 6e-6  # host time of one eagerly dispatched op on CUDA (dispatch + launch), 5-8 us
EAGER_OPS_PER_STEP = 330  # seed-000 recipe + CNN6 + SGD, counted (experiments/results/ops_per_step_cpu.md)
COMPILED_OPS_PER_STEP = 120  # what stays dispatched when compiled: optimizer, draws, loop bookkeeping
CAPTURE_S = 3.0  # eager warm-up steps (cuDNN autotuning) plus the capture itself
COMPILE_S = 60.0  # Inductor on CUDA, augmentation + model forward/backward (on CPU measured 110-140 s)
WARMUP_STEPS = 3  # eager steps before capturing: optimizer state and cuDNN's choices exist by then


@dataclass(frozen=True)
class Decision:
    mode: Literal["eager", "compiled", "cuda_graphs"]
    reason: str


def graph_blocker(device: torch.device, generator: torch.Generator, optimizer: torch.optim.Optimizer,
                  schedule_name: str, augment_split: bool) -> str | None:
    """Why the step cannot be captured in a CUDA graph here (None: it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device; this trial runs on {device.type}"
    if generator.device.type != "cuda":
        return "the augmentation's generator is on the CPU (data not resident on the GPU): its draws would be copied in"
    if not (optimizer.defaults.get("capturable") is not None or isinstance(optimizer, torch.optim.SGD)):
        return f"{type(optimizer).__name__} has no capturable mode (its step reads host-side values)"
    if schedule_name != "none":
        return f"schedule '{schedule_name}' changes the lr between steps; a captured optimizer step keeps its lr"
    if not augment_split:
        return "an augmentation policy draws inside its pixel stages"
    return None


def compile_blocker(augment_split: bool) -> str | None:
    """What the compiled path leaves eager (None: augmentation and model are both compiled)."""
    return None if augment_split else "augmentation policies draw between stages: only the model is compiled"


def choose(requested: str, device: torch.device, total_steps: int, graph_reason: str | None) -> Decision:
    """The mode a step runs in: ``requested`` unless it cannot run here (then eager, with the reason)."""
    if requested == "eager":
        return Decision("eager", "requested")
    if requested == "compiled":
        return Decision("compiled", "requested")
    if requested == "cuda_graphs":
        if graph_reason is not None:
            return Decision("eager", f"cuda_graphs unavailable: {graph_reason}")
        return Decision("cuda_graphs", "requested")
    if device.type != "cuda":
        return Decision("eager", f"auto on {device.type}: no launch overhead to save, compile time not won back")
    gains = {"eager": 0.0,
             "compiled": total_steps * (EAGER_OPS_PER_STEP - COMPILED_OPS_PER_STEP) * HOST_S_PER_OP - COMPILE_S}
    if graph_reason is None:
        gains["cuda_graphs"] = total_steps * EAGER_OPS_PER_STEP * HOST_S_PER_OP - CAPTURE_S
    best = max(gains, key=lambda k: gains[k])
    why = ", ".join(f"{k} {v:+.1f} s" for k, v in gains.items())
    blocked = f"; cuda_graphs unavailable: {graph_reason}" if graph_reason else ""
    return Decision(best, f"auto: {total_steps} steps, estimated saving {why}{blocked}")  # type: ignore[arg-type]


def min_steps_to_pay_off(mode: str) -> int:
    """Total steps on CUDA after which ``mode`` saves more than it costs under the cost model."""
    if mode == "cuda_graphs":
        return math.ceil(CAPTURE_S / (EAGER_OPS_PER_STEP * HOST_S_PER_OP))
    if mode == "compiled":
        return math.ceil(COMPILE_S / ((EAGER_OPS_PER_STEP - COMPILED_OPS_PER_STEP) * HOST_S_PER_OP))
    return 0


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Turn on ``capturable`` (Adam, AdamW, RMSprop, ...: step counts and bias corrections stay on the
    device) and move step counts restored from a checkpoint onto their parameters' device."""
    if optimizer.defaults.get("capturable") is None:
        return  # SGD: nothing host-side in its step
    for group in optimizer.param_groups:
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if isinstance(state.get("step"), torch.Tensor) and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device, dtype=torch.float32)


class GraphedStep:
    """One training step captured in a CUDA graph; ``__call__(idx)`` copies the batch's indices into the
    graph's static input and replays it. ``step(idx)`` is the eager step being captured; it must read
    only device tensors (no host sync, no host-to-device copy) and accumulate into static tensors."""

    def __init__(self, step: Any, batch_size: int, device: torch.device, generator: torch.Generator) -> None:
        self.idx = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graph = torch.cuda.CUDAGraph()
        # the augmentation's draws happen inside the graph: each replay advances this generator's offset
        self.graph.register_generator_state(generator)
        autocast_cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)  # cached casts would outlive the capture's memory pool
        try:
            with torch.cuda.graph(self.graph):
                step(self.idx)
        finally:
            torch.set_autocast_cache_enabled(autocast_cache)

    def __call__(self, idx: torch.Tensor) -> None:
        self.idx.copy_(idx, non_blocking=True)
        self.graph.replay()
