"""`mixtral-mlx data`: check a data directory, or download a public data set as jsonl splits."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import PACKINGS


def register(sub) -> None:
    p = sub.add_parser("data", help="check a data directory, or download a public data set as jsonl splits")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    actions.required = True

    v = actions.add_parser("validate", help="check every line of a data directory's splits and count them")
    v.add_argument("dir", help="directory with train.jsonl, val.jsonl (or valid.jsonl) and optionally test.jsonl")
    v.add_argument("--tokenizer", help="a tokenizer or model directory: also count tokens (and cache them)")
    v.add_argument("--seq-len", type=int, default=256, help="window length for the window count (default 256)")
    v.add_argument("--packing", default="document", choices=PACKINGS,
                   help="how pretraining would cut the windows counted (default document)")
    v.set_defaults(func=validate)

    from ..datasets import DATASETS

    d = actions.add_parser("download", help="fetch a public data set from the Hugging Face Hub as jsonl splits")
    d.add_argument("name", choices=sorted(DATASETS))
    d.add_argument("--out", required=True, help="directory to write train/val/test.jsonl into")
    d.add_argument("--max-docs", type=int, default=None, help="keep at most this many documents per split")
    d.add_argument("--overwrite", action="store_true", help="replace splits already in --out")
    d.set_defaults(func=download)


def validate(args: argparse.Namespace) -> int:
    import numpy as np

    from ..data import document_starts, find_split, read_jsonl, tokenize_split, window_table
    from ..errors import UserError
    from ..tokenizer import load_tokenizer

    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise UserError("holds no tokenizer.model or tokenizer.json", file=args.tokenizer, field="--tokenizer")
    if args.seq_len < 1:
        raise UserError(f"must be a positive integer, got {args.seq_len}", field="--seq-len")
    # Check every split before writing any cache, so bad data leaves nothing behind.
    splits = {}
    for split in ("train", "val", "test"):
        if split == "test" and Path(args.dir).is_dir() and not (Path(args.dir) / "test.jsonl").exists():
            continue  # optional: only `eval --split test` needs it
        splits[split] = read_jsonl(find_split(args.dir, split))

    header = f"{'split':<6} {'format':<11} {'examples':>9} {'blank':>6} {'MB':>7}"
    if tokenizer is not None:
        header += f" {'tokens':>11} {'longest':>8} {'windows':>8}"
    print(f"{args.dir}\n{header}")
    for split, s in splits.items():
        row = f"{split:<6} {s.format:<11} {len(s.examples):>9,} {s.blank_lines:>6,} {s.n_bytes / 1e6:>7.2f}"
        if tokenizer is not None:
            tok = tokenize_split(args.dir, split, tokenizer, log=lambda _: None)
            starts = document_starts(tok.tokens, tokenizer.bos_id, tokenizer.eos_id)
            longest = int(np.diff(np.append(starts, tok.n_tokens)).max())
            cut = starts if args.packing == "document" else None
            windows = len(window_table(tok.n_tokens, args.seq_len, cut, full_only=cut is None)[0])
            row += f" {tok.n_tokens:>11,} {longest:>8,} {windows:>8,}"
        print(row)
    if "test" not in splits:
        print("test   absent (only `eval --split test` needs it)")
    if tokenizer is not None:
        print(f"longest: the longest document in tokens; windows: of --seq-len {args.seq_len} + 1 tokens, "
              f"{args.packing} packing, as pretraining cuts them")
    return 0


def download(args: argparse.Namespace) -> int:
    from ..datasets import download as fetch_and_convert
    from ..errors import UserError

    if args.max_docs is not None and args.max_docs < 1:
        raise UserError(f"must be a positive integer, got {args.max_docs}", field="--max-docs")
    fetch_and_convert(args.name, args.out, max_docs=args.max_docs, overwrite=args.overwrite)
    return 0

