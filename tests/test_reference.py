"""Our Mixtral against implementations no one here wrote: transformers and mlx-lm.

Tolerance: 1e-4 absolute on logits in float32 on the CPU. Both sides compute the same
function in float32; differences come from summation order in matmuls, softmax and the
fused attention kernel, which stay around 1e-6 relative at these sizes.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mixtral_mlx
from conftest import hf_logits, set_rope_v4_style, write_hf_model

ATOL = 1e-4

CASES = [
    # (seed, overrides) covering GQA ratios 1/2/4, rope theta 1e4/1e6, windows, tying, top-1/top-2
    (0, dict(num_key_value_heads=4)),
    (1, dict(num_key_value_heads=2, rope_theta=1e6)),
    (2, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    (3, dict(num_key_value_heads=2, sliding_window=7)),
    (4, dict(num_key_value_heads=1, num_experts_per_tok=1, sliding_window=16, rope_theta=1e6)),
    (5, dict(num_key_value_heads=4, num_experts_per_tok=1, num_local_experts=8, tie_word_embeddings=True)),
]


@pytest.mark.parametrize("seed,overrides", CASES)
@pytest.mark.parametrize("dispatch", ["dense", "gather", "grouped"])
def test_logits_match_transformers(tmp_path, seed, overrides, dispatch):
    ref_model = write_hf_model(tmp_path, seed=seed, **overrides)
    ids = np.random.default_rng(seed).integers(0, 97, size=(2, 24))
    model, _ = mixtral_mlx.load(tmp_path)
    model.set_moe_dispatch(dispatch)
    ours = np.array(model(mx.array(ids)))
    np.testing.assert_allclose(ours, hf_logits(ref_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=200, tie_word_embeddings=True)])
def test_long_input_matches_transformers(tmp_path, overrides):
    """200 positions: the CPU's defaults take their fast paths (causal attention in query
    blocks, the grouped dispatch's two-row blocks); a window as long as the input is causal."""
    ref_model = write_hf_model(tmp_path, seed=8, **overrides)
    ids = np.random.default_rng(8).integers(0, 97, size=(2, 200))
    model, _ = mixtral_mlx.load(tmp_path)
    np.testing.assert_allclose(np.array(model(mx.array(ids))), hf_logits(ref_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_theta_read_from_either_spelling(tmp_path, theta):
    ref_model = write_hf_model(tmp_path, rope_theta=theta)
    ids = np.arange(30).reshape(1, 30)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())  # transformers v5 spelling
    v5 = np.array(mixtral_mlx.load(tmp_path)[0](mx.array(ids)))
    set_rope_v4_style(tmp_path)
    model, _ = mixtral_mlx.load(tmp_path)
    assert model.args.rope_theta == theta
    v4 = np.array(model(mx.array(ids)))
    np.testing.assert_array_equal(v4, v5)
    np.testing.assert_allclose(v4, hf_logits(ref_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=5, tie_word_embeddings=True)])
def test_our_checkpoint_loads_in_transformers(tmp_path, overrides):
    from transformers import MixtralForCausalLM

    write_hf_model(tmp_path / "ref", seed=7, **overrides)
    model, _ = mixtral_mlx.load(tmp_path / "ref")
    mixtral_mlx.save(model, None, tmp_path / "ours")
    reloaded = MixtralForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = np.random.default_rng(0).integers(0, 97, size=(1, 20))
    np.testing.assert_allclose(hf_logits(reloaded, ids), np.array(model(mx.array(ids))), atol=ATOL, rtol=0)


def _mlx_lm_logits(directory, ids):
    from mlx_lm import load as mlx_lm_load

    model, _ = mlx_lm_load(str(directory))
    return np.array(model(mx.array(ids)))


def test_mlx_lm_reads_what_we_save(tmp_path):
    """Where its features allow (no sliding window), mlx-lm agrees with us on our checkpoint."""
    write_hf_model(tmp_path / "ref", seed=11, rope_theta=1e4)
    model, _ = mixtral_mlx.load(tmp_path / "ref")
    mixtral_mlx.save(model, None, tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer_config.json").write_text("{}")  # mlx_lm.load wants a tokenizer
    _write_byte_tokenizer(tmp_path / "ours")
    ids = np.random.default_rng(1).integers(0, 97, size=(1, 40))
    np.testing.assert_allclose(_mlx_lm_logits(tmp_path / "ours", ids), np.array(model(mx.array(ids))), atol=ATOL, rtol=0)


def test_where_mlx_lm_differs_sliding_window(tmp_path):
    """mlx-lm's Mixtral ignores `sliding_window`: past the window it attends to everything.

    transformers masks keys more than `window - 1` positions back, as Mixtral's config asks,
    and so do we; mlx-lm's logits then differ from the reference while ours match it.
    """
    ref_model = write_hf_model(tmp_path / "ref", seed=12, sliding_window=6)
    model, _ = mixtral_mlx.load(tmp_path / "ref")
    mixtral_mlx.save(model, None, tmp_path / "ours")
    _write_byte_tokenizer(tmp_path / "ours")
    ids = np.random.default_rng(2).integers(0, 97, size=(1, 30))
    reference = hf_logits(ref_model, ids)
    np.testing.assert_allclose(np.array(model(mx.array(ids))), reference, atol=ATOL, rtol=0)
    theirs = _mlx_lm_logits(tmp_path / "ours", ids)
    # Within the window every implementation sees the same keys ...
    np.testing.assert_allclose(theirs[:, :6], reference[:, :6], atol=ATOL, rtol=0)
    # ... beyond it mlx-lm attends to keys the model was configured never to see.
    assert np.abs(theirs[:, 6:] - reference[:, 6:]).max() > 1e-2


def _write_byte_tokenizer(directory):
    """A minimal Hugging Face tokenizer so mlx_lm.load accepts the directory."""
    from tokenizers import Tokenizer, models

    vocab = {f"<{i}>": i for i in range(97)}
    Tokenizer(models.WordLevel(vocab, unk_token="<0>")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def test_training_steps_match_transformers_with_torch_adamw(tmp_path):
    """Our trainer's steps equal torch's AdamW (bias-corrected, decoupled decay) on transformers' model.

    MLX's AdamW skips Adam's bias correction unless asked; without it the first hundreds
    of steps move the weights 2-6x further than the learning rate says, which at the
    presets' rates collapsed every attention head onto a few positions. Same weights, same
    batches, clipping, no router losses (transformers adds none without labels asking).
    Tolerance: 1e-4 relative on each step's loss, 1e-4 absolute on the final weights;
    float rounding differs between the two gradient computations and Adam divides by
    sqrt(v), so per-step errors stay near 1e-6 and add up over six steps.
    """
    import torch

    from mixtral_mlx.checkpoint import to_hf_weights
    from mixtral_mlx.train import Trainer, TrainConfig

    theirs = write_hf_model(tmp_path, seed=3).train()
    ours, _ = mixtral_mlx.load(tmp_path)
    lr, decay, clip = 3e-3, 0.1, 0.5
    trainer = Trainer(ours, TrainConfig(iters=6, lr=lr, min_lr=lr, warmup=0, weight_decay=decay, grad_clip=clip,
                                        z_loss_coef=0.0, aux_loss_coef=0.0))
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=lr, weight_decay=decay, eps=1e-8)
    rng = np.random.default_rng(0)
    for step in range(6):
        ids = rng.integers(0, theirs.config.vocab_size, size=(4, 33))
        batch = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
                 "mask": np.ones((4, 32), np.float32)}
        result = trainer.train_step([batch])
        logits = theirs(torch.tensor(ids[:, :-1])).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(ids[:, 1:]).flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        assert result.loss == pytest.approx(loss.item(), rel=1e-4), step
    expected = {name: p.detach().numpy() for name, p in theirs.state_dict().items()}
    compared = 0
    for name, value in to_hf_weights(ours).items():
        if name in expected:  # transformers v5 fuses the experts' weights under other names
            np.testing.assert_allclose(np.array(value), expected[name], atol=1e-4, err_msg=name)
            compared += 1
    assert compared >= 10
