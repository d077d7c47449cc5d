"""LoRA / DoRA adapters: what trains, every MoE dispatch, fusing, files, mlx-lm, bad adapters."""

from __future__ import annotations

import json

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mixtral_mlx import Model, UserError, load_preset
from mixtral_mlx.lora import (ADAPTER_CONFIG, LoRAConfig, LoRAExpertLinear, LoRALinear, adapter_arrays, apply_lora,
                              fuse_model, load_adapter, lora_adapter_config, save_adapter, trainable_by_target)
from mixtral_mlx.model import init_weights
from mixtral_mlx.train import Trainer, TrainConfig

ATOL = 1e-4  # float32 logits
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "w1", "w2", "w3")
GROUPS = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj"), "router": ("gate",), "experts": ("w1", "w2", "w3")}


def tiny_model(seed: int = 0, **overrides) -> Model:
    import dataclasses

    args = dataclasses.replace(load_preset("tiny"), **overrides)
    return init_weights(Model(args), seed=seed)


def random_batch(seed: int, batch: int = 2, length: int = 24, vocab: int = 512) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": np.ones((batch, length), np.float32)}


def train(model, steps: int = 3, **cfg) -> list[float]:
    trainer = Trainer(model, TrainConfig(**{"lr": 1e-2, "warmup": 0, "iters": steps, "weight_decay": 0.0, **cfg}))
    return [trainer.train_step([random_batch(i)]).loss for i in range(steps)]


def perturb_adapters(model, seed: int = 1, scale: float = 0.05) -> None:
    """Give fresh adapters (whose B is zero) a non-trivial value, so equalities mean something."""
    mx.random.seed(seed)
    model.update(tree_map(lambda p: p + scale * mx.random.normal(p.shape), model.trainable_parameters()))


def base_weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] not in
            ("lora_a", "lora_b", "m")}


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)))


IDS = np.random.default_rng(0).integers(0, 512, (2, 40))


# ---------------------------------------------------------------------- what trains
@pytest.mark.parametrize("group", list(GROUPS))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_training_changes_only_the_adapters(group, dora):
    model = tiny_model()
    before = base_weights(model)
    apply_lora(model, LoRAConfig(targets=GROUPS[group], dora=dora))
    adapters_before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    assert {k.split(".")[-2] for k in adapters_before} == {t for t in GROUPS[group]}
    train(model)
    after = {k.replace(".linear.", "."): v for k, v in base_weights(model).items()}
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert np.array_equal(after[name], value), f"{name} changed"
    for name, value in tree_flatten(model.trainable_parameters()):
        assert not np.array_equal(np.array(value), adapters_before[name]), f"{name} did not train"


def test_every_expert_adapter_trains_when_routed_to():
    """The stacked expert LoRA gives each routed expert its own gradient (no expert is skipped)."""
    model = tiny_model()
    apply_lora(model, LoRAConfig(targets=("w1", "w2", "w3")))
    train(model, steps=2)
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):  # starts at zero: moves only with a gradient
            moved = np.abs(np.array(value)).reshape(value.shape[0], -1).max(axis=1) > 0
            assert moved.all(), (name, moved)


def test_trainable_parameters_per_target():
    model = tiny_model()
    a = model.args
    r, L, E, h, i = 4, a.num_hidden_layers, a.num_local_experts, a.hidden_size, a.intermediate_size
    kv = a.num_key_value_heads * a.head_dim
    counts = apply_lora(model, LoRAConfig(rank=r, targets=ALL_TARGETS))
    assert counts == {
        "q_proj": L * r * (h + a.num_attention_heads * a.head_dim), "k_proj": L * r * (h + kv),
        "v_proj": L * r * (h + kv), "o_proj": L * r * (a.num_attention_heads * a.head_dim + h),
        "gate": L * r * (h + E), "w1": L * E * r * (h + i), "w3": L * E * r * (h + i), "w2": L * E * r * (i + h)}
    assert trainable_by_target(model) == counts


def test_num_layers_adapts_the_last_layers():
    model = tiny_model(num_hidden_layers=3)
    apply_lora(model, LoRAConfig(targets=("q_proj",), num_layers=2))
    assert not isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert all(isinstance(layer.self_attn.q_proj, LoRALinear) for layer in model.layers[1:])


def test_fresh_adapters_change_nothing():
    model = tiny_model()
    reference = logits(model, IDS)
    for dora in (False, True):
        fresh = tiny_model()
        apply_lora(fresh, LoRAConfig(targets=ALL_TARGETS, dora=dora))
        np.testing.assert_allclose(logits(fresh, IDS), reference, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- every MoE dispatch
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dispatches_agree(dora):
    """Logits and adapter gradients agree; short inputs take gather's unsorted path, long ones the sorted,
    and the grouped dispatch one- and two-row blocks."""
    model = tiny_model()
    apply_lora(model, LoRAConfig(targets=("gate", "w1", "w2", "w3"), dora=dora))
    perturb_adapters(model)
    assert isinstance(model.layers[0].block_sparse_moe.experts.w1, LoRAExpertLinear)
    batch = random_batch(3, batch=2, length=40)

    def loss(m):
        import mlx.nn as nn

        out = m(mx.array(batch["inputs"]))
        return nn.losses.cross_entropy(out, mx.array(batch["targets"])).mean()

    results = {}
    for dispatch in ("dense", "gather", "grouped"):
        model.set_moe_dispatch(dispatch)
        short, long = logits(model, IDS[:, :5]), logits(model, IDS)
        import mlx.nn as nn

        grads = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
        results[dispatch] = (short, long, grads)
    s1, l1, g1 = results["dense"]
    for dispatch in ("gather", "grouped"):
        s2, l2, g2 = results[dispatch]
        np.testing.assert_allclose(s1, s2, atol=ATOL, rtol=0, err_msg=dispatch)
        np.testing.assert_allclose(l1, l2, atol=ATOL, rtol=0, err_msg=dispatch)
        for name in g1:
            np.testing.assert_allclose(np.array(g1[name]), np.array(g2[name]), atol=1e-5, rtol=1e-4,
                                       err_msg=f"{dispatch}: {name}")


# ---------------------------------------------------------------------- fusing and files
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fused_equals_unfused(tmp_path, dora):
    model = tiny_model()
    apply_lora(model, LoRAConfig(targets=ALL_TARGETS, dora=dora, rank=4))
    perturb_adapters(model)
    for dispatch in ("dense", "gather", "grouped"):
        model.set_moe_dispatch(dispatch)
        adapted = logits(model, IDS)
        fused = fuse_model(_copy(model, tmp_path, dora))
        fused.set_moe_dispatch(dispatch)
        np.testing.assert_allclose(logits(fused, IDS), adapted, atol=ATOL, rtol=0)
        assert not any(k.endswith(("lora_a", "lora_b", ".m")) for k, _ in tree_flatten(fused.parameters()))


def _copy(model, tmp_path, dora):
    """A second model with the same base and adapter, through the adapter files."""
    directory = tmp_path / "adapter"
    directory.mkdir(exist_ok=True)
    cfg = LoRAConfig(targets=ALL_TARGETS, dora=dora, rank=4)
    save_adapter(adapter_arrays(model), lora_adapter_config(cfg, model), model, directory)
    return load_adapter(tiny_model(), directory)


def test_adapter_files_round_trip(tmp_path):
    model = tiny_model()
    cfg = LoRAConfig(targets=("q_proj", "gate", "w2"), rank=2, alpha=6, num_layers=1)
    apply_lora(model, cfg)
    perturb_adapters(model)
    save_adapter(adapter_arrays(model), lora_adapter_config(cfg, model), model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 1
    assert config["lora_parameters"] == {"rank": 2, "scale": 3.0, "dropout": 0.0, "keys": [
        "self_attn.q_proj", "block_sparse_moe.gate", "block_sparse_moe.switch_mlp.down_proj"]}
    assert config["base_model"]["hidden_size"] == 64
    names = set(mx.load(str(tmp_path / "adapters.safetensors")))
    assert "model.layers.1.block_sparse_moe.switch_mlp.down_proj.lora_a" in names
    assert not any(".0." in n for n in names)  # num_layers=1: the last layer only
    loaded = load_adapter(tiny_model(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, IDS), logits(model, IDS))


@pytest.mark.reference
def test_mlx_lm_loads_our_adapter(tmp_path):
    """mlx-lm's own loader applies our adapter, the experts included, and gets our logits."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model = tiny_model(seed=3)
    mixtral_mlx.save(model, None, tmp_path / "base")
    cfg = LoRAConfig(targets=ALL_TARGETS, rank=4)
    apply_lora(model, cfg)
    perturb_adapters(model)
    save_adapter(adapter_arrays(model), lora_adapter_config(cfg, model), model, tmp_path / "adapter")
    theirs, _ = load_model(tmp_path / "base")
    load_adapters(theirs, str(tmp_path / "adapter"))
    np.testing.assert_allclose(np.array(theirs(mx.array(IDS))), logits(model, IDS), atol=ATOL, rtol=0)


def test_quantized_base_fuses_exactly_when_dequantized(tmp_path):
    """QLoRA: fused with --dequantize gives the logits of the quantized base + adapter."""
    from mixtral_mlx.quantize import quantize_model

    model = quantize_model(tiny_model(), group_size=64, bits=4)
    cfg = LoRAConfig(targets=("q_proj", "gate", "w1", "w2"), rank=4)
    apply_lora(model, cfg)
    perturb_adapters(model)
    adapted = logits(model, IDS)
    save_adapter(adapter_arrays(model), lora_adapter_config(cfg, model), model, tmp_path)
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["quantization"]["bits"] == 4
    reloaded = load_adapter(tiny_model(), tmp_path)  # a float base: quantized again as in training
    np.testing.assert_allclose(logits(reloaded, IDS), adapted, atol=ATOL, rtol=0)
    fused = fuse_model(reloaded, dequantize=True)
    assert fused.args.quantization is None
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(fused.parameters()))
    np.testing.assert_allclose(logits(fused, IDS), adapted, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("settings, field", [
    ({"rank": 0}, "--rank"), ({"rank": -2}, "--rank"), ({"targets": ("q_proj", "mlp")}, "--targets"),
    ({"targets": ()}, "--targets"), ({"alpha": 0}, "--alpha"), ({"dropout": 1.0}, "--dropout"),
    ({"num_layers": 0}, "--num-layers"), ({"num_layers": 5}, "--num-layers")])
def test_bad_settings(settings, field):
    with pytest.raises(UserError) as e:
        apply_lora(tiny_model(), LoRAConfig(**settings))
    assert e.value.field == field


@pytest.mark.parametrize("change", [{"hidden_size": 128}, {"num_local_experts": 8}, {"rope_theta": 1e6}])
def test_adapter_for_another_base_is_refused(tmp_path, change):
    model = tiny_model()
    cfg = LoRAConfig(targets=("q_proj", "w1"))
    apply_lora(model, cfg)
    save_adapter(adapter_arrays(model), lora_adapter_config(cfg, model), model, tmp_path)
    with pytest.raises(UserError, match="another base model") as e:
        load_adapter(tiny_model(**change), tmp_path)
    assert str(tmp_path) in str(e.value)


def test_training_only_settings_may_differ(tmp_path):
    model = tiny_model()
    cfg = LoRAConfig(targets=("q_proj",))
    apply_lora(model, cfg)
    save_adapter(adapter_arrays(model), lora_adapter_config(cfg, model), model, tmp_path)
    load_adapter(tiny_model(router_aux_loss_coef=0.02, router_jitter_noise=0.1), tmp_path)


def test_adapter_with_wrong_shapes_is_refused(tmp_path):
    """Without a recorded base config (as mlx-lm writes them) the tensor shapes are checked."""
    model = tiny_model()
    cfg = LoRAConfig(targets=("w1",))
    apply_lora(model, cfg)
    save_adapter(adapter_arrays(model), lora_adapter_config(cfg, model), model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    del config["base_model"]
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match") as e:
        load_adapter(tiny_model(intermediate_size=96), tmp_path)
    assert "switch_mlp.gate_proj" in e.value.field


def test_missing_adapter_directory(tmp_path):
    with pytest.raises(UserError, match="no such adapter directory"):
        load_adapter(tiny_model(), tmp_path / "nope")
    with pytest.raises(UserError, match="holds no adapter_config.json"):
        load_adapter(tiny_model(), tmp_path)
