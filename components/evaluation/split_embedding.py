"""Embedding a prepared split for retrieval: each text and image once, streamed row group by row group."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from zhclip.components.core.memory import release_freed_memory
from zhclip.components.core.progress import progress_bar
from zhclip.components.data.shards import PreparedSplit
from zhclip.components.evaluation.retrieval import RetrievalSet
from zhclip.model import decode_image, embed_images, embed_texts


@dataclass
class EmbeddedSplit:
    """A prepared split as retrieval sees it (each text and each image once, in order of first
    appearance), embedded, with the text row and image row of every pair in the split's order."""

    data: RetrievalSet
    pair_texts: np.ndarray
    pair_images: np.ndarray


def embed_split(model, processor, prepared_dir: str | Path, split: str, batch_size: int) -> EmbeddedSplit:
    """Embed a prepared split streamed row group by row group: memory holds the ids, captions and
    embeddings, one row group and one batch of decoded images, never the split's images."""
    shards = PreparedSplit.open(str(prepared_dir), split)
    ids = pa.concat_tables(shards.tables(["text_id", "text", "image_id"]))
    pair_texts, text_ids = pd.factorize(ids["text_id"].to_numpy())
    pair_images, image_ids = pd.factorize(ids["image_id"].to_numpy())
    first_text_pair = np.unique(pair_texts, return_index=True)[1]
    texts = ids["text"].take(first_text_pair).to_pylist()
    text_to_images: list[set[int]] = [set() for _ in text_ids]
    for text, image in zip(pair_texts.tolist(), pair_images.tolist()):
        text_to_images[text].add(image)
    text_emb = _embed_texts_trimmed(model, processor, texts, batch_size)
    image_emb = _embed_images_streamed(model, processor, shards, pd.Index(image_ids), batch_size)

    def load_images(rows: Collection[int]) -> dict[int, Image.Image]:
        return _images_of(shards, {int(image_ids[row]): row for row in rows})

    data = RetrievalSet(
        text_ids=text_ids.tolist(),
        image_ids=image_ids.tolist(),
        text_emb=text_emb,
        image_emb=image_emb,
        text_to_images=text_to_images,
        texts=texts,
        load_images=load_images,
    )
    return EmbeddedSplit(data, pair_texts, pair_images)


TRIM_EVERY = (
    16  # batches between handing freed heap back: glibc keeps what tokenising and torch free (+130 MB on 50k texts)
)


def _embed_texts_trimmed(model, processor, texts: list[str], batch_size: int) -> np.ndarray:
    chunk = batch_size * TRIM_EVERY
    parts = []
    for start in range(0, len(texts), chunk):
        parts.append(embed_texts(model, processor, texts[start : start + chunk], batch_size))
        release_freed_memory()
    return np.concatenate(parts) if parts else embed_texts(model, processor, [], batch_size)


def _embed_images_streamed(
    model, processor, shards: PreparedSplit, image_index: pd.Index, batch_size: int
) -> np.ndarray:
    """One embedding per image id of `image_index` (in its order), decoding each image once as the row groups
    stream by."""
    embedded = np.zeros(len(image_index), dtype=bool)
    out: np.ndarray | None = None
    rows: list[int] = []
    images: list[Image.Image] = []

    batches = 0

    def flush() -> None:
        nonlocal out, batches
        if images:
            emb = embed_images(model, processor, images, batch_size)
            out = np.zeros((len(image_index), emb.shape[1]), dtype=np.float32) if out is None else out
            out[rows] = emb
            rows.clear()
            images.clear()
            batches += 1
            if batches % TRIM_EVERY == 0:
                release_freed_memory()

    for table in progress_bar(
        shards.tables(["image_id", "image"]),
        total=len(shards.groups),
        desc=f"embed {shards.split} images",
        unit="row groups",
        leave=False,
    ):
        for row, blob in zip(
            image_index.get_indexer(table["image_id"].to_numpy()).tolist(), table["image"].to_pylist()
        ):
            if not embedded[row]:
                embedded[row] = True
                rows.append(row)
                images.append(decode_image(blob))
                if len(images) == batch_size:
                    flush()
    flush()
    return out if out is not None else np.zeros((0, model.config.projection_dim), dtype=np.float32)


def _images_of(shards: PreparedSplit, rows_by_id: dict[int, int]) -> dict[int, Image.Image]:
    """Decoded images for a few image ids (image row -> image), reading the image column only of the row
    groups that hold them."""
    found: dict[int, Image.Image] = {}
    wanted = np.fromiter(rows_by_id, dtype=np.int64, count=len(rows_by_id))
    for group in range(len(shards.groups)):
        if len(found) == len(rows_by_id):
            break
        if np.isin(shards.read(group, ["image_id"])["image_id"].to_numpy(), wanted).any():
            table = shards.read(group, ["image_id", "image"])
            for image_id, blob in zip(table["image_id"].to_pylist(), table["image"].to_pylist()):
                if image_id in rows_by_id and rows_by_id[image_id] not in found:
                    found[rows_by_id[image_id]] = decode_image(blob)
    return found
