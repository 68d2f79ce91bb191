"""Transfer learning: start a model from saved weights, freeze parts of it, scale the lr of others.

A model config may carry, next to its family hyperparameters (``models.TRANSFER_KEYS``)::

    init: {checkpoint: PATH}     a cifar-tune checkpoint (``retrain``'s ``checkpoints/*.pt``) or a plain
                                 state dict of tensors (a torchvision weights file for family torchvision);
                                 loaded with ``torch.load(weights_only=True)``, never downloaded
    freeze: [stem, layer1]       parts whose parameters get no gradient
    lr_mult: {head: 10}          per-part learning-rate multipliers (the optimizer's lr times this)

Parts: ``head`` (the last ``nn.Linear``), ``stem`` (a module named ``stem``; torchvision ResNets' ``conv1``
+ ``bn1``; else the first ``Conv2d``), ``all_but_head``, or any module name of the model (``layer1``,
``features``, ``features.0``, ``classifier.1``; ``cifar-tune model-info`` lists the top-level ones).

Tensors whose shape no longer fits (a new class count; a flatten head whose input grew with the image
size) keep the model's fresh initialisation and are listed in the trial log. A file that does not fit
at all (tensors of the model missing from it, or nothing loadable) is a validation error before any
trial starts. Frozen parts still update BatchNorm running statistics in training mode (``requires_grad``
only stops gradients, as in torchvision's fine-tuning recipe).

This module is plain PyTorch; it never imports Ray.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_tune.registry import did_you_mean

CHECKPOINT_FORMAT = "cifar-tune-checkpoint/"
SPECIAL_PARTS = ("head", "stem", "all_but_head")
# annotations of the transfer keys, for the spec validator (next to the family's own hyperparameters)
TRANSFER_HINTS: dict[str, Any] = {"init": dict, "freeze": list[str], "lr_mult": dict}


@dataclass(frozen=True)
class Plan:
    """How a weights file maps onto a model's state dict."""

    loaded: tuple[str, ...]
    reinitialised: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (key, file shape, model shape)
    missing: tuple[str, ...]  # in the model, not in the file
    ignored: tuple[str, ...]  # in the file, not in the model

    def lines(self, path: str) -> list[str]:
        out = [f"init: {len(self.loaded)} of {len(self.loaded) + len(self.reinitialised) + len(self.missing)} "
               f"tensors loaded from {path}"]
        out += [f"init: re-initialised {k}: model {list(m)} vs file {list(f)}" for k, f, m in self.reinitialised]
        if self.ignored:
            out.append(f"init: {len(self.ignored)} tensors of the file not in the model, ignored: "
                       f"{', '.join(self.ignored[:8])}{' ...' if len(self.ignored) > 8 else ''}")
        return out


_weights_cache: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a cifar-tune checkpoint or a plain state-dict file; ValueError("init.checkpoint: ...")."""
    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise ValueError(f"init.checkpoint: no such file: {p}")
    stat = p.stat()
    key = (str(p), stat.st_mtime_ns, stat.st_size)  # validation and every trial of a worker read it once
    if key not in _weights_cache:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors, zip errors, disallowed globals
            raise ValueError(f"init.checkpoint: cannot load {p} with weights_only=True: "
                             f"{' '.join(f'{type(e).__name__}: {e}'.split())[:300]}") from e
        if isinstance(obj, dict) and str(obj.get("format", "")).startswith(CHECKPOINT_FORMAT):
            obj = obj.get("state_dict")
        if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
            raise ValueError(f"init.checkpoint: {p} is neither a cifar-tune checkpoint nor a state dict of tensors")
        _weights_cache.clear()  # keep one file in memory
        _weights_cache[key] = obj
    return _weights_cache[key]


def plan(model_state: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> Plan:
    loaded, reinit, missing = [], [], []
    for k, t in model_state.items():
        if k not in weights:
            if not k.endswith("num_batches_tracked"):  # older weight files do not store this counter
                missing.append(k)
        elif tuple(weights[k].shape) == tuple(t.shape):
            loaded.append(k)
        else:
            reinit.append((k, tuple(weights[k].shape), tuple(t.shape)))
    ignored = [k for k in weights if k not in model_state]
    return Plan(tuple(loaded), tuple(reinit), tuple(missing), tuple(ignored))


def check_fit(p: Plan, path: str, family: str) -> None:
    if p.missing:
        raise ValueError(f"init.checkpoint: {path} does not fit the '{family}' model: {len(p.missing)} of its tensors "
                         f"are not in the file ({', '.join(p.missing[:4])}{' ...' if len(p.missing) > 4 else ''}); "
                         "is it the same architecture?")
    if not p.loaded:
        raise ValueError(f"init.checkpoint: {path}: no tensor of the file fits the '{family}' model")


# ----------------------------------------------------------------------------------------------------
# parts


def _head(model: nn.Module) -> str:
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("freeze: the model has no Linear layer, so no 'head'")
    return linears[-1]


def _stem(model: nn.Module) -> list[str]:
    names = dict(model.named_modules())
    if "stem" in names:
        return ["stem"]
    if "conv1" in names:  # torchvision ResNets
        return [n for n in ("conv1", "bn1") if n in names]
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("freeze: the model has no convolution, so no 'stem'")
    return convs[:1]


def _under(param: str, module: str) -> bool:
    return module == "" or param == module or param.startswith(module + ".")


def part_params(model: nn.Module, part: str, key: str = "freeze") -> list[str]:
    """Names of the parameters of ``part`` (see the module docstring); ValueError for an unknown part."""
    params = [n for n, _ in model.named_parameters()]
    if part == "head":
        prefixes = [_head(model)]
    elif part == "stem":
        prefixes = _stem(model)
    elif part == "all_but_head":
        head = _head(model)
        return [n for n in params if not _under(n, head)]
    else:
        modules = [n for n, _ in model.named_modules() if n]
        if part not in modules:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"{key}: unknown part {part!r}{did_you_mean(str(part), [*SPECIAL_PARTS, *modules])}; "
                             f"parts: {', '.join([*SPECIAL_PARTS, *top])} or any module name")
        prefixes = [part]
    return [n for n in params if any(_under(n, p) for p in prefixes)]


def _parts(cfg: Mapping[str, Any]) -> tuple[list[str], dict[str, float]]:
    freeze, mult = cfg.get("freeze") or [], cfg.get("lr_mult") or {}
    if isinstance(freeze, str) or not isinstance(freeze, Iterable) or not all(isinstance(p, str) for p in freeze):
        raise ValueError(f"freeze: must be a list of part names, got {freeze!r}")
    if not isinstance(mult, Mapping):
        raise ValueError(f"lr_mult: must be a mapping of part -> multiplier, got {mult!r}")
    for part, m in mult.items():
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not m > 0:
            raise ValueError(f"lr_mult.{part}: must be a number > 0, got {m!r}")
    return list(freeze), {str(k): float(v) for k, v in mult.items()}


# ----------------------------------------------------------------------------------------------------
# public API


def check(cfg: Mapping[str, Any], model: nn.Module) -> Plan | None:
    """Validate init/freeze/lr_mult of ``cfg`` against ``model`` (may be on the meta device): the file exists,
    loads and fits; parts exist; nothing frozen also has a multiplier. Raises ValueError("<key>: ...")."""
    result = None
    init = cfg.get("init")
    if init is not None:
        if not isinstance(init, Mapping) or set(init) != {"checkpoint"} or not isinstance(init["checkpoint"], str):
            raise ValueError(f"init: must be {{checkpoint: PATH}}, got {init!r}")
        result = plan(model.state_dict(), read_weights(init["checkpoint"]))
        check_fit(result, init["checkpoint"], str(cfg.get("family")))
    freeze, mult = _parts(cfg)
    frozen = {n for part in freeze for n in part_params(model, part)}
    for part in mult:
        names = part_params(model, part, key=f"lr_mult.{part}")
        if names and set(names) <= frozen:
            raise ValueError(f"lr_mult.{part}: the part is frozen (freeze: {freeze})")
    if frozen and frozen == {n for n, _ in model.named_parameters()}:
        raise ValueError(f"freeze: {freeze} freezes every parameter; nothing would train")
    return result


def apply(model: nn.Module, cfg: Mapping[str, Any], log: Callable[[str], Any] = print) -> nn.Module:
    """Load ``init`` weights into a freshly built ``model`` (misfits keep their fresh init; logged) and freeze
    the ``freeze`` parts. A config without transfer keys leaves the model untouched."""
    result = check(cfg, model)
    if result is not None:
        weights = read_weights(cfg["init"]["checkpoint"])
        with torch.no_grad():
            state = model.state_dict()
            for k in result.loaded:
                state[k].copy_(weights[k])
        for line in result.lines(cfg["init"]["checkpoint"]):
            log(line)
    freeze, _ = _parts(cfg)
    names = {n for part in freeze for n in part_params(model, part)}
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(False)
    if names:
        log(f"freeze: {', '.join(freeze)} ({len(names)} parameter tensors, "
            f"{sum(p.numel() for n, p in model.named_parameters() if n in names):,} values)")
    return model


def param_groups(model: nn.Module, cfg: Mapping[str, Any]) -> Iterable[Any]:
    """What the optimizer gets: the trainable parameters, grouped by lr multiplier (``lr_mult`` key in each
    group, applied by :func:`scale_lrs`). Without ``lr_mult``: ``model.parameters()`` as before."""
    _, mult = _parts(cfg)
    if not mult:
        return [p for p in model.parameters() if p.requires_grad] if cfg.get("freeze") else model.parameters()
    factor = {}
    for part, m in mult.items():  # a later entry wins where parts overlap (e.g. all_but_head, then layer4)
        for n in part_params(model, part, key=f"lr_mult.{part}"):
            factor[n] = m
    groups: dict[float, list[nn.Parameter]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(factor.get(n, 1.0), []).append(p)
    return [{"params": ps, "lr_mult": m} for m, ps in groups.items()]


def scale_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Multiply each group's lr by its ``lr_mult`` (before the schedule records the base lrs)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)


def absolute_checkpoints(tree: Any, base: Path | None = None) -> Any:
    """The raw ``space.model`` YAML with every ``init.checkpoint`` made absolute (Ray runs trials in other
    working directories), relative paths being relative to ``base`` (the current directory)."""
    base = base or Path.cwd()
    if isinstance(tree, list):
        return [absolute_checkpoints(v, base) for v in tree]
    if not isinstance(tree, Mapping):
        return tree
    out = {k: absolute_checkpoints(v, base) for k, v in tree.items()}
    init = out.get("init")
    if isinstance(init, Mapping) and isinstance(init.get("checkpoint"), str):
        out["init"] = {**init, "checkpoint": str((base / Path(init["checkpoint"]).expanduser()).resolve())}
    return out


def check_config(cfg: Mapping[str, Any], *, num_classes: int, in_channels: int, image_size: int) -> None:
    """The spec validator's check of a sampled model config's transfer keys (model built on the meta device)."""
    if not any(k in cfg for k in TRANSFER_HINTS):
        return
    from cifar_tune.engine.models import build_model

    with torch.device("meta"):
        model = build_model(cfg, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    check(cfg, model)
