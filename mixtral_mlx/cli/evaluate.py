"""`mixtral-mlx eval`: loss, perplexity and bits per byte, or task accuracy, of any checkpoint on a split."""

from __future__ import annotations

import argparse
import json
import sys

from ..data import PACKINGS

TASKS = ("loss", "exact-match")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (with or without an adapter) on a data split")
    p.add_argument("--model", required=True, help="model directory or Hub repo")
    p.add_argument("--adapter", help="adapter directory (or fine-tuning run) to add to the model")
    p.add_argument("--data", default="pretrain_data", help="directory of jsonl splits")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--task", default="loss", choices=TASKS,
                   help="loss: loss, perplexity and bits per byte over the split's text; exact-match: greedy "
                        "answers to each prompt scored against the expected completion")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--packing", default="document", choices=PACKINGS,
                   help="loss: windows that start at each document (as pretrain does by default) or run across them")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate only this many batches")
    p.add_argument("--limit", type=int, default=None, help="exact-match: score only the first N examples")
    p.add_argument("--max-tokens", type=int, default=32, help="exact-match: longest answer to generate")
    p.add_argument("--answers", default=None, metavar="FILE",
                   help="exact-match: write each question's expected and generated answer to FILE (jsonl)")
    p.add_argument("--by-kind", action="store_true",
                   help="exact-match: also print the score by kind of question (the question's first two words); "
                        "--json always holds it")
    p.add_argument("--swap-answers", type=int, default=None, metavar="N",
                   help="exact-match: also score N copies of each example whose answer is a word of its prompt, "
                        "that word swapped throughout for another answer to the same kind of question and expected "
                        "instead: a model that reads the prompt follows the swap, one that guesses does not")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON (the only line on stdout)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load
    from ..errors import UserError

    for flag in ("batch_size", "seq_len", "max_batches", "limit", "max_tokens", "swap_answers"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"must be positive, got {value}", field=f"--{flag.replace('_', '-')}")
    for flag in ("answers", "by_kind", "swap_answers"):
        if getattr(args, flag) and args.task != "exact-match":
            raise UserError("means something only with --task exact-match", field=f"--{flag.replace('_', '-')}")
    if args.adapter:
        from ..lora import adapter_dir

        adapter_dir(args.adapter)  # a missing adapter fails before the model loads
    model, tokenizer = load(args.model)
    if tokenizer is None:
        raise UserError("holds no tokenizer (tokenizer.model or tokenizer.json)", file=args.model)
    if args.adapter:
        from ..lora import load_adapter

        load_adapter(model, args.adapter)
    metrics = (exact_match(model, tokenizer, args) if args.task == "exact-match" else loss(model, tokenizer, args))
    metrics.update(split=args.split, model=str(args.model), adapter=args.adapter, data=str(args.data))
    if args.json:
        print(json.dumps(metrics))
    elif args.task == "exact-match":
        print(f"{args.split}: exact match {100 * metrics['exact_match']:.1f}% "
              f"({metrics['correct']:,} of {metrics['total']:,})")
        print_by_kind(metrics, args.by_kind)
        if "swapped" in metrics:
            swapped = metrics["swapped"]
            print(f"{args.split}, answers swapped in the prompt: the answer follows in {100 * swapped['exact_match']:.1f}% "
                  f"({swapped['correct']:,} of {swapped['total']:,}; a guess among each kind's answers: "
                  f"{100 * swapped['chance']:.1f}%)")
            print_by_kind(swapped, args.by_kind)
    else:
        print(f"{args.split}: loss {metrics['loss']:.4f}  ppl {metrics['ppl']:.2f}  "
              f"bits/byte {metrics['bpb']:.4f}  ({metrics['tokens']:,} tokens)")
    return 0


def print_by_kind(metrics: dict, show: bool) -> None:
    if not show:
        return
    width = max(map(len, metrics["by_kind"]), default=0)
    for kind, (right, asked, *chance) in metrics["by_kind"].items():
        guess = f"  (a guess: {100 * chance[0]:.1f}%)" if chance else ""
        print(f"  {kind or '(empty)':<{width}}  {right:>4} of {asked:<4} {100 * right / asked:5.1f}%{guess}")


def loss(model, tokenizer, args) -> dict:
    from ..data import document_starts, eval_batches, num_targets, tokenize_split
    from ..errors import UserError
    from ..train import eval_metrics, evaluate

    if args.seq_len > model.args.max_position_embeddings:
        raise UserError(f"{args.seq_len} is longer than the model's context ({model.args.max_position_embeddings})",
                        field="--seq-len")
    data = tokenize_split(args.data, args.split, tokenizer, log=lambda m: print(m, file=sys.stderr))
    starts = None if args.packing == "stream" else document_starts(data.tokens, tokenizer.bos_id, tokenizer.eos_id)
    nats, tokens = evaluate(model, eval_batches(data.tokens, args.batch_size, args.seq_len, args.max_batches,
                                                doc_starts=starts))
    metrics = eval_metrics(nats, tokens, data.n_bytes * tokens / max(num_targets(len(data.tokens), starts), 1))
    return {**metrics, "tokens": tokens}


def exact_match(model, tokenizer, args) -> dict:
    from ..data import read_split
    from ..finetune import exact_match as score
    from ..finetune import swapped_exact_match

    examples = read_split(args.data, args.split)[:args.limit]
    result = score(model, tokenizer, examples, max_tokens=args.max_tokens)
    if args.answers:
        with open(args.answers, "w") as f:
            for example, row in zip(examples, result["rows"]):
                question = example.prompt_messages()[-1]["content"]
                f.write(json.dumps({"line": example.line, "prompt": question, **row}) + "\n")
    metrics = {k: v for k, v in result.items() if k != "rows"}
    if args.swap_answers:
        swapped = swapped_exact_match(model, tokenizer, examples, args.swap_answers, max_tokens=args.max_tokens)
        metrics["swapped"] = {k: v for k, v in swapped.items() if k != "rows"}
    return metrics
