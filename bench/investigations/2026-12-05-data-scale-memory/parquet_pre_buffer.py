"""Memory of reading a large Parquet file back row group by row group, with and without pyarrow's
`pre_buffer` (ingest reads its spilled images this way: `ParquetFile.iter_batches`).

Writes --rows rows of --image-bytes random bytes each (the re-encoded images of a split) in row groups
of --group-rows, as ingest's spill does, then reads the file through once per setting, each in a
process of its own, and prints a JSON line: the file's size, resident memory at the end of the read
and its peak, above the memory before it.

    PYTHONPATH=. python <this folder>/parquet_pre_buffer.py --rows 1000000 --image-bytes 1600 --out <folder>
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.measure import emit

REPO = Path(__file__).resolve().parents[3]

READ = """
import sys
import pyarrow.parquet as pq
from bench.measure import resident_mb

before = resident_mb("VmRSS")
rows = 0
reader = pq.ParquetFile(sys.argv[1], pre_buffer=sys.argv[2] == "True")
for batch in reader.iter_batches(batch_size=int(sys.argv[3])):
    rows += batch.num_rows
print(rows, resident_mb("VmRSS") - before, resident_mb("VmHWM") - before)
"""


def write_spill(path: Path, rows: int, image_bytes: int, group_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("line", pa.int64()), ("image", pa.binary())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, group_rows):
            lines = range(start, min(rows, start + group_rows))
            images = [os.urandom(image_bytes) for _ in lines]  # random: incompressible, like JPEG bytes
            writer.write_table(pa.table({"line": list(lines), "image": images}, schema=schema))


def read(path: Path, pre_buffer: bool, group_rows: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", READ, str(path), str(pre_buffer), str(group_rows)],
        cwd=REPO,  # where `bench.measure` imports from
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    rows, resident, peak = result.stdout.split()
    return {"rows_read": int(rows), "resident_after_mb": round(float(resident)), "peak_mb": round(float(peak))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--image-bytes", type=int, default=1600)
    parser.add_argument("--group-rows", type=int, default=256, help="ingest's row_group_rows")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/parquet_pre_buffer.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "decoded.parquet"
        write_spill(path, args.rows, args.image_bytes, args.group_rows)
        file_mb = round(path.stat().st_size / 2**20)
        for pre_buffer in (True, False):
            emit(
                {"bench": "parquet_pre_buffer", "pre_buffer": pre_buffer, "rows": args.rows, "file_mb": file_mb}
                | read(path, pre_buffer, args.group_rows),
                args.out / "parquet_pre_buffer.jsonl" if args.out else None,
            )


if __name__ == "__main__":
    main()
