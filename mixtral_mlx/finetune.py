"""Fine-tuning a pretrained Mixtral: LoRA, DoRA, QLoRA, full and expert-specialised (ESFT).

base model (ours or any HF Mixtral) -> [quantize] -> adapters, chosen experts or every
weight made trainable -> prompt-masked batches -> the training core (`train.fit`), the
same loop, schedule, checkpoints and exact resume as pretraining. What a checkpoint
holds is the method's: an adapter directory for LoRA / DoRA / ESFT (see lora.py), a
whole model for a full fine-tune.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from . import checkpoint as ckpt
from .data import Example
from .errors import UserError
from .lora import LoRAConfig
from .pretrain import (check_resume_compatible, first_process_first, join_processes, layer_settings, prepare_run_dir,
                       read_yaml)
from .train import Task, TrainConfig, Trainer, eval_metrics, evaluate, fit

METHODS = ("lora", "dora", "full", "esft")
PAD_TO = 32  # training batches pad to a multiple of this: fewer shapes for the compiled step to trace
ADAPTER_METHODS = ("lora", "dora", "esft")
# Full and expert fine-tuning move pretrained weights themselves: a smaller step than an adapter's.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {method: {"lr": 1e-4, "min_lr": 1e-5} for method in ("full", "esft")}


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig with fine-tuning defaults and the method's settings; YAML keys = flags."""

    data: str = "finetune_data"
    base_model: str | None = None  # --model: a model directory or Hub repo
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | str | None = None  # None: q_proj, v_proj, gate
    num_layers: int | str = "all"  # adapt the last N decoder layers
    quantize: int | None = None  # QLoRA: 4 or 8 bits for the frozen base
    group_size: int = 64
    mask_prompt: bool = True
    esft_score: str = "token"
    esft_threshold: float | None = None  # None: 0.2 for token, 0.1 for gate
    esft_examples: int = 1024  # training examples routed to score the experts
    # the trainer's settings, with fine-tuning defaults
    iters: int = 600
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 100
    aux_loss_coef: float | None = 0.0  # the task loss alone: no router balancing while adapting
    z_loss_coef: float = 0.0

    def validate(self, source: str = "config") -> "FinetuneConfig":
        super().validate(source)

        def fail(name: str, why: str) -> UserError:
            if source == "flags":
                return UserError(why, field=f"--{name.replace('_', '-')}")
            return UserError(why, file=source, field=name)

        if not self.base_model:
            raise fail("model" if source == "flags" else "base_model", "needs the model to fine-tune")
        if self.method not in METHODS:
            raise fail("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.num_layers, str) and self.num_layers != "all":
            try:
                self.num_layers = int(self.num_layers)
            except ValueError:
                raise fail("num_layers", f"must be a positive integer or 'all', got {self.num_layers!r}") from None
        if self.quantize is not None:
            if self.quantize not in (4, 8):
                raise fail("quantize", f"must be 4 or 8 (bits), got {self.quantize!r}")
            if self.method not in ("lora", "dora"):
                raise fail("quantize", f"quantizes the frozen base under an adapter; --{self.method} trains "
                                       "the base weights themselves")
        if self.method in ("lora", "dora"):
            try:
                self.lora().validate()
            except UserError as e:
                raise fail(e.field.lstrip("-").replace("-", "_"), e.detail) from None
        if self.method == "esft":
            from .esft import check_threshold

            try:
                check_threshold(self.esft_score, self.esft_threshold)
            except UserError as e:
                raise fail(e.field.lstrip("-").replace("-", "_"), e.detail) from None
            if not isinstance(self.esft_examples, int) or self.esft_examples <= 0:
                raise fail("esft_examples", f"must be a positive integer, got {self.esft_examples!r}")
        return self

    def lora(self) -> LoRAConfig:
        from .lora import DEFAULT_TARGETS

        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          targets=tuple(self.targets) if self.targets else DEFAULT_TARGETS,
                          num_layers=None if self.num_layers == "all" else self.num_layers,
                          dora=self.method == "dora")


def resolve_config(flags: dict[str, Any], yaml_path: str | None = None,
                   resume: str | bool | None = None) -> FinetuneConfig:
    """Fine-tuning defaults (per method; a resumed run's own settings) < YAML file < flags."""
    from_yaml = read_yaml(yaml_path) if yaml_path else {}
    method = flags.get("method") or from_yaml.get("method") or FinetuneConfig.method
    defaults = METHOD_DEFAULTS.get(method, {})
    if resume:  # the run knows its model and method: `--resume DIR` alone continues it
        out = flags.get("out") or from_yaml.get("out")
        _, latest = prepare_run_dir(FinetuneConfig(out=out), resume, overwrite=False)  # reads only
        defaults = ckpt.read_trainer_state(latest)["config"]
    return layer_settings(FinetuneConfig, defaults, from_yaml, yaml_path, flags)


# ---------------------------------------------------------------------- pieces
def load_base(cfg: FinetuneConfig, log=print):
    """The model to fine-tune and its tokenizer (or --tokenizer's)."""
    from .tokenizer import load_tokenizer

    model, tokenizer = ckpt.load(cfg.base_model, dtype=cfg.dtype)
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer is None:
            raise UserError("holds no tokenizer.model or tokenizer.json", file=cfg.tokenizer, field="--tokenizer")
    if tokenizer is None:
        raise UserError("holds no tokenizer (tokenizer.model or tokenizer.json); give one with --tokenizer",
                        file=cfg.base_model, field="--model")
    if tokenizer.vocab_size > model.args.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.args.vocab_size}",
                        field="--tokenizer")
    context = model.args.max_position_embeddings
    if cfg.seq_len > context and cfg.seq_len != FinetuneConfig.seq_len:
        raise UserError(f"{cfg.seq_len} is longer than the model's context (max_position_embeddings={context})",
                        field="--seq-len")
    if model.args.quantization is not None and cfg.method in ("full", "esft"):
        raise UserError(f"{cfg.base_model} is quantized; --{cfg.method} trains float weights (use --lora or "
                        "--dora, or a float model)", field="--model")
    return model, tokenizer


@dataclass
class FinetuneData:
    train: Any  # FinetuneBatches
    evals: dict[str, Any]  # split -> FinetuneBatches in order, for evaluation
    examples: dict[str, list]  # split -> examples
    target_bytes: dict[str, tuple[int, int]]  # split -> (bytes, tokens) of the text the loss counts


def load_data(cfg: FinetuneConfig, tokenizer, log=print, rank: int = 0, world: int = 1) -> FinetuneData:
    """The splits as batches; with `world` processes each trains on its rank's rows of a global batch."""
    from .data import FinetuneBatches, read_split

    examples = {"train": read_split(cfg.data, "train"), "val": read_split(cfg.data, "val")}
    try:
        examples["test"] = read_split(cfg.data, "test")
    except UserError:
        log("no test split: evaluating on val only")

    def batches(split: str, shuffle: bool, batch_size: int = cfg.batch_size, pad_to: int = 1):
        return FinetuneBatches(examples[split], tokenizer, batch_size, seed=cfg.seed, shuffle=shuffle,
                               mask_prompt=cfg.mask_prompt, max_seq_len=cfg.seq_len, pad_to=pad_to, log=log)

    train = batches("train", True, cfg.batch_size * world, PAD_TO)
    evals = {s: batches(s, False) for s in examples if s != "train"}
    log(f"data: {train.num_examples:,} training examples, {train.num_trained_tokens:,} of their "
        f"{train.num_tokens:,} tokens {'are completions the loss counts' if cfg.mask_prompt else 'count'}")
    if world > 1:
        log(f"data parallel: {world} processes x batch {cfg.batch_size} = global batch {cfg.batch_size * world}")
    return FinetuneData(train if world == 1 else train.shard(rank, world), evals, examples,
                        {s: _target_bytes(b, tokenizer) for s, b in evals.items()})


def _target_bytes(batches, tokenizer) -> tuple[int, int]:
    """UTF-8 bytes and tokens of every target the loss counts in a split (for bits per byte)."""
    n_bytes = n_tokens = 0
    for batch in batches.eval_batches():
        for targets, mask in zip(batch["targets"], batch["mask"]):
            ids = targets[mask > 0].tolist()
            n_bytes += len(tokenizer.decode(ids).encode("utf-8"))
            n_tokens += len(ids)
    return n_bytes, n_tokens


def trainable_report(counts: dict[str, int], total: int, title: str) -> list[str]:
    trained = sum(counts.values())
    lines = [title]
    lines += [f"  {group:<10}{n:>14,}" for group, n in counts.items()]
    lines.append(f"  {'total':<10}{trained:>14,} of {total:,} parameters ({100 * trained / max(total, 1):.3f}%)")
    return lines


def snapshot(model) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.trainable_parameters()))


def check_moved(before: dict[str, Any], model, steps: int, log=print) -> None:
    """Every trained tensor must have changed; expert adapters are also looked at expert by expert.

    `lora_b` starts at zero, so `lora_a` gets no gradient in the first step: it must have
    moved only after two or more steps.
    """
    import mlx.core as mx

    after = snapshot(model)
    still = [name for name, v in before.items() if mx.array_equal(v, after[name]).item()
             and (steps > 1 or not name.endswith("lora_a"))]
    if still:
        raise UserError(f"{len(still)} of {len(before)} trained tensors did not change during training, e.g. "
                        f"{still[0]}: the fine-tune was a no-op for them", field="adapter")
    idle = {}
    for name, v in before.items():
        if v.ndim == 3 and v.shape[0] > 1:  # stacked experts: (E, ...) or ESFT's chosen (k, ...)
            same = (v == after[name]).reshape(v.shape[0], -1).all(axis=1)
            if same.any().item():
                idle[name] = [i for i, s in enumerate(same.tolist()) if s]
    log(f"check: all {len(before)} trained tensors moved")
    for name, experts in idle.items():
        log(f"  note: {name}: experts {experts} never received a gradient (the data never routed to them)")


# ---------------------------------------------------------------------- exact match
def question_kind(prompt: str) -> str:
    """The kind of question a prompt ends with: its last sentence's first two words, lowercased.

    "...dreamed of the gold lamp.\n\nHow old was Jack?" is a "how old" question. Scores
    by kind show which lookups a model has learned and which it has not.
    """
    lines = prompt.strip().splitlines() or [""]
    sentences = re.split(r"(?<=[.!?])\s+", lines[-1].strip())
    return " ".join(re.sub(r"[^\w\s'-]", " ", sentences[-1]).lower().split()[:2])


# A model can score well on a question without reading the prompt: by guessing the
# answer such stories usually have. Swapping the fact in the prompt for another answer of
# the same kind tells the two apart: a reader's answer follows the swap, a guesser's not.
def answer_pool(question: str, answer: str) -> tuple[str, bool]:
    """Which answers may stand in for each other in a swap: those to the same kind of
    question, names only with names ("What was the weather like?" and "What was the name
    of Ben's dog?" are both "what was")."""
    return question_kind(question), answer[:1].isupper()


def whole_word(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def has_word(text: str, word: str) -> bool:
    return whole_word(word).search(text) is not None


def swap_word(text: str, old: str, new: str) -> str:
    """`text` with every whole-word `old` replaced by `new`."""
    return whole_word(old).sub(lambda _: new, text)


def swap_choices(items: Sequence[tuple[tuple[str, bool], str, str]], swaps: int,
                 seed: int = 0) -> list[tuple[list[str], int]]:
    """For each (pool, answer, text): up to `swaps` other answers of its pool (the answers
    of all the items in that pool) drawn at random, seeded, and how many answers the pool
    holds (a guess among them is right once in that many). An answer that is already a
    word of the text is never drawn: the swap would merge two things of the story."""
    members: dict[tuple[str, bool], set[str]] = {}
    for pool, answer, _ in items:
        members.setdefault(pool, set()).add(answer)
    rng = random.Random(seed)
    choices = []
    for pool, answer, text in items:
        others = [a for a in sorted(members[pool] - {answer}) if not has_word(text, a)]
        choices.append((rng.sample(others, min(swaps, len(others))), len(members[pool])))
    return choices


def swapped_examples(examples: Sequence[Example], swaps: int, seed: int = 0) -> list[tuple[Example, float]]:
    """Up to `swaps` copies of each example whose answer is a word of its prompt, with that
    word replaced throughout the conversation by another answer of its pool (see
    `answer_pool` and `swap_choices`) and expected as the answer; each with the chance of
    guessing it (1 / the pool's size). Examples whose prompt does not hold their answer
    are left out."""
    def prompt_text(example: Example) -> str:
        return "\n".join(m["content"] for m in example.prompt_messages())

    readable = [e for e in examples if has_word(prompt_text(e), e.answer)]
    items = [(answer_pool(e.prompt_messages()[-1]["content"], e.answer), e.answer, prompt_text(e)) for e in readable]
    swapped = []
    for example, (news, pool_size) in zip(readable, swap_choices(items, swaps, seed)):
        for new in news:
            messages = [dict(m, content=swap_word(m["content"], example.answer, new)) for m in example.prompt_messages()]
            messages.append({"role": "assistant", "content": new})
            copy = Example("chat", messages=tuple(messages), file=example.file, line=example.line)
            swapped.append((copy, 1 / pool_size))
    return swapped


def exact_match(model, tokenizer, examples: Sequence, max_tokens: int = 32, progress: bool = True) -> dict[str, Any]:
    """Greedy answers to each example's prompt, scored against its expected answer.

    The prompt goes through the chat template as in training; decoding stops at EOS or
    at the end of the line, and the answer counts when it equals the expected one
    (surrounding whitespace ignored). `by_kind` counts [right, asked] by `question_kind`.
    """
    from tqdm import tqdm

    from .generate import generate

    rows, correct, by_kind = [], 0, {}
    was_training = model.training
    model.eval()
    for example in tqdm(examples, desc="exact match", unit="example", disable=not progress, leave=False):
        expected = example.answer
        if expected is None:
            raise UserError("a text example has no expected answer to score",
                            file=example.file or None, line=example.line or None, field="text")
        ids, _ = tokenizer.encode_chat(example.prompt_messages(), add_generation_prompt=True)
        result = generate(model, tokenizer, ids, mode="greedy", max_tokens=max_tokens,
                          stop=() if "\n" in expected else ("\n",))
        answer = result.text.strip()
        ok = answer == expected.strip()
        correct += ok
        kind = question_kind(example.prompt_messages()[-1]["content"])
        by_kind.setdefault(kind, [0, 0])[0] += ok
        by_kind[kind][1] += 1
        rows.append({"expected": expected, "answer": answer, "correct": ok})
    model.train(was_training)
    return {"exact_match": correct / max(len(rows), 1), "correct": correct, "total": len(rows),
            "by_kind": dict(sorted(by_kind.items())), "rows": rows}


def swapped_exact_match(model, tokenizer, examples: Sequence[Example], swaps: int, max_tokens: int = 32,
                        progress: bool = True) -> dict[str, Any]:
    """`exact_match` on `swapped_examples`: how often the answer follows a fact swapped in
    the prompt, beside how often a guess among the pool's answers would (`chance`),
    overall and by kind ([followed, asked, chance])."""
    pairs = swapped_examples(examples, swaps)
    result = exact_match(model, tokenizer, [example for example, _ in pairs], max_tokens, progress)
    chances: dict[str, list[float]] = {}
    for example, chance in pairs:
        chances.setdefault(question_kind(example.prompt_messages()[-1]["content"]), []).append(chance)
    result["chance"] = sum(c for _, c in pairs) / max(len(pairs), 1)
    result["by_kind"] = {kind: [right, asked, round(sum(chances[kind]) / asked, 3)]
                         for kind, (right, asked) in result["by_kind"].items()}
    return result


# ---------------------------------------------------------------------- the methods
@dataclass
class Method:
    """What a fine-tuning method trains, and what its checkpoints hold."""

    counts: dict[str, int]  # trainable parameters per group
    title: str
    save: Callable[[Path], None]  # write the checkpoint's weights (an adapter or a model)
    load: Callable[[Path], None]  # read them back on resume
    state: dict[str, Any] = dataclasses.field(default_factory=dict)  # kept in trainer_state.json
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # run files to write (name -> text)


def lora_method(cfg: FinetuneConfig, model, **_) -> Method:
    """LoRA / DoRA (QLoRA when the base was quantized): adapters on the targets, the rest frozen."""
    from .lora import (adapter_arrays, apply_lora, from_mlx_lm_name, load_arrays_checked, lora_adapter_config,
                       read_adapter_arrays, save_adapter)

    lcfg = cfg.lora()
    counts = apply_lora(model, lcfg)
    layers = len(model.layers) if lcfg.num_layers is None else lcfg.num_layers
    name = {"lora": "LoRA", "dora": "DoRA"}[cfg.method]
    title = (f"trainable parameters ({name}{f' on a {cfg.quantize}-bit base' if cfg.quantize else ''}, "
             f"rank {lcfg.rank}, alpha {lcfg.alpha:g}, {layers} of {len(model.layers)} layers):")

    def load(directory: Path) -> None:
        arrays = {from_mlx_lm_name(k): v for k, v in read_adapter_arrays(directory).items()}
        load_arrays_checked(model, arrays, directory)

    return Method(counts, title, lambda d: save_adapter(adapter_arrays(model), lora_adapter_config(lcfg, model),
                                                        model, d), load)


def full_method(cfg: FinetuneConfig, model, tokenizer, **_) -> Method:
    """Every weight trains; a checkpoint is a whole model."""
    from mlx.utils import tree_flatten

    from .lora import target_of

    model.unfreeze()
    counts: dict[str, int] = {}
    for name, v in tree_flatten(model.trainable_parameters()):
        target = target_of(name)
        group = "experts" if target in ("w1", "w2", "w3") else target
        group = group or ("embeddings" if "embed" in name or "lm_head" in name else "norms")
        counts[group] = counts.get(group, 0) + v.size
    return Method(counts, "trainable parameters (full fine-tune):",
                  lambda d: ckpt.write_model(model, tokenizer, d),
                  lambda d: ckpt.load_weights_into(model, ckpt.read_weights(d), d, cfg.dtype))


def esft_method(cfg: FinetuneConfig, model, tokenizer, data: "FinetuneData", resume_from: Path | None,
                log=print, **_) -> Method:
    """ESFT: score the experts on the training data (or read the choice back on resume), train the chosen."""
    import numpy as np
    from tqdm import tqdm

    from .data import FinetuneBatches
    from .esft import (apply_esft, check_threshold, choose_experts, esft_adapter_config, expert_arrays,
                       format_choice, load_expert_arrays, route_data)
    from .lora import read_adapter_arrays, read_adapter_config, save_adapter

    threshold = check_threshold(cfg.esft_score, cfg.esft_threshold)
    if resume_from is not None:
        saved = read_adapter_config(resume_from)["esft"]
        chosen, scores = saved["experts"], np.array(saved["scores"])
        log("ESFT: the experts chosen when this run started:")
    else:
        # Every real token counts when scoring, prompt included: the chosen experts must
        # serve the whole sequence the model reads, not only the answer.
        examples = data.examples["train"][:cfg.esft_examples]
        routing = FinetuneBatches(examples, tokenizer, cfg.batch_size, shuffle=False, mask_prompt=False,
                                  max_seq_len=cfg.seq_len, log=lambda _: None)
        model.eval()
        with tqdm(total=len(routing), desc="routing the training data", unit="batch", leave=False) as bar:
            stats = route_data(model, routing.eval_batches(), progress=bar.update)
        scores = stats.scores(cfg.esft_score)
        chosen = choose_experts(scores, threshold)
        log(f"ESFT: scored experts by {cfg.esft_score} on {stats.tokens:,} tokens of {len(examples):,} training "
            f"examples; chose per layer the fewest whose scores reach {threshold:g}:")
    for line in format_choice(chosen, scores):
        log(line)
    counts = apply_esft(model, chosen)
    config = esft_adapter_config(chosen, cfg.esft_score, threshold, scores)
    return Method(counts, f"trainable parameters (ESFT, {cfg.esft_score} score, threshold {threshold:g}):",
                  lambda d: save_adapter(expert_arrays(model), config, model, d),
                  lambda d: load_expert_arrays(model, read_adapter_arrays(d), d),
                  state={"esft": config["esft"]}, files={"esft_experts.json": json.dumps(config["esft"], indent=1)})


METHOD_SETUP = {"lora": lora_method, "dora": lora_method, "full": full_method, "esft": esft_method}


# ---------------------------------------------------------------------- the run
def finetune(cfg: FinetuneConfig, resume: str | bool | None = None, overwrite: bool = False, reshard: bool = False,
             log=print) -> Path:
    """Fine-tune (or resume); returns out/final: an adapter directory, or a model for --full.

    Everything that can fail on bad input (settings, model, data, targets) is checked
    before the run directory is created. Under `mlx.launch`, data-parallel: process 0
    writes the run.
    """
    import mlx.core as mx

    from .info import flops_per_token
    from .pretrain import peak_flops

    group, log = join_processes(cfg, resume, log)
    rank, world = group.rank(), group.size()
    run_dir = resume_from = None
    if resume:  # the run's own settings win over the defaults
        run_dir, resume_from = prepare_run_dir(cfg, resume, overwrite)
        saved = ckpt.read_trainer_state(resume_from)["config"]
        cfg = dataclasses.replace(FinetuneConfig(**saved), iters=cfg.iters, max_time=cfg.max_time)
    mx.reset_peak_memory()
    model, tokenizer = load_base(cfg, log)
    if cfg.seq_len > model.args.max_position_embeddings:  # the default, for a model of shorter context
        cfg = dataclasses.replace(cfg, seq_len=model.args.max_position_embeddings)
    data = load_data(cfg, tokenizer, log, rank, world)
    if resume_from is not None:
        check_resume_compatible(cfg, model.args, resume_from)

    mx.random.seed(cfg.seed)  # the adapters' initial values
    total = model.num_parameters()
    if cfg.quantize:
        from .quantize import quantize_model

        quantize_model(model, group_size=cfg.group_size, bits=cfg.quantize)
        log(f"quantized the frozen base to {cfg.quantize} bits (group size {cfg.group_size})")
    method = METHOD_SETUP[cfg.method](cfg=cfg, model=model, tokenizer=tokenizer, data=data,
                                      resume_from=resume_from, log=log)
    for line in trainable_report(method.counts, total, method.title):
        log(line)

    if run_dir is None:
        with first_process_first(group):
            run_dir, _ = prepare_run_dir(cfg, None, overwrite, first=rank == 0)
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        for name, text in method.files.items():
            (run_dir / name).write_text(text + "\n")

    trainer = Trainer(model, cfg)
    model.train()

    def run_evaluation(split: str, max_batches: int | None) -> dict[str, float]:
        model.eval()
        nats, tokens = evaluate(model, data.evals[split].eval_batches(max_batches))
        model.train()
        n_bytes, all_tokens = data.target_bytes[split]
        return eval_metrics(nats, tokens, n_bytes * tokens / max(all_tokens, 1))

    fpt = flops_per_token(model.args, cfg.seq_len)
    # A frozen weight needs no weight gradient: forward + input gradient is about 2 forwards.
    step_flops = fpt["train_step"] if cfg.method == "full" else 2 * fpt["forward"]
    task = Task(train_batches=data.train, evaluate=run_evaluation, save_weights=method.save,
                load_weights=method.load, flops_per_token=step_flops, splits_at_end=tuple(data.evals),
                samples=lambda: answer_samples(model, tokenizer, data),
                extra_state={"finetune": {"method": cfg.method, "trainable": method.counts, **method.state}})
    if resume_from is None:
        baseline = run_evaluation("val", None)
        if rank == 0:
            record_baseline(run_dir, baseline, log)
    before, start_step = snapshot(model), trainer.step
    final = fit(trainer, task, run_dir, resume_from, log=log, peak_flops=peak_flops(), reshard=reshard)
    if cfg.method in ADAPTER_METHODS and trainer.step > start_step and resume_from is None:
        check_moved(before, model, trainer.step - start_step, log)
    if rank == 0:
        results = _results(run_dir, cfg, method.counts, total)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"done: {final} ({'a model: load it with --model' if cfg.method == 'full' else 'load it with --adapter'})")
    return final


def record_baseline(run_dir: Path, metrics: dict[str, float], log=print) -> None:
    """The validation loss before any training, as a step-0 evaluation in metrics.jsonl."""
    record = {"kind": "eval", "split": "val", "step": 0, "tokens_seen": 0, **metrics}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log(f"before fine-tuning: val loss {metrics['loss']:.4f}, ppl {metrics['ppl']:.2f}")


def answer_samples(model, tokenizer, data: FinetuneData, n: int = 2) -> list[tuple[str, str]]:
    """Greedy answers to the first few validation prompts: (question, answer) pairs."""
    examples = [e for e in data.examples["val"] if e.answer is not None][:n]
    scored = exact_match(model, tokenizer, examples, progress=False)
    return [(e.prompt_messages()[-1]["content"][-60:], f"{r['answer']!r}, expected {r['expected']!r}")
            for e, r in zip(examples, scored["rows"])]


def _results(run_dir: Path, cfg: FinetuneConfig, counts: dict[str, int], total: int) -> dict[str, Any]:
    """results.json: what trained, how long and in how much memory, and the losses before and after."""
    from .report import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if r.get("kind") == "eval"]
    last = max((r["step"] for r in evals), default=0)
    steps = [r for r in records if r.get("kind") == "train"]

    def losses(step: int) -> dict[str, dict[str, float]]:
        return {r["split"]: {k: r[k] for k in ("loss", "ppl", "bpb")} for r in evals if r["step"] == step}

    return {"method": cfg.method + (f" (QLoRA {cfg.quantize}-bit)" if cfg.quantize else ""),
            "trainable_parameters": sum(counts.values()), "trainable_by_group": counts, "total_parameters": total,
            "steps": steps[-1]["step"] if steps else 0,
            "train_seconds": sum(r["step_time"] for r in steps),  # the optimizer steps alone
            "wall_seconds": steps[-1]["elapsed"] if steps else 0.0,  # evaluations and samples included
            "peak_memory_gb": max((r["peak_memory_gb"] for r in steps), default=0.0),
            "before": losses(0), **losses(last)}
