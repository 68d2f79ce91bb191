"""Model families for CIFAR-style classification, built from a flat config.

``build_model({"family": "vgg", **hyperparameters}, num_classes=100)`` looks the family up in ``MODELS``
and calls its builder. A builder takes the runtime arguments ``(num_classes, in_channels, image_size)``
positionally and its hyperparameters keyword-only, with type hints and defaults: the spec validator reads
them from the signature (see ``cifar_tune.registry``). Builders validate values eagerly and raise
``ValueError("<key path>: <message>")``, including architectures that cannot fit the input size, so a bad
sampled config fails at build time with a readable message instead of a shape error inside ``forward``.

Families:
    mlp          flatten -> dense stack
    lenet        LeNet-5 (conv5 -> pool -> conv5 -> pool -> 120 -> 84 -> classes)
    vgg          plain conv blocks + dense head (Keras ``Sequential`` CNNs are expressible exactly)
    resnet       CIFAR ResNet (3x3 stem, basic/bottleneck blocks, any number of stages)
    torchvision  any ``torchvision.models`` classifier, randomly initialised, adapted to small inputs

Mutable list defaults in the builder signatures are deliberate: they are read (never mutated) by the
spec validator and documentation, and ``list[int]`` is what a YAML config holds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from cifar_tune.engine import resnet as _resnet  # noqa: F401  registers resnet into MODELS
from cifar_tune.engine import usermodels as _usermodels  # noqa: F401  registers python (a researcher's factory)
from cifar_tune.engine.model_base import (
    _ACTIVATIONS,
    _LAYER_ORDERS,
    _POOLS,
    MODELS,
    TRANSFER_KEYS,
    Activation,
    ConvBlock,
    GlobalPool,
    LayerOrder,
    Pool,
    _check_bool,
    _check_choice,
    _check_int,
    _check_int_list,
    _check_padding,
    _check_prob,
    _conv_classifier,
    _dense_stack,
)
from cifar_tune.registry import UnknownNameError, did_you_mean

__all__ = [
    "MODELS",
    "build_model",
    "check_architecture",
    "model_info",
    "param_count",
]


# --------------------------------------------------------------------------------------------------
# Families.
# --------------------------------------------------------------------------------------------------


@MODELS.register()
def mlp(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    hidden: list[int] = [512, 256],  # noqa: B006
    activation: Activation = "relu",
    dropout: float = 0.0,
    batch_norm: bool = False,
    order: LayerOrder = "bn-act-dropout",
) -> nn.Module:
    """Flatten the image, then ``Linear -> [ops in order] `` per hidden width, then ``Linear`` to classes."""
    layers = _dense_stack(
        in_channels * image_size * image_size,
        _check_int_list("hidden", hidden),
        num_classes,
        activation=_check_choice("activation", activation, list(_ACTIVATIONS)),
        dropout=_check_prob("dropout", dropout),
        batch_norm=_check_bool("batch_norm", batch_norm),
        order=_check_choice("order", order, _LAYER_ORDERS),
    )
    return nn.Sequential(nn.Flatten(), *layers)


@MODELS.register()
def lenet(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    channels: list[int] = [6, 16],  # noqa: B006
    kernel_size: int = 5,
    padding: int = 0,
    activation: Activation = "relu",
    pool: Literal["max", "avg"] = "avg",
    batch_norm: bool = False,
    hidden: list[int] = [120, 84],  # noqa: B006
    dropout: float = 0.0,
) -> nn.Module:
    """LeNet-5 (seed 001 ``ConvNet``): ``conv5 -> act -> pool`` per width in ``channels``, then the dense head.

    ``batch_norm`` adds BatchNorm2d after each conv; ``dropout`` applies to the dense head.
    """
    act = _check_choice("activation", activation, list(_ACTIVATIONS))
    pad = _check_int("padding", padding, min_value=0)
    ksize = _check_int("kernel_size", kernel_size)
    bn = _check_bool("batch_norm", batch_norm)
    pool_kind = _check_choice("pool", pool, ("max", "avg"))
    blocks = [
        ConvBlock(f"channels[{i}]", "kernel_size", (c,), ksize, pad, act, bn, pool_kind, 0.0)
        for i, c in enumerate(_check_int_list("channels", channels, min_len=1))
    ]
    return _conv_classifier(
        blocks,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        where="channels",
        conv_bias=True,
        global_pool="none",
        head=_check_int_list("hidden", hidden),
        activation=act,
        head_dropout=_check_prob("dropout", dropout),
        head_batch_norm=False,
        head_order="act-dropout-bn",
    )


_VGG_BLOCK_KEYS = ("channels", "kernel_size", "padding", "activation", "batch_norm", "pool", "dropout")


def _vgg_block(key: str, spec: Any, defaults: Mapping[str, Any]) -> ConvBlock:
    if not isinstance(spec, Mapping):
        raise ValueError(f"{key}: must be a mapping with at least 'channels'; got {spec!r}")
    for k in spec:
        if k not in _VGG_BLOCK_KEYS:
            raise ValueError(
                f"{key}: unknown key '{k}'{did_you_mean(str(k), _VGG_BLOCK_KEYS)}; "
                f"allowed: {', '.join(_VGG_BLOCK_KEYS)}"
            )
    if "channels" not in spec:
        raise ValueError(f"{key}.channels: missing (the conv widths of this block, e.g. [64, 64])")
    s = {**defaults, **spec}
    return ConvBlock(
        key=key,
        kernel_key=f"{key}.kernel_size",
        channels=tuple(_check_int_list(f"{key}.channels", s["channels"], min_len=1)),
        kernel_size=_check_int(f"{key}.kernel_size", s["kernel_size"]),
        padding=_check_padding(f"{key}.padding", s["padding"]),
        activation=_check_choice(f"{key}.activation", s["activation"], list(_ACTIVATIONS)),
        batch_norm=_check_bool(f"{key}.batch_norm", s["batch_norm"]),
        pool=_check_choice(f"{key}.pool", s["pool"], _POOLS),
        dropout=_check_prob(f"{key}.dropout", s["dropout"]),
    )


@MODELS.register()
def vgg(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    blocks: list[dict[str, Any]] = [  # noqa: B006
        {"channels": [64, 64]},
        {"channels": [128, 128]},
        {"channels": [256, 256]},
    ],
    kernel_size: int = 3,
    padding: int | None = None,
    activation: Activation = "relu",
    batch_norm: bool = True,
    pool: Pool = "max",
    dropout: float = 0.0,
    conv_bias: bool = True,
    global_pool: GlobalPool = "none",
    head: list[int] = [512],  # noqa: B006
    head_dropout: float = 0.0,
    head_batch_norm: bool = False,
    head_order: LayerOrder = "bn-act-dropout",
) -> nn.Module:
    """Plain CNN: conv blocks, then ``global_pool`` + flatten, then a dense head.

    Each block is ``(conv -> [bn] -> act) x len(channels) -> [pool 2x2] -> [dropout]``. The top-level
    ``kernel_size``, ``padding`` (None = same), ``activation``, ``batch_norm``, ``pool`` and ``dropout``
    are the defaults of every block; a block overrides them with its own keys. ``conv_bias`` defaults to
    true like Keras' Conv2D (a bias before BN is redundant, but it is in the seed models' counts).
    """
    defaults = {
        "kernel_size": kernel_size,
        "padding": padding,
        "activation": activation,
        "batch_norm": batch_norm,
        "pool": pool,
        "dropout": dropout,
    }
    if isinstance(blocks, (str, bytes, Mapping)) or not isinstance(blocks, Sequence):
        raise ValueError(f"blocks: must be a list of block mappings; got {blocks!r}")
    specs = [_vgg_block(f"blocks[{i}]", b, defaults) for i, b in enumerate(blocks)]
    if not specs:
        raise ValueError("blocks: needs at least one block")
    return _conv_classifier(
        specs,
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        where="blocks",
        conv_bias=_check_bool("conv_bias", conv_bias),
        global_pool=_check_choice("global_pool", global_pool, ("none", "avg", "max")),
        head=_check_int_list("head", head),
        activation=_check_choice("activation", activation, list(_ACTIVATIONS)),
        head_dropout=_check_prob("head_dropout", head_dropout),
        head_batch_norm=_check_bool("head_batch_norm", head_batch_norm),
        head_order=_check_choice("head_order", head_order, _LAYER_ORDERS),
    )


# --------------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------------


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return tvm.list_models(module=tvm)  # the classification models only


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Put new parameters and buffers on the meta device while other tensors stay on the CPU.

    For constructors that compute with tensors (RegNet derives its widths with ``torch.pow(...).tolist()``)
    and so fail under ``torch.device("meta")``. Their weights are still allocated by ``torch.empty`` on the
    CPU first, but never written, so the pages are not touched.
    """
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def param_to_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer_to_meta(
        self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        register_buffer(self, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter = param_to_meta  # type: ignore[method-assign]
    nn.Module.register_buffer = buffer_to_meta  # type: ignore[method-assign]
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


def _get_torchvision_model(name: str, image_size: int, kwargs: dict[str, Any]) -> nn.Module:
    from torchvision import models as tvm

    try:
        try:
            return tvm.get_model(name, **kwargs)
        except NotImplementedError:
            if torch.get_default_device().type != "meta":
                raise
            with _parameters_on_meta():
                return tvm.get_model(name, **kwargs)
    except (AssertionError, TypeError, ValueError) as e:  # torchvision asserts on e.g. ViT patch sizes
        raise ValueError(f"name: torchvision cannot build {name!r} for {image_size}x{image_size}: {e}") from e


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Give the first Conv2d ``in_channels`` inputs (e.g. grayscale), keeping its other settings."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels != in_channels:
                parent, _, child = name.rpartition(".")
                new = nn.Conv2d(
                    in_channels,
                    m.out_channels,
                    m.kernel_size,  # type: ignore[arg-type]
                    m.stride,  # type: ignore[arg-type]
                    m.padding,  # type: ignore[arg-type]
                    m.dilation,  # type: ignore[arg-type]
                    m.groups if m.groups == 1 else in_channels,
                    bias=m.bias is not None,
                )
                setattr(model.get_submodule(parent), child, new)
            return


@MODELS.register("torchvision")
def torchvision_model(
    num_classes: int,
    in_channels: int,
    image_size: int,
    *,
    name: str = "resnet18",
    small_input: bool = True,
) -> nn.Module:
    """Any torchvision classification model, randomly initialised (``weights=None``, never downloads).

    The classifier is built for ``num_classes`` by torchvision itself. ``small_input`` adapts the
    ResNet family (resnet*, resnext*, wide_resnet*) to 32x32 inputs the usual CIFAR way: a 3x3/stride-1
    stem conv and no stem max-pool (otherwise a 32x32 image is 8x8 before the first block). ViTs get
    ``image_size`` passed through. Other families are used as torchvision defines them; one whose
    downsampling does not fit the input fails ``check_architecture``.
    """
    from torchvision import models as tvm

    names = _torchvision_names()
    if name not in names:
        raise ValueError(
            f"name: unknown torchvision classification model {name!r}{did_you_mean(str(name), names)}"
        )
    small = _check_bool("small_input", small_input)
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        # Auxiliary heads make forward return a namedtuple in training; init_weights=True silences a warning.
        kwargs.update(aux_logits=False, init_weights=True)
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    model = _get_torchvision_model(name, image_size, kwargs)
    if small and isinstance(model, tvm.ResNet):
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    else:
        _replace_first_conv(model, in_channels)
    return model


# --------------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------------


def build_model(
    cfg: Mapping[str, Any], *, num_classes: int, in_channels: int = 3, image_size: int = 32
) -> nn.Module:
    """Build ``cfg = {"family": ..., **hyperparameters}``; raises ValueError naming the bad key."""
    _check_int("num_classes", num_classes)
    _check_int("in_channels", in_channels)
    _check_int("image_size", image_size)
    if "family" not in cfg:
        raise ValueError(f"family: missing; available: {', '.join(sorted(MODELS))}")
    family = cfg["family"]
    try:
        allowed = MODELS.hyperparameters(family, cfg)
    except UnknownNameError as e:
        raise ValueError(f"family: {e}") from None
    hparams = {k: v for k, v in cfg.items() if k != "family" and k not in TRANSFER_KEYS}
    for key in hparams:
        if key not in allowed:
            raise ValueError(
                f"{key}: unknown key for model family '{family}'{did_you_mean(key, list(allowed))}; "
                f"allowed: {', '.join(allowed)}"
            )
    # Not MODELS.build(): its first parameter is called ``name``, which the torchvision family uses.
    return MODELS.get_builder(family)(num_classes, in_channels, image_size, **hparams)


def param_count(
    cfg: Mapping[str, Any], *, num_classes: int, in_channels: int = 3, image_size: int = 32
) -> int:
    """Trainable parameters of ``cfg``'s model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(cfg, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_architecture(
    cfg: Mapping[str, Any], *, num_classes: int, in_channels: int = 3, image_size: int = 32
) -> None:
    """Build on the meta device and run a shape-only forward of a [2, C, H, W] batch (train mode).

    Catches what the builders' arithmetic checks cannot know about (chiefly torchvision models whose
    downsampling does not fit a small input). Raises ValueError.
    """
    with torch.device("meta"):
        model = build_model(cfg, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    shape = (2, in_channels, image_size, image_size)
    try:
        with torch.no_grad():
            out = model.train()(torch.empty(shape, device="meta"))
    except Exception as e:  # any failure here means the architecture cannot run on this input
        raise ValueError(
            f"family: the '{cfg['family']}' model cannot run on a {list(shape)} input: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"family: the '{cfg['family']}' model returns {got}, expected (2, {num_classes})")


def _conv_macs(m: nn.Module, out: torch.Tensor) -> int:
    assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    per_output = (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return (out.numel() // out.shape[0]) * per_output


def model_info(model: nn.Module, *, in_channels: int, image_size: int) -> dict[str, int]:
    """``params`` (trainable), ``buffers`` (numel, e.g. BN running stats) and ``macs`` per image.

    MACs are counted with forward hooks on Conv1d/2d/3d and Linear (weights x outputs, bias ignored) on a
    single image in eval mode, on the model's device (so a meta-device model costs nothing). Not counted:
    normalisation, activations, pooling, residual adds, and attention that does not go through an
    ``nn.Linear`` call (``nn.MultiheadAttention``'s packed projections and the attention matmuls), so
    transformer MACs are underestimates.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    macs = 0

    def hook(m: nn.Module, _inputs: tuple[Any, ...], out: Any) -> None:
        nonlocal macs
        if not isinstance(out, torch.Tensor):
            return
        if isinstance(m, nn.Linear):
            macs += (out.numel() // out.shape[0]) * m.in_features
        else:
            macs += _conv_macs(m, out)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, image_size, image_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "buffers": sum(b.numel() for b in model.buffers()),
        "macs": macs,
    }
