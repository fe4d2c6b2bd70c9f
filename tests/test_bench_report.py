"""bench/report.py: the suite's JSON lines become the verdict and tables of bench/RESULTS.md."""

import json
from pathlib import Path

import pytest

from bench.report import load, markdown, plot, verdict

H200 = Path(__file__).resolve().parents[1] / "bench" / "results" / "2026-11-28-h200"


def test_verdict_of_the_recorded_h200_suite():
    rows = {row["target"].split(" >=")[0]: row for row in verdict(load(H200))}
    # work-changing cases (FLIP 3,824, cached stage 1 8,886) exceed the targets but never count
    assert (rows["stage 2"]["case"], rows["stage 2"]["measured"], rows["stage 2"]["met"]) == (
        "fast-model-s2", "2,729 samples/s = 1.84x", False)
    assert (rows["stage 1"]["case"], rows["stage 1"]["met"]) == ("fast-s1", False)
    assert rows["stage 2"]["target"].endswith("(2,973 samples/s)")
    assert (rows["image embedding"]["measured"], rows["image embedding"]["met"]) == ("11,979 images/s", False)
    assert rows["input"]["case"] == "gpu-nvjpeg" and rows["input"]["met"] and "on the GPU" in rows["input"]["measured"]


def test_tables_list_every_case_and_what_was_not_measured(tmp_path):
    lines = [{"bench": "environment", "date": "2026-12-01", "device": "GPU", "matmul_peak_tflops": 700.0},
             {"bench": "train", "case": "reference-s2", "impl": "reference", "stage": 2, "samples_per_s": 1000.0,
              "gflop_per_sample": 130.0, "mfu": 0.2, "peak_memory_mb": 2048.0},
             {"bench": "train", "case": "fast-pf-s2", "impl": "zhclip", "stage": 2, "samples_per_s": 2100.0,
              "gflop_per_sample": 100.0, "mfu": 0.4, "peak_memory_mb": 1024.0, "loss_matches": True},
             {"bench": "train", "case": "fast-pf-s1", "error": "RuntimeError: no kernel"},
             {"bench": "train", "case": "fast-model-s2", "skipped": "over the 130 s budget"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    suite = load(tmp_path)
    text = markdown(suite)
    assert "| `fast-pf-s2` | 2 | 2,100 | 2.10 | 100.0 | 40.0% | 1.0 | yes |  |" in text
    assert "2,100 samples/s = 2.10x | yes |" in text
    assert "| train | `fast-pf-s1` | RuntimeError: no kernel |" in text and "over the 130 s budget" in text
    assert plot(suite, tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")


def test_a_folder_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no JSON lines"):
        load(tmp_path)
