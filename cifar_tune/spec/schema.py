"""The search spec: frozen dataclasses mirroring the YAML file (parsed and validated by ``spec.parse``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal

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
    space: dict[str, Any]  # a tree of plain values and ``space.Dist`` nodes; see cifar_tune.spec.space
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
