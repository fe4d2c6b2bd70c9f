"""Bytes of Parquet footer per row group for ingest's spilled images, with and without column
statistics (a footer lists every row group of its file; the writer and the reader hold it whole).

Writes --groups row groups of --group-rows rows shaped like ingest's spill (line, image_id, --image-bytes
of random bytes, a 200-character record, file, file_line) and prints a JSON line per setting.

    PYTHONPATH=. python <this folder>/parquet_footer.py --groups 4000 --out <folder>
"""

import argparse
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.measure import emit
from zhclip.components.data.ingest import _DecodedImages


def footer_bytes(path: Path, groups: int, group_rows: int, image_bytes: int, statistics: bool) -> int:
    images = [os.urandom(image_bytes) for _ in range(group_rows)]
    records = ['{"key": "' + "a" * 180 + f'{row:08d}"}}' for row in range(group_rows)]
    with pq.ParquetWriter(path, _DecodedImages.SCHEMA, write_statistics=statistics) as writer:
        for group in range(groups):
            lines = range(group * group_rows, (group + 1) * group_rows)
            columns = {"line": lines, "image_id": lines, "image": images, "record": records}
            columns |= {"file": pa.array(["train_imgs.tsv"] * group_rows).dictionary_encode(), "file_line": lines}
            writer.write_table(pa.table(columns, schema=_DecodedImages.SCHEMA))
    return pq.ParquetFile(path).metadata.serialized_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=4000)
    parser.add_argument("--group-rows", type=int, default=256)
    parser.add_argument("--image-bytes", type=int, default=816, help="a 16-pixel JPEG of the data bench")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/parquet_footer.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for statistics in (True, False):
            size = footer_bytes(
                Path(folder) / "spill.parquet", args.groups, args.group_rows, args.image_bytes, statistics
            )
            emit(
                {"bench": "parquet_footer", "statistics": statistics, "row_groups": args.groups}
                | {"footer_bytes": size, "bytes_per_row_group": round(size / args.groups)},
                args.out / "parquet_footer.jsonl" if args.out else None,
            )


if __name__ == "__main__":
    main()
