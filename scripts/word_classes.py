"""How alike does a model make the words of one class, going in and coming out?

    python scripts/word_classes.py --model runs/base/final [--model runs/other/final ...]

For each class of answer word in the stories (scripts/stories.py: colours, feelings, the
weather, number words, names, objects), the cosine similarity between the words' rows of
the input embedding and of the output head, averaged over all pairs of words that are
one token each. A class whose output rows are almost parallel (cosine near 1) can only be
told apart by the small rest of each row, so a model must write along those small
differences to answer which colour or which feeling: docs/finetune.md has what this
showed about the small preset (and why its answers to such questions ignore the story).
"""

from __future__ import annotations

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)

import argparse

import numpy as np

from mixtral_mlx.checkpoint import load
from stories import BOYS, COLORS, FEELINGS, GIRLS, NUMBER_WORDS, OBJECTS, WEATHER

CLASSES = {"colours": COLORS, "feelings": FEELINGS, "weather": WEATHER, "number words": NUMBER_WORDS[2:11],
           "names": GIRLS + BOYS, "objects": OBJECTS}


def mean_pair_cosine(rows: np.ndarray) -> float:
    """The cosine similarity of rows, averaged over distinct pairs."""
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    n = len(unit)
    return float(((unit @ unit.T).sum() - n) / (n * n - n))


def one_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The ids of the words that are one token after a space, as they are in running text."""
    ids = [tokenizer.encode(" " + w) for w in words]
    return [i[0] for i in ids if len(i) == 1]


def class_similarity(model, tokenizer) -> dict[str, tuple[int, float, float]]:
    """class -> (words measured, input-embedding cosine, output-head cosine)."""
    embed = np.array(model.model.embed_tokens.weight)
    head = embed if model.args.tie_word_embeddings else np.array(model.lm_head.weight)
    result = {}
    for name, words in CLASSES.items():
        ids = one_token_ids(tokenizer, words)
        if len(ids) >= 2:
            result[name] = (len(ids), mean_pair_cosine(embed[ids]), mean_pair_cosine(head[ids]))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="a model directory (repeat to compare)")
    args = p.parse_args()
    for path in args.model:
        model, tokenizer = load(path)
        print(f"{path}: mean cosine between the words of a class (tied: {model.args.tie_word_embeddings})")
        print(f"  {'class':<14}{'words':>6}{'embedding':>11}{'head':>8}")
        for name, (n, embed, head) in class_similarity(model, tokenizer).items():
            print(f"  {name:<14}{n:>6}{embed:>11.2f}{head:>8.2f}")


if __name__ == "__main__":
    main()
