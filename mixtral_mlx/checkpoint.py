"""Checkpoints in the Hugging Face format: config.json, model.safetensors, tokenizer.model.

transformers stores each expert's projections separately
(`model.layers.N.block_sparse_moe.experts.E.w1.weight`); we stack a layer's experts
into one (E, out, in) tensor per projection and split them again on save. mlx-lm's
layout (`...block_sparse_moe.switch_mlp.gate_proj.weight`) is read as well.

Writes are atomic: everything goes into a temporary sibling directory, is fsynced, and
is renamed into place, so a crash leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelArgs
from .errors import UserError
from .model import Model
from .tokenizer import Tokenizer, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.(weight|scales|biases)$")
_MLX_LM_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# ---------------------------------------------------------------------- atomic writes
def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary directory that replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_writable(directory: Path, flag: str | None = None) -> None:
    """Create `directory` and prove it takes a file, or say which flag names an unwritable place."""
    probe = Path(directory) / f".write-test-{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write there ({e.strerror or e})", file=directory, field=flag) from None


# ---------------------------------------------------------------------- name mapping
def to_hf_weights(model: Model) -> dict[str, mx.array]:
    """Our parameters under transformers' names, one tensor per expert."""
    out = {}
    for name, value in tree_flatten(model.parameters()):
        m = re.match(r"^(.*\.experts)\.(w[123])\.(weight|scales|biases)$", name)
        if m:
            for e in range(value.shape[0]):
                out[f"{m[1]}.{e}.{m[2]}.{m[3]}"] = value[e]
        else:
            out[name] = value
    return out


def from_hf_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """transformers' (or mlx-lm's) names -> ours, stacking each layer's experts."""
    out, experts = {}, {}
    for name, value in weights.items():
        m = _EXPERT_KEY.match(name)
        if m:
            experts.setdefault((m[1], m[3], m[4]), {})[int(m[2])] = value
            continue
        m = re.match(r"^(.*\.block_sparse_moe)\.switch_mlp\.(\w+)\.(weight|scales|biases)$", name)
        if m and m[2] in _MLX_LM_NAMES:
            out[f"{m[1]}.experts.{_MLX_LM_NAMES[m[2]]}.{m[3]}"] = value
            continue
        out[name] = value
    for (prefix, proj, kind), per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))
            raise UserError(f"experts {missing} are missing", field=f"{prefix}.<e>.{proj}.{kind}")
        out[f"{prefix}.{proj}.{kind}"] = mx.stack([per_expert[e] for e in ids])
    return out


# ---------------------------------------------------------------------- save
def write_model(model: Model, tokenizer: Tokenizer | None, directory: str | Path, dtype: str | None = None) -> None:
    """Write config.json, model.safetensors and tokenizer.model into an existing directory.

    `dtype` casts floating weights ("float32", "float16", "bfloat16") on the way out.
    """
    directory = Path(directory)
    weights = to_hf_weights(model)
    if dtype is not None:
        weights = {k: v.astype(_DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    config = model.args.to_hf()
    config["torch_dtype"] = dtype or str(model.model.embed_tokens.weight.dtype).replace("mlx.core.", "")
    mx.save_safetensors(str(directory / WEIGHTS_FILE), weights, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)


def save(model: Model, tokenizer: Tokenizer | None, directory: str | Path, dtype: str | None = None) -> Path:
    """Write a Hugging Face-format checkpoint atomically; returns its path."""
    with atomic_directory(directory) as tmp:
        write_model(model, tokenizer, tmp, dtype)
    return Path(directory)


# ---------------------------------------------------------------------- load
def resolve(path_or_repo: str | Path) -> Path:
    """A local model directory, or a Hugging Face repo id downloaded (once) into the HF cache."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists():
        raise UserError("is a file, not a model directory", file=path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
        return download(name)
    raise UserError("no such model directory", file=path)


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.model",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise UserError(f"could not download from the Hugging Face Hub: {type(e).__name__}: {e}".splitlines()[0],
                        file=repo_id) from None


def weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UserError(f"not a valid safetensors index ({e})", file=index) from None
        return [directory / s for s in shards]
    if (directory / WEIGHTS_FILE).exists():
        return [directory / WEIGHTS_FILE]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"no {WEIGHTS_FILE} (nor shards with an index)", file=directory)
    return files


def read_weights(directory: Path) -> dict[str, mx.array]:
    weights = {}
    for f in weight_files(directory):
        if not f.exists():
            raise UserError("weight shard listed in the index is missing", file=f)
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:
            raise UserError(f"corrupt or truncated safetensors file ({e})".splitlines()[0], file=f) from None
    return weights


def load_weights_into(model: Model, weights: dict[str, mx.array], source: str | Path,
                      dtype: str | None = None) -> None:
    """Check names and shapes against the model, then load; errors name the tensor."""
    weights = from_hf_weights(weights)
    if model.args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    expected = dict(tree_flatten(model.parameters()))
    for name, param in expected.items():
        if name not in weights:
            raise UserError("tensor is missing from the checkpoint", file=source, field=_hf_name(name))
        if weights[name].shape != param.shape:
            raise UserError(f"shape {tuple(weights[name].shape)} does not match the config's {tuple(param.shape)}",
                            file=source, field=_hf_name(name))
    for name, value in weights.items():
        if mx.issubdtype(value.dtype, mx.floating) and not mx.isfinite(value).all().item():
            raise UserError("tensor holds NaN or infinite values", file=source, field=_hf_name(name))
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise UserError("unexpected tensor (does config.json match these weights?)", file=source, field=unexpected[0])
    target = _DTYPES[dtype] if dtype else None
    model.load_weights([(k, v.astype(target) if target is not None and mx.issubdtype(v.dtype, mx.floating) else v)
                        for k, v in weights.items()])
    mx.eval(model.parameters())


def _hf_name(name: str) -> str:
    m = re.match(r"^(.*\.experts)\.(w[123])\.(\w+)$", name)
    return f"{m[1]}.<e>.{m[2]}.{m[3]}" if m else name


def load_model(path_or_repo: str | Path, dtype: str | None = None) -> Model:
    directory = resolve(path_or_repo)
    args = ModelArgs.from_file(directory / "config.json")
    model = Model(args)
    if args.quantization is not None:
        from .quantize import quantize_model  # quantized checkpoints carry scales/biases

        quantize_model(model, **args.quantization)
    load_weights_into(model, read_weights(directory), directory, dtype)
    model.eval()
    return model


def load(path_or_repo: str | Path, dtype: str | None = None) -> tuple[Model, Tokenizer | None]:
    """Load a Hugging Face-format Mixtral directory (or Hub repo): (model, tokenizer or None)."""
    directory = resolve(path_or_repo)
    return load_model(directory, dtype), load_tokenizer(directory)


# ---------------------------------------------------------------------- training checkpoints
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MASTER_FILE = "master.safetensors"
LATEST = "latest"


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:06d}"


def write_pointer(run_dir: Path, name: str) -> None:
    """Point `run_dir/latest` at a checkpoint, atomically."""
    tmp = Path(run_dir) / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, Path(run_dir) / LATEST)
    fsync_dir(Path(run_dir))


def is_complete(directory: Path) -> bool:
    return (directory / STATE_FILE).is_file() and (directory / OPTIMIZER_FILE).is_file()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: `latest` if it is sound, else the highest step."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        candidate = run_dir / pointer.read_text().strip()
        if candidate.name and is_complete(candidate):
            return candidate
    steps = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and is_complete(p))
    return steps[-1] if steps else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints; drop leftovers of interrupted writes."""
    steps = sorted(p for p in Path(run_dir).glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in Path(run_dir).glob(".step-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def read_trainer_state(directory: Path) -> dict:
    path = Path(directory) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"unreadable trainer state ({e})", file=path) from None
