"""The one helper of bench/, the suite and the investigations alike: result output, memory and timing,
plus the GPU benchmarks' FLOPs, matmul peak and environment.

- output: `emit` writes a result as one JSON line (stdout, and a file when given);
- memory: `peak_rss_mb` (this process's resident peak), `resident_mb` (a process's resident set now or
  its peak since `reset_peak_rss`, from /proc), `pss_bytes` (a process's proportional set size),
  `peak_memory_mb` (a device's peak: the GPU's allocator, or the process's resident peak on a CPU);
- timing: `median_seconds` (the median of repeated calls) and `time_calls` (the mean of timed GPU calls);
- CPU time: `read_cpu_of_processes` (of every process started since a moment, Ray's included) and
  `cpu_of_command` (a command run to its end, reading them meanwhile).

Needs only the standard library; torch (and transformers, for `environment`) is imported by the
functions that measure a device, so the CPU benchmarks load neither, and psutil by
`read_cpu_of_processes`. Every figure is measured here,
none is taken from a data sheet: the matmul peak is timed on the device the benchmark runs on.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def emit(record: dict, out: Path | None = None) -> None:
    """One JSON line on stdout, flushed at once so a time-limited run keeps what it finished; also
    appended to `out` when given (its folder made)."""
    line = json.dumps(record, ensure_ascii=False)
    print(line, flush=True)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB (getrusage; Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1)


def resident_mb(field: str = "VmRSS", pid: int | str = "self") -> float:
    """A process's `field` of /proc/PID/status in MiB: VmRSS (resident now) or VmHWM (the resident peak
    since the start or the last `reset_peak_rss`)."""
    with open(f"/proc/{pid}/status") as status:
        return round(int(next(line for line in status if line.startswith(field + ":")).split()[1]) / 2**10, 1)


def reset_peak_rss() -> None:
    """Start this process's VmHWM again from its resident set now (Linux's clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def pss_bytes(pid: int) -> int:
    """A process's proportional set size in bytes (0 once it is gone, or when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            return next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


def read_cpu_of_processes(started: float, seen: dict[int, tuple[float, str]]) -> None:
    """Record into `seen`, by pid, the CPU time (user + system) so far and the command line of every
    process but this one started since `started` (a time.time()). Call it again and again while they
    run: Ray's processes are not waited for by their parent, so no rusage keeps their time."""
    import psutil

    for process in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "create_time"]):
        info = process.info
        if info["pid"] == psutil.Process().pid or info["create_time"] < started or info["cpu_times"] is None:
            continue
        label = " ".join(info["cmdline"] or [info["name"]])[:80]
        seen[info["pid"]] = (info["cpu_times"].user + info["cpu_times"].system, label)


def cpu_of_command(
    command: list[str], settle_s: float = 0.5, **popen
) -> tuple[int, float, dict[int, tuple[float, str]]]:
    """Run `command` (its output discarded; `popen` goes to subprocess.Popen) to its end, reading the
    CPU time of every process started meanwhile every 0.1 s, and once more `settle_s` after it exits
    (Ray's processes stop after their driver). Returns its exit status, its wall seconds and, by pid,
    each process's CPU seconds and command line."""
    import subprocess

    seen: dict[int, tuple[float, str]] = {}
    started = time.time()
    running = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    while running.poll() is None:
        read_cpu_of_processes(started - 1, seen)
        time.sleep(0.1)
    wall = time.time() - started
    time.sleep(settle_s)
    read_cpu_of_processes(started - 1, seen)
    return running.returncode, wall, seen


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """The median seconds of `repeats` calls of `fn`, after `warmup` untimed ones (lazy set-up)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention), counted by torch's own counter.

    Call it on the uncompiled step: the counter sees the aten operations that eager mode runs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of `fn`, after `warmup` untimed calls (compilation, autotuning, allocator)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def matmul_peak_tflops(
    device: torch.device, size: int = 8192, dtype: torch.dtype | None = None, steps: int = 50
) -> float:
    """Achieved dense matmul TFLOP/s: the best of a few timed runs of size x size x size products."""
    import torch

    dtype = dtype or torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = min(time_calls(lambda: a @ b, device, warmup=3, steps=steps) for _ in range(3))
    return 2 * size**3 / seconds / 1e12


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on CPU the process's peak resident size."""
    if device.type == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak_rss_mb()


def environment(device: torch.device) -> dict[str, str | None]:
    """Date, device name, torch, CUDA, transformers and Python versions: the context of a run."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "device": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def model_bench_parser(
    doc: str, catalogue: dict, default_cases: list[str], batch_size: int, presets: list[str]
) -> argparse.ArgumentParser:
    """The options every model benchmark takes: cases, preset, batch, steps, device, matmul peak, budget."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases", nargs="+", default=default_cases, help=f"cases to run, in order, or `all`: {', '.join(catalogue)}"
    )
    parser.add_argument("--preset", default="ViT-B-16", choices=presets)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--steps", type=int, default=20, help="timed calls per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per case (compilation happens here)")
    parser.add_argument("--device", default="auto", help="auto (first GPU, else CPU), cuda, cpu")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="matmul peak for MFU; measured (bf16, 8192^3) when not given"
    )
    parser.add_argument("--budget-s", type=float, default=None, help="skip the remaining cases after this many seconds")
    return parser


def count_then_time(
    eager: Callable[[], object],
    finish: Callable[[], tuple[Callable[[], object], dict]],
    device: torch.device,
    warmup: int,
    steps: int,
) -> tuple[int, float, dict, float]:
    """A case's measurement: FLOPs of one `eager` call (the counter needs eager code), then `finish()`
    (compilation, checks) giving the call to time and extra figures, then seconds per call after the
    warm-up. Returns (FLOPs, seconds per call, extra figures, seconds from `finish` to the end)."""
    flops = count_flops(eager)
    started = time.perf_counter()
    timed, extra = finish()
    reset_peak_memory(device)
    seconds = time_calls(timed, device, warmup, steps)
    return flops, seconds, extra, time.perf_counter() - started


def case_names(parser: argparse.ArgumentParser, requested: list[str], catalogue: dict) -> list[str]:
    """The requested case names (`all` for every one), or a usage error naming the unknown ones."""
    names = list(catalogue) if requested == ["all"] else requested
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(catalogue)}")
    return names


def start(device_name: str, peak_tflops: float | None) -> tuple[torch.device, float | None]:
    """The device and the matmul peak for MFU (measured on GPUs unless given), announced as the
    first JSON line with the date, device and versions."""
    import torch

    device = pick_device(device_name)
    torch.backends.cudnn.benchmark = True  # as cn-clip's training sets it, for every case alike
    peak = peak_tflops or (matmul_peak_tflops(device) if device.type == "cuda" else None)
    emit({"bench": "environment", **environment(device), "matmul_peak_tflops": peak and round(peak, 1)})
    return device, peak


def run_cases(
    bench: str, names: list[str], run: Callable[[str], dict], device: torch.device, budget_s: float | None = None
) -> None:
    """Run and emit each case; a failing case (e.g. a kernel this GPU lacks) is reported and the
    others still run; cases starting after `budget_s` seconds are reported as skipped."""
    started = time.perf_counter()
    for name in names:
        if budget_s and time.perf_counter() - started > budget_s:
            emit({"bench": bench, "case": name, "skipped": f"over the {budget_s:.0f} s budget"})
            continue
        try:
            emit(run(name))
        except Exception as err:  # reported in the output, never hidden
            emit({"bench": bench, "case": name, "error": f"{type(err).__name__}: {err}"[:2000]})
        gc.collect()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def rates(count: int, unit: str, seconds: float, flops: int, peak_tflops: float | None, device: torch.device) -> dict:
    """The figures every case reports: `unit`s per second for `count` items per call taking
    `seconds`, FLOPs per item (4 significant digits), achieved TFLOP/s, MFU and peak memory."""
    achieved = flops / seconds / 1e12
    return {
        f"{unit}s_per_s": round(count / seconds, 1),
        f"gflop_per_{unit}": float(f"{flops / count / 1e9:.4g}"),
        "tflops": float(f"{achieved:.4g}"),
        "mfu": round(achieved / peak_tflops, 4) if peak_tflops else None,
        "peak_memory_mb": peak_memory_mb(device),
    }
