"""Retrieval metrics: the reference's semantics on hand-made embeddings, chunking, ties, chance."""

import itertools
import json
import math

import numpy as np
import pytest

from components.common import ZhclipError
from components.evaluate import EvaluateConfig, chance_recalls, evaluate, recalls, retrieval_metrics, top_k


def test_perfect_embeddings_score_100_everywhere():
    emb = np.eye(12, dtype=np.float32)
    metrics = retrieval_metrics(emb, emb, [{i} for i in range(12)])
    assert all(metrics[f"{d}_r{k}"] == 100.0 for d in ("t2i", "i2t") for k in (1, 5, 10))
    assert metrics["mean_recall"] == 100.0


def test_multiple_positives_count_any_hit_and_i2t_queries_only_referenced_images():
    images = np.eye(4, dtype=np.float32)
    # text 0 points at image 3 but its positives are images 1 and 3 -> hit at 1.
    # text 1 points at image 0 but its positive is image 2 -> miss at 1.
    texts = np.array([[0, 0, 0, 1], [1, 0, 0, 0]], dtype=np.float32)
    metrics = retrieval_metrics(texts, images, [{1, 3}, {2}])
    assert metrics["t2i_r1"] == 50.0
    # I2T queries: images 1, 2, 3 (image 0 is referenced by no text). Image 3 -> text 0 (hit);
    # image 1: both texts score 0, tie -> text 0 (hit); image 2: tie -> text 0 (miss).
    assert metrics["i2t_r1"] == pytest.approx(200 / 3, abs=1e-3)


def test_chunked_top_k_equals_full_sort_and_breaks_ties_by_index():
    rng = np.random.default_rng(0)
    queries, gallery = rng.normal(size=(37, 8)), rng.normal(size=(53, 8))
    full = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(top_k(queries, gallery, 10, chunk_size=5), full)
    tied = top_k(np.ones((1, 2)), np.ones((6, 2)), 3)
    np.testing.assert_array_equal(tied, [[0, 1, 2]])


def test_chance_level_matches_exhaustive_enumeration():
    gallery, positives = 6, [{0}, {1, 4}]
    exact = chance_recalls(positives, gallery, ks=(1, 2))
    for k in (1, 2):
        hits = []
        for p in positives:
            orders = list(itertools.permutations(range(gallery)))
            hits.append(np.mean([bool(p & set(order[:k])) for order in orders]))
        assert exact[k] == pytest.approx(100 * np.mean(hits))
    assert chance_recalls([{0}], 100, ks=(10,))[10] == pytest.approx(10.0)


def test_recall_counts_percent_of_queries():
    ranked = np.array([[0, 1], [1, 0], [1, 0]])
    assert recalls(ranked, [{0}, {0}, {2}], ks=(1, 2)) == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3)}


def test_evaluate_scores_a_trained_model_on_the_test_split(trained, prepared_dir, tmp_path):
    metrics = evaluate(trained["root"] / "stage2", prepared_dir, EvaluateConfig(), tmp_path / "m.json")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved == metrics
    assert metrics["texts"] == 48 and metrics["images"] == 24
    assert 0 <= metrics["mean_recall"] <= 100
    assert metrics["mean_recall"] == pytest.approx(
        np.mean([metrics[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]), abs=1e-3)
    assert math.isclose(metrics["chance_mean_recall"], metrics["chance_mean_recall"]) and metrics["chance_mean_recall"] > 0


def test_evaluate_rejects_a_folder_that_is_not_a_model(prepared_dir, tmp_path):
    with pytest.raises(ZhclipError, match="cannot load model"):
        evaluate(tmp_path, prepared_dir, EvaluateConfig())
