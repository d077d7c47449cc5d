"""Can the small preset learn to look one fact up? A bare training loop on a drill.

    python scripts/lookup_drill.py synthetic [--steps 1000] [--short-steps 400] [--short-share 0.25] [--qk-std 0.1]
    python scripts/lookup_drill.py stories --tokenizer RUN/tokenizer [--kind "how did"] [--verbatim] [--context 2]
                                   [--steps 300]
                                   [--qk-std 0.1]
                                   [--first-steps 200 [--first-kind "how did"]] [--answer-loss]
                                   [--grow 150 [--order "how did,what was,..."]]
                                   [--init MODEL] [--save MODEL]

`synthetic`: random filler sentences (words w0..w299) with one "N felt F ." among them,
then "How did N feel ? F": 45 to 70 tokens of context, five feelings. `--short-steps S`
trains the first S steps on 0 to 1 filler sentences instead (5 to 15 tokens);
`--short-share P` makes each document short with probability P throughout.
`stories`: a reading drill (scripts/stories.py, `drill_passages`) for every question of
each of pretrain_data's 3,000 training stories (held out: those of its val stories),
its passage the sentences that state the answer and up to `--context` of their
neighbours (0: those sentences alone), optionally of one kind of question only
(`--verbatim`: only those whose passage writes the answer as the answer does),
tokenized with `--tokenizer`; `--first-steps N`
trains the first N steps on one kind only (`--first-kind`), a curriculum; `--grow S`
another: one kind (`--order`, the kinds never read first) for S steps, then one more
kind every S steps, half of each batch the newest kind and half the earlier ones, the
learning rate held after warmup until every kind is in, then all kinds alike and the
cosine decay for the steps left; `--save` writes the trained model (with the
tokenizer) for the next stage, `--init` or `pretrain --init`.
`--answer-loss` learns the answer alone (its last token and the EOS), not the passage.

The model is the small preset at the vocabulary's size, trained from `init_weights` (or
`--init`) with AdamW (bias-corrected, weight decay 0.1), 100 warmup steps, cosine decay
to a tenth, clipping at 1, batch 8, the loss on every token unless `--answer-loss`; no
trainer around it, so what it shows is the model's and the data's. Every 50 steps it
prints the share of 256 held-out drills (always the long ones for `synthetic`) whose
answer is the argmax prediction (its last token, given the others: "7" after "▁" in
" 7"), and at the end of a `stories` run of every kind, that share by kind.
docs/finetune.md has the runs.
"""

from __future__ import annotations

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)

import argparse
import dataclasses
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mixtral_mlx.checkpoint import load_model, save
from mixtral_mlx.config import load_preset
from mixtral_mlx.finetune import has_word, question_kind
from mixtral_mlx.model import Model, init_weights
from mixtral_mlx.tokenizer import load_tokenizer

MAX_LEN = 96  # tokens a drill is cut to (inputs and targets: MAX_LEN + 1)


def synthetic_drills(short: bool, rng: np.random.Generator, vocab: dict[str, int]) -> list[int]:
    name, feeling = f"N{rng.integers(20)}", f"F{rng.integers(5)}"
    n_filler = rng.integers(0, 2) if short else rng.integers(5, 8)
    sentences = [[f"w{j}" for j in rng.integers(0, 300, rng.integers(5, 10))] + ["."] for _ in range(n_filler)]
    sentences.insert(rng.integers(0, len(sentences) + 1), [name, "felt", feeling, "."])
    words = ["<s>"] + [w for s in sentences for w in s] + ["How", "did", name, "feel", "?", feeling, "</s>"]
    return [vocab[w] for w in words]


def synthetic_vocab() -> dict[str, int]:
    words = ["<pad>", "<s>", "</s>", "felt", ".", "How", "did", "feel", "?"]
    words += [f"N{i}" for i in range(20)] + [f"F{i}" for i in range(5)] + [f"w{i}" for i in range(300)]
    return {w: i for i, w in enumerate(words)}


def story_drills(tokenizer, split: str, count: int, verbatim: bool = False,
                 context: int = 2) -> list[tuple[str, list[int]]]:
    """(kind of question, token ids: BOS, drill, EOS) of a reading drill for every question
    of pretrain_data's first `count` stories of `split`, its passage the sentences that
    state the answer and up to `context` of their neighbours; with `verbatim`, only the
    drills whose passage holds the answer as it is written ("6", not "six-year-old")."""
    from stories import drill_passages, drill_text, write_story

    drills = []
    for i in range(count):
        story = write_story(f"0:pretrain:{split}:{i}", quiz=1.0, asked=(4, 6))
        for passage, question, answer in drill_passages(story, f"0:drill:{split}:{i}", len(story.questions), context):
            if verbatim and not has_word(passage, answer):
                continue
            ids = [tokenizer.bos_id] + tokenizer.encode(drill_text(passage, question, answer)) + [tokenizer.eos_id]
            drills.append((question_kind(question), ids))
    return drills


def of_kind(drills: list[tuple[str, list[int]]], kind: str | None) -> list[list[int]]:
    """The token ids of the drills of one kind of question (all of them for None)."""
    return [ids for k, ids in drills if kind is None or k == kind]


# The kinds a pretrained base does not read first (docs/finetune.md), the copies last.
HARD_FIRST = ("how did", "what was", "how many", "how old", "what color", "what did", "where did", "what kind",
              "who found", "who came", "who did", "who gave")


def growing_batch(by_kind: dict[str, list[list[int]]], order: list[str], step: int, every: int,
                  rng: np.random.Generator, size: int = 8) -> list[list[int]]:
    """A batch of the curriculum that adds one kind of question every `every` steps, in
    `order`: half the rows of the newest kind, the rest of the earlier ones (each kind as
    likely), and once every kind has had its turn, every kind as likely."""
    added = (step - 1) // every + 1
    if added == 1 or added > len(order):  # the first kind alone, or every kind alike
        newest, others = None, order[:added]
    else:
        newest, others = order[added - 1], order[:added - 1]
    rows = []
    for b in range(size):
        kind = newest if newest is not None and b < size // 2 else others[rng.integers(len(others))]
        rows.append(by_kind[kind][rng.integers(len(by_kind[kind]))])
    return rows


def as_batch(rows: list[list[int]], answer_only: bool = False) -> tuple[mx.array, mx.array, mx.array]:
    """Inputs, targets and the loss mask: every token, or (`answer_only`) the answer's last
    token and the EOS after it."""
    ids = np.zeros((len(rows), MAX_LEN + 1), np.int32)
    mask = np.zeros((len(rows), MAX_LEN), np.float32)
    for b, row in enumerate(rows):
        row = row[:MAX_LEN + 1]
        ids[b, :len(row)] = row
        mask[b, len(row) - 3 if answer_only else 0:len(row) - 1] = 1
    return mx.array(ids[:, :-1]), mx.array(ids[:, 1:]), mx.array(mask)


def answer_hits(model: Model, rows: list[list[int]]) -> np.ndarray:
    """For each row, whether its answer's last token (the one before EOS) is the argmax prediction."""
    inputs, targets, _ = as_batch(rows)
    predicted = np.array(mx.argmax(model(inputs), axis=-1))
    at = np.array([min(len(r), MAX_LEN + 1) - 3 for r in rows])  # predicts the answer, the token before EOS
    rows_index = np.arange(len(rows))
    return predicted[rows_index, at] == np.array(targets)[rows_index, at]


def hits_of_kind(hits: np.ndarray, drills: list[tuple[str, list[int]]], kind: str) -> np.ndarray:
    """The entries of `hits` (one per drill) that belong to drills of `kind`."""
    return hits[np.array([k == kind for k, _ in drills], bool)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("drill", choices=["synthetic", "stories"])
    p.add_argument("--tokenizer", help="a tokenizer directory (stories)")
    p.add_argument("--kind", help='only drills of this kind of question, e.g. "how did" (stories)')
    p.add_argument("--verbatim", action="store_true",
                   help="stories: only drills whose passage writes the answer as the answer does (no 'six' for 6)")
    p.add_argument("--context", type=int, default=2,
                   help="stories: up to this many sentences around the ones that state the answer")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--qk-std", type=float, default=None, help="std of the initial q_proj/k_proj (default 0.02)")
    p.add_argument("--short-steps", type=int, default=0, help="synthetic: the first steps on short contexts")
    p.add_argument("--short-share", type=float, default=0.0, help="synthetic: share of short contexts throughout")
    p.add_argument("--first-kind", default="how did", help="stories: the kind the first --first-steps train on")
    p.add_argument("--first-steps", type=int, default=0, help="stories: steps on --first-kind drills first")
    p.add_argument("--grow", type=int, default=0, help="stories: add one kind of question every GROW steps")
    p.add_argument("--order", default=",".join(HARD_FIRST), help="stories: the kinds --grow adds, in turn")
    p.add_argument("--init", help="stories: start from this saved model (its tokenizer must be --tokenizer's)")
    p.add_argument("--save", help="stories: write the trained model here (a model directory, for pretrain --init)")
    p.add_argument("--answer-loss", action="store_true",
                   help="learn only the answer's last token and the EOS, not the passage")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)

    if args.drill == "synthetic" and (args.init or args.save):
        p.error("--init and --save are for the stories drill")
    if args.grow and (args.kind or args.first_steps):
        p.error("--grow makes its own order of kinds: leave out --kind and --first-steps")
    if args.drill == "synthetic":
        vocab = synthetic_vocab()
        vocab_size = len(vocab)
        held_out_rng = np.random.default_rng(123)
        held_out = [synthetic_drills(False, held_out_rng, vocab) for _ in range(256)]

        def next_rows(step: int) -> list[list[int]]:
            return [synthetic_drills(step <= args.short_steps or rng.random() < args.short_share, rng, vocab)
                    for _ in range(8)]
    else:
        if not args.tokenizer:
            p.error("stories needs --tokenizer")
        tokenizer = load_tokenizer(args.tokenizer)
        vocab_size = tokenizer.vocab_size
        every_train = story_drills(tokenizer, "train", 3000, args.verbatim, args.context)
        train, first = of_kind(every_train, args.kind), of_kind(every_train, args.first_kind)
        held_out_drills = [(k, ids) for k, ids in story_drills(tokenizer, "val", 150, args.verbatim, args.context)
                           if args.kind is None or k == args.kind][:256]
        held_out = of_kind(held_out_drills, None)
        print(f"{len(train):,} training drills, {len(held_out)} held out")
        if args.grow:
            order = [k.strip() for k in args.order.split(",")]
            by_kind = {k: of_kind(every_train, k) for k in order}
            if not all(by_kind.values()):
                p.error(f"--order: no drills of {[k for k, v in by_kind.items() if not v]}")

        def next_rows(step: int) -> list[list[int]]:
            if args.grow:
                return growing_batch(by_kind, order, step, args.grow, rng)
            drills = first if step <= args.first_steps else train
            return [drills[i] for i in rng.integers(0, len(drills), 8)]

    if args.init:
        model = load_model(args.init)
        if model.args.vocab_size != vocab_size:
            p.error(f"{args.init} has {model.args.vocab_size} tokens, the tokenizer {vocab_size}")
        model.train()
    else:
        model_args = dataclasses.replace(load_preset("small"), vocab_size=vocab_size)
        model = init_weights(Model(model_args), seed=args.seed, qk_std=args.qk_std)
    warmup = min(100, args.steps // 2)
    held = min(args.grow * len(order), args.steps - warmup - 1) if args.drill == "stories" and args.grow else 0
    schedule = optim.join_schedules([optim.linear_schedule(0, args.lr, warmup),
                                     optim.linear_schedule(args.lr, args.lr, max(held, 1)),
                                     optim.cosine_decay(args.lr, args.steps - warmup - held, args.lr / 10)],
                                    [warmup, warmup + held])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.1, bias_correction=True)

    def loss_fn(model, inputs, targets, mask):
        return (nn.losses.cross_entropy(model(inputs), targets) * mask).sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    start = time.time()
    for step in range(1, args.steps + 1):
        loss, grads = loss_and_grad(model, *as_batch(next_rows(step), args.answer_loss))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if step % 50 == 0 or step == args.steps:
            hits = answer_hits(model, held_out)
            print(f"step {step}: loss {loss.item():.3f}, answer right in {hits.mean():.1%} "
                  f"of {len(held_out)} held-out drills ({time.time() - start:.0f} s)", flush=True)
            if args.drill == "stories" and args.grow:  # the kinds added so far
                print("  " + ", ".join(f"{kind} {hits_of_kind(hits, held_out_drills, kind).mean():.0%}"
                                       for kind in order[:(step - 1) // args.grow + 1]), flush=True)
    if args.drill == "stories" and args.kind is None:  # which kinds of question it learned
        hits = answer_hits(model, held_out)
        for kind in sorted({k for k, _ in held_out_drills}):
            mine = hits_of_kind(hits, held_out_drills, kind)
            print(f"  {kind:<12} {mine.sum():>3} of {len(mine):<3} {mine.mean():7.1%}")
    if args.save:
        save(model, tokenizer, args.save)
        print(f"saved: {args.save}")


if __name__ == "__main__":
    main()
