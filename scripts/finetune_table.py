"""Fine-tune one pretrained model every way and tabulate test exact-match, size, time and memory.

    python scripts/finetune_table.py --model runs/pretrain/final [--data finetune_data]
                                     [--out runs/finetune-table] [--methods lora,dora,...] [-- FINETUNE FLAGS]

For each method it runs `mixtral-mlx finetune` (its own process, so peak memory is its
own), then `mixtral-mlx eval --task exact-match` on the test split, and writes
OUT/table.md (the README's table, then right answers by kind of question and method, and
how often each follows a fact swapped in the story, `eval --swap-answers 2`) and
OUT/table.json. Flags after `--` go to every fine-tune (e.g. `-- --iters 300`). A method
whose run directory already holds results is not run again, so an interrupted table
continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

# method -> (label, finetune flags)
METHODS = {
    "lora": ("LoRA (q, v, router)", ["--lora"]),
    "lora-all": ("LoRA (every linear layer, experts included)",
                 ["--lora", "--targets", "q_proj,k_proj,v_proj,o_proj,gate,w1,w2,w3"]),
    "dora": ("DoRA (q, v, router)", ["--dora"]),
    "qlora": ("QLoRA (4-bit base; q, v, router)", ["--lora", "--quantize", "4"]),
    "esft": ("ESFT (token share 0.2)", ["--esft"]),
    "full": ("full fine-tune", ["--full"]),
}


SWAPS = 2  # swapped copies of each question: does the answer follow the story or a habit?


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtral_mlx", *args], text=True, stdout=subprocess.PIPE)


def exact_match(model: str, data: str, adapter: str | None = None, answers: Path | None = None) -> dict:
    args = ["eval", "--model", model, "--data", data, "--split", "test", "--task", "exact-match", "--json",
            "--swap-answers", str(SWAPS), *(["--answers", str(answers)] if answers else [])]
    result = cli(*args, *(["--adapter", adapter] if adapter else []))
    if result.returncode != 0:
        sys.exit(f"eval failed for {adapter or model}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the pretrained model directory")
    p.add_argument("--data", default="finetune_data")
    p.add_argument("--out", default="runs/finetune-table")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    before = exact_match(args.model, args.data, answers=out / "answers-before.jsonl")
    rows = [{"method": "before fine-tuning", "exact_match": before["exact_match"], "swapped": before["swapped"],
             "trainable_parameters": 0, "train_seconds": 0.0, "peak_memory_gb": None, "by_kind": before["by_kind"]}]
    print(f"before fine-tuning: {100 * before['exact_match']:.1f}%", flush=True)
    for name in methods:
        label, flags = METHODS[name]
        run = out / name
        if not (run / "results.json").exists():
            start = time.perf_counter()
            done = cli("finetune", "--model", args.model, "--data", args.data, "--out", str(run),
                               "--overwrite", *flags, *passthrough)
            if done.returncode != 0:
                sys.exit(f"{name}: finetune failed (exit {done.returncode})")
            print(f"{name}: fine-tuned in {time.perf_counter() - start:.0f} s", flush=True)
        results = json.loads((run / "results.json").read_text())
        answers = run / "answers.jsonl"
        scored = (exact_match(str(run / "final"), args.data, answers=answers) if name == "full"
                  else exact_match(args.model, args.data, str(run), answers=answers))
        rows.append({"method": label, "exact_match": scored["exact_match"], "swapped": scored["swapped"],
                     "by_kind": scored["by_kind"],
                     **{k: results[k] for k in ("trainable_parameters", "train_seconds", "peak_memory_gb")},
                     "val_loss": results["val"]["loss"], "steps": results["steps"]})
        print(f"{name}: {100 * scored['exact_match']:.1f}%", flush=True)

    machine = f"{platform.system()} {platform.machine()}, MLX {mx.__version__} ({mx.default_device()})"
    lines = [f"Test exact match on {args.data} ({before['total']} questions), {time.strftime('%Y-%m-%d')}, {machine}:",
             "", "| method | test exact match | follows a swapped fact | trainable parameters | training time "
             "| peak memory |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        memory = f"{r['peak_memory_gb']:.2f} GB" if r["peak_memory_gb"] is not None else "-"
        lines.append(f"| {r['method']} | {100 * r['exact_match']:.1f}% | {100 * r['swapped']['exact_match']:.1f}% | "
                     f"{r['trainable_parameters']:,} | "
                     f"{r['train_seconds']:.0f} s | {memory} |")
    lines += ["", "Right answers by kind of question (its first two words):", "",
              "| question | " + " | ".join(name for name in ["before", *methods]) + " |",
              "|---|" + "---:|" * (len(methods) + 1)]
    for kind, (_, asked) in before["by_kind"].items():
        lines.append(f"| {kind} ({asked}) | " + " | ".join(str(r["by_kind"][kind][0]) for r in rows) + " |")
    swapped = before["swapped"]
    lines += ["", f"Answers that follow the fact swapped in the story ({SWAPS} swaps a question; a guess among "
              f"the kind's answers would follow {100 * swapped['chance']:.1f}% of all {swapped['total']}):", "",
              "| question (guess) | " + " | ".join(name for name in ["before", *methods]) + " |",
              "|---|" + "---:|" * (len(methods) + 1)]
    for kind, (_, asked, chance) in swapped["by_kind"].items():
        lines.append(f"| {kind} ({asked}; {100 * chance:.0f}%) | "
                     + " | ".join(str(r["swapped"]["by_kind"][kind][0]) for r in rows) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
