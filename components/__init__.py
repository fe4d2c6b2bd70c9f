"""zhclip pipeline steps: one module per step, each a plain function the CLI, DVC and KFP call."""
