"""`mixtral-mlx pretrain` end to end on the embedded data, through the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mixtral_mlx import checkpoint
from mixtral_mlx.errors import UserError
from conftest import REPO, assert_user_error, run_cli

DATA = REPO / "pretrain_data"
TINY = ["--preset", "tiny", "--data", str(DATA), "--vocab-size", "512", "--batch-size", "4", "--seq-len", "64",
        "--eval-batches", "2"]


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Train the tokenizer once for the module: every run below reuses it."""
    out = tmp_path_factory.mktemp("tok")
    r = run_cli("tokenizer", "train", "--data", str(DATA), "--vocab-size", "512", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    r = run_cli("pretrain", *TINY, "--tokenizer", str(tokenizer_dir), "--iters", "12", "--save-every", "4",
                "--eval-every", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_loss_falls_and_run_is_complete(straight_run):
    losses = train_losses(straight_run)
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.5
    for name in ("config.yaml", "metrics.jsonl", "results.json", "final/config.json", "final/model.safetensors",
                 "final/tokenizer.model", "plots/loss.png", "plots/expert_load.png", "latest"):
        assert (straight_run / name).exists(), name
    results = json.loads((straight_run / "results.json").read_text())
    assert {"val", "test"} <= results.keys() and results["val"]["bpb"] > 0


def test_checkpoint_loads_in_transformers_with_same_logits(straight_run):
    import torch
    from transformers import MixtralForCausalLM

    import mixtral_mlx

    ours, _ = mixtral_mlx.load(straight_run / "final")
    theirs = MixtralForCausalLM.from_pretrained(straight_run / "final").eval()
    ids = np.arange(1, 40).reshape(1, -1)
    with torch.no_grad():
        ref = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.array(ours(mx.array(ids))), ref, atol=1e-4, rtol=0)


def test_sigterm_saves_and_resume_matches(tmp_path, straight_run, tokenizer_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mixtral_mlx", "pretrain", *TINY, "--tokenizer", str(tokenizer_dir), "--iters", "12",
           "--save-every", "4", "--eval-every", "6", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.time() < deadline and len(train_losses(out)) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    r = run_cli("pretrain", "--resume", str(out), "--iters", "12")
    assert r.returncode == 0, r.stderr
    assert train_losses(out) == train_losses(straight_run)


def test_kill_9_resumes_from_last_complete_checkpoint(tmp_path, straight_run, tokenizer_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mixtral_mlx", "pretrain", *TINY, "--tokenizer", str(tokenizer_dir), "--iters", "12",
           "--save-every", "4", "--eval-every", "6", "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "step-000004").exists():
        time.sleep(0.02)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    r = run_cli("pretrain", "--resume", str(out), "--iters", "12")
    assert r.returncode == 0, r.stderr
    assert train_losses(out) == train_losses(straight_run)


def test_refuses_to_overwrite_another_run(straight_run):
    r = run_cli("pretrain", *TINY, "--iters", "2", "--out", str(straight_run))
    assert_user_error(r, str(straight_run), "--overwrite")


def test_resume_needs_a_checkpoint(tmp_path):
    assert_user_error(run_cli("pretrain", "--resume", str(tmp_path)), "no complete checkpoint")


def test_document_packing_is_the_default_and_reports_split_documents(straight_run):
    from mixtral_mlx.data import PackedBatches, document_starts
    from mixtral_mlx.pretrain import describe_packing

    assert yaml.safe_load((straight_run / "config.yaml").read_text())["packing"] == "document"
    tokens = np.array([1, 5, 6, 2, 1, 5, 6, 7, 8, 9, 2])
    starts = document_starts(tokens, 1, 2)
    line = describe_packing(PackedBatches(tokens, 2, 4, doc_starts=starts), starts)
    assert "3 windows of 4, document packing (2 documents, 25% padding)" in line
    assert "1 of them (50%) go on past one window: --seq-len 6 would keep every document whole" in line


def test_runs_saved_before_document_packing_resume_as_stream():
    from mixtral_mlx.pretrain import resumed_config
    from mixtral_mlx.train import TrainConfig

    saved = {k: v for k, v in vars(TrainConfig(iters=5)).items() if k != "packing"}
    assert resumed_config(TrainConfig(), saved, {}, Path("state.json")).packing == "stream"
    with pytest.raises(UserError, match="--packing: the run was saved with packing='stream', not 'document'"):
        resumed_config(TrainConfig(), saved, {"packing": "document"}, Path("state.json"))


def test_bad_flags(tmp_path):
    assert_user_error(run_cli("pretrain", *TINY, "--lr", "-1", "--out", str(tmp_path / "x")), "--lr")
    assert_user_error(run_cli("pretrain", *TINY, "--seq-len", "100000", "--out", str(tmp_path / "y")), "--seq-len")
    assert_user_error(run_cli("pretrain", *TINY, "--packing", "bins", "--out", str(tmp_path / "z")), "--packing")
    assert_user_error(run_cli("pretrain", *TINY, "--init-qk-std", "0", "--out", str(tmp_path / "w")), "--init-qk-std")
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("iters: 3\nlearning_rate: 0.1\n")
    assert_user_error(run_cli("pretrain", "--config", str(bad)), "bad.yaml", "learning_rate")


def test_init_qk_std_scales_only_the_query_and_key_projections():
    """The same random draws as the default initialisation, q_proj and k_proj scaled to the new std."""
    from mlx.utils import tree_flatten

    from mixtral_mlx.config import load_preset
    from mixtral_mlx.model import Model, init_weights

    default = dict(tree_flatten(init_weights(Model(load_preset("tiny")), seed=0).parameters()))
    wider = dict(tree_flatten(init_weights(Model(load_preset("tiny")), seed=0, qk_std=0.1).parameters()))
    scaled = [name for name in default if name.endswith(("q_proj.weight", "k_proj.weight"))]
    assert len(scaled) == 2 * load_preset("tiny").num_hidden_layers
    for name, value in default.items():
        if name in scaled:
            np.testing.assert_allclose(np.array(wider[name]), np.array(value) * (0.1 / 0.02), rtol=1e-5)
            assert float(np.array(wider[name]).std()) == pytest.approx(0.1, rel=0.1)
        else:
            assert np.array_equal(np.array(wider[name]), np.array(value)), name


def test_init_starts_from_a_saved_model(tmp_path, straight_run):
    """--init loads the model, config and tokenizer: at a learning rate of 1e-9 the run ends
    where the model began, and its first loss is the trained model's, not a fresh one's."""
    start = straight_run / "final"
    out = tmp_path / "continued"
    r = run_cli("pretrain", "--init", str(start), "--data", str(DATA), "--batch-size", "4", "--seq-len", "64",
                "--eval-batches", "2", "--iters", "2", "--lr", "1e-9", "--min-lr", "0", "--warmup", "0",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"from {start}" in r.stdout
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == (start / "tokenizer.model").read_bytes()
    assert json.loads((out / "final" / "config.json").read_text()) == json.loads((start / "config.json").read_text())
    before, after = checkpoint.read_weights(start), checkpoint.read_weights(out / "final")
    assert before.keys() == after.keys()
    for name in before:  # float32 Adam steps of at most ~1e-9 each
        np.testing.assert_allclose(np.array(after[name]), np.array(before[name]), atol=1e-7, err_msg=name)
    assert train_losses(out)[0] < train_losses(straight_run)[0] - 0.5


def test_init_refuses_model_settings_and_missing_models(tmp_path, straight_run):
    start = str(straight_run / "final")
    assert_user_error(run_cli("pretrain", "--init", start, "--vocab-size", "512", "--out", str(tmp_path / "a")),
                      "--init")
    assert_user_error(run_cli("pretrain", "--init", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")),
                      "nowhere")
    assert not (tmp_path / "a").exists()


def test_fixed_head_is_drawn_with_its_std_and_never_trained(tmp_path, tokenizer_dir):
    out = tmp_path / "fixed"
    r = run_cli("pretrain", *TINY, "--tokenizer", str(tokenizer_dir), "--iters", "3", "--fixed-head-std", "0.05",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    from mixtral_mlx.config import ModelArgs
    from mixtral_mlx.model import Model, init_weights

    trained = checkpoint.from_hf_weights(checkpoint.read_weights(out / "final"))
    start = init_weights(Model(ModelArgs.from_file(out / "final" / "config.json")), seed=0)  # the run's draws
    head = np.array(trained["lm_head.weight"])
    assert float(head.std()) == pytest.approx(0.05, rel=0.05)
    np.testing.assert_allclose(head, np.array(start.lm_head.weight) * (0.05 / 0.02), rtol=1e-5)  # never trained
    assert not np.array_equal(np.array(trained["model.embed_tokens.weight"]),
                              np.array(start.model.embed_tokens.weight))  # the rest trains
    tied = tmp_path / "tied.yaml"
    tied.write_text("model:\n  tie_word_embeddings: true\n")
    assert_user_error(run_cli("pretrain", *TINY, "--config", str(tied), "--fixed-head-std", "0.05",
                              "--out", str(tmp_path / "t")), "--fixed-head-std")
    assert not (tmp_path / "t").exists()


def test_eval_command(straight_run):
    r = run_cli("eval", "--model", str(straight_run / "final"), "--data", str(DATA), "--split", "test",
                "--seq-len", "64", "--max-batches", "2", "--json")
    assert r.returncode == 0, r.stderr
    metrics = json.loads(r.stdout)
    assert metrics["split"] == "test" and metrics["loss"] > 0 and metrics["bpb"] > 0


FAULT_WORKER = Path(__file__).with_name("fault_worker.py")


@pytest.mark.parametrize("fault", ["step:6", "weights:8", "optimizer:8", "rename:8"])
def test_kill_9_anywhere_resumes_to_the_same_losses(tmp_path, straight_run, tokenizer_dir, fault):
    """kill -9 inside a step, while writing weights or optimizer state, or just before the rename."""
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--tokenizer", str(tokenizer_dir), "--iters", "12", "--save-every", "4",
            "--eval-every", "6", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAULT": fault}
    r = subprocess.run([sys.executable, str(FAULT_WORKER), *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    latest = checkpoint.latest_checkpoint(out)
    assert latest is not None and latest.name == "step-000004"
    r = run_cli("pretrain", "--resume", str(out), "--iters", "12")
    assert r.returncode == 0, r.stderr
    assert train_losses(out) == train_losses(straight_run)
    assert not list(out.glob(".step-*"))  # the half-written temporary was cleaned up


@pytest.mark.parametrize("fault,needles", [
    ("disk-full:8", ("step-000008", "No space left on device", "intact", "step-000004")),
    ("oom:6", ("out of memory at step 6", "--batch-size", "step-000004")),
])
def test_disk_full_or_oom_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path, tokenizer_dir, fault, needles):
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--tokenizer", str(tokenizer_dir), "--iters", "12", "--save-every", "4",
            "--eval-every", "6", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAULT": fault}
    r = subprocess.run([sys.executable, str(FAULT_WORKER), *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr  # progress came first: the error is the last line
    last = r.stderr.strip().splitlines()[-1]
    assert all(s in last for s in needles), last
    latest = checkpoint.latest_checkpoint(out)
    assert latest.name == "step-000004" and not (out / "step-000008").exists()
    checkpoint.load(latest)  # loads fine
