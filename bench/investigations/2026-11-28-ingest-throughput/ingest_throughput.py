"""Ingest throughput (images/s) on generated Chinese-CLIP-format data, per number of workers.

    PYTHONPATH=. python <this folder>/ingest_throughput.py --images 2000 --size 224 --workers 1 2

Prints one JSON line per worker count. JPEG inputs at --size pixels, re-encoded as JPEG, as a
typical real dataset would be.
"""

import argparse
import base64
import io
import json
import random
import tempfile
from pathlib import Path

from bench.measure import emit
from zhclip.components.data.ingest import IngestConfig, ingest
from zhclip.components.demo.data import COLOURS, POSITIONS, SHAPES, draw_image


def write_dataset(folder: Path, images: int, size: int) -> None:
    rng = random.Random(0)
    with open(folder / "train_imgs.tsv", "w") as tsv, open(folder / "train_texts.jsonl", "w") as texts:
        for image_id in range(1, images + 1):
            colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
            buffer = io.BytesIO()
            draw_image(colour, shape, position, size, rng).save(buffer, format="JPEG", quality=90)
            tsv.write(f"{image_id}\t{base64.urlsafe_b64encode(buffer.getvalue()).decode()}\n")
            texts.write(
                json.dumps(
                    {"text_id": image_id, "text": f"{position}有一个{colour}的{shape}", "image_ids": [image_id]},
                    ensure_ascii=False,
                )
                + "\n"
            )
    for split in ("valid", "test"):  # ingest wants every split; keep them tiny
        (folder / f"{split}_imgs.tsv").write_text((folder / "train_imgs.tsv").read_text().splitlines()[0] + "\n")
        (folder / f"{split}_texts.jsonl").write_text((folder / "train_texts.jsonl").read_text().splitlines()[0] + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        raw.mkdir()
        write_dataset(raw, args.images, args.size)
        for workers in args.workers:
            summary = ingest(raw, Path(tmp) / f"out{workers}", IngestConfig(workers=workers, image_format="JPEG"))
            emit(
                {
                    "bench": "ingest",
                    "images": args.images,
                    "size": args.size,
                    "workers": workers,
                    "images_per_s": summary["images_per_s"],
                    "duration_s": summary["duration_s"],
                }
            )


if __name__ == "__main__":
    main()
