"""Validate: a Great Expectations gate over the prepared pairs that loses nothing, streamed.

Each split is checked in two passes, with memory bounded by settings, never by the split:
1. every row group is profiled (caption length and Chinese share; image decodes, size, aspect, bytes,
   content hash) by a Ray task, on any CPU of the cluster; the profiles (no image bytes) are spilled
   to a scratch Parquet file;
2. the cross-row flags (duplicate pairs, conflicting ids, train/eval leakage by image hash) are one
   DuckDB query over the spilled profiles, out of core within `spill_memory_mb` (spill.py); the
   profile, with the flags merged in row order, is checked `rows_per_check` rows at a time by one
   expectation suite through a GE checkpoint whose results are stored on disk and rendered into one
   Data Docs site at the end; the split's size is checked by a second, split-level suite.
A row that breaks a row-level expectation is bad. If the share of bad rows is within
`max_bad_fraction`, they are removed from the validated data (written shard by shard)
and written to the quarantine file with every reason that applies; otherwise the step fails, naming
each failed expectation with example ids. Rows in = rows out + rows quarantined, always.
"""

# Great Expectations' documented home of its expectation classes is gx.expectations, whose
# __init__ imports them without __all__ or `as` aliases: a checker reads a py.typed package's such
# imports as private. Only that rule, only in this file.
# pyright: reportPrivateImportUsage=false

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from zhclip.components.core.cluster import ordered_map, ray_runtime
from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.memory import release_freed_memory
from zhclip.components.core.progress import progress_bar
from zhclip.components.core.settings import setting, shared
from zhclip.components.core.storage import Folder
from zhclip.components.core.summaries import timed, write_summary
from zhclip.components.data.schema import PAIR_SCHEMA, SPLITS
from zhclip.components.data.shards import PreparedSplit, RowGroup, read_row_group, remove_shards
from zhclip.components.data.spill import (
    Spill,
    SpillConfig,
    SpillTable,
    check_memory,
    merged,
    read_parquet,
    spill_database,
)

if TYPE_CHECKING:
    from great_expectations.data_context.store.store import StoreConfigTypedDict

COLUMNS = ["text_id", "text", "image_id", "image"]
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
DOCS_INDEX_RESULTS = 500  # batch results the Data Docs index page lists, the newest first
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
    spill_memory_mb: int = shared(SpillConfig, "spill_memory_mb")  # the duplicate, conflict and leakage checks
    spill_folder: str = shared(SpillConfig, "spill_folder")

    def __post_init__(self):
        if self.rows_per_check < 1:
            raise ValueError(f"rows_per_check must be positive, got {self.rows_per_check}")
        check_memory(self.spill_memory_mb)


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


def profile_group(folder: Folder, group: RowGroup) -> pd.DataFrame:
    """One row group's rows with the derived columns the suite checks; the image bytes are dropped.
    A Ray task: the row groups of a split are profiled in parallel."""
    pairs = read_row_group(folder, group, COLUMNS).to_pandas()
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


# Rows of a split's spilled profile that a check over the whole split flags: an exact duplicate of an
# earlier pair (the first copy is kept), a text_id with several captions or an image_id with several
# images (every row of it), an image whose content is in the train split. Each check runs in passes
# over the key it groups by (spill.py's `in_pass`), its flagged rows in row order.
# Several values in a group is min <> max rather than count(DISTINCT) > 1: DuckDB's distinct
# aggregates hold their sets in memory (ingest's count(DISTINCT) ran out of 256 MiB at 10M pairs).
_FLAG_QUERIES = {
    "duplicate_pair": """SELECT row FROM (
        SELECT row, row_number() OVER (PARTITION BY text_id, image_id ORDER BY row) AS nth
        FROM {profile} WHERE in_pass(image_id)
      ) WHERE nth > 1""",
    "text_id_conflict": """SELECT row FROM {profile} WHERE in_pass(text_id) AND text_id IN (
        SELECT text_id FROM {profile} WHERE in_pass(text_id)
        GROUP BY text_id HAVING min(text_hash) <> max(text_hash))""",
    "image_id_conflict": """SELECT row FROM {profile} WHERE in_pass(image_id) AND image_id IN (
        SELECT image_id FROM {profile} WHERE in_pass(image_id)
        GROUP BY image_id HAVING min(image_hash) <> max(image_hash))""",
    "leaked_from_train": """SELECT row FROM {profile} WHERE in_pass(image_hash) AND image_hash IN (
        SELECT image_hash FROM {train} WHERE in_pass(image_hash))""",
}


def flagged_rows(spill: Spill, profile: Path, train_profile: Path | None) -> Iterator[dict]:
    """The rows of `profile` that a cross-row check flags, in row order, each with its four flags;
    leakage against `train_profile` (None for the train split itself)."""
    tables = {"profile": read_parquet(profile), "train": read_parquet(train_profile) if train_profile else None}
    rows = {"profile": _rows(profile), "train": _rows(train_profile) if train_profile else 0}
    results = []
    for flag, query in _FLAG_QUERIES.items():
        if flag == "leaked_from_train" and not train_profile:
            continue
        passes = spill.passes(rows["profile"] + (rows["train"] if flag == "leaked_from_train" else 0))
        flagged = f"SELECT row, '{flag}' AS flag FROM ({query.format(**tables)}) ORDER BY row"
        results += [spill.pass_result(flagged) for _ in spill.in_passes(passes)]
    for row, found in itertools.groupby(merged(results, key=itemgetter("row")), key=itemgetter("row")):
        raised = {record["flag"] for record in found}
        yield {"row": row, **{flag: flag in raised for flag in FLAGS}}


def _rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


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


class _Gate:
    """GE checkpoints (rows, split size) over pandas batches. Their results are stored on disk, not
    in the context's memory (one per batch: thousands at hundreds of millions of pairs), and rendered
    into one Data Docs site at the end, not after every batch (which re-renders the whole index each
    time)."""

    def __init__(self, config: ValidateConfig, docs_dir: Path | None, scratch: Path):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.ERROR)
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        context.add_store("results_on_disk", _filesystem_store("ValidationResultsStore", scratch / "results"))
        context.variables.validation_results_store_name = "results_on_disk"
        if docs_dir:
            context.add_data_docs_site(
                "zhclip",
                {
                    "class_name": "SiteBuilder",
                    # The index lists the newest results only: it holds each result it lists (about
                    # 16 KiB: bench/investigations/2026-12-05-data-scale-memory/data_docs.py), one per
                    # rows_per_check rows of every split.
                    # Every result still gets its page (rendered one at a time).
                    "site_index_builder": {
                        "class_name": "DefaultSiteIndexBuilder",
                        "validation_results_limit": DOCS_INDEX_RESULTS,
                    },
                    # GE's DataDocsSiteConfigTypedDict lacks this key; "may be incomplete", says its note
                    "site_section_builders": {"validations": {"validation_results_limit": None}},  # pyright: ignore[reportArgumentType]
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(Path(docs_dir).resolve()),
                    },
                },
            )
        self.context, self.docs = context, docs_dir is not None
        source = context.data_sources.add_pandas("prepared")
        self.rows, self.size = (
            self._checkpoint(source, name, suite)
            for name, suite in (("prepared_pairs", build_suite(config)), ("split_size", build_split_suite(config)))
        )

    def _checkpoint(self, source, name: str, suite):
        import great_expectations as gx

        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("batch")
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=self.context.suites.add(suite))
        )
        return self.context.checkpoints.add(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]},
            )
        )

    def render(self) -> None:
        if self.docs:
            self.context.build_data_docs(site_names=["zhclip"])


def _filesystem_store(class_name: str, folder: Path) -> StoreConfigTypedDict:
    return {
        "class_name": class_name,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder)},
    }


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


def _merge(merged: list[dict] | None, run: list[dict]) -> list[dict]:
    """One expectation's outcomes over the batches so far and one more batch, as if checked at once
    (row numbers are not kept: the quarantine file has them)."""
    if merged is None:
        return [{**outcome, "rows": None} for outcome in run]
    return [
        {
            **so_far,
            "success": so_far["success"] and outcome["success"],
            "unexpected_count": so_far["unexpected_count"] + outcome["unexpected_count"],
            "examples": (so_far["examples"] + outcome["examples"])[:3],
            "observed": so_far["observed"] if not so_far["success"] or outcome["success"] else outcome["observed"],
        }
        for so_far, outcome in zip(merged, run)
    ]


def _profile_split(split: PreparedSplit, scratch: Path, batch_rows: int) -> tuple[Path, int]:
    """Profile every row group of `split` (Ray tasks) into a scratch Parquet file, with each row's number
    in the split; returns the file and the number of rows."""
    missing = [c for c in COLUMNS if c not in split.columns()]
    if missing:
        raise ZhclipError(f"prepared data {split.uri}/{split.split} lacks column(s) {missing}; re-run `zhclip ingest`")
    path, rows, writer, pending = scratch / f"{split.split}.parquet", 0, None, []

    def spill() -> None:  # in batches of batch_rows: a row group per row group of the data would bloat the footer
        nonlocal writer
        table = pa.concat_tables(pending)
        writer = writer or pq.ParquetWriter(path, table.schema, write_statistics=False)
        writer.write_table(table)
        pending.clear()

    profiles = ordered_map(profile_group, ((split.folder, group) for group in split.groups))
    for frame in progress_bar(
        profiles, total=len(split.groups), desc=f"validate {split.split}", unit="row groups", leave=False
    ):
        frame.insert(0, "row", np.arange(rows, rows + len(frame)))
        rows += len(frame)
        pending.append(pa.Table.from_pandas(frame, preserve_index=False))
        if sum(len(table) for table in pending) >= batch_rows:
            spill()
    if pending:
        spill()
    assert writer is not None  # made by the first spill; a split without rows failed here before too
    writer.close()
    return path, rows


class _RowCursor:
    """Records in row order (a query's result), taken a range of rows at a time."""

    def __init__(self, records: Iterator[dict]):
        self._records = records
        self._next = next(records, None)

    def up_to(self, last: int) -> Iterator[dict]:
        """The records of rows up to `last`, not yet taken."""
        while self._next is not None and self._next["row"] <= last:
            yield self._next
            self._next = next(self._records, None)


def _with_flags(frame: pd.DataFrame, flagged: _RowCursor) -> pd.DataFrame:
    """`frame` (consecutive rows) with the four cross-row flag columns."""
    first = int(frame["row"].iloc[0])
    flags = {name: np.zeros(len(frame), dtype=bool) for name in FLAGS}
    for record in flagged.up_to(int(frame["row"].iloc[-1])):
        for name in FLAGS:
            flags[name][record["row"] - first] = record[name]
    return frame.assign(**flags)


def _check_split(
    profile: Path,
    rows: int,
    flagged: _RowCursor,
    gate: _Gate,
    config: ValidateConfig,
    bad_rows: SpillTable,
    quarantine: TextIO,
    split: str,
) -> list[dict]:
    """Every expectation's outcome over the split. Each bad row goes, with its reasons, to the
    quarantine file (in row order) and its number to `bad_rows`."""
    merged = None
    # pre_buffer off: with it, pyarrow keeps every row group read so far (see ingest's spill)
    for batch in pq.ParquetFile(profile, pre_buffer=False).iter_batches(batch_size=config.rows_per_check):
        frame = _with_flags(batch.to_pandas(), flagged)
        run = _run(gate.rows, frame)
        merged = _merge(merged, run)
        by_row, reasons = frame.set_index("row"), {}
        for outcome in run:
            for row in outcome["rows"]:
                reasons.setdefault(row, []).append(f"{outcome['expectation']}({outcome['column']})")
        for row in sorted(reasons):
            record = {
                "split": split,
                "text_id": int(by_row.at[row, "text_id"]),
                "image_id": int(by_row.at[row, "image_id"]),
                "text": by_row.at[row, "text"],
                "reasons": reasons[row],
            }
            quarantine.write(json.dumps(record, ensure_ascii=False) + "\n")
            bad_rows.add(row)
    bad_rows.flush()
    return _run(gate.size, pd.DataFrame({"pairs": [rows], "row": [0]})) + (merged or [])


def _write_split(split: PreparedSplit, out_dir: Path, bad_rows: _RowCursor) -> int:
    """The split's kept rows into `out_dir`, one output shard per input shard, row group by row group;
    `bad_rows` are the rows to leave out, in order. Written here, not by Ray tasks: `out_dir` is this
    machine's folder, and filtering costs no decoding."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_shards(out_dir)
    first_rows = split.first_rows()
    shards: dict[str, list[int]] = {}
    for number, group in enumerate(split.groups):
        shards.setdefault(group.path, []).append(number)
    kept = 0
    for shard, numbers in shards.items():
        with pq.ParquetWriter(out_dir / Path(shard).name, PAIR_SCHEMA) as writer:
            for number in numbers:
                start, size = int(first_rows[number]), split.groups[number].rows
                keep = np.ones(size, dtype=bool)
                keep[[bad["row"] - start for bad in bad_rows.up_to(start + size - 1)]] = False
                table = split.read(number, COLUMNS).filter(pa.array(keep))
                writer.write_table(table.cast(PAIR_SCHEMA), row_group_size=size)
                kept += len(table)
    return kept


def _validate_split(
    split: PreparedSplit,
    spill: Spill,
    gate: _Gate,
    config: ValidateConfig,
    train_profile: Path | None,
    quarantine: TextIO,
    out_dir: Path,
) -> tuple[dict, list[dict], Path]:
    """Profile, check and filter one split: its report entry, the outcomes that fail the gate (none
    when it passes), and its spilled profile."""
    name = split.split
    profile, rows = _profile_split(split, spill.folder, config.rows_per_check)
    release_freed_memory()  # the profiles' pandas frames, before the checks
    bad_rows = spill.table(f"bad_{name}", row=pa.int64())
    flagged = _RowCursor(flagged_rows(spill, profile, train_profile))
    outcomes = _check_split(profile, rows, flagged, gate, config, bad_rows, quarantine, name)
    split_level = [o for o in outcomes if not o["success"] and not o["unexpected_count"]]
    bad_fraction = bad_rows.rows / max(1, rows)
    passed = not split_level and bad_fraction <= config.max_bad_fraction
    kept = _write_split(split, out_dir, _RowCursor(spill.rows(f"SELECT row FROM bad_{name} ORDER BY row")))
    entry = {
        "rows_in": rows,
        "rows_out": kept,
        "rows_quarantined": bad_rows.rows,
        "bad_fraction": round(bad_fraction, 6),
        "passed": passed,
        "checked": len(outcomes),
        "failed": sum(not o["success"] for o in outcomes),
        "expectations": {
            f"{o['expectation']}({o['column']})" if o["column"] else o["expectation"]: o["unexpected_count"]
            for o in outcomes
        },
    }
    return entry, [] if passed else [o for o in outcomes if not o["success"]], profile


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
        spill_database(config.spill_memory_mb, config.spill_folder) as spill,
        open(quarantine_path, "w", encoding="utf-8") as quarantine,
    ):
        gate = _Gate(config, Path(docs_dir) if docs_dir else None, spill.folder)
        train_profile = None
        try:  # Data Docs of what was checked, also when a later split fails
            for name, split in splits.items():  # train first: its image hashes define leakage
                report["splits"][name], split_failures, profile = _validate_split(
                    split, spill, gate, config, train_profile, quarantine, out_dir / name
                )
                failures += [(name, outcome) for outcome in split_failures]
                train_profile = train_profile or profile
        finally:
            gate.render()
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
            if outcome["unexpected_count"]
            else f"observed {outcome['observed']}"
        )
        lines.append(f"  {split}: {name} failed: {where}")
    lines.append(f"every offending row, with its reasons, is in {quarantine_path}")
    return "\n".join(lines)
