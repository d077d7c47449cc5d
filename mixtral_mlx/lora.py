"""LoRA and DoRA adapters for every linear layer of a Mixtral, the experts included.

A target names a layer inside each decoder layer: the attention projections
(`q_proj`, `k_proj`, `v_proj`, `o_proj`), the router (`gate`) and the experts' SwiGLU
projections (`w1`, `w2`, `w3`). Linear layers get `LoRALinear` (or `DoRALinear`): the
frozen base plus `scale * (x @ lora_a) @ lora_b`, with `scale = alpha / rank`. The
experts of a layer are one stacked (E, out, in) weight, so their adapter is one
vectorised layer too, `LoRAExpertLinear`, with per-expert `lora_a` (E, r, in) and
`lora_b` (E, out, r): it has the three methods the MoE block calls on `ExpertLinear`
(`gather`, `all_experts`, `combine`), so both dispatches run unchanged and no Python loop
visits the experts. `lora_b` starts at zero: a fresh adapter changes nothing.

The base may be quantized (QLoRA): adapters wrap `QuantizedLinear` / `QuantizedExpertLinear`
the same way and train in float on top.

On disk an adapter is `adapters.safetensors` + `adapter_config.json` in mlx-lm's layout
(`fine_tune_type`, `num_layers`, `lora_parameters: {rank, scale, dropout, keys}`, and
the experts under mlx-lm's `switch_mlp.{gate,up,down}_proj` names), so mlx-lm loads
LoRA adapters, experts included, and DoRA adapters of linear layers. The config also
records the base model's config.json, which `load_adapter` checks.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import ModelArgs
from .errors import UserError
from .esft import ExpertSubset, apply_esft_adapter
from .moe import ExpertLinear, expert_matmul
from .quantize import QuantizedExpertLinear, QuantizedLinear, quantize_model

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# target -> (module path inside a decoder layer, the same in mlx-lm's Mixtral)
TARGETS = {
    "q_proj": ("self_attn.q_proj", "self_attn.q_proj"),
    "k_proj": ("self_attn.k_proj", "self_attn.k_proj"),
    "v_proj": ("self_attn.v_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj", "self_attn.o_proj"),
    "gate": ("block_sparse_moe.gate", "block_sparse_moe.gate"),
    "w1": ("block_sparse_moe.experts.w1", "block_sparse_moe.switch_mlp.gate_proj"),
    "w2": ("block_sparse_moe.experts.w2", "block_sparse_moe.switch_mlp.down_proj"),
    "w3": ("block_sparse_moe.experts.w3", "block_sparse_moe.switch_mlp.up_proj"),
}
DEFAULT_TARGETS = ("q_proj", "v_proj", "gate")
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
# config.json fields that do not change what a model computes; an adapter may differ in them
TRAINING_ONLY = {"router_aux_loss_coef", "router_jitter_noise", "initializer_range", "quantization"}


# ---------------------------------------------------------------------- settings
@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    num_layers: int | None = None  # adapt the last N decoder layers; None: all
    dora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, num_hidden_layers: int | None = None) -> "LoRAConfig":
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise UserError(f"must be a positive integer, got {self.rank!r}", field="--rank")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise UserError(f"must be a positive number, got {self.alpha!r}", field="--alpha")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"must be in [0, 1), got {self.dropout!r}", field="--dropout")
        if not self.targets:
            raise UserError("names no layer to adapt", field="--targets")
        if len(set(self.targets)) != len(self.targets):
            raise UserError(f"names a layer twice: {','.join(self.targets)}", field="--targets")
        for t in self.targets:
            if t not in TARGETS:
                raise UserError(f"unknown target {t!r} (choose from {', '.join(TARGETS)})", field="--targets")
        if self.num_layers is not None:
            if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers <= 0:
                raise UserError(f"must be a positive integer or 'all', got {self.num_layers!r}", field="--num-layers")
            if num_hidden_layers is not None and self.num_layers > num_hidden_layers:
                raise UserError(f"{self.num_layers} is more than the model's {num_hidden_layers} layers",
                                field="--num-layers")
        return self


# ---------------------------------------------------------------------- helpers
def is_quantized_layer(layer: nn.Module) -> bool:
    return "scales" in layer


def dense_weight(layer: nn.Module) -> mx.array:
    """A linear or expert layer's weight in float, dequantized if it is quantized."""
    if is_quantized_layer(layer):
        return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits,
                             mode=getattr(layer, "mode", "affine"))
    return layer["weight"]


def _dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear or expert layer, quantized or not."""
    out, packed = layer["weight"].shape[-2:]
    return out, packed * 32 // layer.bits if is_quantized_layer(layer) else packed


def _init_a(shape: tuple[int, ...], in_dims: int) -> mx.array:
    bound = 1 / math.sqrt(in_dims)
    return mx.random.uniform(-bound, bound, shape)


# ---------------------------------------------------------------------- linear layers
class LoRALinear(nn.Module):
    """linear(x) + scale * (dropout(x) @ lora_a) @ lora_b, with lora_a (in, r), lora_b (r, out)."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = _dims(linear)
        linear.freeze()
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.lora_a = _init_a((in_dims, rank), in_dims)
        self.lora_b = mx.zeros((rank, out_dims))

    def lora(self, x: mx.array) -> mx.array:
        return (self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x) + self.lora(x)

    def delta(self) -> mx.array:
        """The (out, in) update this adapter adds to the weight."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def fused_weight(self) -> mx.array:
        w = dense_weight(self.linear)
        return (w.astype(mx.float32) + self.delta()).astype(w.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        out_dims, in_dims = _dims(self.linear)
        fused = nn.Linear(in_dims, out_dims, bias="bias" in self.linear)
        fused.weight = self.fused_weight()
        if "bias" in self.linear:
            fused.bias = self.linear.bias
        if is_quantized_layer(self.linear) and not dequantize:
            return QuantizedLinear.from_linear(fused, self.linear.group_size, self.linear.bits,
                                               mode=getattr(self.linear, "mode", "affine"))
        return fused


class DoRALinear(LoRALinear):
    """DoRA: the LoRA-updated weight's rows rescaled to a learned magnitude `m` (out,).

    y = m / ||W + scale * B^T A^T||_row * (W x + scale * B^T A^T x); the norm is treated
    as a constant in the backward pass, as in the DoRA paper and mlx-lm.
    """

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = mx.linalg.norm(dense_weight(linear).astype(mx.float32), axis=1)

    def _magnitude(self, w: mx.array) -> mx.array:
        adapted = w.astype(mx.float32) + self.delta()
        return self.m / mx.stop_gradient(mx.linalg.norm(adapted, axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        w = dense_weight(self.linear)
        y = (x @ w.T + self.lora(x)) * self._magnitude(w).astype(x.dtype)
        return y + self.linear.bias if "bias" in self.linear else y

    def fused_weight(self) -> mx.array:
        w = dense_weight(self.linear)
        adapted = w.astype(mx.float32) + self.delta()
        return (adapted * (self.m / mx.linalg.norm(adapted, axis=1))[:, None]).astype(w.dtype)


# ---------------------------------------------------------------------- experts
class LoRAExpertLinear(nn.Module):
    """A LoRA per expert over stacked (E, out, in) expert weights, computed for all at once.

    lora_a is (E, r, in) and lora_b (E, out, r), as mlx-lm's LoRASwitchLinear stores them.
    """

    def __init__(self, experts: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        E = experts["weight"].shape[0]
        out_dims, in_dims = _dims(experts)
        experts.freeze()
        self.linear = experts
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        self.lora_a = _init_a((E, rank, in_dims), in_dims)
        self.lora_b = mx.zeros((E, out_dims, rank))

    @property
    def num_experts(self) -> int:
        return self.lora_a.shape[0]

    def gather(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """Row i of x through expert indices[i] (see ExpertLinear.gather)."""
        z = expert_matmul(self.dropout(x), self.lora_a, indices, sorted_indices)
        z = expert_matmul(z, self.lora_b, indices, sorted_indices)
        return self.linear.gather(x, indices, sorted_indices) + (self.scale * z).astype(x.dtype)

    def _lora_all(self, x: mx.array) -> mx.array:
        """(T, in) -> (T, E, out): every expert's low-rank path on every row."""
        E, r, inp = self.lora_a.shape
        xa = (self.dropout(x) @ self.lora_a.reshape(E * r, inp).T).reshape(-1, E, r)  # one matmul for all A
        z = xa.transpose(1, 0, 2) @ self.lora_b.swapaxes(1, 2)  # (E, T, out): one batched matmul for all B
        return (self.scale * z.transpose(1, 0, 2)).astype(x.dtype)

    def all_experts(self, x: mx.array) -> mx.array:
        return self.linear.all_experts(x) + self._lora_all(x)

    def _lora_combine(self, h: mx.array, gates: mx.array) -> mx.array:
        """sum_e gates[:, e] * scale * B_e A_e h[:, e]: (T, E, in), (T, E) -> (T, out)."""
        E, r, _ = self.lora_a.shape
        weighted = (self.dropout(h) * gates[..., None]).transpose(1, 0, 2)  # (E, T, in)
        u = (weighted @ self.lora_a.swapaxes(1, 2)).transpose(1, 0, 2).reshape(h.shape[0], E * r)
        z = u @ self.lora_b.swapaxes(1, 2).reshape(E * r, -1)  # the sum over experts is this matmul's
        return (self.scale * z).astype(h.dtype)

    def combine(self, h: mx.array, gates: mx.array) -> mx.array:
        return self.linear.combine(h, gates) + self._lora_combine(h, gates)

    def delta(self) -> mx.array:
        """The (E, out, in) update this adapter adds to the experts' weights."""
        return self.scale * (self.lora_b @ self.lora_a)

    def fused_weight(self) -> mx.array:
        w = dense_weight(self.linear)
        return (w.astype(mx.float32) + self.delta()).astype(w.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        E, (out_dims, in_dims) = self.num_experts, _dims(self.linear)
        fused = ExpertLinear(E, in_dims, out_dims)
        fused.weight = self.fused_weight()
        if is_quantized_layer(self.linear) and not dequantize:
            return QuantizedExpertLinear.from_float(fused, self.linear.group_size, self.linear.bits,
                                                    mode=getattr(self.linear, "mode", "affine"))
        return fused


class DoRAExpertLinear(LoRAExpertLinear):
    """DoRA per expert: each expert's adapted rows rescaled to a learned magnitude m (E, out)."""

    def __init__(self, experts: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(experts, rank, scale, dropout)
        self.m = mx.linalg.norm(dense_weight(experts).astype(mx.float32), axis=-1)

    def _magnitude(self, w: mx.array) -> mx.array:
        adapted = w.astype(mx.float32) + self.delta()
        return self.m / mx.stop_gradient(mx.linalg.norm(adapted, axis=-1))  # (E, out)

    def gather(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        f = self._magnitude(dense_weight(self.linear)).astype(x.dtype)
        return super().gather(x, indices, sorted_indices) * mx.expand_dims(f[indices], -2)

    def all_experts(self, x: mx.array) -> mx.array:
        return super().all_experts(x) * self._magnitude(dense_weight(self.linear)).astype(x.dtype)

    def combine(self, h: mx.array, gates: mx.array) -> mx.array:
        # The magnitude scales each expert's output rows, so the experts cannot share one
        # matmul as in LoRA; it folds into the weights instead: f*(W + sBA) = fW + s(fB)A.
        w = dense_weight(self.linear)
        f = self._magnitude(w)
        E, out, inp = w.shape
        weighted = (h * gates[..., None]).reshape(h.shape[0], E * inp)
        y = weighted @ (f[..., None] * w).astype(h.dtype).swapaxes(1, 2).reshape(E * inp, out)
        d = (self.dropout(h) * gates[..., None]).transpose(1, 0, 2)  # (E, T, in)
        u = (d @ self.lora_a.swapaxes(1, 2)).transpose(1, 0, 2).reshape(h.shape[0], -1)
        b = (self.scale * f[..., None] * self.lora_b).swapaxes(1, 2).reshape(-1, out)
        return y + (u @ b).astype(h.dtype)

    def fused_weight(self) -> mx.array:
        w = dense_weight(self.linear)
        adapted = w.astype(mx.float32) + self.delta()
        return (adapted * (self.m / mx.linalg.norm(adapted, axis=-1))[..., None]).astype(w.dtype)


ADAPTER_TYPES = (LoRALinear, LoRAExpertLinear)


def _adapter_class(base: nn.Module, dora: bool) -> type:
    if isinstance(base, ADAPTER_TYPES):
        raise UserError("this layer already has an adapter", field="--targets")
    if base["weight"].ndim == 3:
        return DoRAExpertLinear if dora else LoRAExpertLinear
    return DoRALinear if dora else LoRALinear


# ---------------------------------------------------------------------- a model
def adapted_layers(model, num_layers: int | None) -> list[tuple[int, nn.Module]]:
    """(index, layer) of the decoder layers an adapter covers: the last `num_layers` (mlx-lm's rule)."""
    n = len(model.layers) if num_layers is None else num_layers
    return list(enumerate(model.layers))[len(model.layers) - n:]


def apply_lora(model, cfg: LoRAConfig) -> dict[str, int]:
    """Freeze the model and add adapters to the targets; returns trainable parameters per target.

    Raises UserError when a requested target ends up with no trainable parameter, so a
    configuration that would silently train nothing stops here.
    """
    cfg.validate(len(model.layers))
    model.freeze()
    for _, layer in adapted_layers(model, cfg.num_layers):
        wrapped = []
        for target in cfg.targets:
            path = TARGETS[target][0]
            base = _module_at(layer, path)
            wrapped.append((path, _adapter_class(base, cfg.dora)(base, cfg.rank, cfg.scale, cfg.dropout)))
        layer.update_modules(tree_unflatten(wrapped))
    counts = trainable_by_target(model)
    for target in cfg.targets:
        if counts.get(target, 0) == 0:
            raise UserError("has no trainable parameter in this model", field=f"--targets {target}")
    return counts


def _module_at(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[part]
    return module


def target_of(name: str) -> str | None:
    """The target a parameter name belongs to (`...self_attn.q_proj.lora_a` -> q_proj)."""
    for target, (path, _) in TARGETS.items():
        if f".{path}." in f".{name}":
            return target
    return None


def trainable_by_target(model) -> dict[str, int]:
    """Trainable parameters grouped by target (`other` for anything outside the targets)."""
    counts: dict[str, int] = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        group = target_of(name) or "other"
        counts[group] = counts.get(group, 0) + value.size
    return counts


def adapter_modules(model) -> list[tuple[str, nn.Module]]:
    """Every layer an adapter changed: LoRA/DoRA wrappers and ESFT's partly trained experts."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (*ADAPTER_TYPES, ExpertSubset))]


def fuse_model(model, dequantize: bool = False):
    """Fold every adapter into its base layer (in place); with `dequantize` every weight ends in float."""
    fused = [(name, m.fuse(dequantize)) for name, m in adapter_modules(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    model.unfreeze()
    return model


def dequantize_model(model):
    """Replace every quantized layer by its float version (the weights dequantized)."""
    def convert(module: nn.Module) -> nn.Module:
        if not is_quantized_layer(module):
            return module
        w = dense_weight(module)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*w.shape)
        elif w.ndim == 3:
            layer = ExpertLinear(w.shape[0], w.shape[2], w.shape[1])
        else:
            layer = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        layer.weight = w
        return layer

    leaves = [(name, convert(m)) for name, m in model.named_modules() if is_quantized_layer(m)]
    if leaves:
        model.update_modules(tree_unflatten(leaves))
    if getattr(model, "args", None) is not None:
        model.args.quantization = None
    return model


# ---------------------------------------------------------------------- files
def to_mlx_lm_name(name: str) -> str:
    for ours, theirs in TARGETS.values():
        name = name.replace(f".{ours}.", f".{theirs}.")
    return name


def from_mlx_lm_name(name: str) -> str:
    for ours, theirs in TARGETS.values():
        name = name.replace(f".{theirs}.", f".{ours}.")
    return name


def adapter_arrays(model) -> dict[str, mx.array]:
    """The adapter's own parameters, under mlx-lm's names."""
    return {to_mlx_lm_name(name): value for name, value in tree_flatten(model.parameters())
            if name.rsplit(".", 1)[-1] in ADAPTER_LEAVES and target_of(name) is not None}


def lora_adapter_config(cfg: LoRAConfig, model) -> dict[str, Any]:
    """adapter_config.json for a LoRA/DoRA adapter: mlx-lm's keys plus ours."""
    return {
        "fine_tune_type": "dora" if cfg.dora else "lora",
        "num_layers": cfg.num_layers or len(model.layers),
        "lora_parameters": {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout,
                            "keys": [TARGETS[t][1] for t in cfg.targets]},
        "targets": list(cfg.targets),
        "alpha": cfg.alpha,
    }


def save_adapter(arrays: dict[str, mx.array], config: dict[str, Any], model, directory: str | Path) -> None:
    """Write adapters.safetensors and adapter_config.json (with the base config) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = model.args.to_hf()
    base.pop("quantization", None)
    full = {**config, "base_model": base, "quantization": model.args.quantization}
    mx.save_safetensors(str(directory / ADAPTER_FILE), arrays, metadata={"format": "mlx"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(full, indent=2) + "\n")


def adapter_dir(path: str | Path) -> Path:
    """An adapter directory: `path` itself, or the `final` checkpoint of a fine-tuning run."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    if not path.exists():
        raise UserError("no such adapter directory", file=path, field="--adapter")
    raise UserError(f"holds no {ADAPTER_CONFIG} (nor does {path / 'final'})", file=path, field="--adapter")


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON: {e.msg} (column {e.colno})", file=path, line=e.lineno) from None
    if not isinstance(config, dict):
        raise UserError("must hold a JSON object", file=path)
    return config


def check_base(config: dict[str, Any], model, source: Path) -> None:
    """The adapter's recorded base config must equal the model's (quantization aside)."""
    recorded = config.get("base_model")
    if recorded is None:  # adapters written by mlx-lm do not record it: the shapes are checked instead
        return
    theirs = ModelArgs.from_hf(recorded, source=source).to_hf()
    ours = model.args.to_hf()
    for key in sorted((set(theirs) | set(ours)) - TRAINING_ONLY):
        if theirs.get(key) != ours.get(key):
            raise UserError(f"the adapter was made for another base model ({key} {theirs.get(key)!r} there, "
                            f"{ours.get(key)!r} in this model)", file=source, field=f"base_model.{key}")


def lora_config_from(config: dict[str, Any], source: Path) -> LoRAConfig:
    """The LoRAConfig an adapter_config.json describes (ours or mlx-lm's)."""
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise UserError("missing or not an object", file=source, field="lora_parameters")
    by_key = {theirs: t for t, (_, theirs) in TARGETS.items()}
    keys = params.get("keys") or [TARGETS[t][1] for t in DEFAULT_TARGETS]
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise UserError(f"unknown layer {unknown[0]!r} (known: {', '.join(by_key)})", file=source,
                        field="lora_parameters.keys")
    try:
        rank, scale = int(params["rank"]), float(params["scale"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"needs numeric rank and scale ({e})", file=source, field="lora_parameters") from None
    num_layers = config.get("num_layers")
    cfg = LoRAConfig(rank=rank, alpha=scale * rank, dropout=float(params.get("dropout", 0.0)),
                     targets=tuple(by_key[k] for k in keys), num_layers=num_layers,
                     dora=config.get("fine_tune_type") == "dora")
    try:
        return cfg.validate()
    except UserError as e:
        raise UserError(e.detail, file=source, field="lora_parameters") from None


def load_arrays_checked(model, arrays: dict[str, mx.array], source: Path,
                        leaf_names: Sequence[str] = ADAPTER_LEAVES) -> None:
    """Load adapter tensors after checking that names and shapes match the adapted model exactly."""
    expected = {name: v for name, v in tree_flatten(model.parameters()) if name.rsplit(".", 1)[-1] in leaf_names}
    for name, value in expected.items():
        if name not in arrays:
            raise UserError("tensor is missing from the adapter", file=source, field=to_mlx_lm_name(name))
        if arrays[name].shape != value.shape:
            raise UserError(f"shape {tuple(arrays[name].shape)} does not match this model's {tuple(value.shape)} "
                            "(an adapter for another base model?)", file=source, field=to_mlx_lm_name(name))
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        raise UserError("not an adapter tensor of this model", file=source, field=to_mlx_lm_name(unexpected[0]))
    model.load_weights([(k, v.astype(expected[k].dtype)) for k, v in arrays.items()], strict=False)
    mx.eval(model.parameters())


def read_adapter_arrays(directory: Path) -> dict[str, mx.array]:
    path = directory / ADAPTER_FILE
    if not path.is_file():
        raise UserError("no such file", file=path)
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"corrupt or truncated safetensors file ({e})".splitlines()[0], file=path) from None


def prepare_base(model, config: dict[str, Any], source: Path) -> None:
    """Check the base, and quantize it as it was during training when the adapter is a QLoRA one."""
    check_base(config, model, source)
    wanted = config.get("quantization")
    have = model.args.quantization
    if wanted and not have:
        quantize_model(model, **wanted)
    elif wanted and have and any(have.get(k) != v for k, v in wanted.items()):
        raise UserError(f"the adapter was trained on a base quantized with {wanted}, this model has {have}",
                        file=source, field="quantization")


def load_adapter(model, path: str | Path):
    """Add the adapter in `path` (an adapter directory or a fine-tuning run) to `model`, in place.

    LoRA and DoRA adapters wrap their layers; expert-specialised (ESFT) adapters put the
    trained experts into their layers. A QLoRA adapter quantizes a float base first, as
    it was during training. Raises UserError if the adapter was made for another base.
    """
    directory = adapter_dir(path)
    source = directory / ADAPTER_CONFIG
    config = read_adapter_config(directory)
    kind = config.get("fine_tune_type", "lora")
    prepare_base(model, config, source)
    arrays = {from_mlx_lm_name(k): v for k, v in read_adapter_arrays(directory).items()}
    if kind in ("lora", "dora"):
        cfg = lora_config_from(config, source)
        if cfg.num_layers is not None and cfg.num_layers > len(model.layers):
            raise UserError(f"{cfg.num_layers} adapted layers, but the model has {len(model.layers)}",
                            file=source, field="num_layers")
        apply_lora(model, cfg)
        load_arrays_checked(model, arrays, directory / ADAPTER_FILE)
    elif kind == "esft":
        apply_esft_adapter(model, config, arrays, source, directory / ADAPTER_FILE)
    else:
        raise UserError(f"unknown fine_tune_type {kind!r} (lora, dora or esft; a full fine-tune is a model, "
                        "load it with --model)", file=source, field="fine_tune_type")
    model.eval()
    return model
