"""An img2dataset-shaped corpus written from a Chinese-CLIP raw folder: each split a folder of
numbered shards in img2dataset's webdataset layout (`00000.tar` with `{key}.jpg/.txt/.json`, and
`00000.parquet` listing every URL tried) or its Parquet layout (`00000.parquet` with `jpg` and `txt`
columns). One row per (caption, image) pair, keys numbered as img2dataset numbers them (shard, then
row); every `failed_every`-th row failed to download, and `broken` rows carry bytes that are no image."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zhclip.components.data.schema import decode_base64

META = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
    ]
)


def _pairs(raw: Path, split: str) -> list[tuple[str, bytes]]:
    images = {}
    for line in (raw / f"{split}_imgs.tsv").read_text().splitlines():
        image_id, b64 = line.split("\t")
        images[int(image_id)] = decode_base64(b64)
    texts = [json.loads(line) for line in (raw / f"{split}_texts.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(text["text"], images[image_id]) for text in texts for image_id in text["image_ids"]]


def write_corpus(
    raw: Path,
    out: Path,
    layout: str | dict[str, str],
    rows_per_shard: int = 64,
    failed_every: int = 13,
    broken: int = 2,
) -> dict[str, dict[str, int]]:
    """Write every split of `raw` under `out/{split}/` in `layout` (`webdataset` or `parquet`, or one
    per split); returns per split the rows written, the failed ones and the broken ones."""
    counts = {}
    for split in ("train", "valid", "test"):
        split_layout = layout if isinstance(layout, str) else layout[split]
        rows = []
        for number, (caption, image) in enumerate(_pairs(raw, split)):
            failed = number % failed_every == failed_every - 1
            rows.append(
                {
                    "key": None,
                    "caption": caption,
                    "url": f"https://example.invalid/{split}/{number}.png",
                    "status": "failed_to_download" if failed else "success",
                    "error_message": "timed out" if failed else None,
                    "width": None if failed else 64,
                    "height": None if failed else 64,
                    "jpg": None if failed else (b"not an image" if number < broken else image),
                }
            )
        folder = out / split
        folder.mkdir(parents=True)
        for shard, start in enumerate(range(0, len(rows), rows_per_shard)):
            chunk = rows[start : start + rows_per_shard]
            for index, row in enumerate(chunk):
                row["key"] = f"{shard:05d}{index:04d}"
            (_write_webdataset if split_layout == "webdataset" else _write_parquet)(folder, shard, chunk)
        counts[split] = {
            "rows": len(rows),
            "failed": sum(row["status"] != "success" for row in rows),
            "broken": min(broken, len(rows)),
        }
    return counts


def _write_parquet(folder: Path, shard: int, rows: list[dict]) -> None:
    schema = META.append(pa.field("txt", pa.string())).append(pa.field("jpg", pa.binary()))
    table = pa.Table.from_pylist([{**row, "txt": row["caption"]} for row in rows], schema=schema)
    pq.write_table(table, folder / f"{shard:05d}.parquet", row_group_size=16)


def _write_webdataset(folder: Path, shard: int, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=META), folder / f"{shard:05d}.parquet")
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
        for row in rows:
            if row["status"] != "success":
                continue
            meta = {key: value for key, value in row.items() if key != "jpg"}
            files = {"jpg": row["jpg"], "json": json.dumps(meta).encode(), "txt": row["caption"].encode("utf-8")}
            for extension, data in files.items():
                member = tarfile.TarInfo(f"{row['key']}.{extension}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
