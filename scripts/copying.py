"""Does a model copy from its context? Two measurements, in nats per token.

* Repeated random tokens: a random sequence, then the same sequence again. A model with
  induction heads predicts the second copy from the first (loss near 0); one without
  finds the copy as hard as the original.
* Repeated names: in each story of a pretrain_data-style split, the loss on the
  protagonist's name (the word after "named" in the first sentence, as in "Once upon a
  time, there was a girl named Lily.", else the story's first word, as in "Ben was an
  8-year-old boy ...") at its first mention and at its later ones.
  A story names its hero about ten times; a model that reads its context finds the later
  mentions cheap.

* Questions after the story, asked as pretraining asks them: in each story followed by
  "Questions about the story:" lines ("Who found the robot? Omar"), whether greedy
  decoding from just after the question mark gives exactly the answer and then the line's
  end (the same test as `eval --task exact-match`, scored teacher-forced in one forward
  per story), overall and by the question's first two words.
* Swapped answers: the same questions, with the answer word replaced everywhere in the
  text by another answer of the same kind of question ("felt happy" -> "felt proud",
  and the answer line with it). A model that reads the fact answers with the new word;
  one that answers from what such stories usually say keeps to its guess, and follows
  the swap only as often as a guess happens to land on it (about 1 in the number of
  answers of that kind). Exact match alone cannot tell the two apart when a kind has
  few answers.

Answering finetune_data's questions (every answer is a word of the story) needs exactly
this ability, so this is the first thing to check when fine-tuning does not take.

    python scripts/copying.py --model runs/base/final [--data pretrain_data --split test]
"""

from __future__ import annotations

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)

import argparse
import json
import re

import mlx.core as mx
import numpy as np

from mixtral_mlx.data import read_split
from mixtral_mlx.finetune import answer_pool, has_word, question_kind, swap_choices, swap_word


def token_losses(model, ids: list[int]) -> np.ndarray:
    """-log p(ids[i] | ids[:i]) for i = 1..len(ids)-1."""
    logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -np.array(mx.take_along_axis(logprobs, mx.array(ids[1:])[:, None], axis=-1)[:, 0])


def repeated_random(model, tokenizer, length: int = 60, trials: int = 8, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    first, second = [], []
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for _ in range(trials):
        seq = rng.integers(0, tokenizer.vocab_size, size=length).tolist()
        losses = token_losses(model, bos + seq + seq)  # losses[i]: the loss of token i + 1
        s = len(bos)  # the first copy is tokens s .. s+length-1, the second the next `length`
        first.append(losses[max(s - 1, 0) : s + length - 1].mean())
        second.append(losses[s + length - 1 : s + 2 * length - 1].mean())
    return {"first_copy": float(np.mean(first)), "second_copy": float(np.mean(second))}


def protagonist(story: str) -> str:
    named = re.search(r"\bnamed (\w+)", story.split(".")[0])  # in the first sentence: later ones name pets
    return named.group(1) if named else story.split()[0]


def repeated_names(model, tokenizer, texts: list[str], max_tokens: int = 512) -> dict[str, float]:
    first, later = [], []
    for text in texts:
        name = tokenizer.encode(" " + protagonist(text))
        if len(name) != 1:  # a name of several pieces: skip rather than guess which piece counts
            continue
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
        ids = ids[:max_tokens]
        losses = token_losses(model, ids)
        mentions = [i for i in range(1, len(ids)) if ids[i] == name[0]]
        first += [losses[i - 1] for i in mentions[:1]]
        later += [losses[i - 1] for i in mentions[1:]]
    return {"first_mention": float(np.mean(first)) if first else float("nan"),
            "later_mentions": float(np.mean(later)) if later else float("nan"),
            "stories": len(first), "later_mention_count": len(later)}


QUESTION_LINE = re.compile(r"^(?P<question>[^\n?]+\?) (?P<answer>[^\n]+)$", re.M)


def with_ends(tokenizer, text: str) -> list[int]:
    return (([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
            + ([tokenizer.eos_id] if tokenizer.eos_id is not None else []))


def answer_span(tokenizer, text: str, m: re.Match, ids: list[int]) -> range | None:
    """The positions in `ids` (`with_ends(text)`) of m's answer and of the token that ends
    its line; None where the text tokenizes differently cut there (no clean answer span)."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    asked = bos + tokenizer.encode(text[:m.end("question")])
    answer_end = bos + tokenizer.encode(text[:m.end("answer")])
    if ids[:len(answer_end)] != answer_end or answer_end[:len(asked)] != asked or len(answer_end) >= len(ids):
        return None
    return range(len(asked), len(answer_end) + 1)


def greedy_gives(predicted: np.ndarray, ids: list[int], span: range) -> bool:
    """Whether the argmax predictions (predicted[i] for ids[i + 1]) reproduce ids over span."""
    return all(predicted[i - 1] == ids[i] for i in span)


def story_questions(model, tokenizer, texts: list[str]) -> dict:
    right: dict[str, list[bool]] = {}
    skipped = 0
    for text in texts:
        if "Questions about the story:" not in text:
            continue
        ids = with_ends(tokenizer, text)
        predicted = None
        for m in QUESTION_LINE.finditer(text, text.index("Questions about the story:")):
            span = answer_span(tokenizer, text, m, ids)
            if span is None:
                skipped += 1
                continue
            if predicted is None:
                predicted = np.array(mx.argmax(model(mx.array([ids[:-1]]))[0], axis=-1))
            right.setdefault(question_kind(m.group("question")), []).append(greedy_gives(predicted, ids, span))
    every = [r for rs in right.values() for r in rs]
    return {"exact_match": float(np.mean(every)) if every else float("nan"), "questions": len(every),
            "skipped": skipped, "by_kind": {k: [sum(v), len(v)] for k, v in sorted(right.items())}}


def swap_answer(text: str, start: int, m: re.Match, new: str) -> tuple[str, re.Match] | None:
    """`text` with the question's answer replaced by `new` everywhere (as a whole word),
    and the question line matched again in the new text; None where the story does not
    contain the answer (nothing to swap)."""
    answer = m.group("answer")
    if not has_word(text[:start], answer):
        return None
    head = swap_word(text[:m.start()], answer, new)  # the story and the questions before this one
    swapped = head + m.group("question") + " " + new + swap_word(text[m.end():], answer, new)
    return swapped, QUESTION_LINE.match(swapped, len(head))


def follows_swap(model, tokenizer, text: str, m: re.Match) -> bool | None:
    """Whether greedy decoding after m's question gives exactly its (swapped) answer and
    the line's end; None where there is no clean answer span."""
    ids = with_ends(tokenizer, text)
    span = answer_span(tokenizer, text, m, ids)
    if span is None:
        return None
    predicted = np.array(mx.argmax(model(mx.array([ids[:span.stop - 1]]))[0], axis=-1))
    return greedy_gives(predicted, ids, span)


def swapped_answers(model, tokenizer, texts: list[str], swaps: int = 2, seed: int = 0) -> dict:
    """How often the answer follows the story when the fact it asks about is swapped for
    another answer of its kind (`mixtral_mlx.finetune.answer_pool`), by kind of question:
    [followed, asked, chance], chance being what a guess among the kind's answers scores."""
    quizzes = [(text, text.index("Questions about the story:"), m) for text in texts
               if "Questions about the story:" in text
               for m in QUESTION_LINE.finditer(text, text.index("Questions about the story:"))]
    items = [(answer_pool(m.group("question"), m.group("answer")), m.group("answer"), text[:start])
             for text, start, m in quizzes]
    followed: dict[str, list[bool]] = {}
    chance: dict[str, list[float]] = {}
    for (text, start, m), (news, pool_size) in zip(quizzes, swap_choices(items, swaps, seed)):
        kind = question_kind(m.group("question"))
        for new in news:
            swapped = swap_answer(text, start, m, new)
            followed_it = follows_swap(model, tokenizer, *swapped) if swapped else None
            if followed_it is not None:
                followed.setdefault(kind, []).append(followed_it)
                chance.setdefault(kind, []).append(1 / pool_size)
    every = [f for fs in followed.values() for f in fs]
    return {"followed": float(np.mean(every)) if every else float("nan"), "swaps": len(every),
            "by_kind": {k: [sum(v), len(v), round(float(np.mean(chance[k])), 3)] for k, v in sorted(followed.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="pretrain_data")
    p.add_argument("--split", default="test")
    p.add_argument("--stories", type=int, default=30, help="stories for the name measurement")
    p.add_argument("--question-stories", type=int, default=None,
                   help="stories for the questions measurements (default: the whole split)")
    p.add_argument("--swaps", type=int, default=2, help="swapped answers tried per question")
    a = p.parse_args()
    model, tokenizer = mixtral_mlx.load(a.model)
    model.eval()
    texts = [e.text for e in read_split(a.data, a.split) if e.format == "text"]
    report = {"model": a.model, "repeated_random": repeated_random(model, tokenizer),
              "repeated_names": repeated_names(model, tokenizer, texts[: a.stories]),
              "story_questions": story_questions(model, tokenizer, texts[: a.question_stories]),
              "swapped_answers": swapped_answers(model, tokenizer, texts[: a.question_stories], a.swaps)}
    r, n, q, s = (report[k] for k in ("repeated_random", "repeated_names", "story_questions", "swapped_answers"))
    print(f"repeated random tokens: {r['first_copy']:.2f} nats on the first copy, {r['second_copy']:.2f} on the second")
    print(f"protagonist's name ({n['stories']} stories): {n['first_mention']:.2f} nats at the first mention, "
          f"{n['later_mentions']:.2f} at the {n['later_mention_count']} later ones")
    kinds = ", ".join(f"{k} {c}/{t}" for k, (c, t) in q["by_kind"].items())
    print(f"questions after the story: {100 * q['exact_match']:.1f}% exact of {q['questions']} ({kinds})")
    kinds = ", ".join(f"{k} {c}/{t} (chance {p:.2f})" for k, (c, t, p) in s["by_kind"].items())
    print(f"answer swapped in the story: the answer follows in {100 * s['followed']:.1f}% of {s['swaps']} ({kinds})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
