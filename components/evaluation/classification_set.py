"""Zero-shot image sets in the layouts they are downloaded in, local or s3://.

- **ELEVATER**, as Chinese-CLIP distributes its zero-shot datasets: `<set>/label_cn.txt` (one Chinese
  class name a line, in class order), images in numbered class folders `<set>/test/000/`, `001/`, ...
  (`0/` ... `9/` for up to ten classes); `label.txt`, `train/` and `index.json` are not read.
- **A label file**: class folders under any names (ImageNet's WordNet ids, e.g. in `<set>/val/`) and
  a label file whose line i names the i-th folder in sorted order.
- **Class-named folders**: `<set>/<class name>/<images>`.

All three are read with the rules of torchvision's `ImageFolder`, the reader of Chinese-CLIP's
`zeroshot_evaluation.py`: class i is the i-th class folder in sorted order, a class's images are
every file below its folder with one of ImageFolder's extensions, in sorted (folder, file name)
order. Written here because torchvision has no build beside the pinned CPU torch and ImageFolder
reads only local disks. Where ImageFolder would quietly score a broken set (a numbered folder
missing, so every later class shifts by one; more names than folders), this reader stops and says
which file or folder to fix.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from pyarrow import fs

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import Folder, read_text

LABEL_FILE = "label_cn.txt"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


@dataclass(frozen=True)
class ClassificationSet:
    """The images of a set in ImageFolder order, their class indices and the class names."""

    name: str  # the set's folder name: Chinese-CLIP picks the prompt templates by it
    layout: str  # "elevater", "label file" or "class folders"
    classes: list[str]
    images: Folder  # the folder that holds the class folders
    files: list[str]  # relative to `images`
    labels: np.ndarray
    ignored: int  # files below the class folders that ImageFolder does not read

    def open(self, index: int) -> Image.Image:
        """The index-th image, in RGB (as ImageFolder's loader converts it)."""
        where = self.images.name(self.files[index])
        try:
            with Image.open(io.BytesIO(self.images.read_bytes(self.files[index]))) as image:
                return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ZhclipError(f"{where}: not a readable image ({err}); remove or replace it") from err


def read_classification_set(uri: str, split: str = "test", label_file: str = "") -> ClassificationSet:
    """A set in any of the three layouts (module docstring).

    A label file (`label_file`, relative to the set's folder or a path/URI of its own, else the set's
    `label_cn.txt` when present) means the class names come from it, and the images from the set's
    `split` folder when it has one. Without one, the class folders' names are the class names.
    """
    root = Folder(uri)
    if root.kind() != fs.FileType.Directory:
        raise ZhclipError(f"{uri} is not a folder; expected an ELEVATER set, class folders or an image folder")
    labels_at = label_file or (LABEL_FILE if root.kind(LABEL_FILE) == fs.FileType.File else "")
    images = Folder(root.name(split)) if labels_at and root.kind(split) == fs.FileType.Directory else root
    folders, files, ignored = _image_folder(images)
    if labels_at:
        classes = _class_names(root, labels_at, folders, images)
        layout = "elevater" if all(folder.isdigit() for folder in folders) else "label file"
    else:
        classes, layout = folders, "class folders"
    index = {folder: i for i, folder in enumerate(folders)}
    labels = np.array([index[PurePosixPath(file).parts[0]] for file in files], dtype=np.int64)
    name = PurePosixPath(root.uri.rstrip("/")).name
    return ClassificationSet(name, layout, classes, images, files, labels, ignored)


def _image_folder(images: Folder) -> tuple[list[str], list[str], int]:
    """Class folders (sorted), the image files below them in ImageFolder's order, and how many other
    files there were."""
    listing = images.filesystem.get_file_info(fs.FileSelector(images.root, recursive=True))
    relative = [(info.type, info.path[len(images.root) :].lstrip("/")) for info in listing]
    folders = sorted(path for kind, path in relative if kind == fs.FileType.Directory and "/" not in path)
    if len(folders) < 2:
        raise ZhclipError(f"{images.uri} needs at least two class folders, found {folders}")
    in_a_class = [path for kind, path in relative if kind == fs.FileType.File and "/" in path]
    readable = [path for path in in_a_class if path.lower().endswith(IMAGE_EXTENSIONS)]
    by_folder: dict[str, list[str]] = {folder: [] for folder in folders}
    for path in readable:
        by_folder[path.split("/", 1)[0]].append(path)
    files: list[str] = []
    for folder in folders:
        if not by_folder[folder]:
            raise ZhclipError(f"{images.name(folder)} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        # ImageFolder walks a class folder with sorted(os.walk(...)) and sorts each folder's names
        files += sorted(by_folder[folder], key=lambda path: path.rpartition("/")[::2])
    return folders, files, len(in_a_class) - len(readable)


def _class_names(root: Folder, label_file: str, folders: list[str], images: Folder) -> list[str]:
    """The label file's names, one a line; line i names the i-th class folder."""
    where = label_file if "://" in label_file or label_file.startswith("/") else root.name(label_file)
    try:
        text = read_text(where) if where == label_file else root.read_bytes(label_file).decode("utf-8")
    except (FileNotFoundError, OSError, UnicodeDecodeError) as err:
        raise ZhclipError(f"cannot read the label file {where}: {err}") from err
    names = [line.strip() for line in text.removeprefix("\ufeff").rstrip("\r\n\t ").splitlines()]
    blank = [number for number, name in enumerate(names, start=1) if not name]
    if blank:
        raise ZhclipError(f"{where} line {blank[0]} is blank: every line names one class, in class order")
    if len(names) != len(folders):
        raise ZhclipError(
            f"{where} names {len(names)} classes but {images.uri} holds {len(folders)} class folders; "
            "line i names the i-th folder in sorted order"
        )
    for position, folder in enumerate(folders):
        if folder.isdigit() and int(folder) != position:
            raise ZhclipError(
                f"{images.name(folder)} is class folder number {position} in sorted order: a numbered class "
                f"folder is missing before it (ELEVATER numbers them 0, 1, ... in the order of {where})"
            )
    return names
