"""`mixtral-mlx analyze experts|routes|attention|hidden`: look inside a model.

Each writes JSON (the numbers) and PNG (the pictures) and prints a short summary:
  experts    expert usage per data set and layer, balance, entropy, dead experts, reuse
  routes     each token's experts per layer: coloured text here, a grid in the PNG
  attention  attention maps with token labels (all heads of each chosen layer as a grid)
  hidden     every layer's hidden states (.npz) and their norms
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

from ..errors import UserError


def register(sub) -> None:
    p = sub.add_parser("analyze", help="look inside a model: expert usage, token routes, attention, hidden states",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="analysis", metavar="WHAT", parser_class=type(p))
    kinds.required = True

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", required=True, metavar="DIR",
                       help="a model directory (config.json, weights, tokenizer.model) or Hub repo")
    model.add_argument("--adapter", metavar="DIR", help="a directory of LoRA adapters to apply to the model")
    model.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                       help="cast the weights on load (default: as stored)")
    prompt = argparse.ArgumentParser(add_help=False)
    prompt.add_argument("--prompt", required=True, metavar="TEXT",
                        help="the text to run (a BOS token is put in front)")

    e = kinds.add_parser("experts", parents=[model], help="expert usage per data set and layer")
    e.add_argument("--data", nargs="+", required=True, metavar="NAME=DIR",
                   help="data sets: directories of jsonl splits, each optionally named (NAME=DIR)")
    e.add_argument("--split", default="val", metavar="NAME",
                   help="the split to read (default: val; valid.jsonl is accepted)")
    e.add_argument("--max-tokens", type=int, default=16384, metavar="N",
                   help="tokens per data set, in windows spread evenly over the split (default: 16384)")
    e.add_argument("--seq-len", type=int, default=256, metavar="N", help="tokens per window (default: 256)")
    e.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default: 8)")
    e.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the shuffle that gives the chance rates")
    add_out(e, "analysis/experts")
    e.set_defaults(func=run_experts)

    r = kinds.add_parser("routes", parents=[model, prompt], help="each token's experts per layer")
    add_out(r, "analysis/routes")
    r.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the printed text by expert (auto: when printing to a terminal)")
    r.set_defaults(func=run_routes)

    a = kinds.add_parser("attention", parents=[model, prompt], help="attention maps with token labels")
    a.add_argument("--layer", type=int, action="append", metavar="L",
                   help="layer to draw, negative from the end; repeatable (default: every layer)")
    a.add_argument("--head", type=int, metavar="H", help="draw only this head (default: all heads as a grid)")
    add_out(a, "analysis/attention")
    a.set_defaults(func=run_attention)

    h = kinds.add_parser("hidden", parents=[model, prompt], help="hidden states of every layer and their norms")
    h.add_argument("--out", default="analysis/hidden.npz", metavar="FILE.npz",
                   help="the .npz to write; a .json and a .png are written beside it (default: analysis/hidden.npz)")
    h.set_defaults(func=run_hidden)


def add_out(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--out", default=default, metavar="DIR", help=f"output directory (default: {default})")


# ---------------------------------------------------------------------- shared
def load_model(args: argparse.Namespace):
    """The model (with --adapter applied) and its tokenizer, which every analysis needs."""
    from ..checkpoint import load, resolve

    model, tokenizer = load(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise UserError("no tokenizer (tokenizer.model or tokenizer.json) in the model directory; "
                        "analysis needs one to read text",
                        file=resolve(args.model))
    if args.adapter:
        apply_adapter(model, args.adapter)
    return model, tokenizer


def apply_adapter(model, directory: str) -> None:
    """Load LoRA adapters into `model` through `mixtral_mlx.lora`, when this version has it."""
    if importlib.util.find_spec("mixtral_mlx.lora") is None:
        raise UserError("adapters are not available in this version of mixtral-mlx", field="--adapter")
    from .. import lora

    lora.load_adapter(model, directory)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    if not prompt:
        raise UserError("is empty", field="--prompt")
    return tokenizer.encode(prompt, bos=True)


def check_positive(value: int, flag: str) -> None:
    if value <= 0:
        raise UserError(f"must be a positive integer, got {value}", field=flag)


def check_index(value: int, size: int, flag: str, what: str) -> int:
    if not -size <= value < size:
        raise UserError(f"{value} is out of range: the model has {size} {what}", field=flag)
    return value % size


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return path


def report_written(paths: list[Path]) -> None:
    print("wrote " + ", ".join(str(p) for p in paths))


def model_info(args, model) -> dict:
    a = model.args
    return {"model": str(args.model), "adapter": args.adapter, "num_layers": a.num_hidden_layers,
            "num_experts": a.num_local_experts, "top_k": a.num_experts_per_tok}


# ---------------------------------------------------------------------- experts
def parse_data_sets(specs: list[str]) -> dict[str, Path]:
    sets: dict[str, Path] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep:
            name, directory = Path(spec).name or spec, spec
        if not name or not directory:
            raise UserError(f"{spec!r} is not NAME=DIR", field="--data")
        if name in sets:
            raise UserError(f"data set name {name!r} is given twice", field="--data")
        if name == "all":
            raise UserError("'all' names the data sets pooled; give this one another name (NAME=DIR)",
                            field="--data")
        sets[name] = Path(directory)
    return sets


def run_experts(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from .. import analysis_plots as plots
    from ..analysis import (Routing, collect_routing, expert_statistics, token_kinds, token_windows,
                            total_variation, uniform_rates)
    from ..data import find_split, tokenize_split

    for flag in ("max_tokens", "seq_len", "batch_size"):
        check_positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    sets = parse_data_sets(args.data)
    for directory in sets.values():
        find_split(directory, args.split)  # every data set is there before any work starts
    model, tokenizer = load_model(args)
    kinds = token_kinds(tokenizer, model.args.vocab_size)

    routing: dict[str, Routing] = {}
    for name, directory in sets.items():
        stream = tokenize_split(directory, args.split, tokenizer, log=lambda line: print(f"{name}: {line}")).tokens
        windows = token_windows(stream, args.max_tokens, args.seq_len)
        with tqdm(total=sum(map(len, windows)), desc=f"{name}: routing", unit="tok", leave=False) as bar:
            routing[name] = collect_routing(model, windows, args.batch_size, bar)
    results = {name: expert_statistics(r, tokenizer, kinds, args.seq_len, args.seed) for name, r in routing.items()}
    if len(routing) > 1:
        results["all"] = expert_statistics(Routing.concatenate(list(routing.values())), None, kinds, args.seq_len,
                                           args.seed)
    for name, directory in sets.items():
        results[name]["dir"] = str(directory)

    a = model.args
    names = list(sets)
    comparisons = {f"{x} vs {y}": [total_variation(lx["topk_share"], ly["topk_share"]) for lx, ly in
                                   zip(results[x]["layers"], results[y]["layers"])]
                   for i, x in enumerate(names) for y in names[i + 1:]}
    report = {**model_info(args, model), "split": args.split, "seq_len": args.seq_len,
              "uniform": uniform_rates(a.num_local_experts, a.num_experts_per_tok),
              "data_sets": results, "total_variation": comparisons}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shares = {name: np.array([layer["topk_share"] for layer in results[name]["layers"]]) for name in names}
    pooled = results["all" if len(names) > 1 else names[0]]
    written = [write_json(out / "experts.json", report), plots.expert_shares(shares, out / "experts_share.png")]
    if len(names) > 1:
        written.append(plots.expert_differences(shares, out / "experts_diff.png"))
    written.append(plots.first_last_layers(shares, out / "experts_first_last.png"))
    written.append(plots.expert_breakdowns({"token kind": pooled["by_kind"], "position": pooled["by_position"]},
                                           out / "experts_by_token.png"))
    print_expert_summary(report, names)
    report_written(written)
    return 0


def print_expert_summary(report: dict, names: list[str]) -> None:
    uniform = report["uniform"]
    E = report["num_experts"]
    print(f"{report['num_layers']} layers, {E} experts, top-{report['top_k']}. Uniform routing would give: share "
          f"{uniform['share']:.3f}, same first expert {uniform['same_top1']:.3f}, "
          f"overlapping top-{report['top_k']} {uniform['overlap_topk']:.3f}, router entropy at most {math.log(E):.3f}")
    for name in names:
        data = report["data_sets"][name]
        print(f"\n{name}: {data['tokens']:,} tokens ({report['split']})")
        print(f"{'layer':>5} {'max/mean':>9} {'cv':>6} {'entropy':>8} {'dead':>6}  "
              f"{'same 1st (chance)':>18}  {'top-k overlap (chance)':>22}")
        for layer in data["layers"]:
            c = layer["consecutive"]
            dead = ",".join(map(str, layer["dead_experts"])) or "-"
            print(f"{layer['layer']:>5} {layer['imbalance']:>9.2f} {layer['cv']:>6.2f} {layer['router_entropy']:>8.3f} "
                  f"{dead:>6}  {_rate(c['same_top1'], c['same_top1_chance']):>18}  "
                  f"{_rate(c['overlap_topk'], c['overlap_topk_chance']):>22}")
    if report["total_variation"]:
        print("\nusage difference between data sets (total variation, 0 = same, 1 = disjoint), per layer:")
        for pair, values in report["total_variation"].items():
            print(f"  {pair}: " + " ".join(f"{v:.3f}" for v in values))


def _rate(value: float | None, chance: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ({chance:.3f})"


# ---------------------------------------------------------------------- routes
def run_routes(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np

    from .. import analysis_plots as plots
    from ..analysis import capture, display_text

    model, tokenizer = load_model(args)
    ids = encode_prompt(tokenizer, args.prompt)
    with capture(model, what=("router",)) as rec:
        model.forward(mx.array([ids]))
        experts = np.stack([np.array(rec.experts[i][0]) for i in rec.layers])  # (layers, T, k)
        gates = np.stack([np.array(rec.gates[i][0]) for i in rec.layers])
    pieces = tokenizer.pieces(ids)
    E = model.args.num_local_experts
    report = {**model_info(args, model), "prompt": args.prompt, "ids": ids, "tokens": pieces,
              "experts": experts.tolist(), "gates": np.round(gates, 6).tolist()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json(out / "routes.json", report), plots.route_grid(pieces, experts, gates, E, out / "routes.png")]
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    if colour:
        print_coloured_routes([display_text(p).replace("\n", "↵") for p in pieces], experts, E)
    else:
        print_route_table(pieces, experts)
    report_written(written)
    return 0


def print_coloured_routes(texts: list[str], experts, num_experts: int) -> None:
    from ..analysis_plots import expert_colours

    cmap = expert_colours(num_experts)

    def paint(text: str, e: int) -> str:
        r, g, b, _ = (round(255 * c) for c in cmap(e))
        fg = "30" if 0.299 * r + 0.587 * g + 0.114 * b > 128 else "97"
        return f"\x1b[{fg};48;2;{r};{g};{b}m{text}\x1b[0m"

    print("experts: " + " ".join(paint(f" {e} ", e) for e in range(num_experts)) + "  (text coloured by first choice)")
    for layer, row in enumerate(experts):
        print(f"layer {layer:>2} | " + "".join(paint(t, int(e[0])) for t, e in zip(texts, row)))


def print_route_table(pieces: list[str], experts) -> None:
    """One row per token (as the tokenizer spells it, '▁' for a space), its top-k experts per layer."""
    layers = experts.shape[0]
    width = max(len(p) for p in pieces) + 2
    print(f"{'token':<{width}}" + "".join(f"{'layer ' + str(i):>10}" for i in range(layers)))
    for t, piece in enumerate(pieces):
        print(f"{piece:<{width}}" + "".join(f"{','.join(map(str, experts[i, t])):>10}" for i in range(layers)))


# ---------------------------------------------------------------------- attention
def run_attention(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np

    from .. import analysis_plots as plots
    from ..analysis import attention_summary, capture

    model, tokenizer = load_model(args)
    a = model.args
    layers = sorted({check_index(i, a.num_hidden_layers, "--layer", "layers") for i in args.layer or
                     range(a.num_hidden_layers)})
    heads = list(range(a.num_attention_heads))
    if args.head is not None:
        heads = [check_index(args.head, a.num_attention_heads, "--head", "heads")]
    ids = encode_prompt(tokenizer, args.prompt)
    with capture(model, layers=layers, what=("attention",)) as rec:
        model.forward(mx.array([ids]))
        maps = {i: np.array(w[0])[heads] for i, w in rec.attention.items()}  # (heads, T, T)
    pieces = tokenizer.pieces(ids)
    summaries = {i: attention_summary(w) for i, w in maps.items()}
    report = {**model_info(args, model), "prompt": args.prompt, "ids": ids, "tokens": pieces, "heads": heads,
              "sliding_window": a.sliding_window, "maps": "attention.npz",
              "layers": {str(i): s for i, s in summaries.items()}}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json(out / "attention.json", report)]
    np.savez_compressed(out / "attention.npz", ids=np.array(ids), heads=np.array(heads),
                        **{f"layer_{i}": w for i, w in maps.items()})
    written.append(out / "attention.npz")
    suffix = f"_head{heads[0]}" if args.head is not None else ""
    for i, w in maps.items():
        title = f"Layer {i} attention" + (f", head {heads[0]}" if args.head is not None else "")
        written.append(plots.attention_heads(pieces, w, heads, title, out / f"attention_layer{i}{suffix}.png",
                                             a.sliding_window))
    print(f"{len(ids)} tokens; per head: entropy of a row (nats), mean distance looked back (tokens), "
          "weight on the first token")
    for i, s in summaries.items():
        cells = [f"h{h} {e:.2f}/{d:.1f}/{f:.2f}" for h, e, d, f in
                 zip(heads, s["entropy"], s["mean_distance"], s["first_token"])]
        print(f"layer {i:>2}: " + "  ".join(cells))
    report_written(written)
    return 0


# ---------------------------------------------------------------------- hidden states
def run_hidden(args: argparse.Namespace) -> int:
    import mlx.core as mx
    import numpy as np

    from .. import analysis_plots as plots
    from ..analysis import capture, hidden_summary

    out = Path(args.out)
    if out.suffix != ".npz":
        raise UserError("must name a .npz file", field="--out")
    model, tokenizer = load_model(args)
    ids = encode_prompt(tokenizer, args.prompt)
    with capture(model, what=("hidden",)) as rec:
        model.forward(mx.array([ids]))
        states = np.stack([np.array(h[0].astype(mx.float32)) for h in rec.hidden_states])  # (layers + 1, T, hidden)
    pieces = tokenizer.pieces(ids)
    summary = hidden_summary(states)
    report = {**model_info(args, model), "prompt": args.prompt, "ids": ids, "tokens": pieces,
              "hidden_states": out.name, "rows": ["embeddings"] + [f"layer {i}" for i in range(len(states) - 1)],
              **summary}

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, hidden_states=states, ids=np.array(ids), tokens=np.array(pieces))
    written = [out, write_json(out.with_suffix(".json"), report),
               plots.hidden_norms(pieces, np.array(summary["norms"]), summary["cosine_to_previous"],
                                  out.with_suffix(".png"))]
    print(f"{len(ids)} tokens, hidden size {states.shape[-1]}; hidden_states in the .npz: "
          f"(embeddings + {len(states) - 1} layers, tokens, hidden)")
    print(f"{'after':>10} {'mean norm':>10} {'cos to prev':>12}")
    for row, (name, norm) in enumerate(zip(report["rows"], summary["mean_norm"])):
        cosine = f"{summary['cosine_to_previous'][row - 1]:.3f}" if row else "-"
        print(f"{name:>10} {norm:>10.3f} {cosine:>12}")
    report_written(written)
    return 0
