"""Weight quantization: every linear layer, the embedding, and the stacked experts.

The format is MLX's affine quantization as mlx-lm uses it: each weight row is cut along
its input dimension into groups of `group_size`, stored as `bits`-bit integers packed
in uint32 with one scale and one bias per group (`weight`, `scales`, `biases`).
config.json records `"quantization": {"group_size", "bits", "mode"}`, plus any module
path quantized differently (or `false`: kept in float), mlx-lm's way. A layer whose
input width is not a multiple of the group size stays in float, both when converting
and when loading, so the two always agree. The experts' (E, out, in) weights are
quantized per expert and saved per expert, so mlx-lm reads these checkpoints and we
read its own.

On a GPU, MLX's quantized matmuls read 4 or 8 bits per weight and are the fast path.
MLX's CPU kernels for them are plain loops (about 2 GFLOP/s on two cores), so on the CPU
an input of more than a few rows dequantizes the weight and runs the float matmul
(or gather_mm) instead: decoding keeps the quantized kernels, prefill does not. A weight
larger than DEQUANTIZE_MAX_BYTES once dequantized stays packed: a big model is quantized
to fit in memory, and its dequantized experts would not.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .moe import ExpertLinear, expert_matmul

DEQUANTIZE_FROM_ROWS = 4  # on the CPU; measured crossover with mx.quantized_matmul: 2-3 rows
DEQUANTIZE_MAX_BYTES = 1 << 28  # larger weights (a big model's experts) stay packed: memory first


def _dequantize_first(x: mx.array, layer: nn.Module, weight: mx.array) -> bool:
    """Whether x @ W.T should dequantize W (`weight`, packed with `layer`'s bits) and use the BLAS."""
    dequantized_bytes = weight.size * 32 // layer.bits * x.dtype.size
    return (mx.default_device() == mx.cpu and x.size // x.shape[-1] >= DEQUANTIZE_FROM_ROWS
            and dequantized_bytes <= DEQUANTIZE_MAX_BYTES)


def _dequantized(layer: nn.Module) -> mx.array:
    return mx.dequantize(layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits,
                         mode=layer.mode)


def _matmul_t(x: mx.array, layer: nn.Module, weight: mx.array, scales: mx.array, biases: mx.array | None) -> mx.array:
    """x @ W.T for the quantized (out, in) matrix W = (weight, scales, biases) of `layer`."""
    if _dequantize_first(x, layer, weight):
        return x @ mx.dequantize(weight, scales, biases, layer.group_size, layer.bits, mode=layer.mode).T
    return mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=layer.group_size,
                               bits=layer.bits, mode=layer.mode)


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's QuantizedLinear (same parameters), dequantizing first for long inputs on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _matmul_t(x, self, self["weight"], self["scales"], self.get("biases"))
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """MLX's QuantizedEmbedding; `as_linear` (a tied output head) dequantizes first on the CPU."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _matmul_t(x, self, self["weight"], self["scales"], self.get("biases"))


class QuantizedExpertLinear(nn.Module):
    """`ExpertLinear` with each expert's (out, in) weight quantized along `in`.

    The same three methods as ExpertLinear: `gather` (mx.gather_qmm over the routed
    experts), and `all_experts` / `combine` for the dense dispatch.
    """

    def __init__(self, num_experts: int, in_dims: int, out_dims: int, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self._set(mx.zeros((num_experts, out_dims, in_dims)))
        self.freeze()

    def _set(self, weight: mx.array) -> None:
        self.weight, self.scales, *biases = mx.quantize(weight, self.group_size, self.bits, mode=self.mode)
        self.biases = biases[0] if biases else None

    @classmethod
    def from_float(cls, layer: ExpertLinear, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        E, out, inp = layer.weight.shape
        quantized = cls(E, inp, out, group_size, bits, mode)  # lazy: the placeholder is never computed
        quantized._set(layer.weight)
        return quantized

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def gather(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """The rows of block i of x through expert indices[i] (see ExpertLinear.gather)."""
        if _dequantize_first(x, self, self["weight"]):  # many rows (the grouped dispatch): the BLAS on dequantized weights
            return expert_matmul(x, _dequantized(self), indices, sorted_indices)
        return mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"), rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)

    def all_experts(self, x: mx.array) -> mx.array:
        """x: (T, in) -> (T, E, out): every expert on every row, as one matmul."""
        E, out = self.weight.shape[:2]
        biases = self.get("biases")
        y = _matmul_t(x, self, self["weight"].reshape(E * out, -1), self["scales"].reshape(E * out, -1),
                      None if biases is None else biases.reshape(E * out, -1))
        return y.reshape(x.shape[0], E, out)

    def combine(self, h: mx.array, gates: mx.array) -> mx.array:
        """sum_e gates[:, e] * expert_e(h[:, e]): h (T, E, in), gates (T, E) -> (T, out)."""
        weighted = h * gates[..., None]
        if _dequantize_first(h[:, 0], self, self["weight"]):
            w = _dequantized(self)  # (E, out, in)
            E, out, inp = w.shape
            return weighted.reshape(h.shape[0], E * inp) @ w.swapaxes(1, 2).reshape(E * inp, out)
        biases = self.get("biases")
        return sum(_matmul_t(weighted[:, e], self, self["weight"][e], self["scales"][e],
                             None if biases is None else biases[e]) for e in range(self.num_experts))

    def _extra_repr(self) -> str:
        E, out = self.weight.shape[:2]
        return f"experts={E}, output_dims={out}, group_size={self.group_size}, bits={self.bits}, mode={self.mode}"


def _quantized_version(module: nn.Module, params: dict) -> nn.Module:
    if isinstance(module, nn.Linear):
        return QuantizedLinear.from_linear(module, **params)
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding.from_embedding(module, **params)
    return QuantizedExpertLinear.from_float(module, **params)


def quantize_model(model: nn.Module, group_size: int = 64, bits: int = 4, mode: str = "affine",
                   **per_layer: dict | bool) -> nn.Module:
    """Quantize `model` in place and record the settings in `model.args.quantization`.

    Every Linear (attention, router, output head), the Embedding and every expert
    projection is quantized unless its input width is not a multiple of the group
    size. `per_layer` maps module paths (`model.layers.0.block_sparse_moe.gate`) to
    False (keep in float) or their own {"group_size", "bits"}.
    """
    default = {"group_size": group_size, "bits": bits, "mode": mode}

    def convert(path: str, module: nn.Module) -> nn.Module:
        if not isinstance(module, (nn.Linear, nn.Embedding, ExpertLinear)):
            return module
        params = per_layer.get(path, True)
        if params is False:
            return module
        params = {**default, **(params if isinstance(params, dict) else {})}
        if module.weight.shape[-1] % params["group_size"]:
            return module
        return _quantized_version(module, params)

    model.update_modules(tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module))
    if hasattr(model, "args"):
        model.args.quantization = {**default, **per_layer}
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedExpertLinear))
               for _, m in model.named_modules())
