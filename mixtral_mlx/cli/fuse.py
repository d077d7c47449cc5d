"""`mixtral-mlx fuse`: fold an adapter into its base and write a plain Hugging Face model."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("fuse", help="fold a LoRA/DoRA/ESFT adapter into its base model",
                       description="Write MODEL + ADAPTER as one Hugging Face-format model directory.")
    p.add_argument("--model", required=True, help="the base model directory or Hub repo")
    p.add_argument("--adapter", required=True, help="adapter directory (or a fine-tuning run: its final/)")
    p.add_argument("--out", required=True, help="directory to write the fused model into")
    p.add_argument("--dequantize", action="store_true",
                   help="write float weights even when the base is (or was trained) quantized")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..checkpoint import load, save
    from ..errors import UserError
    from ..lora import adapter_dir, fuse_model, load_adapter

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UserError("already exists; choose another --out or pass --overwrite", file=out, field="--out")
    adapter = adapter_dir(args.adapter)
    model, tokenizer = load(args.model)
    load_adapter(model, adapter)
    fuse_model(model, dequantize=args.dequantize)
    save(model, tokenizer, out)
    quantized = model.args.quantization
    print(f"fused {adapter} into {args.model}: wrote {out}"
          + (f" ({quantized['bits']}-bit; --dequantize for float weights)" if quantized else ""))
    return 0
