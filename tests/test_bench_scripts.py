"""scripts/bench.py and scripts/levers.py run end to end (tiny preset, one round) and report what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def run_script(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bench_reports_our_side(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--preset", "tiny", "--steps", "1", "--rounds", "1", "--warmup", "1",
                        "--decode-tokens", "4", "--skip-peer", "mlx-lm", "--skip-peer", "transformers",
                        "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"mixtral-mlx", "mixtral-mlx checkpointed"}
    ours = report["results"]["mixtral-mlx"]
    assert ours["train_tokens_per_s"] > 0 and ours["decode_tokens_per_s"] > 0 and ours["peak_memory"] > 0
    assert report["config"]["num_local_experts"] == 4 and report["blas"] and report["versions"]["mlx"]
    assert "mixtral-mlx checkpointed" in result.stdout and "train tok/s" in result.stdout
    from mixtral_mlx import cpu_jit

    assert report["kernel_flags"]["mixtral-mlx"] == cpu_jit.status


def test_mlx_lm_runs_stock_kernels_from_a_cache_of_its_own(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import bench

    stock, same_flags = {"peer_cpu_jit": False}, {"peer_cpu_jit": True}
    assert bench.worker_env(bench.OURS, stock, tmp_path) == {}
    peer = bench.worker_env(bench.MLX_LM, stock, tmp_path)
    assert peer["MIXTRAL_MLX_CPU_JIT"] == "0" and os.path.isdir(peer["TMPDIR"])
    from mixtral_mlx import cpu_streams

    if cpu_streams.widened:  # and MLX's own evaluation order: the width ours was given is unset for it
        assert peer[cpu_streams.WIDTH_VAR] is None and peer[cpu_streams.ENV_VAR] == "mlx"
    peer_with_flags = bench.worker_env(bench.MLX_LM, same_flags, tmp_path)
    assert "MIXTRAL_MLX_CPU_JIT" not in peer_with_flags and peer_with_flags["TMPDIR"] != peer["TMPDIR"]
