"""Generation: modes against transformers, sampling filters, caches, streaming text, the CLI."""

from __future__ import annotations

import importlib
import json
import random
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mixtral_mlx
from conftest import assert_user_error, hf_logits, run_cli, write_hf_model
from mixtral_mlx.cache import make_cache
from mixtral_mlx.errors import UserError
from mixtral_mlx.generate import (GenerationConfig, PromptCache, StopStrings, StreamingDetokenizer,
                                  apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p,
                                  generate_step, log_softmax, make_sampler, stream_generate)
from mixtral_mlx.tokenizer import SentencePieceTokenizer, Tokenizer, train_tokenizer

ATOL = 1e-4
PROMPT = "To be, or not to be, that is the question"


@pytest.fixture(scope="module")
def tokenizer(sp_model) -> Tokenizer:
    """SentencePiece as Mixtral's own tokenizer.model is set up: dummy prefix, spaces stripped at the start."""
    return SentencePieceTokenizer(sp_model)


@pytest.fixture(scope="module")
def project_tokenizer() -> Tokenizer:
    """The kind `mixtral-mlx tokenizer` trains: no dummy prefix, chat headers as single tokens."""
    from conftest import INLINE_TEXT

    return train_tokenizer(INLINE_TEXT, 400)


@pytest.fixture(params=["mixtral-style", "project"])
def any_tokenizer(request) -> Tokenizer:
    return request.getfixturevalue("tokenizer" if request.param == "mixtral-style" else "project_tokenizer")


def make_model_dir(path, sp_model, **overrides):
    """A random transformers Mixtral sized to the test tokenizer, saved with it; returns the torch model."""
    overrides = {"vocab_size": 384, **overrides}
    hf = write_hf_model(path, **overrides)
    shutil.copy(sp_model, path / "tokenizer.model")
    return hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sp_model):
    path = tmp_path_factory.mktemp("model")
    return path, make_model_dir(path, sp_model, seed=3)


@pytest.fixture(scope="module")
def model(model_dir):
    return mixtral_mlx.load(model_dir[0])[0]


def hf_greedy(hf_model, ids: list[int], max_new_tokens: int, eos_id: int, **kwargs) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=eos_id, pad_token_id=eos_id, **kwargs)
    return out[0, len(ids):].tolist()


# ---------------------------------------------------------------------- raw logits
def test_raw_logits_equal_forward_and_transformers(model_dir, model, tokenizer):
    ids = tokenizer.encode(PROMPT, bos=True)
    reference = hf_logits(model_dir[1], np.array([ids]))[0]
    forward = np.array(model(mx.array([ids]))[0])
    last = np.array(mixtral_mlx.next_token_logits(model, tokenizer, PROMPT))
    every = np.array(mixtral_mlx.next_token_logits(model, tokenizer, PROMPT, all_positions=True, prefill_chunk=5))
    np.testing.assert_allclose(last, forward[-1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(last, reference[-1], atol=ATOL, rtol=0)
    np.testing.assert_allclose(every, reference, atol=ATOL, rtol=0)
    result = mixtral_mlx.generate(model, tokenizer, PROMPT, mode="raw", top_logprobs=3)
    np.testing.assert_array_equal(np.array(result.logits), last)
    assert [t for t, _ in result.top_logprobs[0]] == np.argsort(-last)[:3].tolist()


# ---------------------------------------------------------------------- greedy vs transformers
@pytest.mark.parametrize("window", [None, 8])
def test_greedy_equals_transformers(tmp_path, sp_model, tokenizer, window):
    """32 tokens after a 12-token prompt: with window 8 the rolling cache wraps many times."""
    hf = make_model_dir(tmp_path, sp_model, seed=5, sliding_window=window)
    model, tok = mixtral_mlx.load(tmp_path)
    ids = tokenizer.encode(PROMPT, bos=True)[:12]
    ours = mixtral_mlx.generate(model, tok, ids, mode="greedy", max_tokens=32, prefill_chunk=5)
    assert ours.tokens == hf_greedy(hf, ids, 32, tok.eos_id)
    assert ours.finish_reason in ("length", "eos")


def test_greedy_with_repetition_penalty_equals_transformers(tmp_path, sp_model):
    hf = make_model_dir(tmp_path, sp_model, seed=6)
    model, tok = mixtral_mlx.load(tmp_path)
    ids = tok.encode(PROMPT, bos=True)
    ours = mixtral_mlx.generate(model, tok, ids, mode="greedy", max_tokens=24, repetition_penalty=1.5)
    assert ours.tokens == hf_greedy(hf, ids, 24, tok.eos_id, repetition_penalty=1.5)
    assert ours.tokens != mixtral_mlx.generate(model, tok, ids, mode="greedy", max_tokens=24).tokens


# ---------------------------------------------------------------------- caches
def test_rolling_cache_memory_flat_and_cached_logits_equal_recomputed(tmp_path, sp_model):
    window = 16
    make_model_dir(tmp_path, sp_model, seed=7, sliding_window=window)
    model, _ = mixtral_mlx.load(tmp_path)
    prompt = list(range(5, 15))
    cache = make_cache(model)
    config = GenerationConfig(mode="greedy")
    tokens, logprobs, memory = [], [], {}
    for n, (token, lp) in enumerate(generate_step(model, prompt, config, cache, limit=4 * window), start=1):
        tokens.append(token)
        logprobs.append(np.array(lp))
        if n in (window, 4 * window):
            memory[n] = sum(c.nbytes for c in cache)
    assert len(tokens) == 4 * window
    assert memory[window] == memory[4 * window] > 0
    full = mx.array([prompt + tokens[:-1]])
    recomputed = np.array(model(full)[0, len(prompt) - 1 :])
    recomputed -= np.log(np.exp(recomputed).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.stack(logprobs), recomputed, atol=ATOL, rtol=0)


def test_prompt_cache_reuses_a_prefix_and_trims_a_divergent_one(model, tokenizer):
    cache = PromptCache(model)
    first = tokenizer.encode(PROMPT, bos=True)
    a = [c.token for c in stream_generate(model, tokenizer, first, cache=cache, mode="greedy", max_tokens=6)]
    assert cache.tokens == first + a
    longer = first + a + tokenizer.encode(" and then")
    divergent = first[:5] + tokenizer.encode(" something else")
    for prompt in (longer, divergent):
        reused = [c.token for c in stream_generate(model, tokenizer, prompt, cache=cache, mode="greedy", max_tokens=6)]
        fresh = mixtral_mlx.generate(model, tokenizer, prompt, mode="greedy", max_tokens=6).tokens
        assert reused == fresh


def test_prompt_too_long_is_an_error_unless_truncated(model, tokenizer):
    context = model.args.max_position_embeddings
    ids = [tokenizer.bos_id] + [300] * (context + 10)
    with pytest.raises(UserError, match="more than the model's context"):
        mixtral_mlx.generate(model, tokenizer, ids, mode="greedy", max_tokens=4)
    result = mixtral_mlx.generate(model, tokenizer, ids, mode="greedy", max_tokens=4, truncate_prompt=True)
    assert result.stats.prompt_tokens == context - 4 and len(result.tokens) == 4


def test_generation_stops_at_the_end_of_the_context(model, tokenizer):
    context = model.args.max_position_embeddings
    result = mixtral_mlx.generate(model, tokenizer, [tokenizer.bos_id] + [300] * (context - 3), mode="greedy",
                                  max_tokens=100)
    assert len(result.tokens) == 3 and result.finish_reason == "context"


# ---------------------------------------------------------------------- sampling
KNOWN = np.log(np.array([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=np.float32))


def draws(logits: np.ndarray, n: int = 4000, **sampler) -> set[int]:
    sample = make_sampler(**sampler)
    return set(np.array(sample(mx.array(np.repeat(logits, n, axis=0)), mx.random.key(0))).tolist())


@pytest.mark.parametrize("settings,allowed", [
    (dict(top_p=0.65), {0, 1}),
    (dict(top_p=0.9), {0, 1, 2, 3}),
    (dict(min_p=0.25), {0, 1, 2}),
    (dict(min_p=0.35), {0, 1}),
    (dict(top_k=3), {0, 1, 2}),
    (dict(top_k=2, top_p=0.9, min_p=0.05), {0, 1}),
    (dict(), {0, 1, 2, 3, 4}),
])
def test_filters_never_emit_outside_the_allowed_set(settings, allowed):
    assert draws(KNOWN, temp=1.0, **settings) == allowed  # every allowed token is drawn, no other


def test_filters_equal_transformers_warpers():
    import torch
    from transformers.generation import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).normal(size=(8, 200)).astype(np.float32) * 3
    ids = torch.zeros((8, 1), dtype=torch.long)
    for ours, theirs in [(lambda x: apply_top_k(x, 7), TopKLogitsWarper(7)),
                         (lambda x: apply_top_p(x, 0.8), TopPLogitsWarper(0.8)),
                         (lambda x: apply_min_p(x, 0.1), MinPLogitsWarper(0.1))]:
        kept = np.isfinite(np.array(ours(mx.array(logits))))
        np.testing.assert_array_equal(kept, np.isfinite(theirs(ids, torch.tensor(logits)).numpy()))


def test_top_k_and_top_p_keep_the_tokens_tied_with_their_last():
    # 0.4 + 0.2 reaches p = 0.55 with one of the three tokens at 0.2; all three stay.
    logits = mx.log(mx.array([[0.4, 0.2, 0.2, 0.2]]))
    assert np.isfinite(np.array(apply_top_p(logits, 0.55))).tolist() == [[True] * 4]
    assert np.isfinite(np.array(apply_top_p(logits, 0.3))).tolist() == [[True, False, False, False]]
    assert np.isfinite(np.array(apply_top_k(logits, 2))).tolist() == [[True] * 4]


def test_repetition_penalty_formula():
    import torch
    from transformers.generation import RepetitionPenaltyLogitsProcessor

    logits = np.array([[2.0, -1.0, 0.5, -3.0, 1.0]], dtype=np.float32)
    seen = np.array([True, True, False, True, False])
    ours = np.array(apply_repetition_penalty(mx.array(logits), mx.array(seen), 2.0))
    np.testing.assert_allclose(ours, [[1.0, -2.0, 0.5, -6.0, 1.0]])
    theirs = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 3, 1]]), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(ours, theirs)


def test_seeded_sampling_is_reproducible_and_top_k_1_or_temp_0_is_greedy(model, tokenizer):
    def tokens(**settings):
        return mixtral_mlx.generate(model, tokenizer, PROMPT, max_tokens=16, **settings).tokens

    assert tokens(seed=1) == tokens(seed=1)
    assert tokens(seed=1) != tokens(seed=2)
    greedy = tokens(mode="greedy")
    assert tokens(temp=0.0, seed=3) == greedy
    assert tokens(top_k=1, seed=4) == greedy
    assert tokens(mode="one-token") == greedy[:1]


@pytest.mark.parametrize("settings,flag", [
    (dict(temp=-1.0), "--temp"), (dict(top_p=0.0), "--top-p"), (dict(top_p=1.5), "--top-p"),
    (dict(mode="beam"), "--mode"), (dict(max_tokens=0), "--max-tokens"), (dict(top_k=-1), "--top-k"),
    (dict(repetition_penalty=0.0), "--repetition-penalty"), (dict(stop=("",)), "--stop"),
])
def test_bad_settings_name_their_flag(model, tokenizer, settings, flag):
    with pytest.raises(UserError, match=flag):
        mixtral_mlx.generate(model, tokenizer, PROMPT, **settings)


def test_empty_prompt_is_an_error(model, tokenizer):
    for prompt in ("", "  \n", []):
        with pytest.raises(UserError, match="empty"):
            mixtral_mlx.generate(model, tokenizer, prompt)


# ---------------------------------------------------------------------- streaming text
def with_byte_tokens(tokenizer, ids: list[int], rng: random.Random) -> list[int]:
    """`ids` with about half the pieces spelled as their UTF-8 byte tokens instead."""
    out = []
    for t in ids:
        piece = tokenizer.sp.id_to_piece(t)
        if rng.random() < 0.5 and not tokenizer.sp.is_byte(t) and "▁" not in piece:
            out += [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in piece.encode()]
        else:
            out.append(t)
    return out


def test_detokenizer_streams_whole_characters(any_tokenizer):
    tokenizer = any_tokenizer
    rng = random.Random(0)
    for text in ["wörld 日本語 😀 end", "a  b c", " Ünïcödé ☃ 🎉🎉 ok", "x", "Ω≈ç√ 漢字"]:
        for context in (tokenizer.encode("Hello", bos=True), [tokenizer.bos_id]):
            ids = with_byte_tokens(tokenizer, tokenizer.encode(text), rng)
            assert any(tokenizer.sp.is_byte(t) for t in ids) or text.isascii()
            detokenizer = StreamingDetokenizer(tokenizer, context)
            pieces = [detokenizer.add(t) for t in ids] + [detokenizer.finalize()]
            assert not any("\ufffd" in p for p in pieces), pieces
            assert "".join(pieces) == tokenizer.decode(context + ids)[len(tokenizer.decode(context)):]


def test_detokenizer_keeps_the_space_after_the_prompt(any_tokenizer):
    tokenizer = any_tokenizer
    prompt = tokenizer.encode("Hello", bos=True)
    world = tokenizer.encode(" world")
    detokenizer = StreamingDetokenizer(tokenizer, prompt)
    assert "".join(detokenizer.add(t) for t in world) + detokenizer.finalize() == " world"
    space = tokenizer.sp.piece_to_id("▁")
    assert space != tokenizer.sp.unk_id()
    spaces = [space, space] + world
    detokenizer = StreamingDetokenizer(tokenizer, prompt)
    assert "".join(detokenizer.add(t) for t in spaces) + detokenizer.finalize() == "   world"


def test_decoding_alone_drops_a_leading_space(tokenizer):
    """The trap the detokenizer avoids: Mixtral-style SentencePiece strips it."""
    assert tokenizer.decode(tokenizer.encode(" world")) == "world"


def test_detokenizer_never_stalls_on_invalid_bytes(any_tokenizer):
    tokenizer = any_tokenizer
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(40)]
        detokenizer = StreamingDetokenizer(tokenizer, [tokenizer.bos_id])
        pieces = []
        for t in ids:
            pieces.append(detokenizer.add(t))
            assert len(detokenizer.pending) <= 3
        pieces.append(detokenizer.finalize())
        expected = tokenizer.decode([tokenizer.bos_id] + ids)
        assert "".join(pieces).replace("\ufffd", "") == expected.replace("\ufffd", "")


def test_stop_strings_hold_back_possible_starts():
    stops = StopStrings(["### User", "END"])
    assert stops.add("Hello #") == ("Hello ", False)
    assert stops.add("## Use") == ("", False)
    assert stops.add("d to it") == ("### Used to it", False)
    assert stops.add(" E") == (" ", False)
    assert stops.add("N then ### User: hi") == ("EN then ", True)


def test_generation_stops_at_a_stop_string_and_at_eos(model, tokenizer):
    full = mixtral_mlx.generate(model, tokenizer, PROMPT, mode="greedy", max_tokens=30)
    stop = full.text[10:13]
    stopped = mixtral_mlx.generate(model, tokenizer, PROMPT, mode="greedy", max_tokens=30, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]

    class EndsAtFifth(SentencePieceTokenizer):  # the model's 5th greedy token plays the end-of-sequence token
        eos_id = full.tokens[4]

    eos_tokenizer = EndsAtFifth(tokenizer.model_file)
    ended = mixtral_mlx.generate(model, eos_tokenizer, PROMPT, mode="greedy", max_tokens=30)
    assert ended.tokens == full.tokens[: full.tokens.index(full.tokens[4]) + 1]
    assert ended.finish_reason == "eos"
    assert ended.text == tokenizer.decode(tokenizer.encode(PROMPT, bos=True) + ended.tokens[:-1])[len(PROMPT):]


def test_stream_chunks_add_up_to_the_result(model, tokenizer):
    chunks = list(stream_generate(model, tokenizer, PROMPT, seed=0, max_tokens=20, top_logprobs=2))
    result = mixtral_mlx.generate(model, tokenizer, PROMPT, seed=0, max_tokens=20, top_logprobs=2)
    assert "".join(c.text for c in chunks) == result.text
    assert [c.token for c in chunks] == result.tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0][1] >= c.logprob for c in chunks)
    assert [c.stats.generation_tokens for c in chunks] == list(range(1, len(chunks) + 1))
    assert chunks[-1].stats.prompt_tps > 0 and chunks[-1].stats.peak_memory > 0


# ---------------------------------------------------------------------- the command
def test_cli_greedy_streams_the_api_text(model_dir, model, tokenizer):
    expected = mixtral_mlx.generate(model, tokenizer, PROMPT, mode="greedy", max_tokens=20)
    result = run_cli("generate", "--model", str(model_dir[0]), "--prompt", PROMPT, "--mode", "greedy",
                     "--max-tokens", "20", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected.text + "\n"
    assert "prompt: " in result.stderr and "tokens/s" in result.stderr and "peak memory" in result.stderr


def test_cli_raw_writes_logits_and_prints_the_top(tmp_path, model_dir, model, tokenizer):
    out = tmp_path / "logits.npy"
    result = run_cli("generate", "--model", str(model_dir[0]), "--prompt", "-", "--mode", "raw",
                     "--logits-out", str(out), "--top-logprobs", "4", "--json", input=PROMPT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    logits = np.load(out)
    np.testing.assert_array_equal(logits, np.array(mixtral_mlx.next_token_logits(model, tokenizer, PROMPT)))
    assert [row["id"] for row in report["top"]] == np.argsort(-logits)[:4].tolist()


def test_cli_one_token_and_sample_json(model_dir, model, tokenizer):
    one = run_cli("generate", "--model", str(model_dir[0]), "--prompt", PROMPT, "--mode", "one-token", "--json")
    assert one.returncode == 0, one.stderr
    report = json.loads(one.stdout)
    logits = np.array(mixtral_mlx.next_token_logits(model, tokenizer, PROMPT))
    assert report["token"] == int(np.argmax(logits))
    assert report["prob"] == pytest.approx(float(np.exp(logits.max() - np.log(np.exp(logits).sum()))), rel=1e-4)
    sampled = run_cli("generate", "--model", str(model_dir[0]), "--prompt", PROMPT, "--seed", "7",
                      "--max-tokens", "12", "--json")
    report = json.loads(sampled.stdout)
    expected = mixtral_mlx.generate(model, tokenizer, PROMPT, seed=7, max_tokens=12)
    assert report["tokens"] == expected.tokens and report["text"] == expected.text


def test_cli_chat_keeps_history(model_dir):
    result = run_cli("chat", "--model", str(model_dir[0]), "--max-tokens", "8", "--seed", "0", "--verbose",
                     input="Hello there\nHow are you?\n")
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("prompt: ")]
    assert len(stats) == 2
    assert int(stats[1].split()[1]) > int(stats[0].split()[1])  # the second prompt holds the first turn


@pytest.mark.parametrize("args,needles", [
    (["--model", "{missing}", "--prompt", "hi"], ["no such model directory"]),
    (["--prompt", "hi", "--temp", "-0.5"], ["--temp"]),
    (["--prompt", "hi", "--top-p", "0"], ["--top-p"]),
    (["--prompt", "hi", "--top-p", "1.5"], ["--top-p"]),
    (["--prompt", "   "], ["--prompt", "empty"]),
    (["--prompt", "hi", "--mode", "beam"], ["--mode", "invalid choice"]),
    (["--prompt-file", "{missing}"], ["no such file"]),
    (["--prompt", "hi", "--mode", "raw", "--logits-out", "{missing}/x.npy"], ["--logits-out"]),
    (["--prompt", "hi", "--logits-out", "{tmp}/x.npy"], ["--logits-out", "raw"]),
])
def test_cli_bad_input(tmp_path, model_dir, args, needles):
    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in args]
    if "--model" not in args:
        args = ["--model", str(model_dir[0])] + args
    assert_user_error(run_cli("generate", *args, cwd=tmp_path), *needles)
    assert list(tmp_path.iterdir()) == []


def test_cli_ctrl_c_stops_cleanly_with_stats(model_dir, monkeypatch, capsys):
    from mixtral_mlx import cli

    generate_module = importlib.import_module("mixtral_mlx.generate")  # the package exports a function of that name

    real = generate_module.stream_generate

    def interrupted(*args, **kwargs):
        for n, chunk in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(generate_module, "stream_generate", interrupted)
    code = cli.main(["generate", "--model", str(model_dir[0]), "--prompt", PROMPT, "--mode", "greedy"])
    err = capsys.readouterr().err
    assert code == 130
    assert "[interrupted] prompt:" in err and "generation: 3 tokens" in err


def test_cli_hub_repo_is_downloaded_through_huggingface_hub(model_dir, model, tokenizer, monkeypatch, capsys):
    import huggingface_hub

    from mixtral_mlx import cli

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(model_dir[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    code = cli.main(["generate", "--model", "someone/tiny-mixtral", "--prompt", PROMPT, "--mode", "greedy",
                     "--max-tokens", "10"])
    assert code == 0 and calls == ["someone/tiny-mixtral"]
    expected = mixtral_mlx.generate(model, tokenizer, PROMPT, mode="greedy", max_tokens=10)
    assert capsys.readouterr().out == expected.text + "\n"


# ---------------------------------------------------------------------- adapters
def write_mlx_lm_adapter(directory, model, rank: int = 4, scale: float = 2.0, seed: int = 0, base_model=None):
    """A LoRA adapter on every q_proj in mlx-lm's layout; returns {layer: (lora_a, lora_b)}."""
    rng = np.random.default_rng(seed)
    h, q = model.args.hidden_size, model.args.num_attention_heads * model.args.head_dim
    arrays = {}
    for i in range(len(model.layers)):
        arrays[f"model.layers.{i}.self_attn.q_proj.lora_a"] = mx.array(rng.normal(size=(h, rank)).astype(np.float32) * 0.1)
        arrays[f"model.layers.{i}.self_attn.q_proj.lora_b"] = mx.array(rng.normal(size=(rank, q)).astype(np.float32) * 0.1)
    directory.mkdir()
    mx.save_safetensors(str(directory / "adapters.safetensors"), arrays)
    config = {"fine_tune_type": "lora", "num_layers": len(model.layers),
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}
    if base_model is not None:
        config["base_model"] = base_model
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return arrays


def test_cli_adapter_is_added_to_the_model(tmp_path, model_dir, tokenizer):
    pytest.importorskip("mixtral_mlx.lora", reason="adapters come with the fine-tuning module")
    fused, _ = mixtral_mlx.load(model_dir[0])
    arrays = write_mlx_lm_adapter(tmp_path / "adapter", fused)
    for i, layer in enumerate(fused.layers):  # the adapter folded into the weights by hand
        a, b = arrays[f"model.layers.{i}.self_attn.q_proj.lora_a"], arrays[f"model.layers.{i}.self_attn.q_proj.lora_b"]
        layer.self_attn.q_proj.weight = layer.self_attn.q_proj.weight + 2.0 * (a @ b).T
    out = tmp_path / "logits.npy"
    result = run_cli("generate", "--model", str(model_dir[0]), "--adapter", str(tmp_path / "adapter"),
                     "--prompt", PROMPT, "--mode", "raw", "--logits-out", str(out))
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(out), np.array(mixtral_mlx.next_token_logits(fused, tokenizer, PROMPT)),
                               atol=ATOL, rtol=0)


def test_cli_adapter_for_another_base_is_refused(tmp_path, model_dir, model):
    pytest.importorskip("mixtral_mlx.lora", reason="adapters come with the fine-tuning module")
    other = model.args.to_hf() | {"hidden_size": 2 * model.args.hidden_size}
    write_mlx_lm_adapter(tmp_path / "adapter", model, base_model=other)
    result = run_cli("generate", "--model", str(model_dir[0]), "--adapter", str(tmp_path / "adapter"),
                     "--prompt", PROMPT, "--mode", "greedy")
    assert_user_error(result, "adapter_config.json", "another base")
    missing = run_cli("generate", "--model", str(model_dir[0]), "--adapter", str(tmp_path / "none"),
                      "--prompt", PROMPT)
    assert_user_error(missing, "--adapter", "no such adapter directory")


def test_cli_chat_flag_encodes_the_conversation_as_fine_tuning_does(model_dir, model, tokenizer):
    from mixtral_mlx.generate import chat_prompt

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    ids, stops = chat_prompt(tokenizer, messages)
    assert ids == tokenizer.encode_chat(messages, add_generation_prompt=True)[0]
    expected = mixtral_mlx.generate(model, tokenizer, ids, mode="greedy", max_tokens=10, stop=stops)
    result = run_cli("generate", "--model", str(model_dir[0]), "--system", "Be brief.", "--prompt", "Who are you?",
                     "--mode", "greedy", "--max-tokens", "10", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["stats"]["prompt_tokens"] == len(ids) and report["tokens"] == expected.tokens


def test_log_softmax_equals_float64_reference_and_keeps_masked_tokens_out():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 8000)) * 8).astype(np.float32)
    logits[1, :4000] = -np.inf  # masked by top-k or top-p before the log-probs are taken
    x = logits.astype(np.float64)
    expected = x - (x.max(-1, keepdims=True) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))
    got = np.array(log_softmax(mx.array(logits)))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], atol=2e-5)  # float32 sums of 8,000 terms
    assert (got[~finite] == -np.inf).all()
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(-1), 1, atol=1e-5)
