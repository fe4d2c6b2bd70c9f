"""zhclip's model library: Chinese CLIP towers, processing, loss, locking and the pyfunc wrapper.

This package is shipped inside MLflow models, so it imports only torch, transformers, numpy and
PIL (plus the standard library, onnxruntime for the onnx backend, and peft in `lora.py`, which
only training imports) and nothing else from the zhclip repository.

The presets and the text length are plain data (specs.py). Everything else loads torch and
transformers, about 5 s of imports, so it is imported when first used: a command that only checks
a setting against the presets (training's driver, `zhclip suite`) starts without them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .specs import CONTEXT_LENGTH, PRESETS

if TYPE_CHECKING:  # what the type checker and editors read; at run time, __getattr__ below
    from .embedding import decode_image, embed_images, embed_texts
    from .locking import lock_image_tower
    from .loss import contrastive_loss
    from .presets import build_model, default_vocab_path, load_model, save_model

# Each lazily imported name and its module. PEP 562's module __getattr__, written out here because
# this package ships inside MLflow models with nothing but torch, transformers, numpy and PIL.
_LAZY = {
    "decode_image": ".embedding",
    "embed_images": ".embedding",
    "embed_texts": ".embedding",
    "lock_image_tower": ".locking",
    "contrastive_loss": ".loss",
    "build_model": ".presets",
    "default_vocab_path": ".presets",
    "load_model": ".presets",
    "save_model": ".presets",
}

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


def __dir__() -> list[str]:
    return __all__


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # the next lookup finds it without this function
    return value
