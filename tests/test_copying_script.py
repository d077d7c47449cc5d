"""scripts/copying.py measures in-context copying: an oracle copier and a uniform model tell apart."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import mlx.core as mx
import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("copying", REPO / "scripts" / "copying.py")
copying = importlib.util.module_from_spec(spec)
spec.loader.exec_module(copying)

VOCAB, LENGTH = 50, 20


class Copier:
    """Predicts the token `LENGTH` positions back (certain), else uniform."""

    def __call__(self, inputs: mx.array) -> mx.array:
        ids = inputs[0].tolist()
        rows = []
        for i in range(len(ids)):
            j = i + 1 - LENGTH  # the position whose token the next one repeats (after BOS)
            row = [0.0] * VOCAB
            if j >= 1:
                row[ids[j]] = 100.0
            rows.append(row)
        return mx.array([rows])


class Uniform:
    def __call__(self, inputs: mx.array) -> mx.array:
        return mx.zeros((1, inputs.shape[1], VOCAB))


tokenizer = SimpleNamespace(bos_id=1, vocab_size=VOCAB)


def test_a_copier_finds_the_second_copy_free():
    r = copying.repeated_random(Copier(), tokenizer, length=LENGTH, trials=2)
    assert r["first_copy"] == pytest.approx(math.log(VOCAB), abs=1e-3)
    assert r["second_copy"] == pytest.approx(0.0, abs=1e-3)


def test_a_model_that_ignores_its_context_finds_both_copies_alike():
    r = copying.repeated_random(Uniform(), tokenizer, length=LENGTH, trials=2)
    assert r["first_copy"] == pytest.approx(r["second_copy"]) == pytest.approx(math.log(VOCAB), abs=1e-4)


@pytest.mark.parametrize("story, name", [
    ("Once upon a time, there was a girl named Lily. She had a dog named Buddy.", "Lily"),
    ("Ben was an 8-year-old boy. Ben had a rabbit named Coco.", "Ben"),  # the pet is named later
])
def test_the_protagonist_is_the_first_sentences_name(story, name):
    assert copying.protagonist(story) == name


class CharTokenizer:
    bos_id, eos_id, vocab_size = 1, 2, 256

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class Reader:
    """Knows the text: predicts each next token of `ids` exactly (and 0 past its end)."""

    def __init__(self, ids: list[int], wrong_after: str | None = None):
        self.ids, self.wrong_after = ids, wrong_after

    def __call__(self, inputs: mx.array) -> mx.array:
        n = inputs.shape[1]
        nxt = self.ids[1:n + 1]
        rows = mx.zeros((n, 256))
        rows = mx.where(mx.arange(256)[None] == mx.array(nxt)[:, None], 100.0, rows)
        if self.wrong_after is not None:  # spoil the first token after this text
            at = len(self.ids[:1]) + "".join(map(chr, self.ids[1:])).index(self.wrong_after) + len(self.wrong_after) - 1
            rows[at] = mx.zeros((256,))
        return rows[None]


STORY = "Omar found a robot.\n\nQuestions about the story:\nWho found the robot? Omar\nWhat did Omar find? robot"


def test_questions_after_the_story_scored_as_greedy_decoding_would():
    tok = CharTokenizer()
    ids = [1] + tok.encode(STORY) + [2]
    r = copying.story_questions(Reader(ids), tok, [STORY, "A story with no questions."])
    assert r["exact_match"] == 1.0 and r["questions"] == 2 and r["by_kind"] == {"what did": [1, 1], "who found": [1, 1]}
    r = copying.story_questions(Reader(ids, wrong_after="robot? Om"), tok, [STORY])  # answers "Om?"
    assert r["by_kind"] == {"what did": [1, 1], "who found": [0, 1]}
    r = copying.story_questions(Reader(ids, wrong_after="find? robot"), tok, [STORY])  # no EOS after the answer
    assert r["by_kind"] == {"what did": [0, 1], "who found": [1, 1]}
    assert copying.story_questions(Uniform(), tok, [STORY])["exact_match"] == 0.0
