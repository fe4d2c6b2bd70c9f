"""A GPU suite's JSON lines as the tables and verdict of bench/RESULTS.md, and a chart.

    python -m bench.report bench/results/2026-11-28-h200 --plot throughput.png > tables.md

Reads every `*.jsonl` of the folder (what `bench/gpu_suite.sh` writes: train, ablations, embed,
input, and any re-runs), compares each training case with the reference case of its stage from the
same folder, and judges the targets of the performance issue: stage 2 at 2.0x and stage 1 at 2.1x
the reference, 12,000 images/s image embedding, and an input path that delivers the stage-2 target
rate. Cases that change the work (FLIP masking, cached image embeddings) are listed but never count
towards a target. Cases that failed or were skipped are listed with their reason.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from components.report import markdown_table

STAGE_TARGETS = {2: 2.0, 1: 2.1}  # x the reference's samples/s
EMBED_TARGET = 12_000  # images/s, bf16
MAX_INPUT_WORKERS = 16  # CPU cores the input path may use


@dataclass
class Suite:
    environment: dict
    train: list[dict]
    embed: list[dict]
    input: list[dict]
    failed: list[dict]


def load(folder: str | Path) -> Suite:
    """Every record of the folder's JSON-lines files, by benchmark; failed and skipped cases apart."""
    records = [json.loads(line) for path in sorted(Path(folder).glob("*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"error: no JSON lines in {folder}/*.jsonl; run bench/gpu_suite.sh with OUT={folder}")
    measured = [r for r in records if r["bench"] != "environment" and "error" not in r and "skipped" not in r]
    environment = next((r for r in records if r["bench"] == "environment" and r.get("matmul_peak_tflops")),
                       next((r for r in records if r["bench"] == "environment"), {}))
    return Suite(environment=environment, train=[r for r in measured if r["bench"] == "train"],
                 embed=[r for r in measured if r["bench"] == "embed"], input=[r for r in measured if r["bench"] == "input"],
                 failed=[r for r in records if "error" in r or "skipped" in r])


def changes_work(case: dict) -> bool:
    return bool(case.get("mask_ratio")) or bool(case.get("cache_image_embeds"))


def training_rows(suite: Suite) -> list[dict]:
    """Training cases by stage (2 first), each stage's reference first."""
    return sorted(suite.train, key=lambda r: (-r["stage"], r["impl"] != "reference"))


def reference_rates(suite: Suite) -> dict[int, float]:
    return {r["stage"]: r["samples_per_s"] for r in suite.train if r["impl"] == "reference"}


def verdict(suite: Suite) -> list[dict]:
    """One row per target: the best eligible case, its figure and whether it meets the target."""
    rows, references = [], reference_rates(suite)
    for stage, factor in STAGE_TARGETS.items():
        eligible = [r for r in suite.train if r["stage"] == stage and r["impl"] == "zhclip" and not changes_work(r)]
        if stage in references and eligible:
            best = max(eligible, key=lambda r: r["samples_per_s"])
            ratio = best["samples_per_s"] / references[stage]
            rows.append({"target": f"stage {stage} >= {factor}x reference ({factor * references[stage]:,.0f} samples/s)",
                         "case": best["case"], "measured": f"{best['samples_per_s']:,.0f} samples/s = {ratio:.2f}x",
                         "met": ratio >= factor})
    embedders = [r for r in suite.embed if r["impl"] == "zhclip"]
    if embedders:
        best = max(embedders, key=lambda r: r["images_per_s"])
        rows.append({"target": f"image embedding >= {EMBED_TARGET:,} images/s", "case": best["case"],
                     "measured": f"{best['images_per_s']:,.0f} images/s", "met": best["images_per_s"] >= EMBED_TARGET})
    paths = [r for r in suite.input if r.get("workers", 0) <= MAX_INPUT_WORKERS]
    if paths and 2 in references:
        needed = STAGE_TARGETS[2] * references[2]
        best = max(paths, key=lambda r: r["images_per_s"])
        where = "on the GPU" if best["case"].startswith("gpu") else f"on {best['workers']} CPU cores"
        rows.append({"target": f"input >= the stage-2 target rate ({needed:,.0f} images/s)", "case": best["case"],
                     "measured": f"{best['images_per_s']:,.0f} images/s {where}", "met": best["images_per_s"] >= needed})
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    return "\n".join(markdown_table([header, *rows]))


def _mfu(record: dict) -> str:
    return f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""


def markdown(suite: Suite) -> str:
    env, references = suite.environment, reference_rates(suite)
    parts = [f"Suite of {env.get('date', '?')} on {env.get('device', '?')}, torch {env.get('torch', '?')}, "
             f"transformers {env.get('transformers', '?')}; measured bf16 matmul peak "
             f"{env.get('matmul_peak_tflops') or '?'} TFLOP/s.", "## Verdict",
             _table(["target", "best case", "measured", "met?"],
                    [[r["target"], f"`{r['case']}`", r["measured"], "yes" if r["met"] else "**no**"] for r in verdict(suite)])]
    train_rows = [[f"`{r['case']}`", r["stage"], f"{r['samples_per_s']:,.0f}",
                   f"{r['samples_per_s'] / references[r['stage']]:.2f}" if r["stage"] in references else "",
                   r["gflop_per_sample"], _mfu(r), f"{r['peak_memory_mb'] / 1024:.1f}",
                   {True: "yes", False: "**no**"}.get(r.get("loss_matches"), ""), "yes" if changes_work(r) else ""]
                  for r in training_rows(suite)]
    parts += ["## Training (samples/s per GPU)",
              _table(["case", "stage", "samples/s", "x reference", "GFLOP/sample", "MFU", "peak memory (GiB)",
                      "loss matches plain", "changes the work"], train_rows)]
    if suite.embed:
        parts += ["## Image embedding (images/s)",
                  _table(["case", "batch", "images/s", "MFU", "peak memory (GiB)"],
                         [[f"`{r['case']}`", r["batch_size"], f"{r['images_per_s']:,.0f}", _mfu(r),
                           f"{r['peak_memory_mb'] / 1024:.1f}"] for r in suite.embed])]
    if suite.input:
        parts += ["## Input pipeline (images/s)",
                  _table(["case", "images", "images/s", "largest pixel difference from the processor"],
                         [[f"`{r['case']}`", r["images"], f"{r['images_per_s']:,.0f}", r.get("max_abs_diff_vs_processor", "")]
                          for r in suite.input])]
    if suite.failed:
        parts += ["## Not measured",
                  _table(["benchmark", "case", "why"], [[r["bench"], f"`{r['case']}`", r.get("error") or r.get("skipped")]
                                                       for r in suite.failed])]
    return "\n\n".join(parts) + "\n"


def plot(suite: Suite, path: str | Path) -> Path:
    """Training samples/s per case, one panel per stage, with the reference and the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = reference_rates(suite)
    stages = sorted({r["stage"] for r in suite.train}, reverse=True)
    per_stage = {stage: [r for r in training_rows(suite) if r["stage"] == stage] for stage in stages}
    figure, axes = plt.subplots(len(stages), 1, figsize=(8, 1 + 0.35 * len(suite.train) + len(stages)), squeeze=False,
                                gridspec_kw={"height_ratios": [len(per_stage[stage]) + 1 for stage in stages]})
    for axis, stage in zip(axes[:, 0], stages):
        cases = per_stage[stage]
        colours = ["grey" if r["impl"] == "reference" else "tab:orange" if changes_work(r) else "tab:blue" for r in cases]
        axis.barh([r["case"] for r in cases], [r["samples_per_s"] for r in cases], color=colours)
        if stage in references:
            axis.axvline(STAGE_TARGETS[stage] * references[stage], color="tab:red", linestyle="--",
                         label=f"target {STAGE_TARGETS[stage]}x reference")
            axis.legend(loc="lower right")
        axis.invert_yaxis()
        axis.set_title(f"stage {stage}: samples/s per GPU (orange: changes the work)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder of the suite's JSON-lines files")
    parser.add_argument("--out", help="write the Markdown here instead of standard output")
    parser.add_argument("--plot", help="also draw the training throughput chart into this PNG")
    args = parser.parse_args()
    suite = load(args.folder)
    text = markdown(suite)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    if args.plot:
        plot(suite, args.plot)


if __name__ == "__main__":
    main()
