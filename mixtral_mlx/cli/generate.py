"""`mixtral-mlx generate`, `chat` and `convert`: run a model, talk to it, quantize it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..generate import MODES

DTYPES = ("float32", "float16", "bfloat16")


def register(sub) -> None:
    p = sub.add_parser("generate", help="raw logits, one token, or greedy / sampled text streamed from a prompt")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text ('-' reads it from stdin)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    p.add_argument("--mode", choices=MODES, default="sample",
                   help="sample (default), greedy, one-token (the next token and its probability) "
                        "or raw (the logits, nothing sampled)")
    _add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--system", help="a system message for --chat (implies --chat)")
    p.add_argument("--logits-out", type=Path, help="raw mode: save the logits to this .npy file")
    p.add_argument("--all-positions", action="store_true", help="raw mode: logits at every prompt position")
    p.add_argument("--top-logprobs", type=int, default=None, metavar="N",
                   help="show the N most likely tokens (default 5 in raw and one-token modes, else 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="an interactive conversation through the chat template (Ctrl-D ends it)")
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", help="a system message that opens the conversation")
    c.set_defaults(func=run_chat)

    v = sub.add_parser("convert", help="rewrite a model (local or from the Hub), optionally quantized")
    src = v.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a model directory (or Hub repo id)")
    src.add_argument("--hf", metavar="REPO", help="a Hugging Face Hub repo id, downloaded once into the HF cache")
    v.add_argument("--out", type=Path, required=True, help="the directory to write")
    v.add_argument("--quantize", type=int, choices=(2, 3, 4, 5, 6, 8), metavar="BITS",
                   help="quantize every linear layer, the embedding and the experts to BITS (4 or 8 usually)")
    v.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64,
                   help="weights sharing one scale and bias (default 64)")
    v.add_argument("--dtype", choices=DTYPES, help="float type of the written weights / scales (default: as read)")
    v.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    v.set_defaults(func=run_convert)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model directory or Hugging Face Hub repo id")
    p.add_argument("--adapter", help="a LoRA / DoRA / ESFT adapter directory (or fine-tuning run) to add")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights after loading (default: as stored)")
    p.add_argument("--verbose", action="store_true",
                   help="print prompt tokens, prefill and decode tokens/s and peak memory")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="stop after this many new tokens (default 256)")
    p.add_argument("--temp", type=float, default=None,
                   help="sampling temperature; 0 is greedy (default 1 for sample, 0 for one-token)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass (0, 1]")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than min-p times the top one")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already seen (CTRL; 1: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop when the text contains any of these")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens fed per step (default 512)")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the end of a prompt longer than the model's context instead of failing")


def _settings(args: argparse.Namespace, **extra) -> dict:
    settings = dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, top_k=args.top_k,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stop=tuple(args.stop), prefill_chunk=args.prefill_chunk, truncate_prompt=args.truncate_prompt)
    settings.update(extra)
    return settings


def _load(args: argparse.Namespace):
    """The model and its tokenizer, or a UserError before anything heavy when the directory is unusable."""
    from ..checkpoint import load

    if args.adapter:
        from ..lora import adapter_dir

        adapter_dir(args.adapter)  # a missing adapter fails before the model loads
    start = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise UserError("the model directory holds no tokenizer.model", file=args.model)
    if args.adapter:
        from ..lora import load_adapter

        load_adapter(model, args.adapter)
    if args.verbose:
        from ..info import count_parameters  # from the config: packed quantized weights count once each

        what = f"{count_parameters(model.args).total:,} parameters"
        if model.args.quantization:
            what += f", {model.args.quantization['bits']}-bit"
        print(f"loaded {args.model}: {what} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model, tokenizer


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError("no such file", file=args.prompt_file) from None
        except UnicodeDecodeError as e:
            raise UserError(f"not valid UTF-8 (byte {e.start})", file=args.prompt_file) from None
        except OSError as e:
            raise UserError(e.strerror or str(e), file=args.prompt_file) from None
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt


class _PrefillBar:
    """A tqdm bar for prompts fed in more than one chunk."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if done >= total:  # a single chunk: nothing to watch
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tok", desc="prefill", leave=False, file=sys.stderr)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


# ---------------------------------------------------------------------- generate
def run_generate(args: argparse.Namespace) -> int:
    from ..generate import GenerationConfig, chat_prompt, encode_prompt

    if args.mode != "raw" and (args.logits_out or args.all_positions):
        raise UserError("only applies to --mode raw", field="--logits-out" if args.logits_out else "--all-positions")
    if args.logits_out is not None and not args.logits_out.parent.is_dir():
        raise UserError("directory does not exist", file=args.logits_out.parent, field="--logits-out")
    top_n = args.top_logprobs if args.top_logprobs is not None else (5 if args.mode in ("raw", "one-token") else 0)
    settings = _settings(args, mode=args.mode, top_logprobs=top_n, all_positions=args.all_positions)
    GenerationConfig(**settings).validate()  # bad flags fail before the model loads
    text = _read_prompt(args)
    if not text.strip():
        raise UserError("the prompt is empty", field="--prompt-file" if args.prompt_file else "--prompt")

    model, tokenizer = _load(args)
    if args.chat or args.system is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt, stops = chat_prompt(tokenizer, messages + [{"role": "user", "content": text}])
        settings["stop"] = tuple(settings["stop"]) + tuple(stops)
    else:
        prompt = encode_prompt(tokenizer, text)
    if args.mode == "raw":
        return _raw(args, model, tokenizer, prompt, settings)
    if args.mode == "one-token":
        return _one_token(args, model, tokenizer, prompt, settings)
    return _stream(args, model, tokenizer, prompt, settings)


def _top_rows(tokenizer, context, top) -> list[dict]:
    from ..generate import token_text

    return [{"id": t, "text": token_text(tokenizer, context, t), "logprob": lp} for t, lp in top]


def _print_top(rows: list[dict], title: str) -> None:
    import math

    print(title)
    print(f"{'rank':>4} {'id':>7} {'logprob':>9} {'prob':>8}  text")
    for rank, r in enumerate(rows, start=1):
        print(f"{rank:>4} {r['id']:>7} {r['logprob']:>9.4f} {math.exp(r['logprob']):>8.4f}  {r['text']!r}")


def _raw(args, model, tokenizer, prompt, settings) -> int:
    import numpy as np

    from ..generate import generate

    result = generate(model, tokenizer, prompt, **settings)
    rows = _top_rows(tokenizer, prompt, result.top_logprobs[0]) if result.top_logprobs else []
    if args.logits_out is not None:
        tmp = args.logits_out.with_name(f".{args.logits_out.name}.tmp-{os.getpid()}.npy")
        np.save(tmp, np.array(result.logits))
        os.replace(tmp, args.logits_out)
    if args.json:
        print(json.dumps({"prompt_tokens": result.stats.prompt_tokens, "shape": list(result.logits.shape),
                          "logits_out": str(args.logits_out) if args.logits_out else None, "top": rows,
                          "stats": result.stats.to_dict()}))
    else:
        where = f" -> {args.logits_out}" if args.logits_out else ""
        print(f"logits {tuple(result.logits.shape)} float32{where}")
        if rows:
            _print_top(rows, f"most likely next tokens after {result.stats.prompt_tokens} prompt tokens:")
    if args.verbose:
        print(result.stats.summary(), file=sys.stderr)
    return 0


def _one_token(args, model, tokenizer, prompt, settings) -> int:
    import math

    from ..generate import generate, token_text

    result = generate(model, tokenizer, prompt, **settings)
    token, logprob = result.tokens[0], result.logprobs[0]
    text = token_text(tokenizer, prompt, token)
    rows = _top_rows(tokenizer, prompt, result.top_logprobs[0]) if result.top_logprobs[0] else []
    if args.json:
        print(json.dumps({"token": token, "text": text, "logprob": logprob, "prob": math.exp(logprob),
                          "top": rows, "stats": result.stats.to_dict()}))
    else:
        print(f"{text!r} (id {token}) p={math.exp(logprob):.4f} logprob={logprob:.4f}")
        if rows:
            _print_top(rows, "most likely next tokens:")
    if args.verbose:
        print(result.stats.summary(), file=sys.stderr)
    return 0


def _stream(args, model, tokenizer, prompt, settings) -> int:
    from ..generate import stream_generate

    chunks, interrupted = [], False
    try:
        for chunk in stream_generate(model, tokenizer, prompt, progress=_PrefillBar(), **settings):
            chunks.append(chunk)
            if not args.json:
                print(chunk.text, end="", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    finish = "interrupted" if interrupted else chunks[-1].finish_reason
    stats = chunks[-1].stats if chunks else None
    if args.json:
        out = {"text": "".join(c.text for c in chunks), "tokens": [c.token for c in chunks],
               "logprobs": [c.logprob for c in chunks], "finish_reason": finish,
               "stats": stats.to_dict() if stats else None}
        if settings["top_logprobs"]:
            out["top_logprobs"] = [[[t, lp] for t, lp in c.top_logprobs] for c in chunks]
        print(json.dumps(out))
    else:
        print(flush=True)
    if stats is not None and (args.verbose or interrupted):
        print(f"[{finish}] {stats.summary()}", file=sys.stderr)
    return 130 if interrupted else 0


# ---------------------------------------------------------------------- chat
def run_chat(args: argparse.Namespace) -> int:
    from ..generate import GenerationConfig, PromptCache, chat_prompt, stream_generate

    settings = _settings(args)
    GenerationConfig(**settings).validate()
    model, tokenizer = _load(args)
    cache = PromptCache(model)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: Ctrl-D or /quit ends it, /reset forgets the conversation, Ctrl-C stops an answer",
              file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        message = line.strip()
        if not message:
            continue
        if message in ("/quit", "/exit"):
            return 0
        if message == "/reset":
            del history[1 if args.system else 0:]
            continue
        history.append({"role": "user", "content": message})
        prompt, stops = chat_prompt(tokenizer, history)
        reply, stats = [], None
        try:
            turn = dict(settings, stop=tuple(settings["stop"]) + tuple(stops))
            if args.seed is not None:  # reproducible, yet not the same random draws every turn
                turn["seed"] = args.seed + len(history)
            for chunk in stream_generate(model, tokenizer, prompt, cache=cache, progress=_PrefillBar(), **turn):
                reply.append(chunk.text)
                stats = chunk.stats
                print(chunk.text, end="", flush=True)
        except KeyboardInterrupt:
            pass  # the answer so far stays in the history; the conversation goes on
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(reply).strip()})
        if args.verbose and stats is not None:
            print(stats.summary(), file=sys.stderr)


# ---------------------------------------------------------------------- convert
def run_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import download, load, save
    from ..info import human_bytes
    from ..quantize import is_quantized, quantize_model

    out: Path = args.out
    if out.exists() and not args.overwrite:
        raise UserError("already exists (use --overwrite to replace it)", file=out, field="--out")
    source = download(args.hf) if args.hf else args.model
    model, tokenizer = load(source)
    dtype = args.dtype or str(model.model.norm.weight.dtype).removeprefix("mlx.core.")
    before = _weight_bytes(model)
    if args.quantize:
        if is_quantized(model):
            raise UserError("the model is already quantized", file=source, field="--quantize")
        quantize_model(model, group_size=args.group_size, bits=args.quantize)
    save(model, tokenizer, out, dtype=dtype)
    after = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    what = f"{args.quantize}-bit, group size {args.group_size}" if args.quantize else dtype
    print(f"wrote {out}: {what}, weights {human_bytes(after)} (from {human_bytes(before)} in memory)")
    return 0


def _weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
