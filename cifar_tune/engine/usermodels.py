"""Model family ``python``: a researcher's own ``nn.Module`` factory, searched like the built-in families.

::

    space:
      model:
        family: python
        factory: my_nets:CNN7          # module:attribute; my_nets.py next to the spec, or on sys.path
        width: {choice: [32, 64]}      # the factory's own keyword arguments, constants or distributions
        dropout: {uniform: [0.0, 0.5]}

The factory (a class or a function) is called as ``factory(num_classes=..., in_channels=...,
image_size=..., **kwargs)``; it may leave out any of those three it does not need. Its other parameters
are the family's hyperparameters: the spec validator reads them (and their type hints) from its
signature, so an unknown key is reported with its key path and the accepted ones, and a sampled config
is built on the meta device (parameter counts, ``max_params``, a shape check) before anything runs.

A module found next to the spec file is written into the config as its absolute file path
(``/home/me/exp/my_nets.py:CNN7``), so trials running in Ray's working directories, retrain and
evaluate find it; on a Ray cluster the file travels with the job (``py_modules``), and a node without
the path imports it by its module name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, get_type_hints

from torch import nn

from cifar_tune.engine.model_base import MODELS

FAMILY = "python"
RUNTIME_ARGS = ("num_classes", "in_channels", "image_size")
_loaded: dict[tuple[str, int], ModuleType] = {}  # (file, mtime_ns) -> module: an edited file is loaded again


def split_factory(factory: Any) -> tuple[str, str]:
    """``"my_nets:CNN7"`` or ``"/abs/my_nets.py:CNN7"`` -> (module or file, attribute); ValueError if malformed."""
    if factory in ("", None):
        raise ValueError("factory: required for family 'python' (module:attribute, e.g. my_nets:CNN7)")
    if not isinstance(factory, str) or ":" not in factory:
        raise ValueError(f"factory: must be 'module:attribute' (e.g. my_nets:CNN7), got {factory!r}")
    module, _, attr = factory.rpartition(":")
    if not module or not attr.isidentifier():
        raise ValueError(f"factory: must be 'module:attribute' (e.g. my_nets:CNN7), got {factory!r}")
    return module, attr


def _load_file(path: Path) -> ModuleType:
    key = (str(path), path.stat().st_mtime_ns)
    if key in _loaded:
        return _loaded[key]
    name = path.stem if path.name != "__init__.py" else path.parent.name
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) != str(path):
        name = f"{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"  # another module has the name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"factory: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # while it runs: dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _loaded[key] = module
    return module


def import_factory(factory: Any) -> Callable[..., nn.Module]:
    """The callable named by ``factory``; ValueError('factory: ...') saying why it cannot be imported."""
    module_name, attr = split_factory(factory)
    try:
        path = Path(module_name)
        if module_name.endswith(".py") and path.is_absolute() and path.is_file():
            module = _load_file(path)
        else:
            # a file path that is not here (a cluster node): the module shipped with the job, by name
            name = path.stem if module_name.endswith(".py") else module_name
            module = importlib.import_module(name)
    except ValueError:
        raise
    except Exception as e:  # ImportError, SyntaxError, anything the module raises at import
        where = f"{module_name}" if module_name.endswith(".py") else f"module '{module_name}'"
        raise ValueError(f"factory: cannot import {where}: {type(e).__name__}: {e}".splitlines()[0]) from None
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        from cifar_tune.registry import did_you_mean

        raise ValueError(f"factory: {module_name} has no '{attr}'{did_you_mean(attr, names)}")
    if not callable(fn):
        raise ValueError(f"factory: {module_name}:{attr} is not callable")
    return fn


def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as e:
        raise ValueError(f"factory: cannot read the signature of {fn!r}: {e}") from None


def factory_hyperparameters(cfg: Mapping[str, Any]) -> dict[str, inspect.Parameter]:
    """The keys a ``python`` model config may set: ``factory`` and the factory's parameters other than
    the runtime arguments. A factory with ``**kwargs`` accepts any key."""
    fn = import_factory(cfg.get("factory"))
    params = _signature(fn).parameters.values()
    out = {"factory": inspect.Parameter("factory", inspect.Parameter.KEYWORD_ONLY, annotation=str)}
    for p in params:
        if p.name in RUNTIME_ARGS or p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            for k in cfg:
                out.setdefault(k, inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY))
            continue
        out[p.name] = p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
    return out


def factory_type_hints(cfg: Mapping[str, Any]) -> dict[str, Any]:
    fn = import_factory(cfg.get("factory"))
    target = fn.__init__ if inspect.isclass(fn) else fn  # type: ignore[misc]
    try:
        hints = get_type_hints(target)
    except Exception:  # unresolvable annotations: accept any value, the build check still runs
        hints = {}
    return {"factory": str, **{k: v for k, v in hints.items() if k != "return"}}


def python_model(num_classes: int, in_channels: int, image_size: int, *, factory: str = "", **kwargs: Any) -> nn.Module:
    """A model from the researcher's own factory (see the module docstring)."""
    fn = import_factory(factory)
    accepted = _signature(fn).parameters
    runtime = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    args = {k: v for k, v in runtime.items() if k in accepted or takes_any}
    model = fn(**args, **kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory: {factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


python_model.config_hyperparameters = factory_hyperparameters  # type: ignore[attr-defined]
python_model.config_type_hints = factory_type_hints  # type: ignore[attr-defined]
MODELS.register(FAMILY)(python_model)


# ---------------------------------------------------------------------------------- spec and Ray


def _resolve(factory: str, base: Path) -> str:
    """``my_nets:CNN7`` -> ``/base/my_nets.py:CNN7`` when the module is a file (or package) under ``base``."""
    try:
        module, attr = split_factory(factory)
    except ValueError:
        return factory  # the validator reports it
    if module.endswith(".py"):
        path = Path(module).expanduser()
        return f"{(path if path.is_absolute() else base / path).resolve()}:{attr}"
    rel = Path(*module.split("."))
    for candidate in (base / rel.with_suffix(".py"), base / rel / "__init__.py"):
        if candidate.is_file():
            return f"{candidate.resolve()}:{attr}"
    return factory  # imported by name from sys.path


def absolute_factories(tree: Any, base: Path) -> Any:
    """The raw ``space.model`` YAML with each ``python`` factory found under ``base`` (the spec file's
    directory) written as its absolute file path."""
    if isinstance(tree, list):
        return [absolute_factories(v, base) for v in tree]
    if not isinstance(tree, Mapping):
        return tree
    out = {k: absolute_factories(v, base) for k, v in tree.items()}
    if out.get("family") == FAMILY and isinstance(out.get("factory"), str):
        out["factory"] = _resolve(out["factory"], base)
    return out


def factory_files(tree: Any) -> list[str]:
    """The module files the ``python`` models in a space (or configs) load: what a Ray cluster's
    workers need (runtime_env ``py_modules``)."""
    found: list[str] = []
    tree = _plain(tree)
    if isinstance(tree, Mapping):
        if tree.get("family") == FAMILY and isinstance(tree.get("factory"), str):
            module = tree["factory"].rpartition(":")[0]
            path = Path(module)
            if module.endswith(".py") and path.is_file():
                found.append(str(path.parent if path.name == "__init__.py" else path))
        for v in tree.values():
            found += factory_files(v)
    elif isinstance(tree, list | tuple):
        for v in tree:
            found += factory_files(v)
    return sorted(set(found))


def _plain(v: Any) -> Any:
    args = getattr(v, "args", None)  # a space.Dist: its options
    return list(args) if args is not None and hasattr(v, "kind") else v
