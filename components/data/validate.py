"""Validate: a Great Expectations gate over the prepared pairs that loses nothing, streamed.

Each split is checked in two passes, so memory holds a few hashes per pair, never the split:
1. every row group is profiled (caption length and Chinese share; image decodes, size, aspect, bytes,
   content hash) by a Ray task, on any CPU of the cluster; the profiles (no image bytes) are spilled
   to a scratch Parquet file, and only the ids and hashes the cross-row checks need stay in memory;
2. the cross-row flags (duplicate pairs, conflicting ids, train/eval leakage by image hash) are
   computed from those, and the profile is checked `rows_per_check` rows at a time by one expectation
   suite through a GE checkpoint that renders every batch into one Data Docs site; the split's size is
   checked by a second, split-level suite.
A row that breaks a row-level expectation is bad. If the share of bad rows is within
`max_bad_fraction`, they are removed from the validated data (written shard by shard)
and written to the quarantine file with every reason that applies; otherwise the step fails, naming
each failed expectation with example ids. Rows in = rows out + rows quarantined, always.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from zhclip.components.core.cluster import ordered_map, ray_runtime
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.memory import release_freed_memory
from zhclip.components.core.settings import setting
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.data.schema import PAIR_SCHEMA, SPLITS
from zhclip.components.data.shards import PreparedSplit

COLUMNS = ["text_id", "text", "image_id", "image"]
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
FLAGS = ("duplicate_pair", "text_id_conflict", "image_id_conflict", "leaked_from_train")


@dataclass
class ValidateConfig:
    """Section `validate`: the Great Expectations gate on every pair."""

    min_text_chars: int = setting(2, "shortest caption kept, in characters")
    max_text_chars: int = setting(200, "longest caption kept, in characters")
    min_chinese_ratio: float = setting(0.3, "share of Han characters among non-space characters")
    min_image_side: int = setting(8, "smallest image side kept, in pixels")
    max_image_side: int = setting(10_000, "largest image side kept, in pixels")
    max_aspect_ratio: float = setting(10.0, "largest ratio of an image's long side to its short side")
    max_image_bytes: int = setting(20_000_000, "largest encoded image kept, in bytes")
    min_pairs_per_split: int = setting(1, "fewest pairs a split may keep before the gate fails")
    max_bad_fraction: float = setting(0.0, "above it the gate fails; at or below, bad rows are quarantined")
    rows_per_check: int = setting(
        20_000, "profiled rows checked by the suite at once (bounds memory; one Data Docs page each)"
    )

    def __post_init__(self):
        if self.rows_per_check < 1:
            raise ValueError(f"rows_per_check must be positive, got {self.rows_per_check}")


def _image_facts(blob: bytes) -> dict:
    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            width, height = image.size
        decodes = True
    except Exception:  # any decoder failure means "does not decode", whatever PIL raises
        width = height = 0
        decodes = False
    return {
        "image_decodes": decodes,
        "image_width": width,
        "image_height": height,
        "image_aspect": max(width, height) / max(1, min(width, height)),
        "image_bytes": len(blob),
        "image_hash": _hash64(blob),
    }


def _hash64(data: bytes) -> int:
    """The first 8 bytes of SHA-256, as a signed integer (what numpy and Parquet hold compactly)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def _chinese_ratio(text: str) -> float:
    visible = [ch for ch in text if not ch.isspace()]
    return sum(bool(HAN.match(ch)) for ch in visible) / max(1, len(visible))


def profile_group(split: PreparedSplit, group: int) -> pd.DataFrame:
    """One row group's rows with the derived columns the suite checks; the image bytes are dropped.
    A Ray task: the row groups of a split are profiled in parallel."""
    pairs = split.read(group, COLUMNS).to_pandas()
    facts = pd.DataFrame(
        [_image_facts(blob) for blob in pairs["image"]],
        index=pairs.index,
        columns=["image_decodes", "image_width", "image_height", "image_aspect", "image_bytes", "image_hash"],
    )
    frame = pd.concat([pairs.drop(columns=["image"]), facts], axis=1)
    texts = frame["text"].fillna("")
    frame["text_chars"] = texts.str.len()
    frame["chinese_ratio"] = texts.map(_chinese_ratio)
    frame["text_hash"] = texts.map(lambda text: _hash64(text.encode("utf-8"))).astype("int64")
    return frame


def cross_row_flags(
    text_ids: np.ndarray,
    text_hashes: np.ndarray,
    image_ids: np.ndarray,
    image_hashes: np.ndarray,
    train_images: np.ndarray,
) -> dict[str, np.ndarray]:
    """The checks that compare rows, over a whole split: an exact duplicate of an earlier pair (the
    first copy is kept), a text_id with several captions or an image_id with several images (every
    row of it), and an image whose content is in the train split (`train_images`, sorted hashes).
    Sorting-based, so memory is a few arrays of the split's length."""
    order = np.lexsort((image_ids, text_ids))  # stable: equal pairs stay in row order
    repeat = (text_ids[order][1:] == text_ids[order][:-1]) & (image_ids[order][1:] == image_ids[order][:-1])
    duplicate = np.zeros(len(text_ids), dtype=bool)
    duplicate[order[1:][repeat]] = True

    def conflicting(ids: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        by_id = np.lexsort((hashes, ids))
        ids_sorted, hashes_sorted = ids[by_id], hashes[by_id]
        differs = (ids_sorted[1:] == ids_sorted[:-1]) & (hashes_sorted[1:] != hashes_sorted[:-1])
        return np.isin(ids, np.unique(ids_sorted[1:][differs]))

    return {
        "duplicate_pair": duplicate,
        "text_id_conflict": conflicting(text_ids, text_hashes),
        "image_id_conflict": conflicting(image_ids, image_hashes),
        "leaked_from_train": np.isin(image_hashes, train_images),
    }


def build_suite(config: ValidateConfig):
    """The row-level expectation suite every batch of profiled rows must meet."""
    import great_expectations as gx

    e = gx.expectations
    suite = gx.ExpectationSuite(name="prepared_pairs")
    for expectation in [
        e.ExpectColumnValuesToBeInTypeList(column="text_id", type_list=["int64", "int32"]),
        e.ExpectColumnValuesToBeInTypeList(column="image_id", type_list=["int64", "int32"]),
        *[e.ExpectColumnValuesToNotBeNull(column=c) for c in ("text_id", "text", "image_id")],
        e.ExpectColumnValuesToBeBetween(
            column="text_chars", min_value=config.min_text_chars, max_value=config.max_text_chars
        ),
        e.ExpectColumnValuesToBeBetween(column="chinese_ratio", min_value=config.min_chinese_ratio),
        e.ExpectColumnValuesToBeInSet(column="image_decodes", value_set=[True]),
        e.ExpectColumnValuesToBeBetween(
            column="image_width", min_value=config.min_image_side, max_value=config.max_image_side
        ),
        e.ExpectColumnValuesToBeBetween(
            column="image_height", min_value=config.min_image_side, max_value=config.max_image_side
        ),
        e.ExpectColumnValuesToBeBetween(column="image_aspect", max_value=config.max_aspect_ratio),
        e.ExpectColumnValuesToBeBetween(column="image_bytes", min_value=1, max_value=config.max_image_bytes),
        *[e.ExpectColumnValuesToBeInSet(column=flag, value_set=[False]) for flag in FLAGS],
    ]:
        suite.add_expectation(expectation)
    return suite


def build_split_suite(config: ValidateConfig):
    """The split-level suite, over one row per split (its size): what no batch of rows can tell."""
    import great_expectations as gx

    suite = gx.ExpectationSuite(name="split_size")
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(column="pairs", min_value=config.min_pairs_per_split)
    )
    return suite


def _checkpoints(config: ValidateConfig, docs_dir: Path | None):
    """GE checkpoints (rows, split size) over pandas batches, both rendering into one Data Docs site."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    actions = []
    if docs_dir:
        context.add_data_docs_site(
            "zhclip",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(Path(docs_dir).resolve()),
                },
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs"))
    source = context.data_sources.add_pandas("prepared")
    checkpoints = []
    for name, suite in (("prepared_pairs", build_suite(config)), ("split_size", build_split_suite(config))):
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("batch")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=context.suites.add(suite))
        )
        checkpoints.append(
            context.checkpoints.add(
                gx.Checkpoint(
                    name=name,
                    validation_definitions=[definition],
                    actions=actions,
                    result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]},
                )
            )
        )
    return checkpoints


def _run(checkpoint, frame: pd.DataFrame) -> list[dict]:
    """One entry per expectation: its name, success, and the rows (split-wide numbers) it rejected."""
    result = next(iter(checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()))
    outcomes = []
    for item in result.results:
        kwargs = item.expectation_config.kwargs
        rows = [int(entry["row"]) for entry in item.result.get("unexpected_index_list") or []]
        examples = frame.set_index("row").loc[rows[:3], ["text_id", "image_id"]].to_dict("records") if rows else []
        outcomes.append(
            {
                "expectation": item.expectation_config.type,
                "column": kwargs.get("column"),
                "success": bool(item.success),
                "rows": rows,
                "unexpected_count": len(rows),
                "examples": examples,
                "observed": item.result.get("observed_value"),
            }
        )
    return outcomes


def _merge(outcomes: list[list[dict]]) -> list[dict]:
    """One expectation's outcomes over all batches of a split, as if checked at once."""
    merged = []
    for runs in zip(*outcomes):
        rows = [row for run in runs for row in run["rows"]]
        merged.append(
            {
                **runs[0],
                "success": all(run["success"] for run in runs),
                "rows": rows,
                "unexpected_count": len(rows),
                "examples": [example for run in runs for example in run["examples"]][:3],
                "observed": next((run["observed"] for run in runs if not run["success"]), runs[0]["observed"]),
            }
        )
    return merged


@dataclass
class _Profiled:
    """A split's profile spilled to Parquet, with the ids and hashes the cross-row checks need."""

    path: Path
    rows: int
    columns: dict[str, np.ndarray]


def _profile_split(split: PreparedSplit, scratch: Path, batch_rows: int) -> _Profiled:
    missing = [c for c in COLUMNS if c not in split.columns()]
    if missing:
        raise ZhclipError(f"prepared data {split.uri}/{split.split} lacks column(s) {missing}; re-run `zhclip ingest`")
    keys = {name: np.zeros(split.rows, dtype=np.int64) for name in ("text_id", "text_hash", "image_id", "image_hash")}
    path, rows, writer, pending = scratch / f"{split.split}.parquet", 0, None, []

    def spill() -> (
        None
    ):  # in batches of batch_rows: a Parquet row group per row group of the data would bloat the footer
        nonlocal writer
        table = pa.concat_tables(pending)
        writer = writer or pq.ParquetWriter(path, table.schema, write_statistics=False)
        writer.write_table(table)
        pending.clear()

    profiles = ordered_map(profile_group, ((split, group) for group in range(len(split.groups))))
    for frame in tqdm(
        profiles, total=len(split.groups), desc=f"validate {split.split}", unit=" row groups", leave=False, disable=None
    ):
        frame.insert(0, "row", np.arange(rows, rows + len(frame)))
        for name, values in keys.items():
            values[rows : rows + len(frame)] = frame[name].to_numpy(dtype=np.int64)
        rows += len(frame)
        pending.append(pa.Table.from_pandas(frame.drop(columns=["text_hash"]), preserve_index=False))
        if sum(len(table) for table in pending) >= batch_rows:
            spill()
    if pending:
        spill()
    writer.close()
    return _Profiled(path, rows, keys)


def _check_split(
    profiled: _Profiled, train_images: np.ndarray, checkpoints, config: ValidateConfig
) -> tuple[list[dict], dict[int, dict]]:
    """Every expectation's outcome over the split, and each bad row's record with its reasons."""
    rows_check, size_check = checkpoints
    keys = profiled.columns
    flags = cross_row_flags(keys["text_id"], keys["text_hash"], keys["image_id"], keys["image_hash"], train_images)
    runs, bad = [], {}
    for batch in pq.ParquetFile(profiled.path).iter_batches(batch_size=config.rows_per_check):
        frame = batch.to_pandas()
        for name, flag in flags.items():
            frame[name] = flag[frame["row"].to_numpy()]
        runs.append(_run(rows_check, frame))
        by_row = frame.set_index("row")
        for outcome in runs[-1]:
            for row in outcome["rows"]:
                record = bad.setdefault(
                    row,
                    {
                        "text_id": int(by_row.at[row, "text_id"]),
                        "image_id": int(by_row.at[row, "image_id"]),
                        "text": by_row.at[row, "text"],
                        "reasons": [],
                    },
                )
                record["reasons"].append(f"{outcome['expectation']}({outcome['column']})")
    return _run(size_check, pd.DataFrame({"pairs": [profiled.rows], "row": [0]})) + _merge(runs), bad


def _write_split(split: PreparedSplit, out_dir: Path, bad_rows: set[int]) -> int:
    """The split's kept rows into `out_dir`, one output shard per input shard, row group by row group.
    Written here, not by Ray tasks: `out_dir` is this machine's folder, and filtering costs no decoding."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("part-*.parquet"):
        stale.unlink()
    bad, first_rows = np.array(sorted(bad_rows), dtype=np.int64), split.first_rows()
    shards: dict[str, list[int]] = {}
    for number, group in enumerate(split.groups):
        shards.setdefault(group.path, []).append(number)
    kept = 0
    for shard, numbers in shards.items():
        with pq.ParquetWriter(out_dir / Path(shard).name, PAIR_SCHEMA) as writer:
            for number in numbers:
                rows = np.arange(first_rows[number], first_rows[number] + split.groups[number].rows)
                table = split.read(number, COLUMNS).filter(pa.array(~np.isin(rows, bad)))
                writer.write_table(table.cast(PAIR_SCHEMA), row_group_size=split.groups[number].rows)
                kept += len(table)
    return kept


def validate(
    prepared_dir: str | Path,
    out_dir: str | Path,
    config: ValidateConfig,
    report_path: str | Path | None = None,
    quarantine_path: str | Path = "reports/validation_quarantine.jsonl",
    docs_dir: str | Path | None = None,
) -> dict:
    """Check every split; write the good rows to `out_dir` and the bad ones to `quarantine_path`.

    Raises ZhclipError (after writing the report and Data Docs) when a split-level expectation fails
    or a split's share of bad rows exceeds `max_bad_fraction`.
    """
    out_dir, quarantine_path = Path(out_dir), Path(quarantine_path)
    splits = {split: PreparedSplit.open(str(prepared_dir), split) for split in SPLITS}
    report: dict = {
        "prepared_dir": str(prepared_dir),
        "validated_dir": str(out_dir),
        "max_bad_fraction": config.max_bad_fraction,
        "splits": {},
    }
    quarantine_path.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    with (
        timed(report),
        ray_runtime(),
        tempfile.TemporaryDirectory() as scratch,
        open(quarantine_path, "w", encoding="utf-8") as quarantine,
    ):
        checkpoints = _checkpoints(config, Path(docs_dir) if docs_dir else None)
        train_images = np.zeros(0, dtype=np.int64)
        for name, split in splits.items():  # train first: its image hashes define leakage
            profiled = _profile_split(split, Path(scratch), config.rows_per_check)
            if name == "train":
                train_images = np.unique(profiled.columns["image_hash"])
            release_freed_memory()  # the profiles' pandas frames, before the checks' peak
            outcomes, bad = _check_split(
                profiled, train_images if name != "train" else np.zeros(0, np.int64), checkpoints, config
            )
            split_failures = [o for o in outcomes if not o["success"] and not o["rows"]]
            bad_fraction = len(bad) / max(1, profiled.rows)
            passed = not split_failures and bad_fraction <= config.max_bad_fraction
            if not passed:
                failures += [(name, o) for o in outcomes if not o["success"]]
            kept = _write_split(split, out_dir / name, set(bad))
            for row in sorted(bad):
                quarantine.write(json.dumps({"split": name, **bad[row]}, ensure_ascii=False) + "\n")
            report["splits"][name] = {
                "rows_in": profiled.rows,
                "rows_out": kept,
                "rows_quarantined": len(bad),
                "bad_fraction": round(bad_fraction, 6),
                "passed": passed,
                "checked": len(outcomes),
                "failed": sum(not o["success"] for o in outcomes),
                "expectations": {
                    f"{o['expectation']}({o['column']})" if o["column"] else o["expectation"]: o["unexpected_count"]
                    for o in outcomes
                },
            }
    report.update(
        quarantine=str(quarantine_path),
        data_docs=str(docs_dir) if docs_dir else None,
        success=not failures,
        checked=sum(s["checked"] for s in report["splits"].values()),
        failed=sum(s["failed"] for s in report["splits"].values()),
    )
    if report_path:
        write_summary(report_path, report)
    if failures:
        raise ZhclipError(_explain(failures, config, quarantine_path))
    return report


def _explain(failures: list[tuple[str, dict]], config: ValidateConfig, quarantine_path: Path) -> str:
    lines = [f"data validation failed (max_bad_fraction {config.max_bad_fraction}):"]
    for split, outcome in failures:
        name = outcome["expectation"] + (f"({outcome['column']})" if outcome["column"] else "")
        where = (
            f"{outcome['unexpected_count']} rows, e.g. {json.dumps(outcome['examples'], ensure_ascii=False)}"
            if outcome["rows"]
            else f"observed {outcome['observed']}"
        )
        lines.append(f"  {split}: {name} failed: {where}")
    lines.append(f"every offending row, with its reasons, is in {quarantine_path}")
    return "\n".join(lines)
