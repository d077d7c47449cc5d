"""The training core: schedule, accumulation, checkpointing, exact resume, NaN handling."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mixtral_mlx import Model, checkpoint as ckpt, load_preset
from mixtral_mlx.errors import UserError
from mixtral_mlx.model import init_weights
from mixtral_mlx.train import (Interrupted, Task, TrainConfig, Trainer, backward_stages, eval_metrics,
                               evaluate as eval_model, fit, lr_schedule)


class CountingBatches:
    """Deterministic synthetic batches (arithmetic sequences) with a restorable position."""

    def __init__(self, batch_size=4, seq_len=32, seed=0):
        self.batch_size, self.seq_len, self.seed, self.index = batch_size, seq_len, seed, 0

    def __next__(self):
        rng = np.random.default_rng((self.seed, self.index))
        self.index += 1
        start = rng.integers(0, 500, size=(self.batch_size, 1))
        seq = (start + np.arange(self.seq_len + 1)) % 512
        return {"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
                "mask": np.ones((self.batch_size, self.seq_len), np.float32)}

    def state(self):
        return {"index": self.index}

    def load_state(self, state):
        self.index = state["index"]


def make_run(tmp_path: Path, iters=12, **overrides):
    cfg = TrainConfig(iters=iters, warmup=2, lr=3e-3, min_lr=3e-4, batch_size=4, seq_len=32, eval_every=4,
                      save_every=4, eval_batches=1, keep=2, **overrides).validate()
    mx.random.seed(0)
    model = init_weights(Model(load_preset("tiny")), seed=0)
    trainer = Trainer(model, cfg)
    batches = CountingBatches()

    def evaluate(split, max_batches):
        held_out = CountingBatches(seed=99)
        nats, tokens = eval_model(model, (next(held_out) for _ in range(max_batches or 2)))
        return eval_metrics(nats, tokens, tokens * 3.0)

    task = Task(train_batches=batches, evaluate=evaluate,
                save_weights=lambda d: ckpt.write_model(model, None, d),
                load_weights=lambda d: ckpt.load_weights_into(model, ckpt.read_weights(d), d),
                flops_per_token=1.0)
    return trainer, task


def remove(run_dir: Path, *names: str) -> None:
    """Delete checkpoints (and the `latest` pointer) of a run, as if it had died before writing them."""
    for name in names:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def test_schedule_matches_formula():
    cfg = TrainConfig(iters=100, warmup=10, lr=1e-3, min_lr=1e-4)
    schedule = lr_schedule(cfg)
    for step in (0, 5, 10, 40, 99, 100):
        if step < 10:
            expected = 1e-3 * step / 10
        else:
            progress = (step - 10) / 90
            expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * progress))
        assert schedule(mx.array(step)).item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_loss_falls(tmp_path):
    trainer, task = make_run(tmp_path, iters=30)
    first = trainer.train_step([next(task.train_batches)]).loss
    for _ in range(29):
        last = trainer.train_step([next(task.train_batches)]).loss
    assert last < 0.8 * first  # from ln(512) = 6.24 at initialisation


def test_grad_accumulation_equals_one_big_batch():
    """2 micro-batches of b == one batch of 2b (router losses off: they are per-micro-batch means)."""
    results = []
    for accum in (1, 2):
        cfg = TrainConfig(iters=5, warmup=0, lr=1e-3, aux_loss_coef=0.0, z_loss_coef=0.0, grad_accum=accum)
        trainer = Trainer(init_weights(Model(load_preset("tiny")), seed=0), cfg)
        big = CountingBatches(batch_size=8)
        for _ in range(3):
            batch = next(big)
            micro = [batch] if accum == 1 else [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
            trainer.train_step(micro)
        results.append(dict(ckpt.to_hf_weights(trainer.model)))
    for name, value in results[0].items():
        # float32: two half-batch sums round differently from one; Adam can enlarge that near zero
        np.testing.assert_allclose(np.array(value), np.array(results[1][name]), atol=1e-5, err_msg=name)


def test_grad_checkpoint_trains_exactly_as_without():
    """Recomputing activations in the backward pass changes memory and time, not the numbers."""
    runs = []
    for checkpointing in (False, True):
        cfg = TrainConfig(iters=5, warmup=0, lr=1e-3, grad_checkpoint=checkpointing)
        trainer = Trainer(init_weights(Model(load_preset("tiny")), seed=0), cfg)
        batches = CountingBatches()
        steps = [trainer.train_step([next(batches)]) for _ in range(3)]
        runs.append((steps, dict(ckpt.to_hf_weights(trainer.model))))
    (plain, plain_weights), (checkpointed, checkpointed_weights) = runs
    for a, b in zip(plain, checkpointed):
        assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    for name, value in plain_weights.items():
        np.testing.assert_allclose(np.array(checkpointed_weights[name]), np.array(value), atol=1e-6, err_msg=name)


def test_grad_checkpoint_refuses_router_jitter():
    args = load_preset("tiny")
    args.router_jitter_noise = 0.1
    with pytest.raises(UserError, match="grad_checkpoint"):
        Trainer(Model(args), TrainConfig(grad_checkpoint=True))


class InterruptAt(CountingBatches):
    """Sends this process SIGINT (as Ctrl-C does) while step `at` is being prepared."""

    def __init__(self, at, **kw):
        super().__init__(**kw)
        self.at = at

    def __next__(self):
        if self.index == self.at - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__next__()


def test_ctrl_c_saves_and_resume_continues_bit_for_bit(tmp_path):
    trainer, task = make_run(tmp_path)
    fit(trainer, task, tmp_path / "straight", log=lambda *_: None)
    reference = losses(tmp_path / "straight")

    trainer, task = make_run(tmp_path)
    task.train_batches = InterruptAt(7)
    with pytest.raises(Interrupted):
        fit(trainer, task, tmp_path / "broken", log=lambda *_: None)
    assert ckpt.latest_checkpoint(tmp_path / "broken").name == "step-000007"  # saved on the signal

    trainer, task = make_run(tmp_path)
    fit(trainer, task, tmp_path / "broken", resume_from=ckpt.latest_checkpoint(tmp_path / "broken"),
        log=lambda *_: None)
    assert losses(tmp_path / "broken") == reference  # exact equality: same floats in the same order


def test_resume_from_older_checkpoint_after_a_crash(tmp_path):
    """A run killed after step 6 resumes from step 4 (its last checkpoint) to the same losses."""
    trainer, task = make_run(tmp_path)
    fit(trainer, task, tmp_path / "straight", log=lambda *_: None)
    reference = losses(tmp_path / "straight")
    trainer, task = make_run(tmp_path)
    fit(trainer, task, tmp_path / "crashed", log=lambda *_: None)
    remove(tmp_path / "crashed", "final", "step-000008", "step-000012", "latest")  # as if it died after step 6
    trainer, task = make_run(tmp_path)
    fit(trainer, task, tmp_path / "crashed", resume_from=ckpt.latest_checkpoint(tmp_path / "crashed"),
        log=lambda *_: None)
    assert losses(tmp_path / "crashed") == reference


def test_max_time_counts_from_the_resume_not_from_the_first_start(tmp_path):
    """A run that has already trained for days still gets its --max-time minutes when resumed."""
    trainer, task = make_run(tmp_path)
    fit(trainer, task, tmp_path / "run", log=lambda *_: None)
    remove(tmp_path / "run", "final", "step-000012", "latest")
    state_file = tmp_path / "run" / "step-000008" / ckpt.STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "elapsed": 3 * 24 * 3600.0}))
    trainer, task = make_run(tmp_path, max_time=60.0)
    fit(trainer, task, tmp_path / "run", resume_from=tmp_path / "run" / "step-000008", log=lambda *_: None)
    assert trainer.step == 12


def test_keeps_last_checkpoints_and_pointer(tmp_path):
    trainer, task = make_run(tmp_path)
    final = fit(trainer, task, tmp_path / "run", log=lambda *_: None)
    steps = sorted(p.name for p in (tmp_path / "run").glob("step-*"))
    assert steps == ["step-000008", "step-000012"]  # keep=2
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000012"
    assert (final / "config.json").exists() and (tmp_path / "run" / "plots" / "loss.png").stat().st_size > 0


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    trainer, task = make_run(tmp_path)
    poisoned = task.train_batches
    original_next = CountingBatches.__next__

    def next_with_nan(self):
        if self.index == 6:  # step 7: poison the weights through a huge learning signal
            trainer.master = {**trainer.master}
            embed = trainer.master["model"]["embed_tokens"]["weight"]
            trainer.master["model"]["embed_tokens"]["weight"] = embed * float("nan")
            trainer._cast_into_model()
        return original_next(self)

    poisoned.__class__ = type("Poisoned", (CountingBatches,), {"__next__": next_with_nan})
    with pytest.raises(UserError, match="loss became nan .* at step 7; stopped without saving"):
        fit(trainer, task, tmp_path / "run", log=lambda *_: None)
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-000004"
    model, _ = ckpt.load(latest)
    assert np.isfinite(np.array(model(mx.arange(8).reshape(1, 8)))).all()


def test_grad_checkpoint_must_be_a_boolean():
    with pytest.raises(UserError, match="grad_checkpoint"):
        TrainConfig(grad_checkpoint="yes").validate("run.yaml")


def test_expert_load_counts_only_the_positions_trained_on():
    from mixtral_mlx.train import expert_counts

    logits = mx.array([[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [0.0, 2.0, 1.0]]])  # top-2: {2,1}, {0,1}, {1,2}
    assert expert_counts(logits, 2).tolist() == [1, 3, 2]
    assert expert_counts(logits, 2, mx.array([[1.0, 1.0, 0.0]])).tolist() == [1, 2, 1]


def test_backward_stages_follow_the_backward_pass_and_cover_every_gradient():
    model = Model(load_preset("tiny"))
    grads = model.trainable_parameters()
    stages = backward_stages(grads)
    names = {id(v): name for name, v in tree_flatten(grads)}
    named = [[names[id(g)] for g in stage] for stage in stages]
    assert sorted(n for stage in named for n in stage) == sorted(names.values())  # each exactly once
    layers = model.args.num_hidden_layers
    assert len(stages) == layers + 2
    assert all(not n.startswith("model.layers.") and "embed_tokens" not in n for n in named[0])  # head, final norm
    for stage, layer in zip(named[1:-1], reversed(range(layers))):
        assert all(n.startswith(f"model.layers.{layer}.") for n in stage)
    assert named[-1] == ["model.embed_tokens.weight"]


def test_grad_checkpoint_lowers_the_peak_of_a_step():
    """Each layer keeps only its input and recomputes the rest when the backward pass reaches it.
    With MLX's evaluation order widened (cpu_streams.py) that holds only because the step
    evaluates its gradients layer by layer (train.backward_stages): all at once, the
    recomputation ran early and the peak did not move."""
    # Four layers, not the tiny preset's two: checkpointed, a step holds one layer's
    # activations (and each layer's input) instead of every layer's, so the ratio falls
    # with depth (two layers: 0.73-0.85, as the head's and the weights' share moved; four: ~0.53).
    args = dataclasses.replace(load_preset("tiny"), num_hidden_layers=4)
    peaks = []
    for checkpointing in (False, True):
        trainer = Trainer(init_weights(Model(args), seed=0),
                          TrainConfig(warmup=0, lr=1e-3, grad_checkpoint=checkpointing))
        batch = next(CountingBatches(batch_size=16, seq_len=128))
        trainer.train_step([batch])  # compile
        mx.eval(trainer.model.parameters())
        mx.reset_peak_memory()
        # What the step adds to what is held before it (weights, optimizer state, and
        # whatever earlier tests in this process still hold, which would blur the ratio).
        held = mx.get_active_memory()
        trainer.train_step([batch])
        peaks.append(mx.get_peak_memory() - held)
    plain, checkpointed = peaks
    assert checkpointed < 0.7 * plain, (plain / 2**20, checkpointed / 2**20)
