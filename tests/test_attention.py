"""Causal attention in query blocks equals one fused call, outputs and gradients."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mixtral_mlx.attention import causal_attention_in_blocks


@pytest.mark.parametrize("queries,past,block", [(256, 0, 64), (100, 0, 32), (70, 30, 16)])
def test_blocks_equal_one_call(queries, past, block):
    rng = np.random.default_rng(0)
    q = mx.array(rng.normal(size=(2, 4, queries, 16)), dtype=mx.float32)
    k, v = (mx.array(rng.normal(size=(2, 2, past + queries, 16)), dtype=mx.float32) for _ in range(2))  # GQA 4:2
    weights = mx.array(rng.normal(size=(2, 4, queries, 16)), dtype=mx.float32)

    def loss(attend):
        return lambda q, k, v: (attend(q, k, v) * weights).sum()

    def one_call(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")

    def in_blocks(q, k, v):
        return causal_attention_in_blocks(q, k, v, 0.25, block)

    np.testing.assert_allclose(np.array(in_blocks(q, k, v)), np.array(one_call(q, k, v)), atol=1e-5)
    grads = mx.grad(loss(in_blocks), argnums=(0, 1, 2))(q, k, v)
    expected = mx.grad(loss(one_call), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", grads, expected):
        np.testing.assert_allclose(np.array(g), np.array(e), atol=1e-5, err_msg=name)
