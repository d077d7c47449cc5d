"""Make the analysis gallery: every `mixtral-mlx analyze` command on one model, plus a markdown page.

    python scripts/make_gallery.py --model runs/pretrain/final [--out docs/gallery]

Expert usage is measured on three data sets (by default pretrain_data/, WikiText-2 raw and
Tiny Shakespeare: get the last two with `mixtral-mlx data download`, or point the flags at
any directories of jsonl splits); routes, attention and hidden states on one test text of
each. `gallery.md` in the output directory shows the pictures with the numbers that answer
the usual questions (do experts specialise by data set, by token kind, by position; does the
first layer differ from the last), ready to be read and commented.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import mixtral_mlx  # noqa: F401  (before mlx: preloads OpenBLAS)
from mixtral_mlx.data import read_split
from mixtral_mlx.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model directory to look inside")
    p.add_argument("--out", default=str(REPO / "docs" / "gallery"), help="output directory (default: docs/gallery)")
    p.add_argument("--data", nargs="+", metavar="NAME=DIR", help="data sets (default: pretrain_data, "
                   "wikitext-2-raw and tinyshakespeare from ../shared/data)")
    p.add_argument("--split", default="val")
    p.add_argument("--max-tokens", type=int, default=32768, help="tokens per data set for expert usage")
    p.add_argument("--prompt-words", type=int, default=32, help="words of each test text to draw routes and maps for")
    return p.parse_args()


def default_data() -> list[str]:
    shared = REPO.parent / "shared" / "data"
    return [f"pretrain={REPO / 'pretrain_data'}", f"wikitext={shared / 'wikitext-2-raw'}",
            f"shakespeare={shared / 'tinyshakespeare'}"]


def sample_text(directory: Path, words: int) -> str:
    """The opening of the first test record long enough to show something."""
    texts = [example.document() for example in read_split(directory, "test")]
    text = next((t for t in texts if len(t.split()) >= words), max(texts, key=len))
    return " ".join(text.split()[:words])


def run(*argv: str) -> None:
    print("\n$ mixtral-mlx " + shlex.join(argv), flush=True)
    if cli(list(argv)) != 0:
        sys.exit(f"mixtral-mlx {argv[0]} {argv[1]} failed")


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    data = args.data or default_data()
    sets = {spec.partition("=")[0]: Path(spec.partition("=")[2]) for spec in data}
    model = ["--model", args.model]

    run("analyze", "experts", *model, "--data", *data, "--split", args.split, "--max-tokens", str(args.max_tokens),
        "--out", str(out / "experts"))
    prompts = {name: sample_text(directory, args.prompt_words) for name, directory in sets.items()}
    for name, prompt in prompts.items():
        run("analyze", "routes", *model, "--prompt", prompt, "--out", str(out / "routes" / name), "--color", "never")
    first = next(iter(prompts))
    run("analyze", "attention", *model, "--prompt", prompts[first], "--out", str(out / "attention"))
    run("analyze", "hidden", *model, "--prompt", prompts[first], "--out", str(out / "hidden" / f"{first}.npz"))
    (out / "gallery.md").write_text(gallery_page(out, list(sets), prompts, first))
    print(f"\nwrote {out / 'gallery.md'}")


def gallery_page(out: Path, names: list[str], prompts: dict[str, str], first: str) -> str:
    report = json.loads((out / "experts" / "experts.json").read_text())
    layers, E, k = report["num_layers"], report["num_experts"], report["top_k"]
    last = layers - 1
    uniform = report["uniform"]
    sizes = ", ".join(f"{n} ({report['data_sets'][n]['tokens']:,} tokens)" for n in names)
    lines = [f"# Inside {report['model']}", "",
             f"{layers} layers, {E} experts, top-{k}; expert usage over {report['split']} splits: {sizes}.", "",
             "## Expert usage per data set", "", "![](experts/experts_share.png)", "",
             "![](experts/experts_diff.png)", "", "![](experts/experts_first_last.png)", "",
             "Total variation between data sets' expert usage (0 = same, 1 = disjoint):", "",
             "| data sets | first layer | last layer |", "|---|---|---|"]
    for pair, values in report["total_variation"].items():
        lines.append(f"| {pair} | {values[0]:.3f} | {values[last]:.3f} |")
    lines += ["", "Balance and reuse (first / last layer): max/mean share, router entropy "
              f"(at most {math.log(E):.2f}), consecutive tokens with the same first expert "
              f"(chance with this usage; uniform {uniform['same_top1']:.3f}):", "",
              "| data set | max/mean | entropy | same first expert |", "|---|---|---|---|"]
    for name in names:
        f, l = report["data_sets"][name]["layers"][0], report["data_sets"][name]["layers"][last]
        same = [f"{x['consecutive']['same_top1']:.3f} ({x['consecutive']['same_top1_chance']:.3f})" for x in (f, l)]
        lines.append(f"| {name} | {f['imbalance']:.2f} / {l['imbalance']:.2f} | "
                     f"{f['router_entropy']:.3f} / {l['router_entropy']:.3f} | {same[0]} / {same[1]} |")
    lines += ["", "## By token kind and position", "", "![](experts/experts_by_token.png)", "",
              "## Token routes", ""]
    for name, prompt in prompts.items():
        lines += [f"{name}: *{prompt}*", "", f"![](routes/{name}/routes.png)", ""]
    lines += ["## Attention", "", f"On the {first} text; one picture per layer in `attention/`.", "",
              "![](attention/attention_layer0.png)", "", f"![](attention/attention_layer{last}.png)", "",
              "## Hidden states", "", f"![](hidden/{first}.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
