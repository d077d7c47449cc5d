"""The sparse MoE block: every dispatch computes the same function and gradients; router losses."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
import numpy as np
import pytest

from mixtral_mlx import Model, load_preset
from mixtral_mlx.model import init_weights
from mixtral_mlx.moe import (SparseMoeBlock, default_max_block, group_block_size, group_by_expert, load_balancing_loss,
                             router_z_loss, scatter_gates)


def block(top_k=2, experts=4, seed=0):
    mx.random.seed(seed)
    args = load_preset("tiny")
    args.num_local_experts, args.num_experts_per_tok = experts, top_k
    return SparseMoeBlock(args)


# Token counts span one-row blocks (decoding) and blocks of 2 to 32 rows.
@pytest.mark.parametrize("top_k,experts,tokens", [(1, 4, 5), (2, 4, 7), (2, 8, 100), (3, 8, 40), (2, 4, 600),
                                                  (1, 2, 2100)])
@pytest.mark.parametrize("dispatch", ["gather", "grouped"])
def test_dispatches_agree_with_dense(top_k, experts, tokens, dispatch):
    moe = block(top_k, experts)
    x = mx.random.normal((1, tokens, 64))
    moe.dispatch = "dense"
    dense, logits_d = moe(x)
    moe.dispatch = dispatch
    other, logits_o = moe(x)
    np.testing.assert_allclose(np.array(dense), np.array(other), atol=1e-5)
    np.testing.assert_array_equal(np.array(logits_d), np.array(logits_o))


@pytest.mark.parametrize("seq_len", [3, 33])  # one-row and two-row blocks
def test_gradients_agree_between_dispatches(seq_len):
    model = init_weights(Model(load_preset("tiny")), seed=3)
    ids = mx.array(np.random.default_rng(0).integers(0, 512, size=(2, seq_len)))

    def loss(inputs, targets):
        return nn.losses.cross_entropy(model(inputs), targets).mean()

    grads = {}
    for dispatch in ("dense", "gather", "grouped"):
        model.set_moe_dispatch(dispatch)
        grads[dispatch] = dict(tree_flatten(nn.value_and_grad(model, loss)(ids[:, :-1], ids[:, 1:])[1]))
    for dispatch in ("gather", "grouped"):
        for name, g in grads["dense"].items():
            np.testing.assert_allclose(np.array(g), np.array(grads[dispatch][name]), atol=1e-5,
                                       err_msg=f"{dispatch}: {name}")


@pytest.mark.parametrize("skew", [False, True])
def test_groups_hold_each_pair_once_in_single_expert_blocks(skew):
    E, block = 4, 8
    rng = np.random.default_rng(1)
    # skewed: nearly everything on expert 2, experts 0 and 3 unused (the worst padding)
    choices = rng.choice([1, 2], size=(50, 2), p=[0.1, 0.9]) if skew else rng.integers(0, E, size=(50, 2))
    choices[:, 1] = np.where(choices[:, 0] == choices[:, 1], (choices[:, 1] + 1) % E, choices[:, 1])
    groups = group_by_expert(mx.array(choices), E, block)
    row, pair, expert = (np.array(a) for a in groups)
    pairs = choices.size
    assert len(pair) == (pairs + E * (block - 1)) // block * block  # the static bound
    assert sorted(row.tolist()) == sorted(set(row.tolist()))  # no two pairs share a row
    np.testing.assert_array_equal(pair[row], np.arange(pairs))
    assert (np.diff(expert) >= 0).all()
    for r, p in enumerate(pair):
        if p < pairs:  # a real pair sits in a block of its own expert
            assert expert[r // block] == choices.reshape(-1)[p]


def test_block_size_keeps_padding_within_an_eighth_of_the_pairs():
    assert group_block_size(2, 8, 32) == 1  # decoding one token: no pad rows
    assert group_block_size(63, 8, 32) == 1
    assert group_block_size(64, 8, 32) == 2
    assert group_block_size(200, 8, 32) == 4
    assert group_block_size(1024, 8, 32) == 16
    assert group_block_size(4096, 8, 32) == 32  # the small preset's training batch: 248 pad rows at most
    assert group_block_size(10**6, 8, 32) == 32
    assert group_block_size(10**6, 8, 2) == 2
    for pairs in (8, 100, 1000, 5000, 20000):
        for experts in (2, 8, 64):
            b = group_block_size(pairs, experts)
            assert b == 1 or experts * (b - 1) <= pairs // 8


def test_block_size_follows_the_blas_kernels(monkeypatch):
    from mixtral_mlx import blas

    monkeypatch.setattr(blas, "core", lambda: "Cooperlake")
    monkeypatch.setattr(blas, "threads", lambda: 1)  # a training step's CPU streams: one thread a matmul
    assert default_max_block(256, 512) == 4  # small-matrix kernels: 4 x 256 x 512 <= 100^3, 8 rows are past it
    assert default_max_block(64, 128) == 64  # ... which take up to 122 rows here
    assert default_max_block(1024, 3584) == 32  # too large for them at any block: packed, so larger blocks pay
    assert group_block_size(4096, 8, default_max_block(256, 512)) == 4
    assert default_max_block(256, 512, threads=2) == 32  # the packed path splits a block across threads
    monkeypatch.setattr(blas, "core", lambda: "Haswell")
    assert default_max_block(256, 512) == 32
    monkeypatch.setattr(blas, "core", lambda: None)  # no OpenBLAS
    assert default_max_block(256, 512) == 32


def test_small_matrix_kernels_take_fewer_rows_through_a_transposed_weight(monkeypatch):
    from mixtral_mlx import blas

    monkeypatch.setattr(blas, "core", lambda: "Cooperlake")
    assert blas.small_matrix_kernel_takes(4, 512, 256) and not blas.small_matrix_kernel_takes(8, 512, 256)
    assert blas.small_matrix_kernel_takes(2, 512, 256, transposed=True)
    assert not blas.small_matrix_kernel_takes(4, 512, 256, transposed=True)
    assert blas.small_matrix_kernel_takes(4, 256, 512, transposed=True)
    monkeypatch.setattr(blas, "core", lambda: "Haswell")
    assert not blas.small_matrix_kernel_takes(2, 8, 8)


@pytest.mark.parametrize("rows, out_dims, in_dims", [(4, 48, 16), (1, 48, 16), (4, 16, 48)])
def test_expert_matmul_through_a_weight_copy_equals_gather_mm(monkeypatch, rows, out_dims, in_dims):
    """The (in, out) copy path: same products and gradients as gather_mm on the weight as stored."""
    from mixtral_mlx import blas, moe as moe_module

    monkeypatch.setattr(blas, "SMALL_MATRIX_MN_TRANSPOSED", 64)  # so these small shapes take the copy path
    monkeypatch.setattr(blas, "core", lambda: "Cooperlake")
    copies = moe_module._weight_copy_pays(rows, out_dims, in_dims)
    assert copies == (rows * out_dims > 64 and mx.default_device() == mx.cpu)  # a CPU path only
    E, blocks = 3, 7
    x = mx.random.normal((blocks, rows, in_dims))
    weight = mx.random.normal((E, out_dims, in_dims))
    indices = mx.sort(mx.random.randint(0, E, (blocks,))).astype(mx.uint32)
    cot = mx.random.normal((blocks, rows, out_dims))

    def ours(x, w):
        return moe_module.expert_matmul(x, w, indices, sorted_indices=True)

    def reference(x, w):
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices)

    (y,), grads = mx.vjp(ours, [x, weight], [cot])
    (y_ref,), grads_ref = mx.vjp(reference, [x, weight], [cot])
    compiled = mx.compile(mx.grad(lambda x, w: (ours(x, w) * cot).sum(), argnums=(0, 1)))(x, weight)
    # float32 sums of up to 48 products, in another order: 1e-5
    np.testing.assert_allclose(np.array(y), np.array(y_ref), atol=1e-5)
    for g, g_compiled, g_ref in zip(grads, compiled, grads_ref):
        np.testing.assert_allclose(np.array(g), np.array(g_ref), atol=1e-5)
        np.testing.assert_allclose(np.array(g_compiled), np.array(g_ref), atol=1e-5)


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


def test_masked_router_losses_equal_transformers_and_ignore_padding():
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(1)
    layers = [rng.normal(size=(3 * 8, 8)).astype(np.float32) for _ in range(2)]  # batch 3 x 8 positions
    mask = (np.arange(8)[None] < np.array([[8], [5], [2]])).astype(np.float32)
    ours = load_balancing_loss([mx.array(x) for x in layers], top_k=2, mask=mx.array(mask)).item()
    theirs = load_balancing_loss_func(tuple(torch.tensor(x) for x in layers), num_experts=8, top_k=2,
                                      attention_mask=torch.tensor(mask)).item()
    assert ours == pytest.approx(theirs, rel=1e-5)
    # What padding holds changes nothing.
    noisy = [x.copy() for x in layers]
    for x in noisy:
        x[mask.reshape(-1) == 0] = rng.normal(size=(int((mask == 0).sum()), 8)) * 10
    for loss in (lambda ls, m: load_balancing_loss(ls, top_k=2, mask=m), lambda ls, m: router_z_loss(ls, mask=m)):
        a = loss([mx.array(x) for x in layers], mx.array(mask)).item()
        assert loss([mx.array(x) for x in noisy], mx.array(mask)).item() == pytest.approx(a, rel=1e-6)
    kept = np.concatenate([x[mask.reshape(-1) == 1] for x in layers])
    assert router_z_loss([mx.array(x) for x in layers], mx.array(mask)).item() == pytest.approx(
        router_z_loss(mx.array(kept)).item(), rel=1e-6)


def test_load_balancing_loss_is_top_k_when_perfectly_balanced():
    # uniform router: every expert gets 1/E of each slot's tokens and mean prob 1/E -> loss = k
    logits = mx.array(np.tile(np.eye(4, dtype=np.float32) * 1e-3, (25, 1)))
    assert load_balancing_loss(logits, top_k=2).item() == pytest.approx(2.0, rel=1e-2)


def test_z_loss():
    logits = mx.array([[0.0, 0.0], [1.0, 3.0]])
    expected = np.mean([np.log(2) ** 2, np.log(np.exp(1) + np.exp(3)) ** 2])
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)
