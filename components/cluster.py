"""Ray for a step's data work: the cluster at $RAY_ADDRESS (KubeRay), a Ray this process already
runs, or a local one started for the step and stopped after it (the embedded mode)."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def ray_runtime(num_cpus: int | None = None) -> Iterator[None]:
    """Ray connected for the block; a local instance gets `num_cpus` (default: this machine's cores)."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, log_to_driver=True,
                     configure_logging=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def ordered_map(fn: Callable[..., Any], calls: Iterable[tuple], in_flight_per_cpu: int = 2) -> Iterator[Any]:
    """`fn(*args)` for each args tuple as Ray tasks (one CPU each, on any node), results in input order.

    At most `in_flight_per_cpu` tasks per CPU of the cluster run or wait at once, so memory holds that
    many results, whatever the number of calls. A task's exception is raised here (Ray's error is an
    instance of the original exception's class too).
    """
    import ray

    remote = ray.remote(num_cpus=1)(fn)
    limit = max(1, int(ray.cluster_resources().get("CPU", 1)) * in_flight_per_cpu)
    pending: deque = deque()
    for args in calls:
        pending.append(remote.remote(*args))
        if len(pending) >= limit:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())
