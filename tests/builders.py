"""Small models and stand-ins that several test folders build: pretrained towers, a reference checkpoint,
a PIL stand-in for the GPU JPEG decoder."""

import io
import json

import numpy as np
import torch
from PIL import Image
from transformers import BertConfig, BertForMaskedLM, CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from zhclip.model import PRESETS

from reference import reference

TINY = PRESETS["tiny"]


def pretrained_clip(folder, hidden=TINY["vision"]["hidden_size"], vision_only=False):
    vision = {**TINY["vision"], "hidden_size": hidden}
    torch.manual_seed(1)
    if vision_only:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    else:
        model = CLIPModel(
            CLIPConfig(
                vision_config=vision,
                text_config={
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                },
                projection_dim=TINY["projection_dim"],
            )
        )
    model.save_pretrained(folder)
    return model


def pretrained_roberta(folder):
    torch.manual_seed(2)
    model = BertForMaskedLM(BertConfig(vocab_size=21128, **TINY["text"]))
    model.save_pretrained(folder)
    return model


def reference_config(**overrides) -> dict:
    """The keyword arguments of a tiny reference CLIP (its `model_info`, in zeroshot_evaluation.py's words)."""
    text = json.loads((reference().configs / "RoBERTa-wwm-ext-base-chinese.json").read_text())
    return {
        "embed_dim": 32,
        "image_resolution": 32,
        "vision_layers": 2,
        "vision_width": 128,
        "vision_patch_size": 8,
        **text,
        "text_hidden_size": 128,
        "text_num_hidden_layers": 2,
        "text_num_attention_heads": 2,
        "text_intermediate_size": 256,
        **overrides,
    }


def reference_model(**overrides):
    """A randomly initialised reference CLIP with every tensor perturbed, so no mapping hides behind zeros/ones."""
    torch.manual_seed(0)
    model = reference().CLIP(**reference_config(**overrides))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


def save_as_released(model, path):
    torch.save({"epoch": 3, "step": 100, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)


def pil_decode_jpegs(encoded, boxes, device):
    """What components.gpu_decode.decode_jpegs returns, made with PIL (torchvision cannot be installed
    beside the pinned CPU torch; the reference environment checks the real one against PIL below)."""
    images = [
        torch.from_numpy(np.array(Image.open(io.BytesIO(e.numpy().tobytes())).convert("RGB"))).permute(2, 0, 1)
        for e in encoded
    ]
    return [image[:, top:bottom, left:right].to(device) for image, (left, top, right, bottom) in zip(images, boxes)]
