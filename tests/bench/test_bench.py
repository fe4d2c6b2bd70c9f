"""bench/: the GPU benchmarks run end to end on CPU with the tiny preset and report sound figures.

Speed is never asserted here (benchmarks are not timed tests); what is checked is that every case
runs the code it names, counts its work and, where it compares, finds the same results.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, update_params

REPO = Path(__file__).resolve().parents[2]
BENCHES = ("train_throughput", "embed_throughput", "input_pipeline", "train_end_to_end", "loss_curve")


def bench_lines(module: str, *args: str) -> list[dict]:
    """Run `python -m bench.<module>` from the repository root; its JSON lines after the environment."""
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--device", "cpu", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["bench"] == "environment" and lines[0]["torch"]
    return lines[1:]


def run_bench(module: str, *args: str) -> dict[str, dict]:
    """The JSON lines of `python -m bench.<module>`, keyed by case."""
    return {line["case"]: line for line in bench_lines(module, *args)}


def python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_benchmarks_need_nothing_a_bare_gpu_host_lacks():
    imports = "; ".join(f"import bench.{name}" for name in BENCHES)
    loaded = python(f"import json, sys; {imports}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))")
    assert not {"ray", "mlflow", "great_expectations", "kfp", "dvc", "minio", "onnxruntime"} & set(json.loads(loaded))


def test_gpu_suite_names_only_existing_cases():
    script = (REPO / "bench" / "gpu_suite.sh").read_text().replace("\\\n", " ")
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_suite.sh")]).returncode == 0
    runs = re.findall(r"bench\.(\w+)[^\n]*--cases ([^\n]*)", script)
    assert {module for module, _ in runs} == {"train_throughput", "embed_throughput"}
    assert (
        re.findall(r"bench\.(?:train_end_to_end|loss_curve)[^\n]*--(?:case|fast) (\S+)", script) == ['"$FASTEST"'] * 2
    )
    runs += [("train_throughput", name) for name in re.findall(r"else '([\w-]+)'", script)]  # FASTEST's default
    catalogues = json.loads(
        python(
            "import json; from bench import embed_throughput, train_throughput; "
            "print(json.dumps({m.__name__.split('.')[1]: list(m.CASES) "
            "for m in (embed_throughput, train_throughput)}))"
        )
    )
    for module, arguments in runs:
        names = arguments.split("--")[0].split()
        assert names and set(names) <= set(catalogues[module]), (
            f"{module}: unknown {set(names) - set(catalogues[module])}"
        )


@pytest.mark.slow
def test_training_benchmark_runs_reference_and_zhclip_steps():
    cases = run_bench(
        "train_throughput",
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--cases",
        "reference-s2",
        "reference-s1",
        "eager-s2",
        "bf16-s2",
        "eager-pf-s2",
        "hf-compile-s1",
    )
    for name, case in cases.items():
        assert "error" not in case, f"{name}: {case.get('error')}"
        assert case["samples_per_s"] > 0 and case["gflop_per_sample"] > 0 and case["peak_memory_mb"] > 0
    # the locked tower has no backward pass: stage 1 does less work per sample than stage 2
    assert cases["reference-s1"]["gflop_per_sample"] < cases["reference-s2"]["gflop_per_sample"]
    # fused QKV, fused AdamW, channels-last and bf16 give the plain fp32 model's loss and embeddings
    eager = cases["eager-s2"]
    assert eager["applied"]["fused_qkv"] == 4 and eager["loss_matches"] is True
    assert eager["embed_cosine_min"] > 0.99 and abs(eager["loss_fast"] - eager["loss_plain"]) < 0.05
    # the padding-free text tower gives the same loss and skips the padded positions' work
    padding_free = cases["eager-pf-s2"]
    assert padding_free["applied"]["padding_free"] is True and padding_free["loss_matches"] is True
    assert padding_free["gflop_per_sample"] < eager["gflop_per_sample"]
    # the same architecture and batch: zhclip counts the reference's work (to within its text pooler)
    assert cases["bf16-s2"]["gflop_per_sample"] == pytest.approx(cases["reference-s2"]["gflop_per_sample"], rel=0.1)
    # the peer is plain transformers on the same model: stage 1 without the locked tower's backward
    peer = cases["hf-compile-s1"]
    assert peer["impl"] == "hf" and peer["applied"] == {"compile": "model"}
    assert cases["reference-s1"]["gflop_per_sample"] == pytest.approx(peer["gflop_per_sample"], rel=0.1)
    assert peer["gflop_per_sample"] < cases["bf16-s2"]["gflop_per_sample"]


@pytest.mark.slow
def test_end_to_end_benchmark_trains_from_jpeg_shards_and_compares_with_tensors():
    lines = bench_lines(
        "train_end_to_end",
        "--case",
        "eager-s2",
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--images",
        "96",
        "--workers",
        "1",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--width",
        "64",
        "--height",
        "48",
        "--augment",
    )
    by_input = {line["input"]: line for line in lines if "input" in line}
    assert set(by_input) == {"tensors", "cpu", "gpu"}
    assert by_input["tensors"]["x_tensors"] == 1.0 and by_input["tensors"]["data_wait_share"] == 0.0
    cpu = by_input["cpu"]
    assert cpu["samples_per_s"] > 0 and 0 <= cpu["data_wait_share"] < 1 and cpu["peak_memory_mb"] > 0
    assert cpu["x_tensors"] == pytest.approx(cpu["samples_per_s"] / by_input["tensors"]["samples_per_s"], rel=0.01)
    assert "torchvision" in by_input["gpu"]["error"], "no torchvision here: the GPU input is reported, not faked"


@pytest.mark.slow
def test_loss_curve_check_finds_identical_configurations_identical_and_measures_chance():
    """fp32-s2 is plain's configuration, its images normalised on the device instead (the same
    pixels): the curves coincide. Plain with other dropout draws departs: the noise floor."""
    lines = {
        line["case"]: line
        for line in bench_lines(
            "loss_curve",
            "--fast",
            "fp32-s2",
            "--noise-floor",
            "--preset",
            "tiny",
            "--batch-size",
            "8",
            "--steps",
            "16",
            "--window",
            "4",
            "--train-images",
            "30",
            "--workers",
            "1",
            "--tolerance",
            "0.001",
            "--lr",
            "2e-3",
            "--warmup-steps",
            "2",
        )
    }
    losses = lines["plain"]["losses"]
    assert len(losses) == len(lines["fp32-s2"]["losses"]) == len(lines["plain-reseeded"]["losses"]) == 16
    assert lines["plain"]["peak_memory_mb"] > 0
    assert sum(losses[:4]) > sum(losses[-4:]), "the demo's shapes are being learnt"
    noise, comparison = lines["noise-floor"], lines["comparison"]
    assert noise["max_gap_nats"] > 0.001 and lines["plain-reseeded"]["losses"] != losses
    assert comparison["max_gap_nats"] < 1e-4 and comparison["curves_agree"] is True
    assert comparison["tolerance_nats"] == noise["max_gap_nats"], "the noise floor sets the tolerance"


@pytest.mark.slow
def test_embedding_benchmark_runs_reference_and_zhclip():
    cases = run_bench(
        "embed_throughput",
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--cases",
        "reference-fp16",
        "fp32",
        "bf16",
    )
    for name, case in cases.items():
        assert "error" not in case, f"{name}: {case.get('error')}"
        assert case["images_per_s"] > 0 and case["gflop_per_image"] > 0
    assert cases["bf16"]["gflop_per_image"] == cases["fp32"]["gflop_per_image"]


@pytest.mark.slow
def test_input_pipeline_benchmark_gives_the_processors_pixels():
    cases = run_bench(
        "input_pipeline",
        "--images",
        "24",
        "--width",
        "64",
        "--height",
        "48",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--gpu-decode",
        "--augment",
    )
    assert cases["legacy-0-workers"]["images_per_s"] > 0 and cases["stream-0-workers"]["images_per_s"] > 0
    assert cases["stream-uint8-0-workers"]["max_abs_diff_vs_processor"] == 0.0
    assert "error" in cases["gpu-nvjpeg"] or cases["gpu-nvjpeg"]["max_abs_diff_vs_processor"] < 0.1


def test_search_benchmark_scores_an_index_against_exact_search(tmp_path):
    out = tmp_path / "search.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.search",
            "ann",
            "--vectors",
            "2000",
            "--queries",
            "50",
            "--data",
            "lowdim",
            "--factory",
            "Flat",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [json.loads(text) for text in out.read_text().splitlines()]
    assert line["recall_at_10"] == 1.0 and line["vectors"] == 2000 and line["index_mb"] > 2000 * 512 * 4 / 2**20 * 0.99


def test_backend_benchmark_compares_each_backend_with_torch(trained, prepared_dir, tmp_path):
    out = tmp_path / "backends.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.backends",
            "--model",
            str(trained["root"] / "stage2"),
            "--data",
            str(prepared_dir),
            "--backend",
            "torch",
            "--backend",
            "onnx",
            "--repeats",
            "2",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch, onnx = (json.loads(text) for text in out.read_text().splitlines())
    assert (torch["backend"], torch["cosine_min"], torch["same_top10"]) == ("torch", 1.0, 1.0)
    assert onnx["backend"] == "onnx" and onnx["cosine_min"] >= 0.9999 and onnx["same_top10"] >= 0.99
    assert onnx["t2i_r10"] == torch["t2i_r10"] and onnx["captions"] == torch["captions"] > 0
    assert onnx["ms_1_text"] > 0 and onnx["ms_8_texts"] > 0


def test_soak_benchmark_reports_memory_per_window_and_failed_answers(tmp_path):
    out = tmp_path / "soak.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "bench.search", "soak", "--vectors", "2000", "--seconds", "8", "--window", "4"]
        + ["--concurrency", "2", "--port", str(free_port()), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *windows, summary = (json.loads(text) for text in out.read_text().splitlines())
    assert [w["window"] for w in windows] == [0, 1] and all(w["server_rss_mb"] > 0 for w in windows)
    assert summary["bench"] == "soak-summary" and summary["failed"] == 0
    assert summary["requests"] == sum(w["requests"] for w in windows) > 0
    assert summary["rss_end_mb"] == windows[-1]["server_rss_mb"]


def test_swap_benchmark_moves_the_champion_under_load_and_counts_each_phase(tmp_path):
    out = tmp_path / "swap.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "bench.search", "swap", "--vectors", "500", "--seconds", "12", "--concurrency", "2"]
        + ["--factory", "Flat", "--port", str(free_port()), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *phases, summary = (json.loads(text) for text in out.read_text().splitlines())
    assert [phase["phase"] for phase in phases] == ["before", "loading", "after"]
    assert summary["failed"] == 0 and summary["unnamed"] == 0 and summary["old_answers_after_first_new"] == 0
    assert summary["requests"] == sum(phase["requests"] for phase in phases) > 0
    assert 0 < summary["first_new_answer_s"] < 12 - summary["alias_moved_at_s"]


def test_finetune_ablation_trains_each_row_from_the_same_start_and_scores_it(trained, prepared_dir, raw_dir, tmp_path):
    params = tmp_path / "params.yaml"  # the demo's settings, with stage 2 one epoch long: 3 steps a row
    shutil.copy(REPO / "params.yaml", params)
    update_params(tmp_path, {"stage2": {"epochs": 1}})
    result = subprocess.run(
        [
            sys.executable, "-m", "bench.finetune_ablation", "--params", str(params),
            "--data", str(prepared_dir), "--init", str(trained["root"] / "stage1"),
            "--teacher", str(trained["root"] / "stage2"), "--zeroshot", str(raw_dir / "zeroshot"),
            "--rows", "infonce", "lora-text", "--out", str(tmp_path / "out"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jsonl = tmp_path / "out" / "finetune-ablation.jsonl"
    environment, *rows = (json.loads(line) for line in jsonl.read_text().splitlines())
    assert [row["row"] for row in rows] == ["infonce", "lora-text"]
    assert all(row["steps"] == environment["steps"] == 3 for row in rows)  # same steps per row
    assert rows[1]["trainable_params"] < rows[0]["trainable_params"]
    for row in rows:
        assert 0 <= row["test_mean_recall"] <= 100 and row["samples_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert {"zeroshot_digits_top1", "zeroshot_shapes_top1"} <= set(row)
    assert "| lora-text |" in result.stdout  # the Markdown table


def test_cpu_of_command_reads_the_processes_the_command_started():
    """bench.measure.cpu_of_command, the investigations' CPU reader: a child the command starts is read
    as a process of its own, and the command's exit status comes back."""
    from bench.measure import cpu_of_command

    child = "sum(range(3 * 10**7))"
    command = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}]); sys.exit(3)"
    status, wall, seen = cpu_of_command([sys.executable, "-c", command], settle_s=0)
    (busy,) = [cpu for cpu, label in seen.values() if label.endswith(f" -c {child}")]
    assert status == 3 and busy > 0.1 and wall >= busy * 0.5


INVESTIGATIONS = sorted((REPO / "bench" / "investigations").glob("*/*.py"))


@pytest.mark.parametrize("script", INVESTIGATIONS, ids=lambda script: script.parent.name + "/" + script.name)
def test_every_investigation_script_imports(script):
    """The investigations are run by hand (each folder's README says how); their scripts must at least
    import against today's code and bench/measure.py. Run as their READMEs run them: by path, from the
    repository root, with the repository on PYTHONPATH (a sibling script imports as a plain module)."""
    code = (
        "import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
        "spec = importlib.util.spec_from_file_location('investigation', sys.argv[2]); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(script.parent), str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
