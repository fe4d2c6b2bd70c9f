"""A training stage's settings (params.yaml sections `train` and `stage1`/`stage2`), validated."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from zhclip.components.core.architecture import ModelConfig
from zhclip.components.core.settings import config_from, setting, shared
from zhclip.components.core.tracking import MlflowConfig
from zhclip.components.training.step_config import StepConfig
from zhclip.model.specs import COMPILE_SCOPES, PRESETS, SDPA_BACKENDS

LORA_TOWERS = ("", "text", "image", "both")
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def torchvision_installed() -> bool:
    """Whether torchvision (train.decode_on_device's JPEG decoder) can be imported here."""
    return importlib.util.find_spec("torchvision") is not None


@dataclass
class TrainConfig:
    """Section `train`, with `stage1` / `stage2` overriding any of its settings for one stage."""

    stage: int = setting(1, "1: image tower locked (LiT); 2: both towers learn", in_params=False)
    preset: str = shared(ModelConfig, "preset")
    context_length: int = shared(ModelConfig, "context_length")
    epochs: int = setting(10, "passes over the training pairs")
    max_steps: int = setting(0, "stop after this many optimizer steps (0: epochs x steps per epoch)")
    batch_size: int = setting(64, "pairs per optimizer step and worker")
    lr: float = setting(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = setting(0.1, "AdamW; none on biases, norms, embeddings, logit scale")
    warmup_steps: int = setting(20, "linear warmup, then cosine decay to zero")
    seed: int = setting(0, "random seed of initialisation, data order and augmentation")
    accum_steps: int = setting(1, "split each batch into this many micro-batches (same loss, less memory)")
    precision: str = setting("fp32", "fp32 | bf16 (autocast; fp32 master weights)")
    mask_ratio: float = setting(0.0, "FLIP: share of image patches dropped while training (ViT only)")
    augment: bool = setting(False, "random resized crops (90-100% of the image), as Chinese-CLIP")
    grad_checkpointing: bool = setting(False, "recompute activations in backward (less memory, ~30% slower)")
    fused_adamw: bool = setting(False, "single-kernel AdamW update (GPU)")
    fused_qkv: bool = setting(False, "one matmul for query/key/value in every attention (saved in the standard layout)")
    sdpa_backend: str = setting(
        "", "preferred attention kernel (needs fused_qkv): flash, cudnn, efficient, math; '' = PyTorch's choice"
    )
    padding_free: bool = setting(False, "text tower computes real tokens only, no padding (needs fused_qkv)")
    channels_last: bool = setting(False, "channels-last patch embedding (GPU)")
    compile: str = setting("none", "torch.compile: none, regional (each encoder layer) or model")
    compile_mode: str = setting(
        "",
        "torch.compile mode: '' (its default), reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs",
    )
    num_workers: int = setting(1, "Ray Train workers (one process each; DDP when more than one)")
    cpus_per_worker: int = setting(2, "CPUs each Ray Train worker reserves")
    use_gpu: bool = setting(False, "one GPU per worker")
    loader_workers: int = setting(
        0, "decoders per worker: Ray Data actors under Ray, else processes (0: the training process)"
    )
    shuffle_window: int = setting(
        4096, "rows shuffled together (from several shards); memory holds about one window per worker"
    )
    normalize_on_device: bool = setting(
        False, "loaders hand over 8-bit resized images; the device scales and normalises them"
    )
    decode_on_device: bool = setting(
        False, "loaders hand over JPEG bytes; the device decodes (nvJPEG), crops, resizes them (needs torchvision)"
    )
    storage_path: str = setting("ray_results", "checkpoints: a folder, or s3://bucket/prefix (MinIO)")
    storage_endpoint: str = setting("", "S3 endpoint for s3:// storage; empty: $AWS_ENDPOINT_URL")
    checkpoint_every: int = setting(50, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = setting(2, "newest checkpoints kept in storage")
    max_failures: int = setting(1, "worker-group restarts from the latest checkpoint before giving up")
    validate_every: int = setting(0, "steps between validation passes on the valid split (0: each epoch's end)")
    log_every: int = setting(10, "steps per batch of MLflow metric writes and progress-bar updates")
    unlocked_groups: int = setting(0, "stage 1: leave this many last image-tower groups trainable")
    local_loss: bool = setting(False, "multi-worker: score local rows against the global batch (less memory)")
    gather_with_grad: bool = setting(False, "multi-worker: let gradients flow through other workers' features")
    loss: str = setting("infonce", "infonce: symmetric softmax (CLIP) | siglip: pairwise sigmoid with a learnable bias")
    false_negatives: bool = setting(
        False, "pairs sharing an image (same bytes) or a caption are positives of each other, not negatives"
    )
    siglip_bias: float = setting(-10.0, "siglip: the learnable bias's starting value (SigLIP's -10)")
    lora: str = setting("", "LoRA adapters (peft) instead of full fine-tuning: '' (off), text, image or both towers")
    lora_rank: int = setting(8, "LoRA: rank of each adapter")
    lora_alpha: float = setting(16.0, "LoRA: scaling numerator (updates scale by alpha / rank)")
    lora_dropout: float = setting(0.0, "LoRA: dropout on the adapters' input")
    lora_text_modules: str = setting("query,value", "LoRA: the text tower's linear layers adapted (comma-separated)")
    lora_image_modules: str = setting("q_proj,v_proj", "LoRA: the image tower's linear layers adapted (ViT)")
    teacher: str = setting(
        "", "feature distillation from this model: folder, s3:// folder or models:/<name>@<alias> ('' = off)"
    )
    distill_image_weight: float = setting(1.0, "distillation: weight of the image-feature term (1 - cosine)")
    distill_text_weight: float = setting(0.0, "distillation: weight of the text-feature term (1 - cosine)")
    tracking_uri: str = shared(MlflowConfig, "tracking_uri")
    experiment: str = shared(MlflowConfig, "experiment")

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        for name in (
            "epochs",
            "batch_size",
            "num_workers",
            "cpus_per_worker",
            "context_length",
            "accum_steps",
            "keep_checkpoints",
            "log_every",
            "shuffle_window",
            "lora_rank",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (
            "max_steps",
            "checkpoint_every",
            "validate_every",
            "loader_workers",
            "warmup_steps",
            "max_failures",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} must split into accum_steps={self.accum_steps} equal micro-batches"
            )
        self.step_config()  # validates precision
        if self.compile not in COMPILE_SCOPES:
            raise ValueError(f"compile must be one of {COMPILE_SCOPES}, got {self.compile!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.compile_mode and self.compile == "none":
            raise ValueError(f"compile_mode {self.compile_mode!r} needs compile: regional or model")
        if self.sdpa_backend and (self.sdpa_backend not in SDPA_BACKENDS or not self.fused_qkv):
            raise ValueError(
                f"sdpa_backend {self.sdpa_backend!r} needs fused_qkv: true and one of {sorted(SDPA_BACKENDS)}"
            )
        if self.padding_free and not self.fused_qkv:
            raise ValueError("padding_free needs fused_qkv: true (the packed attention is the fused one)")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decode_on_device and not torchvision_installed():
            raise ValueError(
                "decode_on_device needs torchvision, the build matching your torch (for CUDA 13: "
                "pip install torchvision --index-url https://download.pytorch.org/whl/cu130), "
                "or pip install 'zhclip[gpu-decode]'; or set train.decode_on_device: false"
            )
        self._check_fine_tuning()
        if self.mask_ratio and "resnet_layers" in PRESETS.get(self.preset, {}).get("vision", {}):
            raise ValueError(f"mask_ratio {self.mask_ratio}: patch masking needs a ViT preset, not {self.preset}")

    def _check_fine_tuning(self) -> None:
        """The loss, LoRA and distillation settings, and what they cannot be combined with."""
        if self.lora not in LORA_TOWERS:
            raise ValueError(f"lora must be one of {LORA_TOWERS}, got {self.lora!r}")
        if self.lora and self.fused_qkv:
            raise ValueError("lora adapts the query/key/value layers that fused_qkv replaces: set fused_qkv: false")
        image_locked = self.stage == 1 and self.unlocked_groups == 0
        if self.lora in ("image", "both") and self.stage == 1:
            # stage 1 locks the image tower (whole groups open with unlocked_groups): adapters would
            # train inside locked groups until the next lock_image_tower froze them again
            raise ValueError(
                f"lora: {self.lora} in stage 1, whose image tower is locked: use stage1.lora: text, "
                "and image or both under stage2"
            )
        if self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"lora_alpha must be positive and lora_dropout in [0, 1), got {self.lora_alpha}, {self.lora_dropout}"
            )
        if self.loss == "siglip" and (self.local_loss or self.gather_with_grad):
            raise ValueError(
                "local_loss and gather_with_grad are InfoNCE's; siglip always scores local images "
                "against every worker's texts"
            )
        if min(self.distill_image_weight, self.distill_text_weight) < 0:
            raise ValueError("distill_image_weight and distill_text_weight must be 0 or more")
        if self.teacher and not (self.distill_image_weight or self.distill_text_weight):
            raise ValueError(
                f"teacher {self.teacher!r} with both distillation weights 0: set one above 0, or teacher: ''"
            )
        if self.teacher and image_locked and self.distill_image_weight:
            raise ValueError(
                "stage 1 locks the image tower, so image-feature distillation has nothing to train: "
                "set stage1.distill_image_weight: 0 (text distillation works), or distil in stage 2"
            )

    def lora_modules(self) -> dict[str, list[str]]:
        """The adapted linear layers of each tower, from the comma-separated settings."""
        return {
            "text": [name.strip() for name in self.lora_text_modules.split(",") if name.strip()],
            "image": [name.strip() for name in self.lora_image_modules.split(",") if name.strip()],
        }

    def step_config(self) -> StepConfig:
        return StepConfig(
            precision=self.precision,
            accum_steps=self.accum_steps,
            mask_ratio=self.mask_ratio,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            loss=self.loss,
            false_negatives=self.false_negatives,
            distill_image_weight=self.distill_image_weight if self.teacher else 0.0,
            distill_text_weight=self.distill_text_weight if self.teacher else 0.0,
        )


def stage_config(params: dict[str, Any], stage: int, **explicit: Any) -> TrainConfig:
    """Stage `stage`'s settings: params section `train`, then `stage<N>` over it, then `explicit` (CLI flags)."""
    return config_from(TrainConfig, params, "train", f"stage{stage}", stage=stage, **explicit)
