"""The NumPy one-token step gives the MLX model's logits and leaves the caches as MLX would."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mixtral_mlx import Model, load_preset
from mixtral_mlx.cache import make_cache
from mixtral_mlx.cpu_decode import NumpyDecodeStep, decoder_for, held_bytes, unsupported_reason
from mixtral_mlx.decode import DecodeStep
from mixtral_mlx.generate import GenerationConfig, generate_step
from mixtral_mlx.lora import LoRAConfig, apply_lora
from mixtral_mlx.model import init_weights
from mixtral_mlx.quantize import quantize_model

# float32 throughout: the two paths sum the same products in different orders (BLAS gemv
# against gemm), which moves logits of magnitude ~1 by a few ulps per layer.
ATOL = 1e-5


def model_with(seed: int = 0, **overrides) -> Model:
    args = dataclasses.replace(load_preset("tiny"), **overrides)
    return init_weights(Model(args), seed=seed).eval()


@pytest.mark.parametrize("overrides,rolling", [
    ({}, False),
    ({"sliding_window": 6}, True),  # a ring buffer, wrapped several times
    ({"sliding_window": 6}, False),  # a growing cache, the window applied by position
    ({"tie_word_embeddings": True, "num_key_value_heads": 1}, False),
    ({"num_key_value_heads": 4, "num_experts_per_tok": 1, "rope_theta": 1e6}, False),
])
def test_steps_equal_the_eager_model(overrides, rolling):
    model = model_with(**overrides)
    assert unsupported_reason(model) is None
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(0, 512, size=(1, 5)))
    eager, fast = make_cache(model, rolling=rolling), make_cache(model, rolling=rolling)
    model(prompt, eager)
    model(prompt, fast)
    for cache in eager + fast:
        cache.step = 8  # KVCache grows every 8 positions: the NumPy step hands those tokens to MLX
    step = NumpyDecodeStep(model)
    for i, token in enumerate(rng.integers(0, 512, size=20).tolist()):
        expected = model(mx.array([[token]]), eager)[:, -1]
        got = step(mx.array([[token]]), fast)
        np.testing.assert_allclose(np.array(got), np.array(expected), atol=ATOL, err_msg=f"token {i}")
        assert [c.offset for c in fast] == [c.offset for c in eager]
    # The caches hold what MLX wrote: an MLX forward pass continues from them.
    more = mx.array(rng.integers(0, 512, size=(1, 3)))
    np.testing.assert_allclose(np.array(model(more, fast)), np.array(model(more, eager)), atol=ATOL)


@pytest.mark.parametrize("window,prompt_length", [(8, 10), (None, 250)])  # the second grows its caches at 256
def test_generation_matches_the_compiled_mlx_step(monkeypatch, window, prompt_length):
    """Greedy decoding on the NumPy step (argmax and log-softmax in NumPy too) against the MLX step."""
    model = model_with(sliding_window=window)
    prompt = [3 + i % 500 for i in range(prompt_length)]
    config = GenerationConfig(mode="greedy")
    fast = [(t, np.array(lp)) for t, lp in generate_step(model, prompt, config, limit=24)]
    monkeypatch.setenv("MIXTRAL_MLX_DECODE", "mlx")
    assert isinstance(decoder_for(model), DecodeStep)
    slow = [(t, np.array(lp)) for t, lp in generate_step(model, prompt, config, limit=24)]
    assert [t for t, _ in fast] == [t for t, _ in slow]
    for (_, a), (_, b) in zip(fast, slow):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_several_sequences_take_the_mlx_step():
    model = model_with()
    prompt = mx.array([[1, 2, 3], [4, 5, 6]])
    eager, fast = make_cache(model), make_cache(model)
    model(prompt, eager)
    model(prompt, fast)
    tokens = mx.array([[7], [8]])
    np.testing.assert_allclose(np.array(NumpyDecodeStep(model)(tokens, fast)),
                               np.array(model(tokens, eager)[:, -1]), atol=ATOL)


def test_is_kept_with_the_model_until_its_weights_change():
    model = model_with()
    before = decoder_for(model)
    assert decoder_for(model) is before
    model.update(model_with(seed=1).parameters())
    assert not before.is_current()
    prompt, token = mx.array([[1, 2, 3]]), mx.array([[4]])
    eager, fast = make_cache(model), make_cache(model)
    model(prompt, eager)
    model(prompt, fast)
    np.testing.assert_allclose(np.array(decoder_for(model)(token, fast)), np.array(model(token, eager)[:, -1]),
                               atol=ATOL)
    assert decoder_for(model) is not before


@pytest.mark.parametrize("tied", [False, True])
def test_counts_the_bytes_it_holds(tied):
    model = model_with(tie_word_embeddings=tied)
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    assert held_bytes(model) == 0
    decoder_for(model)
    assert held_bytes(model) == weights  # one copy of every weight; a tied embedding once


def test_a_training_step_drops_the_copies():
    from mixtral_mlx.train import TrainConfig, Trainer

    model = model_with()
    decoder_for(model)
    assert held_bytes(model) > 0
    trainer = Trainer(model, TrainConfig(preset="tiny", batch_size=2, seq_len=8, iters=10).validate())
    ids = np.arange(18, dtype=np.int32).reshape(2, 9)
    trainer.train_step([{"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": np.ones((2, 8), np.float32)}])
    assert held_bytes(model) == 0


def test_keeps_no_replaced_weights_alive():
    model = model_with()
    decoder_for(model)
    mx.eval(model.parameters())
    before = mx.get_active_memory()
    model.update(model_with(seed=1).parameters())
    mx.eval(model.parameters())
    assert mx.get_active_memory() <= before  # the first weights were freed


@pytest.mark.parametrize("change,reason", [
    (lambda m: apply_lora(m, LoRAConfig()), "LoRALinear"),
    (lambda m: quantize_model(m, bits=8), "Quantized"),
    (lambda m: m.set_dtype(mx.bfloat16), "bfloat16"),
])
def test_other_models_take_the_mlx_step(change, reason):
    model = model_with()
    change(model)
    assert reason in unsupported_reason(model)
    assert isinstance(decoder_for(model), DecodeStep)
