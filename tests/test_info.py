"""Parameter and FLOP accounting against an independent count."""

from __future__ import annotations

from mixtral_mlx import Model, load_preset
from mixtral_mlx.info import count_parameters, flops_per_token
from conftest import run_cli


def test_counts_match_the_built_model():
    for name in ("tiny", "small"):
        args = load_preset(name)
        assert count_parameters(args).total == Model(args).num_parameters()


def test_counts_by_hand_for_tiny():
    # tiny: vocab 512, hidden 64, 2 layers, 4 heads (dim 16), 2 KV heads, 4 experts top-2, ffn 128
    embed = 512 * 64
    attn_per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o
    expert = 64 * 128 + 64 * 128 + 128 * 64  # w1, w3, w2
    router = 64 * 4
    norms = 2 * 64 * 2 + 64
    head = 512 * 64
    total = embed + 2 * (attn_per_layer + router + 4 * expert) + norms + head
    active = total - 2 * 2 * expert  # two of four experts idle per token in each layer
    c = count_parameters(load_preset("tiny"))
    assert (c.total, c.active) == (total, active)
    matmul = 2 * (attn_per_layer + router + 2 * expert) + head
    assert flops_per_token(load_preset("tiny"), 32)["forward"] == 2 * matmul + 4 * 2 * 4 * 16 * 32


def test_mixtral_8x7b_is_46_7b_with_12_9b_active():
    c = count_parameters(load_preset("mixtral-8x7b"))
    assert round(c.total / 1e9, 1) == 46.7 and round(c.active / 1e9, 1) == 12.9


def test_info_command_prints_device_blas_and_table():
    r = run_cli("info", "--preset", "small")
    assert r.returncode == 0, r.stderr
    for needle in ("mlx ", "blas ", "moe ", "experts", "total", "FLOPs per token", "bfloat16"):
        assert needle in r.stdout
