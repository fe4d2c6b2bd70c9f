"""Runs cn-clip 1.6.0's `eval/zeroshot_evaluation.py` on CPU: its `__main__` block, statement by statement.

That block needs CUDA and a model config of one of the released sizes; the statements doing either are
left out and their work done here (the model's config comes as a JSON file). Every other statement
runs as the script has it: the checkpoint load, the label file, torchvision's ImageFolder, the
templates chosen by dataset name, the classifier, the scoring, the predictions JSON and the printed
top-1. Run by tests/evaluation/test_zeroshot_reference.py with the reference environment's Python:

    python reference_zeroshot.py MODEL_INFO_JSON CHECKPOINT DATAPATH DATASET LABEL_FILE SAVE_DIR
"""

import ast
import importlib.machinery
import json
import sys
import types
from argparse import Namespace
from pathlib import Path

# cn-clip is installed without its dependencies: modules the script imports import these three, and
# nothing on this path calls them
for name in ("tqdm", "lmdb", "timm", "timm.data"):
    stub = types.ModuleType(name)
    stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
    stub.__path__ = []
    sys.modules[name] = stub
sys.modules["tqdm"].tqdm = lambda iterable, *args, **kwargs: iterable
sys.modules["timm.data"].create_transform = None

import cn_clip.eval  # noqa: E402

SCRIPT = Path(cn_clip.eval.__file__).parent / "zeroshot_evaluation.py"
LEFT_OUT = ("parse_args", "cuda", "set_device", "model_config_file", "args.gpu = 0")
# accuracy() calls float() on a one-element array, which NumPy 2.4 (the lock's) refuses; the one change
# made to the script's code
FIXES = {".cpu().numpy()) for k in topk]": ".cpu().numpy()[0]) for k in topk]"}

model_info, checkpoint, datapath, dataset, label_file, save_dir = sys.argv[1:]
source = SCRIPT.read_text()
for old, new in FIXES.items():
    assert source.count(old) == 1, f"cn-clip's script changed: {old!r} is not in it once"
    source = source.replace(old, new)
module = ast.parse(source)
main = next(node for node in module.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
kept = [statement for statement in main.body if not any(word in ast.unparse(statement) for word in LEFT_OUT)]
body = [node for node in module.body if node is not main] + kept
args = Namespace(
    datapath=datapath,
    dataset=dataset,
    label_file=label_file,
    save_dir=save_dir,
    resume=checkpoint,
    index="",
    img_batch_size=8,
    num_workers=0,
    context_length=52,
    precision="fp32",
    vision_model="tiny",
    gpu="cpu",
)
namespace = {"__name__": "zeroshot_evaluation", "args": args, "model_info": json.loads(Path(model_info).read_text())}
exec(compile(ast.Module(body, type_ignores=[]), str(SCRIPT), "exec"), namespace)
# what ImageFolder read, in its order, for the test to compare with zhclip's reader
samples = namespace["data"][dataset].dataloader.dataset.samples
(Path(save_dir) / "samples.json").write_text(json.dumps([[str(Path(p).relative_to(datapath)), t] for p, t in samples]))
