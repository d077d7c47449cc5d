"""Bad input of every kind, through the command line as a user meets it.

Each case: exit code 2, one line on stderr naming the file (and line and field) or the
flag, no traceback, and no file created or changed anywhere under the test's directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import pytest

import mixtral_mlx
from mixtral_mlx import Model, load_preset
from mixtral_mlx.model import init_weights
from mixtral_mlx.tokenizer import train_tokenizer
from conftest import REPO, assert_user_error, run_cli

STORY = "Lily found a red ball in the garden. \"Look!\" she said to Tom, who was 7."


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny model with its own tokenizer, as `pretrain` would save it."""
    root = tmp_path_factory.mktemp("base")
    tokenizer = train_tokenizer([STORY * 3, "Once upon a time, 12 dogs ran home."] * 40, 300, root / "tok")
    args = load_preset("tiny")
    args.vocab_size = tokenizer.vocab_size
    mixtral_mlx.save(init_weights(Model(args), seed=0), tokenizer, root / "model")
    return root / "model"


def text_data(directory: Path, lines: dict[str, str] | None = None) -> Path:
    """train/val/test splits of {"text": ...} lines; `lines` replaces whole files (raw text)."""
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{STORY} {i}"}) + "\n" for i in range(20)))
    for name, raw in (lines or {}).items():
        (directory / name).write_bytes(raw.encode("utf-8") if isinstance(raw, str) else raw)
    return directory


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def copy_model(base: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for f in base.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def corrupt_weights(model_dir: Path, how: str) -> None:
    path = model_dir / "model.safetensors"
    if how == "garbage":
        path.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        weights = mx.load(str(path))
        name = "model.layers.1.self_attn.v_proj.weight"
        if how == "missing":
            del weights[name]
        elif how == "shape":
            weights[name] = mx.zeros((5, 5))
        elif how == "nan":
            weights[name] = weights[name] * float("nan")
        mx.save_safetensors(str(path), weights)


TINY = ["--preset", "tiny", "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16", "--iters", "2"]
BAD_JSONL = {
    "not JSON": ('{"text": "ok"}\n{"text": oops}\n', ["train.jsonl:2", "column"]),
    "not an object": ('{"text": "ok"}\n["a list"]\n', ["train.jsonl:2"]),
    "missing key": ('{"text": "ok"}\n{"txet": "typo"}\n', ["train.jsonl:2"]),
    "wrong type": ('{"text": "ok"}\n{"text": 42}\n', ["train.jsonl:2", "text"]),
    "empty text": ('{"text": "ok"}\n{"text": ""}\n', ["train.jsonl:2", "text"]),
    "invalid UTF-8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["train.jsonl:2", "byte"]),
    "mixed formats": ('{"text": "ok"}\n{"prompt": "a", "completion": "b"}\n', ["train.jsonl:2"]),
}


@pytest.mark.parametrize("name", BAD_JSONL)
def test_pretrain_rejects_bad_jsonl(tmp_path, name):
    raw, needles = BAD_JSONL[name]
    data = text_data(tmp_path / "data", {"train.jsonl": raw})
    before = snapshot(tmp_path)
    assert_user_error(run_cli("pretrain", *TINY, "--data", str(data), "--out", str(tmp_path / "run")), *needles)
    assert snapshot(tmp_path) == before


def _cases(base: Path, tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (command line, what the one error line must contain); files are made here."""
    data = text_data(tmp / "data")
    empty = text_data(tmp / "empty", {"val.jsonl": "\n\n"})
    no_val = text_data(tmp / "no_val")
    (no_val / "val.jsonl").unlink()
    (tmp / "bad.yaml").write_text("iters: 3\n  lr: [unclosed\n")
    (tmp / "unknown.yaml").write_text("iters: 3\nlearning_rate: 0.1\n")
    (tmp / "prompt.txt").write_text("word " * 400)
    impossible = copy_model(base, tmp / "impossible")
    config = json.loads((impossible / "config.json").read_text())
    config["num_experts_per_tok"] = 9
    (impossible / "config.json").write_text(json.dumps(config))
    models = {how: copy_model(base, tmp / how) for how in ("garbage", "truncated", "missing", "shape", "nan")}
    for how, directory in models.items():
        corrupt_weights(directory, how)
    big_vocab = copy_model(base, tmp / "big_vocab")
    small = json.loads((big_vocab / "config.json").read_text())
    small["vocab_size"] = 280  # fewer ids than the tokenizer has
    (big_vocab / "config.json").write_text(json.dumps(small))
    # an adapter made for a different base
    other = tmp / "other_base"
    args = load_preset("tiny")
    args.hidden_size, args.vocab_size = 32, json.loads((base / "config.json").read_text())["vocab_size"]
    mixtral_mlx.save(init_weights(Model(args), seed=1), None, other)
    gen = ["generate", "--model", str(base), "--prompt", "Lily", "--max-tokens", "4"]
    return {
        "empty split": (["pretrain", *TINY, "--data", str(empty), "--out", str(tmp / "r1")], ["val.jsonl", "empty"]),
        "missing split": (["pretrain", *TINY, "--data", str(no_val), "--out", str(tmp / "r2")], ["val"]),
        "missing data dir": (["pretrain", *TINY, "--data", str(tmp / "nowhere"), "--out", str(tmp / "r3")],
                             ["nowhere"]),
        "bad YAML": (["pretrain", "--config", str(tmp / "bad.yaml")], ["bad.yaml:2", "YAML"]),
        "unknown config key": (["pretrain", "--config", str(tmp / "unknown.yaml")], ["unknown.yaml", "learning_rate"]),
        "negative lr": (["pretrain", *TINY, "--lr", "-0.1", "--data", str(data)], ["--lr"]),
        "zero batch size": (["pretrain", *TINY, "--batch-size", "0", "--data", str(data)], ["--batch-size"]),
        "zero iters": (["pretrain", *TINY, "--iters", "0", "--data", str(data)], ["--iters"]),
        "unknown dtype": (["pretrain", *TINY, "--dtype", "int8", "--data", str(data)], ["--dtype"]),
        "seq-len over context": (["pretrain", *TINY, "--seq-len", "4096", "--data", str(data)], ["--seq-len"]),
        "unknown preset": (["pretrain", "--preset", "huge", "--data", str(data)], ["--preset", "huge"]),
        "resume without checkpoint": (["pretrain", "--resume", str(data)], ["no complete checkpoint"]),
        "resume missing dir": (["pretrain", "--resume", str(tmp / "gone")], ["gone"]),
        "read-only output dir": (["pretrain", *TINY, "--data", str(data), "--out", "/proc/mixtral-mlx-run"],
                                 ["/proc/mixtral-mlx-run", "--out"]),
        "missing model dir": (["generate", "--model", str(tmp / "nomodel"), "--prompt", "x"], ["nomodel"]),
        "impossible config.json": (["generate", "--model", str(impossible), "--prompt", "x"],
                                   ["config.json", "num_experts_per_tok"]),
        "garbage safetensors": (["generate", "--model", str(models["garbage"]), "--prompt", "x"],
                                ["model.safetensors"]),
        "truncated safetensors": (["generate", "--model", str(models["truncated"]), "--prompt", "x"],
                                  ["model.safetensors"]),
        "tensor missing": (["generate", "--model", str(models["missing"]), "--prompt", "x"], ["v_proj.weight"]),
        "tensor wrong shape": (["generate", "--model", str(models["shape"]), "--prompt", "x"], ["v_proj.weight", "shape"]),
        "NaN in weights": (["generate", "--model", str(models["nan"]), "--prompt", "x"], ["v_proj.weight", "NaN"]),
        "tokenizer vocab disagrees": (["generate", "--model", str(big_vocab), "--prompt", "x"], ["vocab"]),
        "zero max-tokens": ([*gen, "--max-tokens", "0"], ["--max-tokens"]),
        "negative temp": ([*gen, "--temp", "-1"], ["--temp"]),
        "top-p out of range": ([*gen, "--top-p", "1.5"], ["--top-p"]),
        "empty prompt": (["generate", "--model", str(base), "--prompt", ""], ["prompt"]),
        "unknown mode": ([*gen, "--mode", "beam"], ["--mode"]),
        "prompt longer than context": (["generate", "--model", str(base), "--prompt-file", str(tmp / "prompt.txt")],
                                       ["context"]),
        "adapter for another base": ([*gen, "--adapter", str(other)], ["adapter"]),
        "finetune rank zero": (["finetune", "--model", str(base), "--data", str(data), "--rank", "0",
                                "--out", str(tmp / "ft1")], ["--rank"]),
        "finetune unknown target": (["finetune", "--model", str(base), "--data", str(data), "--targets", "q_proj,ffn",
                                     "--out", str(tmp / "ft2")], ["ffn"]),
        "eval missing test split": (["eval", "--model", str(base), "--data", str(no_val), "--split", "val"], ["val"]),
        "eval zero seq-len": (["eval", "--model", str(base), "--data", str(data), "--seq-len", "0"], ["--seq-len"]),
        "eval answers without exact-match": (["eval", "--model", str(base), "--data", str(data), "--answers",
                                              "answers.jsonl"], ["--answers", "exact-match"]),
        "eval by-kind without exact-match": (["eval", "--model", str(base), "--data", str(data), "--by-kind"],
                                             ["--by-kind", "exact-match"]),
        "eval swap-answers zero": (["eval", "--model", str(base), "--data", str(data), "--task", "exact-match",
                                    "--swap-answers", "0"], ["--swap-answers"]),
        "tokenizer vocab too small": (["tokenizer", "train", "--data", str(data), "--vocab-size", "10", "--out",
                                       str(tmp / "tok")], ["--vocab-size"]),
        "info unknown preset": (["info", "--preset", "nope"], ["--preset"]),
    }


CASE_NAMES = ["empty split", "missing split", "missing data dir", "bad YAML", "unknown config key", "negative lr",
              "zero batch size", "zero iters", "unknown dtype", "seq-len over context", "unknown preset",
              "resume without checkpoint", "resume missing dir", "read-only output dir", "missing model dir",
              "impossible config.json", "garbage safetensors", "truncated safetensors", "tensor missing",
              "tensor wrong shape", "NaN in weights", "tokenizer vocab disagrees", "zero max-tokens", "negative temp",
              "top-p out of range", "empty prompt", "unknown mode", "prompt longer than context",
              "adapter for another base", "finetune rank zero", "finetune unknown target", "eval missing test split",
              "eval zero seq-len", "eval answers without exact-match", "eval by-kind without exact-match",
              "eval swap-answers zero", "tokenizer vocab too small", "info unknown preset"]


@pytest.fixture(scope="module")
def cases(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cases")
    return tmp, _cases(base, tmp)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_one_clear_line_and_nothing_written(cases, name):
    tmp, table = cases
    argv, needles = table[name]
    before = snapshot(tmp)
    assert_user_error(run_cli(*argv, cwd=tmp), *needles)
    assert snapshot(tmp) == before, "files were created or changed"


def test_every_case_is_listed(cases):
    assert sorted(cases[1]) == sorted(CASE_NAMES) and len(CASE_NAMES) + len(BAD_JSONL) >= 25


def test_an_output_dir_holding_another_run_is_refused(tmp_path):
    data = text_data(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    before = snapshot(tmp_path)
    assert_user_error(run_cli("pretrain", *TINY, "--data", str(data), "--out", str(run)), str(run), "--overwrite")
    assert snapshot(tmp_path) == before


def test_debug_flag_shows_the_traceback(tmp_path):
    r = run_cli("--debug", "generate", "--model", str(tmp_path / "nomodel"), "--prompt", "x")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "nomodel"), "--prompt", "x", env={"MIXTRAL_MLX_DEBUG": "1"})
    assert "Traceback" in r.stderr
