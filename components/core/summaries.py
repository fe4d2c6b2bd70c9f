"""The small JSON summary every step writes (DVC shows it as metrics, MLflow records it), and its timer."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zhclip.components.core.errors import ZhclipError


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    """Write a step's JSON summary (DVC shows it as metrics, MLflow records it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=_plain) + "\n", encoding="utf-8")
    return path


def _plain(value: Any) -> Any:
    # numpy scalars (from pandas, GE, metrics) carry .item(); anything else is a bug to surface.
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_summary(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ZhclipError(f"{path} not found; run the step that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ZhclipError(f"{path} is not a JSON summary ({err})") from err


@contextmanager
def timed(summary: dict[str, Any], key: str = "duration_s") -> Iterator[None]:
    """Record the wall time of the block in `summary[key]`, in seconds."""
    start = time.perf_counter()
    yield
    summary[key] = round(time.perf_counter() - start, 3)
