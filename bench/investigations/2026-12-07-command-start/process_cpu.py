"""Run a command and print the CPU time (user + system) of every process started while it ran,
read every 0.1 s with bench.measure.cpu_of_command (Ray's processes outlive their parent's wait,
so rusage misses them).

    python process_cpu.py COMMAND [ARGS...]
"""

import sys

from bench.measure import cpu_of_command


def main(command: list[str]) -> None:
    code, wall, seen = cpu_of_command(command)
    for cpu, label in sorted(seen.values(), reverse=True)[:8]:
        print(f"{cpu:6.2f} CPU-s  {label}")
    total = sum(cpu for cpu, _ in seen.values())
    print(f"total {total:.1f} CPU-s in {wall:.1f} s, exit {code}")


if __name__ == "__main__":
    main(sys.argv[1:])
