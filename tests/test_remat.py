"""Recomputation in the backward pass: the same gradients, less memory kept."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mixtral_mlx.remat import recompute_in_backward


def piece(x, w):
    return mx.tanh(x @ w) * mx.sigmoid(x)


@pytest.mark.parametrize("compiled", [False, True])
def test_gradients_equal_the_plain_function(compiled):
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(size=(64, 32)), dtype=mx.float32)
    w = mx.array(rng.normal(size=(32, 32)) / 6, dtype=mx.float32)

    def loss(fun):
        def f(x, w):
            return (fun(fun(x, w), w) ** 2).sum()

        grad = mx.grad(f, argnums=(0, 1))
        return mx.compile(grad) if compiled else grad

    expected = loss(piece)(x, w)
    got = loss(recompute_in_backward(piece))(x, w)
    for name, g, e in zip("xw", got, expected):
        # The same operations on the same inputs: equal up to how compile fuses them.
        np.testing.assert_allclose(np.array(g), np.array(e), rtol=1e-6, atol=1e-6, err_msg=name)


def test_compiled_backward_keeps_only_the_inputs():
    # Eight pieces, each keeping tanh and sigmoid (two 4 MiB arrays) for autograd; recomputed,
    # only each piece's input stays until the backward pass reaches it.
    x = mx.random.normal((1024, 1024))
    w = mx.eye(1024)
    mx.eval(x, w)

    def peak(fun):
        def f(x):
            for _ in range(8):
                x = fun(x, w)
            return x.sum()

        grad = mx.compile(mx.grad(f))
        mx.eval(grad(x))  # compile once, then measure
        mx.reset_peak_memory()
        mx.eval(grad(x))
        return mx.get_peak_memory()

    plain, recomputed = peak(piece), peak(recompute_in_backward(piece))
    assert recomputed < plain - 16 * 2**20, (plain / 2**20, recomputed / 2**20)
