"""Plain Ray tasks (refits, packed benches) on the device Ray assigns, reporting progress through a queue."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ray

from cifar_tune.tuning.cluster import _on_assigned_device, assigned_device

# ----------------------------------------------------------------------------------------- tasks


class _QueueReporter:
    """A picklable ``report(item)`` for tasks: puts the item on a Ray queue the driver drains."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, item: Any) -> None:
        self.queue.put(item)


def _drain(queue: Any, on_progress: Callable[[Any], None]) -> None:
    while not queue.empty():
        for item in queue.get_nowait_batch(queue.qsize()):
            on_progress(item)


def put(obj: Any) -> Any:
    """Store ``obj`` once in the object store; pass the ref as a task argument to share it."""
    return ray.put(obj)


def task_options(cpus: float, gpus: float) -> dict[str, Any]:
    """Ray options of :func:`run_tasks`' tasks. ``max_calls=0``: a worker runs any number of them (Ray
    makes it 1 for GPU tasks unless told, so that frameworks that never free GPU memory release it by
    exiting; our tasks free theirs, and a reused worker keeps its CUDA context and cached data)."""
    return {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 1, "max_calls": 0}


def run_tasks(
    fn: Callable[..., Any],
    calls: list[dict[str, Any]],
    *,
    cpus: float,
    gpus: float,
    on_progress: Callable[[Any], None] | None = None,
    poll_s: float = 0.5,
    place: Callable[[], tuple[Any, float | None]] = assigned_device,
) -> Iterator[tuple[int, Any]]:
    """Run ``fn(**kwargs)`` for each call as Ray tasks; yield ``(index, result)`` as each finishes.

    ``fn`` also receives ``device=`` and ``memory_fraction=``: the accelerator Ray gave the task and its
    share of it (``place``, default :func:`assigned_device`). ``fn`` must free what it used on the
    device when it returns (``devices.end_trial``): workers are reused, GPU tasks included (Ray's
    default for GPU tasks is a fresh process per task: a CUDA context and a data load per refit).

    With ``on_progress``, each call also gets ``report=``: items it reports reach ``on_progress`` in
    the driver (through a Ray queue polled every ``poll_s``), before that call's result is yielded.
    """
    queue = None
    if on_progress is not None:
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})  # a bookkeeping actor must not take a task's CPU
        calls = [{**kw, "report": _QueueReporter(queue)} for kw in calls]
    remote = ray.remote(**task_options(cpus, gpus))(_on_assigned_device(fn, place))
    pending = {remote.remote(**kw): i for i, kw in enumerate(calls)}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=poll_s if queue is not None else None)
            if queue is not None and on_progress is not None:
                _drain(queue, on_progress)
            for ref in done:
                i = pending.pop(ref)
                yield i, ray.get(ref)
    finally:
        for ref in pending:  # the caller stopped early (Ctrl-C, an error): do not leave work running
            ray.cancel(ref, force=True)
        if queue is not None:
            queue.shutdown()
