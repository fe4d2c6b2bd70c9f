"""The demo's version of the paper's ablation: from scratch vs. stage 1 only vs. two-stage, same total steps.

    dvc repro                                   # the demo data and its pretrained towers first
    python -m bench.ablation --out bench/results/ablation

Three runs on the demo's validated data, each with as many optimizer steps as the demo's two stages
together (params.yaml: stage1.epochs + stage2.epochs, times the steps per epoch):
- scratch:   random towers, both trained (stage 2's mode) for all the steps, at stage 1's learning rate;
- stage1:    the demo's pretrained towers (params start), image tower locked, for all the steps;
- two-stage: the pretrained towers, stage 1 then stage 2 with the demo's own split of the steps.
Each model is scored on the test split as `zhclip evaluate` does. Prints one JSON line per run and
writes them to OUT/ablation.jsonl; all runs use the settings of params.yaml otherwise.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from bench.measure import emit
from zhclip.components.core.settings import config_from, load_params
from zhclip.components.data.shards import PreparedSplit
from zhclip.components.evaluation.evaluate import EvaluateConfig, evaluate
from zhclip.components.training.config import stage_config
from zhclip.components.training.epoch_plan import steps_per_epoch
from zhclip.components.training.runner import train
from zhclip.components.training.start import StartConfig, prepare_start


def _train(data: Path, out: Path, params: dict, stage: int, init: Path, steps: int, **overrides) -> dict:
    config = stage_config(
        params,
        stage,
        max_steps=steps,
        epochs=10_000,
        storage_path=str(out / "ray"),
        tracking_uri=f"sqlite:///{out / 'mlflow.db'}",
        **overrides,
    )
    return train(data, out / f"{init.name}-stage{stage}-{steps}", config, init_dir=init)


def run(data: Path, out: Path, params: dict, jsonl: Path | None = None) -> list[dict]:
    stage1, stage2 = stage_config(params, 1), stage_config(params, 2)
    per_epoch = steps_per_epoch(PreparedSplit.open(str(data.resolve()), "train").rows, stage1.batch_size, 1)
    stage1_steps, stage2_steps = stage1.epochs * per_epoch, stage2.epochs * per_epoch
    total = stage1_steps + stage2_steps
    scratch = prepare_start(out / "scratch", config_from(StartConfig, params, "start", source="scratch"))["model_dir"]
    towers = prepare_start(out / "towers", config_from(StartConfig, params, "start"))["model_dir"]
    runs = {
        "scratch": lambda: _train(data, out, params, 2, Path(scratch), total, lr=stage1.lr),
        "stage1": lambda: _train(data, out, params, 1, Path(towers), total),
        "two-stage": lambda: _train(
            data,
            out,
            params,
            2,
            Path(_train(data, out, params, 1, Path(towers), stage1_steps)["model_dir"]),
            stage2_steps,
        ),
    }
    results = []
    for name, trained in runs.items():
        began = time.perf_counter()
        model_dir = trained()["model_dir"]
        scores = evaluate(model_dir, data, EvaluateConfig(examples=0))
        results.append(
            {
                "bench": "ablation",
                "run": name,
                "steps": total,
                "test_mean_recall": scores["mean_recall"],
                "t2i_r1": scores["t2i_r1"],
                "i2t_r1": scores["i2t_r1"],
                "chance_mean_recall": scores["chance_mean_recall"],
                "seconds": round(time.perf_counter() - began, 1),
            }
        )
        emit(results[-1], jsonl)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/validated"), help="validated demo data (dvc repro)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, required=True, help="folder for the models and ablation.jsonl")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    environment = {
        "bench": "environment",
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    jsonl = args.out / "ablation.jsonl"
    jsonl.unlink(missing_ok=True)
    emit(environment, jsonl)
    run(args.data, args.out.resolve(), load_params(args.params), jsonl)


if __name__ == "__main__":
    main()
