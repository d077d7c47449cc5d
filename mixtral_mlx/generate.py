"""Text generation: one decoding loop behind four modes, streamed as complete text.

* `raw`: the logits after the prompt (`next_token_logits`), nothing sampled.
* `one-token`: a single next token, greedy (temperature 0) or sampled, with its log-prob.
* `greedy`: the most likely token at every step.
* `sample`: temperature, top-k, top-p and min-p sampling, applied in transformers' order.

The prompt is prefilled in chunks into the per-layer KV caches (a rolling buffer for
sliding-window models, so memory stays flat however long generation runs); every later
step feeds one token through the compiled one-token step (decode.py). Each step is
queued with `mx.async_eval` before the previous token is handed to the caller, so
Python work overlaps the model's.

`stream_generate` yields one `GenerationChunk` per token: the text that token completed
(never half a multi-byte character, never text that may still turn out to be part of a
stop string), its id and its log-probability under the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .cache import make_cache
from .cpu_decode import NumpyDecodeStep, decoder_for, held_bytes
from .errors import UserError

MODES = ("sample", "greedy", "one-token", "raw")
FINISH_REASONS = ("eos", "stop", "length", "context")


# ---------------------------------------------------------------------- settings
@dataclass
class GenerationConfig:
    """Everything that decides what `generate` produces; field names match the CLI flags."""

    mode: str = "sample"
    max_tokens: int = 256
    temp: float | None = None  # None: 1.0 when sampling, 0 (greedy) for one-token
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    top_logprobs: int = 0
    prefill_chunk: int = 512
    truncate_prompt: bool = False
    all_positions: bool = False  # raw mode: logits at every prompt position

    def validate(self) -> "GenerationConfig":
        def bad(name: str, why: str) -> UserError:
            return UserError(f"{why}, got {getattr(self, name)!r}", field="--" + name.replace("_", "-"))

        if self.mode not in MODES:
            raise bad("mode", f"unknown mode (choose from {', '.join(MODES)})")
        for name in ("max_tokens", "prefill_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise bad(name, "must be a positive integer")
        if self.temp is not None and not (self.temp >= 0 and math.isfinite(self.temp)):
            raise bad("temp", "must be a number >= 0")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 = off)")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise bad("repetition_penalty", "must be a number > 0 (1 = off)")
        if not isinstance(self.top_logprobs, int) or self.top_logprobs < 0:
            raise bad("top_logprobs", "must be an integer >= 0")
        if any(not s for s in self.stop):
            raise bad("stop", "stop strings must not be empty")
        return self

    @property
    def temperature(self) -> float:
        """The temperature the mode implies: greedy decoding is sampling at temperature 0."""
        if self.mode == "greedy":
            return 0.0
        if self.temp is None:
            return 1.0 if self.mode == "sample" else 0.0
        return self.temp


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0  # prefill, up to the first generated token
    generation_tokens: int = 0
    generation_seconds: float = 0.0  # after the first token
    peak_memory: int = 0  # bytes: MLX's allocator (weights included) + the NumPy decoding step's copies

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def generation_tps(self) -> float:
        """Decode speed: tokens after the first over the time they took."""
        n = self.generation_tokens - 1
        return n / self.generation_seconds if n > 0 and self.generation_seconds else 0.0

    def summary(self) -> str:
        return (f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s | "
                f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s | "
                f"peak memory: {self.peak_memory / 2**20:.1f} MiB")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "prompt_tps": self.prompt_tps, "generation_tps": self.generation_tps}


@dataclass
class GenerationChunk:
    """One generated token and the text it completed."""

    text: str  # '' while a character or a possible stop string is incomplete
    token: int
    logprob: float  # log-probability under the model (before penalty and temperature)
    top_logprobs: list[tuple[int, float]]  # the N most likely tokens, when asked for
    finish_reason: str | None  # set on the last chunk: eos, stop, length or context
    stats: GenerationStats


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None
    stats: GenerationStats
    logits: mx.array | None = None  # raw mode only: (vocab,) or (prompt length, vocab)


# ---------------------------------------------------------------------- sampling
@mx.compile
def log_softmax(logits: mx.array) -> mx.array:
    """logits - logsumexp(logits) over the last axis, written out so that `mx.compile` fuses its
    `exp` pass: 85 us for 8,000 float32 logits on a 2-core CPU, against 250 us for MLX's
    `logsumexp` called eagerly, a tenth of a small model's decoding step."""
    top = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    return logits - (top + mx.log(mx.exp(logits - top).sum(axis=-1, keepdims=True)))


def apply_top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits (and any tied with the k-th); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = mx.take_along_axis(logits, mx.argpartition(-logits, k - 1, axis=-1)[..., k - 1 : k], axis=-1)
    return mx.where(logits >= kth, logits, -mx.inf)


def apply_top_p(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus),
    and any tied with the least likely of them."""
    if p >= 1.0:
        return logits
    descending = -mx.sort(-logits, axis=-1)
    probs = mx.softmax(descending, axis=-1)
    kept = ((mx.cumsum(probs, axis=-1) - probs) < p).sum(axis=-1, keepdims=True)  # the most likely always stays
    # One sort and a threshold: mapping the kept prefix back through the sort's inverse
    # took two argsorts, the costliest step of a sampled token on a CPU.
    threshold = mx.take_along_axis(descending, kept - 1, axis=-1)
    return mx.where(logits >= threshold, logits, -mx.inf)


def apply_min_p(logits: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least min_p times as likely as the most likely one."""
    if min_p <= 0.0:
        return logits
    logprobs = log_softmax(logits)
    threshold = logprobs.max(axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logits, -mx.inf)


def apply_repetition_penalty(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """CTRL's penalty on every token already in the context (prompt and output), as transformers applies it:
    a positive logit is divided by the penalty, a negative one multiplied."""
    penalised = mx.where(logits > 0, logits / penalty, logits * penalty)
    return mx.where(seen, penalised, logits)


def make_sampler(temp: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
                 ) -> Callable[[mx.array, mx.array | None], mx.array]:
    """A function (logits (B, V), key) -> token ids (B,).

    Temperature 0 is argmax. Otherwise the filters see the tempered logits in
    transformers' order (temperature, top-k, top-p, min-p), then one categorical draw.
    """
    if temp == 0:
        return lambda logits, key=None: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array, key: mx.array | None = None) -> mx.array:
        logits = apply_min_p(apply_top_p(apply_top_k(logits / temp, top_k), top_p), min_p)
        return mx.random.categorical(logits, axis=-1, key=key)

    # With a key, compiled: its few operations on one row of logits cost more to dispatch
    # than to run (a draw at temperature 1 from 8,000 logits: 300 -> 90 us, 2-core CPU).
    keyed = mx.compile(sample)
    return lambda logits, key=None: sample(logits) if key is None else keyed(logits, key)


# ---------------------------------------------------------------------- prompts
# Where a model that never learned the default `### User:` template's EOS would go on.
PLAIN_CHAT_STOPS = ("\n### User:", "\n### System:")


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[list[int], list[str]]:
    """A conversation ({"role", "content"} dicts) as the token ids the model continues,
    encoded as fine-tuning encodes it (`Tokenizer.encode_chat`), and the stop strings that
    end the assistant's turn besides EOS."""
    ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
    return ids, [] if tokenizer.has_chat_template else list(PLAIN_CHAT_STOPS)


def encode_prompt(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """Text is encoded with the BOS token in front (as Mixtral was trained); ids pass through."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("the prompt is empty", field="--prompt")
        if tokenizer is None:
            raise UserError("the model directory has no tokenizer (tokenizer.model); give token ids", field="--model")
        return tokenizer.encode(prompt, bos=True)
    ids = [int(t) for t in prompt]
    if not ids:
        raise UserError("the prompt is empty", field="--prompt")
    return ids


def fit_prompt(ids: list[int], model, config: GenerationConfig, bos_id: int | None) -> list[int]:
    """The prompt, checked against the model's context; with truncate_prompt, its end."""
    context = model.args.max_position_embeddings
    vocab = model.args.vocab_size
    if bad := [t for t in ids if not 0 <= t < vocab]:
        raise UserError(f"token id {bad[0]} is outside the model's vocabulary (size {vocab})", field="--prompt")
    if len(ids) <= context:
        return ids
    if not config.truncate_prompt:
        raise UserError(f"the prompt has {len(ids)} tokens, more than the model's context of {context} "
                        "(use --truncate-prompt to keep its end)", field="--prompt")
    # Leave room for the answer, but keep at least half the context for the prompt.
    keep = max(context - config.max_tokens, context // 2)
    head = [bos_id] if bos_id is not None and ids[0] == bos_id else []
    return head + ids[len(ids) - keep + len(head):]


# ---------------------------------------------------------------------- the decoding loop
def prefill(model, ids: Sequence[int], cache: list, chunk: int = 512,
            progress: Callable[[int, int], None] | None = None) -> None:
    """Run `ids` through the model into `cache`, `chunk` tokens at a time.

    Only the caches are evaluated: MLX never computes the logits nobody asks for.
    """
    for start in range(0, len(ids), chunk):
        model(mx.array(ids[start : start + chunk])[None], cache)
        mx.eval([c.keys for c in cache] + [c.values for c in cache])
        if progress is not None:
            progress(min(start + chunk, len(ids)), len(ids))


def generate_step(model, prompt: Sequence[int], config: GenerationConfig, cache: list | None = None,
                  limit: int | None = None, progress: Callable[[int, int], None] | None = None
                  ) -> Iterator[tuple[int, mx.array]]:
    """Yield (token id, log-probs over the vocabulary) for up to `limit` new tokens.

    `cache` (see cache.make_cache) may already hold a prefix of `prompt`: only the rest is fed.
    """
    cache = make_cache(model) if cache is None else cache
    done = cache[0].offset
    if done >= len(prompt):
        raise ValueError("the cache must hold less than the whole prompt")
    prefill(model, prompt[done:-1], cache, config.prefill_chunk, progress)

    key = mx.random.key(config.seed if config.seed is not None else int.from_bytes(os.urandom(4), "little"))
    penalty = config.repetition_penalty
    seen = mx.array(False)  # the tokens in the context, for a repetition penalty
    if penalty != 1.0:
        seen = mx.zeros((model.args.vocab_size,), dtype=mx.bool_)
        seen[mx.array(prompt)] = True

    decode = decoder_for(model)  # the model on one token: NumPy matrix-vector products on a CPU, else compiled MLX
    if isinstance(decode, NumpyDecodeStep) and config.temperature == 0 and penalty == 1.0:
        yield from _greedy_in_numpy(decode, prompt[-1], cache, limit)
        return
    choose = _chooser(config.temperature, config.top_p, config.top_k, config.min_p, penalty)

    def step(token: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal key, seen
        logits = decode(token.reshape(1, 1), cache).astype(mx.float32)
        token, logprobs, key, seen = choose(logits, key, seen)
        return token, logprobs

    current = step(mx.array(prompt[-1:]))
    mx.async_eval(*current)
    n = 1
    while True:
        upcoming = None
        if limit is None or n < limit:
            upcoming = step(current[0])  # queued before the caller sees `current`
            mx.async_eval(*upcoming)
        yield current[0].item(), current[1]
        if upcoming is None:
            return
        current, n = upcoming, n + 1


@functools.lru_cache(maxsize=32)
def _chooser(temp: float, top_p: float, top_k: int, min_p: float, penalty: float):
    """(logits (1, V), key, seen) -> (token (1,), log-probs (V,), next key, seen with the
    token): what follows the model in each step of `generate_step`, compiled as one
    function, since on one row of logits dispatching its few operations one by one costs
    more than computing them."""
    sampler = make_sampler(temp, top_p, top_k, min_p)

    def choose(logits: mx.array, key: mx.array, seen: mx.array):
        logprobs = log_softmax(logits)
        if penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, penalty)
        subkey = None
        if temp > 0:
            key, subkey = mx.random.split(key)
        token = sampler(logits, subkey)
        if penalty != 1.0:
            seen = mx.where(mx.arange(seen.size) == token, True, seen)
        return token, logprobs[0], key, seen

    return mx.compile(choose)


def _greedy_in_numpy(decode: NumpyDecodeStep, token: int, cache: list, limit: int | None
                     ) -> Iterator[tuple[int, mx.array]]:
    """`generate_step` for greedy decoding on the NumPy step: the argmax and log-softmax in
    NumPy too. On one row of logits MLX's operations cost more to dispatch and wait for than
    they compute: small preset, 2-core CPU, 522 -> 589 tokens/s (medians of 20 alternating
    rounds of 128 tokens; the same tokens)."""
    n = 0
    while limit is None or n < limit:
        logits = decode.logits(token, cache)
        token, n = int(logits.argmax()), n + 1  # the first of equal maxima, as mx.argmax
        top = logits[token]
        yield token, mx.array(logits - (top + np.log(np.exp(logits - top).sum())))


class PromptCache:
    """KV caches that remember the tokens they hold.

    A prompt that starts with those tokens (the next turn of a chat) feeds only what is
    new; one that diverges trims the caches back to the common prefix, or starts afresh
    when a rolling cache has already overwritten what that would need.
    """

    def __init__(self, model):
        self.model = model
        self.cache = make_cache(model)
        self.tokens: list[int] = []  # prompt and output of the last call; the caches hold a prefix

    def begin(self, prompt: Sequence[int]) -> list:
        if len({c.offset for c in self.cache}) > 1:  # a forward pass was interrupted midway
            self.cache, self.tokens = make_cache(self.model), []
        held = self.tokens[: self.cache[0].offset]
        common = 0
        for a, b in zip(held, prompt[:-1]):  # the last prompt token is always fed
            if a != b:
                break
            common += 1
        excess = len(held) - common
        if excess and any(c.trim(excess) != excess for c in self.cache):
            self.cache = make_cache(self.model)
        self.tokens = list(prompt)
        return self.cache


# ---------------------------------------------------------------------- text
class StreamingDetokenizer:
    """Token ids in, complete text out, one token at a time.

    Decoding each token alone goes wrong twice over: SentencePiece strips the spaces at
    the start of a text ("▁world" alone decodes to "world"), and a byte-fallback token
    may be one byte of a multi-byte character. So new tokens are decoded after an
    anchor, the shortest run of the tokens before them whose text holds something other
    than whitespace (nothing is stripped past it), and they add what follows the
    anchor's own text. Text ending in U+FFFD ends in an unfinished character; since one
    has at most 4 bytes, its bytes lie in the last 3 tokens, and what comes before them
    is emitted at once. Each step decodes a few tokens: linear in the output.
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.anchor = self._anchor(list(context))
        self.pending: list[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        """The text that `token` completes ('' while a character is unfinished)."""
        self.pending.append(token)
        text = self._decode(len(self.pending))
        if not text.endswith("\ufffd"):
            return self._flush(text, len(self.pending))
        for held in range(1, min(3, len(self.pending) - 1) + 1):
            if not (text := self._decode(len(self.pending) - held)).endswith("\ufffd"):
                return self._flush(text, len(self.pending) - held)
        if len(self.pending) > 3:  # invalid bytes: no character can still complete them
            return self._flush(self._decode(len(self.pending) - 3), len(self.pending) - 3)
        return ""

    def finalize(self) -> str:
        """Whatever is still waiting, as it decodes."""
        return self._flush(self._decode(len(self.pending)), len(self.pending)) if self.pending else ""

    def _decode(self, n: int) -> str:
        return self.tokenizer.decode(self.anchor + self.pending[:n])

    def _anchor(self, tokens: list[int]) -> list[int]:
        for n in range(1, len(tokens) + 1):
            if self.tokenizer.decode(tokens[-n:]).strip():
                return tokens[-n:]
        return tokens  # only whitespace back to the start, which decoding strips anyway

    def _flush(self, text: str, n: int) -> str:
        """Emit `text` (the anchor and the first n pending tokens, decoded) past the anchor's text."""
        head = self.tokenizer.decode(self.anchor)
        piece = text[len(os.path.commonprefix([head, text])):]
        self.anchor, self.pending = self._anchor(self.anchor + self.pending[:n]), self.pending[n:]
        self.text += piece
        return piece


def token_text(tokenizer, context: Sequence[int], token: int) -> str:
    """The text `token` adds after `context` (its leading space included)."""
    detokenizer = StreamingDetokenizer(tokenizer, context)
    return detokenizer.add(token) + detokenizer.finalize()


class StopStrings:
    """Finds stop strings in the growing output and holds back text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.text = ""
        self.emitted = 0  # characters of self.text handed out

    def add(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached)."""
        self.text += piece
        if not self.stops:
            return self._emit(len(self.text)), False
        # Text already emitted never starts a stop string (it would have been held back).
        hits = [i for s in self.stops if (i := self.text.find(s, self.emitted)) >= 0]
        if hits:
            return self._emit(min(hits)), True
        return self._emit(len(self.text) - self._held_back()), False

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted : end], end
        return out


# ---------------------------------------------------------------------- the public API
def _config(settings: dict) -> GenerationConfig:
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown := sorted(set(settings) - names):
        raise TypeError(f"unknown generation setting {unknown[0]!r} (known: {', '.join(sorted(names))})")
    return GenerationConfig(**settings).validate()


def _prompt_ids(model, tokenizer, prompt, config: GenerationConfig) -> list[int]:
    return fit_prompt(encode_prompt(tokenizer, prompt), model, config, getattr(tokenizer, "bos_id", None))


def stream_generate(model, tokenizer, prompt: str | Sequence[int], *, cache: PromptCache | None = None,
                    progress: Callable[[int, int], None] | None = None, **settings) -> Iterator[GenerationChunk]:
    """Generate from `prompt` (text, or token ids), yielding a `GenerationChunk` per token.

    `settings` are `GenerationConfig` fields (mode, max_tokens, temp, top_p, top_k, min_p,
    repetition_penalty, seed, stop, top_logprobs, prefill_chunk, truncate_prompt). Stops at
    EOS, a stop string, max_tokens or the end of the model's context. A `PromptCache`
    carries the caches from one call to the next (a chat); `progress(done, total)` is
    called after each prefill chunk.
    """
    config = _config(settings)
    if config.mode == "raw":
        raise UserError("raw mode samples nothing; use next_token_logits", field="--mode")
    ids = _prompt_ids(model, tokenizer, prompt, config)
    max_tokens = 1 if config.mode == "one-token" else config.max_tokens
    # n new tokens feed len(ids) + n - 1 positions; positions beyond the context were never trained.
    room = model.args.max_position_embeddings - len(ids) + 1
    eos_id = tokenizer.eos_id if tokenizer is not None else model.args.eos_token_id

    detokenizer = StreamingDetokenizer(tokenizer, ids) if tokenizer is not None else None
    stops = StopStrings(config.stop)
    stats = GenerationStats(prompt_tokens=len(ids))
    kv = cache.begin(ids) if cache is not None else None
    mx.reset_peak_memory()
    start = time.perf_counter()
    steps = generate_step(model, ids, config, kv, min(max_tokens, room), progress)
    for n, (token, logprobs) in enumerate(steps, start=1):
        now = time.perf_counter()
        if n == 1:
            stats.prompt_seconds, start = now - start, now
        stats.generation_tokens, stats.generation_seconds = n, now - start
        if cache is not None:
            cache.tokens.append(token)
        finish = "eos" if token == eos_id else "length" if n >= max_tokens else "context" if n >= room else None
        text = ""
        if detokenizer is not None:
            text = detokenizer.add(token) if finish != "eos" else ""
            text += detokenizer.finalize() if finish is not None else ""
        text, stopped = stops.add(text)
        if stopped:
            finish = "stop"
        elif finish is not None:
            text += stops.flush()
        stats.peak_memory = mx.get_peak_memory() + held_bytes(model)
        yield GenerationChunk(text, token, logprobs[token].item(), _top(logprobs, config.top_logprobs), finish,
                              dataclasses.replace(stats))
        if finish is not None:
            return


def _top(logprobs: mx.array, n: int) -> list[tuple[int, float]]:
    """The n most likely (token id, log-prob) pairs, most likely first."""
    if n <= 0:
        return []
    n = min(n, logprobs.shape[-1])
    ids = mx.argpartition(-logprobs, n - 1)[:n]
    order = mx.argsort(-logprobs[ids])
    return list(zip(ids[order].tolist(), logprobs[ids[order]].tolist()))


def _logits(model, ids: list[int], config: GenerationConfig) -> mx.array:
    cache = make_cache(model)
    if not config.all_positions:
        prefill(model, ids[:-1], cache, config.prefill_chunk)
        return model(mx.array(ids[-1:])[None], cache)[0, -1].astype(mx.float32)
    chunks = []
    for start in range(0, len(ids), config.prefill_chunk):
        chunks.append(model(mx.array(ids[start : start + config.prefill_chunk])[None], cache)[0].astype(mx.float32))
        mx.eval(chunks[-1])
    return mx.concatenate(chunks, axis=0)


def next_token_logits(model, tokenizer, prompt: str | Sequence[int], *, all_positions: bool = False,
                      prefill_chunk: int = 512, truncate_prompt: bool = False) -> mx.array:
    """The model's float32 logits after `prompt`: (vocab,), or (prompt length, vocab) at every position."""
    config = _config(dict(mode="raw", all_positions=all_positions, prefill_chunk=prefill_chunk,
                          truncate_prompt=truncate_prompt))
    return _logits(model, _prompt_ids(model, tokenizer, prompt, config), config)


def generate(model, tokenizer, prompt: str | Sequence[int], mode: str = "sample", **settings) -> GenerationResult:
    """Run one of the four modes to the end (see the module docstring and `stream_generate`).

    raw mode returns the logits in `.logits` (and the top `top_logprobs` next tokens);
    the other modes the text, tokens and log-probs of what was generated.
    """
    config = _config(dict(settings, mode=mode))
    if mode != "raw":
        chunks = list(stream_generate(model, tokenizer, prompt, **dataclasses.asdict(config)))
        return GenerationResult(
            text="".join(c.text for c in chunks),
            tokens=[c.token for c in chunks],
            logprobs=[c.logprob for c in chunks],
            top_logprobs=[c.top_logprobs for c in chunks],
            finish_reason=chunks[-1].finish_reason,
            stats=chunks[-1].stats,
        )
    ids = _prompt_ids(model, tokenizer, prompt, config)
    stats = GenerationStats(prompt_tokens=len(ids))
    mx.reset_peak_memory()
    start = time.perf_counter()
    logits = _logits(model, ids, config)
    mx.eval(logits)
    stats.prompt_seconds, stats.peak_memory = time.perf_counter() - start, mx.get_peak_memory()
    last = logits if logits.ndim == 1 else logits[-1]
    top = _top(log_softmax(last), config.top_logprobs)
    return GenerationResult("", [], [], [top] if top else [], None, stats, logits)
