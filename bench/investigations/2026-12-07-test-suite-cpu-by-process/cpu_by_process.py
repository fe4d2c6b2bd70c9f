"""Where a run's CPU went, by kind of process, from Linux process accounting (`accton`).

    accton /tmp/pacct                 # as root, before the run
    ... the run ...
    accton off
    dump-acct /tmp/pacct > records.txt
    python cpu_by_process.py records.txt --phase lint=<epoch s> --phase docs=... --phase demo=... --phase test=...

The kernel writes one record per process when it exits: its name (`comm`: a script's file name, or
the name of the thread that exited last, such as Ray's `event_engine`), user and system CPU, parent
pid and start time. Each process is counted under the nearest of itself and its ancestors that names
a tool this project starts (a `zhclip` step with the Ray it started, `dvc`, `img2dataset`, a server),
else under its own name; a second table counts each process's own CPU by its kind (`group_of`), a
third by its name. A phase is the span between the given start times (`--phase NAME=EPOCH`, the
first phase from the first record). pids are reused on a long run: a parent is the process of
that pid alive when the child started.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import time
from typing import NamedTuple

TICKS_PER_S = 100  # dump-acct's utime/stime unit (AHZ)
# The tools each test or step starts, whose whole subtree is charged to them (the nearest one wins).
TOOLS = ("zhclip", "dvc", "img2dataset", "postgres", "moto_server", "chrome", "chromium", "mlflow", "git", "node")
# Names that are a thread's, not a program's: Ray's GCS, raylet and agents (C++ with gRPC) exit on one
# of these threads; pyarrow's jemalloc thread names any process that imported pyarrow (a pytest
# worker, dvc, a step) when it exits last.
RAY_SERVER_THREADS = (
    "grpc_global_tim", "resolver-execut", "timer_manager", "default-executo", "PipeReaderThd", "PipeDumpThd",
    "event_engine", "client.poll0", "global.accessor", "gcs_client_io_s", "worker.user_obj",
)  # fmt: skip


def group_of(name: str, parent: str) -> str:
    """A process's kind by its name and its parent's name (a best guess where the name is a thread's)."""
    if parent == "pytest":
        return "pytest's two workers (the tests run in-process)"
    if name.startswith("ray::") or name in ("pt_gloo_runloop", "gloo_tcp_loop"):
        return "Ray worker processes (ray::..., training workers with their gloo threads)"
    if name in RAY_SERVER_THREADS:
        return "Ray's GCS, raylet and agents (named by a gRPC thread)"
    if name == "jemalloc_bg_thd":
        return "a process that imported pyarrow, named by its jemalloc thread"
    return name


class Record(NamedTuple):
    name: str
    cpu_s: float
    pid: int
    ppid: int
    started: float
    ended: float


def read_records(path: str) -> list[Record]:
    records = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            fields = [field.strip() for field in line.split("|")]
            if len(fields) < 15:
                continue
            started = time.mktime(time.strptime(fields[14], "%a %b %d %H:%M:%S %Y"))
            elapsed = float(fields[4]) / TICKS_PER_S
            cpu = (float(fields[2]) + float(fields[3])) / TICKS_PER_S
            records.append(Record(fields[0], cpu, int(fields[9]), int(fields[10]), started, started + elapsed))
    return records


def parents_of(records: list[Record]) -> list[int | None]:
    """For each record, the index of its parent's record (the one of that pid alive at its start)."""
    by_pid: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
    for index, record in enumerate(records):
        by_pid[record.pid].append((record.started, index))
    for starts in by_pid.values():
        starts.sort()
    parents: list[int | None] = []
    for record in records:
        candidates = by_pid.get(record.ppid, [])
        position = bisect.bisect_right(candidates, (record.started + 1, len(records))) - 1
        found = None
        while position >= 0:
            _, index = candidates[position]
            if records[index].ended + 1 >= record.started:
                found = index
                break
            position -= 1
        parents.append(found)
    return parents


def kind_of(index: int, records: list[Record], parents: list[int | None]) -> str:
    depth = 0
    current: int | None = index
    while current is not None and depth < 200:  # a bound, should a reused pid ever make a loop
        name = records[current].name
        if name.startswith(TOOLS):
            return name.split()[0] + " (and what it started)"
        current, depth = parents[current], depth + 1
    return records[index].name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", help="dump-acct's output")
    parser.add_argument("--phase", action="append", default=[], help="NAME=EPOCH_SECONDS, in order")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    records = read_records(args.records)
    parents = parents_of(records)
    phases = [(name, float(epoch)) for name, epoch in (item.split("=") for item in args.phase)]
    starts = [epoch for _, epoch in phases]

    def phase_of(record: Record) -> str:
        position = bisect.bisect_right(starts, record.started) - 1
        return phases[position][0] if position >= 0 else "before"

    cpu: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    count: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_name: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_group: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for index, record in enumerate(records):
        phase = phase_of(record)
        kind = kind_of(index, records, parents)
        cpu[phase][kind] += record.cpu_s
        count[phase][kind] += 1
        by_name[phase][record.name] += record.cpu_s
        parent = parents[index]
        by_group[phase][group_of(record.name, records[parent].name if parent is not None else "")] += record.cpu_s
    for phase, _ in [("before", 0.0), *phases]:
        if phase not in cpu:
            continue
        total = sum(cpu[phase].values())
        print(f"== {phase}: {total:.0f} CPU-s in {sum(count[phase].values())} processes")
        _table("by the tool that started them (CPU-s, share, processes)", cpu[phase], total, args.top, count[phase])
        _table("by kind of process, its own CPU only (CPU-s, share)", by_group[phase], total, args.top)
        _table("by process name (CPU-s)", by_name[phase], total, args.top)


def _table(
    title: str, seconds_by: collections.Counter, total: float, top: int, counts: collections.Counter | None = None
) -> None:
    print(f"   {title}:")
    for key, seconds in seconds_by.most_common(top):
        processes = f"{counts[key]:6d}  " if counts is not None else ""
        print(f"   {seconds:9.0f}  {100 * seconds / total:5.1f} %  {processes}{key}")


if __name__ == "__main__":
    main()
