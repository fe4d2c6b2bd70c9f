"""What Ray's GCS holds against the number of finished tasks, under its task-event caps.

Ingest and validation run a Ray task per row group (256 rows): 41,000 tasks at 10M pairs, 780,000 at
200M. Ray's GCS keeps the events of the last `RAY_task_events_max_num_task_in_gcs` tasks for the
dashboard and the state API, and tracks the attempts it dropped, up to
`RAY_task_events_max_dropped_task_attempts_tracked_per_job_in_gcs` per job (Ray 2.60: 100,000 and
1,000,000 by default). This starts a local Ray as the steps do (`ray_runtime`), with the caps of each
--caps pair (tasks, dropped attempts), runs --tasks trivial tasks through the steps'
`ordered_map`, and prints the GCS process's PSS after each count.

    PYTHONPATH=. python <this folder>/ray_task_events.py --tasks 1000 4000 10000 20000 30000 \\
        --caps 100000,1000000 10000,1000000 1000,1000
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.measure import emit, pss_bytes

CAP_VARIABLES = (
    "RAY_task_events_max_num_task_in_gcs",
    "RAY_task_events_max_dropped_task_attempts_tracked_per_job_in_gcs",
)


def _nothing(number: int) -> int:
    return number


def probe(counts: list[int], caps: str) -> None:
    """In this process (the caps already in its environment): the GCS's PSS after each task count."""
    import psutil

    from zhclip.components.core.cluster import ordered_map, ray_runtime

    with ray_runtime(2):
        gcs = next(p for p in psutil.Process().children(recursive=True) if p.name().startswith("gcs_server"))
        done = 0
        for count in [0, *counts]:
            for _ in ordered_map(_nothing, ((number,) for number in range(count - done))):
                pass
            done = count
            time.sleep(3)  # the workers' last events reach the GCS (reported every second)
            emit(
                {
                    "bench": "ray_task_events",
                    "caps": caps,
                    "tasks": done,
                    "gcs_pss_mb": round(pss_bytes(gcs.pid) / 2**20, 1),
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 4000, 10000, 20000, 30000])
    parser.add_argument("--caps", nargs="+", default=["100000,1000000", "1000,1000"], help="TASKS,DROPPED pairs")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/ray_task_events.jsonl")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the child process of one caps pair
    args = parser.parse_args()
    if args.probe:
        probe(args.tasks, args.probe)
        return
    for caps in args.caps:
        env = dict(os.environ)
        env.update(zip(CAP_VARIABLES, caps.split(",")))
        command = [sys.executable, __file__, "--probe", caps, "--tasks", *map(str, args.tasks)]
        child = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        for line in child.stdout.splitlines():
            if line.startswith("{"):
                emit(json.loads(line), args.out / "ray_task_events.jsonl" if args.out else None)


if __name__ == "__main__":
    main()
