"""One decoding step on the CPU through NumPy: matrix-vector products that read each weight once.

Decoding one token multiplies one row by every weight matrix. MLX's CPU back end sends
every product to BLAS `sgemm`, and OpenBLAS's sgemm copies (packs) the whole weight
matrix before it multiplies, whatever the number of rows: on a 2-core x86 CPU the 8,000
x 256 float32 output head of the `small` preset takes 1.7 ms a token that way, against
0.22 ms for NumPy's matrix-vector product, which BLAS runs as `sgemv` and which reads
the weight once. A token of the small preset reads ~23 MB of weights, so this is most of decoding.

`NumpyDecodeStep` runs the model's forward for one new token in NumPy. It holds the
float32 weights transposed, (in, out), so `x @ w` streams whole rows of each matrix:
with weights that do not stay in the cache, OpenBLAS's gemv reads that layout about 3x
faster here than the (out, in) one (54 against 18 GB/s on a 64 MB matrix). The copies
cost the weights' size once more while a model decodes. It works on zero-copy views of
the KV caches' buffers (the new key and value are written into the cache's
preallocated slot, so prefill, trimming and MLX steps see them as usual).

It is `DecodeStep`'s stand-in where it applies: a CPU device, float32 weights, plain
(not quantized or adapted) layers and one sequence; `unsupported_reason` says why not.
Its logits equal the MLX model's to float rounding (tests/test_cpu_decode.py). Set
MIXTRAL_MLX_DECODE=mlx to decode with the compiled MLX step instead.
"""

from __future__ import annotations

import os
import weakref

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .cache import RollingKVCache
from .decode import decode_step, has_free_slot
from .moe import ExpertLinear


def unsupported_reason(model) -> str | None:
    """Why the NumPy step cannot run this model (None: it can)."""
    if os.environ.get("MIXTRAL_MLX_DECODE", "auto") == "mlx":
        return "MIXTRAL_MLX_DECODE=mlx"
    if mx.default_device() != mx.cpu:
        return "the device is not the CPU"
    expected = [("model.embed_tokens", model.model.embed_tokens, nn.Embedding)]
    if not model.args.tie_word_embeddings:
        expected.append(("lm_head", model.lm_head, nn.Linear))
    for i, layer in enumerate(model.layers):
        attn, moe = layer.self_attn, layer.block_sparse_moe
        expected += [(f"layers.{i}.self_attn.{p}", getattr(attn, p), nn.Linear)
                     for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        expected += [(f"layers.{i}.block_sparse_moe.gate", moe.gate, nn.Linear)]
        expected += [(f"layers.{i}.block_sparse_moe.experts.{p}", getattr(moe.experts, p), ExpertLinear)
                     for p in ("w1", "w2", "w3")]
    for name, module, kind in expected:
        if type(module) is not kind:  # adapted (LoRA, DoRA) or quantized
            return f"{name} is a {type(module).__name__}"
        if "bias" in module:
            return f"{name} has a bias"
    dtypes = {p.dtype for _, p in tree_flatten(model.parameters())}
    if dtypes != {mx.float32}:
        return f"weights in {', '.join(sorted(str(d) for d in dtypes))}"
    return None


def decoder_for(model):
    """The model's one-token step: NumPy where it applies, else the compiled MLX `DecodeStep`.

    The NumPy step is kept with the model and made again when its weights change (an
    update, a training step), since it holds copies of them.
    """
    if unsupported_reason(model) is not None:
        return decode_step(model)
    step = getattr(model, "_numpy_decode_step", None)
    if step is None or not step.is_current():
        step = model._numpy_decode_step = None  # let the old copies go before making new ones
        step = model._numpy_decode_step = NumpyDecodeStep(model)
    return step


def release(model) -> None:
    """Drop the model's NumPy step and its weight copies: what a trainer does before it changes the weights."""
    if getattr(model, "_numpy_decode_step", None) is not None:
        model._numpy_decode_step = None


def held_bytes(model) -> int:
    """Bytes the model's NumPy decoding step holds outside MLX's allocator (0 without one)."""
    step = getattr(model, "_numpy_decode_step", None)
    return step.nbytes if step is not None else 0


def _copy(a: mx.array) -> np.ndarray:
    # A copy, not a view: a view would keep the model's array alive after the model replaces it.
    mx.eval(a)
    return np.array(a)


def _transposed(a: mx.array) -> np.ndarray:
    """(..., out, in) -> an (..., in, out) copy: `x @ w` then streams whole rows of w."""
    mx.eval(a)
    return np.ascontiguousarray(np.swapaxes(np.asarray(a), -1, -2))


class _Layer:
    """One decoder layer's weights in NumPy, transposed to (in, out)."""

    def __init__(self, layer):
        attn, moe = layer.self_attn, layer.block_sparse_moe
        self.q, self.k, self.v, self.o = (_transposed(getattr(attn, p).weight) for p in ("q_proj", "k_proj", "v_proj",
                                                                                          "o_proj"))
        self.norm1, self.norm2 = _copy(layer.input_layernorm.weight), _copy(layer.post_attention_layernorm.weight)
        self.router = _transposed(moe.gate.weight)
        # Gate and up projections side by side, (experts, in, 2 * intermediate): one
        # product an expert instead of two, each a longer stream for BLAS.
        self.w13 = np.concatenate([_transposed(moe.experts.w1.weight), _transposed(moe.experts.w3.weight)], axis=-1)
        self.w2 = _transposed(moe.experts.w2.weight)


class NumpyDecodeStep:
    """`step(tokens (1, 1), caches) -> logits (1, vocab)` of the next position, updating the caches."""

    def __init__(self, model):
        args = model.args
        self.model = model
        self.eps, self.top_k = args.rms_norm_eps, args.num_experts_per_tok
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.sliding_window
        self.scale = self.head_dim**-0.5
        half = self.head_dim // 2
        self.inv_freq = args.rope_theta ** (-np.arange(0, half, dtype=np.float64) * 2 / self.head_dim)
        self.head = _transposed(model.model.embed_tokens.weight if args.tie_word_embeddings else model.lm_head.weight)
        # Embedding rows: with a tied head, its columns (no second copy).
        self.embed = self.head.T if args.tie_word_embeddings else _copy(model.model.embed_tokens.weight)
        self.final_norm = _copy(model.model.norm.weight)
        self.layers = [_Layer(layer) for layer in model.layers]
        # Weak references: holding the arrays would keep replaced weights alive (a training
        # run that samples between steps would carry a second copy of its model).
        self._sources = [weakref.ref(p) for _, p in tree_flatten(model.parameters())]

    @property
    def nbytes(self) -> int:
        """Memory held by the step's weight copies."""
        arrays = [self.head, self.embed, self.final_norm] + [a for layer in self.layers for a in vars(layer).values()]
        return sum(a.nbytes for a in arrays if a.base is None)  # a tied embedding is a view of the head

    def is_current(self) -> bool:
        """Whether the model still holds the weights this step copied."""
        now = [p for _, p in tree_flatten(self.model.parameters())]
        return len(now) == len(self._sources) and all(ref() is p for ref, p in zip(self._sources, now))

    def __call__(self, tokens: mx.array, caches: list) -> mx.array:
        if tokens.shape != (1, 1):  # several sequences: the MLX step
            return decode_step(self.model)(tokens, caches)
        return mx.array(self.logits(int(tokens.item()), caches)[None])

    def logits(self, token: int, caches: list) -> np.ndarray:
        """The (vocab,) logits of the position after `token`, in NumPy, the caches updated."""
        if not all(has_free_slot(c) for c in caches):  # a cache to create or grow: the MLX step
            return np.array(decode_step(self.model)(mx.array([[token]]), caches)[0].astype(mx.float32))
        x = self.embed[token]
        offset = caches[0].offset
        cos, sin = self._rope_angles(offset)
        for layer, cache in zip(self.layers, caches):
            x = x + self._attention(layer, self._rms_norm(x, layer.norm1), cache, cos, sin)
            x = x + self._experts(layer, self._rms_norm(x, layer.norm2))
        for cache in caches:
            cache.offset += 1
        return self._rms_norm(x, self.final_norm) @ self.head

    # ------------------------------------------------------------------ the pieces
    def _rms_norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x * (weight / np.sqrt(np.dot(x, x) / x.shape[0] + self.eps, dtype=np.float32))

    def _rope_angles(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        angles = position * self.inv_freq
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    @staticmethod
    def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate the two halves of each head (x: heads, head_dim), as `mx.fast.rope(traditional=False)`."""
        half = x.shape[-1] // 2
        a, b = x[:, :half], x[:, half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def _attention(self, layer: _Layer, x: np.ndarray, cache, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self._rope((x @ layer.q).reshape(H, D), cos, sin)
        k = self._rope((x @ layer.k).reshape(KV, D), cos, sin)
        v = (x @ layer.v).reshape(KV, D)
        keys, values = self._cache_views(cache)
        if isinstance(cache, RollingKVCache):  # ring: slot p % W; every filled slot is in the window
            slot = cache.offset % cache.window
            lo, hi = 0, min(cache.offset + 1, cache.window)
        else:
            slot = cache.offset
            lo = 0 if self.window is None else max(0, cache.offset + 1 - self.window)
            hi = cache.offset + 1
        keys[0, :, slot], values[0, :, slot] = k, v
        K, V = keys[0, :, lo:hi], values[0, :, lo:hi]  # (KV, n, D)
        scores = (q.reshape(KV, H // KV, D) * self.scale) @ K.transpose(0, 2, 1)  # (KV, rep, n)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out = (scores / scores.sum(axis=-1, keepdims=True)) @ V  # (KV, rep, D)
        return out.reshape(H * D) @ layer.o

    @staticmethod
    def _cache_views(cache) -> tuple[np.ndarray, np.ndarray]:
        """Writable zero-copy views of the cache's buffers (made contiguous first if they are not)."""
        views = []
        for name in ("keys", "values"):
            buf = getattr(cache, name)
            mx.eval(buf)
            view = np.asarray(buf)
            if not view.flags.c_contiguous or not view.flags.writeable:
                buf = mx.array(np.ascontiguousarray(view))
                setattr(cache, name, buf)
                view = np.asarray(buf)
            views.append(view)
        return views[0], views[1]

    def _experts(self, layer: _Layer, x: np.ndarray) -> np.ndarray:
        logits = x @ layer.router
        chosen = np.argpartition(-logits, self.top_k - 1)[: self.top_k]
        weights = np.exp(logits[chosen] - logits[chosen].max())
        weights /= weights.sum()
        out = np.zeros_like(x)
        for e, w in zip(chosen.tolist(), weights.tolist()):
            h = x @ layer.w13[e]
            gate, up = h[: h.shape[0] // 2], h[h.shape[0] // 2 :]  # slices: np.split took 7% of a token
            out += np.float32(w) * ((gate / (1 + np.exp(-gate)) * up) @ layer.w2[e])
        return out
