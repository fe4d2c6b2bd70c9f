"""JPEG bytes decoded on the training device (`train.decode_on_device`): batched nvJPEG through torchvision.

Not in `model/`, which MLflow models carry and which imports no torchvision. This module imports
torch alone (torchvision when it decodes), so the reference environment, which has torchvision but
not transformers, tests it against PIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Box = tuple[int, int, int, int]  # (left, top, right, bottom), as PIL's Image.crop takes it


def decode_jpegs(encoded: Sequence[torch.Tensor], boxes: Sequence[Box], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (1-D uint8 CPU tensors) -> RGB uint8 (3, h, w) images on `device`, each cropped to
    its box. On a GPU torchvision decodes the whole list in one batched nvJPEG call; on the CPU it
    decodes with libjpeg-turbo. Grey JPEGs come out as RGB, as PIL's `convert("RGB")` makes them."""
    # torchvision: the optional gpu-decode extra, not in the locked environment
    from torchvision.io import ImageReadMode, decode_jpeg  # pyright: ignore[reportMissingImports]

    decoded = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
    return [image[:, top:bottom, left:right] for image, (left, top, right, bottom) in zip(decoded, boxes)]
