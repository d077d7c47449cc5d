"""What each of mixtral-mlx's speed levers buys, measured one at a time at a preset's shapes.

Every comparison runs its variants interleaved, `--repeats` times, and prints medians of
wall time and of process CPU time (steadier on a shared machine), with MLX's peak
memory above what was allocated before:

* MoE block, forward + backward: the dense, gather and grouped dispatches.
* Causal attention, forward + backward: one fused call vs query blocks.
* Output head + loss, forward + backward: MLX's cross-entropy on the logits, ours with
  one exp pass, and the head fused with it chunk by chunk.
* The whole training step (`Trainer.train_step`): on one stream, on the default CPU streams
  (`cpu_streams.py`), and with activation checkpointing.
* Decoding one token at a time: the model called eagerly, the compiled `DecodeStep`,
  and the NumPy matrix-vector step (`cpu_decode.NumpyDecodeStep`).

    python scripts/levers.py --preset small
"""

from __future__ import annotations

import mixtral_mlx  # noqa: F401  (loads OpenBLAS before mlx is imported)

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mixtral_mlx import blas
from mixtral_mlx.attention import causal_attention_in_blocks
from mixtral_mlx.cache import make_cache
from mixtral_mlx.config import load_preset, read_preset
from mixtral_mlx.cpu_decode import NumpyDecodeStep
from mixtral_mlx.decode import DecodeStep
from mixtral_mlx.losses import cross_entropy, linear_cross_entropy
from mixtral_mlx.model import Model, init_weights
from mixtral_mlx.moe import SparseMoeBlock, default_max_block
from mixtral_mlx.train import TrainConfig, Trainer


def measure(variants: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Run each variant (a function that returns what to evaluate) `repeats` times, interleaved."""
    samples = {name: [] for name in variants}
    for fn in variants.values():  # compile and warm the allocator
        mx.eval(fn())
    for _ in range(repeats):
        for name, fn in variants.items():
            mx.clear_cache()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            wall, cpu = time.perf_counter(), time.process_time()
            out = fn()
            mx.eval(out)
            samples[name].append((time.perf_counter() - wall, time.process_time() - cpu,
                                  mx.get_peak_memory() - before))
            del out
    return {name: {"wall_s": statistics.median(s[0] for s in v), "cpu_s": statistics.median(s[1] for s in v),
                   "peak_memory": max(s[2] for s in v)} for name, v in samples.items()}


def grad_fn(module: nn.Module, loss):
    """Compiled (loss, gradients) of `module`'s trainable parameters, as the trainer compiles them."""
    value_and_grad = nn.value_and_grad(module, loss)
    return mx.compile(lambda *a: value_and_grad(*a), inputs=[module.state], outputs=[module.state])


def moe_block(args, B: int, L: int, repeats: int) -> dict:
    block = SparseMoeBlock(args)
    x = mx.random.normal((B, L, args.hidden_size))
    default_block = default_max_block(args.hidden_size, args.intermediate_size)  # for this BLAS and thread count
    configs = [("dense", "dense", default_block), ("gather", "gather", default_block),
               (f"grouped, {default_block}-row blocks (default)", "grouped", default_block)]
    configs += [(f"grouped, {n}-row blocks", "grouped", n) for n in (2, 32) if n != default_block]
    variants = {}
    for name, dispatch, max_block in configs:
        def loss(x, dispatch=dispatch, max_block=max_block):
            block.dispatch, block.experts.max_block = dispatch, max_block  # read while the step is traced
            return (block(x)[0] ** 2).sum()
        step = grad_fn(block, loss)
        variants[name] = lambda step=step: step(x)
    return measure(variants, repeats)


def attention(args, B: int, L: int, repeats: int) -> dict:
    D, scale = args.head_dim, args.head_dim**-0.5
    q = mx.random.normal((B, args.num_attention_heads, L, D))
    k, v = (mx.random.normal((B, args.num_key_value_heads, L, D)) for _ in range(2))

    def fused(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    def blocks(q, k, v):
        return causal_attention_in_blocks(q, k, v, scale)

    variants = {}
    for name, attend in (("one call", fused), ("query blocks", blocks)):
        step = mx.compile(mx.value_and_grad(lambda q, k, v, attend=attend: (attend(q, k, v) ** 2).sum(),
                                            argnums=(0, 1, 2)))
        variants[name] = lambda step=step: step(q, k, v)
    return measure(variants, repeats)


def head_and_loss(args, B: int, L: int, repeats: int) -> dict:
    h = mx.random.normal((B * L, args.hidden_size))
    weight = mx.random.normal((args.vocab_size, args.hidden_size)) * args.initializer_range
    targets = mx.random.randint(0, args.vocab_size, (B * L,))
    mask = mx.ones((B * L,))
    losses = {
        "nn.losses.cross_entropy": lambda h, w: (nn.losses.cross_entropy(h @ w.T, targets) * mask).sum(),
        "one exp pass": lambda h, w: (cross_entropy(h @ w.T, targets) * mask).sum(),
        "fused with the head": lambda h, w: linear_cross_entropy(h, w, targets, mask),
    }
    variants = {}
    for name, loss in losses.items():
        step = mx.compile(mx.value_and_grad(loss, argnums=(0, 1)))
        variants[name] = lambda step=step: step(h, weight)
    return measure(variants, repeats)


def training_step(args, preset: str, B: int, L: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocab_size, size=(B, L + 1), dtype=np.int32)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": np.ones((B, L), np.float32)}
    variants = {}
    for name, checkpointing, streams in (("one stream", False, 1), ("default streams", False, None),
                                          ("activation checkpointing", True, None)):
        cfg = TrainConfig(preset=preset, batch_size=B, seq_len=L, grad_checkpoint=checkpointing, cpu_streams=streams,
                          lr=1e-4, min_lr=1e-4)
        trainer = Trainer(init_weights(Model(args), seed=0), cfg)

        def step(trainer=trainer):
            trainer.train_step([batch])
            return trainer.model.parameters()

        variants[name] = step
    return measure(variants, repeats)


def decoding(args, tokens: int, repeats: int) -> dict:
    model = init_weights(Model(args), seed=0).eval()
    compiled = DecodeStep(model)
    prompt = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])

    def run(step) -> mx.array:
        cache = make_cache(model)
        model(prompt, cache)
        token = mx.array([[9]])
        for _ in range(tokens):  # each token queued before the last one is read, as generation does
            nxt = mx.argmax(step(token, cache), axis=-1, keepdims=True)
            mx.async_eval(nxt)
            token = nxt
        return token

    def eager(token, cache):
        return model(token, cache)[:, -1]

    numpy_step = NumpyDecodeStep(model)
    results = measure({"eager": lambda: run(eager), "compiled step": lambda: run(compiled),
                       "NumPy step": lambda: run(numpy_step)}, repeats)
    for r in results.values():
        r["tokens_per_s"] = tokens / r["wall_s"]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's training batch size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's training sequence length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    train = read_preset(a.preset).get("train", {})
    B, L = a.batch_size or train.get("batch_size", 8), a.seq_len or train.get("seq_len", 256)
    args = load_preset(a.preset)
    mx.random.seed(0)
    print(f"{a.preset}, batch {B} x {L}, float32, {mx.default_device()}, {blas.status}; medians of {a.repeats}")
    report = {
        "MoE block, forward + backward": moe_block(args, B, L, a.repeats),
        "causal attention, forward + backward": attention(args, B, L, a.repeats),
        "head + loss, forward + backward": head_and_loss(args, B, L, a.repeats),
        "training step": training_step(args, a.preset, B, L, a.repeats),
        f"decoding {a.decode_tokens} tokens": decoding(args, a.decode_tokens, a.repeats),
    }
    for title, results in report.items():
        print(f"\n{title}")
        for name, r in results.items():
            extra = f"{r['tokens_per_s']:>9.1f} tok/s" if "tokens_per_s" in r else ""
            print(f"  {name:<34}{r['wall_s'] * 1e3:>9.1f} ms wall{r['cpu_s'] * 1e3:>9.1f} ms CPU"
                  f"{r['peak_memory'] / 2**20:>9.1f} MiB{extra}")
    if a.json:
        Path(a.json).write_text(json.dumps({"preset": a.preset, "batch_size": B, "seq_len": L, "blas": blas.status,
                                            "mlx": mx.__version__, "results": report}, indent=1) + "\n")


if __name__ == "__main__":
    main()
