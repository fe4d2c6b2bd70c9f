"""Retrieval metrics: the reference's semantics on hand-made embeddings, chunking, ties, chance;
equality with the reference scripts' own output; the report files and their rendering in Chromium."""

import itertools
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from zhclip.components.core.errors import ZhclipError
from zhclip.components.evaluation.evaluate import EvaluateConfig, evaluate
from zhclip.components.evaluation.retrieval import chance_recalls, recalls, retrieval_metrics, top_k

from browser import assert_chinese_renders
from conftest import run_cli
from reference import run_reference_eval


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


def test_top_k_with_many_ties_equals_a_stable_full_sort():
    # Small integer features make scores collide inside the top k and across the cut.
    rng = np.random.default_rng(1)
    queries, gallery = (
        rng.integers(0, 3, size=(64, 3)).astype(np.float32),
        rng.integers(0, 3, size=(40, 3)).astype(np.float32),
    )
    full = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(top_k(queries, gallery, 7, chunk_size=9), full)


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
        np.mean([metrics[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]), abs=1e-3
    )
    assert (
        math.isclose(metrics["chance_mean_recall"], metrics["chance_mean_recall"]) and metrics["chance_mean_recall"] > 0
    )


def test_evaluate_rejects_a_folder_that_is_not_a_model(prepared_dir, tmp_path):
    with pytest.raises(ZhclipError, match="cannot load model"):
        evaluate(tmp_path, prepared_dir, EvaluateConfig())


def _random_retrieval_files(root: Path, rng: np.random.Generator) -> dict[str, Path]:
    """Reference-format features and annotations: several positives per text, unreferenced images, unannotated texts.

    Each annotated text's feature is its positives' mean plus noise, so recalls land between 0 and 100.
    """
    image_ids = rng.choice(10**6, size=150, replace=False).tolist()
    text_ids = rng.choice(10**6, size=120, replace=False).tolist()
    images = rng.normal(size=(150, 16))
    positives = [
        rng.choice(120, size=int(rng.integers(1, 4)), replace=False) for _ in range(100)
    ]  # images 120+: distractors
    texts = np.concatenate(
        [[images[p].mean(axis=0) for p in positives], rng.normal(size=(20, 16))]
    )  # 20 unannotated texts
    texts += rng.normal(scale=1.5, size=texts.shape)
    files = {
        "images": root / "image_feat.jsonl",
        "texts": root / "text_feat.jsonl",
        "annotations": root / "test_texts.jsonl",
    }
    for path, field, ids, features in (
        (files["images"], "image_id", image_ids, images),
        (files["texts"], "text_id", text_ids, texts),
    ):
        features = (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)
        path.write_text("".join(json.dumps({field: i, "feature": f.tolist()}) + "\n" for i, f in zip(ids, features)))
    with files["annotations"].open("w", encoding="utf-8") as out:
        for text_id, wanted in zip(text_ids, positives):
            out.write(
                json.dumps(
                    {"text_id": text_id, "text": f"描述{text_id}", "image_ids": [image_ids[i] for i in wanted]},
                    ensure_ascii=False,
                )
                + "\n"
            )
    return files


def test_recalls_equal_the_reference_scripts_on_random_features(tmp_path):
    files = _random_retrieval_files(tmp_path, np.random.default_rng(7))
    ours = tmp_path / "ours"
    result = run_cli(
        "evaluate",
        "--image-feats",
        str(files["images"]),
        "--text-feats",
        str(files["texts"]),
        "--annotations",
        str(files["annotations"]),
        "--out",
        str(tmp_path / "metrics.json"),
        "--report-dir",
        str(ours),
        "--defaults",
    )
    assert result.returncode == 0, result.stderr
    ref = tmp_path / "ref"
    ref.mkdir()
    feats = ("--image-feats", str(files["images"]), "--text-feats", str(files["texts"]))
    run_reference_eval("make_topk_predictions.py", *feats, "--top-k", "10", "--output", str(ref / "t2i.jsonl"))
    run_reference_eval("make_topk_predictions_tr.py", *feats, "--top-k", "10", "--output", str(ref / "i2t.jsonl"))
    run_reference_eval("transform_ir_annotation_to_tr.py", "--input", str(files["annotations"]))
    answers_i2t = tmp_path / "test_texts.tr.jsonl"
    for script, answers, direction in (
        ("evaluation.py", files["annotations"], "t2i"),
        ("evaluation_tr.py", answers_i2t, "i2t"),
    ):
        run_reference_eval(script, str(answers), str(ref / f"{direction}.jsonl"), str(ref / f"score_{direction}.json"))
        theirs = json.loads((ref / f"score_{direction}.json").read_text())
        assert theirs["success"], theirs
        # Bit-identical scores, from the same top-10 lists, and the reference scores our predictions the same.
        assert json.loads((ours / f"score_{direction}.json").read_text()) == theirs
        their_lines = (ref / f"{direction}.jsonl").read_text().splitlines()
        our_lines = (ours / f"predictions_{direction}.jsonl").read_text().splitlines()
        assert set(our_lines) <= set(their_lines)  # the reference also ranks for unannotated queries
        run_reference_eval(
            script, str(answers), str(ours / f"predictions_{direction}.jsonl"), str(ref / f"ours_{direction}.json")
        )
        assert json.loads((ref / f"ours_{direction}.json").read_text()) == theirs
        run_reference_eval(
            script,
            str(ours / f"answers_{direction}.jsonl"),
            str(ref / f"{direction}.jsonl"),
            str(ref / f"answers_{direction}.json"),
        )
        assert json.loads((ref / f"answers_{direction}.json").read_text()) == theirs
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        for k in (1, 5, 10):
            assert metrics[f"{direction}_r{k}"] == round(theirs["scoreJson"][f"r{k}"], 4)
    assert 0 < metrics["t2i_r1"] < metrics["t2i_r10"] < 100  # random features: neither trivial nor perfect


def test_feature_files_with_problems_are_rejected_naming_the_line(tmp_path):
    files = _random_retrieval_files(tmp_path, np.random.default_rng(3))
    with files["texts"].open("a") as out:
        out.write(json.dumps({"text_id": "x", "feature": [0.0] * 16}) + "\n")
    result = run_cli(
        "evaluate",
        "--image-feats",
        str(files["images"]),
        "--text-feats",
        str(files["texts"]),
        "--annotations",
        str(files["annotations"]),
    )
    assert result.returncode == 2 and "text_feat.jsonl line 121: field 'text_id' must be an integer id" in result.stderr
    result = run_cli("evaluate", "--image-feats", str(files["images"]))
    assert result.returncode == 2 and "give --model, or all of --image-feats" in result.stderr


@pytest.fixture(scope="module")
def evaluated(trained, prepared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluated")
    metrics = evaluate(
        trained["root"] / "stage2",
        prepared_dir,
        EvaluateConfig(examples=3, write_features=True),
        root / "m.json",
        root / "recall.csv",
        root / "report",
    )
    return {"root": root, "metrics": metrics}


def test_evaluate_writes_curves_reference_files_and_a_report(evaluated):
    root, metrics = evaluated["root"], evaluated["metrics"]
    curve = np.genfromtxt(root / "recall.csv", delimiter=",", names=True)
    assert curve["k"].tolist() == list(range(1, 11))
    for direction in ("t2i", "i2t"):
        assert np.all(np.diff(curve[direction]) >= 0)
        assert [curve[direction][k - 1] for k in (1, 5, 10)] == [metrics[f"{direction}_r{k}"] for k in (1, 5, 10)]
    report = root / "report"
    predictions = [json.loads(line) for line in (report / "predictions_t2i.jsonl").read_text().splitlines()]
    assert len(predictions) == 48 and all(len(p["image_ids"]) == 10 for p in predictions)
    features = [json.loads(line) for line in (report / "image_feat.jsonl").read_text().splitlines()]
    assert len(features) == 24 and abs(np.linalg.norm(features[0]["feature"]) - 1) < 1e-5
    assert json.loads((report / "score_t2i.json").read_text())["scoreJson"]["r1"] == pytest.approx(
        metrics["t2i_r1"], abs=1e-4
    )
    html = (report / "report.html").read_text(encoding="utf-8")
    assert html.count('class="example"') == 3 and f"{metrics['mean_recall']:.2f}" in html
    assert f"{metrics['mean_recall']:.2f}" in (report / "report.md").read_text(encoding="utf-8")


def _render_in_chromium(html_path: Path, tmp_path: Path) -> dict:
    """Load the page in headless Chromium and read back what it decoded and laid out."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (`make system-deps` installs it)")
    probe = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
        "const out = document.createElement('pre'); out.id = 'probe'; out.textContent = JSON.stringify({"
        "images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length, "
        "rows: document.querySelectorAll('table.metrics tr').length, "
        "tableWidth: document.querySelector('table.metrics').getBoundingClientRect().width}); "
        "document.body.appendChild(out); });</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(html_path.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=10000",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    start = result.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    return json.loads(result.stdout[start : result.stdout.index("</pre>", start)])


def test_report_renders_its_images_and_table_in_a_real_browser(evaluated, tmp_path):
    rendered = _render_in_chromium(evaluated["root"] / "report" / "report.html", tmp_path)
    assert rendered["images"] == 1 + 3 * 5  # the recall@k plot and five results for each of three queries
    assert rendered["decoded"] == rendered["images"]
    assert rendered["rows"] == 4 and rendered["tableWidth"] > 100
    # The query captions, as a person sees them: drawn with a CJK font (no empty boxes), screenshot kept
    fonts = assert_chinese_renders(
        evaluated["root"] / "report" / "report.html", tmp_path / "evaluate.png", tmp_path / "cdp"
    )
    assert len(fonts) == 3 and (tmp_path / "evaluate.png").stat().st_size > 10_000


def test_a_trained_model_is_set_beside_its_start_with_the_gain(trained, prepared_dir, tmp_path):
    start = evaluate(
        trained["root"] / "stage1", prepared_dir, EvaluateConfig(examples=0), tmp_path / "start.json", label="start"
    )
    assert [entry["model"] for entry in start["chain"]] == ["start"] and "gain_over_start" not in start
    final = evaluate(
        trained["root"] / "stage2",
        prepared_dir,
        EvaluateConfig(examples=0),
        tmp_path / "final.json",
        report_dir=tmp_path / "report",
        init_metrics=tmp_path / "start.json",
    )
    assert [entry["model"] for entry in final["chain"]] == ["start", "stage2"]
    assert final["start_mean_recall"] == start["mean_recall"]
    assert final["gain_over_start"] == pytest.approx(final["mean_recall"] - start["mean_recall"], abs=1e-4)
    assert len(final["chain"][1]["recall_at_k"]["t2i"]) == 10
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "Start → stages" in html and f"{final['gain_over_start']:+.2f}" in html and html.count("<img") == 2


def test_metrics_and_report_are_logged_to_an_existing_mlflow_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from zhclip.components.evaluation.evaluate import evaluate_features

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root is relative to the working directory
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("eval")).info.run_id
    files = _random_retrieval_files(tmp_path, np.random.default_rng(5))
    metrics = evaluate_features(
        files["images"],
        files["texts"],
        files["annotations"],
        EvaluateConfig(),
        report_dir=tmp_path / "report",
        mlflow_run_id=run_id,
    )
    logged = client.get_run(run_id).data.metrics
    assert logged["mean_recall"] == metrics["mean_recall"] and logged["i2t_r10"] == metrics["i2t_r10"]
    artifacts = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluate")}
    assert {"report.html", "report.md", "score_t2i.json", "predictions_i2t.jsonl"} <= artifacts
