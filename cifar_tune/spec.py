"""The search spec: frozen dataclasses mirroring the YAML file (parsing and validation below)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from cifar_tune.errors import ErrorList, SpecError, UserError
from cifar_tune.registry import did_you_mean
from cifar_tune.space import DIST_ARITY, Dist, alternatives, iter_dists, parse_tree, to_plain_spec


def _check(pred: Any, msg: str) -> dict[str, Any]:
    return {"check": (pred, msg)}


@dataclass(frozen=True)
class SyntheticSpec:
    """A learnable, deterministic data set: class-dependent colour blobs/gratings plus noise."""

    num_train: int = field(default=5000, metadata=_check(lambda v: v >= 2, "must be >= 2"))
    num_test: int = field(default=1000, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    num_classes: int = field(default=10, metadata=_check(lambda v: v >= 2, "must be >= 2"))
    image_size: int = field(default=32, metadata=_check(lambda v: v >= 8, "must be >= 8"))
    channels: int = field(default=3, metadata=_check(lambda v: v in (1, 3), "must be 1 or 3"))
    noise: float = field(default=0.35, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | synthetic | npz
    root: str | None = None  # data root; None -> $CIFAR_TUNE_DATA or ~/.cache/cifar-tune
    path: str | None = None  # the .npz file, for dataset: npz
    val_fraction: float = field(default=0.2, metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    # use only this many training images (stratified), for quick runs
    subset: int | None = field(default=None, metadata=_check(lambda v: v >= 2, "must be >= 2"))
    split_seed: int = 0
    download: bool = True
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    # keep only these classes (by name), relabelled 0..k-1 in this order; null: all
    classes: list[str] | None = field(
        default=None, metadata=_check(lambda v: len(v) >= 2 and len(set(v)) == len(v),
                                      "must list at least 2 distinct class names"))



@dataclass(frozen=True)
class SchedulerSpec:
    name: Literal["asha", "fifo", "median", "hyperband", "pbt"] = "asha"
    max_epochs: int = field(default=10, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    grace_period: int = field(default=1, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    reduction_factor: float = field(default=2.0, metadata=_check(lambda v: v > 1, "must be > 1"))
    brackets: int = field(default=1, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    # pbt (Ray's PopulationBasedTraining): every perturbation_interval epochs a trial in the bottom
    # quantile_fraction copies the checkpoint of one in the top and perturbs (x0.8 / x1.2, or a
    # neighbouring choice) or, with resample_probability, redraws the keys in ``mutations``
    perturbation_interval: int = field(default=2, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    quantile_fraction: float = field(default=0.25, metadata=_check(lambda v: 0 < v <= 0.5, "must be in (0, 0.5]"))
    resample_probability: float = field(default=0.25, metadata=_check(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    synch: bool = False  # true: all trials wait at each interval (no trial skips epochs by copying a faster one)
    mutations: dict[str, Any] = field(default_factory=dict)  # a tree like space: {optimizer: {lr: {loguniform: [..]}}}


@dataclass(frozen=True)
class CheckpointSpec:
    """Trial checkpoints through Ray Tune; needed by hyperband (pause) and pbt (exploit)."""

    every_epochs: int = field(default=1, metadata=_check(lambda v: v >= 0, "must be >= 0 (0: no checkpoints)"))
    keep: int | None = field(default=None, metadata=_check(lambda v: v >= 1, "must be >= 1"))  # None: 2, pbt 4

    def resolved_keep(self, scheduler: str) -> int:
        # PBT copies another trial's latest checkpoint: keep a few so it is not deleted before the copy
        return self.keep or (4 if scheduler == "pbt" else 2)


@dataclass(frozen=True)
class ResourcesSpec:
    cpus_per_trial: float = field(default=1.0, metadata=_check(lambda v: v > 0, "must be > 0"))
    # fractional GPUs pack several small trials on one device (0.25 -> 4 trials per GPU); a trial trains
    # on one device (no data-parallel trials), so more than 1 would reserve GPUs it never uses
    gpus_per_trial: float = field(
        default=0.0,
        metadata=_check(lambda v: 0 <= v <= 1, "must be between 0 and 1 (a trial trains on one GPU; "
                        "a fraction packs several trials per GPU)"),
    )
    # CUDA MPS for packed trials (their kernels run at once instead of taking turns): auto starts the
    # daemon for a local Ray instance when trials share a GPU and nvidia-cuda-mps-control is there
    mps: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True)
class SearchSpec:
    metric: Literal["val_acc", "val_loss", "val_top5"] = "val_acc"
    mode: Literal["max", "min"] | None = None  # None: max for accuracies, min for the loss
    num_samples: int = field(default=8, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    max_concurrent: int | None = field(default=None, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    algorithm: Literal["random", "grid", "optuna"] = "random"
    seed: int = 0
    max_failures: int = field(default=0, metadata=_check(lambda v: v >= 0, "must be >= 0"))
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "val_loss" else "max")


@dataclass(frozen=True)
class ConstraintsSpec:
    max_params: int | None = field(default=None, metadata=_check(lambda v: v >= 1, "must be >= 1"))


@dataclass(frozen=True)
class RetrainSpec:
    top: int = field(default=3, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    epochs: int = field(default=100, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    seeds: int = field(default=1, metadata=_check(lambda v: v >= 1, "must be >= 1"))
    rank_by: Literal["best", "last"] = "best"


@dataclass(frozen=True)
class MlflowSpec:
    # a tracking URI (http(s)://server, sqlite:///file.db, ...) or a local directory (relative to the
    # directory the command runs in; becomes <dir>/mlflow.db); null: MLflow off
    uri: str | None = None
    experiment: str | None = None  # MLflow experiment name; null: the search's name


@dataclass(frozen=True)
class WandbSpec:
    project: str | None = None  # null: W&B off
    mode: Literal["online", "offline", "disabled"] = "online"
    entity: str | None = None
    dir: str | None = None  # where W&B writes its run files; null: the experiment directory


@dataclass(frozen=True)
class TrackingSpec:
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)
    wandb: WandbSpec = field(default_factory=WandbSpec)


@dataclass(frozen=True)
class Spec:
    name: str
    data: DataSpec
    search: SearchSpec
    space: dict[str, Any]  # a tree of plain values and ``space.Dist`` nodes; see cifar_tune.space
    constraints: ConstraintsSpec
    retrain: RetrainSpec
    source: str = "<spec>"
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (defaults filled in) in YAML form."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("space", "source")}
        out = {k: asdict(v) if is_dataclass(v) else v for k, v in out.items()}
        out["space"] = to_plain_spec(self.space)
        return out


# ------------------------------------------------------------------------------------------ loading


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` plus YAML 1.2 floats: PyYAML reads ``1e-4`` (no dot) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = e.problem or str(e)
        if "could not determine a constructor" in problem:
            problem = f"unsafe or unknown YAML tag rejected ({problem.split('tag ')[-1]})"
        raise UserError(f"{where}: YAML error: {problem}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{source}: YAML error: {e}") from None


def read_spec_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such spec file")
    raw = load_yaml(p.read_text(), str(p))
    if not isinstance(raw, dict):
        raise UserError(f"{p}: a spec must be a YAML mapping with keys name, data, search, space, ...")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set key.path=value`` (value parsed as YAML; ``a.b[1].c`` indexes lists)."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key.path=value")
        value = load_yaml(text, f"--set {key}")
        parts = re.findall(r"[^.\[\]]+|\[\d+\]", key.strip())
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part.startswith("["):
                idx = int(part[1:-1])
                if not isinstance(node, list) or idx >= len(node):
                    raise UserError(f"--set {key}: {''.join(parts[:i]) or 'value'} has no item {part}")
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            else:
                if not isinstance(node, dict):
                    raise UserError(f"--set {key}: cannot set '{part}' inside a non-mapping value")
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
    return out


# --------------------------------------------------------------------------------------- sections

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
TOP_KEYS = ("name", "data", "search", "space", "constraints", "retrain", "tracking")
SPACE_KEYS = ("model", "optimizer", "schedule", "augment", "train")
SPACE_DEFAULTS: dict[str, Any] = {
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
    "schedule": {"name": "cosine"},
    "augment": {"hflip": True, "crop": {"padding": 4}},
    "train": {},
}


def check_name(name: Any, what: str = "name") -> str | None:
    """Experiment names become directories: no separators, no '..', no absolute paths."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        return (
            f"{what}: must be 1-100 characters of letters, digits, '_', '-', '.' starting with a letter "
            f"or digit (it names a directory), got {name!r}"
        )
    return None


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(ann))
    if origin in (Union, type(int | None)):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(ann))
    if origin is list:
        (inner,) = get_args(ann) or (Any,)
        return f"list of {_type_name(inner)}"
    return getattr(ann, "__name__", str(ann))


def type_problem(value: Any, ann: Any) -> str | None:
    """Why a constant does not fit an annotation, or None. Unknown annotations accept anything."""
    origin = get_origin(ann)
    if ann is Any or ann is None:
        return None
    if origin is Literal:
        return None if value in get_args(ann) else f"must be one of {_type_name(ann)}, got {value!r}"
    if origin in (Union, type(int | None)):
        if all(type_problem(value, a) for a in get_args(ann)):
            return f"must be {_type_name(ann)}, got {value!r}"
        return None
    if ann is type(None):
        return None if value is None else "must be null"
    if ann is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if ann is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    if ann is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if ann is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if origin is list or ann is list:
        if not isinstance(value, list):
            return f"must be a list, got {value!r}"
        inner = (get_args(ann) or (Any,))[0]
        for i, v in enumerate(value):
            if not _contains_dist(v) and (p := type_problem(v, inner)):
                return f"[{i}] {p}"
        return None
    if origin is dict or ann is dict:
        return None if isinstance(value, dict) else f"must be a mapping, got {value!r}"
    return None


def _contains_dist(tree: Any) -> bool:
    return any(True for _ in iter_dists(tree))


def _dist_problem(dist: Dist, ann: Any) -> str | None:
    """Can this distribution produce values of the annotated type?"""
    if dist.kind in ("choice", "grid"):
        return None  # options are checked one by one
    kind_int = dist.kind in ("randint", "lograndint") or (
        dist.kind in ("quniform", "qloguniform") and all(float(a).is_integer() for a in dist.args)
    )
    sample = 1 if kind_int else 0.5
    if type_problem(sample, ann) is None:
        return None
    return f"{dist.kind} produces {'integers' if kind_int else 'numbers'}, but the value {type_problem(sample, ann).split(',')[0]}"


def check_value(value: Any, ann: Any, path: str, errors: ErrorList) -> None:
    """Type-check a constant or every option/draw of a distribution against an annotation."""
    if isinstance(value, Dist):
        if value.kind in ("choice", "grid"):
            for i, opt in enumerate(value.args):
                check_value(opt, ann, f"{path}.{value.kind}[{i}]", errors)
        elif p := _dist_problem(value, ann):
            errors.add(f"{path}.{value.kind}", p)
        return
    if _contains_dist(value):
        return  # nested distributions: left to the build check on samples
    if p := type_problem(value, ann):
        errors.add(path, p)


def parse_dataclass(cls: type, value: Any, path: str, errors: ErrorList) -> Any:
    """A mapping -> a frozen dataclass, reporting unknown keys, wrong types and failed checks."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        errors.add(path, f"must be a mapping, got {value!r}")
        return cls()
    hints = get_type_hints(cls)
    flds = {f.name: f for f in fields(cls)}
    for key in value:
        if key not in flds:
            errors.add(f"{path}.{key}", f"unknown key{did_you_mean(str(key), list(flds))}; allowed: {', '.join(flds)}")
    kwargs: dict[str, Any] = {}
    for name, f in flds.items():
        if name not in value:
            continue
        v, ann, p = value[name], hints[name], f"{path}.{name}"
        if is_dataclass(ann):
            kwargs[name] = parse_dataclass(ann, v, p, errors)
            continue
        if isinstance(v, Mapping) and len(v) == 1 and next(iter(v)) in DIST_ARITY:
            errors.add(p, "distributions are only allowed under 'space'")
            continue
        if ann is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if problem := type_problem(v, ann):
            errors.add(p, problem)
            continue
        if v is not None and (chk := f.metadata.get("check")) and not chk[0](v):
            errors.add(p, f"{chk[1]}, got {v}")
            continue
        kwargs[name] = v
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        errors.add(path, str(e))
        return None


def _required(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]


# ------------------------------------------------------------------------------------ space checks

_PATH_PREFIX = re.compile(r"^[A-Za-z_][\w.\[\]]*: ")
BUILD_CHECK_DRAWS = 12  # samples per alternative checked by actually building them (on the meta device)


def _add_build_error(errors: ErrorList, path: str, message: str) -> None:
    """Builders raise ``ValueError('<key path>: <message>')``; anchor it under the config's path."""
    message = message.strip().splitlines()[0] if message.strip() else "invalid"
    if _PATH_PREFIX.match(message):
        errors.add(f"{path}.{message.split(': ', 1)[0]}", message.split(": ", 1)[1])
    else:
        errors.add(path, message)


def _check_registry_section(
    tree: Any,
    path: str,
    *,
    key: str,
    registry: Any,
    extra_keys: Mapping[str, Any],
    build: Any,
    errors: ErrorList,
    seed: int,
) -> None:
    import random

    from cifar_tune.space import sample_tree

    for alt_path, alt in alternatives(tree, path):
        if not isinstance(alt, dict):
            errors.add(alt_path, f"must be a mapping with '{key}' (one of {', '.join(sorted(registry))}), got {alt!r}")
            continue
        name = alt.get(key)
        if key not in alt:
            errors.add(alt_path, f"missing '{key}' (one of {', '.join(sorted(registry))})")
            continue
        if isinstance(name, Dist):
            errors.add(f"{alt_path}.{key}", f"must be a constant; to choose among {registry.kind}s use a choice of mappings, each with its own '{key}'")
            continue
        if name not in registry:
            errors.add(f"{alt_path}.{key}", registry.unknown_message(name))
            continue
        hps = registry.hyperparameters(name)
        hints = get_type_hints(registry[name])
        accepted = {**{k: hints.get(k, Any) for k in hps}, **extra_keys}
        n_before = len(errors.items)
        for k, v in alt.items():
            if k == key:
                continue
            if k not in accepted:
                errors.add(
                    f"{alt_path}.{k}",
                    f"not a hyperparameter of {registry.kind} '{name}'{did_you_mean(k, list(accepted))}; accepted: {', '.join(accepted)}",
                )
                continue
            check_value(v, accepted[k], f"{alt_path}.{k}", errors)
        if len(errors.items) > n_before:
            continue  # building would only repeat these errors
        draws = BUILD_CHECK_DRAWS if _contains_dist(alt) else 1
        for i in range(draws):
            cfg = sample_tree(alt, random.Random(f"check:{seed}:{i}"))
            try:
                build(cfg)
            except (ValueError, TypeError, KeyError) as e:
                _add_build_error(errors, alt_path, str(e.args[0]) if e.args else repr(e))
                break


def _check_augment(tree: Any, path: str, errors: ErrorList, build: Any, seed: int) -> None:
    import random

    from cifar_tune.augment import AUGMENTS
    from cifar_tune.space import sample_tree

    for alt_path, alt in alternatives(tree, path):
        if not isinstance(alt, dict):
            errors.add(alt_path, f"must be a mapping of augmentation name -> settings, got {alt!r}")
            continue
        n_before = len(errors.items)
        for name, setting in alt.items():
            p = f"{alt_path}.{name}"
            if name not in AUGMENTS:
                errors.add(p, AUGMENTS.unknown_message(name))
                continue
            hints = get_type_hints(AUGMENTS[name])
            hps = {k: hints.get(k, Any) for k in AUGMENTS.hyperparameters(name)}
            for s_path, s in alternatives(setting, p):
                if s is None or isinstance(s, bool):
                    continue
                if not isinstance(s, dict):
                    errors.add(s_path, f"must be true, false, null or a mapping of {', '.join(hps) or 'settings'}, got {s!r}")
                    continue
                for k, v in s.items():
                    if k not in hps:
                        errors.add(
                            f"{s_path}.{k}",
                            f"not a setting of augmentation '{name}'{did_you_mean(k, list(hps))}; accepted: {', '.join(hps)}",
                        )
                    else:
                        check_value(v, hps[k], f"{s_path}.{k}", errors)
        if len(errors.items) > n_before:
            continue
        for i in range(BUILD_CHECK_DRAWS if _contains_dist(alt) else 1):
            cfg = sample_tree(alt, random.Random(f"check:{seed}:{i}"))
            try:
                build(cfg)
            except (ValueError, TypeError, KeyError) as e:
                # a builder names only its own key ("magnitude: ..."): find the augmentation it belongs to
                where = next((f"{alt_path}.{name}" for name in cfg if not _builds(build, {name: cfg[name]})), alt_path)
                _add_build_error(errors, where, str(e.args[0]) if e.args else repr(e))
                break


def _builds(build: Any, cfg: dict[str, Any]) -> bool:
    try:
        build(cfg)
    except (ValueError, TypeError, KeyError):
        return False
    return True


def _check_train(tree: Any, path: str, errors: ErrorList) -> None:
    from cifar_tune.train import TrainOptions

    hints = get_type_hints(TrainOptions)
    limits = {
        "batch_size": (lambda v: v >= 1, "must be >= 1"),
        "eval_batch_size": (lambda v: v >= 1, "must be >= 1"),
        "label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
        "grad_clip_norm": (lambda v: v is None or v > 0, "must be > 0 (or null for no clipping)"),
    }
    for alt_path, alt in alternatives(tree, path):
        if not isinstance(alt, dict):
            errors.add(alt_path, f"must be a mapping, got {alt!r}")
            continue
        for k, v in alt.items():
            p = f"{alt_path}.{k}"
            if k not in hints:
                errors.add(p, f"unknown key{did_you_mean(k, list(hints))}; allowed: {', '.join(hints)}")
                continue
            check_value(v, hints[k], p, errors)
            for vp, const in _constants(v, p):
                if k in limits and type_problem(const, hints[k]) is None and not limits[k][0](const):
                    errors.add(vp, f"{limits[k][1]}, got {const}")
            for dp, d in iter_dists(v, p):
                if k in limits and d.kind not in ("choice", "grid", "normal") and not limits[k][0](d.args[0]):
                    errors.add(dp + f".{d.kind}", f"low {limits[k][1][5:]}, got {d.args[0]}")


def _constants(v: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(v, Dist):
        if v.kind in ("choice", "grid"):
            return [c for i, o in enumerate(v.args) for c in _constants(o, f"{path}.{v.kind}[{i}]")]
        return []
    return [(path, v)]


def check_space(space: dict[str, Any], info: Any, algorithm: str, seed: int, errors: ErrorList) -> None:
    import torch

    from cifar_tune.augment import build_augment
    from cifar_tune.models import MODELS, check_architecture
    from cifar_tune.optim import OPTIMIZERS, SCHEDULE_COMMON_KEYS, SCHEDULES, build_optimizer, build_schedule

    for key in space:
        if key not in SPACE_KEYS:
            errors.add(f"space.{key}", f"unknown key{did_you_mean(key, list(SPACE_KEYS))}; allowed: {', '.join(SPACE_KEYS)}")
    if "model" not in space:
        errors.add("space", "missing 'model' (a mapping with 'family', or a choice of them)")
    dummy = [torch.nn.Parameter(torch.zeros(2))]
    if "model" in space and info is not None:
        from cifar_tune.transfer import TRANSFER_HINTS, check_config

        def check_model(c: dict[str, Any]) -> None:
            shape = {"num_classes": info.num_classes, "in_channels": info.channels, "image_size": info.image_size}
            check_architecture(c, **shape)
            check_config(c, **shape)  # init file exists, loads, fits; freeze/lr_mult parts exist

        _check_registry_section(
            space["model"], "space.model", key="family", registry=MODELS, extra_keys=TRANSFER_HINTS, errors=errors,
            seed=seed, build=check_model,
        )
    if "optimizer" in space:
        _check_registry_section(
            space["optimizer"], "space.optimizer", key="name", registry=OPTIMIZERS, extra_keys={},
            build=lambda c: build_optimizer(dummy, c), errors=errors, seed=seed,
        )
    if "schedule" in space:
        _check_registry_section(
            space["schedule"], "space.schedule", key="name", registry=SCHEDULES, extra_keys=SCHEDULE_COMMON_KEYS,
            build=lambda c: build_schedule(torch.optim.SGD(dummy, lr=0.1), c, epochs=10, steps_per_epoch=10),
            errors=errors, seed=seed,
        )
    if "augment" in space and info is not None:
        _check_augment(
            space["augment"], "space.augment", errors, seed=seed,
            build=lambda c: build_augment(c, mean=info.mean, std=info.std, num_classes=info.num_classes),
        )
    if "train" in space:
        _check_train(space["train"], "space.train", errors)
    for path, d in iter_dists(space, "space"):
        if algorithm == "grid" and d.kind not in ("choice", "grid"):
            errors.add(f"{path}.{d.kind}", "search.algorithm 'grid' can only enumerate choice/grid values")
        if algorithm != "grid" and d.kind == "choice":
            for i, opt in enumerate(d.args):
                for gp, g in iter_dists(opt, f"{path}.choice[{i}]"):
                    if g.kind == "grid":
                        errors.add(f"{gp}.grid", "a grid inside a choice option needs search.algorithm: grid")


# ------------------------------------------------------------------------------------------ parsing


def parse_spec(raw: Any, source: str = "<spec>", *, check_budget: bool = True) -> Spec:
    """Validate a loaded YAML document and build the Spec; raises SpecError listing every problem."""
    errors = ErrorList()
    if not isinstance(raw, Mapping):
        raise SpecError(f"{source}: a spec must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            errors.add(str(key), f"unknown top-level key{did_you_mean(str(key), list(TOP_KEYS))}; allowed: {', '.join(TOP_KEYS)}")
    name = raw.get("name", Path(source).stem if source != "<spec>" else None)
    if problem := check_name(name):
        errors.add("", problem)
    data = parse_dataclass(DataSpec, raw.get("data"), "data", errors)
    if data is not None:  # Ray runs trials in other working directories: make paths absolute now
        data = replace(
            data,
            root=str(Path(data.root).expanduser().resolve()) if data.root else None,
            path=str(Path(data.path).expanduser().resolve()) if data.path else None,
        )
    search = parse_dataclass(SearchSpec, raw.get("search"), "search", errors)
    constraints = parse_dataclass(ConstraintsSpec, raw.get("constraints"), "constraints", errors)
    retrain = parse_dataclass(RetrainSpec, raw.get("retrain"), "retrain", errors)
    tracking = parse_dataclass(TrackingSpec, raw.get("tracking"), "tracking", errors)
    sched = search.scheduler
    if sched.grace_period > sched.max_epochs:
        errors.add("search.scheduler.grace_period", f"must be <= max_epochs ({sched.max_epochs}), got {sched.grace_period}")
    _check_checkpointing(search, errors)
    res = search.resources
    if res.mps == "on" and not 0 < res.gpus_per_trial < 1:
        errors.add("search.resources.mps", f"on needs trials that share a GPU (0 < gpus_per_trial < 1), "
                   f"got gpus_per_trial {res.gpus_per_trial:g}")

    info = _dataset_info(data, errors)
    if info is not None and data.subset is not None:  # counts alone (no labels read): see data.check_split
        from cifar_tune.data import split_problem

        if problem := split_problem(data, data.subset, None, None, info.classes):
            key, _, message = problem.partition(": ")
            errors.add(key, message)
    space_raw = raw.get("space")
    if not isinstance(space_raw, Mapping):
        errors.add("space", f"must be a mapping with keys {', '.join(SPACE_KEYS)}, got {space_raw!r}")
        space_raw = {}
    if "model" in space_raw:  # trials run in other working directories: weight files become absolute
        from cifar_tune.transfer import absolute_checkpoints

        space_raw = {**space_raw, "model": absolute_checkpoints(space_raw["model"])}  # like data.root: vs cwd
    space = {k: parse_tree(v, f"space.{k}", errors) for k, v in space_raw.items()}
    if not errors:
        check_space(space, info, search.algorithm, search.seed, errors)
    if not errors and sched.mutations:
        check_mutations(sched.mutations, space, info, errors)
    if not errors:
        _check_concurrency(search, space, errors)
    merged = {**SPACE_DEFAULTS, **space}
    full_space = {k: merged[k] for k in SPACE_KEYS if k in merged}  # always in the documented order
    spec = Spec(
        name=str(name), data=data, search=search, space=full_space,
        constraints=constraints, retrain=retrain, source=source, tracking=tracking,
    )
    if not errors and check_budget and constraints.max_params is not None and info is not None:
        _check_budget(spec, info, errors)
    errors.raise_if_any()
    return spec


def _check_checkpointing(search: SearchSpec, errors: ErrorList) -> None:
    sched, every = search.scheduler, search.checkpoint.every_epochs
    if sched.name == "hyperband" and every != 1:
        errors.add("search.checkpoint.every_epochs", f"hyperband pauses trials at any epoch and continues them from a checkpoint: must be 1, got {every}")
    if sched.name == "pbt":
        if every == 0 or sched.perturbation_interval % every:
            errors.add("search.checkpoint.every_epochs", f"pbt copies checkpoints every perturbation_interval ({sched.perturbation_interval}) epochs: must divide it, got {every}")
        if search.algorithm == "optuna":
            errors.add("search.algorithm", "pbt evolves its own population; use algorithm random or grid (Ray Tune allows no search algorithm with PBT)")
        if not sched.mutations:
            errors.add("search.scheduler.mutations", "pbt needs the keys it may change, e.g. {optimizer: {lr: {loguniform: [1e-4, 0.1]}}}")
    elif sched.mutations:
        errors.add("search.scheduler.mutations", f"only used by scheduler 'pbt', not '{sched.name}'")


def _check_concurrency(search: SearchSpec, space: dict[str, Any], errors: ErrorList) -> None:
    """Ray Tune counts a paused trial against ``max_concurrent_trials``: schedulers that pause trials
    until others catch up would wait for trials that can never start."""
    sched, limit = search.scheduler, search.max_concurrent
    if limit is None:
        return
    if sched.name == "hyperband":
        errors.add("search.max_concurrent", "hyperband pauses each trial at a milestone until the rest of its bracket gets there, "
                   "and a paused trial keeps its slot, so the brackets would never halve: leave it unset (the resources "
                   "per trial then set how many run at once)")
    elif sched.name == "pbt" and sched.synch:
        from cifar_tune.space import Sampler

        population = search.num_samples * Sampler(space, seed=0, enumerate_choices=search.algorithm == "grid").grid_size
        if limit < population:
            errors.add("search.max_concurrent", f"synchronous pbt pauses every trial at each interval until all {population} "
                       f"have reached it, and a paused trial keeps its slot: must be at least {population} (or unset), got {limit}")


# Which keys PBT may change in a running trial: not the model (the weights would not fit), no
# registry names (a different optimizer or augmentation), no train keys that reshape the run.
MUTABLE_TRAIN_KEYS = ("label_smoothing", "grad_clip_norm")


def mutation_leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """``{optimizer: {lr: D}}`` -> ``[("optimizer.lr", D)]``: the leaves are distributions."""
    if isinstance(tree, Mapping) and not (len(tree) == 1 and next(iter(tree)) in DIST_ARITY):
        return [leaf for k, v in tree.items() for leaf in mutation_leaves(v, f"{path}.{k}" if path else str(k))]
    return [(path, tree)]


def parse_mutations(raw: Mapping[str, Any]) -> dict[str, Dist]:
    """The validated ``mutations`` tree as ``{"optimizer.lr": Dist}``."""
    errors = ErrorList()
    out = {p: parse_tree(v, p, errors) for p, v in mutation_leaves(raw)}
    errors.raise_if_any()
    return out


def check_mutations(raw: Mapping[str, Any], space: dict[str, Any], info: Any, errors: ErrorList) -> None:
    """Every mutated key must exist, with a constant or distribution, in every option the space can
    sample, be a hyperparameter PBT can change mid-run, and take every value PBT can give it: the ends of
    its range (perturbed values are clipped to them), alone and together with the other mutated keys."""
    import itertools
    import random

    from cifar_tune.augment import AUGMENTS
    from cifar_tune.optim import OPTIMIZERS, SCHEDULE_COMMON_KEYS, SCHEDULES
    from cifar_tune.space import clip_extremes, sample_tree
    from cifar_tune.train import TrainOptions

    base = "search.scheduler.mutations"
    checked: dict[str, list[tuple[list[str], Dist]]] = {}  # section -> mutated (keys, dist) that passed
    for path, value in mutation_leaves(raw):
        where = f"{base}.{path}"
        dist = parse_tree(value, where, errors)
        if dist is None:
            continue
        if not isinstance(dist, Dist) or dist.kind == "grid":
            errors.add(where, f"must be a distribution (choice, uniform, loguniform, ...), got {to_plain_spec(dist)!r}")
            continue
        if dist.kind == "normal":
            errors.add(where, "normal is unbounded: PBT scales the value by 0.8 or 1.2 with nothing to clip it; use uniform or loguniform over the valid range")
            continue
        section, _, rest = path.partition(".")
        keys = rest.split(".") if rest else []
        if section not in ("optimizer", "schedule", "augment", "train"):
            why = "the model cannot change during a trial (its weights would not fit)" if section == "model" else f"unknown section{did_you_mean(section, list(SPACE_KEYS))}"
            errors.add(where, f"{why}; mutable: optimizer, schedule, augment and train.{'/'.join(MUTABLE_TRAIN_KEYS)} hyperparameters")
            continue
        if not keys or keys[-1] in ("name", "family") or (section == "train" and keys != [keys[0]]) or (section == "augment" and len(keys) != 2):
            errors.add(where, "must name one hyperparameter, e.g. optimizer.lr or augment.color_jitter.brightness (not a name)")
            continue
        if section == "train" and keys[0] not in MUTABLE_TRAIN_KEYS:
            errors.add(where, f"train.{keys[0]} cannot change during a trial; mutable: {', '.join('train.' + k for k in MUTABLE_TRAIN_KEYS)}")
            continue
        n_before = len(errors.items)
        for alt_path, alt in alternatives(space.get(section, SPACE_DEFAULTS.get(section)), f"space.{section}"):
            node = alt
            for k in keys[:-1]:
                node = node.get(k) if isinstance(node, dict) else None
            if not isinstance(node, dict) or keys[-1] not in node:
                errors.add(where, f"the sampled config has no {path} in {alt_path} (add it there, as a constant or a distribution)")
                break
            if section == "optimizer":
                hints = get_type_hints(OPTIMIZERS[alt["name"]])
            elif section == "schedule":
                hints = {**get_type_hints(SCHEDULES[alt["name"]]), **SCHEDULE_COMMON_KEYS}
            elif section == "augment":
                hints = get_type_hints(AUGMENTS[keys[0]])
            else:
                hints = get_type_hints(TrainOptions)
            check_value(dist, hints.get(keys[-1], Any), where, errors)
            if len(errors.items) > n_before:
                break
            for i in range(BUILD_CHECK_DRAWS):  # values from inside the range
                value = sample_tree(dist, random.Random(f"mutation:{path}:{i}"))
                if msg := _mutated_build_error(section, alt, {tuple(keys): value}, info, i):
                    errors.add(where, f"a value it can produce is invalid in {alt_path}: {msg}")
                    break
            else:
                for value in clip_extremes(dist) or []:  # and the ends, which clipping reaches
                    if msg := next(filter(None, (_mutated_build_error(section, alt, {tuple(keys): value}, info, i)
                                                 for i in range(BUILD_CHECK_DRAWS))), None):
                        errors.add(where, f"can reach {keys[-1]}={value!r} (PBT clips perturbed values to the range's ends), invalid in {alt_path}: {msg}")
                        break
            if len(errors.items) > n_before:
                break
        if len(errors.items) == n_before:
            checked.setdefault(section, []).append((keys, dist))
    # An exploit perturbs every mutated key at once: the ends must also work together (nesterov with
    # momentum's lower end, ...). The product of the ends is small: a few keys with two ends each.
    for section, mutated in checked.items():
        if len(mutated) < 2:
            continue
        for alt_path, alt in alternatives(space.get(section, SPACE_DEFAULTS.get(section)), f"space.{section}"):
            ends = [[(tuple(keys), v) for v in clip_extremes(dist) or []] for keys, dist in mutated]
            for combo in itertools.islice(itertools.product(*ends), MAX_JOINT_CHECKS):
                if msg := _mutated_build_error(section, alt, dict(combo), info, 0):
                    values = ", ".join(f"{section}.{'.'.join(k)}={v!r}" for k, v in combo)
                    errors.add(base, f"together, {values} (ends of their ranges) are invalid in {alt_path}: {msg}")
                    break


MAX_JOINT_CHECKS = 256  # combinations of mutated keys' range ends built per space alternative


def _mutated_build_error(section: str, alt: Any, values: Mapping[tuple[str, ...], Any], info: Any, draw: int) -> str | None:
    """Build one sample of a space alternative with ``values`` set at their key paths; the first line of
    the builder's complaint, or None when it builds."""
    import random

    import torch

    from cifar_tune.augment import build_augment
    from cifar_tune.optim import build_optimizer, build_schedule
    from cifar_tune.space import sample_tree

    cfg = sample_tree(alt, random.Random(f"mutation:{draw}"))
    for keys, value in values.items():
        target = cfg
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    try:
        if section == "optimizer":
            build_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
        elif section == "schedule":
            build_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), cfg, epochs=10, steps_per_epoch=10)
        elif section == "augment" and info is not None:
            build_augment(cfg, mean=info.mean, std=info.std, num_classes=info.num_classes)
        elif section == "train":
            _check_train(cfg, "space.train", (errs := ErrorList()))
            if errs:
                raise ValueError(errs.items[0].split(": ", 1)[-1])
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e.args[0]) if e.args else repr(e)
        return msg.splitlines()[0]
    return None


def _dataset_info(data: DataSpec, errors: ErrorList) -> Any:
    from cifar_tune import data as data_mod

    if data.dataset not in data_mod.DATASETS:
        errors.add("data.dataset", data_mod.DATASETS.unknown_message(data.dataset))
        return None
    if data.dataset == "npz" and not data.path:
        errors.add("data.path", "required for dataset 'npz' (a .npz file with x_train, y_train)")
        return None
    try:
        return data_mod.dataset_info(data)
    except (data_mod.DataError, OSError) as e:
        where, _, message = str(e).partition(": ")
        if where == "data.classes":
            errors.add(where, message)
        else:
            errors.add("data.path" if data.dataset == "npz" else "data", str(e))
        return None


def _check_budget(spec: Spec, info: Any, errors: ErrorList, draws: int = 200) -> None:
    """A max_params no sampled model can meet is an error now, not 60 failed trials later."""
    import random

    from cifar_tune.models import param_count
    from cifar_tune.space import sample_tree

    counts = []
    for i in range(draws):
        cfg = sample_tree(spec.space["model"], random.Random(f"budget:{i}"))
        counts.append(param_count(cfg, num_classes=info.num_classes, in_channels=info.channels, image_size=info.image_size))
        if counts[-1] <= spec.constraints.max_params:
            return
    errors.add(
        "constraints.max_params",
        f"no model fits {spec.constraints.max_params:,} parameters (smallest of {draws} samples: {min(counts):,})",
    )


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Spec:
    raw = read_spec_file(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_spec(raw, str(path))
