"""The README's shell commands run as written.

Every fenced ``bash``/``sh`` block of README.md is split into commands. A command preceded by a comment
line ``# needs: network`` (or ``# needs: gpu``), or ending in such a comment, is not run here (no internet,
no GPU in CI); every other command is run, in order, in a temporary directory holding a copy of
``search_spaces/`` and a ``.venv/bin`` whose ``cifar-tune`` and ``python`` are this interpreter.

To keep the suite fast, the long-running commands get extra arguments appended (``FAST_ARGS`` below: a
smaller synthetic data set, 3 trials of 1 epoch, 1 retrain epoch). The README itself states the full
commands and the times measured for them without these arguments.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cifar_tune.cli import build_parser
from cifar_tune.spec.parse import load_spec

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NEEDS = re.compile(r"#\s*needs:\s*([\w, -]+)")

# Appended to a README command (matched by its start) only in this test, for speed; see the module docstring.
FAST_ARGS: dict[str, list[str]] = {
    ".venv/bin/cifar-tune search search_spaces/quickstart.yaml --set data.dataset=synthetic": [
        "--set", "data.synthetic={num_train: 300, num_test: 100, num_classes: 10}", "--set", "data.subset=null",
        "--set", "search.num_samples=3", "--set", "search.scheduler.max_epochs=1",
        "--no-dashboard", "--num-cpus", "2", "--progress-every", "60",
    ],
    ".venv/bin/cifar-tune retrain": ["--epochs", "1", "--no-dashboard", "--num-cpus", "2"],
}


@dataclass(frozen=True)
class Command:
    text: str
    needs: tuple[str, ...]  # empty: runs offline on a CPU


def readme_commands(text: str) -> list[Command]:
    """Commands of the fenced shell blocks, with the ``# needs:`` marks that apply to each."""
    commands: list[Command] = []
    in_block = False
    lang = ""
    pending: tuple[str, ...] = ()
    lines: list[str] = []
    for line in text.splitlines():
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            if not in_block:
                in_block, lang, pending = True, fence.group(1).lower(), ()
            else:
                in_block = False
            continue
        if not in_block or lang not in SHELL_LANGS:
            continue
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            m = NEEDS.search(stripped)
            if m:
                pending = tuple(x.strip() for x in m.group(1).split(","))
            continue
        lines.append(stripped.rstrip("\\").strip())
        if stripped.endswith("\\"):
            continue
        full = " ".join(lines)
        lines = []
        m = NEEDS.search(full)
        needs = pending + (tuple(x.strip() for x in m.group(1).split(",")) if m else ())
        commands.append(Command(full, needs))
        pending = ()
    return commands


def test_parser_reads_needs_marks() -> None:
    text = "```bash\n# needs: network\npip install x\nls\nls -l  # needs: gpu\n```\n```yaml\na: 1\n```\n"
    assert readme_commands(text) == [Command("pip install x", ("network",)), Command("ls", ()),
                                     Command("ls -l  # needs: gpu", ("gpu",))]


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    i = lines.index("# The README's test command, verbatim:")
    return lines[i + 1]


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = _ci_test_command()
    assert ci == "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && .venv/bin/python -m pytest -q"
    assert ci in [c.text for c in readme_commands(README.read_text())]


def test_readme_cifar_tune_commands_parse() -> None:
    """Every ``cifar-tune`` command in the README (offline or not) is accepted by the real parser."""
    parser = build_parser()
    seen = 0
    for cmd in readme_commands(README.read_text()):
        for part in cmd.text.split("&&"):
            argv = shlex.split(part, comments=True)
            if argv and argv[0].endswith("cifar-tune"):
                parser.parse_args(argv[1:])  # SystemExit on an unknown subcommand or flag
                seen += 1
    assert seen >= 5


def test_readme_offline_commands_are_the_quickstart() -> None:
    """What runs offline is known here (a new offline command must be looked at, and get FAST_ARGS if slow)."""
    offline = [c.text for c in readme_commands(README.read_text()) if not c.needs]
    assert offline == [
        ".venv/bin/cifar-tune search search_spaces/quickstart.yaml --set data.dataset=synthetic",
        ".venv/bin/cifar-tune retrain --top 3",
        ".venv/bin/cifar-tune report",
        ".venv/bin/cifar-tune validate search_spaces/quickstart.yaml",
        ".venv/bin/cifar-tune preview search_spaces/quickstart.yaml -n 3",
    ]


def test_readme_yaml_examples_are_valid_specs(tmp_path: Path) -> None:
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        spec = load_spec(path)  # raises SpecError with every problem
        assert spec.space["model"]


def _fake_venv(workdir: Path) -> None:
    bin_dir = workdir / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "cifar-tune"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m cifar_tune \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    (bin_dir / "python").symlink_to(sys.executable)


@pytest.mark.slow
@pytest.mark.ray
def test_readme_offline_commands_run(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "search_spaces", tmp_path / "search_spaces")
    _fake_venv(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("CIFAR_TUNE_FAULTS", None)
    ran = []
    for cmd in readme_commands(README.read_text()):
        if cmd.needs:
            continue
        extra = next((args for start, args in FAST_ARGS.items() if cmd.text.startswith(start)), [])
        line = cmd.text + "".join(" " + shlex.quote(a) for a in extra)
        proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{line}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        if " search " in line or " retrain" in line:  # Ray's own token warning is replaced by one line of ours
            assert "Token authentication is enabled for this Ray cluster" not in proc.stdout + proc.stderr
            assert (proc.stdout + proc.stderr).count("Ray token authentication is on") <= 1
        ran.append(cmd.text)
    exp = tmp_path / "experiments" / "quickstart"
    for name in ("trials.parquet", "epochs.parquet", "retrain.parquet", "leaderboard.md", "report.md"):
        assert (exp / name).is_file(), name
    assert len(ran) == 5
    # every column the real run wrote is documented in its file's section of docs/outputs.md
    sections = re.split(r"^## `([\w.]+)`\s*$", (ROOT / "docs" / "outputs.md").read_text(), flags=re.M)
    documented = {f: set(re.findall(r"`([\w.<>]+)`", text)) for f, text in zip(sections[1::2], sections[2::2], strict=True)}
    for name in ("trials.parquet", "epochs.parquet", "retrain.parquet"):
        columns = pq.ParquetFile(exp / name).schema_arrow.names
        missing = [c for c in columns if c not in documented[name] and not (c.startswith("config.") and "config.<path>" in documented[name])
                   and not (c.startswith("search_") and re.sub(r"_val_\w+$", "_<metric>", c) in documented[name])]
        assert not missing, f"{name}: {missing}"
