"""The reference implementation (the `cn-clip` wheel), importable without torchvision.

cn-clip's package `__init__` imports torchvision for its image transform, and no torchvision build
runs beside the pinned CPU torch. Its tokenizer and model modules need only torch, so they are
loaded here under their real module names through a bare package object, and `cn_clip.clip.utils`
(for the reference `tokenize`) with a placeholder torchvision that is never called. This runs the
reference's own code, not a copy of it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import types
from functools import lru_cache
from pathlib import Path


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _placeholder_torchvision() -> None:
    if "torchvision" in sys.modules:
        return
    transforms = types.ModuleType("torchvision.transforms")
    for name in ("Compose", "ToTensor", "Normalize", "Resize", "InterpolationMode"):
        setattr(transforms, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = torchvision, transforms


@lru_cache(maxsize=1)
def reference() -> types.SimpleNamespace:
    """cn-clip's `CLIP` model class, `tokenize` function and tokenizer, and its model configs."""
    root = Path(importlib.metadata.distribution("cn-clip").locate_file("cn_clip/clip"))
    for name, path in (("cn_clip", root.parent), ("cn_clip.clip", root)):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    tokenizer = _load("cn_clip.clip.bert_tokenizer", root / "bert_tokenizer.py").FullTokenizer()
    sys.modules["cn_clip.clip"]._tokenizer = tokenizer
    model = _load("cn_clip.clip.model", root / "model.py")
    _placeholder_torchvision()
    utils = _load("cn_clip.clip.utils", root / "utils.py")
    return types.SimpleNamespace(
        CLIP=model.CLIP, tokenize=utils.tokenize, tokenizer=tokenizer, configs=root / "model_configs"
    )


CN_CLIP_EVAL = Path(importlib.metadata.distribution("cn-clip").locate_file("cn_clip/eval"))


def run_reference_eval(script: str, *args: str) -> None:
    """Run one of cn-clip's eval scripts as the reference does; its `.cuda()` calls stay on the CPU."""
    code = (
        "import runpy, sys, torch; torch.Tensor.cuda = lambda self, *a, **k: self; "
        f"sys.argv = {[script, *args]!r}; runpy.run_path({str(CN_CLIP_EVAL / script)!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
