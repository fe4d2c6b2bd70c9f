"""What a step's local Ray costs to start and stop: `ray_runtime()` entered and left `--runs` times in
one process (as in-process tests and each step's command do), one trivial task in each, the wall time
of each phase and the CPU time of this process and every process Ray started (read with psutil every
0.1 s from a thread).

    PYTHONPATH=. python bench/investigations/2026-12-07-ray-start/measure.py --runs 5
"""

import argparse
import threading
import time

import psutil

from bench.measure import read_cpu_of_processes


def _cpu_of_new_processes(started: float, seen: dict[int, tuple[float, str]], stop: threading.Event) -> None:
    while not stop.is_set():
        read_cpu_of_processes(started, seen)
        time.sleep(0.1)


def main(runs: int) -> None:
    import ray

    from zhclip.components.core.cluster import ray_runtime

    me = psutil.Process()
    for run in range(1, runs + 1):
        seen: dict[int, tuple[float, str]] = {}
        stop = threading.Event()
        started, cpu_before = time.time(), sum(me.cpu_times()[:2])
        watcher = threading.Thread(target=_cpu_of_new_processes, args=(started - 0.5, seen, stop), daemon=True)
        watcher.start()
        with ray_runtime():
            up = time.time()
            ray.get(ray.remote(lambda: 1).remote())
            tasked = time.time()
        down = time.time()
        time.sleep(0.5)
        stop.set()
        watcher.join()
        driver, helpers = sum(me.cpu_times()[:2]) - cpu_before, sum(cpu for cpu, _ in seen.values())
        print(
            f"run {run}: start {up - started:.2f} s, first task {tasked - up:.2f} s, stop {down - tasked:.2f} s; "
            f"CPU: this process {driver:.2f} s, Ray's {len(seen)} processes {helpers:.2f} s"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    main(parser.parse_args().runs)
