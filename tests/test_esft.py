"""Expert-specialised fine-tuning: scoring, the choice rule, and training only the chosen experts."""

from __future__ import annotations

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mixtral_mlx import UserError
from mixtral_mlx.esft import (ExpertSubset, RoutingStats, accumulate_routing, apply_esft, check_threshold,
                              choose_experts, esft_adapter_config, expert_arrays, route_data)
from mixtral_mlx.lora import fuse_model, load_adapter, save_adapter
from test_lora import IDS, logits, random_batch, tiny_model, train

# One layer, 4 experts, top-2; six tokens, the last one padding. Each row's two largest
# logits pick the experts named in the comment.
ROUTER_LOGITS = np.array([
    [3.0, 2.0, 0.0, -1.0],  # 0, 1
    [2.5, 0.0, 1.0, -2.0],  # 0, 2
    [1.0, 0.5, -1.0, -1.0],  # 0, 1
    [1.5, -3.0, -2.0, 2.0],  # 3, 0
    [-1.0, 2.0, 1.5, 0.0],  # 1, 2
    [-5.0, -5.0, 4.0, 5.0],  # 3, 2: padding, must not count
], np.float32)
MASK = np.array([1, 1, 1, 1, 1, 0], np.float32)


def test_scores_of_a_hand_made_routing():
    counts, gates = accumulate_routing([mx.array(ROUTER_LOGITS)[None]], mx.array(MASK)[None], top_k=2)
    stats = RoutingStats(np.array(counts), np.array(gates), tokens=5, top_k=2)
    # expert 0 is chosen by 4 of the 5 tokens, 1 by 3, 2 by 2, 3 by 1: 10 routings
    np.testing.assert_allclose(stats.scores("token"), [[0.4, 0.3, 0.2, 0.1]])
    probs = np.exp(ROUTER_LOGITS[:5]) / np.exp(ROUTER_LOGITS[:5]).sum(axis=1, keepdims=True)
    chosen = np.zeros_like(probs)
    for t, experts in enumerate([(0, 1), (0, 2), (0, 1), (3, 0), (1, 2)]):
        chosen[t, list(experts)] = 1
    np.testing.assert_allclose(stats.scores("gate"), [(probs * chosen).mean(axis=0)], rtol=1e-5)


@pytest.mark.parametrize("threshold, expected", [
    (0.2, [0]), (0.4, [0]), (0.5, [0, 1]), (0.7, [0, 1]), (0.75, [0, 1, 2]), (0.95, [0, 1, 2, 3])])
def test_the_smallest_set_reaching_the_threshold(threshold, expected):
    assert choose_experts(np.array([[0.4, 0.3, 0.2, 0.1]]), threshold) == [expected]


def test_choice_rule_ties_zeros_and_order():
    scores = np.array([
        [0.25, 0.25, 0.25, 0.25],  # ties: lower ids first
        [0.1, 0.0, 0.6, 0.3],  # highest first, returned sorted
        [0.05, 0.0, 0.0, 0.0],  # sums to less than the threshold: every expert used, never a zero
    ])
    assert choose_experts(scores, 0.3) == [[0, 1], [2], [0]]
    assert choose_experts(scores, 0.8) == [[0, 1, 2, 3], [2, 3], [0]]


def test_thresholds():
    assert check_threshold("token", None) == 0.2 and check_threshold("gate", None) == 0.1
    for bad in (0, -0.1, 1.5):
        with pytest.raises(UserError, match="--esft-threshold"):
            check_threshold("token", bad)
    with pytest.raises(UserError, match="--esft-score"):
        check_threshold("load", None)


def test_route_data_counts_every_real_token_k_times():
    model = tiny_model()
    batch = random_batch(0, batch=2, length=16)
    batch["mask"][1, 10:] = 0
    stats = route_data(model, [batch])
    assert stats.tokens == 26
    np.testing.assert_array_equal(stats.counts.sum(axis=1), [26 * 2] * 2)
    assert np.all(stats.scores("gate").sum(axis=1) <= 1)


# ---------------------------------------------------------------------- training only the chosen experts
CHOSEN = [[1], [0, 2]]


def test_subset_layers_compute_the_same_function():
    model = tiny_model()
    reference = {d: (model.set_moe_dispatch(d), logits(model, IDS))[1] for d in ("dense", "gather")}
    apply_esft(model, CHOSEN)
    assert isinstance(model.layers[0].block_sparse_moe.experts.w1, ExpertSubset)
    for dispatch, expected in reference.items():
        model.set_moe_dispatch(dispatch)
        np.testing.assert_array_equal(logits(model, IDS), expected)


def test_only_the_chosen_experts_train():
    model = tiny_model()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    counts = apply_esft(model, CHOSEN)
    a = model.args
    per_expert = a.hidden_size * a.intermediate_size
    assert counts == {"w1": 3 * per_expert, "w2": 3 * per_expert, "w3": 3 * per_expert}
    train(model, steps=3, weight_decay=0.1)  # decay too must not touch the frozen experts
    after = {k: np.array(v) for k, v in tree_flatten(fuse_model(model).parameters())}
    assert after.keys() == before.keys()
    for name, value in before.items():
        if ".experts." not in name:
            assert np.array_equal(after[name], value), f"{name} changed"
            continue
        layer = int(name.split(".")[2])
        for e in range(a.num_local_experts):
            same = np.array_equal(after[name][e], value[e])
            assert same != (e in CHOSEN[layer]), (name, e, "frozen expert changed" if not same else "did not train")


def test_esft_adapter_round_trip(tmp_path):
    model = tiny_model()
    apply_esft(model, CHOSEN)
    train(model, steps=2)
    arrays = expert_arrays(model)
    assert sorted(arrays) == sorted(f"model.layers.{i}.block_sparse_moe.experts.{e}.{p}.weight"
                                    for i, experts in enumerate(CHOSEN) for e in experts for p in ("w1", "w2", "w3"))
    config = esft_adapter_config(CHOSEN, "token", 0.2, np.full((2, 4), 0.25))
    save_adapter(arrays, config, model, tmp_path)
    loaded = load_adapter(tiny_model(), tmp_path)
    np.testing.assert_array_equal(logits(loaded, IDS), logits(model, IDS))
    with pytest.raises(UserError, match="another base model"):
        load_adapter(tiny_model(num_local_experts=8), tmp_path)
