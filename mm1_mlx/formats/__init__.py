"""Reading other checkpoint formats: Hugging Face transformers / OpenCLIP sources (``sources``,
``configs``, ``weights``, ``preprocess``), the conversion pipeline (``assemble``), mlx-community
(mlx-vlm) checkpoints (``mlx_vlm``), and what ``load`` uses to take any of them: the family table
(``families``), hub fetching (``hub``) and the conversion cache (``cache``).

Torch-free: safetensors are read with MLX; only PyTorch pickles (.bin / .pt) import torch, lazily.
"""
