"""Expert-specialised fine-tuning (ESFT): train only the experts a task routes to.

Following Wang et al. 2024 ("Let the Expert Stick to His Last"): route the task's
training data through the model and score every expert of every layer, either by

* `token`: its token selection ratio, the share of (token, slot) routings that choose
  it, (1 / (N k)) sum_t 1[e in topk(t)], which sums to 1 over a layer's experts; or
* `gate`: its average gate score, (1 / N) sum_t p_e(t) 1[e in topk(t)], with p the
  router's softmax over all experts, which sums to the mean top-k probability mass.

Per layer, keep the smallest set of experts whose scores add up to the threshold
(highest score first, ties to the lower id; defaults 0.2 for `token`, 0.1 for `gate`),
freeze everything else and train only those experts.

The experts of a layer are stacked (E, out, in) tensors; `ExpertSubset` splits each
into a trained part (the chosen experts) and a frozen part and stacks them back in the
forward pass, so the optimizer never sees the others: they stay bit-identical, weight
decay included. An ESFT adapter is just the chosen experts' weights, saved under
transformers' per-expert names (`model.layers.L.block_sparse_moe.experts.E.w1.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import UserError
from .moe import ExpertLinear

SCORES = {"token": 0.2, "gate": 0.1}  # score -> default threshold
PROJECTIONS = ("w1", "w2", "w3")


# ---------------------------------------------------------------------- scoring
@dataclass
class RoutingStats:
    """Per layer and expert: routings counted, gate probability summed, over `tokens` tokens."""

    counts: np.ndarray  # (layers, E)
    gate_sums: np.ndarray  # (layers, E)
    tokens: int
    top_k: int

    def scores(self, score: str) -> np.ndarray:
        if self.tokens == 0:
            raise UserError("no tokens to route: the training data is empty", field="--data")
        if score == "token":
            return self.counts / (self.tokens * self.top_k)
        if score == "gate":
            return self.gate_sums / self.tokens
        raise UserError(f"unknown score {score!r} (choose from {', '.join(SCORES)})", field="--esft-score")


def accumulate_routing(router_logits: Sequence[mx.array], mask: mx.array, top_k: int) -> tuple[mx.array, mx.array]:
    """One batch's (layers, E) routing counts and summed gate scores over the tokens where mask is 1."""
    counts, gates = [], []
    m = mask.reshape(-1, 1).astype(mx.float32)
    for logits in router_logits:
        logits = logits.reshape(-1, logits.shape[-1]).astype(mx.float32)
        E = logits.shape[-1]
        chosen = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[:, :top_k]
        routed = (chosen[..., None] == mx.arange(E)).any(axis=1).astype(mx.float32) * m  # (N, E)
        counts.append(routed.sum(axis=0))
        gates.append((mx.softmax(logits, axis=-1) * routed).sum(axis=0))
    return mx.stack(counts), mx.stack(gates)


def route_data(model, batches: Iterable[dict[str, np.ndarray]], progress=None) -> RoutingStats:
    """Route `batches` (inputs, mask of the tokens to count) through the model; no gradients."""
    top_k = model.args.num_experts_per_tok
    E, layers = model.args.num_local_experts, model.args.num_hidden_layers
    counts, gates, tokens = np.zeros((layers, E)), np.zeros((layers, E)), 0
    for batch in batches:
        out = model.forward(mx.array(batch["inputs"]), router_logits=True)
        c, g = accumulate_routing(out.router_logits, mx.array(batch["mask"]), top_k)
        counts += np.array(c)
        gates += np.array(g)
        tokens += int(batch["mask"].sum())
        if progress is not None:
            progress(1)
    return RoutingStats(counts, gates, tokens, top_k)


def choose_experts(scores: np.ndarray, threshold: float) -> list[list[int]]:
    """Per layer, the smallest set of experts whose scores add up to `threshold`.

    Experts are taken highest score first (ties: lower id first) until the running sum
    reaches the threshold; experts scoring zero are never taken, so a layer whose
    scores sum to less than the threshold keeps every expert the data used.
    """
    chosen = []
    for layer_scores in np.asarray(scores, dtype=np.float64):
        order = sorted(range(len(layer_scores)), key=lambda e: (-layer_scores[e], e))
        picked, total = [], 0.0
        for e in order:
            if total >= threshold or layer_scores[e] <= 0:
                break
            picked.append(e)
            total += layer_scores[e]
        chosen.append(sorted(picked))
    return chosen


def check_threshold(score: str, threshold: float | None) -> float:
    if score not in SCORES:
        raise UserError(f"unknown score {score!r} (choose from {', '.join(SCORES)})", field="--esft-score")
    threshold = SCORES[score] if threshold is None else threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise UserError(f"must be in (0, 1], got {threshold!r}", field="--esft-threshold")
    return float(threshold)


# ---------------------------------------------------------------------- training only the chosen experts
class ExpertSubset(ExpertLinear):
    """An ExpertLinear whose chosen experts are trainable and whose others are frozen.

    `trained` (k, out, in) and `frozen` (E - k, out, in) are separate parameters; the
    stacked weight the three ExpertLinear methods read is assembled from them in each
    forward pass, so gradients and optimizer updates reach the chosen experts only.
    """

    def __init__(self, base: ExpertLinear, chosen: Sequence[int]):
        nn.Module.__init__(self)
        E = base.weight.shape[0]
        if not chosen or any(not 0 <= e < E for e in chosen) or len(set(chosen)) != len(chosen):
            raise ValueError(f"chosen experts {list(chosen)} are not distinct ids in [0, {E})")
        if "scales" in base:
            raise UserError("expert-specialised fine-tuning trains float experts; drop --quantize", field="--esft")
        self.chosen = tuple(sorted(chosen))
        rest = [e for e in range(E) if e not in self.chosen]
        self.trained = base.weight[mx.array(self.chosen)]
        self.frozen = base.weight[mx.array(rest)] if rest else None
        self._order = mx.array(np.argsort(list(self.chosen) + rest))  # stacked position -> expert id
        self.freeze(keys=["frozen"], strict=False)

    @property
    def weight(self) -> mx.array:
        if self.frozen is None:
            return self.trained
        return mx.concatenate([self.trained, self.frozen])[self._order]

    def fuse(self, dequantize: bool = False) -> ExpertLinear:
        E, out, inp = self.weight.shape
        fused = ExpertLinear(E, inp, out)
        fused.weight = self.weight
        return fused


def _experts_of(layer) -> nn.Module:
    return layer.block_sparse_moe.experts


def apply_esft(model, chosen: Sequence[Sequence[int]]) -> dict[str, int]:
    """Freeze the model and make the chosen experts of each layer trainable; returns counts per projection."""
    if len(chosen) != len(model.layers):
        raise ValueError(f"{len(chosen)} expert lists for {len(model.layers)} layers")
    model.freeze()
    for layer, experts in zip(model.layers, chosen):
        if experts:
            block = _experts_of(layer)
            block.update_modules({p: ExpertSubset(block[p], experts) for p in PROJECTIONS})
    counts = {p: 0 for p in PROJECTIONS}
    for name, value in tree_flatten(model.trainable_parameters()):
        counts[name.split(".")[-2]] += value.size
    if not any(counts.values()):
        raise UserError("no expert was chosen in any layer", field="--esft-threshold")
    return counts


def expert_arrays(model) -> dict[str, mx.array]:
    """The chosen experts' weights under transformers' per-expert names."""
    out = {}
    for i, layer in enumerate(model.layers):
        for p in PROJECTIONS:
            module = _experts_of(layer)[p]
            if isinstance(module, ExpertSubset):
                for j, e in enumerate(module.chosen):
                    out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{p}.weight"] = module.trained[j]
    return out


def load_expert_arrays(model, arrays: dict[str, mx.array], source: Path) -> None:
    """Put saved expert weights into the model's ExpertSubset layers, names and shapes checked."""
    expected = {}
    for i, layer in enumerate(model.layers):
        for p in PROJECTIONS:
            module = _experts_of(layer)[p]
            if isinstance(module, ExpertSubset):
                for j, e in enumerate(module.chosen):
                    expected[f"model.layers.{i}.block_sparse_moe.experts.{e}.{p}.weight"] = (module, j)
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        raise UserError("not one of the adapter's chosen experts", file=source, field=unexpected[0])
    updates: dict[int, list] = {}
    for name, (module, j) in expected.items():
        if name not in arrays:
            raise UserError("tensor is missing from the adapter", file=source, field=name)
        if arrays[name].shape != module.trained.shape[1:]:
            raise UserError(f"shape {tuple(arrays[name].shape)} does not match this model's "
                            f"{tuple(module.trained.shape[1:])}", file=source, field=name)
        updates.setdefault(id(module), [module, [None] * len(module.chosen)])[1][j] = arrays[name]
    for module, rows in updates.values():
        module.trained = mx.stack(rows).astype(module.trained.dtype)
    mx.eval(model.parameters())


def esft_adapter_config(chosen: Sequence[Sequence[int]], score: str, threshold: float,
                        scores: np.ndarray) -> dict[str, Any]:
    return {"fine_tune_type": "esft", "esft": {
        "score": score, "threshold": threshold,
        "experts": [list(map(int, c)) for c in chosen],
        "scores": np.round(np.asarray(scores), 6).tolist()}}


def apply_esft_adapter(model, config: dict[str, Any], arrays: dict[str, mx.array], config_file: Path,
                       weights_file: Path) -> None:
    """Split the model's experts as the adapter's config says and load its trained experts."""
    try:
        chosen = [[int(e) for e in layer] for layer in config["esft"]["experts"]]
    except (KeyError, TypeError, ValueError):
        raise UserError("needs esft.experts: a list of expert ids per layer", file=config_file,
                        field="esft.experts") from None
    E = model.args.num_local_experts
    if len(chosen) != len(model.layers) or any(not 0 <= e < E for layer in chosen for e in layer):
        raise UserError(f"does not fit this model ({len(model.layers)} layers of {E} experts)", file=config_file,
                        field="esft.experts")
    apply_esft(model, chosen)
    load_expert_arrays(model, arrays, weights_file)


def format_choice(chosen: Sequence[Sequence[int]], scores: np.ndarray) -> list[str]:
    """One line per layer: the chosen experts with their scores, and how much of the total they cover."""
    lines = []
    for i, (experts, s) in enumerate(zip(chosen, scores)):
        parts = ", ".join(f"{e} ({s[e]:.3f})" for e in experts)
        lines.append(f"  layer {i}: experts {parts}; sum {sum(s[e] for e in experts):.3f}")
    return lines
