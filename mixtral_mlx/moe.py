"""The sparse mixture-of-experts block: router, top-k, SwiGLU experts, dispatch, losses.

Three dispatches compute the same function:

* `dense`: every expert runs on every token as one large matmul over the stacked
  weights, and the router's zeros drop the unchosen ones. E/k times the FLOPs, but
  plain matmuls with static shapes.
* `gather`: each token runs only its k experts through `mx.gather_mm`, with tokens
  sorted by expert for long inputs: the right choice on a GPU.
* `grouped`: the (token, expert) pairs are sorted by expert and each expert's run is
  padded to a whole number of row blocks, so `gather_mm` multiplies blocks of rows that
  all share one expert: one BLAS call per block, see `group_block_size`. k/E of the
  dense FLOPs plus at most E * (block - 1) pad rows.

`auto` (the default) picks `gather` on a GPU, and on the CPU `grouped`, or `gather` for
a few tokens at a time (decoding), where the two cost the same. None waits on the host
(the padded size is a static bound), so all compile and train without a Python loop
over experts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .remat import recompute_in_backward

DISPATCHES = ("auto", "dense", "gather", "grouped")
GATHER_BELOW_TOKENS = 32  # `auto` on the CPU gathers for fewer tokens than this


def resolve_dispatch(dispatch: str, num_tokens: int | None = None) -> str:
    if dispatch not in DISPATCHES:
        raise ValueError(f"unknown MoE dispatch {dispatch!r}; choose from {DISPATCHES}")
    if dispatch == "auto":
        if mx.default_device() != mx.cpu:
            return "gather"
        return "gather" if num_tokens is not None and num_tokens < GATHER_BELOW_TOKENS else "grouped"
    return dispatch


def expert_matmul(x: mx.array, weight: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
    """The rows of block i of x through the (E, out, in) weight of expert indices[i] (see ExpertLinear.gather)."""
    if sorted_indices and _weight_copy_pays(x.shape[-2], *weight.shape[-2:]):
        return _expert_matmul_untransposed(x, weight, indices)
    return mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)


def _weight_copy_pays(rows: int, out_dims: int, in_dims: int) -> bool:
    """Whether blocks of `rows` reach OpenBLAS's small-matrix kernels only through an (in, out) copy of the weight.

    A (E, out, in) weight reaches sgemm transposed, which those kernels take only for
    rows * out <= 1024 (`blas.small_matrix_kernel_takes`); laid out (in, out) it goes up
    to rows * out * in <= 100^3. For the small preset's 4-row blocks through w1 and w3
    (out 512), the copy (~1 ms a layer) makes the product 3x faster.
    """
    from . import blas

    return (mx.default_device() == mx.cpu and not blas.small_matrix_kernel_takes(rows, out_dims, in_dims, True)
            and blas.small_matrix_kernel_takes(rows, out_dims, in_dims))


@mx.custom_function
def _expert_matmul_untransposed(x: mx.array, weight: mx.array, indices: mx.array) -> mx.array:
    return mx.gather_mm(x, mx.contiguous(weight.swapaxes(-1, -2)), rhs_indices=indices, sorted_indices=True)


@_expert_matmul_untransposed.vjp
def _expert_matmul_untransposed_vjp(primals, cotangent, output):
    # Autograd would multiply the cotangent by the copy transposed (a transposed operand
    # again); the weight as stored is that product's untransposed (in, out) layout.
    x, weight, indices = primals
    dx = mx.gather_mm(cotangent, weight, rhs_indices=indices, sorted_indices=True)
    _, (dweight,) = mx.vjp(lambda w: mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=True),
                           [weight], [cotangent])
    return dx, dweight, mx.zeros_like(indices)


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
        """The rows of block i of x through expert indices[i]: x (..., M, in), indices (...) -> (..., M, out).

        x broadcasts against indices, so (T, 1, 1, in) with (T, k) runs each token through
        k experts, and (blocks, M, in) with (blocks,) runs M rows at a time (`grouped`).
        """
        return expert_matmul(x, self.weight, indices, sorted_indices)

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
        self.intermediate_size = i
        self.max_block: int | None = None  # rows per expert block in `grouped`; None: `default_max_block`
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

    def grouped(self, x: mx.array, indices: mx.array, scores: mx.array) -> mx.array:
        """x: (T, h), indices/scores: (T, k) -> (T, h), through blocks of rows sharing an expert."""
        T, k = indices.shape
        h = x.shape[-1]
        max_block = self.max_block or default_max_block(h, self.intermediate_size)  # read when a step is traced
        block = group_block_size(T * k, self.w1.num_experts, max_block)
        groups = group_by_expert(indices, self.w1.num_experts, block)
        rows = groups.pair.shape[0]
        # Row r holds pair p = pair[r], token p // k; pad rows point one past the end: zeros.
        token, row = groups.pair // k, groups.row.reshape(T, k)
        x = spread_rows(x, token, row).reshape(rows // block, block, h)
        weight = mx.concatenate([scores.reshape(-1), mx.zeros((1,), scores.dtype)])[groups.pair]
        g = self.w1.gather(x, groups.expert, sorted_indices=True)
        u = self.w3.gather(x, groups.expert, sorted_indices=True)
        y = self._down(g, u, weight.reshape(-1, block, 1), groups.expert).reshape(rows, h)
        return collect_rows(y, token, row)

    def _down(self, g: mx.array, u: mx.array, weight: mx.array, expert: mx.array) -> mx.array:
        """w2(silu(g) * u * weight) over blocks of rows, weighted before the (linear) down
        projection so each row leaves w2 already scaled.

        For a plain w2 the backward pass recomputes w2's input and sigmoid(g), two (rows,
        intermediate) arrays per layer, from g and u, which it keeps anyway: small preset,
        batch 8 x 256, 43 MiB less peak for 6% more step time. An adapted w2 is left as it
        is (LoRA's dropout would draw another mask in the recomputation).
        """
        if type(self.w2) is not ExpertLinear:
            return self.w2.gather(weighted_swiglu(g, u, weight), expert, sorted_indices=True)

        def down(g, u, weight, w2):
            return expert_matmul(weighted_swiglu(g, u, weight), w2, expert, sorted_indices=True)

        return recompute_in_backward(down)(g, u, weight, self.w2.weight)

    def _swiglu(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        g = self.w1.gather(x, indices, sorted_indices)
        u = self.w3.gather(x, indices, sorted_indices)
        return self.w2.gather(nn.silu(g) * u, indices, sorted_indices)


# The grouped dispatch moves token rows to expert rows and back. Each is the other's
# gradient: written as gathers both ways, neither backward pass needs a scatter-add
# (MLX's CPU scatter is several times slower than a gather of the same rows).
def _spread(x: mx.array, token: mx.array, row: mx.array) -> mx.array:
    return mx.concatenate([x, mx.zeros((1, x.shape[-1]), x.dtype)])[token]


def _collect(y: mx.array, token: mx.array, row: mx.array) -> mx.array:
    return y[row].sum(axis=1)


def _with_gradient(forward, backward):
    """forward(a, token, row) as a custom function whose gradient is backward(cotangent, token, row)."""
    function = mx.custom_function(forward)

    @function.vjp
    def _(primals, cotangent, output):
        _, token, row = primals
        return backward(cotangent, token, row), mx.zeros_like(token), mx.zeros_like(row)

    return function


# x (T, h) -> (rows, h): row r is x[token[r]], zeros where token[r] == T (a pad row); row
# (T, k) holds the rows of each token's k pairs (`ExpertGroups.row`).
spread_rows = _with_gradient(_spread, _collect)
# y (rows, h) -> (T, h): each token's k rows summed.
collect_rows = _with_gradient(_collect, _spread)


@mx.custom_function
def _weighted_swiglu(gate: mx.array, up: mx.array, weight: mx.array):
    # Not mx.sigmoid: inside a compiled step MLX fuses 1 / (1 + exp(-x)) with its
    # neighbours into one kernel, but leaves a sigmoid that is an output of the graph as
    # its own CPU kernel, ~30x slower (20 ms against 0.65 for 1M elements, 2-core EPYC).
    s = 1 / (1 + mx.exp(-gate))
    return gate * s * up * weight, s


@_weighted_swiglu.vjp
def _weighted_swiglu_vjp(primals, cotangents, outputs):
    gate, up, weight = primals
    s, da = outputs[1], cotangents[0]
    silu = gate * s
    d_silu = da * up * weight
    return (d_silu * s * (1 + gate * (1 - s)), da * silu * weight,
            (da * silu * up).sum(axis=-1, keepdims=True).astype(weight.dtype))


def weighted_swiglu(gate: mx.array, up: mx.array, weight: mx.array) -> mx.array:
    """silu(gate) * up * weight (weight: one per row), keeping gate, up and sigmoid(gate) for the gradient.

    Autograd would also keep silu(gate) and silu(gate) * up: two (rows, intermediate)
    arrays per layer more, recomputed here for a few multiplies.
    """
    return _weighted_swiglu(gate, up, weight)[0]


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
        dispatch = resolve_dispatch(self.dispatch, B * L)
        if dispatch == "dense":
            y = self.experts.dense(x, scatter_gates(indices, scores, self.num_experts))
        elif dispatch == "grouped":
            y = self.experts.grouped(x, indices, scores)
        else:
            y = self.experts.gather(x, indices, scores)
        return y.reshape(B, L, h), logits.reshape(B, L, -1)


class ExpertGroups(NamedTuple):
    row: mx.array  # (T*k,): the padded row of each (token, slot) pair
    pair: mx.array  # (rows,): the pair in each padded row; T*k for a pad row
    expert: mx.array  # (rows // block,): the expert of each block, ascending


MAX_GROUP_BLOCK = 32


def default_max_block(in_dims: int, out_dims: int, threads: int | None = None) -> int:
    """The largest expert block for an (in, out) expert projection on this BLAS, with
    `threads` per matmul (default: what OpenBLAS has now): on one thread, where OpenBLAS
    has small-matrix kernels, the most rows they take (a power of two, at least 2; 4 for
    the small preset's 256 x 512); else 32, since sgemm's packed path, unlike those
    kernels, splits a block across threads (see `group_block_size`)."""
    from . import blas

    if threads is None:
        threads = blas.threads()
    block = MAX_GROUP_BLOCK
    if threads == 1 and blas.small_matrix_kernel_takes(2, out_dims, in_dims):
        block = 2
        while blas.small_matrix_kernel_takes(2 * block, out_dims, in_dims):
            block *= 2
    return block


def group_block_size(pairs: int, num_experts: int, max_block: int = MAX_GROUP_BLOCK) -> int:
    """Rows per block: the largest power of two up to `max_block` whose pad rows stay within
    an eighth of the pairs (every block is computed, so the static bound E * (block - 1) is
    what the padding costs); 1 for a handful of pairs (decoding).

    Each block is one BLAS call. Where OpenBLAS has small-matrix kernels (AVX-512 cores:
    SkylakeX, Cooperlake, Sapphire Rapids) a block of a few rows is multiplied as it is,
    and larger ones pay for packing the expert's weight on every call; elsewhere every
    call packs it, so larger blocks pay: `default_max_block` picks the cap. Measured on a
    2-core AMD EPYC, OpenBLAS 0.3.21, MoE block forward + backward at 2,048 tokens, 8
    experts, top-2 (4,096 pairs): with `Zen`-class kernels 2-row blocks took 606 ms, 16
    rows 229 ms, 32 and 64 rows 200-290 ms, dense 841 ms. With `Cooperlake` kernels, one
    thread, 1,024 tokens (medians of 6): 4-row blocks, w1 and w3 through an (in, out) copy
    (see `expert_matmul`), 79 ms; without the copy 110; 2 rows 87; 8, 16 and 32 rows 116,
    98 and 88. A small-preset training step (one thread a shard): 895 -> 826 ms against 2
    rows (alternating). On two threads (`scripts/levers.py`, 2,048 tokens) 32-row blocks
    take 113 ms, 4 rows 126, 2 rows 133.
    """
    block = 1
    while block < max_block and num_experts * (2 * block - 1) <= pairs // 8:
        block *= 2
    return block


def group_by_expert(indices: mx.array, num_experts: int, block: int) -> ExpertGroups:
    """Lay the (token, slot) pairs out by expert, each expert's run padded to whole blocks."""
    flat = indices.reshape(-1)
    pairs, E = flat.shape[0], num_experts
    one_hot = (flat[:, None] == mx.arange(E)).astype(mx.int32)
    counts = one_hot.sum(axis=0)
    padded = (counts + block - 1) // block * block
    end = mx.cumsum(padded)  # padded runs, expert by expert
    rank = mx.take_along_axis(mx.cumsum(one_hot, axis=0) - one_hot, flat[:, None], axis=-1).squeeze(-1)
    row = (end - padded)[flat] + rank  # earlier pairs of the same expert come first
    rows = (pairs + E * (block - 1)) // block * block  # the most any routing can need
    pair = mx.full((rows,), pairs, mx.int32)
    pair[row] = mx.arange(pairs, dtype=mx.int32)
    # Blocks past the last run belong to no expert; any id will do (their rows are zero).
    expert = mx.minimum((end <= mx.arange(0, rows, block)[:, None]).sum(axis=-1), E - 1)
    return ExpertGroups(row, pair, expert)


def scatter_gates(indices: mx.array, scores: mx.array, num_experts: int) -> mx.array:
    """(T, k) expert ids and weights -> (T, E) weights, zero off the chosen experts."""
    one_hot = indices[..., None] == mx.arange(num_experts)
    return (one_hot * scores[..., None]).sum(axis=-2)


# ---------------------------------------------------------------------- router losses
def _pooled(router_logits: list[mx.array] | mx.array, mask: mx.array | None) -> tuple[mx.array, mx.array]:
    """All layers' router logits as (N, E) float32 and a (N, 1) weight: the mask per layer, or ones.

    `mask` (B, L): 1 where a position is trained on, 0 on padding, which then neither
    counts as routed nor pulls the router losses.
    """
    layers = router_logits if isinstance(router_logits, (list, tuple)) else [router_logits]
    E = layers[0].shape[-1]
    logits = mx.concatenate([r.reshape(-1, E) for r in layers], axis=0).astype(mx.float32)
    if mask is None:
        return logits, mx.ones((logits.shape[0], 1), mx.float32)
    weight = mx.concatenate([mask.reshape(-1, 1).astype(mx.float32)] * len(layers), axis=0)
    return logits, weight


def load_balancing_loss(router_logits: list[mx.array] | mx.array, top_k: int, mask: mx.array | None = None) -> mx.array:
    """The Switch Transformer auxiliary loss in transformers' Mixtral form.

    Over all tokens of all layers together: E * sum_e f_e * P_e, where f_e is the share
    of (token, slot) routings that go to expert e, per slot, and P_e the mean router
    probability of e, both over the positions `mask` keeps. Equals
    `transformers...load_balancing_loss_func` (with its `attention_mask` for `mask`).
    """
    logits, weight = _pooled(router_logits, mask)
    E = logits.shape[-1]
    probs = mx.softmax(logits, axis=-1)
    chosen = mx.stop_gradient(mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k])
    routed = (chosen[..., None] == mx.arange(E)).astype(mx.float32)  # (N, k, E)
    total = weight.sum()
    tokens_per_expert = (routed * weight[..., None]).sum(axis=0) / total  # (k, E)
    prob_per_expert = (probs * weight).sum(axis=0) / total  # (E,)
    return (tokens_per_expert * prob_per_expert).sum() * E


def router_z_loss(router_logits: list[mx.array] | mx.array, mask: mx.array | None = None) -> mx.array:
    """ST-MoE's z-loss: mean over the kept positions of logsumexp(router logits)^2 (all layers pooled)."""
    logits, weight = _pooled(router_logits, mask)
    z = mx.logsumexp(logits, axis=-1, keepdims=True)
    return (z * z * weight).sum() / weight.sum()
