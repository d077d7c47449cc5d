"""Pretraining from scratch: config -> tokenizer -> data -> model -> the training core.

`resolve_config` layers a preset's `train:` defaults, a YAML file and command-line flags
(later wins); `pretrain` prepares a run directory and hands a `Task` to `train.fit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import checkpoint as ckpt
from .config import ModelArgs, load_preset, model_args_from_dict, read_preset
from .errors import UserError
from .info import flops_per_token
from .model import Model, init_weights
from .train import Task, TrainConfig, Trainer, eval_metrics, evaluate, fit

SAMPLE_PROMPTS = ("Once upon a time", "The little dog", "One day,")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError("no such file", file=path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"not valid YAML: {getattr(e, 'problem', e)}", file=path,
                        line=mark.line + 1 if mark else None) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError("must hold a mapping of settings", file=path)
    return values


def resolve_config(flags: dict[str, Any], yaml_path: str | None = None) -> TrainConfig:
    """Preset defaults < YAML file < flags (flags that were not given are None and ignored)."""
    from_yaml = read_yaml(yaml_path) if yaml_path else {}
    preset = flags.get("preset") or from_yaml.get("preset") or TrainConfig.preset
    defaults = {**read_preset(preset).get("train", {}), "preset": preset}
    return layer_settings(TrainConfig, defaults, from_yaml, yaml_path, flags)


def layer_settings(config_class: type[TrainConfig], defaults: dict[str, Any], from_yaml: dict[str, Any],
                   yaml_path: str | None, flags: dict[str, Any]) -> TrainConfig:
    """defaults < YAML values < flags given (not None), validated; errors name the file or the flag."""
    values = dict(defaults)
    if from_yaml:
        config_class.from_dict(from_yaml, source=str(yaml_path))  # names an unknown key in the file
        values.update(from_yaml)
    values.update({k: v for k, v in flags.items() if v is not None})
    cfg = config_class.from_dict(values, source=str(yaml_path or "flags"))
    return cfg.validate(str(yaml_path) if yaml_path else "flags")


def model_args_for(cfg: TrainConfig, vocab_size: int, tokenizer) -> ModelArgs:
    base = dataclasses.asdict(load_preset(cfg.preset))
    base.update(cfg.model)
    base.update(vocab_size=vocab_size, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                pad_token_id=tokenizer.pad_id)
    base.pop("quantization", None)
    return check_context(cfg, model_args_from_dict(base, source=f"preset {cfg.preset} + model settings"))


def init_model_args(cfg: TrainConfig, directory: Path, tokenizer=None) -> ModelArgs:
    """The config of the model a run starts from (`--init`), checked against the run's tokenizer."""
    config = directory / "config.json"
    args = ModelArgs.from_file(config)
    if args.quantization is not None:
        raise UserError("is a quantized model; training needs float weights", file=config, field="quantization")
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's {args.vocab_size}",
                        file=config, field="vocab_size")
    return check_context(cfg, args)


def check_context(cfg: TrainConfig, args: ModelArgs) -> ModelArgs:
    if cfg.seq_len > args.max_position_embeddings:
        raise UserError(f"{cfg.seq_len} is longer than the model's context "
                        f"(max_position_embeddings={args.max_position_embeddings})", field="--seq-len")
    return args


def prepare_run_dir(cfg: TrainConfig, resume: str | bool | None, overwrite: bool,
                    first: bool = True) -> tuple[Path, Path | None]:
    """The run directory, and the checkpoint to resume from (None for a fresh run).

    Only the `first` process of a data-parallel run checks and clears the directory.
    """
    if resume:
        run_dir = Path(resume if isinstance(resume, str) else (cfg.out or ""))
        if not str(run_dir) or not run_dir.is_dir():
            raise UserError("no such run directory to resume", file=run_dir or "--resume")
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            raise UserError("holds no complete checkpoint to resume from", file=run_dir)
        return run_dir, latest
    run_dir = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    if not first:
        return run_dir, None
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError("already holds files of another run; use --resume to continue it or "
                            "--overwrite to start over", file=run_dir)
        for child in run_dir.iterdir():
            if child.is_dir():
                import shutil

                shutil.rmtree(child)
            else:
                child.unlink()
    ckpt.ensure_writable(run_dir, flag="--out")
    return run_dir, None


def check_resume_compatible(cfg: TrainConfig, args: ModelArgs, checkpoint: Path) -> None:
    saved = ckpt.read_trainer_state(checkpoint)
    saved_model = ModelArgs.from_hf(saved["model"]).to_hf()
    if saved_model != args.to_hf():
        changed = sorted(k for k in set(saved_model) | set(args.to_hf()) if saved_model.get(k) != args.to_hf().get(k))
        raise UserError(f"the model config changed since this run was saved ({', '.join(changed)}); "
                        "resume with the run's own settings", file=checkpoint / ckpt.STATE_FILE, field=changed[0])
    saved_cfg = {**SAVED_BEFORE_SETTING_EXISTED, **saved["config"]}
    for key in ("batch_size", "seq_len", "packing", "grad_accum", "seed"):
        if saved_cfg.get(key) != getattr(cfg, key):
            raise UserError(f"was {saved_cfg.get(key)} in the saved run, now {getattr(cfg, key)}: "
                            "exact resume needs the same data order", file=checkpoint / ckpt.STATE_FILE, field=key)


def join_processes(cfg: TrainConfig, resume, log):
    """The data-parallel group (size 1 when alone), and a `log` that only process 0 writes to."""
    import mlx.core as mx

    group = mx.distributed.init()
    if group.size() > 1:
        if not cfg.out and not isinstance(resume, str):
            raise UserError("a data-parallel run needs an output directory all processes agree on", field="--out")
        if group.rank() != 0:
            log = lambda *_: None  # noqa: E731  (process 0 speaks for the run)
    return group, log


@contextlib.contextmanager
def first_process_first(group):
    """Process 0 runs the block (writing shared files) before the others read what it wrote."""
    import mlx.core as mx

    def barrier():
        mx.eval(mx.distributed.all_sum(mx.array(0.0), group=group))

    if group.size() > 1 and group.rank() != 0:
        barrier()
    yield
    if group.size() > 1 and group.rank() == 0:
        barrier()


class _NoTokenizer:
    bos_id, eos_id, pad_id = None, None, None


@dataclasses.dataclass
class Prepared:
    """A run directory with its settings, tokenizer and tokenized splits, ready to train."""

    cfg: TrainConfig
    run_dir: Path
    resume_from: Path | None
    tokenizer: Any
    args: ModelArgs
    splits: dict[str, Any]
    init_from: Path | None = None  # the saved model a new --init run starts from


# What a run saved before a setting existed ran with: its value then, not today's default.
SAVED_BEFORE_SETTING_EXISTED = {"packing": "stream", "cpu_streams": 1}

# Settings a resumed run may change: how long it goes on, how often it reports, and how
# many CPU streams share a step (the same sum, added up in another order).
RESUMABLE = {"iters", "max_time", "eval_every", "eval_batches", "save_every", "keep", "log_every", "wandb", "out",
             "cpu_streams"}


def resumed_config(cfg: TrainConfig, saved: dict, explicit: dict[str, Any], source: Path) -> TrainConfig:
    """The saved run's settings, with the few that may change taken from `explicit` (what the user set)."""
    saved = {**SAVED_BEFORE_SETTING_EXISTED, **saved}
    for key, value in explicit.items():
        if key not in RESUMABLE and saved.get(key) != value and key in saved:
            raise UserError(f"the run was saved with {key}={saved.get(key)!r}, not {value!r}; a resumed run keeps "
                            "its settings (start a new run to change it)", file=source,
                            field=f"--{key.replace('_', '-')}")
    return dataclasses.replace(TrainConfig(**saved), **{k: getattr(cfg, k) for k in RESUMABLE if k in explicit})


def prepare(cfg: TrainConfig, resume, overwrite: bool, rank: int, log, explicit: dict[str, Any] | None = None,
            init_from: Path | None = None) -> Prepared:
    """`init_from`: `cfg.init` resolved to a directory, where the caller has done so."""
    from .data import load_split, tokenize_split, train_tokenizer_on
    from .tokenizer import load_tokenizer

    if not resume:  # bad data is reported before anything is written
        for split in ("train", "val"):
            load_split(cfg.data, split)
    run_dir, resume_from = prepare_run_dir(cfg, resume, overwrite, first=rank == 0)
    if resume_from is not None:  # the run's own settings win over the defaults
        saved = ckpt.read_trainer_state(resume_from)["config"]
        cfg = resumed_config(cfg, saved, explicit or {}, resume_from / ckpt.STATE_FILE)
    tok_dir = run_dir / "tokenizer"
    init_from = None if resume_from is not None or not cfg.init else init_from or ckpt.resolve(cfg.init)
    # A resumed --init run reads its model from its own checkpoint, not from --init again.
    init_dir = (resume_from or init_from) if cfg.init else None
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
        if tokenizer is None:
            raise UserError("holds no tokenizer.model or tokenizer.json", file=cfg.tokenizer, field="--tokenizer")
    elif (tokenizer := load_tokenizer(tok_dir)) is not None:
        log(f"tokenizer: reusing {tok_dir}")
    elif init_dir is not None:  # the model's own tokenizer, kept with the run
        tokenizer = load_tokenizer(init_dir)
        if tokenizer is None:
            raise UserError("holds no tokenizer.model or tokenizer.json; name one with --tokenizer",
                            file=init_dir, field="--init")
        if rank == 0:
            tok_dir.mkdir(exist_ok=True)
            tokenizer.save(tok_dir)
    else:
        vocab = cfg.vocab_size or load_preset(cfg.preset).vocab_size
        tokenizer = train_tokenizer_on(cfg.data, vocab, tok_dir, log=log)
    if init_dir is not None:
        args = init_model_args(cfg, init_dir, tokenizer)
    else:
        args = model_args_for(cfg, tokenizer.vocab_size, tokenizer)
    if resume_from is not None:
        check_resume_compatible(cfg, args, resume_from)
    if rank == 0:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    splits = {s: tokenize_split(cfg.data, s, tokenizer, log=log) for s in ("train", "val")}
    try:
        splits["test"] = tokenize_split(cfg.data, "test", tokenizer, log=log)
    except UserError:
        log("no test split: evaluating on val only")
    return Prepared(cfg, run_dir, resume_from, tokenizer, args, splits, init_from)


def pretrain(cfg: TrainConfig, resume: str | bool | None = None, overwrite: bool = False, reshard: bool = False,
             log=print, explicit: dict[str, Any] | None = None) -> Path:
    """Pretrain from scratch (or resume); under `mlx.launch`, data-parallel. Returns out/final.

    `explicit`: the settings the user gave (flags and YAML); on resume only a few may change.
    """
    from .data import PackedBatches, eval_batches, num_targets

    group, log = join_processes(cfg, resume, log)
    rank, world = group.rank(), group.size()
    init_from = None
    if not resume:  # catch an impossible --seq-len, --init or head before anything is written
        if cfg.init:
            init_from = ckpt.resolve(cfg.init)
            init_model_args(cfg, init_from)
        else:
            args = model_args_for(cfg, load_preset(cfg.preset).vocab_size, _NoTokenizer())
            if cfg.fixed_head_std is not None and args.tie_word_embeddings:
                raise UserError("needs an output head of its own, not one tied to the embedding",
                                field="--fixed-head-std")
    with first_process_first(group):
        run = prepare(cfg, resume, overwrite, rank, log, explicit, init_from)
    cfg, splits, tokenizer = run.cfg, run.splits, run.tokenizer

    starts = {s: split_documents(cfg, data, tokenizer) for s, data in splits.items()}
    batches = PackedBatches(splits["train"].tokens, cfg.batch_size * world, cfg.seq_len, seed=cfg.seed,
                            doc_starts=starts["train"])
    log(describe_packing(batches, starts["train"]))
    if world > 1:
        log(f"data parallel: {world} processes x batch {cfg.batch_size} = global batch {cfg.batch_size * world}")
        batches = batches.shard(rank, world)

    model = init_weights(Model(run.args), seed=cfg.seed, qk_std=cfg.init_qk_std, head_std=cfg.fixed_head_std)
    if cfg.fixed_head_std is not None:
        model.lm_head.freeze()  # the trainer trains what is trainable; checkpoints keep the head
    if run.init_from is not None:  # a resumed run loads its checkpoint instead
        ckpt.load_weights_into(model, ckpt.read_weights(run.init_from), run.init_from)
    trainer = Trainer(model, cfg)
    source = f" from {cfg.init}" if cfg.init else ""
    log(f"model: {model.num_parameters():,} parameters{source}; training {cfg.iters} steps of "
        f"{cfg.batch_size * cfg.grad_accum * world} x {cfg.seq_len} tokens (global) in {cfg.dtype}")

    def run_evaluation(split: str, max_batches: int | None) -> dict[str, float]:
        data = splits[split]
        nats, tokens = evaluate(model, eval_batches(data.tokens, cfg.batch_size, cfg.seq_len, max_batches,
                                                    doc_starts=starts[split]))
        covered = data.n_bytes * tokens / max(num_targets(len(data.tokens), starts[split]), 1)  # bytes evaluated
        return eval_metrics(nats, tokens, covered)

    def load_weights(directory: Path) -> None:
        ckpt.load_weights_into(model, ckpt.read_weights(directory), directory)

    task = Task(train_batches=batches, evaluate=run_evaluation,
                save_weights=lambda d: ckpt.write_model(model, tokenizer, d),
                load_weights=load_weights, flops_per_token=flops_per_token(run.args, cfg.seq_len)["train_step"],
                splits_at_end=tuple(s for s in ("val", "test") if s in splits),
                samples=lambda: greedy_samples(model, tokenizer))
    final = fit(trainer, task, run.run_dir, run.resume_from, log=log, peak_flops=peak_flops(), reshard=reshard)
    if rank == 0:
        summary = {e["split"]: {k: e[k] for k in ("loss", "ppl", "bpb")} for e in _final_evals(run.run_dir)}
        (run.run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {final}")
    return final


def split_documents(cfg: TrainConfig, split, tokenizer):
    """Where the split's documents start, for document packing; None for stream packing."""
    from .data import document_starts

    if cfg.packing == "stream":
        return None
    return document_starts(split.tokens, tokenizer.bos_id, tokenizer.eos_id)


def describe_packing(batches, doc_starts) -> str:
    line = (f"data: {len(batches.tokens):,} training tokens = {batches.num_windows:,} windows of "
            f"{batches.seq_len}, {batches.packing} packing")
    if doc_starts is None:
        return line
    lengths = np.diff(np.append(doc_starts, len(batches.tokens)))
    longer = int((lengths > batches.seq_len + 1).sum())
    line += f" ({len(doc_starts):,} documents, {100 * batches.padding:.0f}% padding)"
    if longer:
        line += (f"; {longer:,} of them ({100 * longer / len(lengths):.0f}%) go on past one window: "
                 f"--seq-len {int(lengths.max()) - 1} would keep every document whole")
    return line


def _final_evals(run_dir: Path) -> list[dict]:
    from .report import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    last_step = max((r["step"] for r in records), default=0)
    return [r for r in records if r["step"] == last_step]


def greedy_samples(model, tokenizer, max_tokens: int = 24) -> list[tuple[str, str]]:
    from .generate import generate

    return [(p, generate(model, tokenizer, p, mode="greedy", max_tokens=max_tokens).text) for p in SAMPLE_PROMPTS]


def peak_flops() -> float:
    """The FLOP/s an MFU is measured against: the measured float32 matmul rate on a CPU.

    On a GPU set MIXTRAL_MLX_PEAK_TFLOPS (e.g. 989 for an H100's dense bf16).
    """
    import os

    import mlx.core as mx

    if os.environ.get("MIXTRAL_MLX_PEAK_TFLOPS"):
        return float(os.environ["MIXTRAL_MLX_PEAK_TFLOPS"]) * 1e12
    from .info import matmul_gflops

    return matmul_gflops(1024, 10) * 1e9 if mx.default_device() == mx.cpu else 0.0
