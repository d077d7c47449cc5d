"""Quantization: every linear layer and the experts, exact kernels, round trips with mlx-lm, `convert`."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mixtral_mlx
from conftest import assert_user_error, run_cli, set_rope_v4_style, write_hf_model
from mixtral_mlx.moe import ExpertLinear
from mixtral_mlx.quantize import QuantizedExpertLinear, is_quantized, quantize_model

ATOL = 1e-4


def dequantized_copy(q: QuantizedExpertLinear) -> ExpertLinear:
    E, out = q.weight.shape[:2]
    layer = ExpertLinear(E, q.scales.shape[-1] * q.group_size, out)
    layer.weight = mx.dequantize(q.weight, q.scales, q.biases, q.group_size, q.bits)
    return layer


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 2, 12])  # quantized kernels, then dequantize-first on the CPU
def test_quantized_experts_compute_what_their_dequantized_weights_do(bits, rows):
    mx.random.seed(0)
    q = QuantizedExpertLinear.from_float(ExpertLinear(4, 128, 96), group_size=64, bits=bits)
    ref = dequantized_copy(q)
    x = mx.random.normal((rows, 128))
    h, gates = mx.random.normal((rows, 4, 128)), mx.random.uniform(shape=(rows, 4))
    indices = mx.array(np.random.default_rng(0).integers(0, 4, size=(rows, 2)))
    for ours, theirs in [(q.all_experts(x), ref.all_experts(x)), (q.combine(h, gates), ref.combine(h, gates)),
                         (q.gather(x[:, None, None], indices), ref.gather(x[:, None, None], indices))]:
        np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-4, rtol=1e-4)


def tiny_model(**overrides):
    args = mixtral_mlx.load_preset("tiny")
    for k, v in overrides.items():
        setattr(args, k, v)
    from mixtral_mlx.model import init_weights

    model = init_weights(mixtral_mlx.Model(args), seed=0)
    model.eval()
    mx.eval(model.parameters())
    return model


def test_every_linear_layer_embedding_and_expert_is_quantized():
    model = quantize_model(tiny_model(), group_size=64, bits=4)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert not kinds & {"Linear", "Embedding", "ExpertLinear"}, kinds
    assert {"QuantizedLinear", "QuantizedEmbedding", "QuantizedExpertLinear"} <= kinds
    assert model.args.quantization == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert is_quantized(model)


def test_quantized_logits_stay_close_and_the_dispatches_agree():
    ids = mx.array(np.random.default_rng(0).integers(0, 512, size=(1, 48)))
    reference = np.array(tiny_model()(ids))
    for bits, bound in [(8, 0.02), (4, 0.3)]:
        model = quantize_model(tiny_model(), group_size=64, bits=bits)
        outputs = {}
        for dispatch in ("dense", "gather", "grouped"):
            model.set_moe_dispatch(dispatch)
            outputs[dispatch] = np.array(model(ids))
        np.testing.assert_allclose(outputs["dense"], outputs["gather"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(outputs["dense"], outputs["grouped"], atol=ATOL, rtol=0)
        assert np.abs(outputs["dense"] - reference).max() < bound


def test_layers_that_do_not_divide_into_groups_stay_float_and_round_trip(tmp_path):
    # intermediate 96: w2's input does not divide into groups of 64; per-layer overrides keep the router float
    model = tiny_model(intermediate_size=96)
    quantize_model(model, group_size=64, bits=8, **{"model.layers.0.block_sparse_moe.gate": False,
                                                    "model.layers.1.self_attn.q_proj": {"bits": 4}})
    layer0, layer1 = model.layers
    assert isinstance(layer0.block_sparse_moe.experts.w2, ExpertLinear)
    assert isinstance(layer0.block_sparse_moe.gate, nn.Linear)
    assert layer1.self_attn.q_proj.bits == 4 and layer1.self_attn.k_proj.bits == 8
    mixtral_mlx.save(model, None, tmp_path / "q")
    reloaded, _ = mixtral_mlx.load(tmp_path / "q")
    ids = mx.array([[1, 5, 9, 200, 3, 77]])
    np.testing.assert_array_equal(np.array(reloaded(ids)), np.array(model(ids)))


def _mlx_lm_model(directory):
    from mlx_lm.utils import load_model

    return load_model(directory)


def test_mlx_lm_reads_our_quantized_checkpoint(tmp_path):
    write_hf_model(tmp_path / "hf", seed=1)
    model, _ = mixtral_mlx.load(tmp_path / "hf")
    quantize_model(model, group_size=32, bits=4)
    mixtral_mlx.save(model, None, tmp_path / "q")
    theirs, config = _mlx_lm_model(tmp_path / "q")
    assert config["quantization"]["bits"] == 4
    ids = mx.array(np.random.default_rng(1).integers(0, 97, size=(1, 30)))
    np.testing.assert_allclose(np.array(theirs(ids)), np.array(model(ids)), atol=ATOL, rtol=0)


def test_we_read_mlx_lm_quantized_checkpoints(tmp_path):
    from mlx_lm.utils import quantize_model as mlx_lm_quantize
    from mlx_lm.utils import save_config, save_model

    write_hf_model(tmp_path / "hf", seed=2)
    set_rope_v4_style(tmp_path / "hf")  # mlx-lm reads only the top-level rope_theta
    theirs, config = _mlx_lm_model(tmp_path / "hf")
    theirs, config = mlx_lm_quantize(theirs, config, group_size=64, bits=8)
    save_model(tmp_path / "q", theirs)
    save_config(config, tmp_path / "q" / "config.json")
    ours, _ = mixtral_mlx.load(tmp_path / "q")
    assert is_quantized(ours)
    ids = mx.array(np.random.default_rng(2).integers(0, 97, size=(1, 30)))
    np.testing.assert_allclose(np.array(ours(ids)), np.array(theirs(ids)), atol=ATOL, rtol=0)


def test_cli_convert_quantizes_and_generate_runs_it(tmp_path, sp_model):
    write_hf_model(tmp_path / "hf", seed=3, vocab_size=384, intermediate_size=128)
    shutil.copy(sp_model, tmp_path / "hf" / "tokenizer.model")
    result = run_cli("convert", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "q4"), "--quantize", "4")
    assert result.returncode == 0, result.stderr
    assert "4-bit" in result.stdout
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert (tmp_path / "q4" / "model.safetensors").stat().st_size < (tmp_path / "hf" / "model.safetensors").stat().st_size / 4

    quantized, tokenizer = mixtral_mlx.load(tmp_path / "q4")
    expected = mixtral_mlx.generate(quantized, tokenizer, "To be or not", mode="greedy", max_tokens=12)
    run = run_cli("generate", "--model", str(tmp_path / "q4"), "--prompt", "To be or not", "--mode", "greedy",
                  "--max-tokens", "12", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["tokens"] == expected.tokens

    again = run_cli("convert", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "q4"), "--quantize", "8")
    assert_user_error(again, "--out", "already exists")
    twice = run_cli("convert", "--model", str(tmp_path / "q4"), "--out", str(tmp_path / "qq"), "--quantize", "4")
    assert_user_error(twice, "already quantized")
    assert not (tmp_path / "qq").exists()


def test_cli_convert_hf_repo_downloads_once_through_huggingface_hub(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from mixtral_mlx import cli

    write_hf_model(tmp_path / "hf", seed=4)
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("allow_patterns")))
        return str(tmp_path / "hf")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert cli.main(["convert", "--hf", "someone/tiny-mixtral", "--out", str(tmp_path / "q8"), "--quantize", "8"]) == 0
    assert [repo for repo, _ in calls] == ["someone/tiny-mixtral"] and "*.safetensors" in calls[0][1]
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    assert "8-bit" in capsys.readouterr().out


def test_large_weights_stay_packed_on_the_cpu(monkeypatch):
    """Above the byte budget a long input runs the quantized kernel instead of dequantizing."""
    import mixtral_mlx.quantize as quantize

    if mx.default_device() != mx.cpu:
        pytest.skip("the dequantize-first path is the CPU's")
    calls = []
    real = mx.quantized_matmul
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = quantize.QuantizedLinear.from_linear(nn.Linear(128, 64, bias=False), group_size=64, bits=4)
    x = mx.random.normal((16, 128))
    expected = x @ mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4).T
    np.testing.assert_allclose(np.array(layer(x)), np.array(expected), atol=1e-5)
    assert calls == []
    monkeypatch.setattr(quantize, "DEQUANTIZE_MAX_BYTES", 1024)
    np.testing.assert_allclose(np.array(layer(x)), np.array(expected), atol=1e-4)
    assert calls == [1]
