"""Reading other checkpoint formats: Hugging Face transformers / OpenCLIP sources (``sources``,
``configs``, ``weights``, ``preprocess``) and the conversion pipeline (``assemble``).

Torch-free: safetensors are read with MLX; only PyTorch pickles (.bin / .pt) import torch, lazily.
"""
