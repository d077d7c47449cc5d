"""The compiled decoding step gives the eager model's logits and leaves the caches as it would."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from mixtral_mlx import Model, load_preset
from mixtral_mlx.cache import make_cache
from mixtral_mlx.decode import DecodeStep, decode_step
from mixtral_mlx.model import init_weights


def model_with(seed: int = 0, **overrides) -> Model:
    args = dataclasses.replace(load_preset("tiny"), **overrides)
    return init_weights(Model(args), seed=seed).eval()


def prefilled(model: Model, prompt: mx.array, **kwargs) -> list:
    cache = make_cache(model, **kwargs)
    model(prompt, cache)
    return cache


@pytest.mark.parametrize("window,rolling", [(None, False), (6, True), (6, False)])
@pytest.mark.parametrize("batch", [1, 2])
def test_steps_equal_the_eager_model(window, rolling, batch):
    model = model_with(sliding_window=window)
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(0, 512, size=(batch, 5)))
    feed = mx.array(rng.integers(0, 512, size=(batch, 20)))  # past the window and two capacity steps
    eager, compiled = prefilled(model, prompt, rolling=rolling), prefilled(model, prompt, rolling=rolling)
    for cache in eager + compiled:
        cache.step = 8  # KVCache grows every 8 positions: the step re-traces for each new size
    step = DecodeStep(model)
    for i in range(feed.shape[1]):
        token = feed[:, i : i + 1]
        expected = model(token, eager)[:, -1]
        got = step(token, compiled)
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5, err_msg=f"token {i}")
        assert compiled[0].offset == eager[0].offset
    for a, b in zip(eager, compiled):  # the caches hold the same keys where they are used
        n = min(a.offset, a.keys.shape[2])
        np.testing.assert_allclose(np.array(b.keys[..., :n, :]), np.array(a.keys[..., :n, :]), atol=1e-5)


def test_follows_new_weights():
    model = model_with()
    step = DecodeStep(model)
    prompt, token = mx.array([[1, 2, 3]]), mx.array([[4]])
    step(token, prefilled(model, prompt))  # traced with the first weights
    model.update(model_with(seed=1).parameters())
    expected = model(token, prefilled(model, prompt))[:, -1]
    np.testing.assert_allclose(np.array(step(token, prefilled(model, prompt))), np.array(expected), atol=1e-5)


def test_one_step_per_model():
    model = model_with()
    assert decode_step(model) is decode_step(model)
    assert decode_step(model) is not decode_step(model_with())
