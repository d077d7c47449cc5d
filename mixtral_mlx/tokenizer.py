"""Tokenizers: SentencePiece (`tokenizer.model`) and Hugging Face (`tokenizer.json`).

Both are wrapped in `Tokenizer`, which is all the rest of the package sees.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError


class Tokenizer:
    """A SentencePiece model with the ids the model config agrees on."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
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

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + (
            [self.eos_id] if eos and self.eos_id is not None else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def save(self, directory: str | Path) -> None:
        shutil.copyfile(self.model_file, Path(directory) / "tokenizer.model")


def _id_or_none(i: int) -> int | None:
    return None if i < 0 else i


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer saved in a model directory, or None when it holds none."""
    path = Path(directory) / "tokenizer.model"
    return Tokenizer(path) if path.exists() else None
