"""Data at scale: peak memory and throughput of ingest, validate, training and evaluation against the number of pairs.

    python -m bench.data_scale --pairs 10000 100000 1000000 --out bench/results/data-scale
    python -m bench.data_scale --pairs 1000000 10000000 --only ingest validate --image-size 16
    python -m bench.data_scale --pairs 300 600 --steps 2       # a smoke run

For each size, writes a Chinese-CLIP-format dataset (`train` with that many pairs of distinct
photo-like JPEGs, one caption each; a `valid` split of --valid pairs; a `test` split of a
twentieth of the pairs, at least --valid), then runs each step as a user does, through the `zhclip`
command line, in its own process tree:

    zhclip ingest, zhclip validate, zhclip train --stage 1 (--steps steps, --loader-workers Ray Data
    decoders), zhclip evaluate (the test split)

and samples the proportional set size (PSS) of the whole tree (Ray's processes included; shared
memory such as Ray's object store counted once) every 0.2 s. It prints one JSON line per (size,
step): peak memory, duration, throughput (ingest and validate: pairs/s; train: samples/s and the share
of time spent waiting for data; evaluate: queries/s, texts plus images), and the prepared data's
bytes; then, from the smallest to the largest size, each step's memory growth as a share of the
extra data's bytes, and between the two largest sizes its slope in bytes per pair, with the spill
memory budget (`--spill-memory-mb`, params.yaml `spill.spill_memory_mb`) it ran under. Each size's
folders are deleted once its steps ran (`--keep` keeps them); each line says the disk they took,
the peak of the spill folder included. `--input-workers` adds the images/s the streaming input delivers to a consumer
(no model) against the number of decoding processes, on the largest size.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from bench.input_pipeline import photo_like_jpeg
from bench.measure import emit, pss_bytes

ZHCLIP = str(Path(sys.executable).parent / "zhclip")
STEPS = ("ingest", "validate", "train", "evaluate")


def _image_lines(first: int, count: int, size: int) -> str:
    return "".join(
        f"{i}\t{base64.urlsafe_b64encode(photo_like_jpeg(i, size, size)).decode()}\n"
        for i in range(first, first + count)
    )


def write_raw(folder: Path, pairs: int, valid: int, size: int, workers: int) -> dict[str, int]:
    """The dataset in Chinese-CLIP's format; returns the pairs per split."""
    folder.mkdir(parents=True)
    counts = {"train": pairs, "valid": valid, "test": max(valid, pairs // 20)}
    first = 0
    with ProcessPoolExecutor(workers) as pool:
        for split, count in counts.items():
            chunks = [(start, min(5000, first + count - start)) for start in range(first, first + count, 5000)]
            with open(folder / f"{split}_imgs.tsv", "w") as images:
                for text in pool.map(
                    _image_lines, [c[0] for c in chunks], [c[1] for c in chunks], [size] * len(chunks)
                ):
                    images.write(text)
            with open(folder / f"{split}_texts.jsonl", "w", encoding="utf-8") as texts:
                for i in range(first, first + count):
                    texts.write(
                        json.dumps(
                            {"text_id": i, "text": f"第{i}张照片里有一只橘色的猫", "image_ids": [i]}, ensure_ascii=False
                        )
                        + "\n"
                    )
            first += count
    return counts


def _tree(root: int) -> list[int]:
    import psutil

    try:
        parent = psutil.Process(root)
        return [root] + [child.pid for child in parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _role(pid: int, root: int) -> str:
    """What a process of the tree is: the step's own process, one of Ray's daemons (a Python one by its
    script), or Ray's workers."""
    if pid == root:
        return "step"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = [word.decode(errors="replace") for word in cmdline.read().split(b"\0") if word]
    except OSError:
        return "gone"
    if not words or words[0].startswith("ray::"):
        return "ray workers"
    return Path(next((word for word in words if word.endswith(".py")), words[0])).name


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def measured(args: list[str], log: Path, cwd: Path, watch: Path | None = None) -> dict:
    """Run a command; its wall time and the peak PSS of its process tree (sampled every 0.2 s) with its
    share per kind of process at that peak, and the peak size of folder `watch` (sampled every 2 s)."""
    peak, peak_folder, peak_roles = [0], [0], {}
    with open(log, "w") as out:
        started = time.perf_counter()
        # A session of its own: Ray's processes stay in the tree (they are the command's descendants).
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)

        def sample() -> None:
            samples = 0
            while process.poll() is None:
                roles: dict[str, int] = {}
                for pid in _tree(process.pid):
                    role = _role(pid, process.pid)
                    roles[role] = roles.get(role, 0) + pss_bytes(pid)
                if (total := sum(roles.values())) > peak[0]:
                    peak[0] = total
                    peak_roles.clear()
                    peak_roles.update(roles)
                if watch and samples % 10 == 0:
                    peak_folder[0] = max(peak_folder[0], _folder_bytes(watch))
                samples += 1
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        sampler.join()
    if code:
        raise RuntimeError(f"{' '.join(args)} failed ({code}); see {log}:\n{log.read_text()[-2000:]}")
    result = {
        "seconds": round(time.perf_counter() - started, 2),
        "peak_pss_mb": round(peak[0] / 2**20, 1),
        "peak_by_process_mb": {role: round(pss / 2**20, 1) for role, pss in sorted(peak_roles.items()) if pss},
    }
    return {**result, "peak_spill_mb": round(peak_folder[0] / 2**20, 1)} if watch else result


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.parquet"))


def run_size(root: Path, pairs: int, args) -> list[dict]:
    counts = write_raw(root / "raw", pairs, args.valid, args.image_size, args.data_workers)
    params = {
        "ingest": {"image_format": "JPEG", "workers": args.data_workers},
        "spill": {"spill_memory_mb": args.spill_memory_mb, "spill_folder": str(root / "spill")},
        "train": {
            "batch_size": args.batch_size,
            "max_steps": args.steps,
            "warmup_steps": 1,
            "checkpoint_every": 0,
            "loader_workers": args.loader_workers,
            "cpus_per_worker": 1,
            "storage_path": str(root / "ray"),
        },
        "stage1": {"epochs": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    commands = {
        "ingest": ["ingest", "--raw", "raw", "--out", "prepared", "--summary", "ingest.json"],
        "validate": [
            "validate",
            "--data",
            "prepared",
            "--out",
            "validated",
            "--report",
            "validate.json",
            "--quarantine",
            "quarantine.jsonl",
            "--docs",
            "docs",
        ],
        "train": ["train", "--stage", "1", "--data", "validated", "--out", "model", "--summary", "train.json"],
        "evaluate": ["evaluate", "--model", "model", "--data", "validated", "--out", "evaluate.json"],
    }
    lines = []
    for step in args.only:
        result = measured(
            [ZHCLIP, *commands[step], "--params", "params.yaml"], root / f"{step}.log", root, root / "spill"
        )
        summary = json.loads((root / f"{step}.json").read_text())
        lines.append(
            {
                "bench": "data_scale",
                "pairs": pairs,
                "all_pairs": sum(counts.values()),
                "step": step,
                **result,
                **_throughput(step, summary, counts, result),
                "prepared_mb": round(_bytes(root / "prepared") / 2**20, 1),
                "spill_memory_mb": args.spill_memory_mb,
            }
        )
        emit(lines[-1], args.out and args.out / "data_scale.jsonl")
    disk = {"bench": "data_scale_disk", "pairs": pairs, "raw_mb": round(_folder_bytes(root / "raw") / 2**20, 1)}
    disk["all_folders_mb"] = round(_folder_bytes(root) / 2**20, 1)
    emit(disk, args.out and args.out / "data_scale.jsonl")
    return [*lines, disk]


def _throughput(step: str, summary: dict, counts: dict[str, int], result: dict) -> dict:
    if step in ("ingest", "validate"):
        return {"pairs_per_s": round(sum(counts.values()) / result["seconds"], 1)}
    if step == "train":
        return {"samples_per_s": summary["samples_per_s"], "data_wait_share": summary["data_wait_share"]}
    return {
        "queries_per_s": round((summary["texts"] + summary["images"]) / summary["duration_s"], 1),
        "texts": summary["texts"],
        "images": summary["images"],
    }


def growth(lines: list[dict], steps: list[str]) -> list[dict]:
    """Each step's peak-memory growth from the smallest to the largest size, against the extra data,
    and its slope in bytes per pair (all splits) between the two largest sizes."""
    lines = [line for line in lines if line["bench"] == "data_scale"]
    sizes = sorted({line["pairs"] for line in lines})
    if len(sizes) < 2:
        return []
    small, large = sizes[0], sizes[-1]
    out = []
    for step in steps:
        a, b = ({line["step"]: line for line in lines if line["pairs"] == n}[step] for n in (small, large))
        extra_mb = b["prepared_mb"] - a["prepared_mb"]
        # 4 bytes x 64 dimensions (the tiny preset) per text and image
        embeddings_mb = (
            (b.get("texts", 0) + b.get("images", 0) - a.get("texts", 0) - a.get("images", 0)) * 4 * 64 / 2**20
        )
        out.append(
            {
                "bench": "data_scale_growth",
                "step": step,
                "from_pairs": small,
                "to_pairs": large,
                "memory_growth_mb": round(b["peak_pss_mb"] - a["peak_pss_mb"], 1),
                "extra_data_mb": round(extra_mb, 1),
                "growth_share_of_extra_data": round((b["peak_pss_mb"] - a["peak_pss_mb"]) / max(extra_mb, 1e-9), 4),
                "extra_embeddings_mb": round(embeddings_mb, 1),
                **_slope({line["pairs"]: line for line in lines if line["step"] == step}, sizes[-2:]),
            }
        )
    return out


def _slope(by_size: dict[int, dict], two_largest: list[int]) -> dict:
    """Peak memory growth per pair (of all splits) between the two largest sizes."""
    a, b = (by_size[size] for size in two_largest)
    per_pair = (b["peak_pss_mb"] - a["peak_pss_mb"]) * 2**20 / max(1, b["all_pairs"] - a["all_pairs"])
    return {"slope_from_pairs": two_largest[0], "slope_bytes_per_pair": round(per_pair, 2)}


INPUT_BATCHES = 400  # per decoder count: long enough that the buffers filled while the decoders start do not count


def input_scaling(prepared: Path, workers: list[int], batch_size: int, out: Path | None = None) -> list[dict]:
    """Images/s the streaming input delivers (no model) against the number of Ray Data decoders."""
    import torch

    from bench.input_pipeline import ray_session, stream_rate
    from zhclip.model import build_model

    _, processor = build_model("tiny")
    lines = []
    for count in workers:
        with ray_session(True, count):
            rate = stream_rate(
                prepared, processor, count, batch_size, False, False, True, torch.device("cpu"), INPUT_BATCHES
            )
        lines.append(
            {
                "bench": "data_scale_input",
                "decoders": count,
                "images_per_s": round(rate.images_per_s, 1),
                "startup_s": round(rate.startup_s, 2),
            }
        )
        emit(lines[-1], out)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--valid", type=int, default=500, help="pairs of the valid split (the test split: pairs/20, at least this)"
    )
    parser.add_argument("--image-size", type=int, default=48, help="stored images are this many pixels square (JPEG)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=1, help="Ray Data decoders of the training run")
    parser.add_argument(
        "--data-workers", type=int, default=os.cpu_count() or 1, help="processes writing the data and ingesting it"
    )
    parser.add_argument(
        "--input-workers", type=int, nargs="*", default=[], help="decoder counts for the input-scaling case"
    )
    parser.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS), help="the steps to run, in order")
    parser.add_argument(
        "--spill-memory-mb", type=int, default=1024, help="params.yaml spill.spill_memory_mb of ingest and validation"
    )
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/data_scale.jsonl")
    parser.add_argument(
        "--keep", type=Path, help="build the datasets under this folder and keep them (default: a temporary one)"
    )
    args = parser.parse_args()

    lines: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.keep) as scratch:
        for pairs in sorted(args.pairs):
            root = Path(scratch) / f"pairs-{pairs}"
            lines += run_size(root, pairs, args)
            if not args.keep and not (args.input_workers and pairs == max(args.pairs)):
                shutil.rmtree(root)  # the next size needs the disk
        out = args.out and args.out / "data_scale.jsonl"
        for line in growth(lines, args.only):
            emit(line, out)
            lines.append(line)
        if args.input_workers:
            input_scaling(
                Path(scratch) / f"pairs-{max(args.pairs)}" / "validated", args.input_workers, args.batch_size, out
            )


if __name__ == "__main__":
    main()
