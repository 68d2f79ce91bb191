"""``cifar-tune`` command line. User mistakes exit 2 with one line each and no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cifar_tune.errors import UserError
from cifar_tune.text import plural, summarize_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_STORAGE = "experiments"


def _fmt_config(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=False, default=str)


# -------------------------------------------------------------------------------------- commands


def cmd_validate(args: argparse.Namespace) -> int:
    from cifar_tune.spec.parse import load_spec
    from cifar_tune.spec.space import Sampler, iter_dists

    spec = load_spec(args.spec, args.set)
    searched = [p for p, d in iter_dists(spec.space, "space")]
    grid = Sampler(spec.space, seed=0, enumerate_choices=spec.search.algorithm == "grid").grid_size
    print(f"{args.spec}: valid spec '{spec.name}'")
    print(f"  data: {spec.data.dataset}, val_fraction {spec.data.val_fraction}" + (f", subset {spec.data.subset}" if spec.data.subset else ""))
    print(f"  {len(searched)} distributions searched" + (": " + ", ".join(searched) if searched else ""))
    print(
        f"  {spec.search.algorithm} search, grid size {grid}, {plural(spec.search.num_samples * grid, 'trial')}, "
        f"scheduler {spec.search.scheduler.name} up to {plural(spec.search.scheduler.max_epochs, 'epoch')}, "
        f"metric {spec.search.metric} ({spec.search.resolved_mode})"
    )
    return EXIT_OK


def cmd_preview(args: argparse.Namespace) -> int:
    from cifar_tune.spec.parse import load_spec
    from cifar_tune.tuning.budget import search_budget
    from cifar_tune.tuning.progress import checkpoint_disk_line
    from cifar_tune.tuning.sources import make_sampler, num_trials

    spec = load_spec(args.spec, args.set)
    sampler = make_sampler(spec)
    memory = _MemoryCheck(spec, args.gpu_memory_gb)
    for i in range(args.n):
        s = sampler.sample(i)
        note = f", {s.rejected} over budget rejected" if s.rejected else ""
        print(f"[{i}] params={s.params:,}{note}{memory.line(s.config)}")
        print(f"    {summarize_config(s.config)}")
    memory.summary()
    b = search_budget(num_trials(spec), spec.search.scheduler)
    sched = spec.search.scheduler
    print(f"\n{sched.name} budget for {plural(b.trials, 'trial')}, up to {plural(sched.max_epochs, 'epoch')} each:")
    if sched.name in ("asha", "mo_asha", "hyperband"):  # (mo_asha: the same rungs)
        print(f"  grace period {sched.grace_period}, reduction factor {sched.reduction_factor:g} (keeps the top 1/{sched.reduction_factor:g} per rung)")
        for i, (rungs, share) in enumerate(zip(b.brackets, b.bracket_share, strict=True)):
            if len(b.brackets) > 1:
                print(f"  bracket {i} (~{share:.0%} of the trials):")
            for r in rungs:
                print(f"  rung at epoch {r.epoch:>4}: ~{plural(r.trials, 'trial')}")
    print(
        f"  total epochs: ~{b.epochs_with_stopping:,} with early stopping vs {b.epochs_without_stopping:,} without "
        f"({b.saving:.0%} saved)"
    )
    total = num_trials(spec)
    drawn = [sampler.sample(i) for i in range(min(total, 200))]  # the rest extrapolated
    rows = [{"params": d.params, "config": json.dumps(d.config)} for d in drawn] * (total // len(drawn)) + \
        [{"params": d.params, "config": json.dumps(d.config)} for d in drawn[: total % len(drawn)]]
    if line := checkpoint_disk_line(spec, rows, spec.search.max_concurrent or total):  # (unknown cluster: all at once)
        print(f"  {line}")
    if args.time:
        _print_time_projection(spec, [(i, sampler.sample(i).config) for i in range(args.n)], b.epochs_with_stopping,
                               total, steps=args.time_steps, device_name=args.device)
    return EXIT_OK


def _print_time_projection(spec: Any, configs: list[tuple[int, dict[str, Any]]], budget_epochs: int, trials: int, *,
                           steps: int, device_name: str | None) -> None:
    """``preview --time``: measured rates of the sampled configs here, and the wall time they project."""
    from cifar_tune.engine import data as data_mod
    from cifar_tune.engine.devices import parse_device
    from cifar_tune.tuning.timing import duration, local_concurrency, measure, project

    try:
        device = parse_device(device_name)
    except ValueError as e:
        raise UserError(str(e)) from None
    data_mod.prepare(spec.data)
    train, val = data_mod.load_splits(spec.data)
    if spec.data.dataset == "synthetic":
        test_images = spec.data.synthetic.num_test
    else:
        try:
            test_images = len(data_mod.load_test(spec.data))
        except (data_mod.DataError, data_mod.TestSplitForbidden):  # no test split: retrain cannot test either
            test_images = 0
    threads = max(1, int(spec.search.resources.cpus_per_trial))
    rates = measure(spec, configs, device=device, steps=steps, threads=threads)
    conc = local_concurrency(spec, trials)
    runs = spec.retrain.top * spec.retrain.seeds
    p = project(rates, train_images=len(train), val_images=len(val), test_images=test_images,
                search_epochs=budget_epochs, trials=trials, concurrency=conc, retrain_runs=runs,
                retrain_epochs=spec.retrain.epochs)
    print(f"\nmeasured on {device} ({threads} thread(s) per trial, {steps} steps after warm-up per config):")
    for r in rates:
        print(f"  [{r.index}] {r.train_images_per_s:,.0f} img/s training, {r.eval_images_per_s:,.0f} img/s evaluation: "
              f"{len(train) / r.train_images_per_s + len(val) / r.eval_images_per_s:.2f} s per epoch")
    print(f"  search: ~{p.search_epochs:,} epochs x {p.epoch_s:.2f} s / {p.concurrency} at a time on this machine "
          f"= ~{duration(p.search_training_s)} training, + ~{duration(p.search_s - p.search_training_s)} start-up "
          f"and per-trial overhead (idle machine) -> ~{duration(p.search_s)} wall")
    print(f"  retrain: {runs} refits x {spec.retrain.epochs} epochs on train+val, {p.retrain_concurrency} at a time "
          f"-> ~{duration(p.retrain_s)}; search + retrain ~{duration(p.total_s)}")


class _MemoryCheck:
    """``preview``: each sampled config's estimated GPU memory against its share of a GPU."""

    def __init__(self, spec: Any, gpu_memory_gb: float | None) -> None:
        from cifar_tune.engine import data as data_mod
        from cifar_tune.engine.devices import gpu_memory_mb

        self.gpus_per_trial = spec.search.resources.gpus_per_trial
        self.info = data_mod.dataset_info(spec.data)
        self.images = data_mod.num_training_images(spec.data)
        self.gpu_mb = gpu_memory_gb * 1024 if gpu_memory_gb else gpu_memory_mb()
        self.share_mb = self.gpu_mb * self.gpus_per_trial if self.gpu_mb and self.gpus_per_trial else None
        self.over: list[float] = []

    def line(self, config: dict[str, Any]) -> str:
        from cifar_tune.engine.devices import estimate_config_memory_mb

        if not self.gpus_per_trial:
            return ""
        est = estimate_config_memory_mb(config, num_classes=self.info.num_classes, in_channels=self.info.channels,
                                        image_size=self.info.image_size, data_images=self.images)["total_mb"]
        if self.share_mb is not None and est > self.share_mb:
            self.over.append(est)
            return f", GPU memory ~{est:,.0f} MiB: OVER its share {self.share_mb:,.0f} MiB"
        return f", GPU memory ~{est:,.0f} MiB"

    def summary(self) -> None:
        if not self.gpus_per_trial:
            return
        if self.share_mb is None:
            print(f"(GPU memory estimated per trial; pass --gpu-memory-gb to check {self.gpus_per_trial:g} GPU per trial "
                  "against your GPUs)")
        elif self.over:
            print(f"warning: {len(self.over)} sampled configs need more than their {self.gpus_per_trial:g} share of a "
                  f"{self.gpu_mb / 1024:,.0f} GiB GPU ({self.share_mb:,.0f} MiB): they would fail with status oom; "
                  "raise gpus_per_trial (fewer trials per GPU) or lower the batch size")


def cmd_model_info(args: argparse.Namespace) -> int:
    from cifar_tune.engine.models import build_model, model_info
    from cifar_tune.spec.parse import load_yaml

    path = Path(args.model)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    cfg = load_yaml(path.read_text(), str(path))
    if not isinstance(cfg, dict) or "family" not in cfg:
        raise UserError(f"{path}: a model file is a mapping with 'family' and its hyperparameters")
    from cifar_tune.engine.usermodels import absolute_factories

    cfg = absolute_factories(cfg, path.parent)  # family python: its module next to the model file
    try:
        model = build_model(cfg, num_classes=args.num_classes, in_channels=args.channels, image_size=args.image_size)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    info = model_info(model, in_channels=args.channels, image_size=args.image_size)
    print(f"{path}: {cfg['family']} for {args.num_classes} classes, {args.channels}x{args.image_size}x{args.image_size} input")
    print(f"  trainable parameters  {info['params']:>15,}")
    print(f"  buffers               {info['buffers']:>15,}")
    print(f"  MACs per image        {info['macs']:>15,}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from cifar_tune.engine import data as data_mod
    from cifar_tune.spec.parse import load_spec
    from cifar_tune.tuning.sources import make_sampler
    from cifar_tune.tuning.trial import TrialSetup, run_trial

    spec = load_spec(args.spec, args.set)
    setup = TrialSetup(data=spec.data, epochs=args.epochs or spec.search.scheduler.max_epochs, seed=spec.search.seed)
    sample = make_sampler(spec).sample(args.index)
    print(f"sample {args.index}: params={sample.params:,} config={_fmt_config(sample.config)}")
    data_mod.prepare(spec.data)

    def report(m: dict[str, Any], checkpoint: bytes | None = None) -> None:
        val = f" val_loss {m['val_loss']:.4f} val_acc {m['val_acc']:.4f}" if "val_acc" in m else ""
        print(f"epoch {m['epoch']:>3}  train_loss {m['train_loss']:.4f} train_acc {m['train_acc']:.4f}{val}"
              f"  lr {m['lr']:.2e}  {m['images_per_s']:,.0f} img/s  {m['epoch_time_s']:.1f}s", flush=True)

    from cifar_tune.engine.devices import parse_device

    try:
        device = parse_device(args.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"device: {device}")
    result = run_trial(sample.config, setup, trial_id=f"t{args.index:04d}", report=report, device=device)
    print(f"status: {result.status} after {result.epochs_run} epochs ({result.train_time_s:.1f}s training)")
    return EXIT_OK if result.status == "completed" else EXIT_FAILED


def cmd_search(args: argparse.Namespace) -> int:
    """Exit 0: every trial finished and at least one trained; 1: none did; 130: interrupted (Ctrl-C),
    with the command that continues it printed."""
    from cifar_tune import api

    overrides = [*args.set, *tracking_overrides(args)]
    if args.resume and args.name and args.resume != args.name:
        raise UserError(f"--resume {args.resume} and --name {args.name} name different experiments")
    if args.spec is None and not args.resume:
        raise UserError("search: give a spec file, or --resume NAME to continue an experiment from its stored spec")
    exp = api.search(
        args.spec, name=args.resume or args.name, storage=args.storage, overrides=overrides,
        resume=args.resume is not None, address=args.address, dashboard=not args.no_dashboard,
        num_cpus=args.num_cpus, progress_every_s=args.progress_every, dashboard_port=args.dashboard_port,
        out=print, progress=False,
    )
    if not exp.finished:
        print("interrupted: the search did not finish (continue it with the command above)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not exp.trials["status"].isin(["completed", "stopped"]).any():
        print("error: no trial finished training (see the error column of trials.parquet)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def tracking_overrides(args: argparse.Namespace) -> list[str]:
    """--mlflow / --wandb / --wandb-mode are shorthands for --set tracking...."""
    out = []
    if args.mlflow:
        out.append(f"tracking.mlflow.uri={json.dumps(args.mlflow)}")
    if args.wandb:
        out.append(f"tracking.wandb.project={json.dumps(args.wandb)}")
    if args.wandb_mode:
        out.append(f"tracking.wandb.mode={args.wandb_mode}")
    return out


def cmd_dashboard(args: argparse.Namespace) -> int:
    from cifar_tune import api

    api.open(args.experiment, args.storage).dashboard(port=args.port)
    return EXIT_OK


def cmd_retrain(args: argparse.Namespace) -> int:
    from cifar_tune import api

    df = api.open(args.experiment, args.storage).retrain(
        top=args.top, epochs=args.epochs, seeds=args.seeds, rank_by=args.rank_by,
        address=args.address, num_cpus=args.num_cpus, dashboard=not args.no_dashboard, pareto=args.pareto,
        tsne=not args.no_tsne,
    )
    return EXIT_OK if (df["status"] == "completed").all() else EXIT_FAILED


def cmd_report(args: argparse.Namespace) -> int:
    from cifar_tune import api

    api.open(args.experiment, args.storage).report()
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    from cifar_tune import api

    df = api.list_experiments(args.storage)
    if df.empty:
        print(f"no experiment under {args.storage}")
        return EXIT_OK
    for row in df.to_dict("records"):
        counts = ", ".join(f"{int(row[s])} {s}" for s in (
            "completed", "stopped", "diverged", "error", "oom", "running", "pending", "interrupted") if row.get(s) == row.get(s) and row.get(s))
        metric = row.get("metric")
        best = row.get(f"best_{metric}") if isinstance(metric, str) else None
        best_txt = f"best {metric} {best:.4f} ({row['best_trial']})" if best == best and best is not None else "no ranked trial"
        trials = row.get("trials")
        trials_txt = f"{int(trials)} trials" if trials == trials and trials is not None else "no trials"
        print(f"{row['name']:<24} {trials_txt:<10} ({counts or 'none'})  {best_txt}")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cifar_tune import api
    from cifar_tune.engine.devices import parse_device
    from cifar_tune.retrain import run_evaluate

    try:
        device = parse_device(args.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    if _is_checkpoint(args.checkpoint):
        run_evaluate(args.checkpoint, args.data, args.split, device=device)
        return EXIT_OK
    exp = api.open(args.checkpoint, args.storage)
    if not exp.checkpoints():
        raise UserError(f"{exp.path}: no checkpoints/*.pt (run `cifar-tune retrain {args.checkpoint}` first)")
    exp.evaluate(data=args.data, split=args.split, device=args.device)
    return EXIT_OK


def _is_checkpoint(target: str) -> bool:
    """A checkpoint file, or a search trial's checkpoint directory (with trial.pt); else an experiment
    (its directory, or its name under ``--storage``)."""
    return Path(target).is_file() or target.endswith(".pt") or (Path(target) / "trial.pt").is_file()


def cmd_schema(args: argparse.Namespace) -> int:
    from cifar_tune.spec.json_schema import model_file_schema, spec_schema

    print(json.dumps(model_file_schema() if args.model_file else spec_schema(), indent=args.indent))
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from cifar_tune.bench.common import BenchOptions
    from cifar_tune.bench.run import markdown, run_benches, write_report

    # several models: rows a-d for each, the search (row e) once, with the first model
    models = [] if args.no_throughput else args.model.split(",")
    opts = [BenchOptions(model=m, device=args.device, batch_size=args.batch_size, threads=args.threads,
                         epoch_images=args.epoch_images, rounds=args.rounds, search=not args.no_search and i == 0,
                         policies=i == 0, only_policies=args.only_policies,
                         num_workers=args.loader_workers, compile=args.compile, only_ops=args.only_ops)
            for i, m in enumerate(models)]
    try:
        report = run_benches(opts)
        if args.pack or args.workflow:
            from cifar_tune.bench.common import model_config
            from cifar_tune.bench.pack import run_gpu_benches

            report.update(run_gpu_benches(args, model_config))
    except ValueError as e:
        raise UserError(str(e)) from None
    command = "cifar-tune " + " ".join(sys.argv[1:]) if args.json else None
    print(markdown(report, command))
    if args.json:
        print(f"wrote {args.json} and {write_report(report, args.json, command)}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ parser


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="search space YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, e.g. search.num_samples=4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-tune",
        description="Hyperparameter and architecture search for CIFAR-style image classification on Ray Tune.",
        epilog="Exit codes: 0 ok, 1 the work failed, 2 a mistake in the input (one line per problem), 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check a spec; exit 0 if valid, 2 with every error if not")
    _add_spec_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preview", help="print sampled configs with parameter counts and the ASHA budget")
    _add_spec_args(p)
    p.add_argument("-n", type=int, default=5, help="number of configs to sample (default 5)")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="memory of the cluster's GPUs, to check each trial's share (default: this machine's GPU)")
    p.add_argument("--time", action="store_true",
                   help="measure a few training steps of each sampled config here and project the wall time")
    p.add_argument("--time-steps", type=int, default=5, help="timed steps per config after 2 warm-up steps (default 5)")
    p.add_argument("--device", default=None, help="for --time: cpu, cuda, cuda:1 (default: cuda if available)")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("model-info", help="parameters, buffers and MACs of a model config")
    p.add_argument("model", help="model YAML: a mapping with 'family' and its hyperparameters")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--image-size", type=int, default=32)
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("train", help="train one sampled config of a spec without Ray (debug a config)")
    _add_spec_args(p)
    p.add_argument("--index", type=int, default=0, help="which sample of the space (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="default: search.scheduler.max_epochs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="run the spec's search on Ray Tune")
    p.add_argument("spec", nargs="?", default=None, help="search space YAML file (not needed with --resume NAME)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec key, e.g. search.num_samples=4 (repeatable)")
    p.add_argument("--name", help="experiment name (default: the spec's name)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root: a directory or a pyarrow URI (default: experiments)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (e.g. auto or HOST:6379)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="NAME",
                   help="continue an interrupted search: --resume NAME runs it from its stored spec (with the --set "
                   "overrides it was started with; --set search.num_samples=... extends it); with a spec file, "
                   "the spec must match the stored one")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance (default: all)")
    p.add_argument("--progress-every", type=float, default=15.0, metavar="SECONDS", help="live table interval")
    p.add_argument("--dashboard-port", type=int, default=8080, help="trials dashboard port on 127.0.0.1 (default 8080, else a free one)")
    p.add_argument("--mlflow", default=None, metavar="URI_OR_DIR", help="log to MLflow (= --set tracking.mlflow.uri=...)")
    p.add_argument("--wandb", default=None, metavar="PROJECT", help="log to W&B (= --set tracking.wandb.project=...)")
    p.add_argument("--wandb-mode", choices=("online", "offline", "disabled"), default=None, help="W&B mode (default online)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("dashboard", help="serve the trials dashboard of a running or finished experiment on 127.0.0.1")
    p.add_argument("experiment", nargs="?", default=None, help="experiment name (default: the most recent under --storage)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root (default: experiments)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080, else a free one)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("retrain", help="refit the top-K searched configs on train+val and evaluate them on the test split")
    p.add_argument("experiment", nargs="?", default=None,
                   help="experiment directory (as search prints it) or name under --storage (default: the most recent under --storage)")
    p.add_argument("--top", type=int, default=None, help="configs to retrain (default: the spec's retrain.top)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per refit (default: retrain.epochs)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per config (default: retrain.seeds)")
    p.add_argument("--rank-by", choices=("best", "last"), default=None, help="rank by the best or the last epoch's metric (default: retrain.rank_by)")
    p.add_argument("--pareto", action="store_true", help="refit every trial on the Pareto front of search.objectives "
                   "(with --top K: the K best by Pareto rank, then crowding distance)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root (default: experiments)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray instance (default: all)")
    p.add_argument("--address", default=None, help="join an existing Ray cluster (e.g. auto or HOST:6379)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard")
    p.add_argument("--no-tsne", action="store_true",
                   help="skip the t-SNE feature map of the best model (tsne.parquet; seconds to minutes on a CPU)")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("report", help="write report.md and PNG plots into the experiment directory")
    p.add_argument("experiment", nargs="?", default=None,
                   help="experiment directory (as search prints it) or name under --storage (default: the most recent under --storage)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root (default: experiments)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluate", help="evaluate a retrain or search-trial checkpoint: top-1, top-5 and loss")
    p.add_argument("checkpoint", help="a checkpoints/<trial>_seed<s>.pt file written by retrain, a search trial's "
                   "checkpoint (the `checkpoint` column of trials.parquet: a directory with trial.pt), or an "
                   "experiment (its directory, or its name under --storage): all its retrain checkpoints")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root for an experiment name (default: experiments)")
    p.add_argument("--data", nargs="+", default=None, metavar="DATASET_OR_NPZ",
                   help="evaluate on these instead of the checkpoint's own data (a dataset name or an .npz file)")
    p.add_argument("--split", choices=("test", "trainval", "val"), default="test",
                   help="default: test; val: the search's validation split (the checkpoint's data spec and split seed)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("schema", help="print the JSON Schema of a spec (for editor completion and checks)")
    p.add_argument("--model-file", action="store_true", help="the schema of a model YAML (model-info) instead")
    p.add_argument("--indent", type=int, default=2, help="JSON indentation (default 2)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("list", help="the experiments under a storage root: trials by status and the best score")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root (default: experiments)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("bench", help="measure training throughput against the hardware limit and Tune efficiency")
    p.add_argument("--model", default="quickstart", help="quickstart, lenet or a model YAML; several comma-separated (default: quickstart)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="torch threads for rows a-d (default: all cores)")
    p.add_argument("--epoch-images", type=int, default=8192, help="images per measured epoch (default 8192)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant (default 5)")
    p.add_argument("--json", default=None, metavar="OUT", help="write OUT (JSON) and OUT with .md (tables)")
    p.add_argument("--no-search", action="store_true", help="skip the Ray Tune search (row e)")
    p.add_argument("--only-policies", action="store_true",
                   help="run only row f: batched AutoAugment/RandAugment/TrivialAugment vs torchvision per image")
    p.add_argument("--no-throughput", action="store_true", help="skip rows a-e (only --pack / --workflow)")
    p.add_argument("--only-ops", action="store_true",
                   help="only count ATen ops per training step (augmentation, model, optimizer); seconds, any device")
    p.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers of row c, the per-image PIL pipeline (default 2)")
    p.add_argument("--compile", action="store_true", help="also time fit with torch.compile (compile cost, break-even)")
    p.add_argument("--pack", default=None, metavar="K,K,...",
                   help="packing: a real search with K trials sharing one GPU (gpus_per_trial 1/K; on CPU, K CPUs), e.g. 1,2,4,8,16")
    p.add_argument("--pack-model", default="seed000", help="model of the packing searches (default: seed000)")
    p.add_argument("--pack-epochs", type=int, default=3, help="epochs per packed trial (default 3; the first is not measured)")
    p.add_argument("--pack-batch-size", type=int, default=128, help="batch size of packed trials (default 128)")
    p.add_argument("--mps", default="off", help="off, on or off,on: packing without/with the CUDA MPS daemon")
    p.add_argument("--images", type=int, default=50_000, help="CIFAR-100-shaped synthetic images for --pack/--workflow")
    p.add_argument("--workflow", action="store_true", help="a shortened CIFAR-100 search + retrain (seed000_cifar100_asha.yaml), timed; the full one projected")
    p.add_argument("--workflow-trials", type=int, default=16)
    p.add_argument("--workflow-epochs", type=int, default=5)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # data-layer errors that are the user's to fix
        from cifar_tune.engine.data import DataError

        if isinstance(e, DataError):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    raise SystemExit(main())
