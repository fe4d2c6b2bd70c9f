"""Index catalogs (an index per model's weights, found by them) and the canary stored with each index."""

from __future__ import annotations

from pathlib import Path

import pytest

from zhclip.components.core.lineage import dvc_hash
from zhclip.components.search.canary import CaptionSampler
from zhclip.components.search.index_build import IndexConfig, build_index
from zhclip.components.search.index_store import IndexNotFound, SearchIndex, find_index, weights_folder_name


def test_an_index_is_found_in_its_catalog_by_the_weights_that_built_it(tiny_models, prepared_dir, tmp_path):
    first, second = (
        {"uri": str(m), "name": None, "version": None, "weights_hash": dvc_hash(m)} for m in tiny_models[:2]
    )
    catalog = tmp_path / "catalog"
    built = build_index(
        prepared_dir / "test", None, str(tiny_models[0]), IndexConfig(factory="Flat"), catalog=str(catalog)
    )
    assert built["index"] == f"{catalog}/{weights_folder_name(first['weights_hash'])}"
    assert find_index(str(catalog), first) == built["index"]  # a catalog, by weights
    assert find_index(built["index"], first) == built["index"]  # an index folder itself
    with pytest.raises(IndexNotFound, match="neither an index folder nor a catalog"):
        find_index(str(catalog), second)
    with pytest.raises(IndexNotFound, match="their embeddings do not compare"):
        find_index(built["index"], second)
    index = SearchIndex(built["index"])
    captions = index.canary["captions"]
    assert captions and len(captions) == len(set(captions)) <= IndexConfig().canary_size
    assert 0 <= index.canary["recall_at_10"] <= 1
    (Path(built["index"]) / "index.json").unlink()  # a half-written index is not an index
    with pytest.raises(IndexNotFound):
        find_index(str(catalog), first)


def test_the_canary_sample_is_the_same_whatever_the_order_and_bounded():
    captions = [f"第{i}张图" for i in range(500)] * 2
    forward, backward = CaptionSampler(20), CaptionSampler(20)
    forward.add(captions)
    backward.add(reversed(captions))
    assert forward.captions() == backward.captions() and len(forward.captions()) == 20
    assert len(forward.kept) == 20  # memory bounded by the sample, not the stream
    small = CaptionSampler(100)
    small.add(["一", "", "  ", "二", "一"])
    assert sorted(small.captions()) == ["一", "二"]


class _Index:
    """What the canary reads of an index: search results, captions by row, build-time figures."""

    def __init__(self, ranked: list[list[int]], captions: dict[int, str], recorded=None, gallery="g"):
        self.ranked, self.by_row = ranked, captions
        self.canary, self.meta = {"recall_at_10": recorded}, {"gallery": gallery}

    def search(self, vectors, k):
        return [[(row, 1.0) for row in rows[:k]] for rows in self.ranked]

    def captions(self, rows):
        return {row: self.by_row[row] for row in rows}


def test_canary_recall_counts_captions_with_an_image_of_that_caption_in_the_top_10():
    import numpy as np

    from zhclip.components.search.canary import canary_recall

    captions = ["红色的圆形", "蓝色的方形", "手写数字七", "绿色的三角形"]
    by_row = {0: "红色的圆形", 1: "红色的圆形", 2: "蓝色的方形", 3: "手写数字一", 4: "绿色的三角形"}
    # found: the first (row 1 shares its caption), the second; not the third (no such image), nor
    # the fourth (its image ranks 11th)
    ranked = [[3, 1], [2], [0, 1, 2, 3], [0] * 10 + [4]]
    index = _Index(ranked, by_row)
    assert canary_recall(lambda texts: np.zeros((len(texts), 4)), index, captions) == 2 / 4
    assert canary_recall(lambda texts: np.zeros((len(texts), 4)), index, []) is None


def test_a_candidate_is_refused_below_its_build_or_the_live_pair_by_more_than_the_margin():
    from zhclip.components.search.live import LivePair, canary_refusal

    def pair(version: str, measured, recorded=None, gallery="g") -> LivePair:
        identity = {"uri": "models:/m@champion", "name": "m", "version": version, "weights_hash": version * 8}
        return LivePair(identity, None, {"test": _Index([], {}, recorded, gallery)}, {"test": measured})

    live = pair("1", 0.95)
    assert canary_refusal(pair("2", 0.91, recorded=0.93), live, 0.05) is None  # within the margin of both
    assert canary_refusal(pair("2", 0.95), None, 0.05) is None  # the first pair: nothing to compare with
    assert canary_refusal(pair("2", None), live, 0.05) is None  # a gallery without captions has no canary
    assert "serving does not reproduce the build" in canary_refusal(pair("2", 0.80, recorded=0.90), live, 0.05)
    worse = canary_refusal(pair("2", 0.85, recorded=0.85), live, 0.05)
    assert "0.850 for models:/m@champion (m version 2)" in worse and "0.950 for the live" in worse
    assert canary_refusal(pair("2", 0.85, recorded=0.85, gallery="other"), live, 0.05) is None  # not comparable
