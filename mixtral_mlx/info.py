"""Parameter, FLOP and memory accounting for a `ModelArgs`, from the config alone."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import ModelArgs

# Bytes per weight; quantized formats add one float16 scale and bias per group of 64.
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8-bit": 1 + 4 / 64, "4-bit": 0.5 + 4 / 64}


@dataclass
class ParamCount:
    embedding: int
    attention: int
    router: int
    experts: int
    experts_active: int
    norms: int
    head: int

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.router + self.experts + self.norms + self.head

    @property
    def active(self) -> int:
        """Parameters that touch one token: every expert but the k it is routed to is idle."""
        return self.total - self.experts + self.experts_active

    def rows(self) -> list[tuple[str, int, int]]:
        """(component, total, active per token)."""
        return [
            ("embedding", self.embedding, self.embedding),
            ("attention", self.attention, self.attention),
            ("router", self.router, self.router),
            ("experts", self.experts, self.experts_active),
            ("norms", self.norms, self.norms),
            ("output head", self.head, self.head),
            ("total", self.total, self.active),
        ]


def count_parameters(args: ModelArgs) -> ParamCount:
    h, d, n = args.hidden_size, args.head_dim, args.num_hidden_layers
    q_and_o = 2 * h * args.num_attention_heads * d
    k_and_v = 2 * h * args.num_key_value_heads * d
    per_expert = 3 * h * args.intermediate_size  # w1, w3: h -> i; w2: i -> h
    return ParamCount(
        embedding=args.vocab_size * h,
        attention=n * (q_and_o + k_and_v),
        router=n * h * args.num_local_experts,
        experts=n * args.num_local_experts * per_expert,
        experts_active=n * args.num_experts_per_tok * per_expert,
        norms=(2 * n + 1) * h,
        head=0 if args.tie_word_embeddings else args.vocab_size * h,
    )


def flops_per_token(args: ModelArgs, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token (PaLM's accounting): 2 per active matmul weight, plus attention.

    Attention scores and the weighted sum cost 2 * 2 * layers * heads * head_dim FLOPs per
    key attended; a token attends to min(seq_len, window) keys (counting the full span, as
    PaLM does, not the causal half). Training = forward + backward = 3x forward.
    """
    p = count_parameters(args)
    matmul_weights = p.active - p.embedding - p.norms + (p.embedding if args.tie_word_embeddings else 0)
    keys = min(seq_len, args.sliding_window or seq_len)
    attn = 4 * args.num_hidden_layers * args.num_attention_heads * args.head_dim * keys
    forward = 2 * matmul_weights + attn
    return {"forward": float(forward), "train_step": float(3 * forward)}


def weight_memory(args: ModelArgs) -> dict[str, float]:
    """Bytes of weights per storage format (norms and router stay in float for quantized models)."""
    total = count_parameters(args).total
    return {name: total * b for name, b in BYTES_PER_WEIGHT.items()}


def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def human_bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {suffix}"
        n /= 1024
    return f"{n:.1f} PiB"


def matmul_gflops(n: int = 512, repeats: int = 5) -> float:
    """Measured float32 matmul rate on the default device, GFLOP/s: the fastest of `repeats`
    products (a peak: on a shared machine the mean reads whatever else was running)."""
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 / fastest / 1e9
