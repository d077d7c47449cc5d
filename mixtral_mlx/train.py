"""One training core for pretraining and fine-tuning: step, schedule, evaluation, checkpoints.

A loop with no framework around it (nanoGPT style). What differs between pretraining and
fine-tuning (which parameters train, which batches, what a checkpoint holds besides the
trainer state) is passed in; the loop, the compiled step, gradient accumulation,
clipping, the schedule, evaluation, checkpoints, exact resume, signals, progress and
plots live here once.

Mixed precision: with `dtype` bfloat16/float16 the model computes in that dtype while
the optimizer keeps float32 master weights (and float32 moments); after each update the
master weights are cast into the model.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .adamw import StreamAdamW
from .cpu_decode import release as release_decoding_copies
from .cpu_streams import blas_threads, default_shards, split_rows
from .data import PACKINGS
from .errors import UserError
from .losses import cross_entropy, head_cross_entropy
from .moe import load_balancing_loss, router_z_loss

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class TrainConfig:
    """Everything that drives a run; a YAML file and flags set the same keys."""

    data: str = "pretrain_data"
    out: str | None = None
    preset: str = "small"
    iters: int = 1000
    max_time: float | None = None  # minutes from this start (a resume gets them afresh); schedule spans `iters`
    batch_size: int = 8
    seq_len: int = 256
    # "document": every document starts a row of its own (padded), so it is read from its
    # beginning; "stream": rows cut anywhere in the concatenated documents, no padding.
    packing: str = "document"
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    dtype: str = "float32"
    grad_checkpoint: bool = False  # recompute activations in the backward pass: less memory, more time
    cpu_streams: int | None = None  # shards of a micro-batch run at once, a CPU stream each (None: 2 on a CPU)
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep: int = 3
    seed: int = 0
    init_qk_std: float | None = None  # std of the initial q_proj/k_proj weights (None: the model's initializer_range)
    # Draw the output head with this std and never train it (None: trained, as usual). A
    # trained head gives the words of a class (colours, feelings) near-identical output
    # vectors; a fixed random one keeps every word's direction its own (docs/finetune.md).
    fixed_head_std: float | None = None
    init: str | None = None  # start from this model's weights, config and tokenizer (continued pretraining)
    aux_loss_coef: float | None = None  # None: the model config's router_aux_loss_coef
    z_loss_coef: float = 1e-3
    log_every: int = 10
    tokenizer: str | None = None
    vocab_size: int | None = None
    wandb: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's model fields

    def validate(self, source: str = "config") -> "TrainConfig":
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise UserError(why, file=None if source == "flags" else source,
                                field=f"--{name.replace('_', '-')}" if source == "flags" else name)

        for name in ("iters", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches", "save_every",
                     "keep", "log_every"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, f"must be a positive integer, got {v!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "z_loss_coef"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v),
                 name, f"must be a non-negative number, got {v!r}")
        need(self.lr > 0, "lr", f"must be positive, got {self.lr!r}")
        need(self.min_lr <= self.lr, "min_lr", f"{self.min_lr} is above lr={self.lr}")
        need(isinstance(self.warmup, int) and 0 <= self.warmup, "warmup", f"must be >= 0, got {self.warmup!r}")
        need(self.packing in PACKINGS, "packing", f"must be one of {', '.join(PACKINGS)}, got {self.packing!r}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(self.max_time is None or self.max_time > 0, "max_time", f"must be positive, got {self.max_time!r}")
        need(self.aux_loss_coef is None or self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0")
        for name in ("init_qk_std", "fixed_head_std"):
            v = getattr(self, name)
            need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
                 name, f"must be positive, got {v!r}")
        need(self.init is None or not (self.model or self.vocab_size or self.init_qk_std or self.fixed_head_std),
             "init", "the model, its vocabulary and its weights come from --init: drop model settings, "
             "vocab_size, init_qk_std and fixed_head_std")
        need(self.cpu_streams is None or (isinstance(self.cpu_streams, int) and not isinstance(self.cpu_streams, bool)
                                          and self.cpu_streams > 0),
             "cpu_streams", f"must be a positive integer, got {self.cpu_streams!r}")
        need(isinstance(self.grad_checkpoint, bool), "grad_checkpoint",
             f"must be true or false, got {self.grad_checkpoint!r}")
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise UserError(f"unknown setting (known: {', '.join(sorted(known))})", file=source, field=key)
        return cls(**values)


# ---------------------------------------------------------------------- schedule and loss
def lr_schedule(cfg: TrainConfig) -> Callable[[mx.array], mx.array]:
    """Linear warmup from 0 to lr over `warmup` steps, then cosine decay to min_lr at `iters`."""
    decay = optim.cosine_decay(cfg.lr, max(1, cfg.iters - cfg.warmup), cfg.min_lr)
    if cfg.warmup == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, cfg.lr, cfg.warmup), decay], [cfg.warmup])


def loss_terms(model, batch: dict[str, mx.array], n_tokens: mx.array, n_micro: mx.array,
               aux_coef: float, z_coef: float):
    """Total loss and its parts for one of `n_micro` micro-batches of an accumulated step.

    Cross-entropy is summed over the micro-batch's unmasked tokens and divided by
    `n_tokens`, the unmasked tokens of the whole step, so micro-batches add up to the mean
    over the full batch whatever their share of real tokens; the router losses are
    per-micro-batch means and are averaged.
    Returns (total, (ce_sum, aux, z, expert_counts (layers, E))).
    """
    # The logits are left to the fused head and loss (the forward's own are never evaluated).
    out = model.forward(batch["inputs"], router_logits=True, hidden_states=True)
    ce_sum = head_cross_entropy(model, out.hidden_states[-1], batch["targets"], batch["mask"])
    top_k = model.args.num_experts_per_tok
    # Padding (a short document's row, a fine-tune batch's tail) is neither routed for the
    # router losses nor counted in the expert load.
    aux = load_balancing_loss(out.router_logits, top_k, batch["mask"])
    z = router_z_loss(out.router_logits, batch["mask"])
    counts = mx.stack([expert_counts(r, top_k, batch["mask"]) for r in out.router_logits])
    total = ce_sum / n_tokens + (aux_coef * aux + z_coef * z) / n_micro
    return total, (ce_sum, aux, z, counts)


def expert_counts(router_logits: mx.array, top_k: int, mask: mx.array | None = None) -> mx.array:
    """How many (token, slot) routings each expert got, over the positions `mask` keeps: (E,)."""
    E = router_logits.shape[-1]
    chosen = mx.argpartition(-router_logits.reshape(-1, E), kth=top_k - 1, axis=-1)[:, :top_k]
    routed = chosen[..., None] == mx.arange(E)  # (N, k, E)
    if mask is not None:
        routed = routed & (mask.reshape(-1, 1, 1) > 0)
    return routed.sum(axis=(0, 1))


# ---------------------------------------------------------------------- the trainer
@dataclass
class StepResult:
    """One optimizer step, summed over every process of a data-parallel run."""

    loss: float  # mean cross-entropy per token
    aux: float
    z: float
    grad_norm: float
    tokens: int  # the tokens the loss counted (a fine-tune's answers)
    expert_counts: np.ndarray  # (layers, E)
    stop: bool = False  # some process asked to stop (Ctrl-C / SIGTERM)
    positions: int = 0  # the positions the model ran, padding included: what throughput and MFU count


# Flags the processes of a run exchange before each gradient all-reduce.
STOP, FAILED = 1, 1 << 16


class Trainer:
    """Owns the optimizer, the compiled step and the master weights of one run."""

    def __init__(self, model, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.aux_coef = model.args.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
        self.compute_dtype = DTYPES[cfg.dtype]
        if cfg.grad_checkpoint and model.args.router_jitter_noise > 0:
            # the recomputation would draw other noise than the forward pass did
            raise UserError("cannot be combined with router_jitter_noise > 0", field="grad_checkpoint")
        model.grad_checkpoint = cfg.grad_checkpoint
        # Adam as published and as torch has it: MLX leaves out the bias correction by default,
        # which makes the first hundreds of steps 2-6x larger than the learning rate says.
        self._schedule = lr_schedule(cfg)
        self.optimizer = optim.AdamW(learning_rate=self._schedule, weight_decay=cfg.weight_decay,
                                     bias_correction=True)
        # float32 master copy of what trains; the model holds it cast to the compute dtype
        self.master = tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters())
        self.optimizer.init(self.master)
        self._cast_into_model()
        self.step = 0
        # Data parallelism: under `mlx.launch` every process computes gradients on its own
        # shard of the global batch and they are summed; alone, the group has size 1.
        self.group = mx.distributed.init()
        self.world, self.rank = self.group.size(), self.group.rank()
        # Shards of each micro-batch run at once on CPU streams of their own (cpu_streams.py),
        # each with its own compiled step, traced on its stream; one shard runs on the default.
        self.shards = cfg.cpu_streams or default_shards(self.world)
        self._streams = ([mx.new_stream(mx.cpu) for _ in range(self.shards)] if self.shards > 1
                         else [mx.default_stream(mx.default_device())])
        self._grad_fns = [self._compile_grad() for _ in self._streams]
        # The update is cut into parts too, one per stream: on one stream it took a tenth of
        # a small-preset step with the second core idle (adamw.py).
        self._update_fn = StreamAdamW(self.optimizer, self._schedule, cfg.grad_clip, self.master, self._streams)

    def _cast_into_model(self):
        if self.compute_dtype == mx.float32:
            self.model.update(self.master)
        else:
            self.model.update(tree_map(lambda p: p.astype(self.compute_dtype), self.master))

    def _compile_grad(self):
        model, aux_coef, z_coef = self.model, self.aux_coef, self.cfg.z_loss_coef
        value_and_grad = nn.value_and_grad(model, lambda b, n, k: loss_terms(model, b, n, k, aux_coef, z_coef))

        def grad_step(batch, n_tokens, n_micro):
            (_, parts), grads = value_and_grad(batch, n_tokens, n_micro)
            return parts, grads

        # The model's parameters and the random state are read inside: capture them. The
        # model is an output too: value_and_grad swaps its parameters while tracing.
        state = [model.state, mx.random.state]
        return mx.compile(grad_step, inputs=state, outputs=state)

    def train_step(self, micro_batches: list[dict[str, np.ndarray]], stop_requested: bool = False) -> StepResult:
        """One optimizer step over this process's `grad_accum` micro-batches (and its peers')."""
        release_decoding_copies(self.model)  # samples taken between steps decode from copies the step makes stale
        local_tokens = sum(float(b["mask"].sum()) for b in micro_batches)
        n_tokens, flags = self.agree(local_tokens, STOP if stop_requested else 0)
        if flags >= FAILED:
            raise UserError("another process of this data-parallel run failed; stopping all")
        if n_tokens == 0:
            raise UserError("a batch has no tokens to learn from (all masked)", field="data")
        sharded = [split_rows(batch, self.shards) for batch in micro_batches]
        k = sum(len(shards) for shards in sharded) * self.world  # the router losses average over shards
        # Randomness inside the step (router jitter, dropout) comes from a key derived from
        # (seed, step, rank), so a resumed run draws exactly what the uninterrupted run drew.
        mx.random.seed((self.cfg.seed * 1_000_003 + self.step) * 64 + self.rank)
        n, n_micro = mx.array(n_tokens, dtype=mx.float32), mx.array(k, dtype=mx.float32)
        grads, totals = None, mx.zeros(3)
        counts = 0
        with blas_threads(self.shards):
            for shards in sharded:
                for stream, grad_fn, shard in zip(self._streams, self._grad_fns, shards):
                    with mx.stream(stream):
                        (ce_sum, a, zz, c), g = grad_fn({key: mx.array(v) for key, v in shard.items()}, n, n_micro)
                    grads = g if grads is None else tree_map(mx.add, grads, g)
                    totals = totals + mx.stack([ce_sum, a, zz])
                    counts = counts + c
                    del g  # the sum alone holds the shard's gradients: MLX adds into their memory
                for stage in backward_stages(grads):  # each layer's activations freed once its gradients exist
                    mx.eval(stage)
                mx.eval(grads, totals, counts)  # bound memory to one micro-batch's activations
        if self.world > 1:
            grads, totals, counts = self._all_sum((grads, totals, counts))
        self.master, norm = self._update_fn(grads, self.master)
        self._cast_into_model()
        mx.eval(self.master, self.optimizer.state, self.model.parameters())
        self.step += 1
        ce, aux, z = totals.tolist()
        positions = sum(b["inputs"].size for b in micro_batches) * self.world
        return StepResult(ce / n_tokens, aux / k, z / k, norm.item(), int(n_tokens), np.array(counts),
                          stop=flags > 0, positions=positions)

    # ------------------------------------------------------------------ data parallelism
    def agree(self, tokens: float, flags: int) -> tuple[float, int]:
        """Sum (tokens, flags) over the processes: one small all-reduce; identity when alone."""
        if self.world == 1:
            return tokens, flags
        out = mx.distributed.all_sum(mx.array([tokens, float(flags)]), group=self.group).tolist()
        return out[0], int(out[1])

    def fail(self) -> None:
        """Tell the peers this process is going down, so none waits for it forever."""
        if self.world > 1:
            self.agree(0.0, FAILED)

    def _all_sum(self, tree):
        """Sum a tree of arrays over the processes in one all-reduce of a flat buffer."""
        leaves = tree_flatten(tree)
        flat = mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in leaves])
        flat = mx.distributed.all_sum(flat, group=self.group)
        out, offset = [], 0
        for name, v in leaves:
            out.append((name, flat[offset:offset + v.size].reshape(v.shape).astype(v.dtype)))
            offset += v.size
        return tree_unflatten(out)

    @property
    def lr(self) -> float:
        return float(self.optimizer.learning_rate.item())

    # ------------------------------------------------------------------ state
    def optimizer_arrays(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.optimizer.state))

    def load_optimizer_arrays(self, arrays: dict[str, mx.array]) -> None:
        self.optimizer.state = tree_unflatten(list(arrays.items()))  # StreamAdamW reads it at each step

    def master_arrays(self) -> dict[str, mx.array]:
        return dict(tree_flatten(self.master))

    def load_master_arrays(self, arrays: dict[str, mx.array]) -> None:
        self.master = tree_unflatten(list(arrays.items()))
        self._cast_into_model()


def backward_stages(grads) -> list[list[mx.array]]:
    """The gradients in the order the backward pass produces them: the head's (and any other
    outside the layers) first, then each decoder layer's from the last to the first, then
    the embedding's.

    MLX orders one evaluation breadth-first from its outputs, and every gradient is an
    output: evaluated together, all of them come at the end, and every layer's activations
    stay alive until then (with MLX's order widened for CPU streams, cpu_streams.py, even
    those that activation checkpointing recomputes). Evaluated stage by stage, a layer's
    activations are freed as soon as its gradients exist. Small preset, batch 8 x 256, two
    CPU streams: peak 535 -> 504 MiB at the same speed.
    """
    layers: dict[int, list[mx.array]] = {}
    head, embedding = [], []
    for name, g in tree_flatten(grads):
        if (m := _LAYER.search(name)) is not None:
            layers.setdefault(int(m.group(1)), []).append(g)
        else:
            (embedding if "embed_tokens" in name else head).append(g)
    return [stage for stage in (head, *(layers[i] for i in sorted(layers, reverse=True)), embedding) if stage]


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---------------------------------------------------------------------- evaluation
def evaluate(model, batches: Iterator[dict[str, np.ndarray]]) -> tuple[float, int]:
    """Summed cross-entropy (nats) and token count over the batches."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(mx.array(batch["inputs"]))
        ce = cross_entropy(logits, mx.array(batch["targets"])) * mx.array(batch["mask"])
        total += ce.sum().item()
        count += int(batch["mask"].sum())
    return total, count


def eval_metrics(nats: float, tokens: int, n_bytes: float) -> dict[str, float]:
    """Loss per token, perplexity and bits per byte (comparable across tokenizers)."""
    loss = nats / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": nats / math.log(2) / max(n_bytes, 1)}


# ---------------------------------------------------------------------- the run
@dataclass
class Task:
    """The parts of a run that differ between pretraining and fine-tuning."""

    train_batches: Any  # __next__() -> batch dict; state() / load_state(dict)
    evaluate: Callable[[str, int | None], dict[str, float]]  # (split, max_batches) -> loss, ppl, bpb
    save_weights: Callable[[Path], None]  # write the model (or adapters) into a directory
    load_weights: Callable[[Path], None]  # read them back from a checkpoint
    flops_per_token: float
    splits_at_end: tuple[str, ...] = ("val",)
    samples: Callable[[], list[tuple[str, str]]] | None = None  # (prompt, greedy continuation)
    extra_state: dict[str, Any] = field(default_factory=dict)  # saved in trainer_state.json


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop saves at the end of the step and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """Raised after the checkpoint is saved; the CLI exits 130."""


def fit(trainer: Trainer, task: Task, run_dir: Path, resume_from: Path | None = None,
        log: Callable[[str], None] = print, peak_flops: float = 0.0, reshard: bool = False) -> Path:
    """Train until `iters` (or `max_time`), evaluating, saving and reporting; returns out/final.

    In a data-parallel run only process 0 writes checkpoints, logs, plots and the bar.
    """
    from . import checkpoint as ckpt
    from .report import Reporter, plot_run

    cfg, run_dir, is_main = trainer.cfg, Path(run_dir), trainer.rank == 0
    state = {"tokens_seen": 0, "elapsed": 0.0, "evals": []}
    if resume_from is not None:
        state = restore(trainer, task, resume_from, reshard)
        if is_main:
            log(f"resumed from {resume_from} at step {trainer.step}")
    if is_main and trainer.shards > 1:
        log(f"each micro-batch in {trainer.shards} shards at once, a CPU stream each (--cpu-streams)")
    reporter = Reporter(run_dir, cfg.iters, trainer.step, task.flops_per_token, peak_flops, enabled=is_main,
                        wandb_project=cfg.wandb, config=asdict(cfg))
    reporter.truncate(trainer.step)

    def save(directory: Path, pointer: bool) -> None:
        if not is_main:
            return
        full = {**state, "step": trainer.step, "config": asdict(cfg), "model": trainer.model.args.to_hf(),
                "data": task.train_batches.state(), "world_size": trainer.world, **task.extra_state}
        try:
            with ckpt.atomic_directory(directory) as tmp:
                task.save_weights(tmp)
                mx.save_safetensors(str(tmp / ckpt.OPTIMIZER_FILE), trainer.optimizer_arrays())
                if trainer.compute_dtype != mx.float32:
                    mx.save_safetensors(str(tmp / ckpt.MASTER_FILE), trainer.master_arrays())
                (tmp / ckpt.STATE_FILE).write_text(json.dumps(full, indent=1))
        except (OSError, RuntimeError) as e:  # disk full, read-only, quota: MLX's writer raises RuntimeError
            latest = ckpt.latest_checkpoint(run_dir)
            raise UserError(f"could not write the checkpoint at step {trainer.step} ({str(e).splitlines()[0]}); "
                            f"the previous checkpoint is intact: {latest or 'none'}", file=directory) from None
        if pointer:
            ckpt.write_pointer(run_dir, directory.name)
            ckpt.prune_checkpoints(run_dir, cfg.keep)

    def run_eval(splits=("val",), max_batches=cfg.eval_batches) -> None:
        for split in splits:
            metrics = task.evaluate(split, max_batches)
            record = {"kind": "eval", "split": split, "step": trainer.step, "tokens_seen": state["tokens_seen"],
                      **metrics}
            state["evals"].append(record)
            reporter.log(record)
            reporter.message(f"step {trainer.step}: {split} loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}, "
                             f"{metrics['bpb']:.4f} bits/byte")
        if task.samples is not None:
            for prompt, text in task.samples():
                reporter.log({"kind": "sample", "step": trainer.step, "prompt": prompt, "text": text})
                reporter.message(f"  sample: {prompt!r} -> {text!r}")
        if is_main:
            plot_run(run_dir)

    try:
        start = time.perf_counter() - state["elapsed"]  # the run's whole time, earlier invocations included
        deadline = None if cfg.max_time is None else time.perf_counter() + 60 * cfg.max_time  # this invocation's
        with StopRequest() as stop:
            while trainer.step < cfg.iters:
                if deadline is not None and time.perf_counter() >= deadline:
                    reporter.message(f"--max-time {cfg.max_time} min reached at step {trainer.step}")
                    break
                try:
                    micro = [next(task.train_batches) for _ in range(cfg.grad_accum)]
                except BaseException:
                    trainer.fail()
                    raise
                t0 = time.perf_counter()
                try:
                    result = trainer.train_step(micro, stop_requested=stop.signal is not None)
                except (MemoryError, RuntimeError) as e:
                    if not isinstance(e, MemoryError) and "memory" not in str(e).lower() and "alloc" not in str(e).lower():
                        raise
                    raise UserError(f"out of memory at step {trainer.step + 1}: lower --batch-size or --seq-len, or "
                                    f"use --grad-accum; last good checkpoint: {ckpt.latest_checkpoint(run_dir) or 'none'}"
                                    ) from None
                dt = time.perf_counter() - t0
                if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
                    latest = ckpt.latest_checkpoint(run_dir)
                    raise UserError(f"loss became {result.loss} (grad norm {result.grad_norm}) at step {trainer.step}; "
                                    f"stopped without saving. Last good checkpoint: {latest or 'none'}. "
                                    f"Try a lower --lr or --grad-clip.")
                state["tokens_seen"] += result.tokens
                state["elapsed"] = time.perf_counter() - start
                record = {"kind": "train", "step": trainer.step, "loss": result.loss, "aux_loss": result.aux,
                          "z_loss": result.z, "lr": trainer.lr, "grad_norm": result.grad_norm,
                          "tokens_seen": state["tokens_seen"], "tokens_per_s": result.positions / dt,
                          "step_time": dt, "elapsed": state["elapsed"]}
                if trainer.step % cfg.log_every == 0 or trainer.step == 1:
                    counts = result.expert_counts
                    record["expert_load"] = (counts / counts.sum(axis=1, keepdims=True)).round(4).tolist()
                reporter.step(record)
                if trainer.step % cfg.eval_every == 0 and trainer.step < cfg.iters:  # the last is the final one
                    run_eval()
                if result.stop:  # every process sees the same flag and stops at the same step
                    save(ckpt.step_dir(run_dir, trainer.step), pointer=True)
                    if is_main:
                        log(f"stopped at step {trainer.step}; saved {ckpt.step_dir(run_dir, trainer.step)} "
                            f"(resume with --resume {run_dir})")
                    raise Interrupted
                if trainer.step % cfg.save_every == 0:
                    save(ckpt.step_dir(run_dir, trainer.step), pointer=True)
        run_eval(task.splits_at_end, max_batches=None)
        final = run_dir / "final"
        save(final, pointer=False)
        return final
    finally:
        reporter.close()  # end the progress bar before an error message is printed


def restore(trainer: Trainer, task: Task, directory: Path, reshard: bool = False) -> dict:
    """Load weights, optimizer state and data position from a checkpoint; returns its state dict."""
    from . import checkpoint as ckpt

    state = ckpt.read_trainer_state(directory)
    saved_world = state.get("world_size", 1)
    if saved_world != trainer.world and not reshard:
        raise UserError(f"this run was saved by {saved_world} process(es) and is resumed by {trainer.world}: the "
                        "data order would differ; pass --reshard to continue from the saved data position anyway",
                        file=directory / ckpt.STATE_FILE, field="world_size")
    task.load_weights(directory)
    trainer.load_optimizer_arrays(mx.load(str(directory / ckpt.OPTIMIZER_FILE)))
    if (directory / ckpt.MASTER_FILE).exists():
        trainer.load_master_arrays(mx.load(str(directory / ckpt.MASTER_FILE)))
    else:  # float32 runs: the saved weights are the master weights
        trainer.master = tree_map(lambda p: p.astype(mx.float32), trainer.model.trainable_parameters())
    trainer.step = state["step"]
    task.train_batches.load_state(state["data"])
    return {k: state[k] for k in ("tokens_seen", "elapsed", "evals")}
