"""Shards of a step on CPU streams of their own: the same numbers as micro-batches, BLAS threads restored."""

from __future__ import annotations

import os
import sys

import mlx.core as mx
import numpy as np
import pytest

from mixtral_mlx import Model, blas, checkpoint as ckpt, cpu_streams, load_preset
from mixtral_mlx.errors import UserError
from mixtral_mlx.model import init_weights
from mixtral_mlx.train import TrainConfig, Trainer


def batches(n=3, rows=8, seq_len=32):
    rng = np.random.default_rng(0)
    for _ in range(n):
        seq = rng.integers(0, 512, size=(rows, seq_len + 1))
        mask = np.ones((rows, seq_len), np.float32)
        mask[1, 20:] = 0  # a padded tail: counted as the trainer counts it, in whichever shard
        yield {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32), "mask": mask}


def train(streams: int, split_by_hand: bool):
    cfg = TrainConfig(iters=5, warmup=0, lr=1e-3, cpu_streams=streams).validate()
    trainer = Trainer(init_weights(Model(load_preset("tiny")), seed=0), cfg)
    steps = []
    for batch in batches():
        micro = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}] if split_by_hand else [batch]
        steps.append(trainer.train_step(micro))
    return steps, dict(ckpt.to_hf_weights(trainer.model))


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="CPU streams")
def test_two_streams_train_as_two_micro_batches_do():
    """Two shards on two streams are two micro-batches computed at once: the same sums in the
    same order, router losses included (each a mean over its shard, averaged). Not bit for bit:
    the shards' matmuls run on one OpenBLAS thread each, which may split a product's work, and
    so round it, otherwise than two threads do (float32: a few units in the last place, which
    Adam's division by the gradient's root mean square can enlarge in a weight whose gradient
    is near zero, as in test_train's accumulation test)."""
    sharded, sharded_weights = train(streams=2, split_by_hand=False)
    accumulated, accumulated_weights = train(streams=1, split_by_hand=True)
    for a, b in zip(sharded, accumulated):
        assert a.tokens == b.tokens
        assert (a.loss, a.aux, a.z, a.grad_norm) == pytest.approx((b.loss, b.aux, b.z, b.grad_norm), rel=1e-6)
        np.testing.assert_array_equal(a.expert_counts, b.expert_counts)
    for name, value in accumulated_weights.items():
        np.testing.assert_allclose(np.array(sharded_weights[name]), np.array(value), atol=1e-5, err_msg=name)


def test_the_default_uses_two_streams_on_a_cpu_with_two_cores():
    trainer = Trainer(init_weights(Model(load_preset("tiny")), seed=0), TrainConfig())
    expected = 2 if mx.default_device() == mx.cpu and (os.cpu_count() or 1) >= 2 else 1
    assert trainer.shards == expected
    assert Trainer(Model(load_preset("tiny")), TrainConfig(cpu_streams=1)).shards == 1


def test_split_rows_keeps_a_batch_whole_when_a_shard_would_have_nothing_to_learn():
    batch = next(batches(rows=5))
    parts = cpu_streams.split_rows(batch, 2)
    assert [len(p["inputs"]) for p in parts] == [3, 2]
    np.testing.assert_array_equal(np.concatenate([p["targets"] for p in parts]), batch["targets"])
    assert len(cpu_streams.split_rows(batch, 8)) == 5  # no more shards than rows
    assert cpu_streams.split_rows({k: v[:1] for k, v in batch.items()}, 2)[0]["inputs"].shape[0] == 1
    batch["mask"][3:] = 0  # the second shard's rows are all padding
    assert cpu_streams.split_rows(batch, 2) == [batch]


@pytest.mark.skipif(blas.threads() is None, reason=f"MLX does not use OpenBLAS here: {blas.status}")
def test_blas_threads_are_shared_out_and_given_back():
    before = blas.threads()
    with cpu_streams.blas_threads(2):
        assert blas.threads() == max(1, (os.cpu_count() or 1) // 2)
    assert blas.threads() == before
    with pytest.raises(RuntimeError), cpu_streams.blas_threads(2):
        raise RuntimeError("a failed step")
    assert blas.threads() == before


def test_configure_widens_mlx_evaluation_order_unless_set(monkeypatch):
    def configure(installed: tuple[str, ...], setting: str | None = None, width: str | None = None) -> str | None:
        for name, value in ((cpu_streams.ENV_VAR, setting), (cpu_streams.WIDTH_VAR, width)):
            monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
        monkeypatch.setattr(cpu_streams, "_installed", lambda name: name in installed)
        cpu_streams.configure()
        return os.environ.get(cpu_streams.WIDTH_VAR)

    monkeypatch.setattr(cpu_streams, "widened", False)
    monkeypatch.setattr(cpu_streams, "status", cpu_streams.status)
    on_linux = cpu_streams.WIDTH if sys.platform == "linux" else None
    assert configure(("mlx-cpu",)) == on_linux and cpu_streams.widened == (on_linux is not None)
    assert configure(("mlx-cpu",), width="40") == "40" and "set before" in cpu_streams.status  # the user's
    assert configure(("mlx-cpu", "mlx-cuda")) is None  # MLX's CUDA build: left alone
    assert configure(("mlx-cpu",), setting="mlx") is None and "mlx" in cpu_streams.status
    assert configure(("mlx-cuda",), setting="64") == "64"


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_cpu_streams_must_be_a_positive_integer(value):
    with pytest.raises(UserError, match="cpu_streams"):
        TrainConfig(cpu_streams=value).validate("run.yaml")
