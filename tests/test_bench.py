"""bench/: the GPU benchmarks run end to end on CPU with the tiny preset and report sound figures.

Speed is never asserted here (benchmarks are not timed tests); what is checked is that every case
runs the code it names, counts its work and, where it compares, finds the same results.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(module: str, *args: str) -> dict[str, dict]:
    """Run `python -m bench.<module>` from the repository root; its JSON lines keyed by case."""
    result = subprocess.run([sys.executable, "-m", f"bench.{module}", "--device", "cpu", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["bench"] == "environment" and lines[0]["torch"]
    return {line["case"]: line for line in lines[1:]}


def test_training_benchmark_runs_reference_and_zhclip_steps():
    cases = run_bench("train_throughput", "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                      "--cases", "reference-s2", "reference-s1", "eager-s2", "bf16-s2")
    for name, case in cases.items():
        assert "error" not in case, f"{name}: {case.get('error')}"
        assert case["samples_per_s"] > 0 and case["gflop_per_sample"] > 0 and case["peak_memory_mb"] > 0
    # the locked tower has no backward pass: stage 1 does less work per sample than stage 2
    assert cases["reference-s1"]["gflop_per_sample"] < cases["reference-s2"]["gflop_per_sample"]
    # fused QKV, fused AdamW, channels-last and bf16 give the plain fp32 model's loss and embeddings
    eager = cases["eager-s2"]
    assert eager["applied"]["fused_qkv"] == 4 and eager["loss_matches"] is True
    assert eager["embed_cosine_min"] > 0.99 and abs(eager["loss_fast"] - eager["loss_plain"]) < 0.05
    # the same architecture and batch: zhclip counts the reference's work (to within its text pooler)
    assert cases["bf16-s2"]["gflop_per_sample"] == pytest.approx(cases["reference-s2"]["gflop_per_sample"], rel=0.1)


def test_training_benchmark_rejects_unknown_cases():
    result = subprocess.run([sys.executable, "-m", "bench.train_throughput", "--cases", "fastest"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown cases ['fastest']" in result.stderr


def test_embedding_benchmark_runs_reference_and_zhclip():
    cases = run_bench("embed_throughput", "--preset", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1",
                      "--cases", "reference-fp16", "fp32", "bf16")
    for name, case in cases.items():
        assert "error" not in case, f"{name}: {case.get('error')}"
        assert case["images_per_s"] > 0 and case["gflop_per_image"] > 0
    assert cases["bf16"]["gflop_per_image"] == cases["fp32"]["gflop_per_image"]


def test_input_pipeline_benchmark_gives_the_processors_pixels():
    cases = run_bench("input_pipeline", "--images", "24", "--width", "64", "--height", "48", "--batch-size", "8",
                      "--workers", "0", "--gpu-decode")
    assert cases["cpu-0-workers"]["images_per_s"] > 0
    assert cases["cpu-uint8-0-workers"]["max_abs_diff_vs_processor"] == 0.0
    assert "error" in cases["gpu-nvjpeg"] or cases["gpu-nvjpeg"]["max_abs_diff_vs_processor"] < 0.1
