"""Image pixels made on the device: decoded 8-bit images resized and normalised there, as the
model's image processor makes them on the CPU (imports torch alone)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pixels_on_device(
    images: Sequence[torch.Tensor] | torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Decoded uint8 (3, H, W) images on the device (e.g. from nvJPEG, or a batch already resized by
    the loader) -> the normalised float (N, 3, size, size) batch the model's image processor makes
    on the CPU: squashed to size x size (no crop) with antialiased bicubic, rounded to 8 bits,
    scaled and normalised. Images already size x size are only normalised."""
    if not isinstance(images, torch.Tensor) and len({tuple(image.shape) for image in images}) > 1:
        resized = torch.cat([_resized(image[None], size) for image in images])
    else:
        resized = _resized(images if isinstance(images, torch.Tensor) else torch.stack(list(images)), size)
    mean_t = torch.tensor(mean, device=resized.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=resized.device).view(1, 3, 1, 1)
    return (resized / 255 - mean_t) / std_t


def _resized(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-2:] == (size, size):
        return batch.float()
    resized = F.interpolate(batch.float(), size=(size, size), mode="bicubic", antialias=True)
    return resized.clamp(0, 255).round()
