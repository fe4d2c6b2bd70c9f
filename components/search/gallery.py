"""Galleries to index: an image folder, a Chinese-CLIP `*_imgs.tsv`, or a prepared split's shards.

Each is read as a stream of `GalleryImage`s, so memory holds one batch of encoded images (one row
group of a shard) whatever the gallery's size. Every image carries a `location` that `read_image`
turns back into its bytes, so the search service shows an image without the index holding it:

- a file of a folder:        its path or URI (`gallery/a.jpg`, `s3://bucket/prefix/a.jpg`);
- a line of an `_imgs.tsv`:  `<tsv>#<byte offset of the line>`;
- a row of a prepared split: `<shard>#<row group>:<row>`.

Locations keep the gallery's path as it was given: a relative one (as `dvc repro` passes) is read
relative to where `zhclip serve` runs, so a cloned or moved repository still finds its images.
"""

from __future__ import annotations

import binascii
import functools
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow.parquet as pq

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.storage import Folder, arrow_filesystem
from zhclip.components.data.schema import decode_base64
from zhclip.components.data.shards import PreparedSplit

ANCHOR = re.compile(r"#(\d+(?::\d+)?)$")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class GalleryImage:
    id: str
    location: str
    blob: bytes
    caption: str = ""  # a prepared split's first caption of the image, shown beside it


def gallery_kind(gallery: str) -> str:
    """`tsv`, `shards` (a folder of part-*.parquet) or `folder`; fails naming the path when it is none."""
    from pyarrow import fs

    filesystem, path = arrow_filesystem(gallery)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.File and gallery.endswith(".tsv"):
        return "tsv"
    if info.type != fs.FileType.Directory:
        raise ZhclipError(
            f"gallery {gallery} is not an image folder, an *_imgs.tsv file or a prepared split "
            "(e.g. data/validated/test)"
        )
    names = [entry.base_name for entry in filesystem.get_file_info(fs.FileSelector(path))]
    return "shards" if any(name.startswith("part-") and name.endswith(".parquet") for name in names) else "folder"


FILES_PER_PIECE = 256  # an image folder is read (and spread over Ray Data's actors) this many files at a time


@dataclass(frozen=True)
class Piece:
    """A unit of a gallery read at once: a prepared shard's row group, some files of a folder, or a
    whole `_imgs.tsv` (a text file is read in order). Pieces pickle, so Ray workers read their own."""

    kind: str
    gallery: str
    shard: str = ""
    group: int = 0
    files: tuple[str, ...] = ()


def gallery_pieces(gallery: str) -> tuple[list[Piece], int | None]:
    """The gallery cut into pieces in a fixed order, and its number of images when known up front
    (a prepared split has one row per caption, so only its pairs are known)."""
    kind = gallery_kind(gallery)
    if kind == "shards":
        parent, split = gallery.rstrip("/").rsplit("/", 1) if "/" in gallery.rstrip("/") else (".", gallery)
        shards = PreparedSplit.open(parent, split)
        return [
            Piece(kind, gallery, shards.folder.name(where.path[len(shards.folder.root) :].lstrip("/")), where.index)
            for where in shards.groups
        ], None
    if kind == "tsv":
        return [Piece(kind, gallery)], None
    files = _image_files(gallery)
    if not files:
        raise ZhclipError(f"gallery {gallery} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [
        Piece(kind, gallery, files=tuple(files[start : start + FILES_PER_PIECE]))
        for start in range(0, len(files), FILES_PER_PIECE)
    ], len(files)


def read_piece(piece: Piece) -> Iterator[GalleryImage]:
    if piece.kind == "shards":
        yield from _shard_images(piece)
    elif piece.kind == "tsv":
        yield from _tsv_images(piece.gallery)
    else:
        folder = Folder(piece.gallery)
        for relative in piece.files:
            yield GalleryImage(relative, folder.name(relative), folder.read_bytes(relative))


def read_gallery(gallery: str) -> tuple[Iterator[GalleryImage], int | None]:
    """The gallery's images in a fixed order, each once, and their number when known up front."""
    pieces, total = gallery_pieces(gallery)
    return first_of_each(image for piece in pieces for image in read_piece(piece)), total


def first_of_each(images: Iterable[GalleryImage]) -> Iterator[GalleryImage]:
    """Each image id once: a prepared split has one row per caption, and an image has several."""
    seen: set[str] = set()
    for image in images:
        if image.id not in seen:
            seen.add(image.id)
            yield image


def _image_files(gallery: str) -> list[str]:
    from pyarrow import fs

    filesystem, root = arrow_filesystem(gallery)
    listing = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    return sorted(
        info.path[len(root) :].lstrip("/")
        for info in listing
        if info.type == fs.FileType.File and PurePosixPath(info.path).suffix.lower() in IMAGE_SUFFIXES
    )


def _tsv_images(tsv: str) -> Iterator[GalleryImage]:
    filesystem, path = arrow_filesystem(tsv)
    offset = 0
    with filesystem.open_input_stream(path) as stream:
        for number, line in enumerate(io.BufferedReader(stream), start=1):
            start, offset = offset, offset + len(line)
            if line.strip():
                image_id, blob = _tsv_line(line, f"{tsv} line {number}")
                yield GalleryImage(image_id, f"{tsv}#{start}", blob)


def _tsv_line(line: bytes, where: str) -> tuple[str, bytes]:
    image_id, tab, encoded = line.rstrip(b"\r\n").partition(b"\t")
    if not tab:
        raise ZhclipError(f"{where}: expected `image_id<TAB>base64 image`")
    try:
        return image_id.decode("utf-8"), decode_base64(encoded.decode("ascii"))
    except (UnicodeDecodeError, binascii.Error) as err:
        raise ZhclipError(f"{where}: {err}") from err


def _shard_images(piece: Piece) -> Iterator[GalleryImage]:
    filesystem, inner = arrow_filesystem(piece.shard)
    with filesystem.open_input_file(inner) as handle:
        table = pq.ParquetFile(handle).read_row_group(piece.group, columns=["image_id", "image", "text"]).to_pydict()
    for row, (image_id, blob, text) in enumerate(zip(table["image_id"], table["image"], table["text"])):
        yield GalleryImage(str(image_id), f"{piece.shard}#{piece.group}:{row}", blob, text or "")


def read_image(location: str) -> bytes:
    """The encoded bytes of the image at `location` (see the module's docstring for its forms)."""
    anchored = ANCHOR.search(location)  # a file name may hold a '#' too: only a numeric tail is an anchor
    path, anchor = (location[: anchored.start()], anchored.group(1)) if anchored else (location, "")
    filesystem, inner = arrow_filesystem(path)
    try:
        if not anchor:
            with filesystem.open_input_stream(inner) as stream:
                return stream.read()
        if ":" in anchor:
            group, row = (int(part) for part in anchor.split(":"))
            return _row_group_images(path, group)[row]
        with filesystem.open_input_file(inner) as handle:
            handle.seek(int(anchor))
            line = _line_from(handle)
            return _tsv_line(line, location)[1]
    except (OSError, ValueError, IndexError) as err:
        raise ZhclipError(f"cannot read the image at {location}: {err}") from err


def _line_from(handle, chunk_bytes: int = 1 << 16) -> bytes:
    """The bytes up to the next newline; an image line is tens of kB, read a chunk at a time."""
    chunks = []
    while chunk := handle.read(chunk_bytes):
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            break
        chunks.append(chunk)
    return b"".join(chunks)


@functools.lru_cache(maxsize=8)
def _row_group_images(shard: str, group: int) -> list[bytes]:
    # A thumbnail needs one image, but Parquet reads a row group at once: keep the last few groups.
    filesystem, inner = arrow_filesystem(shard)
    with filesystem.open_input_file(inner) as handle:
        return pq.ParquetFile(handle).read_row_group(group, columns=["image"]).column("image").to_pylist()
