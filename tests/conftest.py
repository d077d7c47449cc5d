"""Shared fixtures: tiny reference models written by transformers, and the shared data sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mixtral_mlx  # noqa: F401  (loads OpenBLAS before mlx is imported anywhere)
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MIXTRAL_MLX_SHARED_DATA", REPO.parent / "shared" / "data"))


def hf_config(**overrides):
    """A random tiny MixtralConfig; every field a test may vary is an override."""
    from transformers import MixtralConfig

    values = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, max_position_embeddings=256, rope_theta=1e4,
                  sliding_window=None, tie_word_embeddings=False)
    values.update(overrides)
    return MixtralConfig(**values)


def write_hf_model(directory: Path, seed: int = 0, **overrides):
    """Save a randomly initialised transformers MixtralForCausalLM; returns the torch model."""
    import torch
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():  # make the routers decisive so top-k choices are not near-ties
        for layer in model.model.layers:
            moe = getattr(layer, "mlp", None) or layer.block_sparse_moe  # transformers v5 / v4
            moe.gate.weight.mul_(20)
    model.save_pretrained(directory)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def set_rope_v4_style(directory: Path) -> None:
    """Rewrite config.json the transformers-v4 way: a top-level rope_theta, no rope_parameters."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    path.write_text(json.dumps(config))


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None, timeout: int = 300, env=None):
    """Run `python -m mixtral_mlx ARGS` the way a user runs the console script."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "mixtral_mlx", *args], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def assert_user_error(result, *needles: str) -> None:
    """Exit code 2, one line on stderr containing every needle, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="session", autouse=True)
def tokenized_cache(tmp_path_factory):
    """Keep the tests' tokenized splits out of the user's cache (CLI subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("tokenized-cache")
    previous = os.environ.get("MIXTRAL_MLX_CACHE")
    os.environ["MIXTRAL_MLX_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("MIXTRAL_MLX_CACHE", None)
    else:
        os.environ["MIXTRAL_MLX_CACHE"] = previous


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA} (set MIXTRAL_MLX_SHARED_DATA)")
    return SHARED_DATA


# A little English, with accents, CJK and emoji, for tokenizers trained without the shared data.
INLINE_TEXT = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps on, and the fox runs home.",
    "Once upon a time there was a little girl who loved to read stories about dragons.",
    "Café, naïve, über: accents are bytes too. 日本語のテキスト. Emoji: 😀 🎉 ☃.",
] * 50


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A small SentencePiece model (byte fallback, pad id 3) trained on the spot.

    From the first lines of tinyshakespeare when the shared data is present, else
    from INLINE_TEXT; either way unknown characters fall back to their UTF-8 bytes.
    """
    import itertools

    import sentencepiece as spm

    source = SHARED_DATA / "tinyshakespeare" / "train.jsonl"
    lines = INLINE_TEXT
    if source.exists():
        with open(source, encoding="utf-8") as f:
            lines = [json.loads(line)["text"] for line in itertools.islice(f, 2000)] + INLINE_TEXT
    prefix = tmp_path_factory.mktemp("spm") / "tokenizer"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=384,
                                   byte_fallback=True, pad_id=3, minloglevel=2)
    return prefix.with_suffix(".model")
