"""The search spec: frozen dataclasses mirroring the YAML file (parsed and validated by ``spec.parse``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

from cifar_tune.errors import ErrorList
from cifar_tune.registry import did_you_mean
from cifar_tune.spec.fields import parse_dataclass
from cifar_tune.spec.space import to_plain_spec


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
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | synthetic | npz | imagefolder
    root: str | None = None  # data root; None -> $CIFAR_TUNE_DATA or ~/.cache/cifar-tune
    path: str | None = None  # the .npz file (dataset npz), the folder with train/<class>/ (imagefolder)
    # imagefolder: images are resized to image_size x image_size; null: 32
    image_size: int | None = field(default=None, metadata=_check(lambda v: v >= 8, "must be >= 8"))
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
    # mo_asha: ASHA whose rungs promote by non-dominated sorting and crowding over search.objectives
    name: Literal["asha", "mo_asha", "fifo", "median", "hyperband", "pbt"] = "asha"
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


# What a search can optimise: the validation metrics of each epoch, and what a trial costs (constant
# per trial but train_time_s, the training seconds so far), each with the direction it improves in.
VALIDATION_OBJECTIVES = {"val_acc": "max", "val_loss": "min", "val_top5": "max"}
COST_OBJECTIVES = {"params": "min", "macs": "min", "latency_ms": "min", "train_time_s": "min"}
OBJECTIVES = {**VALIDATION_OBJECTIVES, **COST_OBJECTIVES}


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective: a validation metric (``val_acc``, ``val_loss``, ``val_top5``) or a per-trial cost
    (``params``: trainable parameters; ``macs``: multiply-accumulates per image; ``latency_ms``: median
    inference time of one eval batch on the trial's device; ``train_time_s``: training seconds)."""

    metric: Literal["val_acc", "val_loss", "val_top5", "params", "macs", "latency_ms", "train_time_s"]
    mode: Literal["max", "min"] | None = None  # None: max for accuracies, min for the rest
    # the hypervolume's reference point in this objective (a value no useful trial is worse than);
    # None: 0 for accuracies, else 1.1 x the worst value any trial of the experiment has
    ref: float | None = None

    @property
    def resolved_mode(self) -> str:
        return self.mode or OBJECTIVES[self.metric]

    @property
    def is_cost(self) -> bool:
        return self.metric in COST_OBJECTIVES


def _parse_objectives(value: Any, path: str, errors: ErrorList) -> tuple[ObjectiveSpec, ...]:
    """``[{metric: val_acc}, {metric: params, mode: min}]`` -> ObjectiveSpecs, every problem by path."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        errors.add(path, f"must be a non-empty list of {{metric, mode}} mappings, got {value!r}")
        return ()
    out: list[ObjectiveSpec] = []
    for i, item in enumerate(value):
        p = f"{path}[{i}]"
        if isinstance(item, str):  # the short form: just the metric's name
            item = {"metric": item}
        if isinstance(item, Mapping) and "metric" in item and item["metric"] not in OBJECTIVES:
            errors.add(f"{p}.metric", f"unknown metric {item['metric']!r}{did_you_mean(str(item['metric']), list(OBJECTIVES))}; "
                       f"allowed: {', '.join(OBJECTIVES)}")
            continue
        if isinstance(item, Mapping) and "metric" not in item:
            errors.add(p, f"missing 'metric' (one of {', '.join(OBJECTIVES)})")
            continue
        obj = parse_dataclass(ObjectiveSpec, item, p, errors)
        if obj is not None:
            out.append(obj)
    seen: set[str] = set()
    for i, obj in enumerate(out):
        if obj.metric in seen:
            errors.add(f"{path}[{i}].metric", f"{obj.metric} is listed twice")
        seen.add(obj.metric)
    if len(out) == len(value) and not any(not o.is_cost for o in out):
        errors.add(path, f"needs a validation metric ({', '.join(VALIDATION_OBJECTIVES)}): costs alone do not change "
                   "while a trial trains, so there would be nothing to stop trials on")
    return tuple(out)


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
    # several objectives (a Pareto front); empty: the one objective ``metric``/``mode``. The first
    # validation metric among them is ``metric``: what single-objective schedulers and ranks use.
    objectives: tuple[ObjectiveSpec, ...] = field(default=(), metadata={"parse": _parse_objectives})

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "val_loss" else "max")

    @property
    def resolved_objectives(self) -> tuple[ObjectiveSpec, ...]:
        """The objectives, one (``metric``/``mode``) when none are listed."""
        return self.objectives or (ObjectiveSpec(self.metric, self.resolved_mode),)

    @property
    def pareto_objectives(self) -> tuple[ObjectiveSpec, ...]:
        """The objectives when there are several (a front to record); empty with one, which behaves
        exactly as ``metric``/``mode`` do."""
        return self.objectives if len(self.objectives) > 1 else ()

    @property
    def costs(self) -> tuple[str, ...]:
        """The per-trial costs among the objectives (each trial measures these)."""
        return tuple(o.metric for o in self.objectives if o.is_cost)




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
    space: dict[str, Any]  # a tree of plain values and ``space.Dist`` nodes; see cifar_tune.spec.space
    constraints: ConstraintsSpec
    retrain: RetrainSpec
    source: str = "<spec>"
    tracking: TrackingSpec = field(default_factory=TrackingSpec)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec (defaults filled in) in YAML form."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("space", "source")}
        out = {k: asdict(v) if is_dataclass(v) else v for k, v in out.items()}
        if out["search"]["objectives"]:
            out["search"]["objectives"] = [dict(o) for o in out["search"]["objectives"]]  # (YAML has no tuples)
        else:  # one objective: the spec as it always was (a resume compares it with the stored one)
            del out["search"]["objectives"]
        out["space"] = to_plain_spec(self.space)
        return out
