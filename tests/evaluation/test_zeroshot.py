"""Zero-shot classification: template ensembling, accuracy bookkeeping, outputs and clear errors."""

import csv
import json

import numpy as np
import pytest

from zhclip.components.core.errors import ZhclipError
from zhclip.components.evaluation.classification_set import read_classification_set
from zhclip.components.evaluation.templates import TEMPLATE_SET_OF_DATASET, templates_for
from zhclip.components.evaluation.zeroshot import ZeroshotConfig, class_embeddings, confusion_counts, zeroshot
from zhclip.model import embed_texts, load_model

from browser import assert_chinese_renders
from conftest import run_cli


@pytest.mark.parametrize("seed", range(20))
def test_confusion_counts_equal_sklearns_confusion_matrix(seed):
    from sklearn.metrics import confusion_matrix

    rng = np.random.default_rng(seed)
    classes = int(rng.integers(1, 12))
    labels, predicted = rng.integers(0, classes, size=(2, int(rng.integers(1, 40))))  # some classes unseen
    expected = confusion_matrix(labels, predicted, labels=range(classes))
    assert np.array_equal(confusion_counts(labels, predicted, classes), expected)


def test_class_embedding_is_the_renormalised_mean_of_normalised_prompt_embeddings(trained):
    model, processor = load_model(trained["root"] / "stage2")
    templates = ["{}的照片", "一张{}的图片", "这是{}"]
    weights = class_embeddings(model, processor, ["圆形", "十字"], templates)
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1, atol=1e-6)
    prompts = embed_texts(model, processor, ["圆形的照片", "一张圆形的图片", "这是圆形"])
    mean = prompts.mean(axis=0)
    np.testing.assert_allclose(weights[0], mean / np.linalg.norm(mean), atol=1e-6)
    single = class_embeddings(model, processor, ["十字", "圆形"], ["{}的照片"])
    np.testing.assert_allclose(single[0], embed_texts(model, processor, ["十字的照片"])[0], atol=1e-6)


def test_zeroshot_reports_consistent_accuracies_predictions_and_report(trained, raw_dir, tmp_path):
    folder = raw_dir / "zeroshot" / "digits"
    summary = zeroshot(
        trained["root"] / "stage2",
        folder,
        ZeroshotConfig(templates=["手写数字{}", "{}的照片"]),
        tmp_path / "z.json",
        tmp_path / "pred.csv",
        tmp_path / "report",
    )
    assert json.loads((tmp_path / "z.json").read_text(encoding="utf-8")) == summary
    assert summary["classes"] == 10 and summary["images"] == 10 and summary["chance_top1"] == 10.0
    rows = list(csv.DictReader((tmp_path / "pred.csv").open(encoding="utf-8")))
    assert len(rows) == 10 and {row["actual"] for row in rows} == {
        "零",
        "一",
        "二",
        "三",
        "四",
        "五",
        "六",
        "七",
        "八",
        "九",
    }
    correct = [row["actual"] == row["predicted"] for row in rows]
    assert summary["top1"] == pytest.approx(100 * np.mean(correct))
    assert summary["top1"] <= summary["top5"] <= 100
    for row in rows:  # one image per class here, so each class is right or wrong entirely
        assert summary["per_class_accuracy"][row["actual"]] == (100.0 if row["actual"] == row["predicted"] else 0.0)
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "Confusion matrix" in html and html.count("<img") == 10 + 1  # an image per class and the accuracy chart
    assert f"{summary['top1']:.2f}" in (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    # Chinese class names as a person sees them: drawn with a CJK font in a real browser (no empty boxes)
    fonts = assert_chinese_renders(tmp_path / "report" / "report.html", tmp_path / "zeroshot.png", tmp_path / "profile")
    assert {"零", "九"} <= set(fonts)  # class names in the tables


def test_bad_folders_and_templates_are_rejected_clearly(tmp_path, trained):
    (tmp_path / "only").mkdir()
    with pytest.raises(ZhclipError, match="at least two class folders"):
        read_classification_set(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZhclipError, match="empty holds no images"):
        read_classification_set(str(tmp_path))
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "only" / "also.png").write_bytes(b"not a png")
    with pytest.raises(ZhclipError, match="broken.png: not a readable image"):
        zeroshot(trained["root"] / "stage2", tmp_path, ZeroshotConfig())
    result = run_cli(
        "zeroshot", "--model", str(trained["root"] / "stage2"), "--images", str(tmp_path), "--templates", "照片"
    )
    assert result.returncode == 2 and "exactly one '{}'" in result.stderr


def _elevater(root, folders, names):
    for folder in folders:
        (root / "test" / folder).mkdir(parents=True)
        (root / "test" / folder / "a.png").write_bytes(b"")
    (root / "label_cn.txt").write_text(names, encoding="utf-8")
    return str(root)


def test_an_elevater_set_that_imagefolder_would_misread_is_refused_naming_the_fix(tmp_path):
    """torchvision's ImageFolder numbers classes by sorted folder position: with a folder missing, or
    a name more or less, every later class would be scored under another's name."""
    with pytest.raises(ZhclipError, match=r"test/003 is class folder number 2 in sorted order: a numbered"):
        read_classification_set(_elevater(tmp_path / "gap", ["000", "001", "003"], "甲\n乙\n丙\n"))
    with pytest.raises(ZhclipError, match=r"label_cn.txt names 4 classes but .*test holds 3 class folders"):
        read_classification_set(_elevater(tmp_path / "count", ["0", "1", "2"], "甲\n乙\n丙\n丁\n"))
    with pytest.raises(ZhclipError, match=r"label_cn.txt line 2 is blank"):
        read_classification_set(_elevater(tmp_path / "blank", ["0", "1", "2"], "甲\n\n丙\n"))
    with pytest.raises(ZhclipError, match=r"test/10 is class folder number 2"):  # 0, 1, 10, 11, 2, ...: not padded
        read_classification_set(_elevater(tmp_path / "pad", [str(i) for i in range(12)], "类\n" * 12))
    with pytest.raises(ZhclipError, match="cannot read the label file .*missing.txt"):
        read_classification_set(str(tmp_path / "pad"), label_file="missing.txt")
    read = read_classification_set(_elevater(tmp_path / "ok", ["0", "1", "2"], "\ufeff甲\r\n乙\r\n丙\r\n\n"))
    assert (read.layout, read.classes, read.files) == (
        "elevater",
        ["甲", "乙", "丙"],
        ["0/a.png", "1/a.png", "2/a.png"],
    )


def test_templates_are_chinese_clips_chosen_by_dataset_name_unless_set():
    assert TEMPLATE_SET_OF_DATASET["resisc45_clip"] == "eurosat"
    name, openai = templates_for("cifar-100")
    assert name == "openai" and len(openai) == 183 and openai[0] == "{}的照片"  # duplicates kept, as averaged
    assert templates_for("resisc45_clip")[1][0] == "一张{}的卫星照片"
    assert templates_for("food-101", template_set="imagenet")[1][0] == "{}的照片。"
    assert templates_for("food-101", "imagenet", ["看{}"]) == ("custom", ["看{}"])
    with pytest.raises(ZhclipError, match="template set 'nope' does not exist; choose one of .*openai"):
        templates_for("x", "nope")
