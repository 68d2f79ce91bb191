"""Model families: shapes, trainability, cheap counting, build-time validation and the seed architectures."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from cifar_tune.engine.models import MODELS, build_model, check_architecture, model_info, param_count

MODEL_DIR = Path(__file__).resolve().parents[2] / "search_spaces" / "models"

# A small member of every family, so the per-family tests stay fast. A new family must add one here.
SMALL: dict[str, dict[str, Any]] = {
    "mlp": {"family": "mlp", "hidden": [32, 16], "batch_norm": True, "dropout": 0.1},
    "lenet": {"family": "lenet"},
    "vgg": {
        "family": "vgg",
        "blocks": [{"channels": [8, 8]}, {"channels": [16], "pool": "avg", "dropout": 0.1}],
        "head": [32],
        "head_batch_norm": True,
    },
    "resnet": {"family": "resnet", "widths": [8, 16], "blocks": [1, 1]},
    "resnet_bottleneck": {"family": "resnet", "widths": [4, 8], "blocks": [1, 1], "block": "bottleneck"},
    "resnet_maxpool": {"family": "resnet", "widths": [8, 8, 16], "blocks": [1, 1, 1], "shortcut": "maxpool"},
    "torchvision": {"family": "torchvision", "name": "resnet18"},
    # a researcher's own model: the shipped example module, by its path
    "python": {"family": "python", "factory": f"{MODEL_DIR.parent / 'examples' / 'my_nets.py'}:CNN7", "width": 4},
}
CASES = sorted(SMALL)


def test_every_family_has_a_small_case() -> None:
    assert set(MODELS) <= {cfg["family"] for cfg in SMALL.values()}


@pytest.mark.parametrize("family", sorted(MODELS))
def test_builder_signature_contract(family: str) -> None:
    """Runtime arguments positional, hyperparameters keyword-only with defaults and validator-readable hints."""
    builder = MODELS[family]
    params = list(inspect.signature(builder).parameters.values())
    assert [p.name for p in params[:3]] == ["num_classes", "in_channels", "image_size"]
    hints = typing.get_type_hints(builder)
    for name, p in MODELS.hyperparameters(family).items():
        assert p.default is not inspect.Parameter.empty, name
        assert name in hints, name
    assert MODELS.defaults(family)  # every family is buildable from {"family": name} alone


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("case", CASES)
def test_forward_shape_and_finite(case: str, num_classes: int) -> None:
    torch.manual_seed(0)
    in_channels = 1 if case == "lenet" else 3  # grayscale path too
    model = build_model(SMALL[case], num_classes=num_classes, in_channels=in_channels, image_size=32)
    out = model(torch.randn(4, in_channels, 32, 32))
    assert out.shape == (4, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("case", CASES)
def test_three_sgd_steps_reduce_loss(case: str) -> None:
    torch.manual_seed(0)
    model = build_model(SMALL[case], num_classes=10, image_size=32)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(4):  # the 4th forward measures the loss after 3 steps
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("case", CASES)
def test_model_info_and_meta_count(case: str) -> None:
    model = build_model(SMALL[case], num_classes=10, image_size=32)
    was_training = model.training
    info = model_info(model, in_channels=3, image_size=32)
    assert model.training == was_training
    assert info["params"] > 0 and info["macs"] > 0 and info["buffers"] >= 0
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert param_count(SMALL[case], num_classes=10, image_size=32) == info["params"]
    check_architecture(SMALL[case], num_classes=10, image_size=32)


def test_macs_lenet_exact() -> None:
    # conv1 28*28*6*(3*5*5) + conv2 10*10*16*(6*5*5) + fc 400*120 + 120*84 + 84*10
    model = build_model({"family": "lenet"}, num_classes=10)
    assert model_info(model, in_channels=3, image_size=32)["macs"] == 352_800 + 240_000 + 58_920


def test_model_info_on_meta_model() -> None:
    with torch.device("meta"):
        model = build_model({"family": "resnet"}, num_classes=10)
    info = model_info(model, in_channels=3, image_size=32)
    assert info["params"] == 11_173_962 and info["macs"] > 500_000_000


# ---------------------------------------------------------------------------------- seed reports


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((MODEL_DIR / name).read_text())


def test_example_configs_exist_with_seed_header() -> None:
    files = sorted(p.name for p in MODEL_DIR.glob("*.yaml"))
    for expected in [
        "seed001_lenet5.yaml",
        "seed001_convnet.yaml",
        "seed001_mlp.yaml",
        "seed003_bn_cnn.yaml",
        "seed003_cnn_2p7m.yaml",
        "seed004_resnet_4stage.yaml",
        "seed004_resnet_5stage.yaml",
        "resnet18.yaml",
        "torchvision_resnet18.yaml",
    ]:
        assert expected in files
        assert (MODEL_DIR / expected).read_text().startswith("# Seed 00")


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_build(path: Path) -> None:
    check_architecture(yaml.safe_load(path.read_text()), num_classes=100, image_size=32)


@pytest.mark.parametrize(
    ("name", "num_classes", "expected"),
    [
        # seed 004, Table 1
        ("seed004_resnet_4stage.yaml", 10, 4_901_962),
        # seed 004: Table 1 says 4,960,234; the report's final model (same widths plus the max-pool
        # skip, which adds no parameters) says 4,960,874, which is what this architecture has.
        ("seed004_resnet_5stage.yaml", 10, 4_960_874),
        ("resnet18.yaml", 10, 11_173_962),
        ("torchvision_resnet18.yaml", 10, 11_173_962),
        # seed 001, from the printed module lists: conv/fc weights + biases
        ("seed001_lenet5.yaml", 100, 69_656),
        ("seed001_mlp.yaml", 100, 439_268),
        ("seed001_convnet.yaml", 100, 16_905_060),
    ],
)
def test_seed_param_counts(name: str, num_classes: int, expected: int) -> None:
    assert param_count(_load(name), num_classes=num_classes, image_size=32) == expected


def test_seed004_5stage_conv_shortcut_has_same_count() -> None:
    cfg = {**_load("seed004_resnet_5stage.yaml"), "shortcut": "conv"}
    assert param_count(cfg, num_classes=10) == 4_960_874


def test_seed003_stated_count_is_keras_total() -> None:
    """The report's "2,762,660 trainable parameters" is Keras' *total*: the 2,759,332 trainable ones
    (BN gamma/beta included) plus the 3,328 BN moving mean/variance (non-trainable in Keras)."""
    with torch.device("meta"):
        model = build_model(_load("seed003_cnn_2p7m.yaml"), num_classes=100)
    trainable = sum(p.numel() for p in model.parameters())
    moving = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert trainable == 2_759_332
    assert moving == 2 * (64 + 64 + 128 * 4 + 1024)
    assert trainable + moving == 2_762_660


def test_seed003_lt_anh_network_keras_total() -> None:
    """Seed 003 quotes L. T. Anh's 8-conv network at 15,795,556 parameters (again Keras' total)."""
    cfg = {
        "family": "vgg",
        "blocks": [{"channels": [256, 256]}] + [{"channels": [512, 512]}] * 3,
        "dropout": 0.2,
        "head": [1024],
        "head_order": "act-dropout-bn",
        "head_dropout": 0.2,
        "head_batch_norm": True,
    }
    with torch.device("meta"):
        model = build_model(cfg, num_classes=100)
    trainable = sum(p.numel() for p in model.parameters())
    moving = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert (trainable, trainable + moving) == (15_786_340, 15_795_556)


def test_seed003_head_orders() -> None:
    def head_ops(name: str) -> list[str]:
        with torch.device("meta"):
            model = build_model(_load(name), num_classes=100)
        return [type(m).__name__ for m in model.classifier]

    assert head_ops("seed003_bn_cnn.yaml") == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert head_ops("seed003_cnn_2p7m.yaml") == ["Linear", "ReLU", "Dropout", "BatchNorm1d", "Linear"]


def test_seed004_5stage_single_forward() -> None:
    model = build_model(_load("seed004_resnet_5stage.yaml"), num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"family": "vgg", "blocks": [{"channels": [4]}] * 6},
            "blocks: 6 pooling stages reduce 32x32 input to 0x0; at most 5 fit",
        ),
        (
            {"family": "vgg", "blocks": [{"channels": [4]}] * 2 + [{"channels": [4], "pool": "mx"}]},
            "blocks[2].pool: must be one of max, avg, none; got 'mx'",
        ),
        (
            {"family": "vgg", "blocks": [{"chanels": [4]}]},
            "blocks[0]: unknown key 'chanels' (did you mean 'channels'?)",
        ),
        ({"family": "vgg", "blocks": [{"pool": "max"}]}, "blocks[0].channels: missing"),
        ({"family": "vgg", "blocks": []}, "blocks: needs at least one block"),
        ({"family": "vgg", "blocks": [{"channels": [0]}]}, "blocks[0].channels[0]: must be >= 1"),
        ({"family": "vgg", "head_dropout": 1.0}, "head_dropout: must be a number in [0, 1)"),
        ({"family": "vgg", "head_order": "bn-act"}, "head_order: must be one of"),
        (
            {"family": "vgg", "blocks": [{"channels": [4], "kernel_size": 7, "padding": 0}] * 4},
            "blocks[2].kernel_size:",
        ),
        ({"family": "lenet", "kernel_size": 15}, "kernel_size: 15x15 (the conv of channels[1], padding 0)"),
        ({"family": "lenet", "channels": [6, 16, 32, 64]}, "channels: 4 pooling stages"),
        ({"family": "mlp", "activation": "relu6"}, "activation: must be one of relu, leaky_relu"),
        ({"family": "mlp", "hidden": 128}, "hidden: must be a list of integers"),
        (
            {"family": "resnet", "widths": [16, 32], "blocks": [2, 2, 2]},
            "blocks: needs one block count per entry",
        ),
        ({"family": "resnet", "block": "basik"}, "block: must be one of basic, bottleneck"),
        (
            {"family": "torchvision", "name": "resnet19"},
            "name: unknown torchvision classification model 'resnet19'",
        ),
        ({"family": "vgg", "blox": []}, "blox: unknown key for model family 'vgg' (did you mean 'blocks'?)"),
        (
            {"family": "vgt"},
            "family: unknown model family 'vgt' (did you mean 'vgg'?); available: lenet, mlp",
        ),
        ({"depth": 3}, "family: missing; available:"),
    ],
)
def test_invalid_configs_raise_value_error_with_key(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        param_count(cfg, num_classes=10, image_size=32)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["inception_v3", "alexnet"])
def test_check_architecture_catches_forward_failures(name: str) -> None:
    cfg = {"family": "torchvision", "name": name}
    param_count(cfg, num_classes=10)  # builds fine ...
    with pytest.raises(
        ValueError, match=r"family: the 'torchvision' model cannot run on a \[2, 3, 32, 32\] input"
    ):
        check_architecture(cfg, num_classes=10)  # ... but cannot run on 32x32


def test_numpy_scalars_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    cfg = {
        "family": "resnet",
        "widths": [np.int64(8), np.int64(16)],
        "blocks": [1, 1],
        "dropout": np.float64(0.1),
    }
    assert param_count(cfg, num_classes=10) == param_count(
        {**cfg, "widths": [8, 16], "dropout": 0.1}, num_classes=10
    )


# ---------------------------------------------------------------------------------- specifics


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_vgg_block_overrides_and_same_padding() -> None:
    model = build_model(
        {
            "family": "vgg",
            "blocks": [
                {"channels": [4], "kernel_size": 4, "activation": "gelu"},
                {"channels": [8], "pool": "none"},
            ],
            "activation": "elu",
            "batch_norm": False,
            "global_pool": "avg",
            "head": [],
        },
        num_classes=10,
    )
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "GELU", "MaxPool2d", "Conv2d", "ELU"]
    assert model.features[0].kernel_size == (4, 4)  # even kernel, 'same' padding keeps 32x32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_maxpool_shortcut_odd_sizes() -> None:
    cfg = {"family": "resnet", "widths": [4, 4, 8, 8, 8], "blocks": [1] * 5, "shortcut": "maxpool"}
    for size in (28, 27, 32):  # 28 -> 14 -> 7 -> 4 -> 2: ceil-mode pooling must match the strided conv
        check_architecture(cfg, num_classes=10, image_size=size)
    model = build_model(cfg, num_classes=10)
    # equal widths at a stride-2 transition: the skip is the max-pool alone
    assert [type(m).__name__ for m in model.layer4[0].shortcut] == ["MaxPool2d"]


def test_resnet_zero_init_residual() -> None:
    model = build_model(
        {"family": "resnet", "widths": [4, 8], "blocks": [1, 1], "zero_init_residual": True}, num_classes=10
    )
    assert torch.count_nonzero(model.layer1[0].bn2.weight) == 0


def test_torchvision_adaptations() -> None:
    model = build_model({"family": "torchvision", "name": "resnet18"}, num_classes=7, in_channels=1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.fc.out_features == 7
    plain = build_model({"family": "torchvision", "name": "resnet18", "small_input": False}, num_classes=7)
    assert plain.conv1.kernel_size == (7, 7)
    check_architecture({"family": "torchvision", "name": "mobilenet_v3_small"}, num_classes=10, in_channels=1)
    check_architecture({"family": "torchvision", "name": "vit_b_16"}, num_classes=10, image_size=32)


def test_torchvision_regnet_meta_count_matches_real() -> None:
    """RegNet computes its widths with tensors, which the meta device cannot; param_count must still work."""
    cfg = {"family": "torchvision", "name": "regnet_x_400mf"}
    real = build_model(cfg, num_classes=10)
    assert param_count(cfg, num_classes=10) == sum(p.numel() for p in real.parameters())
    assert torch.isfinite(real.eval()(torch.randn(1, 3, 32, 32))).all()
