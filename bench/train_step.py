"""Throughput of zhclip's plain training step (no Ray, no MLflow) on random data.

    python bench/train_step.py --preset tiny --batch-size 64 --stage 2 --steps 20

Prints one JSON line: samples/s and peak memory. Runs on CPU or, when present, one GPU.
"""

import argparse
import json
import resource
import time

import torch

from components.train import parameter_groups
from model import build_model, contrastive_loss, lock_image_tower
from model.presets import image_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--stage", type=int, choices=(1, 2), default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--context-length", type=int, default=52)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = build_model(args.preset, context_length=args.context_length)
    model.to(device).train()
    if args.stage == 1:
        lock_image_tower(model)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4)
    size = image_size(model.config)
    batch = {
        "input_ids": torch.randint(106, 21128, (args.batch_size, args.context_length), device=device),
        "attention_mask": torch.ones(args.batch_size, args.context_length, dtype=torch.long, device=device),
        "pixel_values": torch.randn(args.batch_size, 3, size, size, device=device),
    }

    def step() -> None:
        out = model(**batch)
        loss = contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "zhclip", "preset": args.preset, "stage": args.stage, "device": device.type,
                      "batch_size": args.batch_size, "samples_per_s": round(args.steps * args.batch_size / elapsed, 1),
                      "peak_memory_mb": round(peak / 2**20, 1)}))


if __name__ == "__main__":
    main()
