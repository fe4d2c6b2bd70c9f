"""Run a command and print the CPU time (user + system) of every process started while it ran,
read every 0.1 s with bench.measure.read_cpu_of_processes (Ray's processes outlive their parent's wait,
so rusage misses them).

    python process_cpu.py COMMAND [ARGS...]
"""

import subprocess
import sys
import time

from bench.measure import read_cpu_of_processes


def main(command: list[str]) -> None:
    seen: dict[int, tuple[float, str]] = {}
    started = time.time()
    running = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while running.poll() is None:
        read_cpu_of_processes(started - 1, seen)
        time.sleep(0.1)
    time.sleep(0.5)
    read_cpu_of_processes(started - 1, seen)
    for cpu, label in sorted(seen.values(), reverse=True)[:8]:
        print(f"{cpu:6.2f} CPU-s  {label}")
    total = sum(cpu for cpu, _ in seen.values())
    print(f"total {total:.1f} CPU-s in {time.time() - started:.1f} s, exit {running.returncode}")


if __name__ == "__main__":
    main(sys.argv[1:])
