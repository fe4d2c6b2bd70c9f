"""Small pieces every step shares: the user-facing error type, params and JSON summaries."""

from __future__ import annotations

import dataclasses
import json
import time
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TypeVar

import yaml


Config = TypeVar("Config")


class ZhclipError(Exception):
    """A problem with the user's input or setup; the CLI prints it without a traceback."""


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read params.yaml; a missing file gives every step its built-in defaults."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ZhclipError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(params, dict):
        raise ZhclipError(f"{path}: expected a mapping of sections at the top level")
    return params


def section(params: dict[str, Any], name: str, fields: set[str]) -> dict[str, Any]:
    """Section `name` of params, rejecting unknown keys so typos never pass silently."""
    values = params.get(name) or {}
    unknown = set(values) - fields
    if unknown:
        raise ZhclipError(f"params.yaml section '{name}': unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    return values


def build_config(cls: type[Config], values: dict[str, Any], where: str) -> Config:
    """Dataclass `cls` from `values`, with whole floats turned back into ints where a field is an int.

    Pipeline parameters travel as JSON/protobuf, where every number is a float; `where` names the
    source of `values` in error messages.
    """
    hints = typing.get_type_hints(cls)
    coerced = {}
    for key, value in values.items():
        if hints.get(key) is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        coerced[key] = value
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as err:
        raise ZhclipError(f"{where}: {err}") from err


def config_from(cls: type[Config], params: dict[str, Any], name: str, **overrides: Any) -> Config:
    """Build dataclass `cls` from params section `name`; non-None overrides (CLI flags) win."""
    values = section(params, name, {field.name for field in dataclasses.fields(cls)})
    values.update({key: value for key, value in overrides.items() if value is not None})
    return build_config(cls, values, f"params.yaml section '{name}'")


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


def release_freed_memory() -> None:
    """Give the operating system back what this process has freed. glibc keeps freed heap pages
    mapped (e.g. after parsing a million JSON lines: about 60 MB at 1M captions), which the next
    step's peak then stands on; `malloc_trim` returns them. A no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
