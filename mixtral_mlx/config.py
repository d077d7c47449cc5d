"""Model configuration: `ModelArgs` (the fields of transformers' `MixtralConfig`) and presets.

`ModelArgs.from_hf` reads a Hugging Face `config.json` (transformers v4 and v5 spellings),
validates it and names the file and field of anything wrong; `to_hf` writes it back so
transformers and mlx-lm can read it. Presets live in `presets/*.yaml`; each holds a `model:`
section (these fields) and may hold a `train:` section of trainer defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# Keys of a transformers config.json that carry no information we use or that we
# fill in ourselves when writing; they are accepted and dropped when reading.
_HF_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "output_router_logits", "initializer_range", "attention_dropout",
    "hidden_act", "rope_parameters", "rope_scaling", "_name_or_path", "quantization",
    "quantization_config",
}

# Shape fields that must be spelled out in a config.json: a default here would silently
# build a model of the wrong size.
_REQUIRED_HF = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts_per_tok")


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1e6
    sliding_window: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    # mlx-lm style quantization ({"group_size": 64, "bits": 4}); None for float weights.
    quantization: dict | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.head_dim is None and self.num_attention_heads and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ validation
    def validate(self, source: str | Path | None = None) -> "ModelArgs":
        def bad(name: str, why: str) -> UserError:
            return UserError(why, file=source, field=name)

        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "num_local_experts", "num_experts_per_tok"]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, f"must be a positive integer, got {value!r}")
        if self.head_dim is None:
            raise bad("hidden_size", f"{self.hidden_size} is not divisible by "
                      f"num_attention_heads={self.num_attention_heads} (and no head_dim is given)")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise bad("head_dim", f"must be a positive even integer, got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                      f"num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise bad("num_experts_per_tok", f"{self.num_experts_per_tok} is more than "
                      f"num_local_experts={self.num_local_experts}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise bad("sliding_window", f"must be null or a positive integer, got {self.sliding_window!r}")
        if not self.rope_theta > 0:
            raise bad("rope_theta", f"must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise bad("rms_norm_eps", f"must be positive, got {self.rms_norm_eps!r}")
        if not 0 <= self.router_jitter_noise < 1:
            raise bad("router_jitter_noise", f"must be in [0, 1), got {self.router_jitter_noise!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise bad(name, f"{value} is outside the vocabulary (size {self.vocab_size})")
        return self

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str | Path | None = None) -> "ModelArgs":
        """Build from a transformers config dict; `source` names the file in errors."""
        model_type = config.get("model_type", "mixtral")
        if model_type not in ("mixtral", "mistral"):
            raise UserError(f"model_type {model_type!r} is not a Mixtral model", file=source, field="model_type")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"only silu (SwiGLU) experts are supported, got {act!r}", file=source, field="hidden_act")
        required = _REQUIRED_HF if model_type == "mixtral" else _REQUIRED_HF[:5]
        for name in required:
            if name not in config:
                raise UserError("missing required field", file=source, field=name)
        values = {k: v for k, v in config.items() if k not in _HF_BOOKKEEPING}
        values["rope_theta"] = _read_rope_theta(config, source)
        if model_type == "mistral":  # a dense Mistral is a Mixtral with one expert
            values.setdefault("num_local_experts", 1)
            values.setdefault("num_experts_per_tok", 1)
        if isinstance(values.get("eos_token_id"), list):  # some configs list several
            values["eos_token_id"] = values["eos_token_id"][0]
        if config.get("quantization") is not None:
            values["quantization"] = config["quantization"]
        return _build(values, source, strict=False)

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers (v4 and v5) and mlx-lm read."""
        out = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_act": "silu"}
        for f in dataclasses.fields(self):
            if f.name != "quantization":
                out[f.name] = getattr(self, f.name)
        # v4 and mlx-lm read the top-level rope_theta, v5 reads rope_parameters.
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.quantization is not None:
            out["quantization"] = self.quantization
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError("no such file", file=path) from None
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON: {e.msg} (column {e.colno})", file=path, line=e.lineno) from None
        if not isinstance(config, dict):
            raise UserError("must hold a JSON object", file=path)
        return cls.from_hf(config, source=path)

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def _read_rope_theta(config: dict, source) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling")
    key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    if params:
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise UserError(f"rope_type {rope_type!r} is not supported (only 'default')",
                            file=source, field=f"{key}.rope_type")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(config.get("rope_theta", 1e6))


def _build(values: dict[str, Any], source, strict: bool) -> ModelArgs:
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(values) - known)
    if unknown and strict:
        raise UserError(f"unknown model setting (known: {', '.join(sorted(known))})", file=source, field=unknown[0])
    kwargs = {k: v for k, v in values.items() if k in known}
    try:
        args = ModelArgs(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass init rejects nothing we pass
        raise UserError(str(e), file=source) from None
    for name in ("rope_theta", "rms_norm_eps", "router_aux_loss_coef", "router_jitter_noise", "initializer_range"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"must be a number, got {value!r}", file=source, field=name)
        setattr(args, name, float(value))
    return args.validate(source)


# ---------------------------------------------------------------------- presets
def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).joinpath("presets").iterdir()
                  if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    """The whole preset file as a dict (`model:` and optional `train:` sections)."""
    path = resources.files(__package__).joinpath("presets", f"{name}.yaml")
    if not path.is_file():
        raise UserError(f"unknown preset {name!r} (choose from: {', '.join(preset_names())})", field="--preset")
    return yaml.safe_load(path.read_text())


def load_preset(name: str) -> ModelArgs:
    return _build(dict(read_preset(name)["model"]), source=f"preset {name}", strict=True)


def model_args_from_dict(values: dict[str, Any], source: str | Path | None = None) -> ModelArgs:
    """Strictly build ModelArgs from our own YAML (unknown keys are errors)."""
    return _build(dict(values), source, strict=True)
