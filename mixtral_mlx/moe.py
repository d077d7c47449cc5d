"""The sparse mixture-of-experts block: router, top-k, SwiGLU experts, dispatch, losses.

Two dispatches compute the same function:

* `gather`: each token runs only its k experts through `mx.gather_mm`, with the
  (token, expert) pairs sorted by expert for long inputs so each expert's weights are
  read in one run. The default (`auto`) on every device.
* `dense`: every expert runs on every token as one large matmul over the stacked
  weights, and the router's zeros drop the unchosen ones: E/k times the FLOPs in plain
  BLAS matmuls with static shapes. A reference, and a fallback.

On a 2-core CPU (small preset, float32) gathering is the faster of the two at every size
as long as its input rows are laid out plainly (see `Experts.gather`): per MoE layer
about 50x for one token and 2-3x for 32 to 2048 tokens, forward and backward alike;
a whole training step (8 x 256 tokens) takes half the time. Neither waits on the host,
so both compile and train without a Python loop over experts.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs

DISPATCHES = ("auto", "dense", "gather")


def resolve_dispatch(dispatch: str) -> str:
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose from {DISPATCHES}")
    return "gather" if dispatch == "auto" else dispatch


class ExpertLinear(nn.Module):
    """E bias-free linear layers stored as one (E, out, in) weight, like transformers' w1/w2/w3."""

    def __init__(self, num_experts: int, in_dims: int, out_dims: int):
        super().__init__()
        scale = math.sqrt(1 / in_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, out_dims, in_dims))

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def gather(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """Row i of x through expert indices[i]: x (..., 1, in), indices (...) -> (..., 1, out).

        x broadcasts against indices, so (T, 1, 1, in) with (T, k) runs each token through k experts.
        """
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def all_experts(self, x: mx.array) -> mx.array:
        """x: (T, in) -> (T, E, out): every expert on every row, as one matmul."""
        E, out, inp = self.weight.shape
        return (x @ self.weight.reshape(E * out, inp).T).reshape(x.shape[0], E, out)

    def combine(self, h: mx.array, gates: mx.array) -> mx.array:
        """sum_e gates[:, e] * expert_e(h[:, e]): h (T, E, in), gates (T, E) -> (T, out), one matmul."""
        E, out, inp = self.weight.shape
        weighted = (h * gates[..., None]).reshape(h.shape[0], E * inp)
        return weighted @ self.weight.swapaxes(1, 2).reshape(E * inp, out)


class Experts(nn.Module):
    """E SwiGLU feed-forward experts: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, h, i = args.num_local_experts, args.hidden_size, args.intermediate_size
        self.w1 = ExpertLinear(E, h, i)  # gate projection
        self.w3 = ExpertLinear(E, h, i)  # up projection
        self.w2 = ExpertLinear(E, i, h)  # down projection

    def dense(self, x: mx.array, gates: mx.array) -> mx.array:
        """x: (T, h), gates: (T, E) with zeros off the chosen experts -> (T, h)."""
        h = nn.silu(self.w1.all_experts(x)) * self.w3.all_experts(x)
        return self.w2.combine(h, gates)

    def gather(self, x: mx.array, indices: mx.array, scores: mx.array) -> mx.array:
        """x: (T, h), indices/scores: (T, k) -> (T, h)."""
        T, k = indices.shape
        if T * k >= 64:
            # Sort the (token, slot) pairs by expert so gather_mm reads each expert's
            # weights once, in contiguous runs.
            flat = indices.reshape(-1)
            order = mx.argsort(flat)
            inverse = mx.argsort(order)
            # reshape, not x[:, None]: MLX's CPU gather_mm is several times slower on
            # the strides an inserted axis leaves.
            xs = x[order // k].reshape(T * k, 1, -1)  # (T*k, 1, h): row r is token order[r] // k
            y = self._swiglu(xs, flat[order], sorted_indices=True)  # (T*k, 1, h)
            y = y.squeeze(1)[inverse].reshape(T, k, -1)
        else:
            y = self._swiglu(x.reshape(T, 1, 1, -1), indices).squeeze(-2)  # (T, k, h)
        return (y * scores[..., None]).sum(axis=1)

    def _swiglu(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        g = self.w1.gather(x, indices, sorted_indices)
        u = self.w3.gather(x, indices, sorted_indices)
        return self.w2.gather(nn.silu(g) * u, indices, sorted_indices)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs, dispatch: str = "auto"):
        super().__init__()
        self.num_experts = args.num_local_experts
        self.top_k = args.num_experts_per_tok
        self.jitter = args.router_jitter_noise
        self.dispatch = dispatch
        self.gate = nn.Linear(args.hidden_size, self.num_experts, bias=False)  # the router
        self.experts = Experts(args)

    def route(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Router logits (T, E), chosen experts (T, k) and their weights (T, k).

        Softmax over the k chosen logits equals transformers' softmax over all E then
        renormalising the top k; computed in float32 for half-precision models.
        """
        logits = self.gate(x)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k])
        chosen = mx.take_along_axis(logits, indices, axis=-1)
        scores = mx.softmax(chosen.astype(mx.float32), axis=-1).astype(x.dtype)
        return logits, indices, scores

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x: (B, L, h) -> (output (B, L, h), router logits (B, L, E))."""
        B, L, h = x.shape
        x = x.reshape(B * L, h)
        if self.training and self.jitter > 0:
            x = x * mx.random.uniform(1 - self.jitter, 1 + self.jitter, x.shape, dtype=x.dtype)
        logits, indices, scores = self.route(x)
        if resolve_dispatch(self.dispatch) == "dense":
            y = self.experts.dense(x, scatter_gates(indices, scores, self.num_experts))
        else:
            y = self.experts.gather(x, indices, scores)
        return y.reshape(B, L, h), logits.reshape(B, L, -1)


def scatter_gates(indices: mx.array, scores: mx.array, num_experts: int) -> mx.array:
    """(T, k) expert ids and weights -> (T, E) weights, zero off the chosen experts."""
    one_hot = indices[..., None] == mx.arange(num_experts)
    return (one_hot * scores[..., None]).sum(axis=-2)


# ---------------------------------------------------------------------- router losses
def load_balancing_loss(router_logits: list[mx.array] | mx.array, top_k: int) -> mx.array:
    """The Switch Transformer auxiliary loss in transformers' Mixtral form.

    Over all tokens of all layers together: E * sum_e f_e * P_e, where f_e is the share
    of (token, slot) routings that go to expert e, per slot, and P_e the mean router
    probability of e. Equals `transformers...load_balancing_loss_func` (no padding mask).
    """
    if isinstance(router_logits, (list, tuple)):
        router_logits = mx.concatenate([r.reshape(-1, r.shape[-1]) for r in router_logits], axis=0)
    logits = router_logits.reshape(-1, router_logits.shape[-1]).astype(mx.float32)
    E = logits.shape[-1]
    probs = mx.softmax(logits, axis=-1)
    chosen = mx.stop_gradient(mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k])
    routed = (chosen[..., None] == mx.arange(E)).astype(mx.float32)  # (N, k, E)
    tokens_per_expert = routed.mean(axis=0)  # (k, E)
    prob_per_expert = probs.mean(axis=0)  # (E,)
    return (tokens_per_expert * prob_per_expert).sum() * E


def router_z_loss(router_logits: list[mx.array] | mx.array) -> mx.array:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2 (all layers pooled)."""
    if isinstance(router_logits, (list, tuple)):
        router_logits = mx.concatenate([r.reshape(-1, r.shape[-1]) for r in router_logits], axis=0)
    z = mx.logsumexp(router_logits.astype(mx.float32), axis=-1)
    return (z * z).mean()
