"""`mixtral-mlx tokenizer`: train a SentencePiece BPE tokenizer on a data directory, or show how one splits text."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer on a data directory, or try one on text")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True

    t = actions.add_parser("train", help="train a SentencePiece BPE tokenizer (byte fallback, split digits)")
    t.add_argument("--data", required=True, help="data directory; its train split is used")
    t.add_argument("--vocab-size", type=int, required=True,
                   help="largest vocabulary wanted (a small corpus may give fewer pieces)")
    t.add_argument("--out", required=True, help="directory to write tokenizer.model into")
    t.set_defaults(func=train)

    e = actions.add_parser("encode", help="show the tokens a tokenizer makes of a text")
    e.add_argument("--tokenizer", required=True, help="a tokenizer or model directory")
    e.add_argument("text", help="the text to encode")
    e.set_defaults(func=encode)


def train(args: argparse.Namespace) -> int:
    from ..data import load_split, train_tokenizer_on
    from ..errors import UserError

    tokenizer = train_tokenizer_on(args.data, args.vocab_size, args.out)
    print(f"wrote {tokenizer.model_file}: ids 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3 <pad>")
    try:
        val = load_split(args.data, "val")
    except UserError:  # no usable val split: nothing to measure on
        return 0
    docs = [e.document() for e in val.examples]
    n_tokens = sum(map(len, tokenizer.encode_batch(docs)))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"val: {n_tokens:,} tokens, {n_bytes / max(n_tokens, 1):.2f} bytes per token")
    return 0


def encode(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise UserError("holds no tokenizer.model or tokenizer.json", file=args.tokenizer, field="--tokenizer")
    ids = tokenizer.encode(args.text)
    print(f"{len(ids)} tokens (vocab {tokenizer.vocab_size:,})")
    print(" ".join(f"{i}:{p!r}" for i, p in zip(ids, tokenizer.pieces(ids))))
    return 0
