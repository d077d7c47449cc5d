"""Data: jsonl splits, validated; tokenized once and cached; batches for training.

A data directory holds `train.jsonl`, `val.jsonl` (or mlx-lm's `valid.jsonl`) and
optionally `test.jsonl`, one JSON object per line in one of three formats, detected per
file: `{"text"}`, `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`.
Anything malformed is a `UserError` naming the file, line and field.

* Pretraining: `tokenize_split` turns a split into one token stream (BOS, document, EOS,
  BOS, ...) cached as `.npy` and memory-mapped; `PackedBatches` cuts it into windows of
  `seq_len + 1` tokens, each starting at a document (or across documents, without
  padding), in a seeded order; `eval_batches` walks the same windows once.
* Fine-tuning: `FinetuneBatches` applies the chat template, masks the loss on prompt
  tokens, buckets by length and pads each batch to its longest sequence.

Both batch iterators yield `{"inputs", "targets": int32 (B, L), "mask": float32 (B, L)}`,
keep their position as JSON-serialisable `state()` that `load_state()` restores exactly,
and `shard(rank, world)` gives the rows of every global batch that one data-parallel
rank trains on.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .tokenizer import ROLES, Message, Tokenizer, default_chat_template

SPLIT_FILES = {"val": ("val.jsonl", "valid.jsonl")}  # other splits: <name>.jsonl
FORMATS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}
CACHE_VERSION = 1  # bump when the token layout of the cache changes


# ---------------------------------------------------------------------- examples and splits
@dataclass(frozen=True)
class Example:
    """One line of a split. `format` says which of the fields are set."""

    format: str  # "text" | "completion" | "chat"
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[Message, ...] = ()
    file: str = ""  # where it came from, for errors found later (e.g. after truncation)
    line: int = 0

    def as_messages(self) -> list[Message]:
        """The conversation: a prompt/completion pair is one user turn and one assistant turn."""
        if self.format == "chat":
            return [dict(m) for m in self.messages]
        if self.format == "completion":
            return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]
        raise ValueError("a text example has no conversation")

    def prompt_messages(self) -> list[Message]:
        """The conversation up to the last assistant reply: what to generate from when scoring."""
        messages = self.as_messages()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last]

    @property
    def answer(self) -> str | None:
        """The expected answer for exact-match scoring: the completion or the last reply."""
        if self.format == "text":
            return None
        return self.as_messages()[len(self.prompt_messages())]["content"]

    def document(self) -> str:
        """The example as one text: itself, or the conversation in the default chat template."""
        return self.text if self.format == "text" else default_chat_template(self.as_messages(), False)


@dataclass
class Split:
    path: Path
    format: str
    examples: list[Example]
    blank_lines: int
    n_bytes: int  # size of the file


def find_split(data_dir: str | Path, split: str) -> Path:
    """The jsonl file of `split` in `data_dir` (`val` also accepts `valid.jsonl`)."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise UserError("no such data directory", file=data_dir)
    if not data_dir.is_dir():
        raise UserError("is a file; give the directory that holds train.jsonl, val.jsonl and test.jsonl",
                        file=data_dir)
    names = SPLIT_FILES.get(split, (f"{split}.jsonl",))
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    also = f" (or {names[1]})" if len(names) > 1 else ""
    raise UserError(f"no such file{also}: the {split} split is missing", file=data_dir / names[0])


def load_split(data_dir: str | Path, split: str) -> Split:
    return read_jsonl(find_split(data_dir, split))


def read_split(data_dir: str | Path, split: str) -> list[Example]:
    """The validated examples of a split."""
    return load_split(data_dir, split).examples


def read_jsonl(path: str | Path) -> Split:
    """Read and validate a jsonl file: one format throughout, every field present and well typed."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", file=path) from None
    examples: list[Example] = []
    blank = 0
    fmt, fmt_line = None, 0
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte order mark
    lineno = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        raw, offset, start = data[start:end], start, end + 1
        lineno += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"invalid UTF-8 at byte offset {offset + e.start} of the file "
                            f"({e.start} within the line)", file=path, line=lineno) from None
        if not line.strip():
            blank += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON: {e.msg} (column {e.colno})", file=path, line=lineno) from None
        if not isinstance(obj, dict):
            raise UserError(f"expected a JSON object, got {_json_type(obj)}", file=path, line=lineno)
        line_fmt = _detect_format(obj, fmt, path, lineno)
        if fmt is None:
            fmt, fmt_line = line_fmt, lineno
        elif line_fmt != fmt:
            raise UserError(f"formats mixed within a file: line {fmt_line} is {fmt} "
                            f"({_keys(fmt)}), this line is {line_fmt}", file=path, line=lineno,
                            field=FORMATS[line_fmt][0])
        examples.append(_parse(obj, fmt, path, lineno))
    if not examples:
        what = "holds only blank lines" if blank else "is empty"
        raise UserError(f"no examples: the file {what}", file=path)
    return Split(path, fmt, examples, blank, len(data))


def _detect_format(obj: dict, expected: str | None, path: Path, lineno: int) -> str:
    found = [f for f, keys in FORMATS.items() if any(k in obj for k in keys)]
    if len(found) > 1:
        raise UserError(f"holds keys of two formats ({' and '.join(_keys(f) for f in found)}); "
                        "a line is one of them", file=path, line=lineno, field=FORMATS[found[1]][0])
    if not found:
        want = _keys(expected) if expected else '"text", "prompt" and "completion", or "messages"'
        keys = ", ".join(f'"{k}"' for k in obj) or "none"
        raise UserError(f"missing key: expected {want} (this line has {keys})", file=path, line=lineno,
                        field=FORMATS[expected or "text"][0])
    return found[0]


def _parse(obj: dict, fmt: str, path: Path, lineno: int) -> Example:
    def string(value, name: str) -> str:
        if value is None:
            raise UserError("missing key", file=path, line=lineno, field=name)
        if not isinstance(value, str):
            raise UserError(f"must be a string, got {_json_type(value)}", file=path, line=lineno, field=name)
        if not value.strip():
            raise UserError("is empty", file=path, line=lineno, field=name)
        return value

    where = {"file": str(path), "line": lineno}
    if fmt == "text":
        return Example("text", text=string(obj.get("text"), "text"), **where)
    if fmt == "completion":
        return Example("completion", prompt=string(obj.get("prompt"), "prompt"),
                       completion=string(obj.get("completion"), "completion"), **where)
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise UserError(f"must be a list of messages, got {_json_type(messages)}", file=path, line=lineno,
                        field="messages")
    parsed = []
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"must be an object, got {_json_type(m)}", file=path, line=lineno, field=name)
        role = string(m.get("role"), f"{name}.role")
        if role not in ROLES:
            raise UserError(f"unknown role {role!r} (expected system, user or assistant)",
                            file=path, line=lineno, field=f"{name}.role")
        parsed.append({"role": role, "content": string(m.get("content"), f"{name}.content")})
    if not any(m["role"] == "assistant" for m in parsed):
        raise UserError("no assistant message: nothing to learn from", file=path, line=lineno, field="messages")
    return Example("chat", messages=tuple(parsed), **where)


def _keys(fmt: str) -> str:
    return "{" + ", ".join(f'"{k}"' for k in FORMATS[fmt]) + "}"


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------- tokenized cache
@dataclass
class TokenizedSplit:
    """A split as one token stream: BOS (if any), document, EOS, BOS, document, EOS, ..."""

    tokens: np.ndarray  # 1-D uint16 (vocab <= 65536) or uint32, memory-mapped from the cache
    n_bytes: int  # UTF-8 bytes of the documents' text, for bits per byte
    n_docs: int
    cache_file: Path | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def default_cache_dir(data_dir: str | Path) -> Path:
    """Where tokenized splits are cached: `$MIXTRAL_MLX_CACHE`, else the user's cache.

    Never inside the data directory: data sets are often shared or read-only, and the
    cache key (a hash of the data file and the tokenizer) does not depend on where they lie.
    """
    if os.environ.get("MIXTRAL_MLX_CACHE"):
        return Path(os.environ["MIXTRAL_MLX_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "mixtral-mlx" / "tokenized"


def tokenize_split(data_dir: str | Path, split: str, tokenizer: Tokenizer, cache_dir: str | Path | None = None,
                   log: Callable[[str], None] = print) -> TokenizedSplit:
    """Tokenize a split once, cache it as `.npy` and memory-map it on later calls.

    The cache is keyed by a hash of the data file and of the tokenizer, so editing either
    re-tokenizes. Documents in prompt/completion or chat format are rendered with the
    default chat template first.
    """
    path = find_split(data_dir, split)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(data_dir)
    key = hashlib.sha256()
    key.update(f"v{CACHE_VERSION} {tokenizer.fingerprint} {tokenizer.bos_id} {tokenizer.eos_id}\n".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            key.update(block)
    stem = cache_dir / f"{path.stem}-{key.hexdigest()[:20]}"
    npy, meta_file = stem.with_suffix(".npy"), stem.with_suffix(".json")
    if npy.exists() and meta_file.exists():
        meta = json.loads(meta_file.read_text())
        tokens = np.load(npy, mmap_mode="r")
        if tokens.shape == (meta["n_tokens"],):
            log(f"{split}: {meta['n_tokens']:,} tokens ({meta['n_docs']:,} documents), reused from {npy}")
            return TokenizedSplit(tokens, meta["n_bytes"], meta["n_docs"], npy)

    docs = [e.document() for e in read_jsonl(path).examples]
    tokens, n_bytes, seconds = _tokenize_documents(docs, tokenizer, desc=f"tokenizing {split}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_atomic(npy, lambda f: np.save(f, tokens))
        meta = {"n_tokens": len(tokens), "n_bytes": n_bytes, "n_docs": len(docs), "source": str(path),
                "tokenizer": tokenizer.fingerprint}
        _save_atomic(meta_file, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as e:
        raise UserError(f"cannot write the tokenized cache ({e.strerror}); pass another cache directory",
                        file=cache_dir) from None
    threads = os.cpu_count() or 1
    log(f"{split}: {len(tokens):,} tokens ({len(docs):,} documents, {n_bytes / 1e6:.2f} MB) in {seconds:.1f} s, "
        f"{n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s on {threads} threads; cached in {npy}")
    return TokenizedSplit(np.load(npy, mmap_mode="r"), n_bytes, len(docs), npy)


def _tokenize_documents(docs: Sequence[str], tokenizer: Tokenizer, desc: str,
                        chunk_bytes: int = 4 << 20) -> tuple[np.ndarray, int, float]:
    """BOS + document + EOS for each, concatenated; encoded in chunks on every core."""
    from tqdm import tqdm

    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    sizes = [len(d.encode("utf-8")) for d in docs]
    n_bytes = sum(sizes)
    parts, chunk, chunk_size = [], [], 0
    start = time.perf_counter()
    with tqdm(total=n_bytes, unit="B", unit_scale=True, desc=desc, leave=False,
              disable=n_bytes < chunk_bytes) as bar:
        for i, (doc, size) in enumerate(zip(docs, sizes)):
            chunk.append(doc)
            chunk_size += size
            if chunk_size >= chunk_bytes or i == len(docs) - 1:
                parts.extend(_encode_chunk(chunk, tokenizer, dtype))
                bar.update(chunk_size)
                chunk, chunk_size = [], 0
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return tokens, n_bytes, time.perf_counter() - start


def _encode_chunk(docs: list[str], tokenizer: Tokenizer, dtype) -> list[np.ndarray]:
    encoded = tokenizer.encode_batch(docs, bos=True, eos=True)
    count = sum(map(len, encoded))
    return [np.fromiter(itertools.chain.from_iterable(encoded), dtype, count=count)]


def _save_atomic(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- pretraining batches
def _rows(global_rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    per = len(global_rows) // world
    return global_rows[rank * per:(rank + 1) * per]


def _check_sharding(batch_size: int, rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if batch_size % world:
        raise UserError(f"the global batch size {batch_size} is not divisible by the {world} processes",
                        field="--batch-size")


PACKINGS = ("document", "stream")


def document_starts(tokens: np.ndarray, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """Where each document of a token stream begins: at its BOS, or else just after an EOS."""
    tokens = np.asarray(tokens)
    if bos_id is not None:
        starts = np.flatnonzero(tokens == bos_id)
    elif eos_id is not None:
        starts = np.flatnonzero(tokens[:-1] == eos_id) + 1
    else:
        raise UserError("the tokenizer has neither BOS nor EOS, so documents cannot be told apart; "
                        "use --packing stream", field="--packing")
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return starts.astype(np.int64)


def window_table(n_tokens: int, seq_len: int, doc_starts: np.ndarray | None = None,
                 full_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of windows of at most `seq_len + 1` tokens covering every target once.

    Without `doc_starts` the windows run through the stream across document boundaries
    (`full_only` drops a short last window); with them every document starts a window of
    its own, so no window holds the end of one document and the start of the next, and a
    document longer than a window goes on in the next. Consecutive windows of a run share
    one token (the last input of one is the first of the next), so every token but a
    document's first is a target exactly once.
    """
    seg_start = np.asarray(doc_starts if doc_starts is not None else [0], np.int64)
    seg_end = np.append(seg_start[1:], n_tokens)
    targets = np.maximum(seg_end - seg_start - 1, 0)
    per_segment = targets // seq_len if full_only else -(-targets // seq_len)
    segment = np.repeat(np.arange(len(seg_start)), per_segment)
    first_of_segment = np.repeat(np.cumsum(per_segment) - per_segment, per_segment)
    starts = seg_start[segment] + (np.arange(len(segment)) - first_of_segment) * seq_len
    lengths = np.minimum(seq_len + 1, seg_end[segment] - starts)
    return starts, lengths


def _gather_windows(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seq_len: int,
                    rows: int | None = None) -> dict[str, np.ndarray]:
    """Windows as a batch of `rows` (default: one per window), padded with mask 0 on the right."""
    rows = len(starts) if rows is None else rows
    offsets = np.arange(seq_len + 1)
    valid = np.zeros((rows, seq_len + 1), bool)
    valid[:len(starts)] = offsets < lengths[:, None]
    index = np.zeros((rows, seq_len + 1), np.int64)
    index[:len(starts)] = starts[:, None] + offsets
    w = np.where(valid, np.asarray(tokens[np.where(valid, index, 0)], dtype=np.int32), 0)
    return {"inputs": w[:, :-1], "targets": w[:, 1:], "mask": valid[:, 1:].astype(np.float32)}


class PackedBatches:
    """Windows of up to `seq_len + 1` tokens, `batch_size` per batch, forever.

    Stream packing (no `doc_starts`) cuts the token stream into full windows, no padding:
    window w covers tokens[w * seq_len : (w + 1) * seq_len + 1]. Document packing starts a
    window at every document (see `window_table`) and pads the rest of the row with mask
    0: a document is read from its beginning, which is what a model must learn to do when
    what it is asked comes late in a short document (a story, then questions about it).
    Each epoch visits every window once, in an order drawn from (seed, epoch); a batch
    may straddle two epochs, so no window is ever dropped. The position is (epoch, offset
    in windows): it does not depend on the batch size or the number of processes.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, shuffle: bool = True,
                 doc_starts: np.ndarray | None = None):
        for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"must be a positive integer, got {value!r}", field=name)
        if len(tokens) < seq_len + 1 and doc_starts is None:
            raise UserError(f"the data holds {len(tokens):,} tokens, fewer than one window of seq_len + 1 = "
                            f"{seq_len + 1}; use more data or a shorter --seq-len", field="--seq-len")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.packing = "stream" if doc_starts is None else "document"
        self.starts, self.lengths = window_table(len(tokens), seq_len, doc_starts, full_only=doc_starts is None)
        if not len(self.starts):
            raise UserError("the data holds no document of two tokens or more", field="--packing")
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world = 0, 1
        self.epoch, self.offset = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens in one pass over the split (stream packing leaves out a tail shorter than a window)."""
        return int((self.lengths - 1).sum())

    @property
    def padding(self) -> float:
        """The share of row positions that are padding."""
        return 1 - self.tokens_per_epoch / (self.num_windows * self.seq_len)

    def __len__(self) -> int:
        """Batches per epoch (rounded up)."""
        return -(-self.num_windows // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.num_windows) if self.shuffle
                     else np.arange(self.num_windows))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        windows = []
        while len(windows) < self.batch_size:
            take = self._order(self.epoch)[self.offset:self.offset + self.batch_size - len(windows)]
            windows.extend(take)
            self.offset += len(take)
            if self.offset == self.num_windows:
                self.epoch, self.offset = self.epoch + 1, 0
        mine = _rows(np.asarray(windows, np.int64), self.rank, self.world)
        return _gather_windows(self.tokens, self.starts[mine], self.lengths[mine], self.seq_len)

    def state(self) -> dict:
        return {"kind": "packed", "epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "shuffle": self.shuffle, "seq_len": self.seq_len, "num_windows": self.num_windows,
                "packing": self.packing}

    def load_state(self, state: dict) -> None:
        state = {"packing": "stream", **state}  # positions saved before document packing existed
        _check_state(state, {"kind": "packed", "seed": self.seed, "shuffle": self.shuffle,
                             "seq_len": self.seq_len, "packing": self.packing, "num_windows": self.num_windows})
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def shard(self, rank: int, world: int) -> "PackedBatches":
        """The same stream of global batches, keeping rows [rank * B/world, (rank + 1) * B/world)."""
        _check_sharding(self.batch_size, rank, world)
        other = copy.copy(self)
        other.rank, other.world = rank, world
        return other


def _check_state(state: dict, expected: dict) -> None:
    for name, value in expected.items():
        if state.get(name) != value:
            raise UserError(f"the saved data position has {name}={state.get(name)!r} but this run has {value!r}: "
                            "the data, tokenizer or batch settings changed since it was saved",
                            field="data position")


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None,
                 doc_starts: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The windows of `window_table` (stream or document packing) in order, `batch_size` at a time.

    Short windows and the last batch's missing rows are padded (with mask 0) to
    (batch_size, seq_len) so a compiled step sees one shape. Every target of the split
    is scored exactly once: mask.sum() == `num_targets(...)`.
    """
    starts, lengths = window_table(len(tokens), seq_len, doc_starts)
    for b, first in enumerate(range(0, len(starts), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        rows = slice(first, first + batch_size)
        yield _gather_windows(tokens, starts[rows], lengths[rows], seq_len, rows=batch_size)


def num_eval_batches(n_tokens: int, batch_size: int, seq_len: int, doc_starts: np.ndarray | None = None) -> int:
    """How many batches `eval_batches` yields for a split of `n_tokens`."""
    return -(-len(window_table(n_tokens, seq_len, doc_starts)[0]) // batch_size)


def num_targets(n_tokens: int, doc_starts: np.ndarray | None = None) -> int:
    """Tokens of a split that are predicted: all but the first (stream) or each document's first."""
    return max(n_tokens - (1 if doc_starts is None else len(doc_starts)), 0)


# ---------------------------------------------------------------------- fine-tuning batches
class FinetuneBatches:
    """Conversations through the chat template, loss on the replies, padded and bucketed.

    Each example becomes token ids and a loss mask (`Tokenizer.encode_chat`): with
    `mask_prompt` only assistant tokens (and the EOS ending each reply) count; without it
    every token does. Text-format examples count whole. Examples longer than
    `max_seq_len + 1` tokens are cut at the end; one left with nothing to learn is an error.

    An epoch shuffles the examples (seeded by (seed, epoch)), sorts them by length within
    buckets of `batch_size * bucket_batches` examples, cuts the buckets into batches and
    shuffles the batches. Batches pad to their longest sequence (rounded up to `pad_to`),
    with `mask` 0 on padding. The last batch of an epoch is filled up with examples from
    the start of the epoch's order, so every batch has `batch_size` rows.
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Tokenizer, batch_size: int, seed: int = 0,
                 shuffle: bool = True, mask_prompt: bool = True, max_seq_len: int | None = None,
                 pad_to: int = 1, bucket_batches: int = 16, log: Callable[[str], None] = print):
        for name, value in (("--batch-size", batch_size), ("--seq-len", max_seq_len or 1), ("pad_to", pad_to),
                            ("bucket_batches", bucket_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"must be a positive integer, got {value!r}", field=name)
        if not examples:
            raise UserError("no examples to fine-tune on", field="--data")
        self.batch_size, self.seed, self.shuffle, self.mask_prompt = batch_size, seed, shuffle, mask_prompt
        self.max_seq_len, self.pad_to, self.bucket_batches = max_seq_len, pad_to, bucket_batches
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
        self.rank, self.world = 0, 1
        self.epoch, self.offset = 0, 0
        self._ids, self._masks = self._encode(examples, tokenizer, log)
        self.lengths = np.array([len(x) for x in self._ids], np.int64)
        self._order_cache: tuple[int, list[np.ndarray]] | None = None

    def _encode(self, examples: Sequence[Example], tokenizer: Tokenizer,
                log) -> tuple[list[np.ndarray], list[np.ndarray]]:
        all_ids, all_masks, truncated = [], [], 0
        limit = None if self.max_seq_len is None else self.max_seq_len + 1
        for e in examples:
            if e.format == "text":
                ids = tokenizer.encode(e.text, bos=True, eos=True)
                mask = [0] + [1] * (len(ids) - 1)
            else:
                ids, mask = tokenizer.encode_chat(e.as_messages())
                if not self.mask_prompt:
                    mask = [0] + [1] * (len(ids) - 1)
            cut = limit is not None and len(ids) > limit
            if not any(mask[1:limit]):
                prompt = mask.index(1) if 1 in mask else len(ids)
                within = f" within --seq-len {self.max_seq_len}" if cut else ""
                raise UserError(f"no completion tokens to learn from{within} (the prompt alone is {prompt} tokens)",
                                file=e.file or None, line=e.line or None,
                                field="messages" if e.format == "chat" else "completion")
            if cut:
                ids, mask, truncated = ids[:limit], mask[:limit], truncated + 1
            all_ids.append(np.asarray(ids, np.int32))
            all_masks.append(np.asarray(mask, np.float32))
        if truncated:
            log(f"warning: {truncated:,} of {len(examples):,} examples were longer than {limit} tokens "
                "and were cut at the end")
        return all_ids, all_masks

    @property
    def num_examples(self) -> int:
        return len(self._ids)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_trained_tokens(self) -> int:
        """Targets the loss counts in one epoch (mask 1)."""
        return int(sum(m[1:].sum() for m in self._masks))

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.num_examples // self.batch_size)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_examples) if self.shuffle else np.arange(self.num_examples)
        fill = -self.num_examples % self.batch_size
        order = np.concatenate([order, order[:fill]])
        bucket = self.batch_size * self.bucket_batches
        batches = []
        for start in range(0, len(order), bucket):
            group = order[start:start + bucket]
            group = group[np.argsort(self.lengths[group], kind="stable")]
            batches.extend(group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._order_cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = self._batches(self.epoch)
        rows = batches[self.offset]
        self.offset += 1
        if self.offset == len(batches):
            self.epoch, self.offset = self.epoch + 1, 0
        # Pad to the global batch's longest, so every rank's arrays have one shape.
        width = int(self.lengths[rows].max()) - 1
        return self._collate(_rows(rows, self.rank, self.world), width)

    def _collate(self, rows: Sequence[int], width: int) -> dict[str, np.ndarray]:
        width = -(-width // self.pad_to) * self.pad_to
        inputs = np.full((len(rows), width), self.pad_id, np.int32)
        targets = np.full((len(rows), width), self.pad_id, np.int32)
        mask = np.zeros((len(rows), width), np.float32)
        for r, i in enumerate(rows):
            ids, m = self._ids[i], self._masks[i]
            n = len(ids) - 1
            inputs[r, :n], targets[r, :n], mask[r, :n] = ids[:-1], ids[1:], m[1:]
        return {"inputs": inputs, "targets": targets, "mask": mask}

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Every example once, shortest first; rows past the end are padding (mask 0)."""
        order = np.argsort(self.lengths, kind="stable")
        for b, start in enumerate(range(0, len(order), self.batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            rows = order[start:start + self.batch_size]
            batch = self._collate(rows, int(self.lengths[rows].max()) - 1)
            missing = self.batch_size - len(rows)
            if missing:
                batch = {k: np.concatenate([v, np.full((missing, v.shape[1]), self.pad_id if k != "mask" else 0,
                                                       v.dtype)]) for k, v in batch.items()}
            yield batch

    def state(self) -> dict:
        return {"kind": "finetune", "epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "shuffle": self.shuffle, "batch_size": self.batch_size, "num_examples": self.num_examples,
                "lengths": hashlib.sha256(self.lengths.tobytes()).hexdigest()[:16]}

    def load_state(self, state: dict) -> None:
        expected = self.state()
        _check_state(state, {k: v for k, v in expected.items() if k not in ("epoch", "offset")})
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def shard(self, rank: int, world: int) -> "FinetuneBatches":
        """The same stream of global batches, keeping rows [rank * B/world, (rank + 1) * B/world)."""
        _check_sharding(self.batch_size, rank, world)
        other = copy.copy(self)
        other.rank, other.world = rank, world
        return other


# ---------------------------------------------------------------------- tokenizer from data
def train_tokenizer_on(data_dir: str | Path, vocab_size: int, out_dir: str | Path | None = None,
                       split: str = "train", log: Callable[[str], None] = print) -> Tokenizer:
    """Train a SentencePiece tokenizer on a split's documents (what `pretrain` does without one)."""
    from .tokenizer import train_tokenizer

    s = load_split(data_dir, split)
    docs = [e.document() for e in s.examples]
    start = time.perf_counter()
    tokenizer = train_tokenizer(docs, vocab_size, out_dir)
    short = (f" (asked for {vocab_size:,}: the data has no more distinct pieces)"
             if tokenizer.vocab_size < vocab_size else "")
    log(f"tokenizer: SentencePiece BPE, vocab {tokenizer.vocab_size:,}{short}, trained on {len(docs):,} "
        f"documents ({s.n_bytes / 1e6:.2f} MB) of {s.path} in {time.perf_counter() - start:.1f} s")
    return tokenizer
