"""Use the system's OpenBLAS for MLX's CPU matmuls on Linux.

MLX's Linux CPU wheel links a bundled *reference* BLAS, which is ~37x slower than
OpenBLAS for float32 matmuls on a 2-core x86 machine (4 vs ~160 GFLOP/s). Loading
OpenBLAS with RTLD_GLOBAL *before* MLX is imported makes the dynamic linker resolve
MLX's `cblas_*` calls to it, the same effect as `LD_PRELOAD` without restarting.

`set_threads` changes how many threads OpenBLAS gives one matmul (the trainer's CPU
streams give each shard its share of the cores, cpu_streams.py).

Switch it off with `MIXTRAL_MLX_OPENBLAS=0`, or point it at another library with
`MIXTRAL_MLX_OPENBLAS=/path/to/libopenblas.so`. Nothing happens on macOS (MLX uses
Accelerate there) or when no OpenBLAS is installed (Debian: `libopenblas0-pthread`).
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "MIXTRAL_MLX_OPENBLAS"
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What `mixtral-mlx info` reports: set once, by preload().
status = "not attempted"
_library: ctypes.CDLL | None = None  # the OpenBLAS MLX calls, once preload() found it


def _already_preloaded() -> str | None:
    for lib in os.environ.get("LD_PRELOAD", "").split(":"):
        if "openblas" in lib:
            return lib
    return None


def preload() -> str:
    """Load OpenBLAS globally if possible; return a one-line description of the BLAS in use."""
    global status
    setting = os.environ.get(ENV_VAR, "auto").strip()
    if sys.platform != "linux":
        status = "platform default (Accelerate on macOS)"
    elif setting.lower() in ("0", "off", "false", "no"):
        status = f"MLX's bundled reference BLAS ({ENV_VAR}={setting})"
    elif (lib := _already_preloaded()) is not None:
        _remember(lib)
        status = f"OpenBLAS via LD_PRELOAD ({lib}{_kernel()})"
    elif "mlx.core" in sys.modules:
        status = "MLX's bundled reference BLAS (mlx was imported before mixtral_mlx)"
    else:
        paths = CANDIDATES if setting.lower() in ("auto", "1", "on", "") else (setting,)
        status = "MLX's bundled reference BLAS (no OpenBLAS found; apt install libopenblas0-pthread)"
        for path in paths:
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError as e:  # a broken library must not stop the program
                    status = f"MLX's bundled reference BLAS (loading {path} failed: {e})"
                    continue
                _remember(path)
                status = f"OpenBLAS ({path}{_kernel()})"
                break
    return status


def _kernel() -> str:
    """", core NAME" as OpenBLAS names the kernels it chose, and OPENBLAS_CORETYPE when it forces them.

    A machine may force older kernels (OPENBLAS_CORETYPE=Haswell on a newer CPU): matmuls
    then run at a fraction of the CPU's rate, which every figure measured there inherits.
    """
    name = core()
    if name is None:
        return ""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return f", core {name}" + (f", forced by OPENBLAS_CORETYPE={forced}" if forced else "")


def _remember(path: str) -> None:
    global _library
    try:
        _library = ctypes.CDLL(path)
        _library.openblas_get_num_threads.restype = ctypes.c_int
    except (OSError, AttributeError):
        _library = None


def core() -> str | None:
    """The name OpenBLAS gives the kernels it runs ("Cooperlake", "Haswell", ...), None without OpenBLAS."""
    if _library is None:
        return None
    try:
        get = _library.openblas_get_corename
    except AttributeError:
        return None
    get.restype = ctypes.c_char_p
    return get().decode()


# OpenBLAS cores whose sgemm has small-matrix kernels (0.3.17 on): they multiply a few
# rows without packing the other matrix first, which larger blocks would otherwise pay for.
SMALL_MATRIX_CORES = ("skylakex", "cooperlake", "sapphirerapids")
# Which products those kernels take, as measured through MLX (row-major, float32, one
# thread; OpenBLAS 0.3.21 `Cooperlake`, 2-core AMD EPYC): (M, K) @ (K, N) while
# M * N * K <= 100^3, and with the second operand transposed (a weight stored (out, in))
# only while M * N <= 1024 too. Past either bound sgemm packs the other matrix on every
# call: 4 rows through a transposed (512, 256) weight ran at 23 GFLOP/s, through the
# same weight laid out (256, 512) at 76.
SMALL_MATRIX_MNK = 100**3
SMALL_MATRIX_MN_TRANSPOSED = 1024


def has_small_matrix_kernels() -> bool:
    return (core() or "").lower() in SMALL_MATRIX_CORES


def small_matrix_kernel_takes(m: int, n: int, k: int, transposed: bool = False) -> bool:
    """Whether OpenBLAS multiplies (m, k) @ (k, n) with its small-matrix kernels (see above)."""
    if not has_small_matrix_kernels() or m * n * k > SMALL_MATRIX_MNK:
        return False
    return not transposed or m * n <= SMALL_MATRIX_MN_TRANSPOSED


def threads() -> int | None:
    """How many threads OpenBLAS gives one matmul, or None when MLX does not use OpenBLAS."""
    return None if _library is None else _library.openblas_get_num_threads()


def set_threads(n: int) -> int | None:
    """Give each OpenBLAS matmul `n` threads; return the number it had (None: no OpenBLAS, nothing done)."""
    before = threads()
    if before is not None and before != n:
        _library.openblas_set_num_threads(ctypes.c_int(n))
    return before
