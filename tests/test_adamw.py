"""StreamAdamW equals MLX's clipped AdamW: bit for bit in one part, to float rounding in several."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mixtral_mlx.adamw import StreamAdamW, balanced_parts


def _params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"embed": (50, 8), "layers": [{"w": (8, 8), "b": (8,)}, {"w": (8, 16), "b": (16,)}], "head": (50, 8)}
    return tree_map(lambda s: mx.array(rng.normal(size=s), dtype=mx.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))


def _schedule():
    return optim.join_schedules([optim.linear_schedule(0.0, 1e-2, 2), optim.cosine_decay(1e-2, 5, 1e-3)], [2])


def _mlx_steps(params, grads_seq, clip):
    opt = optim.AdamW(learning_rate=_schedule(), weight_decay=0.1, bias_correction=True)
    opt.init(params)
    for grads in grads_seq:
        grads, norm = optim.clip_grad_norm(grads, clip)
        params = opt.apply_gradients(grads, params)
    return params, opt.state, norm


def _ours(params, grads_seq, clip, streams):
    opt = optim.AdamW(learning_rate=_schedule(), weight_decay=0.1, bias_correction=True)
    opt.init(params)
    update = StreamAdamW(opt, _schedule(), clip, params, streams)
    for grads in grads_seq:
        params, norm = update(grads, params)
    return params, opt.state, norm


@pytest.mark.parametrize("clip", [1.0, 100.0])  # clipping in effect, and not
def test_one_part_is_mlx_adamw_bit_for_bit(clip):
    params = _params(0)
    grads_seq = [_params(s + 1) for s in range(4)]
    expected = _mlx_steps(params, grads_seq, clip)
    got = _ours(params, grads_seq, clip, [mx.default_stream(mx.default_device())])
    expected_arrays, got_arrays = dict(tree_flatten(expected[:2])), dict(tree_flatten(got[:2]))
    assert got_arrays.keys() == expected_arrays.keys()  # parameters, step, learning rate, each m and v
    for name, e in expected_arrays.items():
        np.testing.assert_array_equal(np.array(got_arrays[name]), np.array(e), err_msg=name)
    assert got[2].item() == expected[2].item()


def test_parts_on_streams_equal_mlx_adamw():
    params = _params(0)
    grads_seq = [_params(s + 1) for s in range(4)]
    expected = _mlx_steps(params, grads_seq, 1.0)
    streams = [mx.new_stream(mx.cpu) for _ in range(3)]
    got = _ours(params, grads_seq, 1.0, streams)
    # Only the order in which the parts' squared norms are added differs: float32 rounding.
    expected_arrays, got_arrays = dict(tree_flatten(expected[:2])), dict(tree_flatten(got[:2]))
    assert got_arrays.keys() == expected_arrays.keys()
    for name, e in expected_arrays.items():
        np.testing.assert_allclose(np.array(got_arrays[name]), np.array(e), rtol=1e-5, atol=1e-7, err_msg=name)


def test_balanced_parts_split_by_size_and_keep_order():
    params = {"a": mx.zeros((100,)), "b": mx.zeros((10,)), "c": mx.zeros((90,)), "d": mx.zeros((5,))}
    parts = balanced_parts(params, 2)
    assert parts == [["a", "d"], ["b", "c"]]  # 105 and 100
    assert balanced_parts(params, 9) == [["a"], ["c"], ["b"], ["d"]]  # no empty part
    assert balanced_parts(params, 1) == [["a", "b", "c", "d"]]
