"""Write finetune_data/: reading comprehension over generated stories, with one-word answers.

    python scripts/make_finetune_data.py [--out finetune_data] [--seed 0] [--format completion|chat]
                                         [--train-questions one|all] [--train-drills N]
                                         [--train N] [--val N] [--test N]

Each example is a new short story (none of them is in pretrain_data/) and one question
about it whose answer is a word of the story: a name, place, object, colour, number or
feeling. In the default `completion` format a line is {"prompt": story + question,
"completion": answer}; `--format chat` writes the same as {"messages": [user, assistant]}.
The completion is the expected answer for exact-match scoring. Deterministic from the seed.

`--train-questions all` makes each train line a conversation that asks every question
its story answers, one per turn in a seeded order; the first turn also holds the story
(the one-question example's story). A story then teaches about 14 answers instead of
one, for little more compute. Val and test keep one question a story, so their scores
compare with the default's.

`--train-drills N` adds, after the train lines, N reading drills for each training story:
a passage of the sentences that state one answer (with up to two neighbours), then that
question, 20 to 70 tokens instead of about 150, so the answer is a few dozen tokens back.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from stories import drill_passages, write_story

DEFAULT_COUNTS = {"train": 2000, "val": 200, "test": 200}
STORY_EVENTS = (2, 4)  # fewer events than pretraining stories: prompts of about 150 tokens


def story_of(seed: int, split: str, i: int):
    """The story of example i (the same for one question or all of them)."""
    return write_story(f"{seed}:finetune:{split}:{i}", events=STORY_EVENTS)


def example(seed: int, split: str, i: int) -> tuple[str, str]:
    """(prompt, answer) of example i: a story and one of the questions it answers."""
    story = story_of(seed, split, i)
    question, answer = random.Random(f"{seed}:question:{split}:{i}").choice(story.questions)
    return f"{story.text}\n\n{question}", answer


def conversation(seed: int, split: str, i: int) -> list[tuple[str, str]]:
    """(user turn, answer) pairs of example i's story asking every question it answers, in a seeded order."""
    story = story_of(seed, split, i)
    turns = list(story.questions)
    random.Random(f"{seed}:multi:{i}").shuffle(turns)  # the order docs/finetune.md's runs trained on
    turns[0] = (f"{story.text}\n\n{turns[0][0]}", turns[0][1])
    return turns


def chat(turns: list[tuple[str, str]]) -> str:
    """A `{"messages"}` line: each (user turn, answer) pair as a user and an assistant message."""
    return json.dumps({"messages": [m for q, a in turns for m in ({"role": "user", "content": q},
                                                                  {"role": "assistant", "content": a})]})


def line(prompt: str, answer: str, fmt: str) -> str:
    if fmt == "chat":
        return chat([(prompt, answer)])
    return json.dumps({"prompt": prompt, "completion": answer})


def drills(seed: int, split: str, i: int, n: int) -> list[tuple[str, str]]:
    """(prompt, answer) of `n` reading drills of example i's story: a short passage of it
    that states the answer, then the question (stories.drill_passages)."""
    return [(f"{passage}\n\n{question}", answer)
            for passage, question, answer in drill_passages(story_of(seed, split, i), f"{seed}:drill:{split}:{i}", n)]


def make(out: Path, seed: int = 0, counts: dict[str, int] = DEFAULT_COUNTS, fmt: str = "completion",
         train_questions: str = "one", train_drills: int = 0) -> dict[str, tuple[int, int]]:
    """Write the splits; returns each one's (examples, bytes)."""
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, n in counts.items():
        if split == "train" and train_questions == "all":
            lines = (chat(conversation(seed, split, i)) for i in range(n))
        else:
            lines = (line(*example(seed, split, i), fmt) for i in range(n))
        if split == "train" and train_drills:
            lines = itertools.chain(lines, (line(prompt, answer, fmt) for i in range(n)
                                            for prompt, answer in drills(seed, split, i, train_drills)))
        lines = [l + "\n" for l in lines]
        data = "".join(lines).encode()
        (out / f"{split}.jsonl").write_bytes(data)
        sizes[split] = (len(lines), len(data))
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "finetune_data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("completion", "chat"), default="completion")
    p.add_argument("--train-questions", choices=("one", "all"), default="one",
                   help="all: each train line is a chat asking every question its story answers")
    p.add_argument("--train-drills", type=int, default=0,
                   help="also train on N reading drills a story: a short passage stating the answer, one question")
    for split, n in DEFAULT_COUNTS.items():
        p.add_argument(f"--{split}", type=int, default=n, help=f"examples in {split}.jsonl (default {n})")
    args = p.parse_args()
    sizes = make(args.out, args.seed, {s: getattr(args, s) for s in DEFAULT_COUNTS}, args.format,
                 args.train_questions, args.train_drills)
    for split, (examples, size) in sizes.items():
        print(f"{args.out / split}.jsonl: {examples:,} examples, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
