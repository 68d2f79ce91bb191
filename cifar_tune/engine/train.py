"""The training loop: plain PyTorch on in-memory uint8 tensors; never imports Ray.

Everything per step stays on the device: batches are gathered from the resident data set, augmented
as a batch, and the running loss/accuracy are accumulated in device tensors. The host synchronises
once per epoch (to read the metrics), never per step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cifar_tune.engine import fastpath
from cifar_tune.engine.augment import build_augment, normalizer
from cifar_tune.engine.data import Split
from cifar_tune.engine.devices import keep_host_memory, peak_memory_mb
from cifar_tune.engine.fastpath import Decision, GraphedStep
from cifar_tune.engine.optim import build_optimizer, build_schedule, load_optimizer_state
from cifar_tune.engine.transfer import param_groups, scale_lrs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """``space.train``: the training recipe besides model, optimizer, schedule and augmentation."""

    batch_size: int = 128
    label_smoothing: float = 0.0
    grad_clip_norm: float | None = None  # clip the global gradient norm to this value
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool | None = None  # None: on for CUDA, off on CPU
    compile: bool = False  # torch.compile the model
    # how a step runs: eager, compiled (augmentation + model), cuda_graphs (the whole step), auto (cifar_tune.engine.fastpath)
    fast_path: Literal["auto", "eager", "compiled", "cuda_graphs"] = "auto"
    eval_batch_size: int = 1024


@dataclass
class FitResult:
    status: Literal["completed", "diverged", "oom"]
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    per_class_acc: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    num_images: int


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def prepare_model(model: nn.Module, device: torch.device, opts: TrainOptions) -> nn.Module:
    """Move to the device; channels_last and torch.compile as asked (both also work on CPU)."""
    model = model.to(device)
    if opts.channels_last if opts.channels_last is not None else device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 32x32 shapes: let cuDNN pick the fastest kernels
    return model


@contextlib.contextmanager
def precision_flags(precision: str) -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions exactly when ``precision`` allows reduced precision.

    ``fp32`` means IEEE float32 everywhere: TF32 keeps 10 mantissa bits, so leaving it on would run an
    fp32 trial at about bf16-like matmul precision without saying so. ``auto``/``bf16`` already compute
    in bf16 under autocast, so the ops outside it may use TF32. The flags are process-wide (and
    harmless without CUDA): set for the block, restored after, so other code in the process (a
    neighbouring trial's driver, a test) sees its own settings.
    """
    tf32 = precision != "fp32"
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextlib.contextmanager
def _no_host_sync(device: torch.device, strict: bool) -> Iterator[None]:
    """With ``strict`` on CUDA, any host synchronisation inside raises (tests and ``bench`` prove the
    step loop has none); otherwise a no-op."""
    if not (strict and device.type == "cuda"):
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def correct_count(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How much of a batch the model got right, as a float tensor (no host sync).

    Hard labels [B]: the number of images whose argmax is the label. Soft targets [B, K] (mixup/cutmix):
    the target mass on each predicted class, summed: an image mixed with weight lam counts lam if the
    prediction is its own label, 1 - lam if it is the partner's, 0 otherwise (one-hot targets: plain
    accuracy). So ``train_acc`` under mixup/cutmix is the accuracy against the mixed targets.
    """
    pred = logits.argmax(1)
    if targets.dim() == 2:
        return targets.gather(1, pred[:, None]).sum()
    return (pred == targets).sum().float()


def _batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Shuffled index batches; the last partial batch is dropped (BatchNorm needs > 1 image)."""
    perm = torch.randperm(n, generator=generator, device=generator.device).to(device, non_blocking=True)
    full = max(1, n // batch_size)
    for i in range(full):
        yield perm[i * batch_size : (i + 1) * batch_size]


class Trainer:
    """One training run, an epoch at a time. ``state_dict()`` after any epoch holds everything needed
    to continue it exactly (on CPU: the same numbers): model, optimizer, schedule, the global torch
    RNGs (dropout), the batch/augmentation generator, the epoch counter and the history so far.

    ``config`` is a sampled trial config (keys optimizer, schedule, augment, train). Loading a state
    saved under a different config (PBT changed lr, momentum, an augmentation strength, ...) keeps the
    learned state and applies the hyperparameters of *this* config.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Split,
        val: Split | None,
        config: Mapping[str, Any],
        *,
        epochs: int,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int = 0,
        device: torch.device | str | None = None,
        strict_sync: bool = False,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        keep_host_memory()  # the batched augmentation's temporaries: reused, not page-faulted in per step
        self.strict_sync = strict_sync
        self.opts = TrainOptions(**config.get("train", {}))
        self.train, self.val, self.epochs = train, val, epochs
        self.num_classes, self.mean, self.std = num_classes, mean, std
        seed_everything(seed)
        self.model = prepare_model(model, self.device, self.opts)
        self.channels_last = self.opts.channels_last if self.opts.channels_last is not None else self.device.type == "cuda"
        # frozen parts left out, per-part lr multipliers as param groups (cifar_tune.engine.transfer)
        self.optimizer = build_optimizer(param_groups(self.model, config.get("model", {})),
                                         config.get("optimizer", {"name": "sgd", "lr": 0.05}))
        scale_lrs(self.optimizer)
        steps_per_epoch = max(1, len(train) // self.opts.batch_size)
        self.schedule = build_schedule(
            self.optimizer, config.get("schedule", {"name": "none"}), epochs=epochs, steps_per_epoch=steps_per_epoch
        )
        self.augment = build_augment(config.get("augment", {}), mean=mean, std=std, num_classes=num_classes)
        self.gen = torch.Generator(device=train.x.device).manual_seed(seed)
        self.x_all, self.y_all = train.x.to(self.device), train.y.to(self.device)
        self._setup_fast_path(config, steps_per_epoch)
        self.epoch = 0  # epochs finished
        self.history: list[dict[str, Any]] = []
        self.train_time_s = 0.0
        self.status: Literal["completed", "diverged", "oom"] = "completed"

    # ---------------------------------------------------------------------------------- the step

    def _setup_fast_path(self, config: Mapping[str, Any], steps_per_epoch: int) -> None:
        """Resolve ``train.fast_path`` (logged with its reason) and build what the mode needs."""
        schedule_name = str(config.get("schedule", {"name": "none"}).get("name", "none"))
        graph_reason = fastpath.graph_blocker(self.device, self.gen, self.optimizer, schedule_name, self.augment.split)
        self.fast_path: Decision = fastpath.choose(self.opts.fast_path, self.device, self.epochs * steps_per_epoch, graph_reason)
        fell_back = self.opts.fast_path not in ("auto", self.fast_path.mode)  # asked for a mode that cannot run here
        (log.warning if fell_back else log.info)("fast path %s (%s)", self.fast_path.mode, self.fast_path.reason)
        compiled = self.fast_path.mode == "compiled"
        self.step_model = torch.compile(self.model) if self.opts.compile or compiled else self.model
        # the augmentation's pixel work compiled; its random draws stay eager (BatchAugment.draw)
        self._dense = torch.compile(self.augment.dense, dynamic=False) if compiled and self.augment.split else None
        if compiled and (why := fastpath.compile_blocker(self.augment.split)):
            log.info("fast path compiled: %s", why)
        self._graph: GraphedStep | None = None
        self._eager_steps = 0
        self._loss_sum = torch.zeros((), device=self.device)
        self._correct = torch.zeros((), device=self.device)

    def augment_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather and augment one batch: (float32 inputs as the model takes them, targets)."""
        xb, targets = self.augment(self.x_all[idx], self.y_all[idx], self.gen, dense=self._dense)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, targets

    def forward_backward(self, xb: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradients (clipped as configured); the detached (loss, logits)."""
        opts = self.opts
        with _autocast(self.device, opts.precision):
            logits = self.step_model(xb)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=opts.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opts.grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), opts.grad_clip_norm, foreach=True)
        return loss.detach(), logits.detach()

    def _step(self, idx: torch.Tensor) -> None:
        """One eager (or compiled) training step; the running metrics stay on the device."""
        xb, targets = self.augment_batch(idx)
        loss, logits = self.forward_backward(xb, targets)
        self.optimizer.step()
        self._loss_sum += loss * idx.numel()
        self._correct += correct_count(logits, targets)
        self._eager_steps += 1  # Python-side: counts the eager steps only, not the replays (nor the capture)

    def _capture(self, batch_size: int) -> None:
        """Capture the step in a CUDA graph after the eager warm-up steps; on failure fall back to eager
        for the rest of the run and log why (nothing ran during the failed capture: kernels are only
        recorded, so no batch was trained twice or skipped)."""
        steps = self._eager_steps
        # capturing synchronises once (torch.cuda.graph does); strict_sync guards the steps, not this
        sync_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            fastpath.make_capturable(self.optimizer)
            self._graph = GraphedStep(self._step, batch_size, self.device, self.gen)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
            self._graph = None
            self.optimizer.zero_grad(set_to_none=True)
            self.fast_path = Decision("eager", f"cuda_graphs capture failed: {type(e).__name__}: {e}")
            log.warning("fast path falls back to eager: %s", self.fast_path.reason)
        finally:
            torch.cuda.set_sync_debug_mode(sync_mode)
            self._eager_steps = steps  # the captured call ran _step's Python once without training

    def result(self) -> FitResult:
        return FitResult(status=self.status, epochs_run=self.epoch, history=list(self.history), train_time_s=self.train_time_s)

    @property
    def done(self) -> bool:
        return self.epoch >= self.epochs or self.status != "completed"

    def run_epoch(self) -> dict[str, Any]:
        """Train epoch ``self.epoch + 1``, evaluate on ``val``; its metrics (also appended to history)."""
        device, opts, model = self.device, self.opts, self.model
        epoch = self.epoch + 1
        model.train()
        t0 = time.perf_counter()
        # static accumulators: a captured step adds into these very tensors on every replay
        self._loss_sum.zero_()
        self._correct.zero_()
        seen = 0
        with precision_flags(opts.precision), _no_host_sync(device, self.strict_sync):
            for idx in _batches(len(self.train), opts.batch_size, self.gen, device):
                if self.fast_path.mode == "cuda_graphs" and self._graph is None and self._eager_steps >= fastpath.WARMUP_STEPS:
                    self._capture(len(idx))
                if self._graph is not None:
                    self._graph(idx)
                else:
                    self._step(idx)
                self.schedule.step_batch()
                seen += idx.numel()
        train_loss = self._loss_sum.item() / seen  # the one host sync of the epoch
        train_time_s = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": self._correct.item() / seen,
            "lr": self.schedule.lr(),
            "train_time_s": train_time_s,
            "images_per_s": seen / train_time_s,
        }
        self.epoch, self.train_time_s = epoch, self.train_time_s + train_time_s
        if not math.isfinite(train_loss):
            self.status = "diverged"
            metrics.update(status="diverged", epoch_time_s=time.perf_counter() - t0)
            self.history.append(metrics)
            return metrics
        val_loss = None
        if self.val is not None:
            ev = evaluate(self.step_model, self.val, mean=self.mean, std=self.std, num_classes=self.num_classes,
                          device=device, batch_size=opts.eval_batch_size, channels_last=self.channels_last,
                          precision=opts.precision)
            val_loss = ev.loss
            metrics.update(val_loss=ev.loss, val_acc=ev.top1, val_top5=ev.top5)
        self.schedule.step_epoch(val_loss)
        metrics["epoch_time_s"] = time.perf_counter() - t0
        metrics["ended_at"] = time.time()  # wall clock: shows which trials' epochs overlapped
        if (peak_mb := peak_memory_mb(device)) is not None:
            metrics["gpu_mem_peak_mb"] = peak_mb
        self.history.append(metrics)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python only (``torch.load(..., weights_only=True)`` reads it back)."""
        # the generator's kind travels with its state: a CUDA (Philox) state cannot seed a CPU (Mersenne
        # Twister) generator, and a checkpoint may be resumed on the other kind of device
        rng: dict[str, Any] = {"torch": torch.get_rng_state(), "generator": self.gen.get_state(),
                               "generator_device": self.gen.device.type}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "epoch": self.epoch,
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "schedule": self.schedule.state_dict(),
            "rng": rng,
            "history": [dict(m) for m in self.history],
            "train_time_s": self.train_time_s,
            "status": self.status,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._graph = None  # a captured step holds the old optimizer state and hyperparameters: capture anew
        self.model.load_state_dict(state["model"])
        # Hyperparameters (lr, momentum, betas, amsgrad, ...) come from this run's config, buffers and
        # step counts from the state: identical when continuing, PBT's new values after an exploit.
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        _restore_generator(self.gen, state["rng"])
        self.epoch = int(state["epoch"])
        self.history = [dict(m) for m in state["history"]]
        self.train_time_s = float(state["train_time_s"])
        self.status = state["status"]


def _generator_kind(rng: Mapping[str, Any]) -> str:
    """The device type of the generator whose state ``rng`` holds (older checkpoints do not say: a
    CUDA Philox state is 16 bytes, seed and offset; a CPU Mersenne Twister state is 5056)."""
    kind = rng.get("generator_device")
    if kind is not None:
        return str(kind)
    return "cuda" if rng["generator"].numel() == 16 else "cpu"


def _restore_generator(gen: torch.Generator, rng: Mapping[str, Any]) -> None:
    """Continue the batch/augmentation stream of a checkpoint on ``gen``.

    Same kind of device: the exact stream. Another kind (a GPU trial resumed on a CPU worker after
    ``gpus_per_trial`` changed, a mixed cluster): the two generators are different algorithms, so no
    state of one continues the other's stream; ``gen`` is seeded from the saved state instead, which
    keeps a resumed run deterministic (same checkpoint, same draws) without replaying the old stream.
    """
    state = rng["generator"]
    if _generator_kind(rng) == gen.device.type:
        gen.set_state(state)
    else:
        gen.manual_seed(zlib.crc32(state.cpu().numpy().tobytes()))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def fit(
    model: nn.Module,
    train: Split,
    val: Split | None,
    config: Mapping[str, Any],
    *,
    epochs: int,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int = 0,
    device: torch.device | str | None = None,
    on_epoch: Callable[[dict[str, float]], Any] | None = None,
    strict_sync: bool = False,
) -> FitResult:
    """Train ``model`` for ``epochs`` on ``train``; evaluate on ``val`` (if given) after each epoch.

    ``config`` is a sampled trial config (keys optimizer, schedule, augment, train). ``on_epoch``
    receives each epoch's metrics. A non-finite training loss ends the run with status ``diverged``.
    """
    trainer = Trainer(model, train, val, config, epochs=epochs, num_classes=num_classes, mean=mean, std=std,
                      seed=seed, device=device, strict_sync=strict_sync)
    while not trainer.done:
        metrics = trainer.run_epoch()
        if on_epoch:
            on_epoch(metrics)
    return trainer.result()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    num_classes: int,
    device: torch.device | str | None = None,
    batch_size: int = 1024,
    channels_last: bool = False,
    precision: str = "auto",
) -> EvalResult:
    """Loss, top-1, top-5, per-class accuracy and confusion matrix; one host sync at the end.

    Nothing per batch makes a host tensor or copies from the host: a split on the host is copied to
    ``device`` once, the normalisation constants are made once, and the confusion matrix is counted
    with ``scatter_add_`` (CUDA ``bincount`` reads its input's maximum back to size its output: a
    sync per batch, even with ``minlength``).
    """
    device = torch.device(device) if device is not None else default_device()
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    k = min(5, num_classes)
    xs, ys = split.x.to(device), split.y.to(device)  # no-ops for a split already there (the search's)
    norm = normalizer(mean, std, device)
    with precision_flags(precision):
        for start in range(0, len(split), batch_size):
            xb = norm(xs[start : start + batch_size])
            yb = ys[start : start + batch_size]
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(device, precision):
                logits = model(xb).float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            pred_k = logits.topk(k, dim=1).indices
            top1 += (pred_k[:, 0] == yb).sum()
            top5 += (pred_k == yb[:, None]).any(dim=1).sum()
            cell = yb * num_classes + pred_k[:, 0]
            confusion.scatter_add_(0, cell, torch.ones_like(cell))
    model.train(was_training)
    n = len(split)
    cm = confusion.view(num_classes, num_classes).cpu()
    per_class = (cm.diag().double() / cm.sum(1).clamp(min=1).double()).tolist()
    return EvalResult(
        loss=loss_sum.item() / n, top1=top1.item() / n, top5=top5.item() / n,
        per_class_acc=per_class, confusion=cm.tolist(), num_images=n,
    )
