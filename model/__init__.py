"""zhclip's model library: Chinese CLIP towers, processing, loss, locking and the pyfunc wrapper.

This package is shipped inside MLflow models, so it imports only torch, transformers, numpy and
PIL (plus the standard library, onnxruntime for the onnx backend, and peft in `lora.py`, which
only training imports) and nothing else from the zhclip repository.
"""

from .embedding import decode_image, embed_images, embed_texts
from .locking import lock_image_tower
from .loss import contrastive_loss
from .presets import CONTEXT_LENGTH, PRESETS, build_model, default_vocab_path, load_model, save_model

__all__ = [
    "CONTEXT_LENGTH",
    "PRESETS",
    "build_model",
    "contrastive_loss",
    "decode_image",
    "default_vocab_path",
    "embed_images",
    "embed_texts",
    "load_model",
    "lock_image_tower",
    "save_model",
]
