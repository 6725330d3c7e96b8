"""Where users already train: callbacks for PyTorch Lightning (``integrations.lightning``) and
the Hugging Face Trainer (``integrations.hf``), and distributed data parallel
(``integrations.ddp``). Each is imported on its own, so a missing framework only matters to
the integration that needs it."""
