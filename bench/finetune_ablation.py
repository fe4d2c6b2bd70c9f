"""Fine-tuning switches on the demo: the same stage 2, one switch per row, same steps and seed.

    dvc repro                                         # the demo's data, stage 1 and stage 2 first
    python -m bench.finetune_ablation --out bench/results/finetune-ablation

Every row trains stage 2 from the demo's stage-1 model (models/stage1) with params.yaml's stage-2
settings and one change, for as many steps as the demo's stage 2 (stage2.epochs x steps per epoch):
- infonce:          the demo's stage 2 as it is (symmetric InfoNCE, the diagonal as the only positive);
- false-negatives:  train.false_negatives (pairs sharing an image or a caption are positives);
- siglip:           train.loss=siglip; siglip-false-negatives: both;
- lora-text, lora-both: LoRA (rank 8) on the text tower / both towers, merged at the end;
- distill:          feature distillation (image and text terms, weight 1 each) from models/stage2.
Each model is scored on the test split as `zhclip evaluate` does and on the zero-shot sets as
`zhclip zeroshot` does; peak memory is the training process's resident peak (ru_maxrss) on a CPU,
the allocator's peak on a GPU. One JSON line per row in OUT/finetune-ablation.jsonl, a Markdown
table on stdout.
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
from zhclip.components.evaluation.zeroshot import ZeroshotConfig, zeroshot
from zhclip.components.training.config import stage_config
from zhclip.components.training.epoch_plan import steps_per_epoch
from zhclip.components.training.runner import train

ROWS = {
    "infonce": {},
    "false-negatives": {"false_negatives": True},
    "siglip": {"loss": "siglip"},
    "siglip-false-negatives": {"loss": "siglip", "false_negatives": True},
    "lora-text": {"lora": "text"},
    "lora-both": {"lora": "both"},
    "distill": {"teacher": "TEACHER", "distill_image_weight": 1.0, "distill_text_weight": 1.0},
}


def run_row(name: str, args: argparse.Namespace, params: dict, steps: int) -> dict:
    overrides = {key: str(args.teacher.resolve()) if value == "TEACHER" else value for key, value in ROWS[name].items()}
    config = stage_config(
        params,
        2,
        max_steps=steps,
        epochs=10_000,
        storage_path=str(args.out / "ray"),
        tracking_uri=f"sqlite:///{args.out / 'mlflow.db'}",
        **overrides,
    )
    summary = train(args.data, args.out / name, config, init_dir=args.init.resolve())
    scores = evaluate(summary["model_dir"], args.data, EvaluateConfig(examples=0))
    zeroshot_config = config_from(ZeroshotConfig, params, "zeroshot")
    top1 = {
        f"zeroshot_{image_set}_top1": zeroshot(summary["model_dir"], args.zeroshot / image_set, zeroshot_config)["top1"]
        for image_set in zeroshot_config.sets
    }
    return {
        "bench": "finetune-ablation",
        "row": name,
        "settings": overrides,
        "steps": summary["steps"],
        "test_mean_recall": scores["mean_recall"],
        **top1,
        "final_loss": round(summary["final_loss"], 4),
        "trainable_params": summary["trainable_params"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "samples_per_s": summary["samples_per_s"],
    }


def table(rows: list[dict]) -> str:
    sets = [key for key in rows[0] if key.startswith("zeroshot_")]
    head = [
        "row",
        "test mean recall",
        *[key.removeprefix("zeroshot_").replace("_", " ") for key in sets],
        "trainable params",
        "peak memory (MB)",
        "samples/s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["row"],
            f"{row['test_mean_recall']:.2f}",
            *[f"{row[key]:.1f}" for key in sets],
            f"{row['trainable_params']:,}",
            f"{row['peak_memory_mb']:.0f}",
            f"{row['samples_per_s']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/validated"), help="validated demo data (dvc repro)")
    parser.add_argument("--init", type=Path, default=Path("models/stage1"), help="stage 2's start: stage 1's model")
    parser.add_argument("--teacher", type=Path, default=Path("models/stage2"), help="the distill row's teacher")
    parser.add_argument("--zeroshot", type=Path, default=Path("data/raw/zeroshot"), help="zero-shot image sets")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--machine", default=platform.processor() or platform.machine(), help="hardware, as reported")
    parser.add_argument("--out", type=Path, required=True, help="folder for the models and finetune-ablation.jsonl")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    params = load_params(args.params)
    stage2 = stage_config(params, 2)
    steps = stage2.epochs * steps_per_epoch(
        PreparedSplit.open(str(args.data.resolve()), "train").rows, stage2.batch_size, 1
    )
    environment = {
        "bench": "environment",
        "date": time.strftime("%Y-%m-%d"),
        "machine": args.machine,
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "steps": steps,
    }
    out = args.out / "finetune-ablation.jsonl"
    out.unlink(missing_ok=True)
    emit(environment, out)
    rows = []
    for name in args.rows:
        rows.append(run_row(name, args, params, steps))
        emit(rows[-1], out)
    print(table(rows))


if __name__ == "__main__":
    main()
