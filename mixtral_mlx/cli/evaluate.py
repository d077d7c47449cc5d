"""`mixtral-mlx eval`: loss, perplexity and bits per byte of any checkpoint on a split."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a data split")
    p.add_argument("--model", required=True, help="model directory or Hub repo")
    p.add_argument("--data", default="pretrain_data", help="directory of jsonl splits")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only this many batches")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load
    from ..data import eval_batches, tokenize_split
    from ..errors import UserError
    from ..train import eval_metrics, evaluate

    for flag in ("batch_size", "seq_len", "max_batches"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"must be positive, got {value}", field=f"--{flag.replace('_', '-')}")
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise UserError("holds no tokenizer (tokenizer.model or tokenizer.json)", file=args.model)
    if args.seq_len > model.args.max_position_embeddings:
        raise UserError(f"{args.seq_len} is longer than the model's context ({model.args.max_position_embeddings})",
                        field="--seq-len")
    data = tokenize_split(args.data, args.split, tokenizer)
    nats, tokens = evaluate(model, eval_batches(data.tokens, args.batch_size, args.seq_len, args.max_batches))
    metrics = eval_metrics(nats, tokens, data.n_bytes * tokens / max(len(data.tokens) - 1, 1))
    metrics.update(split=args.split, tokens=tokens, model=str(args.model), data=str(args.data))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{args.split}: loss {metrics['loss']:.4f}  ppl {metrics['ppl']:.2f}  "
              f"bits/byte {metrics['bpb']:.4f}  ({tokens:,} tokens)")
    return 0
