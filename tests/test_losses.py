"""The fast losses equal MLX's cross-entropy, values and gradients."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
import pytest

from mixtral_mlx import Model, load_preset
from mixtral_mlx.losses import cross_entropy, head_cross_entropy, linear_cross_entropy
from mixtral_mlx.model import init_weights


def reference(logits: mx.array, targets: mx.array) -> mx.array:
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_cross_entropy_and_its_gradient(dtype):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(size=(3, 5, 50)) * 4).astype(dtype)
    targets = mx.array(rng.integers(0, 50, size=(3, 5)))
    weights = mx.array(rng.uniform(size=(3, 5)), dtype=mx.float32)  # a distinct cotangent per position

    value, grad = mx.value_and_grad(lambda x: (cross_entropy(x, targets) * weights).sum())(logits)
    ref_value, ref_grad = mx.value_and_grad(lambda x: (reference(x, targets) * weights).sum())(logits)
    assert cross_entropy(logits, targets).dtype == mx.float32 and grad.dtype == dtype
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-6)
    atol = 1e-6 if dtype == mx.float32 else 1e-2
    np.testing.assert_allclose(np.array(grad.astype(mx.float32)), np.array(ref_grad.astype(mx.float32)), atol=atol)


@pytest.mark.parametrize("positions", [7, 300])  # one chunk; three chunks, the last one short
def test_linear_cross_entropy_and_its_gradients(positions):
    rng = np.random.default_rng(1)
    vocab, dims = 8000, 16  # 8000 words: chunks of 262 positions
    h = mx.array(rng.normal(size=(positions, dims)), dtype=mx.float32)
    weight = mx.array(rng.normal(size=(vocab, dims)) * 0.5, dtype=mx.float32)
    targets = mx.array(rng.integers(0, vocab, size=positions))
    mask = mx.array(rng.uniform(size=positions) > 0.2, dtype=mx.float32)

    def ours(h, w):
        return 3.0 * linear_cross_entropy(h, w, targets, mask)  # a cotangent other than 1

    def theirs(h, w):
        return 3.0 * (reference(h @ w.T, targets) * mask).sum()

    value, (gh, gw) = mx.value_and_grad(ours, argnums=(0, 1))(h, weight)
    ref_value, (ref_gh, ref_gw) = mx.value_and_grad(theirs, argnums=(0, 1))(h, weight)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-6)
    np.testing.assert_allclose(np.array(gh), np.array(ref_gh), rtol=1e-5, atol=1e-5)  # sums over 8000 words
    np.testing.assert_allclose(np.array(gw), np.array(ref_gw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied,frozen_head", [(False, False), (True, False), (False, True)])
def test_head_cross_entropy_equals_the_models_logits(tied, frozen_head):
    args = load_preset("tiny")
    args.tie_word_embeddings = tied
    model = init_weights(Model(args), seed=0)
    if frozen_head:  # fine-tuning without the head: the plain path, no head gradient
        model.lm_head.freeze()
    rng = np.random.default_rng(2)
    inputs, targets = mx.array(rng.integers(0, 512, size=(2, 9))), mx.array(rng.integers(0, 512, size=(2, 9)))
    mask = mx.array(rng.uniform(size=(2, 9)) > 0.3, dtype=mx.float32)

    def fused(inputs):
        hidden = model.forward(inputs, hidden_states=True).hidden_states[-1]
        return head_cross_entropy(model, hidden, targets, mask)

    def plain(inputs):
        return (reference(model(inputs), targets) * mask).sum()

    value, grads = nn.value_and_grad(model, fused)(inputs)
    ref_value, ref_grads = nn.value_and_grad(model, plain)(inputs)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-6)
    flat, ref_flat = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    assert flat.keys() == ref_flat.keys()
    for name, g in ref_flat.items():
        np.testing.assert_allclose(np.array(flat[name]), np.array(g), atol=1e-5, err_msg=name)
