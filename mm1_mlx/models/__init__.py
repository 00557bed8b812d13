"""The model, one file per piece, named like the checkpoint keys they load.

``config`` (dataclass configs) -> ``vision`` (ViT: CLIP / SigLIP / AIMv2 / DFN) and ``fastvit``
(FastViTHD) -> ``connector`` (C-Abstractor, average / attention pooling, LLaVA's MLP) ->
``decoder`` (Llama-style dense and MoE) -> ``model`` (the whole MM1: images merged into the text).
``quantization`` turns layers into their 4/8-bit forms and back.
"""
