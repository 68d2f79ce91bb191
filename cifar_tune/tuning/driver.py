"""``cifar-tune search``: spec -> trials on Ray Tune -> experiment directory. Ray itself is in the
tuning layer's cluster, trainable, tuner and callbacks modules."""

from __future__ import annotations

import gc
import json
import math
import time
from typing import Any

import yaml

from cifar_tune.errors import UserError
from cifar_tune.results import FINISHED, Experiment, TrialLog, run_metadata, trial_label
from cifar_tune.spec.schema import Spec
from cifar_tune.text import plural
from cifar_tune.tuning.progress import (
    Facts,
    Fanout,
    GaugeSink,
    LiveTable,
    checkpoint_disk_line,
    leaderboard_lines,
)
from cifar_tune.tuning.sources import (
    OptunaSource,
    Printer,
    SampledSource,
    make_sampler,
    num_trials,
    trial_id_for,
)

# ---------------------------------------------------------------------------------------- driver


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """What must not change between a search and its resume (num_samples may grow: extend a run)."""
    d = json.loads(json.dumps(d, default=str))
    for key in ("num_samples", "max_concurrent"):
        d.get("search", {}).pop(key, None)
    d.pop("retrain", None)
    d.pop("tracking", None)  # trackers may be added or changed on resume
    return d


def check_experiment(spec: Spec, exp: Experiment, resume: bool) -> None:
    """Refuse a new search over an existing experiment, or a resume of a missing or different one.
    Reads only: it runs before anything is downloaded, connected or written."""
    if exp.exists() and not resume:
        raise UserError(f"experiment '{exp.name}' already exists at {exp.uri()}; pass --resume to continue it or --name NEW")
    if resume and not exp.exists():
        raise UserError(f"--resume: no experiment '{exp.name}' at {exp.uri()}")
    if resume:
        stored = yaml.safe_load(exp.read_text("spec.yaml"))["spec"]
        if _comparable(stored) != _comparable(spec.to_dict()):
            raise UserError(f"--resume: the spec differs from the one '{exp.name}' was started with ({exp.uri('spec.yaml')}); only search.num_samples/max_concurrent may change")


def stored_spec(storage: str, name: str, overrides: list[str] | None = None) -> Spec:
    """The spec an experiment was run with (its ``spec.yaml``, ``--set`` overrides included), with
    ``overrides`` on top: what ``search --resume NAME`` continues, so no resume command can drift."""
    from cifar_tune.spec.parse import apply_overrides, parse_spec

    exp = Experiment(storage, name)
    if not exp.exists():
        from cifar_tune.registry import did_you_mean
        from cifar_tune.results import experiment_names

        raise UserError(f"--resume: no experiment '{name}' at {exp.uri()}{did_you_mean(name, experiment_names(storage))}")
    raw = yaml.safe_load(exp.read_text("spec.yaml"))["spec"]
    return parse_spec(apply_overrides(raw, overrides or []), exp.uri("spec.yaml"))


def resume_command(exp: Experiment, address: str | None) -> str:
    """The command that continues ``exp``: everything else comes from its stored spec."""
    return f"cifar-tune search --resume {exp.name} --storage {exp.storage.uri()}" + (f" --address {address}" if address else "")


def _plan(spec: Spec, exp: Experiment, resume: bool, out: Printer) -> tuple[TrialLog, list[tuple[str, dict[str, Any]]], int]:
    """The trial log (restored when resuming) and the trials still to run."""
    sched = spec.search.scheduler
    kw = {"metric": spec.search.metric, "mode": spec.search.resolved_mode, "max_epochs": sched.max_epochs,
          "objectives": spec.search.pareto_objectives}
    check_experiment(spec, exp, resume)
    total = num_trials(spec)
    if resume:
        trials = exp.read_table("trials.parquet") if exp.has("trials.parquet") else None
        epochs = exp.read_table("epochs.parquet") if exp.has("epochs.parquet") else None
        log = TrialLog(exp, trials=trials, epochs=epochs, **kw)
        for tid, r in log.rows.items():
            if r["status"] not in FINISHED:
                log.check_checkpoint(tid)  # it continues from a checkpoint that is on disk
        # an unfinished trial continues from its last checkpoint: keep its epochs up to it, forget the rest
        def kept(e: dict[str, Any]) -> bool:
            r = log.rows[e["trial_id"]]
            return r["status"] in FINISHED or (bool(r.get("checkpoint")) and (e["epoch"] or 0) <= (r.get("checkpoint_epoch") or 0))
        log.epochs = [e for e in log.epochs if kept(e)]  # (summaries follow the kept rows)
    else:
        log = TrialLog(exp, **kw)
    finished = {tid for tid, r in log.rows.items() if r["status"] in FINISHED}
    todo: list[tuple[str, dict[str, Any]]] = []
    for tid, r in sorted(log.rows.items()):
        if tid not in finished:
            todo.append((tid, json.loads(r["config"])))
    if resume:
        cont = [t for t, _ in todo if log.rows[t].get("checkpoint")]
        out(f"resuming '{exp.name}': {len(finished)} finished trials kept, {len(cont)} unfinished continue from their "
            f"last checkpoint, {len(todo) - len(cont)} rerun")
    next_index = max((r["sample_index"] for r in log.rows.values()), default=-1) + 1
    if spec.search.algorithm != "optuna":
        sampler = make_sampler(spec)
        for i in range(next_index, total):
            s = sampler.sample(i)
            log.add_pending(trial_id_for(i), i, s.config, s.params)
            todo.append((trial_id_for(i), s.config))
    return log, todo, next_index


def scheduler_history(log: TrialLog) -> list[tuple[str, dict[str, Any], bool]]:
    """What the scheduler of a resumed search is rebuilt from: every kept epoch row with a finite
    metric, in the order the results arrived, and whether its trial had finished (see
    ``schedulers.make_scheduler``). Rows without the metric (a diverged epoch) were never judged. With
    several objectives each result also carries the other objectives as the trial reported them: the
    epoch's validation metrics and training seconds, and the trial's costs."""
    m = log.metric
    out = []
    for e in log.epochs:
        v = e.get(m)
        if e.get("epoch") is None or v is None or not math.isfinite(float(v)):
            continue
        result: dict[str, Any] = {"epoch": int(e["epoch"]), m: float(v)}
        row = log.rows[e["trial_id"]]
        for o in log.objectives:
            source = e if o.metric in ("val_acc", "val_loss", "val_top5", "train_time_s") else row
            if o.metric != m and source.get(o.metric) is not None:
                result[o.metric] = float(source[o.metric])
        out.append((e["trial_id"], result, row["status"] in FINISHED))
    return out


RAY_RESOURCE_UNIT = 10_000  # Ray counts resources in 1/10000ths: 0.1 CPU is 1000 units, exactly


def concurrent_slots(cpus: float, gpus: float, resources: dict[str, float]) -> int:
    """How many trials fit at once, as Ray schedules them: in Ray's fixed-point units, not float
    floor division (``1 // 0.1 == 9.0`` and ``0.9 // 0.3 == 2.0``; Ray fits 10 and 3)."""
    def units(v: float) -> int:
        return round(v * RAY_RESOURCE_UNIT)

    slots = max(1, units(cpus) // units(resources["cpu"]))
    if resources["gpu"]:
        slots = min(slots, units(gpus) // units(resources["gpu"]))
    return max(1, slots)


def tune_concurrency(spec: Spec, slots: int) -> int | None:
    """Ray Tune's ``max_concurrent_trials``. A paused trial holds one of its slots, so schedulers that
    pause trials get no limit but the resources (validation refuses hyperband with ``max_concurrent``,
    and synchronous pbt with fewer than its population); PBT's population is created up front, so it
    gets the user's limit only. The others get the user's limit or what fits in the cluster: the
    search algorithm then suggests a trial only when one can start (Optuna learns from more results)."""
    sched = spec.search.scheduler
    if sched.name == "hyperband":
        return None
    if sched.name == "pbt":
        return spec.search.max_concurrent
    return spec.search.max_concurrent or slots


def record_run(exp: Experiment, spec: Spec, resume: bool) -> None:
    """``spec.yaml``: the spec as now run, ``meta`` of the first run, and one ``resumes`` entry per
    ``--resume`` (its time, versions, code revision, and num_samples/max_concurrent, which may change)."""
    meta = run_metadata()
    doc: dict[str, Any] = {"spec": spec.to_dict(), "meta": meta}
    if resume:
        stored = yaml.safe_load(exp.read_text("spec.yaml"))
        entry = {**meta, "num_samples": spec.search.num_samples, "max_concurrent": spec.search.max_concurrent}
        doc = {"spec": spec.to_dict(), "meta": stored.get("meta", {}), "resumes": [*stored.get("resumes", []), entry]}
    exp.write_text("spec.yaml", yaml.safe_dump(doc, sort_keys=False))


def run_search(
    spec: Spec,
    *,
    storage: str,
    name: str | None = None,
    address: str | None = None,
    resume: bool = False,
    dashboard: bool = True,
    num_cpus: int | None = None,
    progress_every_s: float = 15.0,
    dashboard_port: int = 8080,
    out: Printer = print,
    progress: Printer | None = None,
) -> Experiment:
    """Run (or with ``resume`` continue) ``spec``'s search; ``progress``: where one status line per tick
    goes instead of the periodic table (``out`` still gets every other line)."""
    from cifar_tune.engine import data as data_mod
    from cifar_tune.tuning import cluster as cluster_mod
    from cifar_tune.watch import tracking

    exp = Experiment(storage, name or spec.name)
    tracking.check_available(spec.tracking)
    # the order matters: refusals that only read come first, then the data (downloaded once, in the
    # driver, and checked, so bad data is one line without Ray's start-up around it), then the cluster (a
    # wrong --address fails in seconds); the experiment is written last, so a failed start leaves nothing
    # that a second attempt would call "already exists"
    check_experiment(spec, exp, resume)
    data_mod.prepare(spec.data)
    data_mod.check_split(spec.data)  # a subset larger than the data set fails here, not in every trial
    mps, mps_why = search_mps(spec.search.resources, joins=cluster_mod.joins_cluster(address))
    from cifar_tune.engine.usermodels import factory_files

    cluster = cluster_mod.connect(address, dashboard=dashboard, num_cpus=num_cpus, mps=mps,
                                  mps_required=spec.search.resources.mps == "on", out=out,
                                  py_modules=factory_files(spec.space.get("model")))
    try:
        return _search_on(cluster, spec, exp, resume=resume, address=address, mps=(mps, mps_why), dashboard=dashboard,
                          dashboard_port=dashboard_port, progress_every_s=progress_every_s, out=out, progress=progress)
    finally:
        if cluster.started_here:  # a Ray instance started for this search ends with it (called from Python too)
            cluster_mod.shutdown()


def _search_on(cluster: Any, spec: Spec, exp: Experiment, *, resume: bool, address: str | None,
               mps: tuple[bool, str], dashboard: bool, dashboard_port: int, progress_every_s: float,
               out: Printer, progress: Printer | None = None) -> Experiment:
    """The search once connected: data, plan, trials on Ray Tune, records."""
    from cifar_tune.engine import data as data_mod
    from cifar_tune.tuning import callbacks as callbacks_mod
    from cifar_tune.tuning import trainable, tuner
    from cifar_tune.tuning.trial import TrialSetup
    from cifar_tune.watch import tracking

    mps_on, mps_why = mps
    log, todo, next_index = _plan(spec, exp, resume, out)
    log.trim_at_end = spec.search.scheduler.name == "pbt"  # exploits may still copy a finished trial's checkpoints
    total = num_trials(spec)
    record_run(exp, spec, resume)
    log.flush(force=True)
    print_cluster(cluster, out)
    if spec.search.resources.gpus_per_trial > 0:
        out(f"CUDA MPS {'on' if mps_on else 'off'}: {mps_why}")
    mirror, server = _trials_dashboard(spec, exp, log, serve=dashboard, port=dashboard_port, out=out)
    for line in tracking.describe(spec.tracking, exp):
        out(line)
    resources = tuner.trial_resources(spec.search.resources, cluster)
    slots = concurrent_slots(cluster.cpus, cluster.gpus, resources)
    max_concurrent = spec.search.max_concurrent or slots
    if spec.search.algorithm == "optuna":
        source: Any = OptunaSource(spec, log, todo, next_index, total)
        remaining = len(todo) + max(0, total - next_index)
    else:
        source = SampledSource(log, todo)
        remaining = len(todo)
    for line in gpu_warnings(cluster.gpus, spec.search.resources.gpus_per_trial, min(max_concurrent, slots)):
        out(line)
    out(
        f"search '{exp.name}': {remaining} trials to run of {total}, {min(max_concurrent, slots)} at a time "
        f"({resources['cpu']:g} CPU" + (f", {resources['gpu']:g} GPU" if resources["gpu"] else "") + " each), "
        f"{spec.search.scheduler.name} up to {spec.search.scheduler.max_epochs} epochs; results in {exp.uri()}"
    )
    if (disk := checkpoint_disk_line(spec, [log.rows[t] for t, _ in todo], max_concurrent)) is not None:
        out(disk)
    if remaining == 0:
        out("nothing to run: every trial has finished")
    live = LiveTable(log, total, out, progress_every_s, progress)
    events = Fanout(live, mirror, GaugeSink(log, trainable.SearchGauges(exp.name, spec.search.metric, GaugeSink.STATUSES)))
    mlflow_args, wandb_args = tracking.search_callback_args(spec.tracking, exp)
    facts = Facts(log, spec.space)
    callbacks = [callbacks_mod.tensorboard_callback(facts),
                 *callbacks_mod.tracking_callbacks(mlflow=mlflow_args, wandb=wandb_args, facts=facts, experiment_uri=exp.uri())]
    setup = TrialSetup(data=spec.data, epochs=spec.search.scheduler.max_epochs, seed=spec.search.seed,
                       checkpoint_every=spec.search.checkpoint.every_epochs, costs=spec.search.costs)
    resume_from = {tid: exp.uri(log.rows[tid]["checkpoint"]) for tid, _ in todo if log.rows[tid].get("checkpoint")}
    run_name = f"search-{time.strftime('%Y%m%d-%H%M%S')}"  # TensorBoard's runs: search-.../t0007-vgg-sgd
    interrupted = False
    try:
        if remaining:
            tuner.run_search(
                setup=setup, source=source, events=events, scheduler=spec.search.scheduler,
                metric=spec.search.metric, mode=spec.search.resolved_mode, resources=resources,
                num_trials=remaining, max_failures=spec.search.max_failures,
                max_concurrent=tune_concurrency(spec, slots),
                storage_path=exp.uri("ray"), run_name=run_name,
                trial_names=lambda c: trial_label(c["trial_id"], c["config"]),
                # loaded once here and shared zero-copy: workers skip reading/generating it
                shared_data=data_mod.training_arrays(spec.data),
                experiment=exp.name, callbacks=callbacks,
                keep_checkpoints=spec.search.checkpoint.resolved_keep(spec.search.scheduler.name),
                resume_from=resume_from,
                resume_epochs={tid: int(log.rows[tid].get("checkpoint_epoch") or 0) for tid in resume_from},
                scheduler_history=scheduler_history(log) if resume else None,
                population=list(todo) if spec.search.scheduler.name == "pbt" else None,
                objectives=[(o.metric, o.resolved_mode) for o in spec.search.resolved_objectives],
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for r in log.rows.values():
            if r["status"] == "running":  # stopped by Ctrl-C: rerun on --resume
                r["status"] = "interrupted"
        log.trim_checkpoints()
        log.flush(force=True)
        log.write_hypervolume()
        if mirror is not None:
            mirror.close()
        if server is not None:  # served while the search runs; a later search in this process serves its own
            server.shutdown()
            server.server_close()
        # W&B's callback cleans up in __del__, which fails at interpreter exit: collect it while Ray is up
        callbacks.clear()
        gc.collect()
    unfinished = [r for r in log.rows.values() if r["status"] not in FINISHED]
    live.print_table()
    for line in leaderboard_lines(log):
        out(line)
    out(f"trials: {exp.uri('trials.parquet')}  epochs: {exp.uri('epochs.parquet')}  TensorBoard: tensorboard --logdir {exp.uri('ray')}")
    if interrupted or unfinished:
        out(f"{len(unfinished) + max(0, total - len(log.rows))} trials unfinished; continue with: {resume_command(exp, address)}")
    return exp


def search_mps(res: Any, *, joins: bool) -> tuple[bool, str]:
    """``search.resources.mps`` resolved for this run: (start the daemon?, why). A cluster that is
    joined runs its own daemons (README, GPUs); a local instance gets one when trials share its GPU."""
    from cifar_tune.engine import devices

    if joins:
        if res.mps == "on":
            raise UserError("search.resources.mps: on starts MPS for a local Ray instance only; on a cluster, "
                            "start nvidia-cuda-mps-control -d on each GPU node before Ray (README, GPUs)")
        return False, "joined a cluster (its nodes run MPS or not)"
    try:
        return devices.mps_wanted(res.mps, gpus_per_trial=res.gpus_per_trial, gpu_here=devices.gpu_memory_mb() is not None,
                                  available=devices.mps_available())
    except ValueError as e:
        raise UserError(str(e)) from None


def gpu_warnings(cluster_gpus: float, gpus_per_trial: float, concurrent: int) -> list[str]:
    """Say so when GPUs in the cluster would sit idle, or when GPU trials will run on the CPU."""
    if cluster_gpus > 0 and gpus_per_trial == 0:
        return [f"warning: the cluster has {plural(cluster_gpus, 'GPU')} but search.resources.gpus_per_trial is 0: trials "
                f"train on the CPU and the GPUs sit idle (e.g. gpus_per_trial: 0.25 packs 4 trials per GPU)"]
    if cluster_gpus == 0 and gpus_per_trial > 0:
        return [f"warning: search.resources.gpus_per_trial is {gpus_per_trial:g} but the cluster has no GPU: "
                "trials train on the CPU"]
    used = concurrent * gpus_per_trial
    if gpus_per_trial > 0 and used < cluster_gpus - 1e-9:
        return [f"warning: {concurrent} trials at a time x {gpus_per_trial:g} GPU use {used:g} of the cluster's "
                f"{cluster_gpus:g} GPUs; the rest sit idle (raise search.max_concurrent, or the CPUs per trial "
                "allow no more)"]
    return []


def _trials_dashboard(spec: Spec, exp: Experiment, log: TrialLog, *, serve: bool, port: int, out: Printer) -> tuple[Any, Any]:
    """Mirror the search into the Optuna journal and (unless --no-dashboard) serve it from this driver:
    (the mirror, the server or None)."""
    from cifar_tune.watch import dashboard

    try:
        mirror = dashboard.OptunaMirror(
            dashboard.journal_path(exp), study_name=exp.name, space=spec.space, log=log,
            scheduler=json.loads(json.dumps(spec.to_dict()["search"]["scheduler"])),
        )
    except UserError as e:
        out(f"trials dashboard: off ({e.lines[0]})")
        return None, None
    server = None
    if not serve:
        out(f"trials journal: {mirror.path}  (serve it: cifar-tune dashboard {exp.name})")
    elif dashboard.dashboard_available():
        server, address = dashboard.start_in_background(mirror.path, port)
        out(f"trials dashboard: {address}  (served by this driver while it runs; afterwards: cifar-tune dashboard {exp.name})")
    else:
        out(f"trials journal: {mirror.path}  (for the dashboard: pip install 'cifar-tune[dashboard]')")
    return mirror, server


def print_cluster(c: Any, out: Printer) -> None:
    where = "local Ray instance" if c.started_here else f"Ray cluster at {c.address}"
    out(f"{where}: {plural(c.nodes, 'node')}, {plural(c.cpus, 'CPU')}, {plural(c.gpus, 'GPU')}")
    if c.dashboard_url:
        out(f"Ray dashboard: {c.dashboard_url}")
    if c.token_auth:  # said here once, instead of Ray's own warning (cluster.quiet_ray_auth_warning)
        out("  Ray token authentication is on: " + ("log in to the dashboard with the token from `ray get-auth-token`; "
            if c.dashboard_url else "") + "nodes joining need ~/.ray/auth_token (RAY_AUTH_MODE=disabled turns it off)")
