"""Reading other checkpoint formats: Hugging Face transformers / OpenCLIP sources (``sources``,
``configs``, ``weights``, ``preprocess``), the conversion pipeline (``assemble``), mlx-community
(mlx-vlm) checkpoints (``mlx_vlm``), and what ``load`` uses to take any of them: the family table
(``families``), hub fetching (``hub``) and the conversion cache (``cache``). Other projects'
layouts have a module each (``honeybee``, ``fastvlm``, ``aimv2``): pure config and weight
mappings, plus the source reader the family table calls.

Torch-free: safetensors are read with MLX; only PyTorch pickles (.bin / .pt) import torch, lazily.
"""
