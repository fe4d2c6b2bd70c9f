"""A GPU suite's JSON lines as the tables and verdict of bench/RESULTS.md, and a chart.

    python -m bench.report bench/results/2026-11-28-h200 --plot throughput.png > tables.md

Reads every `*.jsonl` of the folder (what `bench/gpu_suite.sh` writes: train, ablations, embed,
input, train-e2e, loss-curve, and any re-runs), compares each training case with the reference and
the peer (`hf-compile`, plain transformers + torch.compile) of its stage from the same folder, and
judges the performance targets: each stage at 1.25x the peer where the suite ran one (else, as the
first round: stage 2 at 2.0x and stage 1 at 2.1x the reference), 12,000 images/s image embedding,
an input path that delivers the stage-2 target rate, real JPEG shards training at 90% of the
random-tensor rate, and the fastest configuration's loss curve following the plain one's. Cases
that change the work (FLIP masking, cached image embeddings) are listed but never count towards a
target. Cases that failed or were skipped are listed with their reason.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from zhclip.components.evaluation.report import markdown_table

STAGE_TARGETS = {2: 2.0, 1: 2.1}  # x the reference's samples/s, where the suite ran no peer
PEER_TARGET = 1.25  # x the peer's samples/s
END_TO_END_TARGET = 0.9  # real-image training / random-tensor training
EMBED_TARGET = 12_000  # images/s, bf16
MAX_INPUT_WORKERS = 16  # CPU cores the input path may use


@dataclass
class Suite:
    environment: dict
    train: list[dict]
    embed: list[dict]
    input: list[dict]
    failed: list[dict]
    end_to_end: list[dict]
    loss_curves: list[dict]


def load(folder: str | Path) -> Suite:
    """Every record of the folder's JSON-lines files, by benchmark; failed and skipped cases apart."""
    records = [
        json.loads(line)
        for path in sorted(Path(folder).glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if not records:
        raise SystemExit(f"error: no JSON lines in {folder}/*.jsonl; run bench/gpu_suite.sh with OUT={folder}")
    measured = [r for r in records if r["bench"] != "environment" and "error" not in r and "skipped" not in r]
    environment = next(
        (r for r in records if r["bench"] == "environment" and r.get("matmul_peak_tflops")),
        next((r for r in records if r["bench"] == "environment"), {}),
    )
    return Suite(
        environment=environment,
        train=[r for r in measured if r["bench"] == "train"],
        embed=[r for r in measured if r["bench"] == "embed"],
        input=[r for r in measured if r["bench"] == "input"],
        failed=[r for r in records if "error" in r or "skipped" in r],
        end_to_end=[r for r in measured if r["bench"] == "train-e2e" and "input" in r],
        loss_curves=[r for r in measured if r["bench"] == "loss-curve"],
    )


def changes_work(case: dict) -> bool:
    return bool(case.get("mask_ratio")) or bool(case.get("cache_image_embeds"))


def training_rows(suite: Suite) -> list[dict]:
    """Training cases by stage (2 first), each stage's reference first, then its peer."""
    order = {"reference": 0, "hf": 1}
    return sorted(suite.train, key=lambda r: (-r["stage"], order.get(r["impl"], 2)))


def reference_rates(suite: Suite, impl: str = "reference") -> dict[int, float]:
    """Samples/s of each stage's `impl` case: the reference, or the peer (`hf`)."""
    return {r["stage"]: r["samples_per_s"] for r in suite.train if r["impl"] == impl}


def stage_targets(suite: Suite) -> dict[int, tuple[str, float, float]]:
    """Per stage: (what it is compared with, factor, samples/s needed): the peer where the suite ran one."""
    targets = {}
    for stage, factor in STAGE_TARGETS.items():
        peer, reference = reference_rates(suite, "hf").get(stage), reference_rates(suite).get(stage)
        if peer:
            targets[stage] = ("peer", PEER_TARGET, PEER_TARGET * peer)
        elif reference:
            targets[stage] = ("reference", factor, factor * reference)
    return targets


def verdict(suite: Suite) -> list[dict]:
    """One row per target: the best eligible case, its figure and whether it meets the target."""
    rows, targets = [], stage_targets(suite)
    for stage, (baseline, factor, needed) in targets.items():
        eligible = [r for r in suite.train if r["stage"] == stage and r["impl"] == "zhclip" and not changes_work(r)]
        if eligible:
            best = max(eligible, key=lambda r: r["samples_per_s"])
            ratio = best["samples_per_s"] / (needed / factor)
            rows.append(
                {
                    "target": f"stage {stage} >= {factor}x {baseline} ({needed:,.0f} samples/s)",
                    "case": best["case"],
                    "measured": f"{best['samples_per_s']:,.0f} samples/s = {ratio:.2f}x",
                    "met": ratio >= factor,
                }
            )
    embedders = [r for r in suite.embed if r["impl"] == "zhclip"]
    if embedders:
        best = max(embedders, key=lambda r: r["images_per_s"])
        rows.append(
            {
                "target": f"image embedding >= {EMBED_TARGET:,} images/s",
                "case": best["case"],
                "measured": f"{best['images_per_s']:,.0f} images/s",
                "met": best["images_per_s"] >= EMBED_TARGET,
            }
        )
    paths = [r for r in suite.input if r.get("workers", 0) <= MAX_INPUT_WORKERS]
    if paths and 2 in targets:
        needed = targets[2][2]
        best = max(paths, key=lambda r: r["images_per_s"])
        where = "on the GPU" if best["case"].startswith("gpu") else f"on {best['workers']} CPU cores"
        rows.append(
            {
                "target": f"input >= the stage-2 target rate ({needed:,.0f} images/s)",
                "case": best["case"],
                "measured": f"{best['images_per_s']:,.0f} images/s {where}",
                "met": best["images_per_s"] >= needed,
            }
        )
    real = [r for r in suite.end_to_end if r["input"] != "tensors" and r.get("x_tensors")]
    if real:
        best = max(real, key=lambda r: r["x_tensors"])
        rows.append(
            {
                "target": f"training from JPEG shards >= {END_TO_END_TARGET:.0%} of the random-tensor rate",
                "case": f"{best['case']} {best['input']}",
                "measured": f"{best['samples_per_s']:,.0f} samples/s = {best['x_tensors']:.0%}",
                "met": best["x_tensors"] >= END_TO_END_TARGET,
            }
        )
    for comparison in (r for r in suite.loss_curves if r["case"] == "comparison"):
        rows.append(
            {
                "target": f"loss curve of the fastest = plain's within {comparison['tolerance_nats']} nats "
                f"({comparison['window']}-step means)",
                "case": comparison["fast"],
                "measured": f"largest gap {comparison['max_gap_nats']} nats at step {comparison['max_gap_at_step']}",
                "met": comparison["curves_agree"],
            }
        )
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    return "\n".join(markdown_table([header, *rows]))


def _mfu(record: dict) -> str:
    return f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""


def markdown(suite: Suite) -> str:
    env, references, peers = suite.environment, reference_rates(suite), reference_rates(suite, "hf")
    parts = [
        f"Suite of {env.get('date', '?')} on {env.get('device', '?')}, torch {env.get('torch', '?')}, "
        f"transformers {env.get('transformers', '?')}; measured bf16 matmul peak "
        f"{env.get('matmul_peak_tflops') or '?'} TFLOP/s.",
        "## Verdict",
        _table(
            ["target", "best case", "measured", "met?"],
            [[r["target"], f"`{r['case']}`", r["measured"], "yes" if r["met"] else "**no**"] for r in verdict(suite)],
        ),
    ]
    train_rows = [
        [
            f"`{r['case']}`",
            r["stage"],
            f"{r['samples_per_s']:,.0f}",
            f"{r['samples_per_s'] / references[r['stage']]:.2f}" if r["stage"] in references else "",
            f"{r['samples_per_s'] / peers[r['stage']]:.2f}" if r["stage"] in peers else "",
            r["gflop_per_sample"],
            _mfu(r),
            f"{r['peak_memory_mb'] / 1024:.1f}",
            {True: "yes", False: "**no**"}.get(r.get("loss_matches"), ""),
            "yes" if changes_work(r) else "",
        ]
        for r in training_rows(suite)
    ]
    parts += [
        "## Training (samples/s per GPU)",
        _table(
            [
                "case",
                "stage",
                "samples/s",
                "x reference",
                "x peer",
                "GFLOP/sample",
                "MFU",
                "peak memory (GiB)",
                "loss matches plain",
                "changes the work",
            ],
            train_rows,
        ),
    ]
    if suite.embed:
        parts += [
            "## Image embedding (images/s)",
            _table(
                ["case", "batch", "images/s", "MFU", "peak memory (GiB)"],
                [
                    [
                        f"`{r['case']}`",
                        r["batch_size"],
                        f"{r['images_per_s']:,.0f}",
                        _mfu(r),
                        f"{r['peak_memory_mb'] / 1024:.1f}",
                    ]
                    for r in suite.embed
                ],
            ),
        ]
    if suite.input:
        parts += [
            "## Input pipeline (images/s)",
            _table(
                ["case", "images", "images/s", "largest pixel difference from the processor"],
                [
                    [f"`{r['case']}`", r["images"], f"{r['images_per_s']:,.0f}", r.get("max_abs_diff_vs_processor", "")]
                    for r in suite.input
                ],
            ),
        ]
    if suite.end_to_end:
        parts += [
            "## Training from JPEG shards (samples/s)",
            _table(
                [
                    "case",
                    "input",
                    "loader processes",
                    "samples/s",
                    "x random tensors",
                    "waiting for data",
                    "peak memory (GiB)",
                ],
                [
                    [
                        f"`{r['case']}`",
                        r["input"],
                        r["workers"],
                        f"{r['samples_per_s']:,.0f}",
                        f"{r['x_tensors']:.2f}",
                        f"{r['data_wait_share']:.0%}",
                        f"{r['peak_memory_mb'] / 1024:.1f}",
                    ]
                    for r in suite.end_to_end
                ],
            ),
        ]
    comparisons = [r for r in suite.loss_curves if r["case"] in ("comparison", "noise-floor")]
    runs = [r for r in suite.loss_curves if "losses" in r]
    if runs:
        parts += [
            "## Loss-curve runs",
            _table(
                ["run", "images decoded by", "steps", "first loss", "last loss", "seconds", "peak memory (GiB)"],
                [
                    [
                        f"`{r['case']}`",
                        r.get("applied", {}).get("decode", ""),
                        len(r["losses"]),
                        r["losses"][0],
                        r["losses"][-1],
                        r.get("seconds", ""),
                        f"{r['peak_memory_mb'] / 1024:.1f}" if "peak_memory_mb" in r else "",
                    ]
                    for r in runs
                ],
            ),
        ]
    if comparisons:
        parts += [
            "## Loss curves (plain against the fastest configuration)",
            _table(
                [
                    "compared",
                    "steps",
                    f"largest gap of the {comparisons[0]['window']}-step means (nats)",
                    "at step",
                    "final mean, plain",
                    "final mean, other",
                    "within the tolerance",
                ],
                [
                    [
                        f"`{r['plain']}` / `{r['fast']}`",
                        r["steps"],
                        r["max_gap_nats"],
                        r["max_gap_at_step"],
                        r["final_plain"],
                        r["final_fast"],
                        {True: "yes", False: "**no**", None: "(the noise floor: sets it)"}[r.get("curves_agree")],
                    ]
                    for r in comparisons
                ],
            ),
        ]
    if suite.failed:
        parts += [
            "## Not measured",
            _table(
                ["benchmark", "case", "why"],
                [[r["bench"], f"`{r['case']}`", r.get("error") or r.get("skipped")] for r in suite.failed],
            ),
        ]
    return "\n\n".join(parts) + "\n"


def plot(suite: Suite, path: str | Path) -> Path:
    """Training samples/s per case, one panel per stage, with the reference and the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages, targets = sorted({r["stage"] for r in suite.train}, reverse=True), stage_targets(suite)
    per_stage = {stage: [r for r in training_rows(suite) if r["stage"] == stage] for stage in stages}
    figure, axes = plt.subplots(
        len(stages),
        1,
        figsize=(8, 1 + 0.35 * len(suite.train) + len(stages)),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(per_stage[stage]) + 1 for stage in stages]},
    )
    for axis, stage in zip(axes[:, 0], stages):
        cases = per_stage[stage]
        colours = [
            "grey" if r["impl"] in ("reference", "hf") else "tab:orange" if changes_work(r) else "tab:blue"
            for r in cases
        ]
        axis.barh([r["case"] for r in cases], [r["samples_per_s"] for r in cases], color=colours)
        if stage in targets:
            baseline, factor, needed = targets[stage]
            axis.axvline(needed, color="tab:red", linestyle="--", label=f"target {factor}x {baseline}")
            axis.legend(loc="lower right")
        axis.invert_yaxis()
        axis.set_title(f"stage {stage}: samples/s per GPU (grey: reference and peer; orange: changes the work)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def plot_loss_curves(suite: Suite, path: str | Path) -> Path:
    """Every loss-curve run's per-step loss (faint) and its running mean over the comparison's window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.loss_curve import smoothed

    runs = [r for r in suite.loss_curves if "losses" in r]
    if not runs:
        raise SystemExit("error: no loss-curve runs in the folder; run python -m bench.loss_curve")
    window = next((r["window"] for r in suite.loss_curves if "window" in r), 20)
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for run, colour in zip(runs, ("tab:grey", "tab:blue", "tab:green", "tab:orange")):
        steps = range(1, len(run["losses"]) + 1)
        axis.plot(steps, run["losses"], color=colour, alpha=0.25, linewidth=0.8)
        axis.plot(
            range(window, len(run["losses"]) + 1),
            smoothed(run["losses"], window),
            color=colour,
            label=f"{run['case']} ({window}-step mean)",
        )
    first = runs[0]
    axis.set(
        xlabel="step",
        ylabel="contrastive loss (nats)",
        title=f"{first['preset']}, batch {first['batch_size']}, same data, initialisation and seed",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder of the suite's JSON-lines files")
    parser.add_argument("--out", help="write the Markdown here instead of standard output")
    parser.add_argument("--plot", help="also draw the training throughput chart into this PNG")
    parser.add_argument("--loss-plot", help="also draw the loss curves (bench.loss_curve's runs) into this PNG")
    args = parser.parse_args()
    suite = load(args.folder)
    text = markdown(suite)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    if args.plot:
        plot(suite, args.plot)
    if args.loss_plot:
        plot_loss_curves(suite, args.loss_plot)


if __name__ == "__main__":
    main()
