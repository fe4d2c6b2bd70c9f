"""A model's shape as plain data: the presets, Chinese-CLIP's text length and pixel statistics, the
names of the speed switches' choices.

Importable without torch or transformers (about 5 s of imports): settings and commands that only
check a name against these (training's driver, `zhclip suite`) read them here, and the modules that
build models (presets.py, fast.py) read them from here too.
"""

# Preset = text tower + vision tower + shared projection size, mirroring Chinese-CLIP's released
# models (their `model_configs/*.json`); "tiny" is for CPU tests and the demo.
_TEXT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
_TEXT_LARGE = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}


def _vit(width: int, layers: int, heads: int, patch: int, resolution: int) -> dict:
    return {
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * width,
        "patch_size": patch,
        "image_size": resolution,
    }


PRESETS: dict[str, dict] = {
    "tiny": {
        "projection_dim": 64,
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
        "vision": {**_vit(64, 2, 4, 8, 32), "intermediate_size": 128},
    },
    "ViT-B-16": {"projection_dim": 512, "text": _TEXT_BASE, "vision": _vit(768, 12, 12, 16, 224)},
    "ViT-L-14": {"projection_dim": 768, "text": _TEXT_BASE, "vision": _vit(1024, 24, 16, 14, 224)},
    "ViT-L-14-336": {"projection_dim": 768, "text": _TEXT_BASE, "vision": _vit(1024, 24, 16, 14, 336)},
    # ViT-H-14's attention heads are 80 wide, not 64 (the reference's `vision_head_width`).
    "ViT-H-14": {"projection_dim": 1024, "text": _TEXT_LARGE, "vision": _vit(1280, 32, 16, 14, 224)},
    # ResNet towers (model/resnet.py): blocks per stage, stem width, attention-pool heads.
    "RN50": {
        "projection_dim": 1024,
        "text": {**_TEXT_BASE, "num_hidden_layers": 3},  # RBT3
        "vision": {"resnet_layers": [3, 4, 6, 3], "width": 64, "heads": 32, "image_size": 224},
    },
    "tiny-rn": {
        "projection_dim": 64,
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
        "vision": {"resnet_layers": [1, 1, 1, 1], "width": 8, "heads": 4, "image_size": 32},
    },
}

# Chinese-CLIP's text length: its tokenizer pads and truncates every caption to this many tokens.
CONTEXT_LENGTH = 52
# OpenAI-CLIP pixel statistics, which Chinese-CLIP keeps.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# The choices of model/fast.py's switches: an attention kernel (torch's SDPBackend member of each
# name) and what torch.compile compiles.
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
COMPILE_SCOPES = ("none", "regional", "model")
