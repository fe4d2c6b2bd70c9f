"""What rendering validation's Data Docs holds, against the number of checked batches.

Validation checks a split `rows_per_check` rows at a time, stores each batch's GE result on disk and
renders one Data Docs site from them all at the end (`components/data/validate.py`). This runs
`validate` on the demo data's prepared pairs with --rows-per-check values that make few or many
batches, and measures the process's resident memory before the render and at its peak during it
(Linux's VmHWM, reset just before).

    PYTHONPATH=. python <this folder>/data_docs.py --rows-per-check 400 4 1 --out <folder>
"""

import argparse
import tempfile
import time
from pathlib import Path

from bench.measure import emit, reset_peak_rss, resident_mb
from zhclip.components.data import validate as validation
from zhclip.components.data.ingest import IngestConfig, ingest
from zhclip.components.demo.data import DemoDataConfig, generate_demo_data


def measured_render(prepared: Path, folder: Path, rows_per_check: int) -> dict:
    found: dict = {}
    render = validation._Gate.render

    def measured(gate) -> None:
        reset_peak_rss()
        found["rss_before_mb"], started = resident_mb("VmRSS"), time.perf_counter()
        render(gate)
        found.update(peak_mb=resident_mb("VmHWM"), seconds=round(time.perf_counter() - started, 1))

    validation._Gate.render = measured
    try:
        report = validation.validate(
            prepared,
            folder / "validated",
            validation.ValidateConfig(rows_per_check=rows_per_check, max_bad_fraction=1.0),
            folder / "report.json",
            folder / "quarantine.jsonl",
            folder / "docs",
        )
    finally:
        validation._Gate.render = render
    batches = sum(-(-split["rows_in"] // rows_per_check) + 1 for split in report["splits"].values())
    return {"bench": "data_docs", "rows_per_check": rows_per_check, "results": batches} | found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-check", type=int, nargs="+", default=[400, 4])
    parser.add_argument("--out", type=Path, help="also append the JSON lines to OUT/data_docs.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generate_demo_data(root / "raw", DemoDataConfig())
        ingest(root / "raw", root / "prepared", IngestConfig(workers=1))
        for rows in args.rows_per_check:
            run = root / f"run-{rows}"
            emit(measured_render(root / "prepared", run, rows), args.out / "data_docs.jsonl" if args.out else None)


if __name__ == "__main__":
    main()
