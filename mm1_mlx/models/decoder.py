"""The language decoder: Llama-style dense transformer with optional MoE FFNs (MM1-MoE, Mixtral).

Attribute names follow Hugging Face Llama/Mixtral keys (``model.layers.N.self_attn.q_proj``) so
converting weights only handles real layout changes (stacking experts). Asked with
``return_aux=True``, the MoE layers also return MM1's auxiliary losses (load balance, router
z-loss); the return type never depends on train / eval mode.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchGLU

from ..cpu.ops import Linear, attention, matmul_t, rope, silu
from .config import TextConfig


class Attention(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        hd, D, bias = args.head_dim, args.hidden_size, args.attention_bias
        self.scale = hd**-0.5
        self.q_proj = Linear(D, self.n_heads * hd, bias=bias)
        self.k_proj = Linear(D, self.n_kv_heads * hd, bias=bias)
        self.v_proj = Linear(D, self.n_kv_heads * hd, bias=bias)
        self.o_proj = Linear(self.n_heads * hd, D, bias=False)
        self.qk_norm_full = args.qk_norm_full
        if args.qk_norm:
            full = args.qk_norm_full
            self.q_norm = nn.RMSNorm(self.n_heads * hd if full else hd, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.n_kv_heads * hd if full else hd, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            hd, args.rope_theta, args.rope_traditional, args.rope_scaling,
            args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask=None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if "q_norm" in self and self.qk_norm_full:  # OLMoE: one norm over all heads
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, L, self.n_heads, -1)
        k = k.reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if "q_norm" in self and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)  # (B, nh, L, hd)
        offset = cache.offset if cache is not None else 0
        q, k = rope(self.rope, q, offset), rope(self.rope, k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if hasattr(cache, "bits"):  # a quantized KV cache: mlx-lm's quantized attention
            o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        else:
            o = attention(q, k, v, self.scale, mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dims, hidden, bias=bias)
        self.up_proj = Linear(dims, hidden, bias=bias)
        self.down_proj = Linear(hidden, dims, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


def router_losses(logits: mx.array, inds: mx.array, num_experts: int) -> tuple[mx.array, mx.array]:
    """Switch-Transformer load balance and ST-MoE router z-loss for (T, E) router logits.

    load balance = E * sum_e f_e * P_e, with f_e the fraction of top-k assignments routed to e and
    P_e the mean router probability of e; z-loss = mean(logsumexp(logits)^2).
    """
    logits = logits.astype(mx.float32)
    probs = mx.softmax(logits, axis=-1)
    counts = (inds[..., None] == mx.arange(num_experts)).astype(mx.float32).sum(axis=-2)  # (T, E)
    f = counts.mean(axis=0) / inds.shape[-1]
    p = probs.mean(axis=0)
    balance = num_experts * (f * p).sum()
    z = (mx.logsumexp(logits, axis=-1) ** 2).mean()
    return balance, z


class SparseMoeBlock(nn.Module):
    """Top-k routing over stacked experts (mlx-lm's SwitchGLU: gather_mm / gather_qmm)."""

    def __init__(self, args: TextConfig):
        super().__init__()
        self.num_experts, self.top_k = args.num_experts, args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                                    bias=args.mlp_bias)
        if args.shared_expert_intermediate_size:
            self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(args.hidden_size, 1, bias=False)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Router logits (..., E), chosen experts (..., k) and their weights (..., k)."""
        logits = self.gate(x)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
        probs = mx.softmax(logits.astype(mx.float32), axis=-1)
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return logits, inds, scores.astype(x.dtype)

    def __call__(self, x: mx.array, return_aux: bool = False):
        """The mixed experts' output; with ``return_aux`` also (load balance, z-loss)."""
        logits, inds, scores = self.route(x)
        y = (self.switch_mlp(x, inds) * scores[..., None]).sum(axis=-2)
        if "shared_expert" in self:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if not return_aux:
            return y
        return y, router_losses(logits.reshape(-1, self.num_experts),
                                inds.reshape(-1, self.top_k), self.num_experts)


class DecoderLayer(nn.Module):
    def __init__(self, args: TextConfig, moe: bool):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = SparseMoeBlock(args) if moe else MLP(
            args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None, return_aux: bool = False
                 ) -> tuple[mx.array, tuple | None]:
        """The layer's output and, for an MoE layer asked ``return_aux``, its router losses."""
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        y = self.post_attention_layernorm(h)
        if return_aux and isinstance(self.mlp, SparseMoeBlock):
            r, aux = self.mlp(y, return_aux=True)
            return h + r, aux
        return h + self.mlp(y), None


class LlamaModel(nn.Module):
    def __init__(self, args: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, args.is_moe_layer(i))
                       for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, h: mx.array, cache=None, return_aux: bool = False) -> tuple[mx.array, list]:
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        auxes = []
        for layer, c in zip(self.layers, cache):
            h, aux = layer(h, mask, c, return_aux)
            if aux is not None:
                auxes.append(aux)
        return self.norm(h), auxes


class LanguageModel(nn.Module):
    """Decoder with its head. ``__call__`` takes input embeddings, not ids, so images can be merged."""

    def __init__(self, args: TextConfig):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.layers

    def embed(self, input_ids: mx.array) -> mx.array:
        return self.model.embed_tokens(input_ids)

    def __call__(self, embeds: mx.array, cache=None, last_only: bool = False,
                 return_aux: bool = False):
        """Logits (B, L, V) (or (B, 1, V) with ``last_only``, as prefill needs); with
        ``return_aux`` also the weighted MoE auxiliary loss (zero for a dense decoder)."""
        h, auxes = self.model(embeds, cache, return_aux)
        if last_only:
            h = h[:, -1:]
        logits = self.head(h)
        if not return_aux:
            return logits
        return logits, self.aux_loss(auxes)

    def head(self, h: mx.array) -> mx.array:
        """Logits from the final hidden states (the tied embedding or ``lm_head``)."""
        if not self.args.tie_word_embeddings:
            return self.lm_head(h)
        emb = self.model.embed_tokens
        return matmul_t(h, emb.weight) if isinstance(emb, nn.Embedding) else emb.as_linear(h)

    def aux_loss(self, auxes: list) -> mx.array:
        """MM1's weighted router losses, averaged over the MoE layers."""
        if not auxes:
            return mx.array(0.0)
        balance = mx.stack([a[0] for a in auxes]).mean()
        z = mx.stack([a[1] for a in auxes]).mean()
        return self.args.router_aux_loss_coef * balance + self.args.router_z_loss_coef * z
