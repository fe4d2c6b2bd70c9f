"""`zhclip results`: where `dvc repro` left a project's results, and the headline figures, for people at
a terminal. It reads every step's summary (evaluation, registry, index), so it sits above them all."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zhclip.components.evaluation.suite import published_note, table_rows
from zhclip.components.search.index_store import describe_model

# The output paths declared in dvc.yaml.
FINAL_EVALUATION = Path("metrics/evaluate_stage2.json")
START_EVALUATION = Path("metrics/evaluate_start.json")
ZEROSHOT = "metrics/zeroshot_{model}_{set}.json"
REGISTER_SUMMARY = Path("metrics/register.json")
SUITE_SUMMARY = Path("metrics/benchmark.json")
INDEX_SUMMARIES = "metrics/index_*.json"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _chain_lines(chain: list[dict], chance: float) -> list[str]:
    start = chain[0]["mean_recall"]
    lines = [f"  test mean recall (T2I+I2T R@1/5/10, %), chance level {chance:.2f}:"]
    for entry in chain:
        gain = "" if entry is chain[0] else f", {entry['mean_recall'] - start:+.2f} over the start"
        lines.append(
            f"    {entry['model']:<7} {entry['mean_recall']:6.2f}  (T2I R@1 {entry['t2i_r1']:.1f}, "
            f"I2T R@1 {entry['i2t_r1']:.1f}{gain})"
        )
    return lines


def _zeroshot_lines(models: list[str]) -> list[str]:
    sets = sorted({path.stem.split("_")[-1] for path in Path("metrics").glob("zeroshot_*_*.json")})
    lines = []
    for name in sets:
        figures = {model: _load(Path(ZEROSHOT.format(model=model, set=name))) for model in models}
        shown = [f"{model} {result['top1']:.1f}" for model, result in figures.items() if result]
        if shown:
            chance = next(result["chance_top1"] for result in figures.values() if result)
            lines.append(f"  zero-shot {name} top-1 (%), chance {chance:.1f}: " + " -> ".join(shown))
    return lines


def _suite_lines() -> list[str]:
    suite = _load(SUITE_SUMMARY)
    if not suite:
        return []
    rows = table_rows(suite, every_figure=False)
    widths = [max(len(row[column]) if column < len(row) else 0 for row in rows) for column in range(len(rows[0]))]
    table = ["    " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return [f"  benchmark suite (%, every figure: reports/benchmark/report.html); {published_note(suite)}:", *table]


def headline() -> str:
    """A short report: model folders, metric files, start -> stages with the gains, zero-shot, registry state,
    search indexes."""
    lines = [
        "zhclip results",
        "  models:   models/start, models/stage1, models/stage2 (Hugging Face folders)",
        "  metrics:  metrics/*.json (dvc metrics show), plots/*.csv (dvc plots show), reports/*/report.html",
    ]
    final = _load(FINAL_EVALUATION) or _load(START_EVALUATION)
    if not final:
        return "\n".join(lines + ["  no evaluation results yet: run `dvc repro` (or `make demo`)"])
    lines += _chain_lines(
        final.get("chain") or [{"model": final.get("model", "stage2"), **final}], final["chance_mean_recall"]
    )
    lines += _zeroshot_lines(["start", "stage2"])
    lines += _suite_lines()
    if final.get("gain_over_start", 0) < 0:
        lines.append(
            '  WARNING the final model is below its start: see docs/training.md, "When a stage does not learn"'
        )
    registered = _load(REGISTER_SUMMARY)
    if registered:
        lines.append(
            f"  registry: {registered['model_name']} version {registered['version']} at {registered['tracking_uri']}; "
            f"champion is version {registered['champion_version']}"
        )
        lines.append(f"    gate: {registered['decision']}")
        lines.append(f'  pull it:  mlflow.pyfunc.load_model("models:/{registered["model_name"]}@champion")')
    for path in sorted(Path().glob(INDEX_SUMMARIES)):
        built = _load(path)
        assert built is not None  # a file the glob found
        lines.append(
            f"  search:   zhclip serve --index {built['index']}, then open http://127.0.0.1:8000/ "
            f"({built['images']} images, built by {describe_model(built['model'])})"
        )
    return "\n".join(lines)
