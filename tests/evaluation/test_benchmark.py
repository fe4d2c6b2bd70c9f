"""The benchmark suite: a retrieval split as Chinese-CLIP distributes it, scored as the reference's own
scripts score it; the suite's table with the published figures; clear errors on a bad suite."""

import json
import shutil

import numpy as np
import pytest

from zhclip.components.core.errors import ZhclipError
from zhclip.components.data import cnclip_files
from zhclip.components.evaluation.benchmark import benchmark
from zhclip.components.evaluation.cnclip_split import embed_cnclip_split
from zhclip.components.evaluation.published import PUBLISHED_FILE, published_figures
from zhclip.components.evaluation.suite import published_note, table_rows, write_suite
from zhclip.components.evaluation.suite_config import BenchmarkConfig, SuiteDataset, suite_datasets
from zhclip.model import load_model

from conftest import run_cli
from reference import run_reference_eval


@pytest.mark.slow
def test_a_chinese_clip_split_scores_as_the_reference_scripts_score_it(tiny_models, raw_dir, tmp_path):
    """The small demo's test split in Chinese-CLIP's layout: several captions per image, several images per
    caption. zhclip's figures against cn-clip's make_topk_predictions(_tr).py and evaluation(_tr).py on
    the same features."""
    split = SuiteDataset("demo", "retrieval", str(raw_dir), "test")
    ours = benchmark(tiny_models[0], split, batch_size=16, summary_path=tmp_path / "ours.json")
    assert json.loads((tmp_path / "ours.json").read_text()) == ours
    texts = [json.loads(line) for line in (raw_dir / "test_texts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(len(text["image_ids"]) > 1 for text in texts)  # several images per caption
    assert len({text["text_id"] for text in texts}) > len({i for text in texts for i in text["image_ids"]})
    assert (ours["texts"], ours["score"]) == (len(texts), ours["mean_recall"])

    model, processor = load_model(tiny_models[0])
    data = embed_cnclip_split(model, processor, str(raw_dir), "test", 16)
    cnclip_files.write_features(tmp_path / "img.jsonl", "image_id", data.image_ids, data.image_emb)
    cnclip_files.write_features(tmp_path / "txt.jsonl", "text_id", data.text_ids, data.text_emb)
    shutil.copy(raw_dir / "test_texts.jsonl", tmp_path / "test_texts.jsonl")
    feats = ("--image-feats", str(tmp_path / "img.jsonl"), "--text-feats", str(tmp_path / "txt.jsonl"))
    run_reference_eval("make_topk_predictions.py", *feats, "--top-k", "10", "--output", str(tmp_path / "t2i.jsonl"))
    run_reference_eval("make_topk_predictions_tr.py", *feats, "--top-k", "10", "--output", str(tmp_path / "i2t.jsonl"))
    run_reference_eval("transform_ir_annotation_to_tr.py", "--input", str(tmp_path / "test_texts.jsonl"))
    for script, answers, direction in (
        ("evaluation.py", "test_texts.jsonl", "t2i"),
        ("evaluation_tr.py", "test_texts.tr.jsonl", "i2t"),
    ):
        scores = tmp_path / f"score_{direction}.json"
        run_reference_eval(script, str(tmp_path / answers), str(tmp_path / f"{direction}.jsonl"), str(scores))
        theirs = json.loads(scores.read_text())["scoreJson"]
        assert [ours[f"{direction}_r{k}"] for k in (1, 5, 10)] == [round(theirs[f"r{k}"], 4) for k in (1, 5, 10)]
    assert 0 < ours["t2i_r1"] < 100  # an untrained model: neither trivial nor perfect


def _results(root, model, figures):
    for name, values in figures.items():
        (root / model).mkdir(parents=True, exist_ok=True)
        (root / model / f"{name}.json").write_text(json.dumps(values))


SUITE = [
    {"name": "flickr", "task": "retrieval", "path": "x", "published": "Flickr30K-CN"},
    {"name": "cifar-100", "task": "zeroshot", "path": "y"},
    {"name": "own", "task": "zeroshot", "path": "z"},
]


def _figures(recall, top1):
    recalls = {f"{d}_r{k}": recall for d in ("t2i", "i2t") for k in (1, 5, 10)}
    return {
        "flickr": recalls | {"mean_recall": recall, "score": recall},
        "cifar-100": {"top1": top1, "top5": 99.0, "score": top1},
        "own": {"top1": 50.0, "top5": 90.0, "score": 50.0},
    }


def test_the_suite_table_sets_every_model_beside_the_published_figures_of_its_size(tmp_path):
    _results(tmp_path / "results", "start", _figures(40.0, 30.0))
    _results(tmp_path / "results", "stage2", _figures(80.0, 60.0))
    datasets = suite_datasets(SUITE)
    summary = write_suite(
        tmp_path / "results", ["start", "stage2"], datasets, "ViT-B-16", tmp_path / "suite.json", tmp_path / "report"
    )
    assert json.loads((tmp_path / "suite.json").read_text(encoding="utf-8")) == summary
    stage2 = summary["models"]["stage2"]
    assert (stage2["suite_mean"], stage2["retrieval_mean"], stage2["zeroshot_mean"]) == (63.3333, 80.0, 55.0)
    # Flickr30K-CN: published by name; cifar-100 by its ELEVATER folder; nothing for the project's own set
    assert summary["published"]["flickr"]["zeroshot"]["t2i_r1"] == 62.7
    assert summary["published"]["flickr"]["finetune"]["mean_recall"] == round(
        (79.1 + 94.8 + 97.4 + 93.5 + 99.0 + 99.5) / 6, 4
    )
    assert summary["published"]["cifar-100"]["zeroshot"] == {"top1": 64.4} and "own" not in summary["published"]
    rows = table_rows(summary)
    assert rows[0] == ["dataset", "figure", "start", "stage2", "published zero-shot", "Δ", "published fine-tuned", "Δ"]
    assert ["cifar-100", "top-1", "30.00", "60.00", "64.4", "-4.40", "", ""] in rows
    assert ["flickr", "T2I R@1", "40.00", "80.00", "62.7", "+17.30", "79.1", "+0.90"] in rows
    assert ["own", "top-1", "50.00", "50.00", "", "", "", ""] in rows
    assert "Chinese-CLIP ViT-B/16" in published_note(summary)
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "64.4" in html and "+17.30" in html and "Results.md" in html

    tiny = write_suite(tmp_path / "results", ["stage2"], datasets, "tiny")
    assert tiny["published"] == {} and published_note(tiny).startswith(
        "Chinese-CLIP published no model of preset 'tiny'"
    )


def test_the_published_file_names_its_source_and_matches_the_paper_tables():
    rows = PUBLISHED_FILE.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 216 and all(row.endswith("/Results.md") for row in rows[1:])
    muge = published_figures("ViT-H-14", "muge")
    assert muge is not None and muge.figures["zeroshot"]["t2i_mean_recall"] == 78.8
    assert published_figures("RN50", "imagenet").figures == {"zeroshot": {"top1": 33.5}}
    assert published_figures("tiny", "MUGE") is None and published_figures("ViT-B-16", "food-101") is None


def test_a_bad_suite_is_refused_naming_the_entry_and_the_fix(tmp_path):
    with pytest.raises(ZhclipError, match=r"entry 2: unknown keys \['paht'\], missing \['path'\]"):
        suite_datasets([SUITE[0], {"name": "b", "task": "zeroshot", "paht": "y"}])
    with pytest.raises(ZhclipError, match=r"entry 2 \(b\): task 'classification' is neither retrieval nor zeroshot"):
        suite_datasets([SUITE[0], {"name": "b", "task": "classification", "path": "y"}])
    with pytest.raises(ZhclipError, match="entry 2: a second dataset named 'flickr'"):
        suite_datasets([SUITE[0], SUITE[0]])
    with pytest.raises(ZhclipError, match="name 'a b' must be letters"):
        suite_datasets([{"name": "a b", "task": "zeroshot", "path": "y"}])
    with pytest.raises(ZhclipError, match="benchmark.suite has no dataset 'nope'; it has demo-test, demo-unseen"):
        BenchmarkConfig().dataset("nope")
    with pytest.raises(ZhclipError, match=r"stage2/own.json is missing: run `zhclip benchmark --model models/stage2 "):
        write_suite(tmp_path, ["stage2"], suite_datasets(SUITE[2:]), "tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZhclipError, match="holds neither test_imgs.tsv and test_texts.jsonl .* nor a prepared split"):
        benchmark(tmp_path, SuiteDataset("x", "retrieval", str(tmp_path / "empty")))
    result = run_cli("benchmark", "--model", str(tmp_path), "--name", "x", "--defaults")
    assert (
        result.returncode == 2
        and "give --dataset NAME (of benchmark.suite), or --name, --task and --path" in result.stderr
    )


def test_a_broken_chinese_clip_split_is_refused_naming_the_line(tiny_models, tmp_path):
    (tmp_path / "test_texts.jsonl").write_text('{"text_id": 1, "text": "圆形", "image_ids": [7]}\n', encoding="utf-8")
    (tmp_path / "test_imgs.tsv").write_text("5\tnot-base64!\n")
    split = SuiteDataset("x", "retrieval", str(tmp_path))
    with pytest.raises(ZhclipError, match=r"test_imgs.tsv line 1: expected `image_id<TAB>base64 image`"):
        benchmark(tiny_models[0], split)
    blank = np.zeros((8, 8, 3), dtype=np.uint8)
    from PIL import Image

    from zhclip.components.demo.data import encode_image

    (tmp_path / "test_imgs.tsv").write_text(f"5\t{encode_image(Image.fromarray(blank))}\n")
    with pytest.raises(
        ZhclipError, match=r"test_texts.jsonl: text_id 1 names image_ids \[7\] that .*test_imgs.tsv does not hold"
    ):
        benchmark(tiny_models[0], split)
