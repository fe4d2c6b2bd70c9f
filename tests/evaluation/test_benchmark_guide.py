"""docs/evaluation.md, "Pointing it at the paper's datasets": its suite and commands, run in a copy of the
small project against generated stand-ins laid out as Chinese-CLIP distributes MUGE, Flickr30K-CN,
COCO-CN and the ELEVATER sets, and as ImageNet's validation set is kept (the real ones are downloads
of many gigabytes, which no test may fetch)."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from zhclip.components.demo.data import encode_image

from conftest import copy_of, update_params
from doc_blocks import REPO, fenced_blocks, run_block, shell_blocks

pytestmark = pytest.mark.slow
GUIDE = REPO / "docs" / "evaluation.md"


def _image(rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))


def _retrieval(folder: Path, split: str, rng: np.random.Generator) -> None:
    """12 images and 24 captions: two per image, and every fourth caption names two images."""
    folder.mkdir(parents=True)
    ids = [int(i) for i in rng.choice(10**6, 12, replace=False)]
    (folder / f"{split}_imgs.tsv").write_text("".join(f"{i}\t{encode_image(_image(rng))}\n" for i in ids))
    with (folder / f"{split}_texts.jsonl").open("w", encoding="utf-8") as texts:
        for number in range(24):
            image_ids = [ids[number // 2]] + ([ids[(number // 2 + 1) % 12]] if number % 4 == 0 else [])
            texts.write(json.dumps({"text_id": 100 + number, "text": f"描述{number}", "image_ids": image_ids}) + "\n")


def _classes(folder: Path, class_folders: list[str], names: list[str], rng: np.random.Generator) -> None:
    for class_folder in class_folders:
        (folder / class_folder).mkdir(parents=True)
        for index in range(2):
            _image(rng).save(folder / class_folder / f"{index}.jpg")
    (folder.parent / "label_cn.txt").write_text("\n".join(names) + "\n", encoding="utf-8")


def _stand_ins(root: Path) -> None:
    rng = np.random.default_rng(0)
    _retrieval(root / "MUGE", "valid", rng)
    _retrieval(root / "Flickr30k-CN", "test", rng)
    _retrieval(root / "COCO-CN", "test", rng)
    _classes(
        root / "ELEVATER" / "cifar-100" / "test", [f"{i:03d}" for i in range(12)], [f"类{i}" for i in range(12)], rng
    )
    _classes(root / "ELEVATER" / "food-101" / "test", ["0", "1", "2"], ["饺子", "包子", "馄饨"], rng)
    _classes(root / "imagenet" / "val", ["n01440764", "n01443537", "n01484850"], ["丁鲷", "金鱼", "大白鲨"], rng)


def test_the_guide_scores_the_suite_of_the_papers_datasets(small_project, tmp_path):
    project = copy_of(small_project, tmp_path)
    _stand_ins(project / "data" / "benchmark")
    (suite_block,) = [code for language, _, code, _ in fenced_blocks(GUIDE) if language == "yaml" and "suite:" in code]
    suite = yaml.safe_load(suite_block)["benchmark"]["suite"]
    update_params(project, {"benchmark": {"suite": suite}})
    (commands,) = [block for block in shell_blocks(GUIDE) if block.detail == "tests/evaluation/test_benchmark_guide.py"]

    output = run_block(commands, project)

    summary = json.loads((project / "metrics" / "benchmark.json").read_text(encoding="utf-8"))
    assert list(summary["tasks"]) == ["muge", "flickr30k-cn", "coco-cn", "cifar-100", "food-101", "imagenet"]
    stage2 = summary["models"]["stage2"]
    assert all(0 <= stage2[name]["t2i_r1"] <= 100 for name in ("muge", "flickr30k-cn", "coco-cn"))
    assert {name: sorted(stage2[name]) for name in ("cifar-100", "imagenet")} == {
        "cifar-100": ["top1", "top5"],
        "imagenet": ["top1", "top5"],
    }
    one = json.loads((project / "metrics" / "benchmark" / "stage2" / "cifar-100.json").read_text(encoding="utf-8"))
    assert (one["layout"], one["classes"], one["images"], one["template_set"]) == ("elevater", 12, 24, "openai")
    imagenet = json.loads((project / "metrics" / "benchmark" / "stage2" / "imagenet.json").read_text(encoding="utf-8"))
    food = json.loads((project / "metrics" / "benchmark" / "stage2" / "food-101.json").read_text(encoding="utf-8"))
    assert (imagenet["layout"], food["template_set"]) == ("label file", "food")
    # the table, as `zhclip results` prints it: the tiny demo preset has no published counterpart
    assert "Chinese-CLIP published no model of preset 'tiny'" in output and "muge" in output
    assert '"dataset": "cifar-100"' in output  # the last command's JSON
