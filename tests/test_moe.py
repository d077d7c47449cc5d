"""The sparse MoE block: both dispatches compute the same function and gradients; router losses."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
import numpy as np
import pytest

from mixtral_mlx import Model, load_preset
from mixtral_mlx.model import init_weights
from mixtral_mlx.moe import SparseMoeBlock, load_balancing_loss, router_z_loss, scatter_gates


def block(top_k=2, experts=4, seed=0):
    mx.random.seed(seed)
    args = load_preset("tiny")
    args.num_local_experts, args.num_experts_per_tok = experts, top_k
    return SparseMoeBlock(args)


@pytest.mark.parametrize("top_k,experts,tokens", [(1, 4, 5), (2, 4, 7), (2, 8, 100), (3, 8, 40)])
def test_dense_and_gather_agree(top_k, experts, tokens):
    moe = block(top_k, experts)
    x = mx.random.normal((1, tokens, 64))
    moe.dispatch = "dense"
    dense, logits_d = moe(x)
    moe.dispatch = "gather"
    gather, logits_g = moe(x)
    np.testing.assert_allclose(np.array(dense), np.array(gather), atol=1e-5)
    np.testing.assert_array_equal(np.array(logits_d), np.array(logits_g))


def test_gradients_agree_between_dispatches():
    model = init_weights(Model(load_preset("tiny")), seed=3)
    ids = mx.array(np.random.default_rng(0).integers(0, 512, size=(2, 33)))

    def loss(inputs, targets):
        return nn.losses.cross_entropy(model(inputs), targets).mean()

    grads = {}
    for dispatch in ("dense", "gather"):
        model.set_moe_dispatch(dispatch)
        grads[dispatch] = dict(tree_flatten(nn.value_and_grad(model, loss)(ids[:, :-1], ids[:, 1:])[1]))
    for name, g in grads["dense"].items():
        np.testing.assert_allclose(np.array(g), np.array(grads["gather"][name]), atol=1e-5, err_msg=name)


def test_scores_equal_softmax_then_renormalise():
    moe = block(top_k=2)
    x = mx.random.normal((9, 64))
    logits, indices, scores = moe.route(x)
    probs = np.array(mx.softmax(logits, axis=-1))
    top = np.take_along_axis(probs, np.array(indices), axis=-1)
    np.testing.assert_allclose(np.array(scores), top / top.sum(-1, keepdims=True), atol=1e-6)
    gates = np.array(scatter_gates(indices, scores, 4))
    assert (np.count_nonzero(gates, axis=1) == 2).all()
    np.testing.assert_allclose(gates.sum(1), 1, atol=1e-6)


def test_load_balancing_loss_equals_transformers():
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(24, 8)).astype(np.float32) for _ in range(3)]
    ours = load_balancing_loss([mx.array(x) for x in layers], top_k=2).item()
    theirs = load_balancing_loss_func(tuple(torch.tensor(x) for x in layers), num_experts=8, top_k=2).item()
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_load_balancing_loss_is_top_k_when_perfectly_balanced():
    # uniform router: every expert gets 1/E of each slot's tokens and mean prob 1/E -> loss = k
    logits = mx.array(np.tile(np.eye(4, dtype=np.float32) * 1e-3, (25, 1)))
    assert load_balancing_loss(logits, top_k=2).item() == pytest.approx(2.0, rel=1e-2)


def test_z_loss():
    logits = mx.array([[0.0, 0.0], [1.0, 3.0]])
    expected = np.mean([np.log(2) ** 2, np.log(np.exp(1) + np.exp(3)) ** 2])
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
