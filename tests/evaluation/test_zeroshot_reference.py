"""zhclip's zero-shot scores against cn-clip 1.6.0's own `eval/zeroshot_evaluation.py`, run in the
reference environment (torchvision's ImageFolder, the script's template choice, classifier and scoring:
reference_zeroshot.py), on generated sets in the layouts Chinese-CLIP distributes, with one tiny
released-format checkpoint converted for zhclip."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from builders import reference_config, reference_model, save_as_released
from PIL import Image

from zhclip.components.evaluation.classification_set import read_classification_set
from zhclip.components.evaluation.templates import templates_for
from zhclip.components.evaluation.zeroshot import ZeroshotConfig, class_embeddings, zeroshot
from zhclip.model import embed_images, load_model
from zhclip.model.convert import convert_checkpoint

pytestmark = pytest.mark.slow

REFERENCE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-reference" / "bin" / "python"
RUNNER = Path(__file__).with_name("reference_zeroshot.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A released-format tiny reference checkpoint, its model config, and zhclip's conversion of it."""
    root = tmp_path_factory.mktemp("zeroshot_reference")
    save_as_released(reference_model(), root / "ref.pt")
    (root / "model_info.json").write_text(json.dumps(reference_config()))
    convert_checkpoint(root / "ref.pt", root / "zhclip")
    return root


def _images(folder: Path, count: int, rng: np.random.Generator, suffix: str = ".png", mode: str = "RGB") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
        pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / f"image_{index:04d}{suffix}")


def _elevater_cifar(root: Path, rng: np.random.Generator) -> tuple[Path, str]:
    """12 classes: folders 000..011; a nested folder, an upper-case .JPG, a greyscale image and a
    file ImageFolder skips, as real downloads have them. openai's 183 templates (duplicates included)."""
    names = [f"类别{index}号" for index in range(12)]
    (root / "label_cn.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (root / "label.txt").write_text("\n".join(f"class {index}" for index in range(12)) + "\n")
    for index in range(12):
        _images(root / "test" / f"{index:03d}", 2, rng)
    _images(root / "test" / "003" / "more", 2, rng)
    _images(root / "test" / "005", 1, rng, suffix=".JPG")
    _images(root / "test" / "007", 1, rng, suffix=".bmp", mode="L")
    (root / "test" / "000" / "notes.txt").write_text("not an image")
    _images(root / "train" / "000", 1, rng)  # zero-shot reads test/ only
    return root / "test", "label_cn.txt"


def _elevater_food(root: Path, rng: np.random.Generator) -> tuple[Path, str]:
    """Three classes (folders 0, 1, 2): food-101's own 21 templates, chosen by the folder's name."""
    (root / "label_cn.txt").write_text("饺子\n包子\n馄饨\n", encoding="utf-8")
    for index in range(3):
        _images(root / "test" / str(index), 4, rng, suffix=".jpg")
    return root / "test", "label_cn.txt"


def _imagenet_style(root: Path, rng: np.random.Generator) -> tuple[Path, str]:
    """Class folders named by WordNet id, names from a label file given by path."""
    synsets = ["n01530575", "n01440764", "n01443537", "n01484850"]
    for synset in synsets:
        _images(root / synset, 3, rng)
    (root.parent / f"{root.name}_labels.txt").write_text("丁鲷\n金鱼\n大白鲨\n燕雀\n", encoding="utf-8")
    return root, f"../{root.name}_labels.txt"


LAYOUTS = {"cifar-100": _elevater_cifar, "food-101": _elevater_food, "imagenet": _imagenet_style}


@pytest.mark.parametrize("name", LAYOUTS)
def test_zeroshot_equals_chinese_clips_zeroshot_evaluation(checkpoint, tmp_path, name):
    if not REFERENCE_PYTHON.is_file():
        pytest.fail("the reference environment is missing: run `make reference-env` (make test does)")
    root = tmp_path / name
    root.mkdir()
    datapath, label_file = LAYOUTS[name](root, np.random.default_rng(len(name)))
    theirs = tmp_path / "reference"
    theirs.mkdir()
    result = subprocess.run(
        [str(REFERENCE_PYTHON), str(RUNNER), str(checkpoint / "model_info.json"), str(checkpoint / "ref.pt")]
        + [str(datapath), name, str((root / label_file).resolve()), str(theirs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference_top1 = float(result.stdout.split("zeroshot-top1: ")[1].split()[0])
    reference_probs = np.array(json.loads((theirs / f"{name}.json").read_text())["predictions"][0])
    samples = json.loads((theirs / "samples.json").read_text())

    label_setting = "" if label_file == "label_cn.txt" else str((root / label_file).resolve())
    config = ZeroshotConfig(label_file=label_setting)
    ours = zeroshot(checkpoint / "zhclip", root, config, predictions_path=tmp_path / "ours.csv")
    dataset = read_classification_set(str(root), label_file=label_setting)
    assert [[file, int(label)] for file, label in zip(dataset.files, dataset.labels)] == samples
    assert ours["top1"] == round(100 * reference_top1, 4)
    assert ours["template_set"] == {"food-101": "food"}.get(name, "openai")

    model, processor = load_model(checkpoint / "zhclip")
    _, templates = templates_for(name)
    weights = class_embeddings(model, processor, dataset.classes, templates)
    images = embed_images(model, processor, [dataset.open(i) for i in range(len(dataset.files))])
    logits = 100 * images @ weights.T
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, reference_probs, atol=1e-3)
    predicted = [row.split(",")[2] for row in (tmp_path / "ours.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert predicted == [dataset.classes[i] for i in reference_probs.argmax(axis=1)]
