"""`mixtral-mlx finetune`, `fuse` and `eval --adapter --task exact-match` on a tiny model and a tiny task."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import mixtral_mlx  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_user_error, hf_logits, run_cli, write_hf_model
from mixtral_mlx import Model, load_preset
from mixtral_mlx.finetune import has_word
from mixtral_mlx.model import init_weights

ATOL = 1e-4
NAMES = ("Ann", "Ben", "Cat", "Dan", "Eve", "Finn", "Gus", "Ivy")
COLOURS = ("red", "blue", "green", "pink", "gold", "grey")
THINGS = ("ball", "kite", "hat", "cup", "box", "bike")
# a short, fast run: LoRA on a tiny model, evaluated and saved every 4 steps
QUICK = ("--iters", "8", "--batch-size", "4", "--lr", "5e-3", "--warmup", "0", "--eval-every", "4",
         "--save-every", "4", "--eval-batches", "2", "--seq-len", "64")


def write_task(directory: Path, counts=(("train", 160), ("val", 16), ("test", 16)), seed: int = 0) -> None:
    """Who has what colour: the answer is a word of the prompt, learnable by copying."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for split, n in counts:
        lines = []
        for _ in range(n):
            (a, b), (ca, cb), (ta, tb) = rng.sample(NAMES, 2), rng.sample(COLOURS, 2), rng.sample(THINGS, 2)
            who, colour, thing = rng.choice([(a, ca, ta), (b, cb, tb)])
            prompt = f"{a} has a {ca} {ta}. {b} has a {cb} {tb}. What colour is the {thing} of {who}?"
            lines.append(json.dumps({"prompt": prompt, "completion": colour}))
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """data/ and model/ (a random tiny model with a tokenizer trained on the data)."""
    from mixtral_mlx.data import read_split
    from mixtral_mlx.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("finetune")
    write_task(root / "data")
    texts = [e.document() for s in ("train", "val", "test") for e in read_split(root / "data", s)]
    tokenizer = train_tokenizer(texts, 400, root / "tokenizer")
    args = dataclasses.replace(load_preset("tiny"), vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                               eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    mixtral_mlx.save(init_weights(Model(args), seed=0), tokenizer, root / "model")
    return root


def finetune_cli(task: Path, out: Path, *args: str):
    return run_cli("finetune", "--model", str(task / "model"), "--data", str(task / "data"), "--out", str(out),
                   *QUICK, *args)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def model_logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)))


IDS = np.random.default_rng(0).integers(5, 300, (2, 30))


# ---------------------------------------------------------------------- LoRA
def test_lora_lowers_val_loss_and_resumes_exactly(task, tmp_path):
    from mixtral_mlx.finetune import finetune, resolve_config

    flags = {"base_model": str(task / "model"), "data": str(task / "data"), "out": str(tmp_path / "run"),
             "iters": 8, "batch_size": 4, "lr": 5e-3, "warmup": 0, "eval_every": 4, "save_every": 4,
             "eval_batches": 2, "seq_len": 64, "targets": "q_proj,v_proj,gate,w1,w2,w3"}
    logs = []
    final = finetune(resolve_config(flags), log=logs.append)
    run = tmp_path / "run"
    assert final == run / "final"
    for name in ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json"):
        assert (final / name).is_file() and (run / "step-000004" / name).is_file()
    assert any("trainable parameters" in line for line in logs) and any(line.startswith("  w2") for line in logs)
    assert any(line.startswith("check: all") for line in logs)
    results = json.loads((run / "results.json").read_text())
    assert results["val"]["loss"] < results["before"]["val"]["loss"] - 0.5, results
    assert results["peak_memory_gb"] > 0 and results["train_seconds"] > 0
    losses = [r["loss"] for r in metrics(run) if r["kind"] == "train"]

    # Drop the last checkpoint and continue from step 4: the same losses follow, bit for bit.
    shutil.rmtree(run / "step-000008")
    shutil.rmtree(final)
    (run / "latest").write_text("step-000004\n")
    finetune(resolve_config({}, resume=str(run)), resume=str(run), log=logs.append)  # the run knows its settings
    assert [r["loss"] for r in metrics(run) if r["kind"] == "train"] == losses
    assert any("resumed from" in line for line in logs)


def test_fuse_equals_model_plus_adapter_and_exact_match(task, tmp_path):
    from mixtral_mlx.checkpoint import load
    from mixtral_mlx.lora import load_adapter

    r = finetune_cli(task, tmp_path / "run", "--dora", "--targets", "q_proj,o_proj,gate,w3", "--rank", "4")
    assert r.returncode == 0, r.stderr
    model, _ = load(task / "model")
    load_adapter(model, tmp_path / "run")  # a run directory means its final adapter
    r = run_cli("fuse", "--model", str(task / "model"), "--adapter", str(tmp_path / "run" / "final"),
                "--out", str(tmp_path / "fused"))
    assert r.returncode == 0, r.stderr
    fused, tokenizer = load(tmp_path / "fused")
    assert tokenizer is not None
    np.testing.assert_allclose(model_logits(fused, IDS), model_logits(model, IDS), atol=ATOL, rtol=0)

    prompt = ("--prompt", "Ann has a red ball. What colour", "--mode", "greedy", "--max-tokens", "6")
    adapted = run_cli("generate", "--model", str(task / "model"), "--adapter", str(tmp_path / "run"), *prompt)
    plain = run_cli("generate", "--model", str(tmp_path / "fused"), *prompt)
    assert adapted.returncode == 0 and plain.returncode == 0, adapted.stderr + plain.stderr
    assert adapted.stdout == plain.stdout

    r = run_cli("eval", "--model", str(task / "model"), "--adapter", str(tmp_path / "run"), "--data",
                str(task / "data"), "--split", "test", "--task", "exact-match", "--limit", "4", "--json",
                "--answers", str(tmp_path / "answers.jsonl"))
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout.strip().splitlines()[-1])
    assert scored["total"] == 4 and 0 <= scored["correct"] <= 4
    assert scored["by_kind"] == {"what colour": [scored["correct"], 4]}
    r = run_cli("eval", "--model", str(task / "model"), "--adapter", str(tmp_path / "run"), "--data",
                str(task / "data"), "--split", "test", "--task", "exact-match", "--limit", "4", "--by-kind",
                "--swap-answers", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-3].split()[:5] == ["what", "colour", str(scored["correct"]), "of", "4"]
    # every answer is a colour of its prompt: each example is swapped up to twice, with another of the
    # 4 examples' answers, never with the other colour its own story already names
    tests = [json.loads(line) for line in (task / "data" / "test.jsonl").read_text().splitlines()[:4]]
    pool = {t["completion"] for t in tests}
    colours = len(pool)
    swaps = sum(min(2, len([c for c in pool - {t["completion"]} if not has_word(t["prompt"], c)])) for t in tests)
    assert lines[-2].startswith("test, answers swapped in the prompt: the answer follows in") and f"of {swaps};" in lines[-2]
    assert lines[-1].split()[:2] == ["what", "colour"] and f" of {swaps} " in lines[-1]
    assert lines[-1].endswith(f"(a guess: {100 / colours:.1f}%)")
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3, 4]
    assert [a["expected"] for a in answers] == [t["completion"] for t in tests]
    assert [a["prompt"] for a in answers] == [t["prompt"] for t in tests]
    assert sum(a["correct"] for a in answers) == scored["correct"]


def test_qlora_fuses_exactly_with_dequantize(task, tmp_path):
    from mixtral_mlx.checkpoint import load
    from mixtral_mlx.lora import load_adapter

    r = finetune_cli(task, tmp_path / "run", "--quantize", "4", "--targets", "q_proj,gate,w1", "--iters", "4")
    assert r.returncode == 0, r.stderr
    assert "quantized the frozen base to 4 bits" in r.stdout
    model, _ = load(task / "model")
    load_adapter(model, tmp_path / "run")
    assert model.args.quantization["bits"] == 4
    r = run_cli("fuse", "--model", str(task / "model"), "--adapter", str(tmp_path / "run"), "--out",
                str(tmp_path / "fused"), "--dequantize")
    assert r.returncode == 0, r.stderr
    fused, _ = load(tmp_path / "fused")
    assert fused.args.quantization is None
    np.testing.assert_allclose(model_logits(fused, IDS), model_logits(model, IDS), atol=ATOL, rtol=0)


def test_exact_match_scores_greedy_answers_to_the_templated_prompt(task, monkeypatch):
    """What is generated from exactly the training-time prompt, first line, stripped, must equal the answer."""
    import sys

    from mixtral_mlx.checkpoint import load
    from mixtral_mlx.data import read_split
    from mixtral_mlx.finetune import exact_match

    model, tokenizer = load(task / "model")
    examples = read_split(task / "data", "test")[:4]
    prompts = {tuple(tokenizer.encode_chat(e.prompt_messages(), add_generation_prompt=True)[0]): e.answer
               for e in examples}
    replies = iter([" {} ", "{}", "{}s", "no"])

    def fake_generate(model, tokenizer, prompt, mode, max_tokens, stop):
        assert mode == "greedy" and stop == ("\n",)
        return dataclasses.make_dataclass("Result", ["text"])(next(replies).format(prompts[tuple(prompt)]))

    monkeypatch.setattr(sys.modules["mixtral_mlx.generate"], "generate", fake_generate)  # the module, not the function
    scored = exact_match(model, tokenizer, examples, progress=False)
    assert (scored["correct"], scored["total"], scored["exact_match"]) == (2, 4, 0.5)
    assert [r["correct"] for r in scored["rows"]] == [True, True, False, False]
    assert scored["by_kind"] == {"what colour": [2, 4]}


def test_swap_word_replaces_whole_words_only():
    from mixtral_mlx.finetune import swap_word

    text = "Tom met Tommy. Tom's dog was seven-year-old Rex; at seven, Rex ran."
    assert swap_word(text, "Tom", "Ann") == "Ann met Tommy. Ann's dog was seven-year-old Rex; at seven, Rex ran."
    assert swap_word(text, "seven", "8") == "Tom met Tommy. Tom's dog was 8-year-old Rex; at 8, Rex ran."
    assert swap_word("a.b and axb", "a.b", r"c\1") == r"c\1 and axb"  # neither is a regular expression


def completion(prompt: str, answer: str, line: int = 0):
    from mixtral_mlx.data import Example

    return Example("completion", prompt=prompt, completion=answer, line=line)


SWAPPABLE = [
    completion("Ann has a red ball. What colour is the ball?", "red", 1),
    completion("Ben has a blue kite. What colour is the kite?", "blue", 2),
    completion("Cat has a cup. What colour is the cup?", "green", 3),  # not in the prompt: left out
    completion("It was sunny. What was the weather like?", "sunny", 4),
    completion("It was rainy. What was the weather like?", "rainy", 5),
    completion("His dog, Rex, ran. Rex was fast. What was the name of the dog?", "Rex", 6),  # no other name
    completion("Dan found a hat. Who found the hat?", "Dan", 7),
    completion("Gus found a cup with Dan. Who found the cup?", "Gus", 9),  # Dan is in it: only Eve may stand in
    completion("Eve found a box. Who found the box?", "Eve", 8),
]


def test_swapped_examples_swap_the_answer_for_another_of_its_kind():
    from mixtral_mlx.finetune import swapped_examples

    swapped = swapped_examples(SWAPPABLE, swaps=3)
    got = [(e.line, e.prompt_messages()[-1]["content"], e.answer, chance) for e, chance in swapped]
    assert sorted(got) == [
        (1, "Ann has a blue ball. What colour is the ball?", "blue", 0.5),
        (2, "Ben has a red kite. What colour is the kite?", "red", 0.5),
        (4, "It was rainy. What was the weather like?", "rainy", 0.5),
        (5, "It was sunny. What was the weather like?", "sunny", 0.5),
        (7, "Eve found a hat. Who found the hat?", "Eve", 1 / 3),
        (7, "Gus found a hat. Who found the hat?", "Gus", 1 / 3),
        (8, "Dan found a box. Who found the box?", "Dan", 1 / 3),
        (8, "Gus found a box. Who found the box?", "Gus", 1 / 3),
        (9, "Eve found a cup with Dan. Who found the cup?", "Eve", 1 / 3),
    ]  # the weather never becomes "Rex", the one name among the "what was" answers
    assert swapped_examples(SWAPPABLE, swaps=3) == swapped  # seeded


def test_swapped_exact_match_tells_a_reader_from_a_guesser(task, monkeypatch):
    import sys

    from mixtral_mlx.checkpoint import load
    from mixtral_mlx.finetune import swapped_examples, swapped_exact_match

    model, tokenizer = load(task / "model")
    key = lambda e: tuple(tokenizer.encode_chat(e.prompt_messages(), add_generation_prompt=True)[0])
    swapped = {key(e): (e.answer, e.line) for e, _ in swapped_examples(SWAPPABLE, swaps=1)}
    originals = {e.line: e.answer for e in SWAPPABLE}
    Result = dataclasses.make_dataclass("Result", ["text"])
    for answer, follows in [(lambda new, line: new, 1.0), (lambda new, line: originals[line], 0.0)]:
        monkeypatch.setattr(sys.modules["mixtral_mlx.generate"], "generate",
                            lambda model, tokenizer, prompt, mode, max_tokens, stop: Result(answer(*swapped[tuple(prompt)])))
        scored = swapped_exact_match(model, tokenizer, SWAPPABLE, swaps=1, progress=False)
        assert (scored["exact_match"], scored["total"]) == (follows, 7)
        assert scored["chance"] == pytest.approx((4 * 0.5 + 3 / 3) / 7)
        assert scored["by_kind"] == {"what colour": [int(2 * follows), 2, 0.5], "what was": [int(2 * follows), 2, 0.5],
                                     "who found": [int(3 * follows), 3, 0.333]}


@pytest.mark.parametrize("prompt, kind", [
    ("Jack found a gold lamp.\n\nHow old was Jack?", "how old"),
    ("Ann has a red ball. Ben has a blue kite. What colour is the ball of Ann?", "what colour"),
    ("A story.\n\nWhat was the name of Ruby's rabbit?  ", "what was"),
    ("Who found the robot", "who found"),
    ("Why?", "why"),
    ("", ""),
])
def test_question_kind_is_the_last_sentences_first_two_words(prompt, kind):
    from mixtral_mlx.finetune import question_kind

    assert question_kind(prompt) == kind


def test_two_processes_equal_one_with_the_doubled_batch(task, tmp_path):
    """Data-parallel fine-tuning under mlx.launch: each process takes its rows of the same global batches."""
    import os
    import subprocess
    import sys

    from test_distributed import LAUNCH

    if LAUNCH is None:
        pytest.skip("mlx.launch not found")
    args = ("--iters", "3", "--targets", "q_proj,gate,w2", "--eval-every", "3", "--save-every", "3")
    one = finetune_cli(task, tmp_path / "one", *args, "--batch-size", "4")
    assert one.returncode == 0, one.stderr
    command = [LAUNCH, "-n", "2", "--backend", "ring", sys.executable, "-m", "mixtral_mlx", "finetune", "--model",
               str(task / "model"), "--data", str(task / "data"), "--out", str(tmp_path / "two"), *QUICK, *args,
               "--batch-size", "2"]
    two = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert two.returncode == 0, two.stdout + two.stderr
    assert "data parallel: 2 processes x batch 2 = global batch 4" in two.stdout
    a = mx.load(str(tmp_path / "one" / "final" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "final" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for name in a:  # float32: the all-reduce sums two halves instead of one whole
        np.testing.assert_allclose(np.array(a[name]), np.array(b[name]), atol=1e-5, err_msg=name)


# ---------------------------------------------------------------------- ESFT and full
def test_esft_trains_only_the_chosen_experts(task, tmp_path):
    from mixtral_mlx.checkpoint import load

    r = finetune_cli(task, tmp_path / "run", "--esft", "--esft-threshold", "0.3", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr
    assert "chose per layer the fewest whose scores reach 0.3" in r.stdout
    chosen = json.loads((tmp_path / "run" / "esft_experts.json").read_text())["experts"]
    assert len(chosen) == 2 and all(chosen)
    scores = json.loads((tmp_path / "run" / "esft_experts.json").read_text())["scores"]
    for experts, s in zip(chosen, scores):  # the documented rule, on the scores it saved
        assert sum(s[e] for e in experts) >= 0.3 and len(experts) == next(
            n for n in range(1, 5) if sum(sorted(s, reverse=True)[:n]) >= 0.3)
    r = run_cli("fuse", "--model", str(task / "model"), "--adapter", str(tmp_path / "run"), "--out",
                str(tmp_path / "fused"))
    assert r.returncode == 0, r.stderr
    base, _ = load(task / "model")
    fused, _ = load(tmp_path / "fused")
    for i, (b, f) in enumerate(zip(base.layers, fused.layers)):
        for p in ("w1", "w2", "w3"):
            wb, wf = np.array(b.block_sparse_moe.experts[p].weight), np.array(f.block_sparse_moe.experts[p].weight)
            for e in range(wb.shape[0]):
                assert np.array_equal(wb[e], wf[e]) != (e in chosen[i]), (i, p, e)
        assert np.array_equal(np.array(b.self_attn.q_proj.weight), np.array(f.self_attn.q_proj.weight))


def test_full_finetune_writes_a_model(task, tmp_path):
    from mixtral_mlx.checkpoint import load

    r = finetune_cli(task, tmp_path / "run", "--full", "--iters", "4", "--lr", "1e-3")
    assert r.returncode == 0, r.stderr
    assert "trainable parameters (full fine-tune)" in r.stdout
    model, tokenizer = load(tmp_path / "run" / "final")
    base, _ = load(task / "model")
    assert tokenizer is not None
    assert not np.array_equal(np.array(model.lm_head.weight), np.array(base.lm_head.weight))


# ---------------------------------------------------------------------- any Mixtral
@pytest.mark.reference
def test_finetunes_a_transformers_model_and_transformers_reads_the_fused_one(task, tmp_path):
    from transformers import MixtralForCausalLM

    from mixtral_mlx.checkpoint import load
    from mixtral_mlx.lora import load_adapter

    vocab = load(task / "model")[1].vocab_size
    write_hf_model(tmp_path / "hf", seed=5, vocab_size=vocab, hidden_size=64, intermediate_size=64)
    r = run_cli("finetune", "--model", str(tmp_path / "hf"), "--tokenizer", str(task / "model"), "--data",
                str(task / "data"), "--out", str(tmp_path / "run"), *QUICK, "--targets", "k_proj,gate,w2")
    assert r.returncode == 0, r.stderr
    r = run_cli("fuse", "--model", str(tmp_path / "hf"), "--adapter", str(tmp_path / "run"), "--out",
                str(tmp_path / "fused"))
    assert r.returncode == 0, r.stderr
    ours, _ = load(tmp_path / "hf")
    load_adapter(ours, tmp_path / "run")
    reference = MixtralForCausalLM.from_pretrained(tmp_path / "fused").eval()
    np.testing.assert_allclose(hf_logits(reference, IDS), model_logits(ours, IDS), atol=ATOL, rtol=0)


def test_settings_layer_method_defaults_yaml_and_flags(tmp_path):
    from mixtral_mlx import UserError
    from mixtral_mlx.finetune import resolve_config

    (tmp_path / "ft.yaml").write_text("method: esft\nesft_score: gate\nbatch_size: 2\ntargets: q_proj, w1\n")
    cfg = resolve_config({"base_model": "m", "batch_size": 3}, str(tmp_path / "ft.yaml"))
    assert (cfg.method, cfg.esft_score, cfg.batch_size, cfg.lr) == ("esft", "gate", 3, 1e-4)  # esft's own lr
    assert cfg.targets == ["q_proj", "w1"] and cfg.aux_loss_coef == 0.0
    assert resolve_config({"base_model": "m", "num_layers": "2"}).lora().num_layers == 2
    (tmp_path / "bad.yaml").write_text("rank: 0\n")
    with pytest.raises(UserError, match="bad.yaml: rank: must be a positive integer"):
        resolve_config({"base_model": "m"}, str(tmp_path / "bad.yaml"))
    (tmp_path / "typo.yaml").write_text("rnak: 4\n")
    with pytest.raises(UserError, match="typo.yaml: rnak: unknown setting"):
        resolve_config({"base_model": "m"}, str(tmp_path / "typo.yaml"))
    with pytest.raises(UserError, match="--model: needs the model to fine-tune"):
        resolve_config({})
    with pytest.raises(UserError, match="no such run directory to resume"):
        resolve_config({}, resume=str(tmp_path / "nope"))


# ---------------------------------------------------------------------- bad input: one line, exit 2, nothing written
@pytest.mark.parametrize("args, needles", [
    (("--targets", "q_proj,mlp"), ("--targets", "unknown target 'mlp'")),
    (("--rank", "0"), ("--rank", "must be a positive integer")),
    (("--rank", "-4", "--dora"), ("--rank",)),
    (("--num-layers", "3"), ("--num-layers", "more than the model's 2 layers")),
    (("--quantize", "3"), ("--quantize", "4 or 8")),
    (("--esft", "--quantize", "4"), ("--quantize",)),
    (("--esft", "--esft-threshold", "1.5"), ("--esft-threshold",)),
    (("--seq-len", "12"), ("completion", "no completion tokens to learn from")),
])
def test_bad_finetune_input(task, tmp_path, args, needles):
    assert_user_error(finetune_cli(task, tmp_path / "run", *args), *needles)
    assert not (tmp_path / "run").exists()


def test_adapter_for_another_base(task, tmp_path):
    r = finetune_cli(task, tmp_path / "run", "--iters", "1", "--targets", "w1")
    assert r.returncode == 0, r.stderr
    other = init_weights(Model(dataclasses.replace(mixtral_mlx.load(task / "model")[0].args, intermediate_size=96)))
    mixtral_mlx.save(other, mixtral_mlx.load(task / "model")[1], tmp_path / "other")
    for command in (("eval", "--data", str(task / "data"), "--task", "exact-match"),
                    ("fuse", "--out", str(tmp_path / "fused"))):
        r = run_cli(command[0], "--model", str(tmp_path / "other"), "--adapter", str(tmp_path / "run"), *command[1:])
        assert_user_error(r, "adapter_config.json", "base_model.intermediate_size", "another base model")
    assert not (tmp_path / "fused").exists()


def test_finetune_table_tabulates_scores_and_swaps(task, tmp_path):
    """scripts/finetune_table.py end to end on the tiny task: one method, its table and JSON."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "table"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "finetune_table.py"), "--model", str(task / "model"),
                           "--data", str(task / "data"), "--out", str(out), "--methods", "lora", "--", *QUICK],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / "table.json").read_text())
    assert [r["method"] for r in rows] == ["before fine-tuning", "LoRA (q, v, router)"]
    assert rows[0]["swapped"]["total"] == rows[1]["swapped"]["total"] > 0 and rows[1]["steps"] == 8
    table = (out / "table.md").read_text()
    assert "| method | test exact match | follows a swapped fact |" in table
    assert f"| LoRA (q, v, router) | {100 * rows[1]['exact_match']:.1f}% | {100 * rows[1]['swapped']['exact_match']:.1f}% |" in table
    assert "| what colour (16) |" in table and "| what colour (" + str(rows[0]["swapped"]["total"]) + "; " in table
