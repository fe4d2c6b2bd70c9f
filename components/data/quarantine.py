"""Ingest's quarantine: every rejected raw row with its reason, one JSON line each, nothing dropped.

Rows are rejected while the files stream past (a line that is not JSON, an image that does not
decode) and by whole-split queries afterwards (a text_id seen on an earlier line, an image_id
decoded twice). Entries go into the spill database with their place in the raw files, and the
quarantine file is written once, in that order: the texts file's lines, then the images' lines,
then the images that texts name but no line supplied, the same order as if each had been found
as it streamed past.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from zhclip.components.data.spill import Spill

TEXTS, IMAGES, MISSING = 1, 2, 3  # the phases, in the order their entries are written


class Quarantine:
    def __init__(self, path: Path, spill: Spill):
        self.path, self.spill = path, spill
        self._entries = spill.table("quarantine", phase=pa.int32(), place=pa.int64(), seq=pa.int64(), entry=pa.string())
        self.count = 0

    def add(self, source: str, line: int, reason: str, record: str, phase: int = TEXTS, place: int | None = None):
        """Reject a row of `source` (its `line`, 0 for none); `place` orders it within its phase
        (default: the line)."""
        entry = {"file": source, "line": line, "reason": reason, "record": record[:200]}
        # a record with bytes that were not UTF-8 (lone surrogates) is kept escaped, never lost
        text = json.dumps(entry, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8")
        self._entries.add(phase, line if place is None else place, self.count, text)
        self.count += 1

    def close(self) -> None:
        """Write the quarantine file (only when something was rejected)."""
        self._entries.flush()
        if not self.count:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as out:
            for row in self.spill.rows("SELECT entry FROM quarantine ORDER BY phase, place, seq"):
                out.write(row["entry"] + "\n")
