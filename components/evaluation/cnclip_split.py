"""Embedding a retrieval split as Chinese-CLIP distributes MUGE, Flickr30K-CN and COCO-CN, local or s3://:
`{split}_imgs.tsv` (`image_id<TAB>base64 image`, a line each) and `{split}_texts.jsonl`
(`{"text_id", "text", "image_ids"}`, a line each).

As the reference's evaluation scores such a split, every image of the tsv is in the image gallery and
every text of the jsonl in the text gallery; texts with `image_ids` are the text-to-image queries and
the images they name the image-to-text ones. The tsv is streamed: memory holds the embeddings and one
batch of decoded images, never the split's images.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterator

import numpy as np
from PIL import Image
from pyarrow import fs

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.progress import progress_bar
from zhclip.components.core.storage import Folder
from zhclip.components.data.schema import decode_base64
from zhclip.components.evaluation.retrieval import RetrievalSet
from zhclip.model import decode_image, embed_images, embed_texts


def is_cnclip_split(folder: str, split: str) -> bool:
    """Whether the folder holds the split's `_imgs.tsv` and `_texts.jsonl`."""
    root = Folder(folder)
    return all(root.kind(f"{split}{suffix}") == fs.FileType.File for suffix in ("_imgs.tsv", "_texts.jsonl"))


def embed_cnclip_split(model, processor, folder: str, split: str, batch_size: int) -> RetrievalSet:
    """The split's texts and images embedded, with each text's positive image rows."""
    root = Folder(folder)
    texts_file = f"{split}_texts.jsonl"
    text_ids, texts, wanted = _read_texts(root, texts_file)
    image_ids, image_emb = _embed_tsv(model, processor, root, f"{split}_imgs.tsv", batch_size)
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    for text_id, ids in zip(text_ids, wanted):
        missing = [image_id for image_id in ids if image_id not in row_of]
        if missing:
            raise ZhclipError(
                f"{root.name(texts_file)}: text_id {text_id} names image_ids {missing[:5]} that "
                f"{root.name(f'{split}_imgs.tsv')} does not hold"
            )
    return RetrievalSet(
        text_ids=text_ids,
        image_ids=image_ids,
        text_emb=embed_texts(model, processor, texts, batch_size),
        image_emb=image_emb,
        text_to_images=[{row_of[image_id] for image_id in ids} for ids in wanted],
        texts=texts,
    )


def _read_texts(root: Folder, name: str) -> tuple[list[int], list[str], list[list[int]]]:
    text_ids: list[int] = []
    texts: list[str] = []
    wanted: list[list[int]] = []
    seen: set[int] = set()
    with root.open(name) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{root.name(name)} line {number}"
            text_id, text, image_ids = _text_record(line, where)
            if text_id in seen:
                raise ZhclipError(f"{where}: text_id {text_id} appears twice")
            seen.add(text_id)
            text_ids.append(text_id)
            texts.append(text)
            wanted.append(image_ids)
    if not any(wanted):
        raise ZhclipError(f"{root.name(name)}: no text names its image_ids, so nothing can be scored")
    return text_ids, texts, wanted


def _text_record(line: bytes, where: str) -> tuple[int, str, list[int]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ZhclipError(f"{where}: not a JSON object ({err})") from err
    text_id, text, image_ids = record.get("text_id"), record.get("text"), record.get("image_ids", [])
    if not _is_id(text_id) or not isinstance(text, str):
        raise ZhclipError(f'{where}: expected {{"text_id": <integer>, "text": <string>, "image_ids": [...]}}')
    if not isinstance(image_ids, list) or not all(_is_id(i) for i in image_ids):
        raise ZhclipError(f"{where}: image_ids must be a list of integer ids, got {image_ids!r}")
    return text_id, text, image_ids


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _embed_tsv(model, processor, root: Folder, name: str, batch_size: int) -> tuple[list[int], np.ndarray]:
    image_ids: list[int] = []
    chunks: list[np.ndarray] = []
    bar = progress_bar(total=root.size(name), desc=f"embed {name}", unit="B", unit_scale=True, leave=False)
    with bar:
        for batch in _batches(_tsv_images(root, name, bar), batch_size):
            image_ids += [image_id for image_id, _ in batch]
            chunks.append(embed_images(model, processor, [image for _, image in batch], batch_size))
    if not image_ids:
        raise ZhclipError(f"{root.name(name)} holds no images")
    return image_ids, np.concatenate(chunks)


def _tsv_images(root: Folder, name: str, bar) -> Iterator[tuple[int, Image.Image]]:
    seen: set[int] = set()
    with root.open(name) as lines:
        for number, line in enumerate(lines, start=1):
            bar.update(len(line))
            if not line.strip():
                continue
            where = f"{root.name(name)} line {number}"
            image_id, tab, encoded = line.rstrip(b"\r\n").partition(b"\t")
            try:
                key, blob = int(image_id), decode_base64(encoded.decode("ascii"))
            except (ValueError, binascii.Error) as err:
                raise ZhclipError(f"{where}: expected `image_id<TAB>base64 image` ({err})") from err
            if key in seen:
                raise ZhclipError(f"{where}: image_id {key} appears twice")
            seen.add(key)
            try:
                yield key, decode_image(blob)
            except ValueError as err:
                raise ZhclipError(f"{where}: image_id {key} is not a readable image ({err})") from err


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
