"""Key/value caches for incremental decoding.

`KVCache` keeps every position (grown in steps, so appending is amortised O(1)).
`RollingKVCache` keeps only the last `window` positions in a ring buffer of `window`
slots: with sliding-window attention no query ever looks further back, so its memory
stays flat however long generation runs.

Both hand back keys in an order the attention mask understands: `update_and_fetch`
returns keys whose positions are the contiguous range ending at the newest token,
except for a single new token in a full ring, where every slot is visible and the
order does not matter (softmax attention is permutation invariant over keys).
"""

from __future__ import annotations

import mlx.core as mx


class _Cache:
    keys: mx.array | None
    values: mx.array | None
    offset: int

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys, self.values, self.offset


class KVCache(_Cache):
    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # number of positions seen so far

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape
        needed = self.offset + L
        if self.keys is None or needed > self.keys.shape[2]:
            grow = ((needed + self.step - 1) // self.step) * self.step - self.offset
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset : needed, :] = keys
        self.values[..., self.offset : needed, :] = values
        self.offset = needed
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    def trim(self, n: int) -> int:
        """Forget the newest n positions (to reuse a cached prefix); returns how many were forgotten."""
        n = min(n, self.offset)
        self.offset -= n
        return n


class RollingKVCache(_Cache):
    """A ring buffer of `window` slots; position p lives in slot p % window."""

    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def _temporal(self, buf: mx.array) -> mx.array:
        """The cached positions, oldest first."""
        n = min(self.offset, self.window)
        if self.offset <= self.window:
            return buf[..., :n, :]
        start = self.offset % self.window  # slot of the oldest position
        return mx.concatenate([buf[..., start:, :], buf[..., :start, :]], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        B, H, L, D = keys.shape
        W = self.window
        if self.keys is None:
            self.keys = mx.zeros((B, H, W, D), keys.dtype)
            self.values = mx.zeros((B, H, W, values.shape[3]), values.dtype)

        if L == 1:  # decoding: overwrite the oldest slot, attend to all filled slots
            slot = self.offset % W
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self.offset += 1
            n = min(self.offset, W)
            return self.keys[..., :n, :], self.values[..., :n, :]

        # Prefill (a chunk): queries need the previous W positions plus the chunk itself.
        all_k = mx.concatenate([self._temporal(self.keys), keys], axis=2)
        all_v = mx.concatenate([self._temporal(self.values), values], axis=2)
        self.offset += L
        # Keep the newest W positions, each in slot position % W.
        n = min(self.offset, W)
        keep_k, keep_v = all_k[..., -n:, :], all_v[..., -n:, :]
        if n < W:
            self.keys[..., :n, :] = keep_k
            self.values[..., :n, :] = keep_v
        else:
            shift = (self.offset - W) % W  # slot of the oldest kept position
            self.keys = mx.roll(keep_k, shift, axis=2)
            self.values = mx.roll(keep_v, shift, axis=2)
        return all_k, all_v

    def trim(self, n: int) -> int:
        """Forget the newest n positions; returns how many were forgotten.

        Only before the ring wraps (0 afterwards): once slots are overwritten, the
        positions the queries after a trimmed prefix would need are gone.
        """
        if self.offset > self.window:
            return 0
        n = min(n, self.offset)
        self.offset -= n
        return n


def make_cache(model, rolling: bool | None = None) -> list:
    """One cache per layer: rolling when the model has a sliding window (unless told otherwise)."""
    window = model.args.sliding_window
    if rolling is None:
        rolling = window is not None
    if rolling and window is None:
        raise ValueError("a rolling cache needs a model with a sliding_window")
    return [RollingKVCache(window) if rolling else KVCache() for _ in model.layers]
