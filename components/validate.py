"""Validate: a Great Expectations suite over the prepared pairs; a failed expectation stops the run.

The offending rows of every failed row-level expectation go to a quarantine file with the
expectation that rejected them, and the error names the first few of them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.common import ZhclipError, timed, write_summary
from components.ingest import SPLITS, read_pairs

ID_COLUMNS = ["text_id", "image_id"]


@dataclass
class ValidateConfig:
    min_text_chars: int = 2
    max_text_chars: int = 200
    max_image_bytes: int = 20_000_000
    min_pairs_per_split: int = 1


def build_suite(config: ValidateConfig):
    """The expectation suite every prepared split must meet."""
    import great_expectations as gx

    expectations = gx.expectations
    suite = gx.ExpectationSuite(name="prepared_pairs")
    for expectation in [
        expectations.ExpectTableColumnsToMatchSet(column_set=["text_id", "text", "image_id", "image_bytes"]),
        expectations.ExpectTableRowCountToBeBetween(min_value=config.min_pairs_per_split),
        *[expectations.ExpectColumnValuesToNotBeNull(column=column) for column in ("text_id", "text", "image_id")],
        expectations.ExpectColumnValueLengthsToBeBetween(
            column="text", min_value=config.min_text_chars, max_value=config.max_text_chars
        ),
        expectations.ExpectColumnValuesToBeBetween(column="image_bytes", min_value=1, max_value=config.max_image_bytes),
        expectations.ExpectCompoundColumnsToBeUnique(column_list=ID_COLUMNS),
    ]:
        suite.add_expectation(expectation)
    return suite


def _frame(prepared_dir: Path, split: str) -> pd.DataFrame:
    pairs = read_pairs(prepared_dir, split)
    # GE checks the image's size, not its bytes, so the blob column is replaced by its length.
    return pairs.assign(image_bytes=pairs["image"].map(len)).drop(columns=["image"])


def _run_checkpoint(frames: dict[str, pd.DataFrame], config: ValidateConfig) -> dict:
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    suite = context.suites.add(build_suite(config))
    batch = context.data_sources.add_pandas("prepared").add_dataframe_asset("pairs").add_batch_definition_whole_dataframe("split")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="pairs", data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="prepared_pairs",
            validation_definitions=[definition],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ID_COLUMNS},
        )
    )
    return {
        split: next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))
        for split, frame in frames.items()
    }


def _failures(result) -> list[dict]:
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        # GE hands back numpy scalars; plain values keep the report and quarantine JSON-friendly.
        rows = [{key: getattr(value, "item", lambda v=value: v)() for key, value in row.items()}
                for row in item.result.get("unexpected_index_list") or []]
        failures.append({"expectation": config.type, "kwargs": {k: v for k, v in config.kwargs.items() if k != "batch_id"},
                         "unexpected_count": item.result.get("unexpected_count"), "rows": rows,
                         "observed": item.result.get("observed_value")})
    return failures


def validate(
    prepared_dir: str | Path,
    config: ValidateConfig,
    report_path: str | Path | None = None,
    quarantine_path: str | Path = "reports/validation_quarantine.jsonl",
) -> dict:
    """Run the suite on every split; raise ZhclipError (after writing the report) if any fails."""
    prepared_dir = Path(prepared_dir)
    frames = {split: _frame(prepared_dir, split) for split in SPLITS}
    report: dict = {"prepared_dir": str(prepared_dir)}
    with timed(report):
        results = _run_checkpoint(frames, config)
    report["splits"] = {}
    quarantined = []
    for split, result in results.items():
        failures = _failures(result)
        stats = result.statistics
        report["splits"][split] = {"rows": len(frames[split]), "success": bool(result.success),
                                   "evaluated": stats["evaluated_expectations"], "failed": len(failures), "failures": failures}
        quarantined += [{"split": split, "reason": f["expectation"], **row} for f in failures for row in f["rows"]]
    report["success"] = all(s["success"] for s in report["splits"].values())
    if quarantined:
        path = Path(quarantine_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantined), encoding="utf-8")
        report["quarantine"] = str(path)
    if report_path:
        write_summary(report_path, report)
    if not report["success"]:
        raise ZhclipError(_explain(report))
    return report


def _explain(report: dict) -> str:
    lines = ["data validation failed:"]
    for split, result in report["splits"].items():
        for failure in result["failures"]:
            rows = ", ".join(json.dumps(row, ensure_ascii=False) for row in failure["rows"][:3])
            where = f"; first offending rows: {rows}" if rows else f"; observed {failure['observed']}"
            lines.append(f"  {split}: {failure['expectation']} {failure['kwargs']} failed"
                         f" ({failure['unexpected_count'] or 0} rows){where}")
    if "quarantine" in report:
        lines.append(f"offending rows written to {report['quarantine']}")
    return "\n".join(lines)
