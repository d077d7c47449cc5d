"""Data-parallel training over 2 local processes equals one process with the doubled batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import REPO

WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")


def run(cmd, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.mark.skipif(LAUNCH is None, reason="mlx.launch not found")
def test_two_processes_equal_one_with_doubled_batch(tmp_path):
    r = run([sys.executable, str(WORKER), str(tmp_path / "one.safetensors"), "8", "4"])
    assert r.returncode == 0, r.stderr
    r = run([LAUNCH, "-n", "2", "--backend", "ring", sys.executable, str(WORKER), str(tmp_path / "two.safetensors"),
             "8", "4"])
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = mx.load(str(tmp_path / "one.safetensors")), mx.load(str(tmp_path / "two.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        # float32: the all-reduce sums two halves instead of one whole, a rounding difference
        np.testing.assert_allclose(np.array(one[name]), np.array(two[name]), atol=1e-5, err_msg=name)
