"""The promotion gate on the benchmark suite: no dataset may fall more than a margin below the champion
or below the candidate's own start, however much the suite's mean improves.

A dataset's score is its mean recall (retrieval) or top-1 (zero-shot), as the suite summary
(metrics/benchmark.json, `zhclip suite`) has it. The candidate's figures are logged on its MLflow run
as `benchmark/<dataset>/<figure>` (and `benchmark/<dataset>/score`), so the next candidate reads the
champion's from the registry; a champion registered before a dataset joined the suite has no score
there, and that dataset is compared with the start only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zhclip.components.core.errors import ZhclipError
from zhclip.components.evaluation.suite_config import PRIMARY

PREFIX = "benchmark"


@dataclass(frozen=True)
class DatasetVerdict:
    dataset: str
    passed: bool
    candidate: float
    champion: float | None
    start: float | None
    reason: str


def scores(suite: dict[str, Any], model: str) -> dict[str, float]:
    """Each dataset's score for `model` in the suite summary."""
    if model not in suite["models"]:
        raise ZhclipError(
            f"the benchmark suite scored {sorted(suite['models'])}, not {model!r}: add it to benchmark.models"
        )
    figures = suite["models"][model]
    return {name: float(figures[name][PRIMARY[task]]) for name, task in suite["tasks"].items()}


def suite_metrics(suite: dict[str, Any], model: str) -> dict[str, float]:
    """`model`'s suite figures as MLflow metric names: benchmark/<dataset>/<figure>, .../score, and the means."""
    by_dataset = scores(suite, model)  # first: it names a model the suite lacks
    figures = suite["models"][model]
    metrics = {f"{PREFIX}/{name}/{key}": value for name in suite["tasks"] for key, value in figures[name].items()}
    metrics |= {f"{PREFIX}/{name}/score": value for name, value in by_dataset.items()}
    return metrics | {f"{PREFIX}/{key}": value for key, value in figures.items() if not isinstance(value, dict)}


def champion_scores(run_metrics: dict[str, float]) -> dict[str, float]:
    """The dataset scores a version's run recorded (`benchmark/<dataset>/score`)."""
    return {
        key.split("/")[1]: value
        for key, value in run_metrics.items()
        if key.startswith(f"{PREFIX}/") and key.endswith("/score") and key.count("/") == 2
    }


def judge(
    candidate: dict[str, float], start: dict[str, float], champion: dict[str, float], margin: float
) -> list[DatasetVerdict]:
    """Each dataset passes unless it is below its start, or more than `margin` points below the champion."""
    verdicts = []
    for name, value in candidate.items():
        below_start = name in start and value < start[name]
        below_champion = name in champion and value < champion[name] - margin
        if below_start:
            reason = f"{value:.2f} is below its start's {start[name]:.2f}"
        elif below_champion:
            gap = champion[name] - value
            reason = f"{value:.2f} is {gap:.2f} below the champion's {champion[name]:.2f} (margin {margin})"
        else:
            versus = f"champion {champion[name]:.2f}" if name in champion else "no champion score"
            reason = f"{value:.2f} ({versus}, margin {margin})"
        verdicts.append(
            DatasetVerdict(
                name, not (below_start or below_champion), value, champion.get(name), start.get(name), reason
            )
        )
    return verdicts


def failures(verdicts: list[DatasetVerdict]) -> str:
    """The datasets that fail the gate, in words ('' when none does)."""
    return "; ".join(f"{verdict.dataset} {verdict.reason}" for verdict in verdicts if not verdict.passed)


def card_section(verdicts: list[DatasetVerdict]) -> list[str]:
    """The model card's table of the suite gate: each dataset's score beside the champion's and the start's."""
    lines = ["## Benchmark suite gate", "", "| dataset | score | champion | start | verdict |", "|---|---|---|---|---|"]
    for verdict in verdicts:
        champion = "" if verdict.champion is None else f"{verdict.champion:.2f}"
        start = "" if verdict.start is None else f"{verdict.start:.2f}"
        lines.append(
            f"| {verdict.dataset} | {verdict.candidate:.2f} | {champion} | {start} | "
            f"{'pass' if verdict.passed else 'FAIL: ' + verdict.reason} |"
        )
    return [*lines, ""]


def tags(verdicts: list[DatasetVerdict]) -> dict[str, str]:
    """One version tag per dataset: promotion.suite.<dataset> = pass/fail and why."""
    return {f"promotion.suite.{v.dataset}": f"{'pass' if v.passed else 'fail'}: {v.reason}" for v in verdicts}


def recorded(version_tags: dict[str, str]) -> list[dict[str, Any]]:
    """The verdicts a version's tags recorded, as the gate's summary lists them."""
    prefix = "promotion.suite."
    return [
        {"dataset": key[len(prefix) :], "passed": value.startswith("pass"), "reason": value.split(": ", 1)[-1]}
        for key, value in version_tags.items()
        if key.startswith(prefix)
    ]
