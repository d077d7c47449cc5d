"""Shards of a training step side by side on a CPU's cores, one MLX stream each.

On a CPU, MLX runs every operation on its stream's one thread. Matmuls spread over the
cores through the BLAS, but nothing else does: softmax, the MoE's sorting, gathers and
scatters and the norms each use one core while the others wait. So the trainer splits
each micro-batch's rows into shards and computes each shard's loss and gradients on a
stream of its own, all at once, then sums the gradients, as data-parallel processes
would. Two settings let the shards overlap:

* While the shards run, OpenBLAS gives each matmul cores / shards threads (one, on two
  cores: `blas_threads`), so the shards' matmuls do not fight over the same cores.
* MLX orders what one evaluation runs breadth-first, at most `MLX_BFS_MAX_WIDTH` arrays
  wide (20 by default). At 20 one shard's operations are queued far ahead of the
  other's, and the other stream sits idle; at 200 they interleave. MLX reads the
  variable once, at its first evaluation, so `configure()` sets it (unless it is set)
  as the package loads, on Linux with MLX's CPU build only (`MIXTRAL_MLX_BFS_WIDTH=mlx`
  leaves MLX's own).

Measured with the `small` preset, batch 8 x 256, float32, on a 2-core AMD EPYC
(`docs/performance.md`): a training step took 1.00 s on two streams against 1.44 s on
one (the two alternating in one process), the cores busy 1.85 of 2 on average. The
peak stayed at about 505 MiB because the trainer evaluates the gradients layer by layer
(`train.backward_stages`); all at once, two shards peaked at 535 MiB.
"""

from __future__ import annotations

import contextlib
import os
import sys
from importlib import metadata
from typing import Iterator

import numpy as np

WIDTH_VAR, WIDTH = "MLX_BFS_MAX_WIDTH", "200"
ENV_VAR = "MIXTRAL_MLX_BFS_WIDTH"  # auto (the default), mlx (MLX's own width), or a width

# What `mixtral-mlx info` reports, and whether this package set MLX_BFS_MAX_WIDTH: set by configure().
status = "not attempted"
widened = False


def configure() -> str:
    """Widen MLX's evaluation order for its CPU build on Linux, before MLX evaluates anything.

    A width the user set in MLX_BFS_MAX_WIDTH stands; MIXTRAL_MLX_BFS_WIDTH=mlx leaves
    MLX's own, and a number sets that width on any build. Returns a one-line description.
    """
    global status, widened
    setting = os.environ.get(ENV_VAR, "auto").strip().lower()
    if WIDTH_VAR in os.environ:
        status = f"{WIDTH_VAR}={os.environ[WIDTH_VAR]} (set before)"
        return status
    if setting.isdigit():
        width = setting
    elif setting in ("auto", "") and sys.platform == "linux" and _installed("mlx-cpu") and not _installed("mlx-cuda"):
        width = WIDTH
    else:
        status = "MLX's own (only MLX's CPU build on Linux is widened)" if setting in ("auto", "") else \
            f"MLX's own ({ENV_VAR}={setting})"
        return status
    os.environ[WIDTH_VAR], widened = width, True
    status = f"{WIDTH_VAR}={width}"
    return status


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def default_shards(world: int) -> int:
    """2 on a CPU with 2 or more cores in a run of one process, else 1.

    A data-parallel run on one machine already has a process per core, and on a GPU
    MLX's kernels use the whole device.
    """
    import mlx.core as mx

    return 2 if mx.default_device() == mx.cpu and (os.cpu_count() or 1) >= 2 and world == 1 else 1


def split_rows(batch: dict[str, np.ndarray], shards: int) -> list[dict[str, np.ndarray]]:
    """`batch` cut into up to `shards` runs of rows, each with a token to learn from.

    The router losses are means over a shard's unmasked positions, so a shard without any
    would divide by zero: such a batch stays whole.
    """
    rows = len(batch["mask"])
    cuts = np.array_split(np.arange(rows), min(shards, rows))
    parts = [{key: value[idx[0]:idx[-1] + 1] for key, value in batch.items()} for idx in cuts]
    if len(parts) == 1 or any(part["mask"].sum() == 0 for part in parts):
        return [batch]
    return parts


@contextlib.contextmanager
def blas_threads(shards: int) -> Iterator[None]:
    """Give each OpenBLAS matmul the cores of one shard while the block runs."""
    from . import blas

    before = blas.set_threads(max(1, (os.cpu_count() or 1) // shards)) if shards > 1 else None
    try:
        yield
    finally:
        if before is not None:
            blas.set_threads(before)
