"""Data: jsonl validation (through the CLI), tokenized cache, packed and masked batches, embedded data."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mixtral_mlx  # noqa: F401  (preloads OpenBLAS before anything imports mlx)
from mixtral_mlx.data import (Example, FinetuneBatches, PackedBatches, default_cache_dir, document_starts, eval_batches,
                              find_split, load_split, num_eval_batches, num_targets, read_split, tokenize_split)
from mixtral_mlx.errors import UserError
from mixtral_mlx.finetune import has_word
from mixtral_mlx.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


class CharTokenizer(Tokenizer):
    """One token per character (id = code point + 10): lengths can be counted by hand."""

    vocab_size, bos_id, eos_id, pad_id = 1000, 1, 2, 3
    fingerprint = "chars"

    def _encode(self, texts, num_threads):
        return [[ord(c) + 10 for c in t] for t in texts]

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i >= 10)


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def text_dir(tmp_path: Path, n: int = 6) -> Path:
    for split in ("train", "val", "test"):
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", [{"text": f"{split} document {i}."} for i in range(n)])
    return tmp_path / "data"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_mlx", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


# ---------------------------------------------------------------------- reading and formats
def test_three_formats_blank_lines_and_bom(tmp_path):
    path = tmp_path / "d" / "train.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n\n  \n{"text": "b", "id": 7}\n')
    s = load_split(tmp_path / "d", "train")
    assert (s.format, [e.text for e in s.examples], s.blank_lines) == ("text", ["a", "b"], 2)
    write_jsonl(tmp_path / "d" / "valid.jsonl", [{"prompt": "Q?", "completion": "A"}])
    [e] = read_split(tmp_path / "d", "val")  # mlx-lm's name for the split
    assert (e.format, e.answer, e.prompt_messages()) == ("completion", "A", [{"role": "user", "content": "Q?"}])
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                         {"role": "assistant", "content": "A2"}]}
    write_jsonl(tmp_path / "d" / "test.jsonl", [chat])
    [e] = read_split(tmp_path / "d", "test")
    assert (e.format, e.answer, len(e.prompt_messages()), e.line) == ("chat", "A2", 4, 1)


def test_val_prefers_val_jsonl(tmp_path):
    write_jsonl(tmp_path / "val.jsonl", [{"text": "v"}])
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "w"}])
    assert find_split(tmp_path, "val").name == "val.jsonl"


# Each bad input, through the CLI: exit 2, one line naming file:line: field, nothing written.
BAD_INPUTS = {
    "not json": (['{"text": "a"}', '{"text": "b",}'], "train.jsonl:2: not valid JSON", "column"),
    "not an object": (['["a list"]'], "train.jsonl:1: expected a JSON object, got a list", None),
    "missing key": (['{"text": "a"}', '{"body": "b"}'], "train.jsonl:2: text: missing key", '"body"'),
    "missing completion": (['{"prompt": "a"}'], "train.jsonl:1: completion: missing key", None),
    "wrong type": (['{"text": 42}'], "train.jsonl:1: text: must be a string, got a number", None),
    "empty text": (['{"text": "a"}', '{"text": "  "}'], "train.jsonl:2: text: is empty", None),
    "mixed formats": (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'],
                      "train.jsonl:2: prompt: formats mixed within a file: line 1 is text", None),
    "two formats in a line": (['{"text": "a", "messages": []}'], "train.jsonl:1: messages: holds keys of two", None),
    "unknown role": (['{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}'],
                     "train.jsonl:1: messages[1].role: unknown role 'bot'", None),
    "message not an object": (['{"messages": ["hi"]}'], "train.jsonl:1: messages[0]: must be an object", None),
    "no assistant": (['{"messages": [{"role": "user", "content": "q"}]}'],
                     "train.jsonl:1: messages: no assistant message", None),
    "empty split": (["", "  "], "train.jsonl: no examples: the file holds only blank lines", None),
}


def _bad_case(tmp_path: Path, lines: list[str] | bytes) -> Path:
    data = text_dir(tmp_path)
    path = data / "train.jsonl"
    path.write_bytes(lines if isinstance(lines, bytes) else "".join(x + "\n" for x in lines).encode())
    return data


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(["a b c text document prompt"] * 10, 300, out)
    return out


def _assert_rejected(r: subprocess.CompletedProcess, where: str, detail: str | None = None):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0], r.stderr
    if detail:
        assert detail in lines[0]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, tok_dir):
    lines, where, detail = BAD_INPUTS[case]
    data = _bad_case(tmp_path, lines)
    r = run_cli("data", "validate", str(data), "--tokenizer", str(tok_dir), cwd=tmp_path)
    _assert_rejected(r, where, detail)
    assert not (data / ".cache").exists()
    r = run_cli("tokenizer", "train", "--data", str(data), "--vocab-size", "400", "--out", "tok", cwd=tmp_path)
    _assert_rejected(r, where, detail)
    assert not (tmp_path / "tok").exists()


def test_invalid_utf8_names_the_byte_offset(tmp_path, tok_dir):
    data = _bad_case(tmp_path, b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    r = run_cli("data", "validate", str(data), "--tokenizer", str(tok_dir), cwd=tmp_path)
    _assert_rejected(r, "train.jsonl:2: invalid UTF-8 at byte offset 28 of the file (13 within the line)")
    assert not (data / ".cache").exists()


@pytest.mark.parametrize("case", ["missing split", "missing directory", "a file, not a directory"])
def test_missing_split_or_directory(case, tmp_path):
    data = text_dir(tmp_path)
    if case == "missing split":
        (data / "val.jsonl").unlink()
        target, where = data, "val.jsonl: no such file (or valid.jsonl): the val split is missing"
    elif case == "missing directory":
        target, where = tmp_path / "nowhere", "nowhere: no such data directory"
    else:
        target, where = data / "train.jsonl", "train.jsonl: is a file"
    r = run_cli("data", "validate", str(target), cwd=tmp_path)
    _assert_rejected(r, where)
    r = run_cli("tokenizer", "train", "--data", str(target), "--vocab-size", "400", "--out", "tok", cwd=tmp_path)
    if case != "missing split":  # the tokenizer needs only the train split
        _assert_rejected(r, where)
        assert not (tmp_path / "tok").exists()


def test_validate_prints_counts(tmp_path, tok_dir):
    data = text_dir(tmp_path)
    (data / "test.jsonl").unlink()
    (data / "train.jsonl").write_text('{"text": "x y"}\n\n{"text": "z"}\n')
    r = run_cli("data", "validate", str(data), "--tokenizer", str(tok_dir), "--seq-len", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:4]}
    assert rows["train"][1:4] == ["text", "2", "1"]
    tok = load_tokenizer(tok_dir)
    tokens = tokenize_split(data, "train", tok, log=lambda _: None).n_tokens
    lengths = [len(tok.encode(t, bos=True, eos=True)) for t in ("x y", "z")]
    windows = sum(-(-(n - 1) // 2) for n in lengths)  # document packing: each document's own windows of 2 + 1
    assert rows["train"][5:8] == [f"{tokens:,}", f"{max(lengths):,}", f"{windows:,}"]
    assert "test   absent" in r.stdout
    r = run_cli("data", "validate", str(data), "--tokenizer", str(tok_dir), "--seq-len", "2", "--packing", "stream",
                cwd=tmp_path)
    assert r.stdout.splitlines()[2].split()[7] == f"{(tokens - 1) // 2:,}"


# ---------------------------------------------------------------------- tokenized cache
def test_tokenize_split_layout_and_cache_reuse(tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"text": "ab"}, {"text": "é"}])
    logs = []
    t = tokenize_split(data, "train", CharTokenizer(), log=logs.append)
    assert t.tokens.dtype == np.uint16 and t.tokens.tolist() == [1, 107, 108, 2, 1, 243, 2]
    assert (t.n_bytes, t.n_docs, t.n_tokens) == (4, 2, 7)  # "é" is two UTF-8 bytes
    assert "MB/s" in logs[-1] and t.cache_file.parent == default_cache_dir(data)
    again = tokenize_split(data, "train", CharTokenizer(), log=logs.append)
    assert "reused" in logs[-1] and isinstance(again.tokens, np.memmap)
    assert again.tokens.tolist() == t.tokens.tolist() and again.n_bytes == 4
    write_jsonl(data / "train.jsonl", [{"text": "abc"}])  # new data: new key, tokenized afresh
    assert tokenize_split(data, "train", CharTokenizer(), log=logs.append).n_tokens == 5
    assert "reused" not in logs[-1]


def test_chat_documents_use_the_template(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q", "completion": "A"}])
    t = tokenize_split(tmp_path, "train", CharTokenizer(), log=lambda _: None)
    assert CharTokenizer().decode(t.tokens.tolist()) == "### User: Q\n### Assistant: A"


def test_cache_lives_outside_the_data_dir(tmp_path, monkeypatch):
    data = text_dir(tmp_path)
    monkeypatch.delenv("MIXTRAL_MLX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    t = tokenize_split(data, "val", CharTokenizer(), log=lambda _: None)
    assert t.cache_file.is_relative_to(tmp_path / "xdg") and not (data / ".cache").exists()
    monkeypatch.setenv("MIXTRAL_MLX_CACHE", str(tmp_path / "env"))
    assert tokenize_split(data, "val", CharTokenizer(), log=lambda _: None).cache_file.parent == tmp_path / "env"
    t = tokenize_split(data, "val", CharTokenizer(), cache_dir=tmp_path / "mine", log=lambda _: None)
    assert t.cache_file.parent == tmp_path / "mine"


# ---------------------------------------------------------------------- packed batches
def test_packing_counted_by_hand():
    tokens = np.arange(21, dtype=np.uint16)  # 20 targets: 5 windows of 4
    pb = PackedBatches(tokens, batch_size=2, seq_len=4, shuffle=False)
    assert (pb.num_windows, pb.tokens_per_epoch, len(pb)) == (5, 20, 3)
    b = next(pb)
    assert b["inputs"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert b["targets"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert b["mask"].tolist() == [[1.0] * 4] * 2 and b["inputs"].dtype == np.int32 and b["mask"].dtype == np.float32
    next(pb)
    b = next(pb)  # straddles the epoch: the last window, then the first again
    assert b["inputs"].tolist() == [[16, 17, 18, 19], [0, 1, 2, 3]]
    assert pb.state()["epoch"] == 1 and pb.state()["offset"] == 1


def test_shuffled_epochs_visit_every_window_once_and_follow_the_seed():
    tokens = np.arange(4 * 30 + 1)
    pb = PackedBatches(tokens, batch_size=5, seq_len=4, seed=3)
    firsts = [int(x) // 4 for _ in range(6) for x in next(pb)["inputs"][:, 0]]
    assert sorted(firsts) == list(range(30)) and firsts != list(range(30))
    again = PackedBatches(tokens, batch_size=5, seq_len=4, seed=3)
    other = PackedBatches(tokens, batch_size=5, seq_len=4, seed=4)
    assert [int(x) // 4 for _ in range(6) for x in next(again)["inputs"][:, 0]] == firsts
    assert [int(x) // 4 for _ in range(6) for x in next(other)["inputs"][:, 0]] != firsts


def test_packed_state_restores_the_identical_next_batch():
    tokens = np.arange(4 * 7 + 3)
    pb = PackedBatches(tokens, batch_size=3, seq_len=4, seed=1)
    for _ in range(5):  # into the third epoch
        next(pb)
    saved = json.loads(json.dumps(pb.state()))
    expected = [next(pb) for _ in range(4)]
    resumed = PackedBatches(tokens, batch_size=3, seq_len=4, seed=1)
    resumed.load_state(saved)
    for e in expected:
        b = next(resumed)
        assert all(np.array_equal(b[k], e[k]) for k in e)


def test_packed_state_from_other_data_is_refused():
    state = PackedBatches(np.arange(41), 2, 4).state()
    with pytest.raises(UserError, match="data position: the saved data position has num_windows=10"):
        PackedBatches(np.arange(81), 2, 4).load_state(state)
    with pytest.raises(UserError, match="seed"):
        PackedBatches(np.arange(41), 2, 4, seed=9).load_state(state)


def test_shards_split_every_global_batch():
    tokens = np.arange(4 * 13 + 1)
    whole = PackedBatches(tokens, batch_size=4, seq_len=4, seed=2)
    ranks = [PackedBatches(tokens, batch_size=4, seq_len=4, seed=2).shard(r, 2) for r in range(2)]
    for _ in range(5):
        b = next(whole)
        parts = [next(r) for r in ranks]
        assert np.array_equal(np.concatenate([p["inputs"] for p in parts]), b["inputs"])
        assert parts[0]["inputs"].shape == (2, 4)
    assert ranks[0].state() == ranks[1].state() == whole.state()
    with pytest.raises(UserError, match="--batch-size: the global batch size 4 is not divisible by the 3"):
        whole.shard(0, 3)


def test_too_little_data_for_one_window():
    with pytest.raises(UserError, match="--seq-len: the data holds 5 tokens"):
        PackedBatches(np.arange(5), 1, 8)


def test_eval_batches_cover_the_split_once():
    tokens = np.arange(23)  # 22 targets: windows of 4 -> 5 full and one of 2
    batches = list(eval_batches(tokens, batch_size=4, seq_len=4))
    assert len(batches) == 2 == num_eval_batches(23, 4, 4)
    assert all(b["inputs"].shape == (4, 4) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    assert mask.sum() == 22 and targets[mask == 1].tolist() == list(range(1, 23))
    assert batches[1]["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [0] * 4, [0] * 4]
    assert len(list(eval_batches(tokens, 4, 4, max_batches=1))) == 1


BOS, EOS = 1, 2


def documents(*lengths: int) -> np.ndarray:
    """A stream of documents BOS, 10 * d + 3, 10 * d + 4, ..., EOS, each `lengths[d]` tokens long in all."""
    return np.concatenate([[BOS, *range(10 * d + 3, 10 * d + n + 1), EOS] for d, n in enumerate(lengths)])


def test_document_packing_counted_by_hand():
    tokens = documents(4, 9, 3)  # one window, two (5 + 4 tokens sharing one), one
    pb = PackedBatches(tokens, batch_size=4, seq_len=4, shuffle=False, doc_starts=document_starts(tokens, BOS, EOS))
    assert (pb.num_windows, pb.tokens_per_epoch, len(pb)) == (4, 13, 1) and pb.padding == 1 - 13 / 16
    b = next(pb)
    assert b["inputs"].tolist() == [[1, 3, 4, 2], [1, 13, 14, 15], [16, 17, 18, 19], [1, 23, 2, 0]]
    assert b["targets"].tolist() == [[3, 4, 2, 0], [13, 14, 15, 16], [17, 18, 19, 2], [23, 2, 0, 0]]
    assert b["mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert pb.state()["packing"] == "document"


@pytest.mark.parametrize("seq_len", [1, 3, 8, 40])
def test_document_windows_never_cross_a_document_and_target_each_token_once(seq_len):
    rng = np.random.default_rng(seq_len)
    tokens = documents(*rng.integers(2, 30, size=12))
    starts = document_starts(tokens, BOS, EOS)
    doc_of = np.cumsum(tokens == BOS) - 1  # the document each position belongs to
    pb = PackedBatches(tokens, batch_size=5, seq_len=seq_len, seed=1, doc_starts=starts)
    seen = []
    for _ in range(len(pb)):
        b = next(pb)
        for row in range(5):
            n = int(b["mask"][row].sum())
            assert b["mask"][row, :n].all() and not b["mask"][row, n:].any()  # padding only on the right
            seen.extend(b["targets"][row, :n].tolist())
    expected = tokens[np.setdiff1d(np.arange(len(tokens)), starts)]
    assert sorted(seen[:pb.tokens_per_epoch]) == sorted(expected.tolist())
    assert pb.tokens_per_epoch == num_targets(len(tokens), starts) == len(tokens) - 12
    for start, length in zip(pb.starts, pb.lengths):
        assert len(set(doc_of[start:start + length])) == 1


def test_document_starts_from_bos_or_eos():
    tokens = documents(3, 4)
    assert document_starts(tokens, BOS, EOS).tolist() == [0, 3]
    without_bos = tokens[tokens != BOS]  # 3, 2, 13, 14, 2
    assert document_starts(without_bos, None, EOS).tolist() == [0, 2]
    with pytest.raises(UserError, match="--packing: the tokenizer has neither BOS nor EOS"):
        document_starts(tokens, None, None)


def test_document_eval_batches_score_every_target_once():
    tokens = documents(4, 9, 3, 7, 2)
    starts = document_starts(tokens, BOS, EOS)
    batches = list(eval_batches(tokens, batch_size=3, seq_len=4, doc_starts=starts))
    assert len(batches) == num_eval_batches(len(tokens), 3, 4, starts) == 3  # 1 + 2 + 1 + 2 + 1 windows
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == num_targets(len(tokens), starts) == len(tokens) - 5
    targets = np.concatenate([b["targets"] for b in batches])[mask == 1]
    assert targets.tolist() == tokens[np.setdiff1d(np.arange(len(tokens)), starts)].tolist()  # in order


def test_packing_mode_is_part_of_the_data_position():
    tokens = documents(*[6] * 10)
    stream = PackedBatches(tokens, 2, 4)
    saved = stream.state()
    with pytest.raises(UserError, match="packing"):
        PackedBatches(tokens, 2, 4, doc_starts=document_starts(tokens, BOS, EOS)).load_state(saved)
    del saved["packing"]  # a position saved before document packing existed is a stream position
    PackedBatches(tokens, 2, 4).load_state(saved)


# ---------------------------------------------------------------------- fine-tuning batches
def qa(prompt: str, answer: str, line: int = 1) -> Example:
    return Example("completion", prompt=prompt, completion=answer, file="train.jsonl", line=line)


def test_prompt_masking_counted_by_hand():
    # BOS + "### User: ab" (12) + "\n### Assistant:" (15) + " cd" (3) + EOS: 32 tokens, 31 targets,
    # of which " cd" and EOS (4) are the answer.
    fb = FinetuneBatches([qa("ab", "cd")], CharTokenizer(), batch_size=1, shuffle=False)
    b = next(fb)
    assert b["inputs"].shape == (1, 31) and b["mask"].sum() == 4
    assert CharTokenizer().decode(b["targets"][0][b["mask"][0] == 1]) == " cd"
    assert b["targets"][0, -1] == 2 and b["inputs"][0, 0] == 1
    assert (fb.num_tokens, fb.num_trained_tokens) == (32, 4)
    unmasked = FinetuneBatches([qa("ab", "cd")], CharTokenizer(), batch_size=1, mask_prompt=False)
    assert next(unmasked)["mask"].sum() == 31


def test_padding_to_the_longest_in_the_batch():
    examples = [qa("a", "x"), qa("abcdef", "xyz")]  # 30 and 37 tokens
    b = next(FinetuneBatches(examples, CharTokenizer(), batch_size=2, shuffle=False))
    assert b["inputs"].shape == (2, 36)
    short = int(np.argmin((b["inputs"] != 3).sum(1)))
    assert b["inputs"][short, 29:].tolist() == [3] * 7 and b["mask"][short, 29:].sum() == 0
    assert b["mask"].sum() == 3 + 5  # " x" EOS and " xyz" EOS
    padded = next(FinetuneBatches(examples, CharTokenizer(), batch_size=2, shuffle=False, pad_to=8))
    assert padded["inputs"].shape == (2, 40)


def test_text_examples_train_on_every_token():
    b = next(FinetuneBatches([Example("text", text="hello")], CharTokenizer(), 1))
    assert b["mask"].tolist() == [[1.0] * 6]


def _epoch_lengths(fb: FinetuneBatches) -> list[list[int]]:
    return [(next(fb)["inputs"] != 3).sum(1).tolist() for _ in range(len(fb))]


def test_buckets_group_similar_lengths_and_every_example_is_seen():
    examples = [qa("x" * int(n), "y", line=i) for i, n in enumerate(np.random.default_rng(0).permutation(64))]
    one_bucket = _epoch_lengths(FinetuneBatches(examples, CharTokenizer(), batch_size=4, bucket_batches=16))
    assert sorted(sum(one_bucket, [])) == list(range(28, 92))  # every example once
    assert all(max(b) - min(b) == 3 for b in one_bucket)  # four consecutive lengths per batch
    unbucketed = _epoch_lengths(FinetuneBatches(examples, CharTokenizer(), batch_size=4, bucket_batches=1))
    assert np.mean([max(b) - min(b) for b in unbucketed]) > 20


def test_finetune_order_is_seeded_and_restorable():
    examples = [qa("p" * (i % 7), "a" * (1 + i % 3), line=i) for i in range(22)]
    fb = FinetuneBatches(examples, CharTokenizer(), batch_size=4, seed=5)
    for _ in range(7):  # into the second epoch (6 batches per epoch)
        next(fb)
    saved = json.loads(json.dumps(fb.state()))
    expected = [next(fb) for _ in range(8)]
    resumed = FinetuneBatches(examples, CharTokenizer(), batch_size=4, seed=5)
    resumed.load_state(saved)
    for e in expected:
        b = next(resumed)
        assert all(np.array_equal(b[k], e[k]) for k in e)
    with pytest.raises(UserError, match="data position"):
        FinetuneBatches(examples[:-1], CharTokenizer(), batch_size=4, seed=5).load_state(saved)


def test_finetune_shards_pad_alike():
    examples = [qa("p" * i, "a", line=i) for i in range(16)]
    whole = FinetuneBatches(examples, CharTokenizer(), batch_size=4, seed=1)
    ranks = [FinetuneBatches(examples, CharTokenizer(), batch_size=4, seed=1).shard(r, 2) for r in range(2)]
    for _ in range(6):
        b, parts = next(whole), [next(r) for r in ranks]
        for k in b:
            assert np.array_equal(np.concatenate([p[k] for p in parts]), b[k])


def test_finetune_eval_batches_see_each_example_once():
    examples = [qa("p" * i, "ab", line=i) for i in range(10)]
    fb = FinetuneBatches(examples, CharTokenizer(), batch_size=4)
    batches = list(fb.eval_batches())
    assert len(batches) == 3 and all(b["inputs"].shape[0] == 4 for b in batches)
    assert sum(b["mask"].sum() for b in batches) == 10 * 4  # " ab" and EOS
    assert batches[-1]["mask"][2:].sum() == 0


def test_truncation_that_leaves_no_answer_is_an_error():
    with pytest.raises(UserError, match=r"train.jsonl:7: completion: no completion tokens to learn from within"):
        FinetuneBatches([qa("a long prompt", "x", line=7)], CharTokenizer(), batch_size=1, max_seq_len=20)
    logs = []
    fb = FinetuneBatches([qa("ab", "a long answer")], CharTokenizer(), batch_size=1, max_seq_len=30,
                         log=logs.append)
    assert next(fb)["inputs"].shape == (1, 30) and "cut at the end" in logs[0]


def test_finetune_with_a_sentencepiece_tokenizer():
    tok = train_tokenizer(["Tom found a red ball in the park."] * 20, 300)
    fb = FinetuneBatches([qa("Tom found a red ball. Who found the ball?", "Tom")], tok, batch_size=1)
    b = next(fb)
    assert tok.decode(b["targets"][0][b["mask"][0] == 1]) == " Tom"  # the reply is "▁Tom" + EOS
    prompt, _ = tok.encode_chat([{"role": "user", "content": "Tom found a red ball. Who found the ball?"}], True)
    assert b["inputs"][0, :len(prompt)].tolist() == prompt


# ---------------------------------------------------------------------- the embedded data sets
def _load_script(name: str):
    import importlib.util

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def _stories():
    """scripts/stories.py, imported as the generators import it."""
    import importlib

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("stories")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_embedded_data_validates_and_fits_the_budget():
    total = 0
    for name, fmt, minimum in (("pretrain_data", "text", 100), ("finetune_data", "completion", 200)):
        assert (ROOT / name / "README.md").exists()
        for split in ("train", "val", "test"):
            s = load_split(ROOT / name, split)
            assert s.format == fmt and len(s.examples) >= (minimum * 10 if split == "train" else minimum)
            total += s.n_bytes
    assert total <= 5_000_000


def test_finetune_answers_are_words_of_their_story():
    for split in ("train", "test"):
        for e in read_split(ROOT / "finetune_data", split):
            assert e.answer and " " not in e.answer and e.answer in e.prompt.rsplit("\n\n", 1)[0]


@pytest.mark.parametrize("name", ["make_pretrain_data", "make_finetune_data"])
def test_generators_reproduce_the_embedded_data_byte_for_byte(name, tmp_path):
    _load_script(name).make(tmp_path)
    target = ROOT / name.removeprefix("make_")
    for split in ("train", "val", "test"):
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", target / f"{split}.jsonl", shallow=False), split


def test_pretrain_all_questions_keeps_the_stories_and_asks_each_question_once(tmp_path):
    """`--all-questions`: the embedded stories word for word, each followed by every question it
    answers (a superset of the embedded 4 to 6), each once."""
    script = _load_script("make_pretrain_data")
    script.make(tmp_path, counts={"train": 30}, asked=script.ALL_ASKED, drills=0)
    header = "\n\nQuestions about the story:\n"
    embedded_stories = read_split(ROOT / "pretrain_data", "train")[::1 + script.DRILLS][:30]
    for every, some in zip(read_split(tmp_path, "train"), embedded_stories):
        story, asked = every.text.split(header)
        embedded_story, embedded_asked = some.text.split(header)
        lines = asked.split("\n")
        assert story == embedded_story and 12 <= len(lines) == len(set(lines)) <= 20
        assert set(embedded_asked.split("\n")) <= set(lines)


def test_every_question_has_evidence_that_states_its_answer():
    """`Story.evidence` names, per question, sentences of the story holding the answer word: the
    first such sentence of the event asked about, or (when the event does not name it) the
    story's first sentence that does, with the event's first sentence."""
    stories = _stories()
    kinds = set()
    for i in range(200):
        story = stories.write_story(f"evidence:{i}")
        assert " ".join(story.sentences) == story.text.replace("\n\n", " ")
        assert len(story.evidence) == len(story.questions)
        for (question, answer), evidence in zip(story.questions, story.evidence):
            assert list(evidence) == sorted(set(evidence)) and 1 <= len(evidence) <= 2
            assert any(has_word(story.sentences[j], answer) for j in evidence), question
            kinds.add((" ".join(question.split()[:2]), len(evidence)))
    assert ("Where did", 2) in kinds  # "Ben went to the park. ... Ben looked under a tree and found a ball."
    assert ("How did", 1) in kinds and ("How did", 2) not in kinds  # feelings: their own sentence


def test_the_evidence_of_how_many_were_given_is_the_giving_not_an_equal_count_before_it():
    """"At lunch, Maya had 4 crackers. Ella gave her 4 more, ...": "How many crackers did Ella
    give Maya?" is answered by the second sentence, though the first holds the same word."""
    stories = _stories()
    equal_counts = 0
    for i in range(400):
        story = stories.write_story(f"evidence:{i}")
        for (question, answer), evidence in zip(story.questions, story.evidence):
            if question.startswith("How many") and " give " in question:
                stated = story.sentences[evidence[0]]
                assert evidence == (evidence[0],) and " gave " in stated and has_word(stated, answer), question
                equal_counts += has_word(story.sentences[evidence[0] - 1], answer)
    assert equal_counts > 0  # the case that needs it came up


def test_reading_drills_are_short_passages_of_the_story_with_one_of_its_questions():
    stories = _stories()
    story = stories.write_story("drills:0")
    drills = stories.reading_drills(story, "drills:0", n=len(story.questions), context=2)
    assert drills == stories.reading_drills(story, "drills:0", n=len(story.questions), context=2)  # seeded
    asked = set()
    for drill in drills:
        passage, line = drill.split(stories.QUIZ_HEADER)
        question, answer = line.rsplit(" ", 1)
        k = story.questions.index((question, answer))
        asked.add(k)
        # whole sentences of the story, in its order: the evidence and at most two neighbours
        positions = [story.sentences.index(s) for s in _sentences_of(passage, story.sentences)]
        assert positions == sorted(positions) and set(story.evidence[k]) <= set(positions)
        assert len(positions) <= len(story.evidence[k]) + 2
    assert asked == set(range(len(story.questions)))  # n questions drawn without repeats
    assert stories.reading_drills(story, "drills:0", n=3, context=0) != []
    for drill in stories.reading_drills(story, "drills:1", n=len(story.questions), context=0):
        passage, line = drill.split(stories.QUIZ_HEADER)
        k = story.questions.index(tuple(line.rsplit(" ", 1)))
        assert passage == " ".join(story.sentences[j] for j in story.evidence[k])


def _sentences_of(passage: str, sentences: list[str]) -> list[str]:
    """`passage` split back into the story sentences it was joined from (longest match first)."""
    found = []
    while passage:
        match = max((s for s in sentences if passage.startswith(s)), key=len)
        found.append(match)
        passage = passage[len(match):].removeprefix(" ")
    return found


def test_pretrain_drills_follow_their_story_in_train_only(tmp_path):
    """Each training story is followed by its drills (passages of it, each with one of its
    questions); val and test hold the same whole stories as without drills."""
    script, stories = _load_script("make_pretrain_data"), _stories()
    script.make(tmp_path / "drills", counts={"train": 20, "val": 5}, drills=2)
    script.make(tmp_path / "none", counts={"train": 20, "val": 5}, drills=0)
    train = [e.text for e in read_split(tmp_path / "drills", "train")]
    assert train[::3] == [e.text for e in read_split(tmp_path / "none", "train")]
    assert [e.text for e in read_split(tmp_path / "drills", "val")] == [e.text for e in read_split(tmp_path / "none", "val")]
    for i in range(20):
        story = stories.write_story(f"0:pretrain:train:{i}")
        for drill in train[3 * i + 1 : 3 * i + 3]:
            passage, line = drill.split(stories.QUIZ_HEADER)
            assert tuple(line.rsplit(" ", 1)) in story.questions
            assert _sentences_of(passage, story.sentences)


def test_finetune_chat_format_carries_the_same_examples(tmp_path):
    _load_script("make_finetune_data").make(tmp_path, counts={"test": 20}, fmt="chat")
    chat = read_split(tmp_path, "test")
    completion = read_split(ROOT / "finetune_data", "test")[:20]
    assert [e.format for e in chat] == ["chat"] * 20
    assert [(c.as_messages(), c.answer) for c in chat] == [(e.as_messages(), e.answer) for e in completion]


def test_finetune_train_questions_all_asks_every_question_once(tmp_path):
    """`--train-questions all`: each train line asks the questions of the one-question example's
    story, each once, the story in the first turn; val and test do not change."""
    script = _load_script("make_finetune_data")
    script.make(tmp_path, counts={"train": 30, "test": 10}, train_questions="all")
    one = read_split(ROOT / "finetune_data", "train")[:30]
    for e, single in zip(read_split(tmp_path, "train"), one):
        messages = e.as_messages()
        story, question = single.prompt.rsplit("\n\n", 1)
        first_story, first_question = messages[0]["content"].rsplit("\n\n", 1)
        assert e.format == "chat" and first_story == story
        turns = [(first_question, messages[1]["content"])] + [
            (q["content"], a["content"]) for q, a in zip(messages[2::2], messages[3::2])]
        assert len(set(q for q, _ in turns)) == len(turns) >= 8 and (question, single.answer) in turns
        assert all(q.endswith("?") and "\n" not in q and a in story for q, a in turns)
    test = [e.as_messages() for e in read_split(tmp_path, "test")]
    assert test == [e.as_messages() for e in read_split(ROOT / "finetune_data", "test")[:10]]


def test_finetune_train_drills_follow_the_examples_in_train_only(tmp_path):
    """`--train-drills 2`: the train lines as before, then two drills a story, each a passage
    of that story stating the answer and one of its questions; val and test do not change."""
    script = _load_script("make_finetune_data")
    sizes = script.make(tmp_path, counts={"train": 10, "test": 5}, train_drills=2)
    assert sizes["train"][0] == 30 and sizes["test"][0] == 5
    train, one = read_split(tmp_path, "train"), read_split(ROOT / "finetune_data", "train")[:10]
    assert [(e.prompt, e.answer) for e in train[:10]] == [(e.prompt, e.answer) for e in one]
    for i, e in enumerate(train[10:]):
        story = script.story_of(0, "train", i // 2)
        passage, question = e.prompt.rsplit("\n\n", 1)
        assert (question, e.answer) in story.questions and _sentences_of(passage, story.sentences)
        assert len(passage) < len(story.text)
    test = [(e.prompt, e.answer) for e in read_split(tmp_path, "test")]
    assert test == [(e.prompt, e.answer) for e in read_split(ROOT / "finetune_data", "test")[:5]]


def test_pretrain_also_alone_adds_each_training_story_asking_one_kind(tmp_path):
    """--also-alone "how did" --also-alone "what was": after each training story (with its
    quiz), the same story without it, then its question of each kind alone, a copy per
    kind; val and test are unchanged."""
    script, stories = _load_script("make_pretrain_data"), _stories()
    script.make(tmp_path / "alone", counts={"train": 10, "val": 5}, also_alone=("how did", "what was"))
    script.make(tmp_path / "none", counts={"train": 10, "val": 5})
    train = [e.text for e in read_split(tmp_path / "alone", "train")]
    assert train[::3] == [e.text for e in read_split(tmp_path / "none", "train")]
    assert [e.text for e in read_split(tmp_path / "alone", "val")] == [e.text for e in read_split(tmp_path / "none", "val")]
    for copies, start in (("How did", 1), ("What was", 2)):
        for i, doc in enumerate(train[start::3]):
            story = stories.write_story(f"0:pretrain:train:{i}")
            passage, line = doc.split(stories.QUIZ_HEADER)
            assert passage == story.text
            question, answer = line.rsplit(" ", 1)
            assert question.startswith(copies) and (question, answer) in story.questions
    with pytest.raises(SystemExit, match="asks no"):
        script.make(tmp_path / "bad", counts={"train": 1}, also_alone=("why not",))
