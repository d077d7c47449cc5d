"""`mixtral-mlx finetune`: LoRA (default), DoRA, QLoRA, full or expert-specialised fine-tuning."""

from __future__ import annotations

import argparse

from .pretrain import FLAGS as TRAIN_FLAGS, add_flags

# flag -> (type, help); every one is also a key of a --config YAML file
FLAGS = {
    "rank": (int, "LoRA rank (default 8)"),
    "alpha": (float, "LoRA alpha: the update is scaled by alpha / rank (default 16)"),
    "dropout": (float, "dropout on the adapters' input (default 0)"),
    "targets": (str, "comma-separated layers to adapt: q_proj, k_proj, v_proj, o_proj, gate (the router), "
                     "w1, w2, w3 (the experts); default q_proj,v_proj,gate"),
    "num_layers": (str, "adapt the last N decoder layers, or 'all' (default)"),
    "quantize": (int, "QLoRA: quantize the frozen base to 4 or 8 bits"),
    "group_size": (int, "quantization group size (default 64)"),
    "esft_score": (str, "ESFT: score experts by 'token' share (default) or mean 'gate' weight"),
    "esft_threshold": (float, "ESFT: per layer, the fewest experts whose scores add up to this "
                              "(default 0.2 for token, 0.1 for gate)"),
    "esft_examples": (int, "ESFT: training examples routed to score the experts (default 1024)"),
    **{name: TRAIN_FLAGS[name] for name in (
        "out", "iters", "max_time", "batch_size", "lr", "min_lr", "warmup", "weight_decay", "grad_clip",
        "grad_accum", "dtype", "grad_checkpoint", "cpu_streams", "eval_every", "eval_batches", "save_every", "keep",
        "seed", "aux_loss_coef", "z_loss_coef", "log_every", "wandb")},
    "seq_len": (int, "longest example in tokens; longer ones are cut (default 512)"),
    "tokenizer": (str, "directory with the tokenizer to use (default: the model's)"),
}


def register(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model: LoRA, DoRA, QLoRA, full or expert-specialised",
                       description="Fine-tune a pretrained Mixtral on prompt/completion or chat data. A --config "
                                   "YAML takes the same keys as the flags (with underscores; --model is "
                                   "base_model, the method is method: lora|dora|full|esft); flags override it.")
    p.add_argument("--model", dest="base_model", help="model directory or Hub repo to fine-tune")
    p.add_argument("--data", help="directory of train/val/test jsonl splits (default finetune_data)")
    method = p.add_mutually_exclusive_group()
    for name, what in (("lora", "low-rank adapters (the default)"), ("dora", "weight-decomposed low-rank adapters"),
                       ("full", "train every weight"), ("esft", "train only the experts the data routes to")):
        method.add_argument(f"--{name}", dest="method", action="store_const", const=name, help=what)
    p.add_argument("--config", help="YAML file of settings")
    add_flags(p, FLAGS)
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="learn only the completion tokens (default) or every token")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="DIR",
                   help="continue a run from its latest checkpoint (DIR, or --out)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out directory that holds a run")
    p.add_argument("--reshard", action="store_true",
                   help="resume with a different number of processes, continuing from the saved data position")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..finetune import finetune, resolve_config

    flags = {name: getattr(args, name) for name in (*FLAGS, "base_model", "data", "method", "mask_prompt")}
    cfg = resolve_config(flags, args.config, resume=args.resume)
    finetune(cfg, resume=args.resume, overwrite=args.overwrite, reshard=args.reshard)
    return 0
