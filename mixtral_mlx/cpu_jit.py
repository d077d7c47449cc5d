"""Build MLX's fused CPU kernels for this machine's vector unit (Linux x86-64).

Inside `mx.compile`, MLX's CPU back end fuses chains of elementwise operations into C++
kernels that it compiles at run time with `g++ -std=c++17 -O3 -Wall -fPIC -shared`,
whichever `g++` comes first on PATH, and caches under `$TMPDIR/mlx/<version>/cpu/`.
With no target flags g++ builds for baseline x86-64: no FMA instruction, so each of the
six `fma` steps of MLX's `exp` polynomial is a call into libm, and every loop stays
scalar. `-march=native -fno-trapping-math -finline-limit=2000` lets g++ inline that
polynomial and vectorise the loop (all three are needed). Measured on a 2-core AMD EPYC
(AVX2), 4M float32 elements: a compiled `exp(x - 1)` went from 15 to 0.9 ns an element,
`silu` from 20 to 1.1, and a small-preset training step from 2.4 to 1.9 s.

The results stay bit for bit what MLX computes without the flags: `-ffp-contract=off`
keeps g++ from fusing a multiply and an add into one rounding (in C++ it would by
default once FMA is available), there is no `-ffast-math`, and `-fno-trapping-math`
only lets g++ evaluate both sides of a select. `tests/test_cpu_jit.py` checks it.

`install()` writes a two-line `g++` that adds the flags and calls the real one, and puts
its directory first on PATH (MLX runs the compiler through the shell, so it finds it).
Kernels MLX built earlier without the flags stay in its cache and are reused as they
are: equal results, the old speed. Opt out with `MIXTRAL_MLX_CPU_JIT=0`, or give other
flags with `MIXTRAL_MLX_CPU_JIT="-march=native ..."`. Nothing happens off Linux x86-64
(macOS runs on Metal, and its CPU kernels are built for NEON) or without g++.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

ENV_VAR = "MIXTRAL_MLX_CPU_JIT"
FLAGS = "-march=native -ffp-contract=off -fno-trapping-math -finline-limit=2000"
COMPILER = "g++"  # the name MLX's CPU back end runs

# What `mixtral-mlx info` reports: set once, by install().
status = "not attempted"


def install() -> str:
    """Put a `g++` that adds the flags first on PATH; return a one-line description.

    Opting out also takes wrappers off PATH that a parent process put there.
    """
    global status
    setting = os.environ.get(ENV_VAR, "auto").strip()
    others = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not _holds_wrapper(d)]
    real = _real_compiler()
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        status = "MLX's default flags (only Linux x86-64 is tuned)"
    elif setting.lower() in ("0", "off", "false", "no"):
        os.environ["PATH"] = os.pathsep.join(others)
        status = f"MLX's default flags ({ENV_VAR}={setting})"
    elif real is None:
        status = "no g++ on PATH: MLX runs compiled graphs without fusing them"
    else:
        flags = FLAGS if setting.lower() in ("auto", "1", "on", "yes", "true", "") else setting
        os.environ["PATH"] = os.pathsep.join([str(_write_wrapper(real, flags)), *others])
        status = f"g++ {flags}"
    return status


def _real_compiler() -> str | None:
    """The g++ that PATH finds, skipping wrappers of ours (a child process inherits the PATH)."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which(COMPILER, path=directory)
        if candidate and not _holds_wrapper(directory):
            return candidate
    return None


_MARK = "# written by mixtral_mlx.cpu_jit"


def _holds_wrapper(directory: str) -> bool:
    try:
        return _MARK in (Path(directory) / COMPILER).read_text(errors="replace")[:200]
    except (OSError, ValueError):
        return False


def _write_wrapper(real: str, flags: str) -> Path:
    """A directory holding `g++`: `exec REAL FLAGS "$@"`, one per (compiler, flags), written atomically."""
    script = f'#!/bin/sh\n{_MARK}\nexec {shlex.quote(real)} {flags} "$@"\n'
    key = hashlib.sha256(script.encode()).hexdigest()[:12]
    directory = Path(tempfile.gettempdir()) / f"mixtral-mlx-{os.getuid()}" / f"cxx-{key}"
    target = directory / COMPILER
    if not (target.exists() and target.read_text() == script):
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{COMPILER}.{os.getpid()}"
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    return directory
