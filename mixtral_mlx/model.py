"""The Mixtral model: embedding -> decoder layers (attention + sparse MoE) -> norm -> head.

Module and parameter names follow transformers' `MixtralForCausalLM`, so a checkpoint
maps onto this tree name for name (the experts of a layer are stacked into one tensor
per projection; see checkpoint.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .attention import Attention
from .config import ModelArgs
from .moe import SparseMoeBlock


class ModelOutput(NamedTuple):
    logits: mx.array  # (B, L, vocab)
    router_logits: list[mx.array] | None  # per layer, (B, L, E)
    hidden_states: list[mx.array] | None  # embeddings, then each layer's output (before the final norm)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.block_sparse_moe = SparseMoeBlock(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> tuple[mx.array, mx.array]:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        moe_out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(h))
        return h + moe_out, router_logits


class MixtralModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = MixtralModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Activation checkpointing: keep only each layer's input for the backward pass and
        # recompute the rest there (less memory, about one more forward of compute).
        self.grad_checkpoint = False

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def forward(
        self,
        inputs: mx.array,
        cache: list | None = None,
        *,
        router_logits: bool = False,
        hidden_states: bool = False,
    ) -> ModelOutput:
        """inputs: (B, L) token ids. `cache`: one per layer (see cache.make_cache)."""
        h = self.model.embed_tokens(inputs)
        all_router, all_hidden = [], [h]
        for i, layer in enumerate(self.layers):
            if cache is not None:
                h, layer_router = layer(h, cache[i])
            elif self.grad_checkpoint:
                h, layer_router = nn.utils.checkpoint(layer)(h)
            else:
                h, layer_router = layer(h)
            all_router.append(layer_router)
            all_hidden.append(h)
        logits = self.head(self.model.norm(h))
        return ModelOutput(logits, all_router if router_logits else None, all_hidden if hidden_states else None)

    def head(self, h: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, inputs: mx.array, cache: list | None = None) -> mx.array:
        return self.forward(inputs, cache).logits

    def set_moe_dispatch(self, dispatch: str) -> None:
        for layer in self.layers:
            layer.block_sparse_moe.dispatch = dispatch

    def num_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))


def init_weights(model: Model, seed: int | None = None, qk_std: float | None = None,
                 head_std: float | None = None) -> Model:
    """Initialise for training from scratch, as transformers does (normal, std 0.02).

    The projections that write into the residual stream (o_proj, w2) are scaled down
    by 1/sqrt(2 * layers), GPT-2 style, so the residual's variance does not grow with
    depth; norms start at one. `qk_std` draws q_proj and k_proj with another std: at
    0.02 a small model's attention starts uniform, and the gradient that would make a
    query pick out one key out of dozens is as weak as the weights it goes through (see
    docs/finetune.md: with 0.1 the small preset learned to look feelings up in short
    reading drills, at 0.02 it did not). `head_std` draws the (untied) output head with
    another std.
    """
    if seed is not None:
        mx.random.seed(seed)
    std = model.args.initializer_range
    residual_std = std / math.sqrt(2 * model.args.num_hidden_layers)

    def init(path: str, p: mx.array) -> mx.array:
        if path.endswith("norm.weight"):
            return mx.ones_like(p)
        s = residual_std if path.endswith(("o_proj.weight", "w2.weight")) else std
        if qk_std is not None and path.endswith(("q_proj.weight", "k_proj.weight")):
            s = qk_std
        if head_std is not None and path == "lm_head.weight":
            s = head_std
        return (mx.random.normal(p.shape) * s).astype(p.dtype)

    model.update(tree_map_with_path(init, model.parameters()))
    return model
