"""Run a command and print the CPU time (user + system) of every process started while it ran,
read with psutil every 0.1 s (Ray's processes outlive their parent's wait, so rusage misses them)."""

import subprocess
import sys
import time

import psutil

seen: dict[int, tuple[float, str]] = {}
started = time.time()
command = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read() -> None:
    for process in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
        info = process.info
        if info["pid"] == psutil.Process().pid or info["create_time"] < started - 1 or info["cpu_times"] is None:
            continue
        label = " ".join(info["cmdline"] or [info["name"]])[:80]
        seen[info["pid"]] = (info["cpu_times"].user + info["cpu_times"].system, label)


while command.poll() is None:
    read()
    time.sleep(0.1)
time.sleep(0.5)
read()
for cpu, label in sorted(seen.values(), reverse=True)[:8]:
    print(f"{cpu:6.2f} CPU-s  {label}")
print(f"total {sum(cpu for cpu, _ in seen.values()):.1f} CPU-s in {time.time() - started:.1f} s, exit {command.returncode}")
