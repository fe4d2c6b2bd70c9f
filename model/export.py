"""ONNX export of the image and text encoders: a dynamic batch axis, and a dynamic sequence axis for
text (a 10-character query pays for its 12 tokens, not for the whole context length)."""

from __future__ import annotations

from pathlib import Path

import torch

from .embedding import projected_features
from .presets import ClipModel, image_size


class ImageEncoder(torch.nn.Module):
    """pixel_values (batch, 3, H, W) -> projected image features (batch, projection_dim), unnormalised."""

    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return projected_features(self.model.get_image_features(pixel_values=pixel_values))


class TextEncoder(torch.nn.Module):
    """input_ids, attention_mask (batch, context) -> projected text features (batch, projection_dim)."""

    def __init__(self, model: ClipModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return projected_features(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def export_onnx(model: ClipModel, out_dir: str | Path, context_length: int) -> dict[str, Path]:
    """Write image_encoder.onnx and text_encoder.onnx (torch.export-based exporter) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().float()
    size = image_size(model.config)
    batch = torch.export.Dim("batch", min=1, max=65536)
    # [CLS] and [SEP] make every tokenized text at least 2 tokens long
    sequence = torch.export.Dim("sequence", min=2, max=context_length)
    paths = {"image": out_dir / "image_encoder.onnx", "text": out_dir / "text_encoder.onnx"}
    with torch.no_grad():
        torch.onnx.export(
            ImageEncoder(model),
            (torch.zeros(2, 3, size, size),),
            str(paths["image"]),
            input_names=["pixel_values"],
            output_names=["image_features"],
            dynamic_shapes={"pixel_values": {0: batch}},
            dynamo=True,
            external_data=False,
        )
        ids = torch.zeros(2, context_length, dtype=torch.long)
        torch.onnx.export(
            TextEncoder(model),
            (ids, torch.ones_like(ids)),
            str(paths["text"]),
            input_names=["input_ids", "attention_mask"],
            output_names=["text_features"],
            dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
            dynamo=True,
            external_data=False,
        )
    return paths
