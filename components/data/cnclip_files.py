"""Chinese-CLIP's evaluation files: feature jsonl, annotations, top-k predictions and score JSON.

The formats are those of the reference's `eval/` scripts, so zhclip's output can be scored by
`evaluation.py` / `evaluation_tr.py`, and features extracted by `extract_features.py` (or any other
tool writing that format) can be scored by zhclip.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zhclip.components.core.errors import ZhclipError


def _json_lines(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise ZhclipError(f"{path} not found")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ZhclipError(f"{path} line {number}: not a JSON object ({err})") from err
            if not isinstance(record, dict):
                raise ZhclipError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def _integer(path: Path, number: int, field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ZhclipError(f"{path} line {number}: field '{field}' must be an integer id, got {value!r}")
    return value


def read_features(path: str | Path, id_field: str) -> tuple[list[int], np.ndarray]:
    """Ids and float32 features from `{"<id_field>": id, "feature": [...]}` lines."""
    path = Path(path)
    ids: list[int] = []
    rows: list[list[float]] = []
    seen: set[int] = set()
    for number, record in _json_lines(path):
        item = _integer(path, number, id_field, record.get(id_field))
        feature = record.get("feature")
        if not isinstance(feature, list) or not feature:
            raise ZhclipError(f"{path} line {number}: field 'feature' must be a non-empty list of numbers")
        if rows and len(feature) != len(rows[0]):
            raise ZhclipError(
                f"{path} line {number}: feature has {len(feature)} values, earlier lines have {len(rows[0])}"
            )
        if item in seen:
            raise ZhclipError(f"{path} line {number}: duplicate {id_field} {item}")
        seen.add(item)
        ids.append(item)
        rows.append(feature)
    if not rows:
        raise ZhclipError(f"{path}: no features")
    try:
        features = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ZhclipError(f"{path}: features must be numbers ({err})") from err
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise ZhclipError(f"{path}: {id_field} {ids[bad[0]]} has a non-finite feature value")
    # Used as they are: the reference ranks raw dot products of the (normalised) features it extracts.
    return ids, features


def write_features(path: str | Path, id_field: str, ids: Sequence[int], features: np.ndarray) -> Path:
    """Features in the reference's jsonl format, one `{"<id_field>": id, "feature": [...]}` per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for item, feature in zip(ids, features):
            out.write(json.dumps({id_field: int(item), "feature": feature.tolist()}) + "\n")
    return path


def read_annotations(path: str | Path) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Positives per text (`{"text_id", "image_ids"}` lines, as `{split}_texts.jsonl`) and the texts, if given."""
    path = Path(path)
    positives: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    for number, record in _json_lines(path):
        text_id = _integer(path, number, "text_id", record.get("text_id"))
        image_ids = record.get("image_ids")
        if not isinstance(image_ids, list) or not image_ids:
            raise ZhclipError(f"{path} line {number}: text_id {text_id} needs a non-empty list 'image_ids'")
        if text_id in positives:
            raise ZhclipError(f"{path} line {number}: duplicate text_id {text_id}")
        positives[text_id] = [_integer(path, number, "image_ids", i) for i in image_ids]
        if isinstance(record.get("text"), str):
            texts[text_id] = record["text"]
    if not positives:
        raise ZhclipError(f"{path}: no annotations")
    return positives, texts


def write_predictions(
    path: str | Path, query_field: str, result_field: str, predictions: Mapping[int, Sequence[int]]
) -> Path:
    """Top-k predictions as the reference's `make_topk_predictions(_tr).py` writes them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for query, results in predictions.items():
            out.write(json.dumps({query_field: int(query), result_field: [int(r) for r in results]}) + "\n")
    return path


def score_json(hits: Mapping[int, int], queries: int) -> dict[str, Any]:
    """The reference's score JSON (`evaluation.py`'s `report_score`), computed with its arithmetic.

    `hits[k]` counts the queries with a positive in their top k, for k = 1, 5, 10; the same operations
    in the same order give bit-identical floats.
    """
    r1, r5, r10 = (hits[k] * 1.0 / queries for k in (1, 5, 10))
    mean_recall = (r1 + r5 + r10) / 3.0
    return {
        "success": True,
        "score": mean_recall * 100,
        "scoreJson": {
            "score": mean_recall * 100,
            "mean_recall": mean_recall * 100,
            "r1": r1 * 100,
            "r5": r5 * 100,
            "r10": r10 * 100,
        },
    }
