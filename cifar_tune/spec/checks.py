"""Validation of a spec against the registries: every config the space can sample must build (models,
augmentations, optimizers, schedules, transfer), PBT mutations stay buildable, the budget fits the data."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, get_type_hints

from cifar_tune.errors import ErrorList
from cifar_tune.registry import did_you_mean
from cifar_tune.spec.fields import SPACE_DEFAULTS, SPACE_KEYS, _contains_dist, check_value, type_problem
from cifar_tune.spec.schema import DataSpec, SearchSpec, Spec
from cifar_tune.spec.space import DIST_ARITY, Dist, alternatives, iter_dists, parse_tree, to_plain_spec

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

    from cifar_tune.spec.space import sample_tree

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
        try:  # (a user's model: read from its factory, which may fail to import)
            hps = registry.hyperparameters(name, alt)
            hints = registry.type_hints(name, alt)
        except ValueError as e:
            _add_build_error(errors, alt_path, str(e))
            continue
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

    from cifar_tune.engine.augment import AUGMENTS
    from cifar_tune.spec.space import sample_tree

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
    from cifar_tune.engine.train import TrainOptions

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

    from cifar_tune.engine.augment import build_augment
    from cifar_tune.engine.models import MODELS, check_architecture
    from cifar_tune.engine.optim import (
        OPTIMIZERS,
        SCHEDULE_COMMON_KEYS,
        SCHEDULES,
        build_optimizer,
        build_schedule,
    )

    for key in space:
        if key not in SPACE_KEYS:
            errors.add(f"space.{key}", f"unknown key{did_you_mean(key, list(SPACE_KEYS))}; allowed: {', '.join(SPACE_KEYS)}")
    if "model" not in space:
        errors.add("space", "missing 'model' (a mapping with 'family', or a choice of them)")
    dummy = [torch.nn.Parameter(torch.zeros(2))]
    if "model" in space and info is not None:
        from cifar_tune.engine.transfer import TRANSFER_HINTS, check_config

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
        from cifar_tune.spec.space import Sampler

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

    from cifar_tune.engine.augment import AUGMENTS
    from cifar_tune.engine.optim import OPTIMIZERS, SCHEDULE_COMMON_KEYS, SCHEDULES
    from cifar_tune.engine.train import TrainOptions
    from cifar_tune.spec.space import clip_extremes, sample_tree

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

    from cifar_tune.engine.augment import build_augment
    from cifar_tune.engine.optim import build_optimizer, build_schedule
    from cifar_tune.spec.space import sample_tree

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
    from cifar_tune.engine import data as data_mod

    if data.dataset not in data_mod.DATASETS:
        errors.add("data.dataset", data_mod.DATASETS.unknown_message(data.dataset))
        return None
    if data.dataset == "npz" and not data.path:
        errors.add("data.path", "required for dataset 'npz' (a .npz file with x_train, y_train)")
        return None
    if data.dataset == "imagefolder" and not data.path:
        errors.add("data.path", "required for dataset 'imagefolder' (a folder with train/<class>/*.png|jpg)")
        return None
    if data.image_size is not None and data.dataset != "imagefolder":
        where = "data.synthetic.image_size" if data.dataset == "synthetic" else "the data set's own size"
        errors.add("data.image_size", f"only used by dataset 'imagefolder' (for {data.dataset}: {where})")
        return None
    try:
        return data_mod.dataset_info(data)
    except (data_mod.DataError, OSError) as e:
        where, _, message = str(e).partition(": ")
        if where == "data.classes":
            errors.add(where, message)
        else:
            errors.add("data.path" if data.dataset in ("npz", "imagefolder") else "data", str(e))
        return None


def _check_budget(spec: Spec, info: Any, errors: ErrorList, draws: int = 200) -> None:
    """A max_params no sampled model can meet is an error now, not 60 failed trials later."""
    import random

    from cifar_tune.engine.models import param_count
    from cifar_tune.spec.space import sample_tree

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
