"""Cached decoding gives the full forward's logits, with the plain and the rolling cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mixtral_mlx import Model, load_preset
from mixtral_mlx.attention import attention_mask
from mixtral_mlx.cache import KVCache, RollingKVCache, make_cache
from mixtral_mlx.model import init_weights

ATOL = 1e-4  # float32: cached and uncached paths differ only in summation order


def tiny_model(window=None, seed=0):
    args = load_preset("tiny")
    args.sliding_window = window
    return init_weights(Model(args), seed=seed)


def decode_token_by_token(model, ids, cache, chunks=(1,)):
    """Feed `ids` through the cache in chunks (cycling through the given sizes)."""
    out, pos, i = [], 0, 0
    while pos < ids.shape[1]:
        size = chunks[i % len(chunks)]
        out.append(model(ids[:, pos : pos + size], cache=cache))
        pos, i = pos + size, i + 1
    return np.array(mx.concatenate(out, axis=1))


@pytest.mark.parametrize("window,rolling", [(None, False), (8, False), (8, True)])
def test_cached_decoding_equals_full_forward_over_4x_window(window, rolling):
    model = tiny_model(window)
    ids = mx.array(np.random.default_rng(0).integers(0, 512, size=(2, 40)))  # 5x the window
    full = np.array(model(ids))
    cache = make_cache(model, rolling=rolling)
    np.testing.assert_allclose(decode_token_by_token(model, ids, cache), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunks", [(5,), (3, 1, 11), (16,)])
def test_chunked_prefill_through_rolling_buffer(chunks):
    model = tiny_model(window=8, seed=1)
    ids = mx.array(np.random.default_rng(1).integers(0, 512, size=(1, 45)))
    full = np.array(model(ids))
    got = decode_token_by_token(model, ids, make_cache(model), chunks)
    np.testing.assert_allclose(got, full, atol=ATOL, rtol=0)


def test_rolling_cache_memory_is_flat():
    model = tiny_model(window=8)
    cache = make_cache(model)
    ids = mx.array(np.random.default_rng(2).integers(0, 512, size=(1, 32)))
    sizes = []
    for t in range(32):
        model(ids[:, t : t + 1], cache=cache)
        sizes.append(sum(c.nbytes for c in cache))
    assert sizes[7] == sizes[-1]  # after 1x the window == after 4x
    assert all(c.offset == 32 for c in cache)


def test_plain_cache_grows_in_steps():
    cache = KVCache()
    k = mx.zeros((1, 2, 3, 4))
    keys, _ = cache.update_and_fetch(k, k)
    assert keys.shape[2] == 3 and cache.keys.shape[2] == KVCache.step
    for _ in range(100):
        keys, _ = cache.update_and_fetch(k, k)
    assert keys.shape[2] == 303 and cache.keys.shape[2] == 2 * KVCache.step


def test_rolling_cache_keeps_last_window_in_slot_order():
    cache = RollingKVCache(window=4)
    for chunk in (np.arange(3), np.arange(3, 9), np.arange(9, 10)):  # prefill, prefill, decode
        k = mx.array(chunk, dtype=mx.float32).reshape(1, 1, -1, 1)
        cache.update_and_fetch(k, k)
    # positions 6..9 live in slots p % 4
    assert np.array(cache.keys).ravel().tolist() == [8, 9, 6, 7]


def test_attention_mask_window_semantics():
    mask = np.array(attention_mask(q_len=5, n_keys=5, offset=0, window=3))
    # query i sees keys i-2..i (the last 3 positions, itself included), as in transformers
    expected = np.array([[j <= i and i - j < 3 for j in range(5)] for i in range(5)])
    np.testing.assert_array_equal(mask, expected)
    assert attention_mask(q_len=1, n_keys=3, offset=10, window=3) is None
    assert attention_mask(q_len=4, n_keys=4, offset=0, window=None) == "causal"
