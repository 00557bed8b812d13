"""The MM1 model: image encoder -> connector -> image tokens placed in the decoder's input sequence.

Contract shared by every tool: ``logits = model(input_ids, pixel_values=None, cache=None)`` where
``input_ids`` (B, L) carries one ``config.image_token_id`` per image-feature position and
``pixel_values`` (N_images, H, W, 3) is channels-last and normalized; images fill the image-token
positions in order. ``model(..., return_aux=True)`` returns ``(logits, aux_loss)`` (aux_loss is the
weighted MoE load-balance + router z-loss, zero for a dense decoder), in train and eval mode alike.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import FastViTConfig, ModelConfig, VisionConfig
from .connector import build_connector
from .decoder import LanguageModel
from .fastvit import FastViT
from .vision import VisionModel

ENCODERS = {VisionConfig: VisionModel, FastViTConfig: FastViT}


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = ENCODERS[type(config.vision_config)](config.vision_config)
        self.connector = build_connector(
            config.connector_config, config.vision_config.hidden_size,
            config.text_config.hidden_size, config.vision_config.num_patches,
        )
        self.language_model = LanguageModel(config.text_config)

    @property
    def layers(self):
        """Decoder layers (for mlx-lm's KV-cache helpers)."""
        return self.language_model.layers

    def encode_images(self, pixel_values: mx.array) -> mx.array:
        """(N, H, W, 3) normalized pixels -> (N, T, D) image tokens in the decoder's width."""
        dtype = self.vision_tower.dtype
        feats = self.vision_tower(pixel_values.astype(dtype))
        return self.connector(feats)

    def embed(self, input_ids: mx.array, image_features: mx.array | None = None) -> mx.array:
        """Token embeddings with image features placed at image-token positions, in order.

        ``image_features`` is (N, T, D) or flat (M, D): exactly one row per image token in
        ``input_ids`` (a suffix of an image's tokens is fine, as in prefix-cache reuse).
        """
        embeds = self.language_model.embed(input_ids)
        if image_features is None and input_ids.size == 1:
            return embeds  # a decode step: no host sync, so mx.async_eval can pipeline tokens
        is_img = input_ids == self.config.image_token_id
        n_img = int(is_img.sum().item())
        if image_features is None:
            if n_img:
                raise ValueError(f"input has {n_img} image tokens but no images were given")
            return embeds
        B, L, D = embeds.shape
        feats = image_features.reshape(-1, D).astype(embeds.dtype)
        if feats.shape[0] != n_img:
            raise ValueError(
                f"input has {n_img} image tokens but the images give {feats.shape[0]} features"
            )
        # gather from [text embeddings; image features]: differentiable, no scatter
        flat_img = is_img.reshape(-1)
        k = mx.cumsum(flat_img.astype(mx.int32)) - 1
        idx = mx.where(flat_img, B * L + k, mx.arange(B * L))
        table = mx.concatenate([embeds.reshape(-1, D), feats], axis=0)
        return table[idx].reshape(B, L, D)

    def __call__(self, input_ids: mx.array, pixel_values: mx.array | None = None, cache=None,
                 image_features: mx.array | None = None, last_only: bool = False,
                 return_aux: bool = False):
        if pixel_values is not None and image_features is None:
            image_features = self.encode_images(pixel_values)
        return self.language_model(self.embed(input_ids, image_features), cache, last_only,
                                   return_aux)

    def sanitize(self, weights: dict) -> dict:
        """Drop tensors the model does not build (encoder layers past the feature layer)."""
        if "encoder" not in self.vision_tower:
            return weights
        n = len(self.vision_tower.encoder.layers)
        prefix = "vision_tower.encoder.layers."
        return {
            k: v for k, v in weights.items()
            if not (k.startswith(prefix) and int(k[len(prefix):].split(".")[0]) >= n)
        }
