"""Grouped-query self-attention with RoPE and causal / sliding-window masks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs


def attention_mask(q_len: int, n_keys: int, offset: int, window: int | None):
    """The mask for `q_len` queries at positions offset.. over `n_keys` keys.

    The keys are taken to cover the contiguous positions ending at the last query
    (what the caches return). A query at position i sees key j when j <= i and, with a
    sliding window W, i - j < W (the last W positions, itself included), as in
    transformers' Mixtral. Returns None (no mask needed), "causal" (the fused kernel's
    own bottom-right-aligned causal mask) or a boolean array (True = attend).
    """
    if window is None or n_keys <= window:
        return None if q_len == 1 else "causal"
    q_pos = mx.arange(offset, offset + q_len)[:, None]
    k_pos = mx.arange(offset + q_len - n_keys, offset + q_len)[None, :]
    return (k_pos <= q_pos) & (q_pos - k_pos < window)


CAUSAL_BLOCK = 32  # queries per block of `causal_attention_in_blocks` (small preset, 8 x 256: 64 and 128 were slower)


@mx.custom_function
def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis, written out so that a compiled step fuses it.

    MLX's CPU softmax kernel costs ~18 ns an element (scalar `exp`); inside `mx.compile`
    these few operations become one kernel built for the CPU (cpu_jit.py), ~4 ns. The
    gradient is written out too, from the output alone, so only the probabilities are kept.
    """
    e = mx.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, probs):
    return probs * (cotangent - (cotangent * probs).sum(axis=-1, keepdims=True))


def causal_attention_in_blocks(q: mx.array, k: mx.array, v: mx.array, scale: float, block: int = CAUSAL_BLOCK):
    """Causal attention a block of queries at a time, each block over the keys up to its last query.

    Equals one causal `scaled_dot_product_attention` call (the keys cover the positions
    ending at the last query). On the CPU that call computes every (query, key) score,
    masks half and runs MLX's softmax kernel over the full square. Here each block skips
    the masked keys past its last query and keeps its score matrix small, the query heads
    that share a key head are stacked into one matmul, and the softmax is fused into the
    compiled step: at 256 positions (small preset, 2-core CPU) forward and backward take
    0.4x the time of the blocks through `scaled_dot_product_attention`, itself 0.6x of one call.
    """
    B, H, L, D = q.shape
    kv_heads, past = k.shape[1], k.shape[2] - L  # `past`: cached positions before the queries
    rep = H // kv_heads
    q = (q * scale).reshape(B, kv_heads, rep, L, D)
    outputs = []
    for s in range(0, L, block):
        e = min(s + block, L)
        n_keys = past + e
        qb = q[:, :, :, s:e].reshape(B, kv_heads, rep * (e - s), D)  # the heads of one key head, stacked
        scores = (qb @ k[:, :, :n_keys].swapaxes(-1, -2)).reshape(B, kv_heads, rep, e - s, n_keys)
        visible = mx.arange(n_keys)[None] <= mx.arange(past + s, past + e)[:, None]
        probs = softmax(mx.where(visible, scores.astype(mx.float32), -mx.inf)).astype(v.dtype)
        out = probs.reshape(B, kv_heads, rep * (e - s), n_keys) @ v[:, :, :n_keys]
        outputs.append(out.reshape(B, kv_heads, rep, e - s, D))
    return mx.concatenate(outputs, axis=3).reshape(B, H, L, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.window = args.sliding_window
        self.rope_theta = args.rope_theta
        self.scale = self.head_dim**-0.5
        h, d = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)

    def rope(self, x: mx.array, offset: int) -> mx.array:
        # traditional=False: rotate the two halves of each head, as transformers does.
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)

    def qkv(self, x: mx.array, cache=None) -> tuple[mx.array, mx.array, mx.array, int]:
        """Projected, rotated queries and the keys/values to attend to (cache updated)."""
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        return q, k, v, offset

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, k, v, offset = self.qkv(x, cache)
        # A compiled decoding step's cache hands back its whole buffer and the mask of its filled slots.
        mask = getattr(cache, "slot_mask", None)
        if mask is None:
            mask = attention_mask(L, k.shape[2], offset, self.window)
        if isinstance(mask, str) and L > CAUSAL_BLOCK and mx.default_device() == mx.cpu:
            out = causal_attention_in_blocks(q, k, v, self.scale)
        else:  # a GPU's fused kernel skips masked blocks itself
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
