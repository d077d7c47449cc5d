"""Write pretrain_data/: short generated stories, one {"text": ...} per line.

    python scripts/make_pretrain_data.py [--out pretrain_data] [--seed 0] [--train N] [--val N] [--test N]
                                         [--all-questions] [--drills N] [--also-alone KIND]

Deterministic: the same seed and counts give the same bytes. Story i of a split depends
only on (seed, split, i), so asking for more stories extends the files without changing
the stories already there. See pretrain_data/README.md for what the stories hold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stories import QUIZ_HEADER, Story, reading_drills, write_story

DEFAULT_COUNTS = {"train": 3000, "val": 150, "test": 150}
# Every story ends with 4 to 6 questions about it and their answers: what teaches a model
# to look facts up in its context (with 2 to 4 questions in half of the stories, a small
# model answered under half of them after 10 epochs), within the 5 MB of embedded data.
QUIZ = 1.0
ASKED = (4, 6)
# --all-questions: every question a story answers (12 to 20), in random order; the same
# stories, 4.8 MB in all.
ALL_ASKED = (99, 99)
# After each training story, this many reading drills: a passage of one to four of its
# sentences and one question about it (stories.reading_drills).
DRILLS = 0
# --also-alone KIND (repeatable): each training story once more for each KIND, followed by
# its one question of that kind alone ("how did": its feeling), so that kind keeps a
# document of its own.


def make(out: Path, seed: int = 0, counts: dict[str, int] = DEFAULT_COUNTS,
         asked: tuple[int, int] = ASKED, drills: int = DRILLS, also_alone: tuple[str, ...] = ()) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, n in counts.items():
        lines = []
        for i in range(n):
            story = write_story(f"{seed}:pretrain:{split}:{i}", quiz=QUIZ, asked=asked)
            lines.append(json.dumps({"text": story.text}))
            if split == "train":  # val and test hold whole stories only, comparable across versions
                lines += [json.dumps({"text": d}) for d in reading_drills(story, f"{seed}:drill:{i}", drills)]
                lines += [json.dumps({"text": asked_alone(story, kind, f"{seed}:pretrain:{split}:{i}")})
                          for kind in also_alone]
        data = "".join(line + "\n" for line in lines).encode()
        (out / f"{split}.jsonl").write_bytes(data)
        sizes[split] = len(data)
    return sizes


def asked_alone(story: Story, kind: str, seed: str) -> str:
    """The story (`seed`'s) without its quiz, then its question of `kind` alone and the answer.

    The kind is a question's first two words, as `mixtral_mlx.finetune.question_kind`
    reads it from a prompt (not imported: this script needs no MLX)."""
    asked = [(q, a) for q, a in story.questions if " ".join(q.lower().split()[:2]) == kind.lower()]
    if not asked:
        raise SystemExit(f"--also-alone: story {seed} asks no {kind!r} question")
    question, answer = asked[0]
    return story.text.split(QUIZ_HEADER)[0] + QUIZ_HEADER + f"{question} {answer}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "pretrain_data")
    p.add_argument("--seed", type=int, default=0)
    for split, n in DEFAULT_COUNTS.items():
        p.add_argument(f"--{split}", type=int, default=n, help=f"stories in {split}.jsonl (default {n})")
    p.add_argument("--all-questions", action="store_true",
                   help="end each story with every question it answers instead of 4 to 6 of them")
    p.add_argument("--drills", type=int, default=DRILLS,
                   help=f"reading drills after each training story (default {DRILLS})")
    p.add_argument("--also-alone", metavar="KIND", action="append", default=[],
                   help='each training story once more, followed by its KIND question alone (e.g. "how did"); '
                        "repeatable, a copy per kind")
    args = p.parse_args()
    sizes = make(args.out, args.seed, {s: getattr(args, s) for s in DEFAULT_COUNTS},
                 ALL_ASKED if args.all_questions else ASKED, args.drills, tuple(args.also_alone))
    for split, size in sizes.items():
        extra = ""
        if split == "train" and args.drills:
            extra += f" and {getattr(args, split) * args.drills:,} drills"
        for kind in args.also_alone if split == "train" else ():
            extra += f" and each once more asking {kind!r} alone"
        print(f"{args.out / split}.jsonl: {getattr(args, split):,} stories{extra}, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
