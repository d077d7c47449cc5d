"""The `mixtral-mlx` command: one sub-command per module in this package.

Each sub-command module has `register(subparsers)`, which adds its parser and sets
`func`. Errors a user can fix (`UserError`, bad flags) print one line and exit 2;
`--debug` (or MIXTRAL_MLX_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import blas as _blas  # noqa: F401  (imports the package, which preloads OpenBLAS before mlx)
from ..errors import UserError
from . import analyze, data, evaluate, finetune, fuse, generate, info, pretrain, tokenizer

COMMANDS = [info, data, tokenizer, pretrain, finetune, fuse, evaluate, generate, analyze]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mixtral-mlx", description="Train, fine-tune, run and inspect Mixtral MoE models with MLX.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MIXTRAL_MLX_DEBUG", "") not in ("", "0")
    try:
        return args.func(args) or 0
    except UserError as e:
        if debug:
            raise
        print(f"mixtral-mlx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
