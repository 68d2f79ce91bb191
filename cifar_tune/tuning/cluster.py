"""Ray itself: connecting to a local or existing cluster, shutting down, and placing work on the device
Ray assigned to a worker.

The rest of the package talks to the tuning layer through plain Python objects: a ``TrialSource`` that
hands out (trial id, config) pairs and hears about results, and a ``SearchEvents`` sink that the
results store implements."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray

from cifar_tune.engine import devices
from cifar_tune.errors import UserError

TOKEN_PATH = Path.home() / ".ray" / "auth_token"


class TrialSource(Protocol):
    def next_trial(self) -> tuple[str, dict[str, Any]] | None: ...
    def trial_finished(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None: ...


class SearchEvents(Protocol):
    def trial_started(self, trial_id: str, config: dict[str, Any]) -> None: ...
    def trial_resumed(self, trial_id: str) -> None: ...
    def trial_result(self, trial_id: str, metrics: dict[str, Any]) -> None: ...
    def trial_checkpoint(self, trial_id: str, path: str, epoch: int) -> None: ...
    def trial_finished(self, trial_id: str, last: dict[str, Any]) -> None: ...
    def trial_errored(self, trial_id: str, message: str) -> None: ...
    def trial_retried(self, trial_id: str) -> None: ...
    def tick(self) -> None: ...


@dataclass(frozen=True)
class RayInfo:
    address: str
    dashboard_url: str | None
    started_here: bool
    cpus: float
    gpus: float
    nodes: int
    token_auth: bool


# ------------------------------------------------------------------------------------- the cluster


_local_services = contextlib.ExitStack()  # what a local instance started here needs stopped with it (MPS)


CONNECT_TIMEOUT_S = 10.0  # a reachable head answers a TCP connect in milliseconds, even under load


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in ``timeout_s`` with one line when nothing listens at a ``HOST:PORT`` address.

    ``ray.init`` retries an unreachable GCS for minutes before it gives up, so a mistyped address would
    look like a hang. ``auto`` (Ray finds the local cluster itself, or says at once that there is none)
    and client addresses (``ray://``, with their own timeout) are left to Ray.
    """
    import socket

    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379) or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(f"--address {address}: no Ray cluster answers there ({reason} after at most "
                        f"{timeout_s:g} s); start one with `ray start --head` or check the address") from None



class _RayAuthNotice(logging.Filter):
    """Drops Ray's "token authentication is enabled" warning, which ``ray.init`` logs on every start:
    the cluster line (``driver.print_cluster``) says it once, with what to do about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def quiet_ray_auth_warning() -> None:
    log = logging.getLogger(RAY_AUTH_LOGGER)
    if not any(isinstance(f, _RayAuthNotice) for f in log.filters):
        log.addFilter(_RayAuthNotice())


def joins_cluster(address: str | None) -> bool:
    """Would :func:`connect` join a running cluster rather than start a local instance?"""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def connect(address: str | None = None, *, dashboard: bool = True, num_cpus: int | None = None,
            mps: bool = False, mps_required: bool = False, out: Callable[[str], None] = print,
            py_modules: list[str] | None = None) -> RayInfo:
    """Start a local Ray instance, or join ``address`` (e.g. ``auto`` or ``10.0.0.1:6379``).

    A local instance offers trials ``num_cpus`` CPUs (default: :func:`devices.cpus_for_trials` of the
    machine's cores, the rest left to Ray's own processes). ``mps``: run the CUDA MPS daemon for the
    local instance's workers, started before them and stopped by :func:`shutdown`; if it does not start,
    an error with ``mps_required``, else a line through ``out`` and the search goes on without it.
    ``py_modules``: the researcher's model files, shipped to a joined cluster's workers (a local
    instance's workers load them from their paths).
    """
    started_here = False
    # a driver started by `ray job submit` finds its cluster in RAY_ADDRESS, as ray.init() would
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        quiet_ray_auth_warning()
        kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            check_reachable(address)
            if py_modules:
                kwargs["runtime_env"] = {"py_modules": list(py_modules)}
            try:
                ctx = ray.init(address=address, **kwargs)
            except ConnectionError as e:  # e.g. `auto` with no cluster on this machine
                raise UserError(f"--address {address}: {' '.join(str(e).split())[:300]}") from None
        else:
            if mps:  # before ray.init: the workers find the daemon through the variables it exports
                try:
                    _local_services.enter_context(devices.mps_daemon(True))
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    if mps_required:
                        raise RuntimeError(f"CUDA MPS did not start: {e}") from e
                    out(f"CUDA MPS did not start ({e}); trials share the GPU by time slices")
            ctx = ray.init(
                address="local",  # a new instance, even if another Ray runs on this machine
                num_cpus=num_cpus if num_cpus is not None else devices.cpus_for_trials(os.cpu_count() or 1),
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",  # never expose the dashboard beyond this machine by default
                **kwargs,
            )
            started_here = True
        url = getattr(ctx, "dashboard_url", None)
    else:
        url = None  # joined an instance this process already started (tests)
    res = ray.cluster_resources()
    return RayInfo(
        address=ray.get_runtime_context().gcs_address,
        dashboard_url=f"http://{url}" if url and not url.startswith("http") else url,
        started_here=started_here,
        cpus=res.get("CPU", 0.0),
        gpus=res.get("GPU", 0.0),
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
        token_auth=_token_auth_enabled(),
    )


def _token_auth_enabled() -> bool:
    """What Ray decided (it reads RAY_AUTH_MODE case-insensitively, defaults differ by version and by
    whether a token exists), not our guess from the environment. Private API: checked by the tests."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return bool(is_token_auth_enabled())


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
    _local_services.close()  # after the workers are gone: MPS outlives its clients


# ------------------------------------------------------------------------------------- placement


def ray_assignment() -> tuple[list[Any], str | None, float]:
    """What Ray gave this worker: its GPU ids, the CUDA_VISIBLE_DEVICES it set, and the GPU amount."""
    share = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    return list(ray.get_gpu_ids()), os.environ.get("CUDA_VISIBLE_DEVICES"), share


def assigned_device() -> tuple[Any, float | None]:
    """The device Ray assigned this worker (CPU if none) and its share of that GPU (None: all of it).
    """
    return devices.placement(*ray_assignment())


def prepare_worker() -> None:
    """Before a trial or refit builds anything in a worker: Inductor's compile workers sized to the CPUs
    Ray gave it (:func:`devices.limit_compile_threads`), not to the machine's cores."""
    devices.limit_compile_threads(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0))


def _on_assigned_device(fn: Callable[..., Any], place: Callable[[], tuple[Any, float | None]]) -> Callable[..., Any]:
    """A task body that receives ``device=`` and ``memory_fraction=`` from ``place()`` (Ray's assignment)."""

    def run(**kwargs: Any) -> Any:
        prepare_worker()
        device, share = place()
        return fn(**kwargs, device=device, memory_fraction=share)

    run.__name__ = run.__qualname__ = fn.__name__  # what the dashboard's Tasks page shows
    return run
