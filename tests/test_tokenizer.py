"""Tokenizers: SentencePiece training and ids, exact round trips, HF tokenizer.json, chat template."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mixtral_mlx  # noqa: F401  (preloads OpenBLAS before anything imports mlx)
from mixtral_mlx.config import load_preset
from mixtral_mlx.errors import UserError
from mixtral_mlx.tokenizer import (BOS_ID, EOS_ID, PAD_ID, UNK_ID, HFTokenizer, SentencePieceTokenizer,
                                   check_tokenizer, default_chat_template, load_tokenizer,
                                   train_tokenizer)

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
PUBLIC_SETS = ("wikitext-2", "wikitext-2-raw", "tinyshakespeare", "tinystories")

TRICKY = [
    "  two  spaces and a trailing space ",
    "\tTab, CR\r\nand\n\nblank lines\n",
    " leading space",
    "héllo wörld, 日本語, emoji 😀, Ωmega",
    "digits 2026 and 3.14159",
    "<s> and </s> and <pad> written as text",
    "### User: a header in the middle of text",
]


def corpus() -> list[str]:
    words = "the cat sat on a mat and the dog ran to the park with a red ball".split()
    return [" ".join(words[i:] + words[:i]) + f" {i * 7}." for i in range(len(words))] * 20


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> SentencePieceTokenizer:
    return train_tokenizer(corpus(), 320, tmp_path_factory.mktemp("tok"))


def test_special_ids_agree_with_the_model_config(sp):
    args = load_preset("tiny")
    assert (sp.sp.unk_id(), sp.bos_id, sp.eos_id, sp.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)
    assert (sp.bos_id, sp.eos_id) == (args.bos_token_id, args.eos_token_id)
    assert sp.pieces([0, 1, 2, 3, 4, 5, 6, 7]) == ["<unk>", "<s>", "</s>", "<pad>", "\n",
                                                   "###▁System:", "###▁User:", "###▁Assistant:"]
    assert sp.encode("### User: the cat\n### Assistant:")[:1] == [6] and sp.encode("\n### Assistant:") == [4, 7]
    check_tokenizer(sp, args)  # 320 <= 512 and the ids agree


def test_byte_fallback_split_digits_and_no_unknown_token(sp):
    ids = sp.encode("zebra 2026 ü")
    assert UNK_ID not in ids
    assert sp.pieces(sp.encode("2026")) == ["2", "0", "2", "6"]
    assert "<0xC3>" in sp.pieces(sp.encode("ü"))  # not in the corpus: its UTF-8 bytes
    assert sp.decode(ids) == "zebra 2026 ü"


@pytest.mark.parametrize("text", TRICKY)
def test_decode_encode_is_the_identity(sp, text):
    assert sp.decode(sp.encode(text)) == text


def test_bos_eos_and_batch_encoding(sp):
    texts = ["the cat", "a dog ran", ""]
    assert sp.encode("the cat", bos=True, eos=True) == [BOS_ID] + sp.encode("the cat") + [EOS_ID]
    assert sp.encode_batch(texts, num_threads=2) == [sp.encode(t) for t in texts]
    assert sp.encode_batch(texts, bos=True)[2] == [BOS_ID]


def test_training_is_deterministic(sp):
    assert train_tokenizer(corpus(), 320).fingerprint == sp.fingerprint


def test_vocab_size_is_an_upper_bound(tmp_path):
    small = train_tokenizer(corpus(), 8000)
    assert 270 < small.vocab_size < 8000  # the corpus has only so many distinct pieces
    assert train_tokenizer(corpus(), 300).vocab_size == 300


@pytest.mark.parametrize("vocab_size", [0, -5, 100])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(UserError, match="--vocab-size"):
        train_tokenizer(corpus(), vocab_size)


def test_train_on_nothing():
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(["", "\n\n"], 500)


def test_save_load_roundtrip_and_fingerprint(sp, tmp_path):
    sp.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.encode(TRICKY[3]) == sp.encode(TRICKY[3])
    assert loaded.fingerprint == sp.fingerprint
    assert load_tokenizer(tmp_path / "nothing-here") is None


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(tmp_path)


def test_check_tokenizer_rejects_a_vocabulary_the_model_cannot_embed(sp):
    args = load_preset("tiny")
    args.vocab_size = 100
    with pytest.raises(UserError, match="vocab_size: the tokenizer has 320 tokens"):
        check_tokenizer(sp, args, "model/config.json")
    args = load_preset("tiny")
    args.eos_token_id = 7
    with pytest.raises(UserError, match="eos_token_id"):
        check_tokenizer(sp, args)


# ---------------------------------------------------------------------- chat template
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who ran?"},
                {"role": "assistant", "content": "the dog"}, {"role": "user", "content": "Where to?"},
                {"role": "assistant", "content": "the park"}]


def test_default_template_text():
    assert default_chat_template(CONVERSATION[:2]) == "### System: Be brief.\n### User: Who ran?\n### Assistant:"
    assert default_chat_template(CONVERSATION[:3], add_generation_prompt=False) == (
        "### System: Be brief.\n### User: Who ran?\n### Assistant: the dog")


def test_encode_chat_masks_exactly_the_replies(sp):
    ids, mask = sp.encode_chat(CONVERSATION)
    assert len(ids) == len(mask) and ids[0] == BOS_ID
    replies = [[]]
    for i, m in zip(ids, mask):
        if m:
            replies[-1].append(i)
        elif replies[-1]:
            replies.append([])
    assert [sp.decode(r[:-1]) for r in replies] == [" the dog", " the park"]
    assert all(r[-1] == EOS_ID for r in replies)
    assert sp.decode([i for i, m in zip(ids, mask) if not m][1:]) == (
        "### System: Be brief.\n### User: Who ran?\n### Assistant:\n### User: Where to?\n### Assistant:")


def test_generation_prompt_is_a_prefix_of_the_trained_sequence(sp):
    """What generation feeds the model is exactly what fine-tuning trained it after."""
    prompt, _ = sp.encode_chat(CONVERSATION[:4], add_generation_prompt=True)
    full, mask = sp.encode_chat(CONVERSATION)
    assert full[:len(prompt)] == prompt and mask[len(prompt)] == 1 and not any(mask[len(prompt) - 3:len(prompt)])
    assert sp.encode(sp.apply_chat_template(CONVERSATION[:2])) == sp.encode_chat(CONVERSATION[:2], True)[0][1:]


# ---------------------------------------------------------------------- public data sets
@pytest.mark.skipif(not SHARED.exists(), reason=f"{SHARED} is absent: no public data sets to round-trip")
def test_round_trip_on_every_public_data_set():
    """decode(encode(x)) == x for every document of every split of ../shared/data."""
    docs = {}
    for name in PUBLIC_SETS:
        for split in ("train", "val", "test"):
            path = SHARED / name / f"{split}.jsonl"
            if path.exists():
                docs[f"{name}/{split}"] = [json.loads(line)["text"] for line in path.open(encoding="utf-8")]
    assert docs, f"no jsonl files under {SHARED}"
    sample = [d for texts in docs.values() for d in texts[:40]]
    tok = train_tokenizer(sample, 2000)
    for where, texts in docs.items():
        decoded = tok.sp.decode(tok.encode_batch(texts))
        bad = [i for i, (a, b) in enumerate(zip(texts, decoded)) if a != b]
        assert not bad, f"{where}: document {bad[0]} does not round-trip"
        assert UNK_ID not in {i for ids in tok.encode_batch(texts[:50]) for i in ids}


# ---------------------------------------------------------------------- Hugging Face tokenizer.json
def make_hf_tokenizer(directory: Path, chat_template: str | None) -> Path:
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(corpus(), trainer)
    directory.mkdir(parents=True, exist_ok=True)
    rust.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>"}
    if chat_template:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


HF_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
               "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> HFTokenizer:
    tok = load_tokenizer(make_hf_tokenizer(tmp_path_factory.mktemp("hf"), HF_TEMPLATE))
    assert isinstance(tok, HFTokenizer)
    return tok


def test_hf_tokenizer_ids_and_round_trip(hf):
    assert (hf.bos_id, hf.eos_id, hf.pad_id) == (0, 1, 2)
    text = "the dog ran to the park, 42 times"
    ids = hf.encode(text, bos=True, eos=True)
    assert ids[0] == hf.bos_id and ids[-1] == hf.eos_id
    assert hf.decode(ids[1:-1]) == text
    assert hf.encode_batch([text, "a cat"]) == [hf.encode(text), hf.encode("a cat")]


def test_hf_chat_template_and_reply_mask(hf):
    assert hf.has_chat_template
    assert hf.apply_chat_template(CONVERSATION[1:2]) == "<s><|user|>Who ran?<|assistant|>"
    ids, mask = hf.encode_chat(CONVERSATION[1:3])
    assert hf.decode([i for i, m in zip(ids, mask) if m]) == "the dog</s>"
    prompt, _ = hf.encode_chat(CONVERSATION[1:2], add_generation_prompt=True)
    assert ids[:len(prompt)] == prompt


def test_hf_without_template_uses_the_default(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path, None))
    assert not tok.has_chat_template
    assert tok.apply_chat_template(CONVERSATION[1:2]) == "### User: Who ran?\n### Assistant:"


def test_hf_tokenizer_saves_its_files(hf, tmp_path):
    hf.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    assert load_tokenizer(tmp_path).encode("the cat") == hf.encode("the cat")
    assert load_tokenizer(tmp_path).fingerprint == hf.fingerprint


def test_tokenizer_json_wins_over_tokenizer_model(hf, sp, tmp_path):
    hf.save(tmp_path)
    sp.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_broken_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(UserError, match="tokenizer.json: cannot load the Hugging Face tokenizer"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------- CLI
def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_mlx", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def write_text_split(directory: Path, texts: dict[str, list[str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, lines in texts.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return directory


def test_cli_train_and_encode(tmp_path):
    data = write_text_split(tmp_path / "data", {"train": corpus(), "val": corpus()[:5]})
    r = run_cli("tokenizer", "train", "--data", str(data), "--vocab-size", "8000", "--out", "tok", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "asked for 8,000" in r.stdout and "bytes per token" in r.stdout
    assert (tmp_path / "tok" / "tokenizer.model").exists()
    assert not (data / ".cache").exists()
    r = run_cli("tokenizer", "encode", "--tokenizer", "tok", "the cat 42", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "'▁cat'" in r.stdout and "'4'" in r.stdout and "'2'" in r.stdout


def test_cli_bad_vocab_size_writes_nothing(tmp_path):
    data = write_text_split(tmp_path / "data", {"train": corpus(), "val": corpus()[:5]})
    r = run_cli("tokenizer", "train", "--data", str(data), "--vocab-size", "50", "--out", "tok", cwd=tmp_path)
    assert r.returncode == 2 and "--vocab-size" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tok").exists()
