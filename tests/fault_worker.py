"""Runs `mixtral-mlx ARGS` with one fault injected, as named by $FAULT=kind:step.

kinds: step (SIGKILL inside training step `step`), weights / optimizer (SIGKILL while the
checkpoint of `step` writes that file), rename (SIGKILL just before that checkpoint's
directory is renamed into place), disk-full (the weights writer of that checkpoint raises
ENOSPC, as a full disk does), oom (training step `step` fails to allocate memory).
"""

import errno
import os
import signal
import sys

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mixtral_mlx import checkpoint, train
from mixtral_mlx.cli import main

kind, at = os.environ["FAULT"].split(":")
tag = f"step-{int(at):06d}"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


real_save = mx.save_safetensors


def save_safetensors(path, arrays, *args, **kwargs):
    inside = f".{tag}.tmp-" in str(path)
    if inside and kind == "disk-full" and path.endswith("model.safetensors"):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    if inside and path.endswith(f"{kind.replace('weights', 'model')}.safetensors"):
        with open(path, "wb") as f:  # half a file on disk, then the power goes
            f.write(b"\x00" * 1024)
        die()
    return real_save(path, arrays, *args, **kwargs)


real_replace = os.replace


def replace(src, dst, *args, **kwargs):
    if kind == "rename" and f".{tag}.tmp-" in str(src):
        die()
    return real_replace(src, dst, *args, **kwargs)


real_step = train.Trainer.train_step


def train_step(self, *args, **kwargs):
    if kind == "step" and self.step + 1 == int(at):
        die()
    if kind == "oom" and self.step + 1 == int(at):  # what MLX raises when an allocation fails
        raise RuntimeError("[malloc] Unable to allocate 68719476736 bytes")
    return real_step(self, *args, **kwargs)


mx.save_safetensors = save_safetensors
checkpoint.os.replace = replace
train.Trainer.train_step = train_step
sys.exit(main(sys.argv[1:]))
