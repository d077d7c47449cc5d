"""HF-format checkpoints: layouts we read, atomic writes, errors that name the tensor."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

import mixtral_mlx
from mixtral_mlx import Model, load_preset
from mixtral_mlx.checkpoint import atomic_directory, read_weights, resolve
from mixtral_mlx.errors import UserError
from mixtral_mlx.model import init_weights
from conftest import write_hf_model


def tiny(seed=0):
    return init_weights(Model(load_preset("tiny")), seed=seed)


def logits(model, n=12):
    return np.array(model(mx.arange(n).reshape(1, n)))


def test_save_load_round_trip(tmp_path):
    model = tiny()
    mixtral_mlx.save(model, None, tmp_path / "m")
    names = set(mx.load(str(tmp_path / "m" / "model.safetensors")))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    again, tokenizer = mixtral_mlx.load(tmp_path / "m")
    assert tokenizer is None
    np.testing.assert_array_equal(logits(again), logits(model))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    model = tiny()
    mixtral_mlx.save(model, None, tmp_path / "m", dtype=dtype)
    weights = mx.load(str(tmp_path / "m" / "model.safetensors"))
    assert {str(v.dtype) for v in weights.values()} == {f"mlx.core.{dtype}"}
    again = mixtral_mlx.load(tmp_path / "m", dtype="float32")[0]
    np.testing.assert_allclose(logits(again), logits(model), atol=0.05)  # rounding of the weights only


def test_sharded_checkpoint_with_index(tmp_path):
    from transformers import MixtralForCausalLM

    ref = write_hf_model(tmp_path / "one")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a = mixtral_mlx.load(tmp_path / "one")[0]
    b = mixtral_mlx.load(tmp_path / "sharded")[0]
    np.testing.assert_array_equal(logits(a), logits(b))
    assert isinstance(ref, MixtralForCausalLM)


def test_reads_mlx_lm_layout(tmp_path):
    """mlx-lm stores stacked experts as switch_mlp.{gate,up,down}_proj."""
    model = tiny()
    mixtral_mlx.save(model, None, tmp_path / "m")
    weights = mx.load(str(tmp_path / "m" / "model.safetensors"))
    renamed = {}
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            renamed[f"{prefix}.switch_mlp.{theirs}.weight"] = mx.stack(
                [weights.pop(f"{prefix}.experts.{e}.{ours}.weight") for e in range(4)])
    mx.save_safetensors(str(tmp_path / "m" / "model.safetensors"), {**weights, **renamed})
    np.testing.assert_array_equal(logits(mixtral_mlx.load(tmp_path / "m")[0]), logits(model))


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    mixtral_mlx.save(tiny(), None, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    weights = mx.load(str(path))
    del weights["model.layers.0.self_attn.q_proj.weight"]
    mx.save_safetensors(str(path), weights)
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_proj.weight: tensor is missing"):
        mixtral_mlx.load(tmp_path / "m")
    weights["model.layers.0.self_attn.q_proj.weight"] = mx.zeros((3, 3))
    mx.save_safetensors(str(path), weights)
    with pytest.raises(UserError, match=r"q_proj.weight: shape \(3, 3\) does not match"):
        mixtral_mlx.load(tmp_path / "m")


def test_truncated_safetensors(tmp_path):
    mixtral_mlx.save(tiny(), None, tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(UserError, match="model.safetensors: corrupt or truncated"):
        read_weights(tmp_path / "m")


def test_atomic_directory_keeps_old_on_failure(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(OSError):
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("half-written")
            raise OSError("disk full")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_resolve_downloads_repo_ids(tmp_path, monkeypatch):
    """A Hub repo id goes through huggingface_hub.snapshot_download (replaced: no network here)."""
    import huggingface_hub

    write_hf_model(tmp_path / "snap")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert resolve("mistralai/Mixtral-8x7B-v0.1") == tmp_path / "snap"
    assert calls[0][0] == "mistralai/Mixtral-8x7B-v0.1" and "*.safetensors" in calls[0][1]
    with pytest.raises(UserError, match="no such model directory"):
        resolve(tmp_path / "nope")
