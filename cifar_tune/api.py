"""The Python API: what the ``cifar-tune`` commands do, as functions for scripts and notebooks.

::

    import cifar_tune as ct

    spec = ct.load_spec("search_spaces/smoke.yaml", {"search.num_samples": 2})
    exp = ct.search(spec, storage="runs")       # same checks, outputs and files as `cifar-tune search`
    exp.trials, exp.epochs                      # trials.parquet / epochs.parquet as DataFrames
    exp.best(3)                                 # ranked as retrain ranks them
    exp.retrain(top=2); exp.report(); exp.evaluate()
    ct.open("smoke", storage="runs"); ct.list_experiments("runs")

The CLI is a thin layer over these functions. User mistakes raise :class:`cifar_tune.errors.UserError`
(a ``SpecError`` for a spec) whose ``lines`` say what is wrong, each with its key path.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cifar_tune.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from cifar_tune import results
    from cifar_tune.retrain import CheckpointEval
    from cifar_tune.spec.schema import Spec

__all__ = ["Experiment", "ProgressPrinter", "list_experiments", "load_spec", "open", "search"]

DEFAULT_STORAGE = "experiments"
Printer = Callable[[str], None]


# ------------------------------------------------------------------------------------------- spec


def override_strings(overrides: Sequence[str] | Mapping[str, Any] | None) -> list[str]:
    """``{"search.num_samples": 4}`` -> ``["search.num_samples=4"]`` (the CLI's ``--set`` form; values
    are written as JSON, which the ``--set`` parser reads as YAML)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str):
        return [overrides]
    return list(overrides)


def load_spec(source: Any, overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Spec:
    """A validated spec from a YAML file, a mapping in the YAML's shape, or a ``Spec`` (returned as is
    when there are no overrides). ``overrides``: ``["search.num_samples=4"]`` as with ``--set``, or a
    mapping ``{"search.num_samples": 4}``. Raises ``SpecError`` listing every problem."""
    from cifar_tune.spec import parse as spec_parse
    from cifar_tune.spec.schema import Spec

    sets = override_strings(overrides)
    if isinstance(source, Spec):
        if not sets:
            return source
        return spec_parse.parse_spec(spec_parse.apply_overrides(source.to_dict(), sets), source.source)
    if isinstance(source, Mapping):
        return spec_parse.parse_spec(spec_parse.apply_overrides(dict(source), sets), "<spec>")
    if isinstance(source, str | Path):
        return spec_parse.load_spec(source, sets)
    raise UserError(f"load_spec: expected a YAML path, a mapping or a Spec, got {type(source).__name__}")


# --------------------------------------------------------------------------------------- progress


class ProgressPrinter:
    """Search output for terminals and notebooks: ordinary lines are printed as they come; the status
    line is rewritten in place where the output can do that (a terminal, a Jupyter cell), and
    elsewhere (a log file, CI) printed at most once per ``every_s`` seconds, so a long search does not
    flood its cell or log."""

    REWRITE_EVERY_S = 0.5

    def __init__(self, every_s: float = 15.0, stream: IO[str] | None = None, rewrite: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.every_s = every_s
        if rewrite is None:
            tty = getattr(self.stream, "isatty", lambda: False)()
            rewrite = bool(tty) or "ipykernel" in sys.modules
        self.rewrite = rewrite
        self._last_s = -float("inf")
        self._shown = 0  # characters of the status line on screen (rewrite mode)
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        """An ordinary line: printed below the status line (which is redrawn at its next update)."""
        with self._lock:
            self._end_status()
            print(line, file=self.stream, flush=True)

    def status(self, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            if self.rewrite:
                if now - self._last_s < self.REWRITE_EVERY_S:
                    return
                width = shutil.get_terminal_size((120, 20)).columns - 1
                text = line[:width]
                self.stream.write("\r" + text + " " * max(0, self._shown - len(text)))
                self.stream.flush()
                self._shown = len(text)
            elif now - self._last_s >= self.every_s:
                print(line, file=self.stream, flush=True)
            else:
                return
            self._last_s = now

    def close(self) -> None:
        with self._lock:
            self._end_status()

    def _end_status(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self._shown = 0


# ----------------------------------------------------------------------------------------- search


def search(
    spec: Any = None,
    *,
    name: str | None = None,
    storage: str = DEFAULT_STORAGE,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    resume: bool = False,
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool = True,
    dashboard_port: int = 8080,
    progress_every_s: float = 15.0,
    out: Printer | None = None,
    progress: Printer | None | bool = True,
) -> Experiment:
    """Run a search: ``cifar-tune search`` with the same validation, output lines and files.

    ``spec``: a YAML path, a mapping or a ``Spec``; None with ``resume=True`` continues experiment
    ``name`` from its stored spec (``overrides`` on top, e.g. more ``search.num_samples``).
    ``progress``: True (default) shows one rewritten status line (see :class:`ProgressPrinter`);
    False prints the CLI's periodic table through ``out``; a callable receives each status line.

    Ctrl-C (a notebook's interrupt) stops the trials, records them as interrupted and returns the
    experiment (``exp.finished`` is False; ``exp.resume()`` continues it); the SIGINT handler in place
    before the call is restored. Ray started here is shut down when the search returns, so a second
    call in the same process starts afresh.
    """
    from cifar_tune.tuning.driver import run_search, stored_spec

    sets = override_strings(overrides)
    if spec is None:
        if not (resume and name):
            raise UserError("search: give a spec, or resume=True with the name of the experiment to continue")
        parsed = stored_spec(storage, name, sets)
    else:
        parsed = load_spec(spec, sets)
    printer: ProgressPrinter | None = None
    if out is None:
        printer = ProgressPrinter(progress_every_s)
        out = printer
    status: Printer | None
    if progress is True:
        status = printer.status if printer is not None else ProgressPrinter(progress_every_s).status
    elif progress is False or progress is None:
        status = None
    else:
        status = progress
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        record = run_search(
            parsed, storage=storage, name=name, address=address, resume=resume, dashboard=dashboard,
            num_cpus=num_cpus, progress_every_s=progress_every_s, dashboard_port=dashboard_port, out=out,
            progress=status,
        )
    finally:
        if printer is not None:
            printer.close()
        if main_thread and previous is not None:  # Ray Tune installs its own, and keeps it after a normal end
            signal.signal(signal.SIGINT, previous)
    return Experiment(record, spec=parsed)


# ------------------------------------------------------------------------------------ experiments


def open(path_or_name: str | Path | None = None, storage: str | None = None) -> Experiment:  # noqa: A001 - ct.open
    """An experiment by name under ``storage`` (default ``experiments``), by its directory (a path as
    ``search`` prints it), or the most recent under ``storage`` when None. An unknown name raises a
    ``UserError`` with the closest existing name."""
    from cifar_tune.results import find_experiment

    target = None if path_or_name is None else str(path_or_name)
    return Experiment(find_experiment(storage or DEFAULT_STORAGE, target))


def list_experiments(storage: str = DEFAULT_STORAGE) -> pd.DataFrame:
    """One row per experiment under ``storage``, oldest first: name, metric, trials, a column per
    status with its count, the best score and its trial (all read from trials.parquet)."""
    import pandas as pd

    from cifar_tune.results import FINISHED, experiment_names
    from cifar_tune.results import Experiment as Record
    from cifar_tune.retrain import rank_trials
    from cifar_tune.spec.stored import load_stored_spec

    rows: list[dict[str, Any]] = []
    for name in experiment_names(storage):
        record = Record(storage, name)
        row: dict[str, Any] = {"name": name, "path": record.uri()}
        try:
            stored = load_stored_spec(record)
        except UserError:
            rows.append(row)
            continue
        metric, mode = stored.search.metric, stored.search.resolved_mode
        row["metric"] = metric
        if record.has("trials.parquet"):
            trials = record.read_table("trials.parquet")
            row["trials"] = len(trials)
            counts = trials["status"].value_counts()
            for status in (*FINISHED, "running", "pending", "interrupted"):
                row[status] = int(counts.get(status, 0))
            ranked = rank_trials(trials, metric=metric, mode=mode, rank_by=stored.retrain.rank_by)
            if len(ranked):
                row[f"best_{metric}"] = float(ranked[f"{stored.retrain.rank_by}_{metric}"].iloc[0])
                row["best_trial"] = str(ranked["trial_id"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


class Experiment:
    """An experiment directory: its tables as DataFrames and the commands that work on it."""

    def __init__(self, record: results.Experiment, spec: Spec | None = None) -> None:
        self.record = record
        self._spec = spec  # the spec a search in this process ran with (else read from spec.yaml)

    def __repr__(self) -> str:
        return f"<cifar_tune experiment '{self.name}' at {self.path}>"

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def path(self) -> str:
        return self.record.uri()

    @property
    def spec(self) -> Spec:
        """The spec the search ran with (its stored spec.yaml, overrides included)."""
        if self._spec is not None:
            return self._spec
        import yaml

        from cifar_tune.spec.parse import parse_spec

        raw = yaml.safe_load(self.record.read_text("spec.yaml"))["spec"]
        return parse_spec(raw, self.record.uri("spec.yaml"), check_budget=False)

    def _table(self, rel: str) -> pd.DataFrame:
        import pandas as pd

        return self.record.read_table(rel) if self.record.has(rel) else pd.DataFrame()

    @property
    def trials(self) -> pd.DataFrame:
        """trials.parquet: one row per trial (config, status, summaries)."""
        return self._table("trials.parquet")

    @property
    def epochs(self) -> pd.DataFrame:
        """epochs.parquet: one row per trial and epoch."""
        return self._table("epochs.parquet")

    @property
    def retrained(self) -> pd.DataFrame:
        """retrain.parquet (empty before ``retrain``)."""
        return self._table("retrain.parquet")

    @property
    def status_counts(self) -> dict[str, int]:
        trials = self.trials
        return {str(k): int(v) for k, v in trials["status"].value_counts().items()} if len(trials) else {}

    @property
    def total_trials(self) -> int:
        """How many trials the stored spec asks for."""
        from cifar_tune.tuning.sources import num_trials

        return num_trials(self.spec)

    @property
    def finished(self) -> bool:
        """Every trial of the spec ran to an end (completed, stopped, diverged, error or oom)."""
        from cifar_tune.results import FINISHED

        trials = self.trials
        return len(trials) >= self.total_trials and bool(trials["status"].isin(FINISHED).all())

    def best(self, k: int = 1, rank_by: str | None = None) -> pd.DataFrame:
        """The top ``k`` trials as ``retrain`` ranks them (eligible trials, duplicates collapsed), with
        a ``rank`` column; ``rank_by``: best or last epoch's metric (default: the spec's retrain.rank_by)."""
        from cifar_tune.retrain import rank_trials
        from cifar_tune.spec.stored import load_stored_spec

        stored = load_stored_spec(self.record)
        trials = self.trials
        if trials.empty:
            return trials
        ranked = rank_trials(trials, metric=stored.search.metric, mode=stored.search.resolved_mode,
                             rank_by=rank_by or stored.retrain.rank_by)
        return ranked.head(k)

    def retrain(self, top: int | None = None, *, epochs: int | None = None, seeds: int | None = None,
                rank_by: str | None = None, address: str | None = None, num_cpus: int | None = None,
                dashboard: bool = False, pareto: bool = False, tsne: bool = True,
                out: Printer = print) -> pd.DataFrame:
        """``cifar-tune retrain``: refit the top configs on train+val, test them; the retrain table.
        ``pareto``: refit the trials on the Pareto front of ``search.objectives`` instead (``top`` then
        takes the first K by rank, then crowding). ``tsne=False`` skips the rank-1 model's t-SNE feature map."""
        from cifar_tune.retrain import run_retrain

        return run_retrain(self.record, top=top, epochs=epochs, seeds=seeds, rank_by=rank_by, address=address,
                           num_cpus=num_cpus, dashboard=dashboard, pareto=pareto, tsne=tsne, out=out)

    def report(self, out: Printer = print) -> str:
        """``cifar-tune report``: write report.md and its plots; returns report.md's path."""
        from cifar_tune.report import build_report

        build_report(self.record, out=out)
        return self.record.uri("report.md")

    def checkpoints(self) -> list[str]:
        """The retrain checkpoints (``checkpoints/*.pt``)."""
        return sorted(str(p) for p in self.record.local_dir().glob("checkpoints/*.pt"))

    def evaluate(self, checkpoint: str | None = None, *, data: Sequence[str] | None = None, split: str = "test",
                 device: str | None = None, out: Printer = print) -> list[CheckpointEval]:
        """``cifar-tune evaluate``: one checkpoint, or (None) every retrain checkpoint of the experiment,
        on its own data or on ``data`` (dataset names or .npz files)."""
        from cifar_tune.engine.devices import parse_device
        from cifar_tune.retrain import run_evaluate

        try:
            dev = parse_device(device)
        except ValueError as e:
            raise UserError(str(e)) from None
        targets = [checkpoint] if checkpoint else self.checkpoints()
        if not targets:
            raise UserError(f"{self.path}: no checkpoints/*.pt (run retrain first)")
        found: list[CheckpointEval] = []
        for path in targets:
            found += run_evaluate(path, list(data) if data else None, split, out=out, device=dev)
        return found

    def resume(self, overrides: Sequence[str] | Mapping[str, Any] | None = None, **kwargs: Any) -> Experiment:
        """Continue an interrupted search from its stored spec (``search --resume NAME``)."""
        return search(None, name=self.name, storage=self.record.storage.uri(), resume=True, overrides=overrides, **kwargs)

    def dashboard(self, port: int = 8080, out: Printer = print) -> None:
        """``cifar-tune dashboard``: serve the trials dashboard until interrupted."""
        from cifar_tune.watch.dashboard import serve

        serve(self.record, port=port, out=out)
