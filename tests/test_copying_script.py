"""scripts/copying.py measures in-context copying: an oracle copier and a uniform model tell apart."""

from __future__ import annotations

import importlib.util
import math
import re
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


# (each ends with a newline, so that the Answerer, which ends every answer's line, is right on the last one too)
STORIES = ["Omar found a robot.\n\nQuestions about the story:\nWho found the robot? Omar\nWhat did Omar find? robot\n",
           "Lily found a kite.\n\nQuestions about the story:\nWho found the kite? Lily\nWhat did Lily find? kite\n"]


class Answerer:
    """A character model that, after a question mark, spells out `answer(story, question)`
    and the line's end (and predicts 0 everywhere else)."""

    def __init__(self, answer):
        self.answer = answer

    def __call__(self, inputs: mx.array) -> mx.array:
        ids = inputs[0].tolist()[1:]  # without BOS
        rows = mx.zeros((len(ids) + 1, 256))
        for i in range(len(ids)):
            text = "".join(map(chr, ids[:i + 1]))
            story, _, line = text.rpartition("\n")
            question, mark, partial = line.partition("?")
            if mark:
                target = " " + self.answer(story, question + "?") + "\n"
                if target.startswith(partial) and len(partial) < len(target):
                    rows[i + 1] = mx.where(mx.arange(256) == ord(target[len(partial)]), 100.0, rows[i + 1])
        return rows[None]


def reads_the_story(story: str, question: str) -> str:
    who, what = re.match(r"(\w+) found an? (\w+)", story).groups()
    return who if question.startswith("Who") else what


def test_a_swapped_answer_is_swapped_throughout_the_text():
    start = STORIES[0].index("Questions")
    m = copying.QUESTION_LINE.search(STORIES[0], start)  # "Who found the robot? Omar"
    text, m2 = copying.swap_answer(STORIES[0], start, m, "Lily")
    assert text == STORIES[0].replace("Omar", "Lily")
    assert (m2.group("question"), m2.group("answer")) == ("Who found the robot?", "Lily")
    absent = STORIES[0].replace("Omar found", "Someone found")  # the story no longer holds the answer
    assert copying.swap_answer(absent, start, copying.QUESTION_LINE.search(absent, start), "Lily") is None


def test_a_reader_follows_every_swap_and_a_guesser_none():
    tok = CharTokenizer()
    reader = copying.swapped_answers(Answerer(reads_the_story), tok, STORIES)
    assert reader["followed"] == 1.0 and reader["swaps"] == 4
    assert reader["by_kind"] == {"what did": [2, 2, 0.5], "who found": [2, 2, 0.5]}
    originals = {"Who found the robot?": "Omar", "What did Omar find?": "robot",
                 "Who found the kite?": "Lily", "What did Lily find?": "kite"}
    guesser = copying.swapped_answers(Answerer(lambda story, q: originals[q]), tok, STORIES)  # ignores the story
    assert guesser["followed"] == 0.0 and guesser["by_kind"] == {"what did": [0, 2, 0.5], "who found": [0, 2, 0.5]}
    # while exact match on the texts as written cannot tell it from the reader
    assert copying.story_questions(Answerer(lambda s, q: originals[q]), tok, STORIES)["exact_match"] == 1.0
