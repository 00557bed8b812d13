"""Fine-tuning: LoRA adapters (``adapters``), conversation datasets (``datasets``),
batching (``batching``), the masked loss (``losses``), loss curves (``plots``) and the training
loop (``trainer``).
``python -m mm1_mlx.lora`` and ``python -m mm1_mlx.fuse`` are the command lines."""
