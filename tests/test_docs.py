"""The docs agree with the code: registries, spec keys, CLI flags, parquet columns and links.

Everything here is read from the code (registries, the spec dataclasses, the argparse parser, the
tables the results recorder writes), so adding a model, a spec key, a flag or a column without
documenting it fails a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from pathlib import Path

import pytest

from cifar_tune.cli import build_parser
from cifar_tune.engine.augment import AUGMENTS  # complete: augment imports the policies
from cifar_tune.engine.data import DATASETS  # data.py registers the data sets
from cifar_tune.engine.models import MODELS  # models.py registers every family (resnet too)
from cifar_tune.engine.optim import OPTIMIZERS, SCHEDULE_COMMON_KEYS, SCHEDULES
from cifar_tune.engine.policies import AUTO_POLICIES
from cifar_tune.engine.train import TrainOptions
from cifar_tune.engine.transfer import TRANSFER_HINTS
from cifar_tune.registry import Registry
from cifar_tune.results import EPOCH_COLUMNS, Experiment, TrialLog
from cifar_tune.retrain import RETRAIN_COLUMNS
from cifar_tune.spec import fields as spec_fields
from cifar_tune.spec import schema as spec
from cifar_tune.spec import space

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The spec reference: spec.md and the pages it sends each registry to.
REGISTRY_PAGES: list[tuple[Registry, str]] = [
    (MODELS, "models.md"), (OPTIMIZERS, "optimizers.md"), (SCHEDULES, "optimizers.md"),
    (AUGMENTS, "augmentation.md"), (DATASETS, "data.md"),
]
SPEC_PAGES = ("spec.md", "data.md", "models.md", "optimizers.md", "augmentation.md", "running.md")
# Written by other parts of the project that may be absent from a checkout; a link to them is allowed
# to dangle only while the file does not exist (once it exists, its anchors are checked like any other).
OPTIONAL_PAGES = {"docs/api.md", "docs/objectives.md"}


def page(name: str) -> str:
    return (DOCS / name).read_text()


def documented(text: str, token: str) -> bool:
    """``token`` appears as inline code on its own: `token`, `token: ...`, `token=...` or `token (...)`."""
    return re.search(r"`" + re.escape(token) + r"(`|:|=| \()", text) is not None


# ------------------------------------------------------------------------------------ registries


@pytest.mark.parametrize(("registry", "page_name"), REGISTRY_PAGES, ids=lambda x: getattr(x, "kind", x))
def test_every_registry_entry_and_hyperparameter_is_documented(registry: Registry, page_name: str) -> None:
    text = page(page_name)
    missing = [name for name in registry if f"`{name}`" not in text]
    missing += [f"{name}.{hp}" for name in registry for hp in registry.hyperparameters(name)
                if not documented(text, hp)]
    assert not missing, f"docs/{page_name} lacks {registry.kind} entries/hyperparameters: {missing}"


def test_every_choice_of_a_spec_literal_is_documented() -> None:
    """Schedulers, searchers, metrics and the other closed sets of the spec."""
    text = "".join(page(p) for p in SPEC_PAGES)
    missing = []
    for cls in _spec_classes():
        for f in dataclasses.fields(cls):
            for value in _literal_values(typing.get_type_hints(cls)[f.name]):
                if f"`{value}`" not in text:
                    missing.append(f"{cls.__name__}.{f.name}: {value}")
    assert not missing, missing


def test_distributions_and_autoaugment_policies_are_documented() -> None:
    text = page("spec.md")
    dists = sorted(space.CONTINUOUS | space.INTEGER | {"choice", "grid"})
    assert [d for d in dists if not documented(text, d)] == []
    aug = page("augmentation.md")
    assert [p for p in AUTO_POLICIES if f"`{p}`" not in aug] == []


def test_keys_beside_the_registries_are_documented() -> None:
    """`space.train` keys, the keys every schedule takes, and the transfer-learning keys of a model."""
    train_keys = [f.name for f in dataclasses.fields(TrainOptions)]
    assert {"batch_size", "label_smoothing"} <= set(train_keys)
    missing = [f"space.train.{k}" for k in train_keys if not documented(page("spec.md"), k)]
    missing += [f"schedule {k}" for k in SCHEDULE_COMMON_KEYS if not documented(page("optimizers.md"), k)]
    missing += [f"model {k}" for k in TRANSFER_HINTS if not documented(page("models.md"), k)]
    assert not missing, missing


def _literal_values(tp: typing.Any) -> list[str]:
    if typing.get_origin(tp) is typing.Literal:
        return [str(v) for v in typing.get_args(tp)]
    return [v for arg in typing.get_args(tp) for v in _literal_values(arg)]


# ------------------------------------------------------------------------------------ spec keys


def _spec_classes(cls: type = spec.Spec) -> list[type]:
    out = [cls]
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out += _spec_classes(t)
    return out


def spec_key_paths(cls: type = spec.Spec, prefix: str = "") -> list[str]:
    """Every key a spec file may set, as a dotted path (``search.scheduler.grace_period``). A key holding
    a section (``search.scheduler``) stands for its keys: those are listed instead."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name == "source":  # where the spec was read from, not a key of the file
            continue
        path = f"{prefix}{f.name}"
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t) and prefix:
            out += spec_key_paths(t, path + ".")
        else:
            out.append(path)
            if dataclasses.is_dataclass(t):
                out += spec_key_paths(t, path + ".")
    return out


def test_spec_key_paths_cover_the_dataclasses() -> None:
    keys = spec_key_paths()
    assert {"name", "data.synthetic.num_train", "search.scheduler.grace_period", "tracking.wandb.mode",
            "retrain.rank_by", "search.checkpoint.keep"} <= set(keys)
    assert "search.scheduler" not in keys
    assert set(spec_fields.TOP_KEYS) == {k for k in keys if "." not in k}


def test_every_spec_key_is_documented() -> None:
    """Each key by its full path, or by its path inside its top-level section (`scheduler.grace_period`
    in the `search` table); top-level keys and `space`'s sections by name."""
    text = "".join(page(p) for p in SPEC_PAGES)
    missing = []
    for path in [*spec_key_paths(), *(f"space.{k}" for k in spec_fields.SPACE_KEYS)]:
        relative = path.split(".", 1)[1] if "." in path else path
        if not (documented(text, path) or documented(text, relative)):
            missing.append(path)
    assert not missing, f"spec keys missing from docs/{{{','.join(SPEC_PAGES)}}}: {missing}"


# ------------------------------------------------------------------------------------ CLI


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def cli_sections() -> dict[str, str]:
    """docs/cli.md split at its `## \\`cifar-tune NAME\\`` headings."""
    text = page("cli.md")
    parts = re.split(r"^## `cifar-tune ([\w-]+)`\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_cli_doc_has_every_subcommand_and_flag() -> None:
    sections = cli_sections()
    subs = _subparsers()
    assert sorted(sections) == sorted(subs), "docs/cli.md sections != subcommands"
    missing = []
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            tokens = action.option_strings or [action.dest.upper()]
            missing += [f"{name} {t}" for t in tokens if f"`{t}" not in sections[name]]
            if action.choices:
                missing += [f"{name} {tokens[0]} {c}" for c in action.choices if str(c) not in sections[name]]
    assert not missing, missing


def test_cli_doc_defaults_match_the_parser() -> None:
    """A flag's documented default is the parser's (a changed default must be documented)."""
    sections = cli_sections()
    wrong = []
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, [], argparse.SUPPRESS):
                continue
            row = next((line for line in sections[name].splitlines() if f"`{action.option_strings[0]} " in line
                        or f"`{action.option_strings[0]}`" in line), "")
            if f"`{action.default}`" not in row:
                wrong.append(f"{name} {action.option_strings[0]} (default {action.default!r})")
    assert not wrong, wrong


# ------------------------------------------------------------------------------------ output columns


def documented_columns(text: str) -> set[str]:
    return set(re.findall(r"`([\w.<>]+)`", text))


def column_documented(col: str, names: set[str]) -> bool:
    if col in names:
        return True
    if col.startswith("config."):
        return "config.<path>" in names
    for prefix in ("search_best_", "search_last_"):
        if col.startswith(prefix):
            return f"{prefix}<metric>" in names
    return False


def _recorded_trials_columns(tmp_path: Path) -> list[str]:
    """The columns ``trials.parquet`` gets from the recorder through a trial's whole life, plus an oom trial."""
    exp = Experiment(str(tmp_path), "x")
    log = TrialLog(exp, metric="val_acc", mode="max", max_epochs=2)
    config = {"model": {"family": "mlp"}, "optimizer": {"name": "sgd", "lr": 0.1}}
    metrics = {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0, "val_top5": 0.9, "train_loss": 1.0, "train_acc": 0.4,
               "train_time_s": 1.0, "epoch_time_s": 1.2, "node_id": "n", "status": "running"}
    for tid in ("t0000", "t0001"):
        log.add_pending(tid, int(tid[1:]), config, 10)
        log.trial_started(tid, config)
        log.trial_result(tid, metrics)
    ckpt = Path(exp.uri("ray/run/t0000-mlp-sgd/checkpoint_000000"))
    ckpt.mkdir(parents=True)
    log.trial_checkpoint("t0000", str(ckpt), 1)
    log.trial_finished("t0000", {"status": "running"})
    log.trial_finished("t0001", {"status": "oom", "gpu_mem_peak_mb": 100.0})
    return list(log.trials_frame().columns)


def output_sections() -> dict[str, str]:
    """docs/outputs.md split at its ``## `FILE` `` headings."""
    parts = re.split(r"^## `([\w.]+)`\s*$", page("outputs.md"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_output_column_is_documented(tmp_path: Path) -> None:
    """Each parquet file's columns in that file's section of docs/outputs.md."""
    sections = output_sections()
    columns = {
        "trials.parquet": _recorded_trials_columns(tmp_path),
        "epochs.parquet": list(EPOCH_COLUMNS),
        "retrain.parquet": [*RETRAIN_COLUMNS, "search_best_val_acc", "search_last_val_acc"],
        "tsne.parquet": ["x", "y", "label", "class", "trial_id"],
    }
    assert "checkpoint_epoch" in columns["trials.parquet"] and "oom_gpu_mem_peak_mb" in columns["trials.parquet"]
    missing = {f: [c for c in cols if not column_documented(c, documented_columns(sections.get(f, "")))]
               for f, cols in columns.items()}
    assert not any(missing.values()), f"docs/outputs.md lacks columns: {missing}"


# ------------------------------------------------------------------------------------ links and wording


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    in_code = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(md: Path) -> None:
    broken = []
    for target in links(md.read_text()):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (md.parent / path_part).resolve() if path_part else md
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            if rel not in OPTIONAL_PAGES:
                broken.append(target)
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(target)
    assert not broken, f"{md.relative_to(ROOT)}: broken links {broken}"


def test_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    text = "# Title\n\nsee [a](missing.md) and [b](#title) and [c](#nope) and `[d](x.md)`\n"
    assert links(text) == ["missing.md", "#title", "#nope"]
    assert anchors(text) == {"title"}


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: p.name)
def test_docs_speak_to_users_not_about_history(md: Path) -> None:
    """No issue numbers or tracker references in the user docs."""
    text = md.read_text()
    assert not re.findall(r"(?<![\w&/`])#\d+\b", text)
    assert not re.findall(r"\b(?:issue|pull request)s?\b", text, flags=re.I)
