"""Generation speed against mlx-lm on the same weights, and what quantization costs in logits.

    python scripts/bench_generate.py [--preset small] [--prompt-tokens 128 512] [--new-tokens 256]

Builds the preset with random weights, saves it in the Hugging Face format, and loads the
same directory with mixtral-mlx and with mlx-lm (its `load_model`). Both generate greedily
from the same random prompt through their token-level loops (mixtral_mlx.generate.generate_step,
mlx_lm.generate.generate_step), timed the same way from outside: prefill tokens/s is the
prompt length over the time to the first token, decode tokens/s the later tokens over
the time they took. Best of --repeats. Quantized variants are made by each library's own
quantizer with the same group size. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import mixtral_mlx  # before mlx: loads OpenBLAS
import mlx.core as mx
import numpy as np

from mixtral_mlx.generate import GenerationConfig, generate_step
from mixtral_mlx.model import init_weights
from mixtral_mlx.quantize import quantize_model


def timed(tokens) -> tuple[float, float]:
    """(seconds to the first token, seconds for the rest) of a token iterator."""
    start = time.perf_counter()
    first = None
    for _ in tokens:
        if first is None:
            first = time.perf_counter()
    return first - start, time.perf_counter() - first


def ours(model, prompt: list[int], n: int):
    return generate_step(model, prompt, GenerationConfig(mode="greedy"), limit=n)


def mlx_lm_tokens(model, prompt: list[int], n: int):
    from mlx_lm.generate import generate_step as mlx_lm_step

    return (t for t, _ in mlx_lm_step(mx.array(prompt), model, max_tokens=n))


def measure(runs: dict, prompt_tokens: int, new_tokens: int, repeats: int, vocab: int) -> dict:
    """{name: (prefill tok/s, decode tok/s)} for {name: (token loop, model)}, the runs interleaved
    so that both see the same machine load; the best of `repeats` each."""
    prompt = np.random.default_rng(0).integers(3, vocab, size=prompt_tokens).tolist()
    best = {}
    for run, model in runs.values():
        timed(run(model, prompt[:16], 8))  # warm up
    for _ in range(repeats):
        for name, (run, model) in runs.items():
            prefill, decode = timed(run(model, prompt, new_tokens))
            old = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(old[0], prefill), min(old[1], decode))
    return {name: (prompt_tokens / p, (new_tokens - 1) / d) for name, (p, d) in best.items()}


def logit_deviation(reference, model, vocab: int) -> dict:
    ids = mx.array(np.random.default_rng(1).integers(3, vocab, size=(1, 256)))
    a, b = np.array(reference(ids)[0]).astype(np.float64), np.array(model(ids)[0]).astype(np.float64)
    log_p = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    log_q = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean()
    return {"max": float(np.abs(a - b).max()), "mean": float(np.abs(a - b).mean()), "logit std": float(a.std()),
            "kl": float(kl), "top-1 agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", type=int, nargs="*", default=[8, 4])
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()

    import mlx_lm
    from mlx_lm.utils import load_model as mlx_lm_load
    from mlx_lm.utils import quantize_model as mlx_lm_quantize

    from mixtral_mlx import blas

    model_args = mixtral_mlx.load_preset(args.preset)
    vocab = model_args.vocab_size
    print(f"{datetime.date.today()}, {platform.system()} {platform.machine()}, {cpu_name()}, "
          f"{__import__('os').cpu_count()} cores; mlx {mx.__version__} ({mx.default_device()}), mlx-lm "
          f"{mlx_lm.__version__}, mixtral-mlx {mixtral_mlx.__version__}; BLAS: {blas.status}")
    print(f"preset {args.preset}, random weights, float32; greedy, {args.new_tokens} new tokens, best of {args.repeats}\n")

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / args.preset
        float_model = init_weights(mixtral_mlx.Model(model_args), seed=0)
        mixtral_mlx.save(float_model, None, directory)

        def variants():
            yield "float32", mixtral_mlx.load(directory)[0], mlx_lm_load(directory)[0]
            for bits in args.bits:
                q = quantize_model(mixtral_mlx.load(directory)[0], group_size=args.group_size, bits=bits)
                theirs, config = mlx_lm_load(directory)
                mlx_lm_quantize(theirs, config, group_size=args.group_size, bits=bits)
                yield f"{bits}-bit", q, theirs

        reference = mixtral_mlx.load(directory)[0]
        rows, deviations = [], []
        for name, model, theirs in variants():
            for n in args.prompt_tokens:
                speed = measure({"ours": (ours, model), "mlx-lm": (mlx_lm_tokens, theirs)}, n, args.new_tokens,
                                args.repeats, vocab)
                rows.append((name, n, speed["ours"][0], speed["mlx-lm"][0], speed["ours"][1], speed["mlx-lm"][1]))
            if name != "float32":
                deviations.append((name, logit_deviation(reference, model, vocab)))
        # The float32 model's other decoding paths: MLX's compiled one-token step (what
        # runs where the NumPy step does not), with the chosen experts gathered or all run.
        os.environ["MIXTRAL_MLX_DECODE"] = "mlx"
        try:
            gathered = mixtral_mlx.load(directory)[0]
            dense = mixtral_mlx.load(directory)[0]
            dense.set_moe_dispatch("dense")
            mlx_step = measure({"gather": (ours, gathered), "dense": (ours, dense)}, args.prompt_tokens[0],
                               args.new_tokens, args.repeats, vocab)
        finally:
            del os.environ["MIXTRAL_MLX_DECODE"]

    print("| weights | prompt | prefill tok/s (mixtral-mlx) | prefill tok/s (mlx-lm) "
          "| decode tok/s (mixtral-mlx) | decode tok/s (mlx-lm) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, p1, p2, d1, d2 in rows:
        print(f"| {name} | {n} | {p1:,.0f} | {p2:,.0f} | {d1:,.1f} | {d2:,.1f} |")
    print(f"\nfloat32 decode through MLX's compiled step instead of the NumPy one (prompt {args.prompt_tokens[0]}): "
          f"{mlx_step['gather'][1]:,.1f} tok/s; with the MoE forced to the dense dispatch (every expert on every "
          f"token): {mlx_step['dense'][1]:,.1f} tok/s")
    print("\n| weights | max abs logit error | mean abs logit error | logit std (float) | KL(float ‖ quantized) "
          "| top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, d in deviations:
        print(f"| {name} | {d['max']:.4f} | {d['mean']:.4f} | {d['logit std']:.3f} | {d['kl']:.2e} "
              f"| {d['top-1 agreement']:.1%} |")


if __name__ == "__main__":
    main()
