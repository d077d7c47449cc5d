"""Tokenizers: SentencePiece (`tokenizer.model`) and Hugging Face (`tokenizer.json`).

Both sit behind `Tokenizer`, which is all the rest of the package sees: encode/decode
(one text or a batch, on every core), the special ids, and the chat template with the
loss mask fine-tuning needs. `train_tokenizer` makes a SentencePiece BPE model whose ids
agree with the model config's defaults:

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)   3 <pad>   4 "\\n"
    5 "### System:"   6 "### User:"   7 "### Assistant:"   8..263 the 256 bytes

Its settings make `decode(encode(text)) == text` for any text: no normalisation, no
whitespace folding, no dummy space in front, newlines kept as a token of their own, and
byte fallback for anything the vocabulary lacks (so there is never an unknown token).
Digits are split one per token. The default chat template's headers are single tokens,
so a prompt spends one token on each turn's header however the corpus looks.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import UserError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
ROLES = ("system", "user", "assistant")
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": ...}


class Tokenizer:
    """What every tokenizer offers; subclasses implement the first block of methods."""

    # ------------------------------------------------------------ implemented per kind
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def bos_id(self) -> int | None:
        raise NotImplementedError

    @property
    def eos_id(self) -> int | None:
        raise NotImplementedError

    @property
    def pad_id(self) -> int | None:
        raise NotImplementedError

    def _encode(self, texts: list[str], num_threads: int) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """Each id's token as the vocabulary spells it (for showing tokens one by one)."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """A hash of the tokenizer's files: equal fingerprints tokenize alike."""
        raise NotImplementedError

    @property
    def has_chat_template(self) -> bool:
        """True when the tokenizer brings its own template (else `### User:` style is used)."""
        return False

    # ------------------------------------------------------------ shared
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos, num_threads=1)[0]

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts at once, on `num_threads` threads (default: every core)."""
        ids = self._encode(list(texts), num_threads or os.cpu_count() or 1)
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos and self.eos_id is not None else []
        return [head + x + tail for x in ids] if head or tail else ids

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as text, ending with the assistant's header when asked.

        For token ids use `encode_chat`: with the default template the EOS token that
        closes each assistant turn is an id, not text.
        """
        return default_chat_template(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[Message],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a 0/1 mask marking the assistant's tokens.

        The mask is 1 on each assistant reply and the EOS that closes it: the tokens a
        fine-tune learns to produce. Generation should encode its prompt the same way
        (`add_generation_prompt=True`), so that it sees exactly what training saw.
        """
        return _encode_default_chat(self, messages, add_generation_prompt)


# ---------------------------------------------------------------------- the default template
_HEADERS = {"system": "### System:", "user": "### User:", "assistant": "### Assistant:"}


def _chat_segments(messages: Sequence[Message], add_generation_prompt: bool):
    """(text, is_reply) pieces of the `### Role: content` template; EOS follows each reply.

    Turns are separated by newlines; every header is followed by a space and the content,
    so a reply starts at a word boundary and its tokens do not depend on the header's.
    """
    for i, m in enumerate(messages):
        sep = "\n" if i else ""
        if m["role"] == "assistant":
            yield sep + _HEADERS["assistant"], False
            yield " " + m["content"], True
        else:
            yield f"{sep}{_HEADERS[m['role']]} {m['content']}", False
    if add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
        yield ("\n" if messages else "") + _HEADERS["assistant"], False


def default_chat_template(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """`### System: ...` / `### User: ...` / `### Assistant: ...`, one turn per line."""
    return "".join(text for text, _ in _chat_segments(messages, add_generation_prompt))


def _encode_default_chat(tok: Tokenizer, messages: Sequence[Message],
                         add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    segments = list(_chat_segments(messages, add_generation_prompt))
    encoded = tok.encode_batch([text for text, _ in segments], num_threads=1)
    ids = [tok.bos_id] if tok.bos_id is not None else []
    mask = [0] * len(ids)
    for (_, reply), seg_ids in zip(segments, encoded):
        if reply and tok.eos_id is not None:
            seg_ids = seg_ids + [tok.eos_id]
        ids += seg_ids
        mask += [int(reply)] * len(seg_ids)
    return ids, mask


# ---------------------------------------------------------------------- SentencePiece
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`tokenizer.model`), e.g. one made by `train_tokenizer`."""

    def __init__(self, model_file: str | Path | None = None, *, model_proto: bytes | None = None):
        import sentencepiece as spm

        if model_proto is None:
            try:
                model_proto = Path(model_file).read_bytes()
            except OSError as e:
                raise UserError(f"cannot read the tokenizer ({e.strerror})", file=model_file) from None
        self.model_file = Path(model_file) if model_file is not None else None
        self.model_proto = model_proto
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (OSError, RuntimeError) as e:
            raise UserError(f"not a SentencePiece model ({e})", file=model_file) from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def bos_id(self) -> int | None:
        return _id_or_none(self.sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return _id_or_none(self.sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return _id_or_none(self.sp.pad_id())

    def _encode(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads) if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.sp.id_to_piece(int(i)) for i in ids]

    def save(self, directory: str | Path) -> None:
        _write_atomic(Path(directory) / "tokenizer.model", self.model_proto)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()[:16]


def _id_or_none(i: int | None) -> int | None:
    return None if i is None or i < 0 else i


# ---------------------------------------------------------------------- Hugging Face
class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (with its tokenizer_config.json and chat template).

    Loaded through mlx-lm's `TokenizerWrapper`, whose `.detokenizer` streams text.
    """

    def __init__(self, directory: str | Path):
        from mlx_lm.tokenizer_utils import load as load_hf

        self.directory = Path(directory)
        try:
            self.wrapper = load_hf(self.directory)
        except (OSError, ValueError, TypeError) as e:  # malformed json, unknown tokenizer class
            raise UserError(f"cannot load the Hugging Face tokenizer: {e}".splitlines()[0],
                            file=self.directory / "tokenizer.json") from None
        self.hf = self.wrapper._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def bos_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.hf.pad_token_id

    def _encode(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # The Rust back end encodes a batch in parallel (RAYON_NUM_THREADS caps it).
        return self.hf(texts, add_special_tokens=False)["input_ids"] if texts else []

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids])

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens([int(i) for i in ids])

    def save(self, directory: str | Path) -> None:
        for name in HF_FILES:
            if (self.directory / name).exists():
                _write_atomic(Path(directory) / name, (self.directory / name).read_bytes())

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in HF_FILES:
            path = self.directory / name
            if path.exists():
                h.update(name.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()[:16]

    @property
    def has_chat_template(self) -> bool:
        return bool(self.wrapper.has_chat_template)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            return super().apply_chat_template(messages, add_generation_prompt)
        return self.wrapper.apply_chat_template(list(messages), tokenize=False,
                                                add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[Message],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        if not self.has_chat_template:
            return super().encode_chat(messages, add_generation_prompt)
        # The template renders the special tokens as text; each assistant reply spans
        # from the prompt that asks for it to the end of the conversation through it.
        messages = list(messages)

        def length(upto: int, gen: bool) -> int:
            return len(self.hf.encode(self.apply_chat_template(messages[:upto], gen), add_special_tokens=False))

        ids = self.hf.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                for j in range(length(i, True), min(length(i + 1, False), len(ids))):
                    mask[j] = 1
        return ids, mask


# ---------------------------------------------------------------------- load / train / check
def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer saved in a model directory, or None when it holds none.

    A `tokenizer.json` (Hugging Face, with its chat template) wins over a `tokenizer.model`
    beside it, as in Hub repos that ship both.
    """
    directory = Path(directory)
    if (directory / "tokenizer.json").exists():
        return HFTokenizer(directory)
    if (directory / "tokenizer.model").exists():
        return SentencePieceTokenizer(directory / "tokenizer.model")
    return None


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, *,
                    character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                    seed: int = 0, num_threads: int | None = None) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE model on `texts` (documents; split at newlines here).

    `vocab_size` is an upper bound: a small or repetitive corpus may not have that many
    distinct pieces, and the model then holds fewer (check `.vocab_size`). Special ids
    are fixed (see the module docstring). Writes `out_dir/tokenizer.model` when given.
    """
    import sentencepiece as spm

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise UserError(f"must be a positive integer, got {vocab_size!r}", field="--vocab-size")
    # SentencePiece matches user-defined symbols after turning spaces into "▁".
    symbols = ["\n", *(h.replace(" ", "\u2581") for h in _HEADERS.values())]
    minimum = 4 + len(symbols) + 256  # the specials, the symbols and the byte pieces
    if vocab_size <= minimum:
        raise UserError(f"{vocab_size} leaves no room for learned pieces: the special tokens, chat headers "
                        f"and 256 byte pieces take {minimum}; ask for at least {minimum + 64}", field="--vocab-size")
    # SentencePiece trains on "sentences"; newlines become the user-defined "\n" piece.
    sentences = (line for text in texts for line in text.split("\n") if line)
    first = next(sentences, None)
    if first is None:
        raise UserError("no text to train a tokenizer on", field="--data")

    def all_sentences():
        yield first
        yield from sentences

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
            byte_fallback=True, split_digits=True, user_defined_symbols=symbols,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            character_coverage=character_coverage, max_sentence_length=1 << 16,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1, minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"SentencePiece could not train: {str(e).splitlines()[-1]}", field="--vocab-size") from None
    tokenizer = SentencePieceTokenizer(model_proto=model.getvalue())
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save(out_dir)
        tokenizer.model_file = Path(out_dir) / "tokenizer.model"
    return tokenizer


def check_tokenizer(tokenizer: Tokenizer, args, source: str | Path | None = None) -> None:
    """Refuse a tokenizer whose ids the model (ModelArgs) cannot embed or disagrees on."""
    if tokenizer.vocab_size > args.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size:,} tokens but the model's vocab_size is "
                        f"{args.vocab_size:,}", file=source, field="vocab_size")
    for name in ("bos", "eos"):
        ours, theirs = getattr(tokenizer, f"{name}_id"), getattr(args, f"{name}_token_id")
        if ours is not None and theirs is not None and ours != theirs:
            raise UserError(f"the model says {theirs} but the tokenizer's {name.upper()} is {ours}",
                            file=source, field=f"{name}_token_id")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
