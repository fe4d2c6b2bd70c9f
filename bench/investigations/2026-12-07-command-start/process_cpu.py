"""Run a command and print the CPU time (user + system) of every process started while it ran,
read with psutil every 0.1 s (Ray's processes outlive their parent's wait, so rusage misses them).

    python process_cpu.py COMMAND [ARGS...]
"""

import subprocess
import sys
import time

import psutil


def _read(seen: dict[int, tuple[float, str]], started: float) -> None:
    for process in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
        info = process.info
        if info["pid"] == psutil.Process().pid or info["create_time"] < started - 1 or info["cpu_times"] is None:
            continue
        label = " ".join(info["cmdline"] or [info["name"]])[:80]
        seen[info["pid"]] = (info["cpu_times"].user + info["cpu_times"].system, label)


def main(command: list[str]) -> None:
    seen: dict[int, tuple[float, str]] = {}
    started = time.time()
    running = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while running.poll() is None:
        _read(seen, started)
        time.sleep(0.1)
    time.sleep(0.5)
    _read(seen, started)
    for cpu, label in sorted(seen.values(), reverse=True)[:8]:
        print(f"{cpu:6.2f} CPU-s  {label}")
    total = sum(cpu for cpu, _ in seen.values())
    print(f"total {total:.1f} CPU-s in {time.time() - started:.1f} s, exit {running.returncode}")


if __name__ == "__main__":
    main(sys.argv[1:])
