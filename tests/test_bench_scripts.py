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


def test_levers_measure_every_variant(tmp_path):
    out = tmp_path / "levers.json"
    result = run_script("levers.py", "--preset", "tiny", "--repeats", "1", "--decode-tokens", "4", "--json", str(out),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results["MoE block, forward + backward"]) == {"dense", "gather", "grouped"}
    assert set(results["training step"]) == {"plain", "activation checkpointing"}
    assert all(r["wall_s"] > 0 for group in results.values() for r in group.values())
