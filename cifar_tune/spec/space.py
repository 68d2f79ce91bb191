"""Search-space trees: distributions, seeded sampling, grid expansion, budget constraints.

A space is a tree of plain values (dicts, lists, scalars) whose nodes may be ``Dist``s. A ``choice``
whose options are mappings containing further ``Dist``s is a *conditional* space: the nested
distributions are only sampled when their option is chosen. Sampling returns plain nested dicts.

Sample ``i`` of a search is drawn from an RNG seeded by ``(seed, i, attempt)`` only, so it does not
depend on the order in which samples are asked for: a resumed search draws exactly the samples the
interrupted one would have drawn.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cifar_tune.errors import ErrorList, UserError

# name -> number of arguments; None = a non-empty list of options
DIST_ARITY: dict[str, int | None] = {
    "choice": None,
    "grid": None,
    "uniform": 2,
    "loguniform": 2,
    "quniform": 3,
    "qloguniform": 3,
    "randint": 2,
    "lograndint": 2,
    "normal": 2,
}
CONTINUOUS = {"uniform", "loguniform", "quniform", "qloguniform", "normal"}
INTEGER = {"randint", "lograndint"}


@dataclass(frozen=True)
class Dist:
    kind: str
    args: tuple[Any, ...]

    @property
    def options(self) -> tuple[Any, ...]:
        return self.args

    def to_yaml(self) -> dict[str, list[Any]]:
        return {self.kind: [to_plain_spec(a) for a in self.args]}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def parse_tree(value: Any, path: str, errors: ErrorList) -> Any:
    """Turn one-key ``{dist: args}`` mappings into ``Dist`` nodes, validating their arguments."""
    if isinstance(value, Mapping):
        if len(value) == 1:
            (key, args), = value.items()
            if key in DIST_ARITY:
                return _parse_dist(str(key), args, f"{path}.{key}", errors)
            if isinstance(args, list) and (close := misspelled_dist(str(key))):
                # dist arguments are lists: a one-key mapping of a list is almost surely a misspelled dist
                errors.add(f"{path}.{key}", f"unknown distribution (did you mean '{close}'?); "
                           f"distributions: {', '.join(DIST_ARITY)}")
                return None
        return {str(k): parse_tree(v, f"{path}.{k}", errors) for k, v in value.items()}
    if isinstance(value, list):
        return [parse_tree(v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value


def misspelled_dist(name: str) -> str | None:
    """The distribution ``name`` is a near miss of (``log_uniform``, ``choise``, ``unifrom``), or None."""
    import difflib

    folded = name.lower().replace("_", "").replace("-", "")
    if folded in DIST_ARITY:
        return folded
    close = difflib.get_close_matches(name.lower(), list(DIST_ARITY), n=1, cutoff=0.8)
    return close[0] if close else None


def _parse_dist(kind: str, args: Any, path: str, errors: ErrorList) -> Dist | None:
    arity = DIST_ARITY[kind]
    if not isinstance(args, list):
        want = "a non-empty list of options" if arity is None else f"a list of {arity} numbers"
        errors.add(path, f"must be {want}, got {_show(args)}")
        return None
    if arity is None:
        if not args:
            errors.add(path, "must have at least one option, got []")
            return None
        opts = tuple(parse_tree(a, f"{path}[{i}]", errors) for i, a in enumerate(args))
        return Dist(kind, opts)
    if len(args) != arity:
        names = {2: "[low, high]", 3: "[low, high, q]"}[arity] if kind != "normal" else "[mean, sd]"
        errors.add(path, f"must be {names}, got {len(args)} values")
        return None
    bad = [i for i, a in enumerate(args) if not _is_number(a)]
    if bad:
        errors.add(path, f"values must be numbers, got {_show(args[bad[0]])} at [{bad[0]}]")
        return None
    n_before = len(errors.items)
    if kind == "normal":
        mean, sd = args
        if sd <= 0:
            errors.add(path, f"sd must be > 0, got {sd}")
    else:
        low, high = args[0], args[1]
        if kind in INTEGER and not all(isinstance(a, int) for a in (low, high)):
            errors.add(path, f"low and high must be integers, got {args}")
        if not low < high:
            errors.add(path, f"low must be < high, got low={low}, high={high}")
        if kind in ("loguniform", "qloguniform") and low <= 0:
            errors.add(path, f"low must be > 0, got {low}")
        if kind == "lograndint" and low < 1:
            errors.add(path, f"low must be >= 1, got {low}")
        if kind in ("quniform", "qloguniform") and args[2] <= 0:
            errors.add(path, f"q must be > 0, got {args[2]}")
    if len(errors.items) > n_before:
        return None
    return Dist(kind, tuple(args))


def _show(x: Any) -> str:
    return repr(x) if isinstance(x, str) else str(x)


# ---------------------------------------------------------------------------------------- walking


def iter_dists(tree: Any, path: str = "") -> Iterator[tuple[str, Dist]]:
    """Every distribution in the tree with its key path (options of a choice included)."""
    if isinstance(tree, Dist):
        yield path, tree
        if tree.kind in ("choice", "grid"):
            for i, opt in enumerate(tree.args):
                yield from iter_dists(opt, f"{path}.{tree.kind}[{i}]")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_dists(v, f"{path}.{k}" if path else k)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from iter_dists(v, f"{path}[{i}]")


def alternatives(tree: Any, path: str) -> list[tuple[str, Any]]:
    """The options a section can take: ``[(path, subtree)]`` (one entry unless a choice/grid)."""
    if isinstance(tree, Dist) and tree.kind in ("choice", "grid"):
        out: list[tuple[str, Any]] = []
        for i, opt in enumerate(tree.args):
            out.extend(alternatives(opt, f"{path}.{tree.kind}[{i}]"))
        return out
    return [(path, tree)]


def to_plain_spec(tree: Any) -> Any:
    """Back to the YAML form (``Dist`` -> one-key mapping)."""
    if isinstance(tree, Dist):
        return tree.to_yaml()
    if isinstance(tree, dict):
        return {k: to_plain_spec(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_plain_spec(v) for v in tree]
    return tree


# --------------------------------------------------------------------------------------- sampling


def draw(dist: Dist, rng: random.Random) -> Any:
    """One value of a non-grid distribution (choice options are sampled recursively)."""
    k, a = dist.kind, dist.args
    if k in ("choice", "grid"):
        return sample_tree(a[rng.randrange(len(a))], rng)
    if k == "uniform":
        return rng.uniform(a[0], a[1])
    if k == "loguniform":
        return math.exp(rng.uniform(math.log(a[0]), math.log(a[1])))
    if k == "quniform":
        return _quantize(rng.uniform(a[0], a[1]), a[2])
    if k == "qloguniform":
        return _quantize(math.exp(rng.uniform(math.log(a[0]), math.log(a[1]))), a[2])
    if k == "randint":  # high is exclusive, as in Ray Tune and numpy
        return rng.randrange(a[0], a[1])
    if k == "lograndint":  # high is exclusive
        return min(a[1] - 1, int(math.exp(rng.uniform(math.log(a[0]), math.log(a[1])))))
    if k == "normal":
        return rng.gauss(a[0], a[1])
    raise AssertionError(k)


def clip(dist: Dist, value: Any) -> Any:
    """``value`` moved into the distribution's support: PBT perturbs by factors (x0.8, x1.2), which
    would otherwise walk a momentum past 1 or a label smoothing past its range."""
    k, a = dist.kind, dist.args
    if k in ("uniform", "loguniform"):
        return min(max(float(value), a[0]), a[1])
    if k in ("quniform", "qloguniform"):
        return min(max(_quantize(float(value), a[2]), _quantize(a[0], a[2])), _quantize(a[1], a[2]))
    if k in ("randint", "lograndint"):
        return min(max(int(round(value)), a[0]), a[1] - 1)
    return value  # choice: PBT only shifts to a neighbouring option; normal: unbounded


def clip_extremes(dist: Dist) -> list[Any] | None:
    """The values at the edges of what PBT's explore step can set a mutated key to: a perturbation
    (x0.8, x1.2) clipped by ``clip`` lands anywhere in the range, both ends included, and a choice moves
    to any option. None for ``normal``: perturbations are unbounded and nothing clips them."""
    k, a = dist.kind, dist.args
    if k in ("uniform", "loguniform"):
        return [a[0], a[1]]
    if k in ("quniform", "qloguniform"):
        return [clip(dist, a[0]), clip(dist, a[1])]
    if k in ("randint", "lograndint"):
        return [a[0], a[1] - 1]
    if k in ("choice", "grid"):
        return list(a)
    return None


def _quantize(x: float, q: float) -> float | int:
    v = round(x / q) * q
    # keep integers integral (quniform [16, 256, 16] gives ints) and avoid 0.30000000000000004
    return int(v) if float(q).is_integer() else round(v, 12)


def sample_tree(tree: Any, rng: random.Random) -> Any:
    if isinstance(tree, Dist):
        return draw(tree, rng)
    if isinstance(tree, dict):
        return {k: sample_tree(v, rng) for k, v in tree.items()}
    if isinstance(tree, list):
        return [sample_tree(v, rng) for v in tree]
    return tree


def expand_grid(tree: Any, *, choices_too: bool) -> list[Any]:
    """All grid points: the tree with every ``grid`` (and ``choice`` if ``choices_too``) resolved.

    Other distributions are kept for random sampling. Grids nested in a ``choice`` option are
    expanded only when the choice itself is enumerated (``choices_too``); validation rejects them
    otherwise.
    """
    if isinstance(tree, Dist):
        if tree.kind == "grid" or (choices_too and tree.kind == "choice"):
            return [pt for opt in tree.args for pt in expand_grid(opt, choices_too=choices_too)]
        return [tree]
    if isinstance(tree, dict):
        keys = list(tree)
        combos = itertools.product(*(expand_grid(tree[k], choices_too=choices_too) for k in keys))
        return [dict(zip(keys, c, strict=True)) for c in combos]
    if isinstance(tree, list):
        return [list(c) for c in itertools.product(*(expand_grid(v, choices_too=choices_too) for v in tree))]
    return [tree]


class InfeasibleSpace(UserError):
    pass


@dataclass(frozen=True)
class Sample:
    index: int
    config: dict[str, Any]
    params: int | None  # trainable parameters of the model (None when not counted)
    rejected: int  # samples drawn and rejected by the constraints before this one


class Sampler:
    """Seeded, order-independent sampling of a space with grid expansion and a parameter budget.

    ``num_samples`` repeats the grid: the search has ``num_samples * grid_size`` trials, as in Ray Tune.
    """

    def __init__(
        self,
        space: dict[str, Any],
        *,
        seed: int,
        enumerate_choices: bool = False,
        param_counter: Callable[[dict[str, Any]], int] | None = None,
        max_params: int | None = None,
        max_attempts: int = 2000,
    ) -> None:
        self.points = expand_grid(space, choices_too=enumerate_choices)
        self.seed = seed
        self.param_counter = param_counter
        self.max_params = max_params
        self.max_attempts = max_attempts

    @property
    def grid_size(self) -> int:
        return len(self.points)

    def sample(self, index: int) -> Sample:
        point = self.points[index % len(self.points)]
        for attempt in range(self.max_attempts):
            rng = random.Random(f"{self.seed}:{index}:{attempt}")
            config = sample_tree(point, rng)
            params = self.param_counter(config) if self.param_counter else None
            if self.max_params is None or params is None or params <= self.max_params:
                return Sample(index, config, params, attempt)
        raise InfeasibleSpace(
            f"constraints.max_params: no model within {self.max_params:,} parameters in "
            f"{self.max_attempts} draws for sample {index}"
        )
