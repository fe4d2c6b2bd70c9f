"""zhclip pipeline steps: one module per step, each a plain function the CLI, DVC and KFP call."""

import os

# transformers draws a progress bar for every save_pretrained, also for one-file models (at each
# checkpoint, in every worker); zhclip's own bars say what is going on. Set before transformers loads.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
