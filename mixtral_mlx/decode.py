"""One decoding step (one new token per sequence over the KV caches), compiled.

A small model decoding on a CPU spends as much time dispatching its ~150 small ops per
token as computing them. `DecodeStep` traces the model's forward for one token once and
replays the compiled graph: its shapes stay static because the step reads each cache's
whole preallocated buffer with a mask of the filled slots, and takes the position as an
array. Results equal `model(tokens, caches)` (same caches, same updates) to float
rounding; the eager call runs instead where a cache has no free slot (an empty
cache, or a `KVCache` about to grow), after which the step is traced again for the new
capacity, once per `KVCache.step` positions.
"""

from __future__ import annotations

import mlx.core as mx

from .cache import KVCache, RollingKVCache


def has_free_slot(cache) -> bool:
    """Whether a one-token step can write into the cache's buffer as it is (else the eager call grows it)."""
    if isinstance(cache, RollingKVCache):
        return cache.keys is not None
    return type(cache) is KVCache and cache.keys is not None and cache.offset < cache.keys.shape[2]


class SlotView:
    """A cache's buffers as the compiled step sees them: write one slot, read all, mask the empty.

    `offset` is the new token's position (for RoPE), `slot` where its key is written;
    `slot_mask` marks the slots a query at `offset` may attend to (the attention reads it).
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, slot: mx.array, window: int | None):
        self.keys, self.values, self.offset, self.slot = keys, values, offset, slot
        positions = mx.arange(keys.shape[2])
        self.slot_mask = positions <= offset
        if window is not None:  # slots hold positions in order: drop those past the window
            self.slot_mask = self.slot_mask & (positions > offset - window)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start = self.slot.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values


class DecodeStep:
    """`step(tokens (B, 1), caches) -> logits (B, vocab)` of the next position, updating the caches."""

    def __init__(self, model):
        self.model = model
        self._compiled = {}  # by cache kind: a ring (no window mask) or positions in order

    def __call__(self, tokens: mx.array, caches: list) -> mx.array:
        if not all(has_free_slot(c) for c in caches):
            return self.model(tokens, caches)[:, -1]
        first = caches[0]
        ring = isinstance(first, RollingKVCache)
        slot = first.offset % first.window if ring else first.offset
        fn = self._compiled.get(ring)
        if fn is None:
            fn = self._compiled[ring] = self._compile(None if ring else self.model.args.sliding_window)
        logits, buffers = fn(tokens, mx.array(first.offset), mx.array(slot), [(c.keys, c.values) for c in caches])
        for c, (keys, values) in zip(caches, buffers):
            c.keys, c.values = keys, values
            c.offset += 1
        return logits

    def _compile(self, window: int | None):
        model = self.model

        def step(tokens, offset, slot, buffers):
            views = [SlotView(k, v, offset, slot, window) for k, v in buffers]
            logits = model(tokens, views)[:, -1]
            return logits, [(v.keys, v.values) for v in views]

        # The weights are read at every call (not frozen at the first), so the step
        # follows a model that trains or loads new weights between calls.
        return mx.compile(step, inputs=[model.state])


def decode_step(model) -> DecodeStep:
    """The model's `DecodeStep`, made on first use and kept with the model (its traces with it)."""
    step = getattr(model, "_decode_step", None)
    if step is None:
        step = model._decode_step = DecodeStep(model)
    return step
