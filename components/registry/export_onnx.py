"""Export: ONNX image and text encoders, verified against PyTorch with onnxruntime before returning."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

from zhclip.components.core.errors import ZhclipError
from zhclip.components.core.summaries import timed
from zhclip.model import load_model
from zhclip.model.export import ImageEncoder, TextEncoder, export_onnx
from zhclip.model.presets import image_size


def _max_difference(session, feeds: dict[str, torch.Tensor], encoder: torch.nn.Module) -> float:
    onnx_out = session.run(None, {name: tensor.numpy() for name, tensor in feeds.items()})[0]
    with torch.no_grad():
        torch_out = encoder(*feeds.values()).numpy()
    return float(np.abs(onnx_out - torch_out).max())


def export(model_dir: str | Path, out_dir: str | Path, tolerance: float = 1e-3, seed: int = 0) -> dict:
    """Export both encoders and check them on a batch size the export never saw; fails above `tolerance`."""
    import onnxruntime

    try:
        model, processor = load_model(model_dir)
    except (FileNotFoundError, OSError) as err:
        raise ZhclipError(f"cannot load model from {model_dir}: {err}") from err
    context_length = processor.tokenizer.model_max_length
    summary: dict = {"model_dir": str(model_dir)}
    # The exporter reports progress on stdout; keep stdout for the JSON summary alone.
    with timed(summary), contextlib.redirect_stdout(sys.stderr):
        paths = export_onnx(model, out_dir, context_length)
    generator = torch.Generator().manual_seed(seed)
    size = image_size(model.config)
    ids = torch.randint(106, len(processor.tokenizer), (5, context_length), generator=generator)
    mask = torch.ones_like(ids)
    mask[:, context_length // 2 :] = 0
    checks = {
        "image": ({"pixel_values": torch.randn(5, 3, size, size, generator=generator)}, ImageEncoder(model)),
        "text": ({"input_ids": ids, "attention_mask": mask}, TextEncoder(model)),
    }
    for name, (feeds, encoder) in checks.items():
        session = onnxruntime.InferenceSession(str(paths[name]), providers=["CPUExecutionProvider"])
        summary[f"{name}_encoder"] = str(paths[name])
        summary[f"{name}_max_abs_diff"] = _max_difference(session, feeds, encoder)
        if summary[f"{name}_max_abs_diff"] > tolerance:
            raise ZhclipError(
                f"ONNX {name} encoder differs from PyTorch by {summary[f'{name}_max_abs_diff']:.2e} "
                f"(> {tolerance}); see {paths[name]}"
            )
    return summary
