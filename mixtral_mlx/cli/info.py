"""`mixtral-mlx info`: the machine, MLX, the BLAS, the fused kernels' compiler flags, and a model's parameters, FLOPs and memory."""

from __future__ import annotations

import argparse
import platform


def register(sub) -> None:
    p = sub.add_parser("info", help="show MLX's device and BLAS, and a model's size, FLOPs and memory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a model directory (config.json) or Hub repo")
    src.add_argument("--preset", help="a built-in preset (tiny, small, minimixtral-175m, mixtral-8x7b)")
    p.add_argument("--seq-len", type=int, default=None, help="context length for the FLOP count (default: min(2048, max positions))")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from .. import blas, cpu_jit, cpu_streams
    from ..config import ModelArgs, load_preset
    from ..checkpoint import resolve
    from ..info import count_parameters, flops_per_token, human, human_bytes, matmul_gflops, weight_memory

    print(f"machine   {platform.system()} {platform.machine()}, python {platform.python_version()}")
    print(f"mlx       {mx.__version__}, device {mx.default_device()}")
    print(f"blas      {blas.status}; float32 matmul {matmul_gflops():.0f} GFLOP/s")
    print(f"kernels   {cpu_jit.status}")
    shards = cpu_streams.default_shards(1)
    print(f"streams   a training step on {f'{shards} CPU streams' if shards > 1 else 'one stream'}; "
          f"MLX's evaluation order: {cpu_streams.status}")
    if mx.default_device() == mx.cpu:
        from ..moe import default_max_block

        small = load_preset("small")
        one, more = (default_max_block(small.hidden_size, small.intermediate_size, threads) for threads in (1, 2))
        blocks = (f"{one} rows on one BLAS thread (a training step's CPU streams; as many as OpenBLAS's "
                  f"small-matrix kernels take), {more} on more" if one != more else
                  f"{more} rows (no small-matrix kernels in this BLAS)")
        print(f"moe       the grouped dispatch multiplies the small preset's experts in blocks of up to {blocks}")
    if args.model is None and args.preset is None:
        return 0
    if args.preset:
        model_args, name = load_preset(args.preset), f"preset {args.preset}"
    else:
        directory = resolve(args.model)
        model_args, name = ModelArgs.from_file(directory / "config.json"), str(directory)
    a = model_args
    window = f", sliding window {a.sliding_window}" if a.sliding_window else ""
    print(f"\nmodel     {name}: {a.num_hidden_layers} layers, hidden {a.hidden_size}, "
          f"{a.num_attention_heads} heads / {a.num_key_value_heads} KV (head dim {a.head_dim}), "
          f"{a.num_local_experts} experts top-{a.num_experts_per_tok}, intermediate {a.intermediate_size}, "
          f"vocab {a.vocab_size}{window}")
    counts = count_parameters(a)
    print(f"\n{'parameters':<14}{'total':>18}{'active/token':>18}")
    for component, total, active in counts.rows():
        print(f"{component:<14}{total:>18,}{active:>18,}")
    seq = args.seq_len or min(2048, a.max_position_embeddings)
    flops = flops_per_token(a, seq)
    print(f"\nFLOPs per token at context {seq}: forward {human(flops['forward'], 'FLOP')}, "
          f"training step {human(flops['train_step'], 'FLOP')}")
    print("weight memory: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in weight_memory(a).items()))
    return 0
