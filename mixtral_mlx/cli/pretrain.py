"""`mixtral-mlx pretrain`: train a sparse MoE from scratch (defaults: preset small on pretrain_data/)."""

from __future__ import annotations

import argparse

# flag -> (type, help); every one is also a key of a --config YAML file
FLAGS = {
    "data": (str, "directory of train/val/test jsonl splits (default pretrain_data)"),
    "out": (str, "run directory (default runs/<timestamp>)"),
    "preset": (str, "model preset: tiny, small, minimixtral-175m (default small)"),
    "iters": (int, "optimizer steps"),
    "max_time": (float, "stop after this many minutes, counted from this start (a --resume gets them afresh); "
                          "the schedule still spans --iters"),
    "batch_size": (int, "sequences per micro-batch"),
    "seq_len": (int, "tokens per sequence"),
    "packing": (str, "document (default): each document starts a sequence of its own, padded; "
                     "stream: sequences cut anywhere in the concatenated documents"),
    "lr": (float, "peak learning rate"),
    "min_lr": (float, "learning rate at the end of the cosine decay"),
    "warmup": (int, "linear warmup steps"),
    "weight_decay": (float, "AdamW weight decay"),
    "grad_clip": (float, "clip gradients to this global norm (0: off)"),
    "grad_accum": (int, "micro-batches per optimizer step"),
    "dtype": (str, "float32, bfloat16 or float16 compute (master weights stay float32)"),
    "grad_checkpoint": (bool, "recompute activations in the backward pass: less memory, slower steps"),
    "cpu_streams": (int, "shards of each micro-batch computed at once on a CPU, one stream each "
                         "(default 2 with 2+ cores, 1 on a GPU): faster steps, a set of gradients more"),
    "eval_every": (int, "evaluate every N steps"),
    "eval_batches": (int, "validation batches per periodic evaluation (the final one covers the whole split)"),
    "save_every": (int, "checkpoint every N steps"),
    "keep": (int, "step checkpoints to keep"),
    "seed": (int, "seed for initialisation and data order"),
    "init": (str, "start from this model's weights, config and tokenizer (a directory or Hub repo): continued "
                  "pretraining; --preset and model settings do not apply"),
    "init_qk_std": (float, "std of the initial query and key projections (default: the model's initializer_range)"),
    "fixed_head_std": (float, "draw the output head with this std and keep it fixed, untrained (default: trained)"),
    "aux_loss_coef": (float, "load-balancing loss coefficient (default: the model config's)"),
    "z_loss_coef": (float, "router z-loss coefficient"),
    "tokenizer": (str, "directory with a tokenizer to use instead of training one"),
    "vocab_size": (int, "vocabulary size of the tokenizer trained on the data"),
    "wandb": (str, "log to this Weights & Biases project (needs wandb installed)"),
    "log_every": (int, "record expert load every N steps"),
}


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="train a model from scratch on jsonl splits",
                       description="Train a sparse MoE from scratch. A --config YAML takes the same keys as the "
                                   "flags (with underscores); flags override it; the resolved config is saved as "
                                   "OUT/config.yaml.")
    p.add_argument("--config", help="YAML file of settings")
    add_flags(p, FLAGS)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue a run from its latest checkpoint (DIR, or --out)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out directory that holds a run")
    p.add_argument("--reshard", action="store_true",
                   help="resume with a different number of processes, continuing from the saved data position")
    p.set_defaults(func=run)


def add_flags(parser: argparse.ArgumentParser, flags: dict) -> None:
    """One --flag per setting; not given, it is None, so the YAML's value or the default stands."""
    for name, (kind, help_text) in flags.items():
        if kind is bool:  # a switch: given means true
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_const", const=True,
                                default=None, help=help_text)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, help=help_text)


def run(args: argparse.Namespace) -> int:
    from ..pretrain import pretrain, read_yaml, resolve_config

    flags = {name: getattr(args, name) for name in FLAGS}
    cfg = resolve_config(flags, args.config)
    explicit = {**(read_yaml(args.config) if args.config else {}), **{k: v for k, v in flags.items() if v is not None}}
    pretrain(cfg, resume=args.resume, overwrite=args.overwrite, reshard=args.reshard, explicit=explicit)
    return 0
