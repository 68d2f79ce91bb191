"""Small text helpers shared by what the commands print and write: counts with the right plural, and
the compact one-line form of a sampled config (leaderboards, ``preview``, report tick labels)."""

from __future__ import annotations

from typing import Any


def plural(n: int | float, word: str, many: str | None = None) -> str:
    """``plural(1, "trial")`` -> ``"1 trial"``, ``plural(3, "trial")`` -> ``"3 trials"``; ``many`` for
    irregular words (``plural(2, "child", "children")``)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}" if isinstance(n, int) else \
        f"{n:g} {word if n == 1 else (many or word + 's')}"


def compact(v: Any, *, in_list: bool = False) -> str:
    """A value in few characters: floats to 3 significant digits, a one-element list for its element,
    other lists in brackets, and inside a list a mapping with one key for its value. A VGG's
    ``blocks: [{channels: [16]}, {channels: [32, 32]}]`` -> ``[16,[32,32]]``; ``head: [128]`` -> ``128``;
    ``crop: {padding: 4}`` -> ``{padding:4}``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        if in_list and len(v) == 1:
            return compact(next(iter(v.values())), in_list=True)
        return "{" + ",".join(f"{k}:{compact(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list | tuple):
        if len(v) == 1:
            return compact(v[0], in_list=True)
        return "[" + ",".join(compact(x, in_list=True) for x in v) + "]"
    return str(v)


def summarize_config(config: dict[str, Any]) -> str:
    """``mlp hidden=64 · adam lr=0.00403 · cosine · hflip · batch_size=64``: a config on one line."""
    parts = []
    for section, value in config.items():
        if not isinstance(value, dict):
            parts.append(f"{section}={compact(value)}")
            continue
        head = value.get("family", value.get("name"))
        if section == "augment":  # augmentations are named by their keys; `true` needs no value
            rest = [k if v is True else f"{k}={compact(v)}" for k, v in value.items() if v not in (False, None)]
        else:
            rest = [f"{k}={compact(v)}" for k, v in value.items() if k not in ("family", "name")]
        text = " ".join(([str(head)] if head is not None else []) + rest)
        if text:
            parts.append(text)
    return " · ".join(parts)
