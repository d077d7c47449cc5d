"""MLX's fused CPU kernels built with this machine's vector instructions: same bits, found on PATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mixtral_mlx import cpu_jit

needs_wrapper = pytest.mark.skipif(not cpu_jit.status.startswith("g++ "),
                                   reason=f"no compiler wrapper here: {cpu_jit.status}")

# Each function is fused into one kernel by mx.compile; run eagerly, MLX uses the kernels
# it ships. x * y + z is where g++ would contract to one FMA (another rounding) if let.
COMPARE = textwrap.dedent("""
    import mixtral_mlx, mlx.core as mx, numpy as np
    mx.random.seed(0)
    special = mx.array([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 100.0, -100.0, 88.5, -88.5])
    x = mx.concatenate([mx.random.normal((4099,)) * 10, special])
    y = mx.concatenate([mx.random.normal((4099,)), mx.ones((9,))])
    z = mx.concatenate([mx.random.uniform(shape=(4099,)) + 0.1, mx.ones((9,))])
    functions = {
        "exp": lambda x, y, z: mx.exp(x - y),
        "silu": lambda x, y, z: mx.sigmoid(x) * x * y,
        "multiply-add": lambda x, y, z: x * y + z,
        "swiglu gradient": lambda x, y, z: y * z * mx.sigmoid(x) * (1 + x * (1 - mx.sigmoid(x))),
        "log and divide": lambda x, y, z: mx.log(z) * y / z,
        "rsqrt": lambda x, y, z: mx.rsqrt(z) * x + y,
        "logaddexp": lambda x, y, z: mx.logaddexp(x, y) * z,
    }
    for name, f in functions.items():
        eager, fused = np.array(f(x, y, z)), np.array(mx.compile(f)(x, y, z))
        print(name, "same" if np.array_equal(eager, fused, equal_nan=True) else "DIFFERENT")
""")


@needs_wrapper
def test_fused_kernels_built_with_the_flags_give_the_same_bits_as_mlx_default_kernels(tmp_path):
    # A fresh TMPDIR gives MLX an empty kernel cache, so every kernel is built here, with the flags.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", COMPARE], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 7 and all(line.endswith(" same") for line in lines), r.stdout
    assert list(tmp_path.glob("mlx/*/cpu/*.so")), "MLX built no kernel: nothing was compared"


@needs_wrapper
def test_the_compiler_mlx_finds_is_the_wrapper_and_it_calls_the_real_one():
    found = Path(shutil.which(cpu_jit.COMPILER))
    script = found.read_text()
    assert cpu_jit.FLAGS in script and os.access(found, os.X_OK)
    real = cpu_jit._real_compiler()
    assert real is not None and Path(real) != found and f"exec {real} " in script
    assert subprocess.run([str(found), "--version"], capture_output=True).returncode == 0


@needs_wrapper
def test_installing_again_keeps_one_wrapper_first_on_path(monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])  # restored afterwards
    first = os.environ["PATH"].split(os.pathsep)[0]
    cpu_jit.install()  # as a child process does, with the parent's PATH
    entries = os.environ["PATH"].split(os.pathsep)
    assert entries[0] == first and entries.count(first) == 1


def test_opting_out_leaves_mlx_defaults_even_under_a_parent_that_installed_it(monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setattr(cpu_jit, "status", cpu_jit.status)
    monkeypatch.setenv(cpu_jit.ENV_VAR, "0")
    assert cpu_jit.install() == f"MLX's default flags ({cpu_jit.ENV_VAR}=0)"
    found = shutil.which(cpu_jit.COMPILER)
    assert found is None or cpu_jit._MARK not in Path(found).read_text(errors="replace")


@needs_wrapper
def test_custom_flags_make_a_wrapper_of_their_own(monkeypatch):
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setattr(cpu_jit, "status", cpu_jit.status)
    monkeypatch.setenv(cpu_jit.ENV_VAR, "-O2")
    assert cpu_jit.install() == "g++ -O2"
    script = Path(shutil.which(cpu_jit.COMPILER)).read_text()
    assert script.rstrip().endswith('-O2 "$@"') and cpu_jit.FLAGS not in script
