"""Training throughput: zhclip's own step against the reference (cn-clip) on random data.

    python -m bench.train_throughput --preset ViT-B-16 --batch-size 256 --cases reference-s2 fast-s2
    python -m bench.train_throughput --preset tiny --batch-size 8 --steps 2 --cases all   # CPU smoke run

Three implementations of the same model and batch: `reference-*` (cn-clip's own code),
`hf-compile-*` (the peer: what a user writes with plain transformers) and zhclip's own step. Each
case prints one JSON line: samples/s, FLOPs per sample (torch.utils.flop_counter, counted on
the uncompiled step), achieved TFLOP/s, MFU against a bf16 matmul peak measured here, and peak
memory. zhclip cases run components.training.TrainStep, the step Ray Train workers run, with the
speed switches of model/fast.py; `reference-*` cases run cn-clip's own `CLIP` model with its
recipe (AMP fp16 autocast + GradScaler, AdamW, symmetric InfoNCE; stage 1 freezes the image tower
as cn-clip's `--freeze-vision` does); `hf-compile-*` cases run transformers' `ChineseCLIPModel`
(SDPA attention) with bf16 autocast, fused AdamW, its own `return_loss` and the whole forward in
`torch.compile` (stage 1: the image tower's parameters frozen). Cases marked `check_loss` also
compare the optimised model's loss and embeddings with the plain fp32 model on the same batch
(dropout off).

Needs only torch, transformers and the cn-clip wheel: no Ray, MLflow or Great Expectations.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from bench.measure import case_names, count_then_time, model_bench_parser, rates, run_cases, start
from zhclip.components.training.step import (
    TrainStep,
    build_optimizer,
    enable_activation_checkpointing,
    warmup_cosine,
)
from zhclip.components.training.step_config import StepConfig
from zhclip.model import build_model, lock_image_tower
from zhclip.model.embedding import projected_features
from zhclip.model.fast import apply_speedups, compile_model
from zhclip.model.loss import MAX_LOGIT_SCALE
from zhclip.model.specs import PRESETS

PAD_ID, CLS_ID, SEP_ID, FIRST_WORD_ID = 0, 101, 102, 106
VIT_PRESETS = [
    name for name, spec in PRESETS.items() if "resnet_layers" not in spec["vision"]
]  # what cn-clip's ViT takes


@dataclass(frozen=True)
class Case:
    impl: str = "zhclip"  # zhclip | reference | hf (plain transformers + torch.compile)
    stage: int = 2
    precision: str = "bf16"  # zhclip: fp32 | bf16 (autocast, fp32 master weights); reference: amp-fp16
    fused_adamw: bool = False
    fused_qkv: bool = False
    sdpa_backend: str | None = None
    padding_free: bool = False  # text tower on real tokens only (model/fast.py PaddingFreeTextModel)
    channels_last: bool = False
    activation_checkpointing: bool = False  # recompute each layer in backward (less memory, more work)
    compile_scope: str = "none"  # none | regional | model
    compile_mode: str | None = None  # torch.compile mode, e.g. reduce-overhead (CUDA graphs)
    mask_ratio: float = 0.0  # FLIP patch masking: changes the work, reported separately
    cache_image_embeds: bool = False  # stage 1: locked image tower run once, its embeddings reused
    check_loss: bool = False


EAGER = Case(precision="bf16", fused_adamw=True, fused_qkv=True, channels_last=True)
FAST = replace(EAGER, compile_scope="regional")
CASES: dict[str, Case] = {
    "reference-s2": Case(impl="reference", stage=2, precision="amp-fp16"),
    "reference-s1": Case(impl="reference", stage=1, precision="amp-fp16"),
    "hf-compile-s2": Case(impl="hf", stage=2, fused_adamw=True, compile_scope="model"),
    "hf-compile-s1": Case(impl="hf", stage=1, fused_adamw=True, compile_scope="model"),
    "fast-s2": replace(FAST, check_loss=True),
    "fast-s1": replace(FAST, stage=1, check_loss=True),
    "fast-s1-cached": replace(FAST, stage=1, cache_image_embeds=True),
    "fast-pf-s2": replace(FAST, padding_free=True, check_loss=True),
    "fast-pf-s1": replace(FAST, stage=1, padding_free=True, check_loss=True),
    "fast-pf-s1-cached": replace(FAST, stage=1, padding_free=True, cache_image_embeds=True),
    "fast-pf-model-s2": replace(FAST, padding_free=True, compile_scope="model"),
    "fast-pf-model-s1": replace(FAST, stage=1, padding_free=True, compile_scope="model"),
    "eager-pf-s2": replace(EAGER, padding_free=True, check_loss=True),
    "fast-pf-ckpt-s2": replace(FAST, padding_free=True, activation_checkpointing=True),
    "fast-pf-autotune-s2": replace(FAST, padding_free=True, compile_mode="max-autotune-no-cudagraphs"),
    "fast-pf-cudagraphs-s2": replace(FAST, padding_free=True, compile_mode="reduce-overhead"),
    # each switch on its own, eager, to show what it brings
    "fp32-s2": Case(precision="fp32"),
    "bf16-s2": Case(),
    "bf16-fused-adamw-s2": Case(fused_adamw=True),
    "bf16-fused-qkv-s2": Case(fused_qkv=True),
    "bf16-channels-last-s2": Case(channels_last=True),
    "eager-s2": replace(EAGER, check_loss=True),
    "eager-flash-s2": replace(EAGER, sdpa_backend="flash"),
    "eager-cudnn-s2": replace(EAGER, sdpa_backend="cudnn"),
    "eager-efficient-s2": replace(EAGER, sdpa_backend="efficient"),
    "fast-cudnn-s2": replace(FAST, sdpa_backend="cudnn"),
    "fast-model-s2": replace(FAST, compile_scope="model"),
    "fast-cudagraphs-s2": replace(FAST, compile_mode="reduce-overhead"),
    "fast-flip50-s2": replace(FAST, mask_ratio=0.5),
}


def random_batch(
    batch_size: int, context_length: int, image_size: int, device: torch.device, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Token ids shaped like real captions ([CLS] words [SEP], then padding, lengths varying) and
    normally distributed pixels: the same batch for every case."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, context_length + 1, (batch_size,), generator=generator)
    ids = torch.randint(FIRST_WORD_ID, 21128, (batch_size, context_length), generator=generator)
    positions = torch.arange(context_length)
    ids[:, 0] = CLS_ID
    ids[positions == (lengths - 1).unsqueeze(1)] = SEP_ID
    mask = positions < lengths.unsqueeze(1)
    ids[~mask] = PAD_ID
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device), "pixel_values": pixels.to(device)}


def reference_model(preset: str) -> torch.nn.Module:
    """cn-clip's `CLIP` shaped as zhclip's preset (ViT presets: the reference's own configs)."""
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision"):
        # tests.reference puts a placeholder torchvision in place when none is imported yet; where a
        # real one is installed (GPU hosts), import it first so transformers keeps working with it.
        import torchvision  # noqa: F401
    from tests.reference import reference

    spec = PRESETS[preset]
    vision, text = spec["vision"], spec["text"]
    return reference().CLIP(
        embed_dim=spec["projection_dim"],
        image_resolution=vision["image_size"],
        vision_layers=vision["num_hidden_layers"],
        vision_width=vision["hidden_size"],
        vision_patch_size=vision["patch_size"],
        vision_head_width=vision["hidden_size"] // vision["num_attention_heads"],
        vocab_size=21128,
        text_attention_probs_dropout_prob=0.1,
        text_hidden_act="gelu",
        text_hidden_dropout_prob=0.1,
        text_hidden_size=text["hidden_size"],
        text_initializer_range=0.02,
        text_intermediate_size=text["intermediate_size"],
        text_max_position_embeddings=512,
        text_num_attention_heads=text["num_attention_heads"],
        text_num_hidden_layers=text["num_hidden_layers"],
        text_type_vocab_size=2,
    )


def reference_step(preset: str, stage: int, batch: dict, device: torch.device) -> Callable[[], torch.Tensor]:
    """cn-clip's training step (cn_clip/training/train.py): AMP fp16, GradScaler, AdamW with its
    parameter groups, logit scale clamped to ln(100) after each update."""
    with device:  # initialised where it runs: seconds saved per case on a GPU
        model = reference_model(preset).train()
    if stage == 1:
        for param in model.visual.parameters():
            param.requires_grad = False
    exclude = lambda name: any(key in name for key in ("bn", "ln", "bias", "logit_scale"))  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n)], "weight_decay": 0.001},
        ],
        lr=5e-5,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scaler = torch.amp.GradScaler(device.type)
    images, texts = batch["pixel_values"], batch["input_ids"]
    labels = torch.arange(len(texts), device=device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16):
            image_features, text_features, scale = model(images, texts)
            logits = scale * image_features @ text_features.t()
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.detach()

    return step


def hf_compile_step(preset: str, stage: int, batch: dict, device: torch.device, context_length: int):
    """The peer: transformers' ChineseCLIPModel as anyone would train it (SDPA, bf16 autocast, fused
    AdamW, the model's own contrastive loss, the whole forward compiled by `finish`)."""
    with device:
        model, _ = build_model(preset, context_length=context_length)  # a plain ChineseCLIPModel, SDPA attention
    if stage == 1:
        for tower in (model.vision_model, model.visual_projection):
            tower.requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=5e-5,
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.001,
        fused=device.type == "cuda",
    )
    forward = [model]

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward[0](**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        return loss.detach()

    def finish() -> dict:
        forward[0] = torch.compile(model)  # after the FLOP count, which needs the eager step
        return {"applied": {"compile": "model"}}

    return step, finish


@torch.no_grad()
def compare_with_plain(plain: torch.nn.Module, fast: torch.nn.Module, batch: dict, precision: str) -> dict:
    """Loss and embeddings of the optimised model against the plain fp32 one, on the same batch, in
    eval mode (no dropout, no patch masking), so any difference is the optimisations' own."""
    results = {}
    for name, model in (("plain", plain), ("fast", fast)):
        model.eval()
        bf16 = name == "fast" and precision == "bf16"
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        image, text = F.normalize(out.image_embeds.float(), dim=-1), F.normalize(out.text_embeds.float(), dim=-1)
        logits = model.logit_scale.exp() * image @ text.t()
        labels = torch.arange(len(logits), device=logits.device)
        results[name] = (
            (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)).item() / 2,
            image,
            text,
        )
    (plain_loss, plain_image, plain_text), (fast_loss, fast_image, fast_text) = results["plain"], results["fast"]
    cosine = min((plain_image * fast_image).sum(-1).min().item(), (plain_text * fast_text).sum(-1).min().item())
    # bf16 keeps 8 bits of mantissa: allow 1% on the loss; embeddings must point the same way
    loss_matches = abs(fast_loss - plain_loss) <= 0.01 * abs(plain_loss) and cosine >= 0.99
    return {
        "loss_plain": round(plain_loss, 5),
        "loss_fast": round(fast_loss, 5),
        "embed_cosine_min": round(cosine, 5),
        "loss_matches": loss_matches,
    }


def build_zhclip(
    case: Case,
    preset: str,
    device: torch.device,
    context_length: int,
    lr: float = 5e-5,
    warmup_steps: int = 10,
    total_steps: int = 10_000,
):
    """The model with the case's speed switches (compilation aside) and its TrainStep, and a plain
    copy of the model when the case checks its loss: (model, train_step, plain or None, switches applied)."""
    with device:  # initialised where it runs: seconds saved per case on a GPU
        model, _ = build_model(preset, context_length=context_length)
    if case.stage == 1:
        lock_image_tower(model)
    plain = copy.deepcopy(model) if case.check_loss else None
    if case.activation_checkpointing:
        enable_activation_checkpointing(model)
    applied = apply_speedups(
        model,
        fused_qkv=case.fused_qkv,
        sdpa_backend=case.sdpa_backend,
        padding_free=case.padding_free,
        channels_last=case.channels_last,
    )
    model.train()
    if case.stage == 1:
        lock_image_tower(model)  # locked modules back in eval mode after model.train()
    optimizer = build_optimizer(model, lr=lr, weight_decay=0.001, fused=case.fused_adamw)
    train_step = TrainStep(
        model,
        optimizer,
        warmup_cosine(optimizer, warmup_steps, total_steps),
        StepConfig(precision=case.precision, mask_ratio=case.mask_ratio),
    )
    return model, train_step, plain, applied


def zhclip_step(case: Case, preset: str, batch: dict, device: torch.device, context_length: int):
    """zhclip.components.training.step.TrainStep on a model with the case's speed switches; compilation is
    applied after the FLOP count (which needs the eager step) by the returned `finish` callback."""
    model, train_step, plain, applied = build_zhclip(case, preset, device, context_length)
    if case.cache_image_embeds:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.precision == "bf16"):
            images = model.get_image_features(pixel_values=batch["pixel_values"])
        batch = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "image_embeds": projected_features(images),
        }

    def finish() -> dict:
        nonlocal plain
        # static shapes: every batch has the same shape, and FLIP's shorter sequences get their own graph
        mode = {"mode": case.compile_mode} if case.compile_mode else {}
        compile_model(model, case.compile_scope, dynamic=False, **mode)
        applied["compile"] = case.compile_scope
        result = {"applied": applied}
        if plain is not None:
            result.update(compare_with_plain(plain, model, batch, case.precision))
            plain = None  # free its memory before the timed steps
            model.train()
            if case.stage == 1:
                lock_image_tower(model)
        return result

    return lambda: train_step(batch), finish


def run_case(name: str, case: Case, args, device: torch.device, peak_tflops: float | None) -> dict:
    """One case: build, count FLOPs on one eager step, compile if asked, warm up, time."""
    torch._dynamo.reset()  # each case compiles afresh (inductor's disk cache still shortens it)
    batch = random_batch(args.batch_size, args.context_length, PRESETS[args.preset]["vision"]["image_size"], device)
    if case.impl == "reference":
        step = reference_step(args.preset, case.stage, batch, device)
        finish = dict
    elif case.impl == "hf":
        step, finish = hf_compile_step(args.preset, case.stage, batch, device, args.context_length)
    else:
        step, finish = zhclip_step(case, args.preset, batch, device, args.context_length)
    flops, seconds, extra, elapsed = count_then_time(step, lambda: (step, finish()), device, args.warmup, args.steps)
    return {
        "bench": "train",
        "case": name,
        "preset": args.preset,
        "batch_size": args.batch_size,
        **asdict(case),
        **extra,
        **rates(args.batch_size, "sample", seconds, flops, peak_tflops, device),
        "warmup_and_timing_s": round(elapsed, 1),
    }


def main() -> None:
    parser = model_bench_parser(__doc__, CASES, ["reference-s2", "fast-s2"], batch_size=256, presets=VIT_PRESETS)
    parser.add_argument("--context-length", type=int, default=52)
    args = parser.parse_args()
    names = case_names(parser, args.cases, CASES)
    device, peak = start(args.device, args.peak_tflops)
    run_cases("train", names, lambda name: run_case(name, CASES[name], args, device, peak), device, args.budget_s)


if __name__ == "__main__":
    main()
