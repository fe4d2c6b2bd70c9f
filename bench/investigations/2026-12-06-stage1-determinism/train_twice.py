"""Train the demo's stage STAGE twice for EPOCHS epochs from models/start and compare the weights' md5.

python bench/investigations/2026-12-06-stage1-determinism/train_twice.py 1 25   # after make demo
"""

import hashlib
import shutil
import sys
from pathlib import Path

from zhclip.components.training.config import TrainConfig
from zhclip.components.training.runner import train


def main() -> None:
    root = Path("/tmp/det")
    shutil.rmtree(root, ignore_errors=True)
    hashes = []
    for run in range(2):
        out = root / f"run{run}"
        cfg = TrainConfig(
            stage=int(sys.argv[1]),
            epochs=int(sys.argv[2]),
            max_steps=0,
            batch_size=32,
            storage_path=str(root / f"ray{run}"),
            tracking_uri=f"sqlite:///{root}/mlflow{run}.db",
            checkpoint_every=50,
        )
        train(Path("data/validated"), out, cfg, init_dir=Path("models/start"))
        hashes.append({p.name: hashlib.md5(p.read_bytes()).hexdigest()[:10] for p in sorted(out.glob("*.safetensors"))})
    print(hashes, hashes[0] == hashes[1])


if __name__ == "__main__":
    main()
