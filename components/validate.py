"""Validate: a Great Expectations gate over the prepared pairs that loses nothing.

Each split is profiled (caption length and Chinese share, image decodes, size, aspect, bytes, id
consistency, duplicates, train/eval leakage) and checked by one expectation suite through a GE
checkpoint that also renders Data Docs. A row that breaks a row-level expectation is bad. If the
share of bad rows is within `max_bad_fraction`, they are removed from the validated data and written
to the quarantine file with every reason that applies; otherwise the step fails, naming each failed
expectation with example ids. Rows in = rows out + rows quarantined, always.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.common import ZhclipError, timed, write_summary
from components.ingest import PAIR_SCHEMA, SPLITS, read_pairs

COLUMNS = ["text_id", "text", "image_id", "image"]
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


@dataclass
class ValidateConfig:
    min_text_chars: int = 2
    max_text_chars: int = 200
    min_chinese_ratio: float = 0.3  # share of Han characters among non-space characters
    min_image_side: int = 8
    max_image_side: int = 10_000
    max_aspect_ratio: float = 10.0
    max_image_bytes: int = 20_000_000
    min_pairs_per_split: int = 1
    max_bad_fraction: float = 0.0  # above it the gate fails; at or below, bad rows are quarantined


def _image_facts(blob: bytes) -> dict:
    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            width, height = image.size
        decodes = True
    except Exception:  # any decoder failure means "does not decode", whatever PIL raises
        width = height = 0
        decodes = False
    return {"image_decodes": decodes, "image_width": width, "image_height": height,
            "image_aspect": max(width, height) / max(1, min(width, height)), "image_bytes": len(blob),
            "image_sha": hashlib.sha256(blob).hexdigest()}


def _chinese_ratio(text: str) -> float:
    visible = [ch for ch in text if not ch.isspace()]
    return sum(bool(HAN.match(ch)) for ch in visible) / max(1, len(visible))


def profile(pairs: pd.DataFrame, train_images: set[str]) -> pd.DataFrame:
    """The pairs plus the derived columns the suite checks (the image blob itself is dropped)."""
    missing = [c for c in COLUMNS if c not in pairs.columns]
    if missing:
        raise ZhclipError(f"prepared data lacks column(s) {missing}; re-run `zhclip ingest`")
    facts = pd.DataFrame([_image_facts(blob) for blob in pairs["image"]], index=pairs.index)
    frame = pd.concat([pairs.drop(columns=["image"]), facts], axis=1)
    frame["row"] = range(len(frame))
    frame["text_chars"] = frame["text"].fillna("").str.len()
    frame["chinese_ratio"] = frame["text"].fillna("").map(_chinese_ratio)
    frame["duplicate_pair"] = frame.duplicated(["text_id", "image_id"])
    frame["text_id_conflict"] = frame.groupby("text_id")["text"].transform("nunique") > 1
    frame["image_id_conflict"] = frame.groupby("image_id")["image_sha"].transform("nunique") > 1
    frame["leaked_from_train"] = frame["image_sha"].isin(train_images)
    return frame


def build_suite(config: ValidateConfig):
    """The expectation suite every profiled split must meet. Table-level checks come first."""
    import great_expectations as gx

    e = gx.expectations
    suite = gx.ExpectationSuite(name="prepared_pairs")
    flags = ("duplicate_pair", "text_id_conflict", "image_id_conflict", "leaked_from_train")
    for expectation in [
        e.ExpectTableRowCountToBeBetween(min_value=config.min_pairs_per_split),
        e.ExpectColumnValuesToBeInTypeList(column="text_id", type_list=["int64", "int32"]),
        e.ExpectColumnValuesToBeInTypeList(column="image_id", type_list=["int64", "int32"]),
        *[e.ExpectColumnValuesToNotBeNull(column=c) for c in ("text_id", "text", "image_id")],
        e.ExpectColumnValuesToBeBetween(column="text_chars", min_value=config.min_text_chars, max_value=config.max_text_chars),
        e.ExpectColumnValuesToBeBetween(column="chinese_ratio", min_value=config.min_chinese_ratio),
        e.ExpectColumnValuesToBeInSet(column="image_decodes", value_set=[True]),
        e.ExpectColumnValuesToBeBetween(column="image_width", min_value=config.min_image_side, max_value=config.max_image_side),
        e.ExpectColumnValuesToBeBetween(column="image_height", min_value=config.min_image_side, max_value=config.max_image_side),
        e.ExpectColumnValuesToBeBetween(column="image_aspect", max_value=config.max_aspect_ratio),
        e.ExpectColumnValuesToBeBetween(column="image_bytes", min_value=1, max_value=config.max_image_bytes),
        *[e.ExpectColumnValuesToBeInSet(column=flag, value_set=[False]) for flag in flags],
    ]:
        suite.add_expectation(expectation)
    return suite


def _checkpoint(config: ValidateConfig, docs_dir: Path | None):
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    actions = []
    if docs_dir:
        context.add_data_docs_site("zhclip", {
            "class_name": "SiteBuilder", "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())}})
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs"))
    suite = context.suites.add(build_suite(config))
    batch = context.data_sources.add_pandas("prepared").add_dataframe_asset("pairs").add_batch_definition_whole_dataframe("split")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="pairs", data=batch, suite=suite))
    return context.checkpoints.add(gx.Checkpoint(
        name="prepared_pairs", validation_definitions=[definition], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]}))


def _outcomes(result, frame: pd.DataFrame) -> list[dict]:
    """One entry per expectation: its name, success, and the rows (positions) it rejected."""
    outcomes = []
    for item in result.results:
        kwargs = item.expectation_config.kwargs
        rows = [entry["row"] for entry in item.result.get("unexpected_index_list") or []]
        examples = frame.iloc[rows[:3]][["text_id", "image_id"]].to_dict("records") if rows else []
        outcomes.append({"expectation": item.expectation_config.type,
                         "column": kwargs.get("column"), "success": bool(item.success), "rows": rows,
                         "unexpected_count": len(rows), "examples": examples,
                         "observed": item.result.get("observed_value")})
    return outcomes


def validate(
    prepared_dir: str | Path,
    out_dir: str | Path,
    config: ValidateConfig,
    report_path: str | Path | None = None,
    quarantine_path: str | Path = "reports/validation_quarantine.jsonl",
    docs_dir: str | Path | None = None,
) -> dict:
    """Check every split; write the good rows to `out_dir` and the bad ones to `quarantine_path`.

    Raises ZhclipError (after writing the report and Data Docs) when a table-level expectation fails
    or a split's share of bad rows exceeds `max_bad_fraction`.
    """
    prepared_dir, out_dir, quarantine_path = Path(prepared_dir), Path(out_dir), Path(quarantine_path)
    splits = {split: read_pairs(prepared_dir, split) for split in SPLITS}
    report: dict = {"prepared_dir": str(prepared_dir), "validated_dir": str(out_dir),
                    "max_bad_fraction": config.max_bad_fraction, "splits": {}}
    quarantined, failures = [], []
    with timed(report):
        checkpoint = _checkpoint(config, docs_dir)
        train_images: set[str] = set()
        for split, pairs in splits.items():  # train first: its image hashes define leakage
            frame = profile(pairs, train_images)
            if split == "train":
                train_images = set(frame["image_sha"])
            result = next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))
            outcomes = _outcomes(result, frame)
            reasons: dict[int, list[str]] = {}
            for outcome in outcomes:
                for row in outcome["rows"]:
                    reasons.setdefault(row, []).append(f"{outcome['expectation']}({outcome['column']})")
            table_failures = [o for o in outcomes if not o["success"] and not o["rows"]]
            bad_fraction = len(reasons) / max(1, len(frame))
            passed = not table_failures and bad_fraction <= config.max_bad_fraction
            if not passed:
                failures += [(split, o) for o in outcomes if not o["success"]]
            keep = [row for row in range(len(frame)) if row not in reasons]
            _write_split(out_dir / split, pairs.iloc[keep])
            quarantined += [{"split": split, "text_id": int(frame.text_id.iloc[row]), "image_id": int(frame.image_id.iloc[row]),
                             "text": frame.text.iloc[row], "reasons": why} for row, why in sorted(reasons.items())]
            report["splits"][split] = {
                "rows_in": len(frame), "rows_out": len(keep), "rows_quarantined": len(reasons),
                "bad_fraction": round(bad_fraction, 6), "passed": passed,
                "checked": len(outcomes), "failed": sum(not o["success"] for o in outcomes),
                "expectations": {f"{o['expectation']}({o['column']})" if o["column"] else o["expectation"]: o["unexpected_count"]
                                 for o in outcomes}}
    quarantine_path.parent.mkdir(parents=True, exist_ok=True)
    quarantine_path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in quarantined), encoding="utf-8")
    report.update(quarantine=str(quarantine_path), data_docs=str(docs_dir) if docs_dir else None,
                  success=not failures, checked=sum(s["checked"] for s in report["splits"].values()),
                  failed=sum(s["failed"] for s in report["splits"].values()))
    if report_path:
        write_summary(report_path, report)
    if failures:
        raise ZhclipError(_explain(failures, config, quarantine_path))
    return report


def _write_split(folder: Path, pairs: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("part-*.parquet"):
        stale.unlink()
    pq.write_table(pa.Table.from_pandas(pairs[COLUMNS], schema=PAIR_SCHEMA, preserve_index=False), folder / "part-00000.parquet")


def _explain(failures: list[tuple[str, dict]], config: ValidateConfig, quarantine_path: Path) -> str:
    lines = [f"data validation failed (max_bad_fraction {config.max_bad_fraction}):"]
    for split, outcome in failures:
        name = outcome["expectation"] + (f"({outcome['column']})" if outcome["column"] else "")
        where = (f"{outcome['unexpected_count']} rows, e.g. {json.dumps(outcome['examples'], ensure_ascii=False)}"
                 if outcome["rows"] else f"observed {outcome['observed']}")
        lines.append(f"  {split}: {name} failed: {where}")
    lines.append(f"every offending row, with its reasons, is in {quarantine_path}")
    return "\n".join(lines)
