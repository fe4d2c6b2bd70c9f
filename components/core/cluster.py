"""Ray for a step's data work: the cluster at $RAY_ADDRESS (KubeRay), a Ray this process already
runs, or a local one started for the step and stopped after it (the embedded mode)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RAY_LOG = Path("logs/ray.log")  # Ray's own messages from this process (relative to where the step runs)
# Ray Train's print patch sends every print of a worker to a logger that writes it to the console as
# well, so each line came twice; without it a worker's print reaches the driver once, as printed. Its
# own logging setup of the controller and workers prints every report and checkpoint at INFO; without
# it they log at the level of `ray.init(logging_config=...)` (errors).
QUIET_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
}
# Defaults for a Ray started here (a variable already set wins). A local machine is not preempted:
# Ray Train's watcher for that only adds an error line at start. Ray Train's controller acts on its
# workers' state (started, reported, finished, died) when it polls them, every 2 s by default: a
# short local stage waits for those polls (a 6-step stage on 2 vCPU x86: 38 s, 34 s at 0.25 s, mean
# of 3 in bench/investigations/2026-12-03-ray-train-poll), and polling a few local workers four times a
# second costs next to nothing. Ray's GCS keeps the events of the last 100,000 tasks for the
# dashboard and tracks up to 1,000,000 dropped ones: ingest and validation run a task per 256 rows, so
# its memory grew with the split, about 4 KiB a task
# (bench/investigations/2026-12-05-data-scale-memory/2026-12-05-cpu-ray-task-events);
# the last 1,000 tasks are plenty to debug a local step. Ray starts an idle worker process per CPU
# when the first driver connects; a training stage never uses them (Ray Train's actors run in the
# controller's runtime environment, so Ray starts workers of their own), and they cost 1.7-2.0 CPU-s
# per stage on 2 vCPU (bench/investigations/2026-12-07-train-stage-ray-env); tasks of the data steps
# start their workers when they first run instead. A cluster (RAY_ADDRESS) keeps its own settings.
LOCAL_RAY_ENV = {
    "RAY_prestart_worker_first_driver": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_task_events_max_num_task_in_gcs": "1000",
    "RAY_task_events_max_dropped_task_attempts_tracked_per_job_in_gcs": "1000",
}


class _RayLogHandler(logging.FileHandler):
    zhclip = True  # marks the handler this module installed


def _ray_messages_to_file() -> Path:
    """Send the `ray` loggers of this process to RAY_LOG instead of the console (once per process)."""
    ray_logger = logging.getLogger("ray")
    if not any(getattr(handler, "zhclip", False) for handler in ray_logger.handlers):
        RAY_LOG.parent.mkdir(parents=True, exist_ok=True)
        handler = _RayLogHandler(RAY_LOG, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.handlers = [handler]
        ray_logger.propagate = False
    return RAY_LOG.resolve()


@contextmanager
def ray_runtime(num_cpus: int | None = None) -> Iterator[None]:
    """Ray connected for the block; a local instance gets `num_cpus` (default: this machine's cores).

    The console keeps what people read (steps, progress, results, errors): Ray's own messages go to
    RAY_LOG, and Ray's worker processes log only errors; their full logs stay in Ray's session folder.
    Both paths are printed once.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        log_file = _ray_messages_to_file()
        os.environ.update(QUIET_RAY_ENV)
        quiet_workers = ray.LoggingConfig(log_level="ERROR")
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING, configure_logging=False, logging_config=quiet_workers)
        else:
            for name, value in LOCAL_RAY_ENV.items():
                os.environ.setdefault(name, value)
            # "local": a new Ray for this step, even where `ray start` left a cluster's address in Ray's
            # temp folder (a bare ray.init() joins that one, and then refuses num_cpus)
            with _address_for_ray_processes():
                ray.init(
                    address="local",
                    num_cpus=num_cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    log_to_driver=True,
                    configure_logging=False,
                    logging_level=logging.WARNING,
                    logging_config=quiet_workers,
                )
        workers = "the cluster's dashboard, Logs tab" if os.environ.get("RAY_ADDRESS") else _session_logs()
        print(f"Ray's messages: {log_file} (worker logs: {workers})", file=sys.stderr, flush=True)
    _keep_ray_data_singletons_on_this_node()
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


@contextmanager
def _address_for_ray_processes() -> Iterator[None]:
    """While a local Ray starts, its GCS port and RAY_ADDRESS are set for the processes it spawns.

    Ray Train's placement-group cleaner (an actor) asks Ray's State API with no address, which then
    looks for running GCS processes and fails with "Found multiple active Ray instances" when a second
    local Ray runs on the machine (two steps at once: `dvc queue start -j 2`, parallel tests); its
    thread dies with a traceback in the step's log. Ray's workers inherit the environment of the
    raylet, which inherits this one: with RAY_ADDRESS naming this Ray's own GCS they ask the right
    one. This process's environment is restored after the start, where RAY_ADDRESS means "a cluster".
    """
    port = os.environ.get("RAY_GCS_SERVER_PORT") or str(_free_port())
    own = {"RAY_GCS_SERVER_PORT": port, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    saved = {name: os.environ.get(name) for name in own}
    os.environ.update(own)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _keep_ray_data_singletons_on_this_node() -> None:
    """Create Ray Data's cluster-wide control actors here, on the driver's node, before any worker can.

    Ray Data (2.60) pins each of its detached, ever-restarting singletons (the autoscaling coordinator
    and requester, the actor location tracker) to the node of whoever first runs a dataset; when a
    training worker's loader is first and its node is lost, Ray restarts them on a node that is gone
    and every dataset after that fails with ActorUnschedulableError (tests/test_node_loss.py). Ray's
    fix, pinning them to the head node (ray-project/ray#62260), is not released; remove this when it
    is. Only a cluster of several nodes can lose one, so a single local Ray skips it.
    """
    import ray

    if sum(1 for node in ray.nodes() if node["Alive"]) < 2:
        return
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )
    from ray.data._internal.execution.autoscaling_requester import get_or_create_autoscaling_requester_actor
    from ray.data._internal.execution.node_trackers.actor_location import get_or_create_actor_location_tracker

    for create in (
        get_or_create_autoscaling_coordinator,
        get_or_create_autoscaling_requester_actor,
        get_or_create_actor_location_tracker,
    ):
        create()


def _session_logs() -> str:
    import ray

    # Ray has no public call for the session folder
    return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")  # pyright: ignore[reportPrivateImportUsage, reportAttributeAccessIssue]


def ordered_map(fn: Callable[..., Any], calls: Iterable[tuple], in_flight_per_cpu: int = 2) -> Iterator[Any]:
    """`fn(*args)` for each args tuple as Ray tasks (one CPU each, on any node), results in input order.

    At most `in_flight_per_cpu` tasks per CPU of the cluster run or wait at once, so memory holds that
    many results, whatever the number of calls. A task's exception is raised here (Ray's error is an
    instance of the original exception's class too).
    """
    import ray

    for ref in _submitted_in_order(ray.remote(num_cpus=1)(fn), calls, in_flight_per_cpu):
        yield ray.get(ref)


def ordered_streams(
    fn: Callable[..., Iterator[Any]], calls: Iterable[tuple], in_flight_per_cpu: int = 2, unread_per_task: int = 2
) -> Iterator[Iterator[Any]]:
    """`ordered_map` for a generator `fn`: for each args tuple, in input order, an iterator over what its
    task yields (read each one to its end before taking the next).

    A task pauses once `unread_per_task` of its items wait to be read, so memory holds about
    `in_flight_per_cpu * (unread_per_task + 1)` items per CPU however much one task has to yield (an
    img2dataset shard is 10,000 images by default). Ray's streaming generators do the pausing;
    `_generator_backpressure_num_objects` is how Ray Data's own map tasks set it (private in Ray 2.60).
    """
    import ray

    # ray.remote's overloads list only its public options
    remote = ray.remote(num_cpus=1, _generator_backpressure_num_objects=unread_per_task)(fn)  # pyright: ignore[reportCallIssue]
    for generator in _submitted_in_order(remote, calls, in_flight_per_cpu):
        yield (ray.get(ref) for ref in generator)


def _submitted_in_order(remote, calls: Iterable[tuple], in_flight_per_cpu: int) -> Iterator[Any]:
    """Each call's task handle, in input order, with at most `in_flight_per_cpu` tasks per CPU of the
    cluster submitted and not yet handed out."""
    import ray

    limit = max(1, int(ray.cluster_resources().get("CPU", 1)) * in_flight_per_cpu)
    pending: deque = deque()
    for args in calls:
        pending.append(remote.remote(*args))
        if len(pending) >= limit:
            yield pending.popleft()
    while pending:
        yield pending.popleft()
