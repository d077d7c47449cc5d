"""Look inside a model: capture per-layer activations, and the statistics built on them.

`capture(model, layers, what)` is a context manager. Inside it every chosen decoder layer
records what it computes in the forward calls made there:

    with capture(model, layers=[0, -1], what=("router", "attention")) as rec:
        model(ids)
    rec.experts[0]      # (B, L, k) the experts each token went to, best first
    rec.attention[-1]   # (B, heads, L, L) attention weights of the last layer

It changes nothing in the model's code path: each chosen layer is replaced, for the
duration of the block, by a probe that calls it unchanged and keeps its input, output and
router logits, and attention weights come from a hook on `Attention.qkv` that sees the
queries and keys the fused attention kernel gets and softmaxes them itself (explicit
weights cost O(L^2) memory, which is why they are computed only while capturing). Outputs
inside the block are bit-identical to outputs outside it.

The rest of the module turns captures into numbers: expert usage per layer and data set
(`collect_routing` + `expert_statistics`), attention summaries and hidden-state norms.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .attention import attention_mask
from .cache import RollingKVCache

CAPTURABLE = ("hidden", "router", "attention")


# ---------------------------------------------------------------------- capture
class Recording:
    """What a `capture` block saw in each captured layer, as dicts keyed by layer index
    (negative indices count from the end).

    Successive forward calls are taken to continue one sequence, as decoding with a KV
    cache does: values are concatenated along the sequence axis, and attention maps are
    laid out over absolute positions (queries x every position seen so far). Call
    `clear()` between unrelated inputs.
    """

    def __init__(self, layers: list[int], what: tuple[str, ...], num_layers: int, top_k: int):
        self.layers, self.what, self.num_layers, self.top_k = layers, what, num_layers, top_k
        self.clear()

    def clear(self) -> None:
        self._inputs: list[mx.array] = []  # inputs of the first layer: the embeddings when it is layer 0
        self._hidden: dict[int, list[mx.array]] = {i: [] for i in self.layers}
        self._router: dict[int, list[mx.array]] = {i: [] for i in self.layers}
        self._attention: dict[int, list[tuple[mx.array, np.ndarray, int]]] = {i: [] for i in self.layers}

    # What the probes call --------------------------------------------------------
    def _on_layer(self, index: int, x: mx.array, out: mx.array, router_logits: mx.array) -> None:
        if "hidden" in self.what:
            if index == self.layers[0]:
                self._inputs.append(x)
            self._hidden[index].append(out)
        if "router" in self.what:
            self._router[index].append(router_logits)

    def _on_attention(self, index: int, attention, q: mx.array, k: mx.array, offset: int, cache) -> None:
        L, n_keys = q.shape[2], k.shape[2]
        mask = attention_mask(L, n_keys, offset, attention.window)
        weights = attention_weights(q, k, mask, attention.scale)
        self._attention[index].append((weights, key_positions(cache, L, n_keys, offset), offset))

    # What users read ---------------------------------------------------------------
    def _by_layer(self, values: dict) -> "ByLayer":
        return ByLayer(values, self.num_layers)

    def _require(self, kind: str, store: dict) -> None:
        if kind not in self.what:
            raise ValueError(f"{kind} was not captured (what={self.what})")
        if not any(store.values()):
            raise ValueError("nothing captured: run a forward pass inside the capture block")

    @property
    def router_logits(self) -> ByLayer:
        """Per layer (B, L, E) router logits."""
        self._require("router", self._router)
        return self._by_layer({i: _concat(v) for i, v in self._router.items()})

    @property
    def experts(self) -> ByLayer:
        """Per layer (B, L, k): the experts each token was routed to, highest gate first."""
        return self._by_layer({i: ranked_experts(r, self.top_k)[0] for i, r in self.router_logits.items()})

    @property
    def gates(self) -> ByLayer:
        """Per layer (B, L, k): the weights of `experts` in the layer's output (they sum to 1)."""
        return self._by_layer({i: ranked_experts(r, self.top_k)[1] for i, r in self.router_logits.items()})

    @property
    def hidden(self) -> ByLayer:
        """Per layer (B, L, hidden): the layer's output (the residual stream after it)."""
        self._require("hidden", self._hidden)
        return self._by_layer({i: _concat(v) for i, v in self._hidden.items()})

    @property
    def hidden_states(self) -> list[mx.array]:
        """The embeddings, then every layer's output: `Model.forward(..., hidden_states=True)`'s list."""
        hidden = self.hidden
        if len(self.layers) != self.num_layers:
            raise ValueError("hidden_states needs every layer captured (layers=None)")
        return [_concat(self._inputs)] + [hidden[i] for i in self.layers]

    @property
    def attention(self) -> ByLayer:
        """Per layer (B, heads, queries, positions) attention weights; each row sums to 1."""
        self._require("attention", self._attention)
        return self._by_layer({i: _assemble_attention(v) for i, v in self._attention.items()})


class _LayerProbe(nn.Module):
    """Stands in for a decoder layer inside `capture`: calls it unchanged and records."""

    def __init__(self, layer: nn.Module, index: int, recording: Recording):
        super().__init__()
        self.layer = layer
        self.index = index
        self.recording = recording

    def __call__(self, x: mx.array, cache=None):
        out, router_logits = self.layer(x, cache)
        self.recording._on_layer(self.index, x, out, router_logits)
        return out, router_logits


def _recording_qkv(attention, qkv, index: int, recording: Recording, x: mx.array, cache=None):
    q, k, v, offset = qkv(x, cache)
    recording._on_attention(index, attention, q, k, offset, cache)
    return q, k, v, offset


@contextlib.contextmanager
def capture(model, layers: list[int] | int | None = None, what=CAPTURABLE):
    """Record hidden states, router logits / chosen experts and attention weights.

    `layers`: indices (negative count from the end) or None for every layer. `what`: any
    of "hidden", "router", "attention". Yields a `Recording`; the model is restored on
    exit, even after an error. Not for use under `mx.compile` (probes record in Python).
    """
    what = (what,) if isinstance(what, str) else tuple(what)
    unknown = [w for w in what if w not in CAPTURABLE]
    if unknown or not what:
        raise ValueError(f"what={what!r}: choose from {CAPTURABLE}")
    indices = resolve_layers(layers, len(model.layers))
    originals = list(model.layers)
    if any(isinstance(layer, _LayerProbe) for layer in originals):
        raise RuntimeError("capture blocks cannot be nested on one model")
    recording = Recording(indices, what, len(model.layers), model.args.num_experts_per_tok)
    hooked = []
    try:
        for i in indices:
            model.layers[i] = _LayerProbe(originals[i], i, recording)
            if "attention" in what:
                attention = originals[i].self_attn
                # An instance attribute shadows the method: Attention.__call__ then gets its
                # queries and keys through the hook and runs exactly as before.
                attention.qkv = functools.partial(_recording_qkv, attention, attention.qkv, i, recording)
                hooked.append(attention)
        yield recording
    finally:
        for attention in hooked:
            del attention.qkv
        model.layers[:] = originals


def resolve_layers(layers: list[int] | int | None, num_layers: int) -> list[int]:
    """Layer indices (negatives from the end) -> sorted, distinct, non-negative indices."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = set()
    for i in layers:
        if not -num_layers <= i < num_layers:
            raise ValueError(f"layer {i} is out of range for a model with {num_layers} layers")
        out.add(i % num_layers)
    return sorted(out)


class ByLayer(dict):
    """{layer index: value}, also indexed from the end: rec.experts[-1] is the last layer's."""

    def __init__(self, values: dict, num_layers: int):
        super().__init__(values)
        self.num_layers = num_layers

    def __missing__(self, key):
        if isinstance(key, int) and -self.num_layers <= key < 0 and key % self.num_layers in self:
            return self[key % self.num_layers]
        raise KeyError(f"layer {key} was not captured (captured: {sorted(self)})")


def _concat(arrays: list[mx.array]) -> mx.array:
    return arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=1)


# ---------------------------------------------------------------------- routing and attention
def ranked_experts(router_logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(..., E) logits -> the top-k experts (..., k), best first, and their gate weights.

    The same rule as `SparseMoeBlock.route` (softmax over the k chosen logits, in float32);
    only the order differs (route's argpartition leaves it unspecified).
    """
    experts = mx.argsort(-router_logits, axis=-1)[..., :k]
    chosen = mx.take_along_axis(router_logits, experts, axis=-1)
    return experts, mx.softmax(chosen.astype(mx.float32), axis=-1)


def router_entropy(router_logits: mx.array) -> mx.array:
    """Entropy (nats) of the router's softmax over all experts, per token."""
    z = router_logits.astype(mx.float32)
    lse = mx.logsumexp(z, axis=-1, keepdims=True)
    p = mx.exp(z - lse)
    return lse[..., 0] - (p * z).sum(axis=-1)


def attention_weights(q: mx.array, k: mx.array, mask, scale: float) -> mx.array:
    """softmax(q k^T * scale) under `mask` (as `attention_mask` returns it), in float32.

    q: (B, heads, L, D), k: (B, kv_heads, S, D) -> (B, heads, L, S); query head h reads
    key head h // (heads / kv_heads), as the fused kernel does.
    """
    B, H, L, D = q.shape
    kv_heads, S = k.shape[1], k.shape[2]
    q = q.astype(mx.float32).reshape(B, kv_heads, H // kv_heads, L, D)
    scores = (q @ k.astype(mx.float32)[:, :, None].swapaxes(-1, -2)) * scale
    scores = scores.reshape(B, H, L, S)
    if isinstance(mask, str):  # "causal": aligned to the last key, as the kernel aligns it
        mask = mx.arange(S)[None, :] <= mx.arange(L)[:, None] + (S - L)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    return mx.softmax(scores, axis=-1)


def key_positions(cache, q_len: int, n_keys: int, offset: int) -> np.ndarray:
    """The absolute position of each key an attention call saw (see cache.py's contract)."""
    last = offset + q_len - 1
    if isinstance(cache, RollingKVCache) and q_len == 1:
        # Decoding from a ring: slot s holds the newest position congruent to s mod window.
        return last - (last - np.arange(n_keys)) % cache.window
    return np.arange(last - n_keys + 1, last + 1)


def _assemble_attention(calls: list[tuple[mx.array, np.ndarray, int]]) -> mx.array:
    """Per-call maps over the keys each call saw -> one map over all positions."""
    total = max(offset + w.shape[2] for w, _, offset in calls)
    rows = []
    for weights, positions, _ in calls:
        order = np.argsort(positions)
        weights = mx.take(weights, mx.array(order), axis=-1)
        first, last = int(positions[order[0]]), int(positions[order[-1]])
        rows.append(mx.pad(weights, [(0, 0), (0, 0), (0, 0), (first, total - 1 - last)]))
    return rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=2)


def attention_summary(weights: np.ndarray) -> dict[str, list[float]]:
    """Per head, for one (heads, L, L) map: mean entropy of a row, mean distance looked back,
    and the mean weight on the first token (a "sink"), on the token itself and on the previous one."""
    H, L, _ = weights.shape
    w = weights.astype(np.float64)
    distance = np.arange(L)[:, None] - np.arange(L)[None, :]
    entropy = -(w * np.log(np.where(w > 0, w, 1))).sum(-1)
    prev = np.array([np.diagonal(w[h], offset=-1).mean() if L > 1 else 0.0 for h in range(H)])
    return {
        "entropy": entropy.mean(-1).tolist(),
        "mean_distance": (w * np.clip(distance, 0, None)).sum(-1).mean(-1).tolist(),
        "first_token": w[:, :, 0].mean(-1).tolist(),
        "self": np.diagonal(w, axis1=1, axis2=2).mean(-1).tolist(),
        "previous": prev.tolist(),
    }


def hidden_summary(hidden_states: np.ndarray) -> dict[str, list]:
    """(layers + 1, L, hidden) -> per layer and token L2 norms, and how much each layer turns
    the residual stream: the mean cosine similarity of a token's state to its state before the layer."""
    h = hidden_states.astype(np.float64)
    norms = np.linalg.norm(h, axis=-1)
    cosine = (h[1:] * h[:-1]).sum(-1) / np.maximum(norms[1:] * norms[:-1], 1e-30)
    return {"norms": norms.tolist(), "mean_norm": norms.mean(-1).tolist(),
            "cosine_to_previous": cosine.mean(-1).tolist()}


# ---------------------------------------------------------------------- tokens
def display_text(piece: str) -> str:
    """A piece as text: '▁' back to a space, byte pieces like <0x0A> to their character."""
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        code = int(piece[3:5], 16)  # bytes past ASCII are parts of a UTF-8 character: left as they are
        return chr(code) if code < 0x80 and (chr(code).isprintable() or chr(code) in "\n\t") else piece
    return piece.replace("▁", " ")


TOKEN_KINDS = ("special", "word start", "word piece", "number", "punctuation", "space", "byte")


def token_kinds(tokenizer, vocab_size: int) -> np.ndarray:
    """A kind (index into TOKEN_KINDS) for every id in the vocabulary, from how the token is spelled."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    pieces = tokenizer.pieces(range(min(vocab_size, tokenizer.vocab_size)))
    kinds = np.zeros(vocab_size, dtype=np.int64)  # ids past the tokenizer's vocabulary stay "special"
    for i, piece in enumerate(pieces):
        kinds[i] = TOKEN_KINDS.index("special" if i in special else _kind(piece))
    return kinds


def _kind(piece: str) -> str:
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        return "byte"
    if piece.startswith("<") and piece.endswith(">") and len(piece) > 2:  # <unk>, <s>, <|im_start|>, ...
        return "special"
    word = piece.lstrip("▁ ")
    if not word or word.isspace():
        return "space"
    if word.isdigit():
        return "number"
    if not any(c.isalnum() for c in word):
        return "punctuation"
    return "word start" if word != piece else "word piece"


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """Powers-of-two ranges of positions [lo, hi): 0, 1, 2-3, 4-7, ... up to seq_len."""
    buckets, lo = [(0, 1)], 1
    while lo < seq_len:
        buckets.append((lo, min(2 * lo, seq_len)))
        lo *= 2
    return buckets


def bucket_label(lo: int, hi: int) -> str:
    return str(lo) if hi - lo == 1 else f"{lo}-{hi - 1}"


# ---------------------------------------------------------------------- data
def token_windows(stream: np.ndarray, max_tokens: int, seq_len: int) -> list[np.ndarray]:
    """Windows of `seq_len` tokens spread evenly over a token stream, about `max_tokens` in
    all, so that a sample covers the whole split rather than its first documents."""
    stream = np.asarray(stream, dtype=np.int64)
    seq_len = min(seq_len, max_tokens)
    if len(stream) <= max_tokens:
        return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    n = math.ceil(max_tokens / seq_len)
    starts = np.linspace(0, len(stream) - seq_len, n).round().astype(np.int64)
    return [stream[s : s + seq_len] for s in starts]


# ---------------------------------------------------------------------- expert usage
@dataclass
class Routing:
    """The routing of N tokens (in windows) through every layer."""

    experts: np.ndarray  # (N, layers, k) int, best first
    gates: np.ndarray  # (N, layers, k) float
    entropy: np.ndarray  # (N, layers) router entropy in nats
    tokens: np.ndarray  # (N,) token ids
    positions: np.ndarray  # (N,) position in its window; 0 starts a window
    num_experts: int

    @staticmethod
    def concatenate(parts: list["Routing"]) -> "Routing":
        return Routing(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                         ("experts", "gates", "entropy", "tokens", "positions")), parts[0].num_experts)


def collect_routing(model, windows: list[np.ndarray], batch_size: int = 8, progress=None) -> Routing:
    """Run the windows through the model (batched by length) and keep each token's routing.

    Only the router logits are evaluated, so MLX skips the last layer's experts and the head.
    """
    k = model.args.num_experts_per_tok
    by_length: dict[int, list[np.ndarray]] = {}
    for w in windows:
        by_length.setdefault(len(w), []).append(w)
    parts = []
    with capture(model, what=("router",)) as rec:
        for length, group in by_length.items():
            for b in range(0, len(group), batch_size):
                batch = np.stack(group[b : b + batch_size])
                model.forward(mx.array(batch))
                logits = mx.stack([rec.router_logits[i] for i in rec.layers], axis=2)  # (B, L, layers, E)
                experts, gates = ranked_experts(logits, k)
                entropy = router_entropy(logits)
                mx.eval(experts, gates, entropy)
                rec.clear()
                n = batch.size
                parts.append(Routing(
                    np.array(experts).reshape(n, -1, k), np.array(gates).reshape(n, -1, k),
                    np.array(entropy).reshape(n, -1), batch.reshape(-1),
                    np.tile(np.arange(length), len(batch)), logits.shape[-1]))
                if progress is not None:
                    progress.update(n)
    return Routing.concatenate(parts)


def expert_statistics(r: Routing, tokenizer=None, token_kind: np.ndarray | None = None,
                      seq_len: int | None = None, seed: int = 0, top_tokens: int = 8) -> dict:
    """Per layer: expert shares, gates, balance, entropy, dead experts, consecutive-token reuse.

    Shares count routing slots: `topk_share[e]` is the share of the N x k (token, slot)
    assignments that went to expert e, so each layer's shares sum to 1 (as top1_share's do);
    `mean_gate[e]` is e's mean weight in the output mix over all tokens (0 where not chosen),
    which also sums to 1. Chance rates for consecutive tokens come from pairing the same
    choices in a seeded random order (same usage, no sequence).
    """
    N, num_layers, k = r.experts.shape
    E = r.num_experts
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(N)
    consecutive = np.flatnonzero(r.positions[1:] > 0) + 1  # tokens whose predecessor is in their window
    layers = []
    for layer in range(num_layers):
        ex, gates = r.experts[:, layer], r.gates[:, layer]
        chosen = np.bincount(ex.ravel(), minlength=E)
        topk = chosen / (N * k)
        gate_sum = np.bincount(ex.ravel(), weights=gates.ravel(), minlength=E)
        stats = {
            "layer": layer,
            "top1_share": (np.bincount(ex[:, 0], minlength=E) / N).tolist(),
            "topk_share": topk.tolist(),
            "mean_gate": (gate_sum / N).tolist(),
            "mean_gate_when_chosen": [g / c if c else None for g, c in zip(gate_sum, chosen)],
            "imbalance": float(topk.max() * E),  # max / mean
            "cv": float(topk.std() / topk.mean()),
            "router_entropy": float(r.entropy[:, layer].mean()),
            "dead_experts": np.flatnonzero(chosen == 0).tolist(),
            "consecutive": {
                "pairs": int(len(consecutive)),
                "same_top1": _same_top1(ex, consecutive - 1, consecutive),
                "same_top1_chance": _same_top1(ex[shuffled], np.arange(N - 1), np.arange(1, N)),
                "overlap_topk": _overlap(ex, consecutive - 1, consecutive),
                "overlap_topk_chance": _overlap(ex[shuffled], np.arange(N - 1), np.arange(1, N)),
            },
        }
        if tokenizer is not None and top_tokens:
            stats["top_tokens"] = _top_tokens(r.tokens, ex[:, 0], E, tokenizer, top_tokens)
        layers.append(stats)
    out = {"tokens": int(N), "layers": layers}
    if token_kind is not None:
        out["by_kind"] = breakdown(r, token_kind[r.tokens], list(TOKEN_KINDS))
    if seq_len is not None:
        buckets = position_buckets(seq_len)
        edges = np.array([hi for _, hi in buckets])
        out["by_position"] = breakdown(r, np.searchsorted(edges, r.positions, side="right"),
                                       [bucket_label(lo, hi) for lo, hi in buckets])
    return out


def uniform_rates(num_experts: int, k: int) -> dict[str, float]:
    """What perfectly balanced, independent routing would give."""
    return {"share": 1 / num_experts, "same_top1": 1 / num_experts,
            "overlap_topk": 1 - math.comb(num_experts - k, k) / math.comb(num_experts, k)}


def breakdown(r: Routing, labels: np.ndarray, names: list[str]) -> dict:
    """For tokens grouped by `labels` (indices into `names`): per layer, each group's shares
    of the top-k slots over the experts (rows sum to 1; empty groups are dropped)."""
    N, num_layers, k = r.experts.shape
    E = r.num_experts
    counts = np.bincount(labels, minlength=len(names))
    keep = np.flatnonzero(counts)
    shares = []
    for layer in range(num_layers):
        pair = np.repeat(labels, k) * E + r.experts[:, layer].ravel()
        table = np.bincount(pair, minlength=len(names) * E).reshape(len(names), E)[keep]
        shares.append((table / table.sum(1, keepdims=True)).tolist())
    return {"groups": [names[g] for g in keep], "tokens": counts[keep].tolist(), "topk_share": shares}


def total_variation(a: list[float], b: list[float]) -> float:
    """Half the L1 distance of two usage distributions: 0 same, 1 disjoint."""
    return float(0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum())


def _same_top1(experts: np.ndarray, i: np.ndarray, j: np.ndarray) -> float | None:
    return float((experts[i, 0] == experts[j, 0]).mean()) if len(i) else None


def _overlap(experts: np.ndarray, i: np.ndarray, j: np.ndarray) -> float | None:
    """Share of pairs whose top-k sets share at least one expert."""
    if not len(i):
        return None
    return float((experts[i][:, :, None] == experts[j][:, None, :]).any(axis=(1, 2)).mean())


def _top_tokens(tokens: np.ndarray, top1: np.ndarray, E: int, tokenizer, n: int) -> list[list[dict]]:
    """Per expert, its most frequent top-1 tokens and the share of that token's uses it takes."""
    ids, inverse = np.unique(tokens, return_inverse=True)
    table = np.bincount(inverse * E + top1, minlength=len(ids) * E).reshape(len(ids), E)
    per_token = table.sum(1)
    out = []
    for e in range(E):
        best = [t for t in np.argsort(-table[:, e], kind="stable")[:n] if table[t, e] > 0]
        pieces = tokenizer.pieces(ids[best].tolist())
        out.append([{"id": int(ids[t]), "token": p, "count": int(table[t, e]),
                     "share": float(table[t, e] / per_token[t])} for t, p in zip(best, pieces)])
    return out
