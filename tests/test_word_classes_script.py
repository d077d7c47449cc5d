"""scripts/word_classes.py: the mean cosine between the rows of a class's words."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import mlx.core as mx
import numpy as np
import pytest

from conftest import REPO
from mixtral_mlx.config import load_preset
from mixtral_mlx.model import Model, init_weights

sys.path.insert(0, str(REPO / "scripts"))  # word_classes imports stories as the scripts do
spec = importlib.util.spec_from_file_location("word_classes", REPO / "scripts" / "word_classes.py")
word_classes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(word_classes)


class WordTokenizer:
    """One id per word of every class, and two ids for "surprised" (so it is left out)."""

    def __init__(self):
        words = sorted({w for ws in word_classes.CLASSES.values() for w in ws})
        self.ids = {w: i + 10 for i, w in enumerate(words)}

    def encode(self, text: str) -> list[int]:
        word = text.strip()
        return [1, 2] if word == "surprised" else [self.ids[word]]


def test_mean_pair_cosine():
    assert word_classes.mean_pair_cosine(np.array([[1.0, 0], [2.0, 0], [0, 3.0]])) == pytest.approx(1 / 3)


@pytest.mark.parametrize("tied", [False, True])
def test_a_class_with_parallel_head_rows_measures_one(tied):
    tokenizer = WordTokenizer()
    args = dataclasses.replace(load_preset("tiny"), vocab_size=200, tie_word_embeddings=tied)
    model = init_weights(Model(args), seed=0)
    colours = [tokenizer.ids[c] for c in word_classes.CLASSES["colours"]]
    table = model.model.embed_tokens if tied else model.lm_head
    weight = np.array(table.weight)
    weight[colours] = weight[colours[0]] * np.arange(1, len(colours) + 1)[:, None]  # one direction, any length
    table.weight = mx.array(weight)
    result = word_classes.class_similarity(model, tokenizer)
    n, embedding, head = result["colours"]
    assert n == len(colours) and head == pytest.approx(1.0, abs=1e-5)
    assert embedding == (pytest.approx(1.0, abs=1e-5) if tied else pytest.approx(0.0, abs=0.1))
    assert result["feelings"][0] == len(word_classes.CLASSES["feelings"]) - 1  # "surprised" is two tokens
    assert result["names"][2] == pytest.approx(0.0, abs=0.1)  # random rows: about orthogonal
