"""Next-token losses: cross-entropy with one `exp` pass, and the output head fused with it.

The softmax over the vocabulary is the largest elementwise cost of a small model's
training step on a CPU (MLX's CPU `exp` costs ~10 ns an element), and the float32
logits with their exponentials and gradient the largest activations. So:

* `cross_entropy` keeps the forward's exponentials for the gradient: one pass of `exp`
  over (tokens, vocab) instead of two (`logsumexp`, then `softmax` in its gradient).
* `linear_cross_entropy` computes the head's matmul and the loss a chunk of positions
  at a time and, since the loss is the last thing a step computes, each chunk's
  gradients with respect to the hidden states and the head's weight right away. The
  backward pass only scales them. Same FLOPs and one `exp` pass, but no more than a
  chunk of logits and its exponentials (4 MiB each) is ever alive.

Both equal `nn.losses.cross_entropy` on float32 logits to float rounding, gradients included.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

CHUNK_ELEMENTS = 1 << 20  # logits per chunk of `linear_cross_entropy` (float32: 4 MiB)


@mx.custom_function
def _cross_entropy(logits: mx.array, targets: mx.array):
    x = logits.astype(mx.float32)
    top = x.max(axis=-1, keepdims=True)
    e = mx.exp(x - top)
    total = e.sum(axis=-1, keepdims=True)
    loss = (top + mx.log(total) - mx.take_along_axis(x, targets[..., None], axis=-1)).squeeze(-1)
    return loss, e, total


@_cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    _, e, total = outputs
    cot, targets = cotangents[0][..., None], targets[..., None]
    grad = e * (cot / total)  # cot * softmax, from the forward's exponentials; then minus cot at the target
    grad = mx.put_along_axis(grad, targets, mx.take_along_axis(grad, targets, axis=-1) - cot, axis=-1)
    return grad.astype(logits.dtype), mx.zeros_like(targets[..., 0])


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position -log softmax(logits)[target], in float32 whatever the logits' dtype."""
    return _cross_entropy(logits, targets)[0]


@mx.custom_function
def _linear_cross_entropy(h: mx.array, weight: mx.array, targets: mx.array, mask: mx.array):
    chunk = max(128, CHUNK_ELEMENTS // weight.shape[0])
    ones = mx.ones((weight.shape[0], 1), mx.float32)
    loss, dh, dweight = mx.array(0.0), [], None
    for start in range(0, h.shape[0], chunk):
        hc, tc, mc = h[start : start + chunk], targets[start : start + chunk, None], mask[start : start + chunk, None]
        if dweight is not None:  # finish the previous chunk first, so its logits are freed before these exist
            hc = mx.depends(hc, [loss, dh[-1], dweight])
        logits = (hc @ weight.T).astype(mx.float32)
        top = logits.max(axis=-1, keepdims=True)
        e = mx.exp(logits - top)
        total = e @ ones  # the rows' sums, by the BLAS: ~4x faster than MLX's CPU sum
        loss = loss + ((top + mx.log(total) - mx.take_along_axis(logits, tc, axis=-1)) * mc).sum()
        # mask * softmax, the gradient but for its one-hot part, is e scaled row by row: the
        # scale goes on the (chunk, d) operands instead of a third (chunk, vocab) array.
        scale, e = (mc / total).astype(h.dtype), e.astype(h.dtype)
        dh.append((e @ weight) * scale)
        dweight = e.T @ (hc * scale) if dweight is None else mx.addmm(dweight, e.T, hc * scale)
    # The one-hot part of mask * (softmax - one_hot(targets)), row by row.
    m = mask[:, None].astype(h.dtype)
    dh = mx.concatenate(dh) - m * weight[targets]
    dweight = dweight.at[targets].add(-m * h)
    return loss, dh, dweight


@_linear_cross_entropy.vjp
def _linear_cross_entropy_vjp(primals, cotangents, outputs):
    h, weight, targets, mask = primals
    _, dh, dweight = outputs  # computed in the forward pass; evaluated only if asked for
    cot = cotangents[0]
    return (cot * dh).astype(h.dtype), (cot * dweight).astype(weight.dtype), mx.zeros_like(targets), mx.zeros_like(mask)


def linear_cross_entropy(h: mx.array, weight: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """sum over positions of mask * cross_entropy(h @ weight.T, targets): h (N, d), weight (V, d), targets/mask (N,)."""
    return _linear_cross_entropy(h, weight, targets, mask.astype(mx.float32))[0]


def head_cross_entropy(model, hidden: mx.array, targets: mx.array, mask: mx.array) -> mx.array:
    """sum(mask * cross-entropy) of the model's final norm and head on the last layer's output.

    Fused (`linear_cross_entropy`) when the head is a plain, trainable matrix, its own or
    the tied embedding; any other head (frozen, quantized, adapted) computes its logits
    first, so no gradient nobody asked for is computed.
    """
    h = model.model.norm(hidden)
    weight = _plain_head_weight(model)
    if weight is None:
        return (cross_entropy(model.head(h), targets) * mask).sum()
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), mask.reshape(-1))


def _plain_head_weight(model) -> mx.array | None:
    if model.args.tie_word_embeddings:
        layer, plain = model.model.embed_tokens, nn.Embedding
    else:
        layer, plain = model.lm_head, nn.Linear
    trainable = type(layer) is plain and "bias" not in layer and "weight" in layer.trainable_parameters()
    return layer.weight if trainable else None
