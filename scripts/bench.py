"""Training and decoding speed of mixtral-mlx against mlx-lm and transformers, side by side.

One randomly initialised model of a preset's shape is saved in the Hugging Face format
(`mixtral_mlx.save`) and loaded by all three: our `mixtral_mlx.load`, mlx-lm's
`load_model` and transformers' `MixtralForCausalLM.from_pretrained`. Each framework runs
in a worker process of its own (so one's memory, caches and threads do not touch
another's), and the measurements interleave: round after round, every framework takes
its turn, and the table reports medians, so a machine that gets busier or quieter
mid-run affects all alike.

What each side runs:
* mixtral-mlx: the code the CLI trains with (`train.Trainer.train_step`: compiled
  gradient step, router losses, clipping, AdamW on float32 master weights) and decodes
  with (`generate.generate_step`, greedy: the NumPy one-token step of cpu_decode.py for
  a float32 model on a CPU, else the compiled step of decode.py queued with
  `mx.async_eval`).
* mlx-lm: its Mixtral with its trainer's loss (`tuner.trainer.default_loss`),
  `nn.value_and_grad` and AdamW, the whole step compiled as its trainer compiles it;
  decoding through its `generate_step`.
* transformers: `MixtralForCausalLM`, cross-entropy, `torch.optim.AdamW`, on a CUDA GPU
  when there is one, else with `torch.set_num_threads(2)`; decoding through `generate`
  (greedy, KV cache).

Every worker imports mixtral_mlx before mlx, so mlx-lm's matmuls use the same OpenBLAS
as ours (MLX's bundled reference BLAS is ~37x slower); torch brings its own BLAS. mlx-lm
runs MLX's fused kernels as MLX builds them by default; ours are built for this CPU
(cpu_jit.py); `--peer-cpu-jit` gives mlx-lm the same flags. mlx-lm keeps MLX's kernel
cache (TMPDIR) apart, one per set of flags, so it never loads a kernel built with ours,
and MLX's own evaluation order (ours is widened for its CPU streams, cpu_streams.py).

Memory is the peak of MLX's allocator for the MLX frameworks (weights, gradients,
optimizer state and activations) and, for transformers, torch's CUDA allocator peak on a
GPU or on a CPU the growth of the process's peak resident set over what it held after
importing torch (CPU torch keeps no allocator statistics). MFU counts model FLOPs (`info.flops_per_token`) against the measured float32
matmul rate on a CPU, or MIXTRAL_MLX_PEAK_TFLOPS on a GPU.

    python scripts/bench.py --preset small
    python scripts/bench.py --preset minimixtral-175m --dtype bfloat16 --skip-peer transformers
"""

from __future__ import annotations

import mixtral_mlx  # noqa: F401  (loads OpenBLAS before mlx is imported)

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import numpy as np

from mixtral_mlx import blas, cpu_jit, cpu_streams
from mixtral_mlx.config import load_preset, read_preset
from mixtral_mlx.info import flops_per_token
from mixtral_mlx.model import Model, init_weights

OURS, MLX_LM, TRANSFORMERS = "mixtral-mlx", "mlx-lm", "transformers"
CHECKPOINTED = "mixtral-mlx checkpointed"
PEERS = (MLX_LM, TRANSFORMERS)
LR, WEIGHT_DECAY = 1e-4, 0.1  # small enough that a few hundred steps of random tokens stay finite


# ---------------------------------------------------------------------- the frameworks
class Ours:
    """Training through `train.Trainer`, decoding through `generate.generate_step`."""

    def __init__(self, model_dir: Path, opts: dict, checkpointing: bool = False):
        from mixtral_mlx.train import TrainConfig, Trainer

        self.model, _ = mixtral_mlx.load(model_dir)
        cfg = TrainConfig(preset=opts["preset"], batch_size=opts["batch_size"], seq_len=opts["seq_len"],
                          dtype=opts["dtype"], lr=LR, min_lr=LR, warmup=0, weight_decay=WEIGHT_DECAY,
                          iters=10**6, grad_checkpoint=checkpointing, cpu_streams=opts.get("cpu_streams"))
        self.trainer = Trainer(self.model, cfg.validate())

    def train_step(self, batch: dict[str, np.ndarray]) -> None:
        self.model.train()
        self.trainer.train_step([batch])  # returns once the step is evaluated

    def prefill(self, prompt: list[int]) -> None:
        from mixtral_mlx.cache import make_cache

        self.model.eval()
        mx.eval(self.model(mx.array(prompt)[None], make_cache(self.model))[:, -1])

    def generate(self, prompt: list[int], n: int) -> list[int]:
        from mixtral_mlx.generate import GenerationConfig, generate_step

        self.model.eval()
        return [t for t, _ in generate_step(self.model, prompt, GenerationConfig(mode="greedy"), limit=n)]

    reset_peak_memory = staticmethod(mx.reset_peak_memory)
    peak_memory = staticmethod(mx.get_peak_memory)


class OursCheckpointed(Ours):
    def __init__(self, model_dir: Path, opts: dict):
        super().__init__(model_dir, opts, checkpointing=True)


class MlxLm:
    """mlx-lm's model, loss and compiled step, as `mlx_lm.tuner.trainer.train` runs them."""

    def __init__(self, model_dir: Path, opts: dict):
        from functools import partial

        import mlx.nn as nn
        import mlx.optimizers as optim
        from mlx_lm.tuner.trainer import default_loss
        from mlx_lm.utils import load_model

        self.model, _ = load_model(Path(model_dir))
        if opts["dtype"] != "float32":
            self.model.set_dtype(getattr(mx, opts["dtype"]))
        self.model.train()
        optimizer = optim.AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY)
        loss_and_grad = nn.value_and_grad(self.model, default_loss)
        self.state = [self.model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def step(batch, lengths):
            (loss, tokens), grads = loss_and_grad(self.model, batch, lengths)
            optimizer.update(self.model, grads)
            return loss, tokens

        self.step = step

    def train_step(self, batch: dict[str, np.ndarray]) -> None:
        self.model.train()
        ids = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
        lengths = np.array([[0, batch["inputs"].shape[1]]] * len(ids))  # (prompt offset, length): all targets
        loss, tokens = self.step(mx.array(ids), mx.array(lengths))
        mx.eval(self.state, loss, tokens)

    def prefill(self, prompt: list[int]) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.model.eval()
        mx.eval(self.model(mx.array(prompt)[None], cache=make_prompt_cache(self.model))[:, -1])

    def generate(self, prompt: list[int], n: int) -> list[int]:
        from mlx_lm.generate import generate_step

        self.model.eval()
        return [int(t) for t, _ in generate_step(mx.array(prompt), self.model, max_tokens=n)]

    reset_peak_memory = staticmethod(mx.reset_peak_memory)
    peak_memory = staticmethod(mx.get_peak_memory)


class Transformers:
    """`MixtralForCausalLM` with cross-entropy and torch's AdamW: on two threads, or on a CUDA GPU if there is one."""

    def __init__(self, model_dir: Path, opts: dict):
        import torch
        from transformers import MixtralForCausalLM

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            torch.set_num_threads(2)
        self.baseline = _rss()
        self.model = MixtralForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, opts["dtype"]))
        self.model.to("cuda" if self.cuda else "cpu")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def _tensor(self, values) -> "torch.Tensor":
        return self.torch.as_tensor(np.asarray(values), dtype=self.torch.long, device=self.model.device)

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def train_step(self, batch: dict[str, np.ndarray]) -> None:
        self.model.train()
        logits = self.model(input_ids=self._tensor(batch["inputs"])).logits
        loss = self.torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                      self._tensor(batch["targets"]).flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()

    def prefill(self, prompt: list[int]) -> None:
        self.model.eval()
        with self.torch.no_grad():
            self.model(input_ids=self._tensor([prompt]), use_cache=True).logits[:, -1].float().cpu()

    def generate(self, prompt: list[int], n: int) -> list[int]:
        self.model.eval()
        with self.torch.no_grad():
            out = self.model.generate(self._tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)
        return out[0, len(prompt):].tolist()

    def reset_peak_memory(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM)

    def peak_memory(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        return _status_kib("VmHWM") * 1024 - self.baseline


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


RUNNERS = {OURS: Ours, CHECKPOINTED: OursCheckpointed, MLX_LM: MlxLm, TRANSFORMERS: Transformers}


# ---------------------------------------------------------------------- one worker per framework
def _serve(name: str, model_dir: str, opts: dict, conn) -> None:
    """Build the framework, then answer (command, arguments) messages until told to stop."""
    try:
        runner = RUNNERS[name](Path(model_dir), opts)
    except Exception as e:  # reported by the parent, which goes on without this framework
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        command, kwargs = conn.recv()
        if command == "stop":
            return
        conn.send(("ok", COMMANDS[command](runner, **kwargs)))


def _train(runner, batches: list[dict[str, np.ndarray]]) -> dict:
    runner.reset_peak_memory()
    times = []
    for batch in batches:
        start = time.perf_counter()
        runner.train_step(batch)
        times.append(time.perf_counter() - start)
    return {"step_seconds": times, "peak_memory": runner.peak_memory()}


def _timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _prefill(runner, prompt: list[int]) -> dict:
    return {"seconds": _timed(runner.prefill, prompt)[0]}


def _generate(runner, prompt: list[int], n: int) -> dict:
    seconds, tokens = _timed(runner.generate, prompt, n)
    return {"seconds": seconds, "tokens": tokens}


COMMANDS = {"train": _train, "prefill": _prefill, "generate": _generate}


class Worker:
    def __init__(self, name: str, model_dir: Path, opts: dict, env: dict[str, str | None]):
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(name, str(model_dir), opts, child), daemon=True)
        saved = {k: os.environ.get(k) for k in env}
        for k, v in env.items():  # a spawned process starts with the environment as it is now; None: unset
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        try:
            self.process.start()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    def ready(self) -> str | None:
        """None once built, else why it could not be."""
        status, detail = self.conn.recv()
        return None if status == "ready" else detail

    def __call__(self, command: str, **kwargs):
        self.conn.send((command, kwargs))
        status, result = self.conn.recv()
        return result

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(("stop", {}))
        self.process.join(timeout=30)


# ---------------------------------------------------------------------- the run
def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "mixtral-mlx": mixtral_mlx.__version__}
    for dist in ("mlx", "mlx-lm", "torch", "transformers", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict:
    return {"system": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "processor": _cpu_name(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],  # other work sharing the machine
            # what tunes the libraries underneath (OPENBLAS_CORETYPE=Haswell halved the matmul rate here)
            "environment": {k: v for k, v in sorted(os.environ.items())
                            if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "MLX_", "MIXTRAL_MLX_"))}}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def random_batches(rng, n: int, batch_size: int, seq_len: int, vocab: int) -> list[dict[str, np.ndarray]]:
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, size=(batch_size, seq_len + 1), dtype=np.int32)
        out.append({"inputs": ids[:, :-1], "targets": ids[:, 1:], "mask": np.ones((batch_size, seq_len), np.float32)})
    return out


def worker_env(name: str, opts: dict, root: Path | None = None) -> dict[str, str]:
    """mlx-lm: stock MLX kernels unless asked, in a kernel cache (TMPDIR) of their own, so it
    never loads a kernel built with our flags, and MLX's own evaluation order (importing
    mixtral_mlx for OpenBLAS would widen it, see cpu_streams.py). Ours use MLX's usual cache."""
    if name != MLX_LM:
        return {}
    root = root or Path(tempfile.gettempdir()) / f"mixtral-mlx-{os.getuid()}" / "bench-kernels"
    flags = kernel_flags(name, opts)
    cache = root / f"{name}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"
    cache.mkdir(parents=True, exist_ok=True)
    order = {cpu_streams.ENV_VAR: "mlx", cpu_streams.WIDTH_VAR: None} if cpu_streams.widened else {}
    return {"TMPDIR": str(cache), **order, **({} if opts["peer_cpu_jit"] else {cpu_jit.ENV_VAR: "0"})}


def kernel_flags(name: str, opts: dict) -> str:
    return "MLX's default flags" if name == MLX_LM and not opts["peer_cpu_jit"] else cpu_jit.status


def _rotated(names: list[str], r: int) -> list[str]:
    """Round r starts with a different framework, so none always runs first (or last)."""
    return names[r % len(names):] + names[: r % len(names)]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def run(opts: dict, log=print) -> dict:
    from mixtral_mlx.pretrain import peak_flops

    args = load_preset(opts["preset"])
    B, L = opts["batch_size"], opts["seq_len"]
    names = [OURS, CHECKPOINTED] + [p for p in PEERS if p not in opts["skip_peer"]]
    rng = np.random.default_rng(0)
    train_batches = random_batches(rng, opts["steps"] * opts["rounds"] + opts["warmup"], B, L, args.vocab_size)
    prompt = rng.integers(0, args.vocab_size, size=opts["prompt_len"]).tolist()
    long_prompt = rng.integers(0, args.vocab_size, size=L).tolist()
    n_new = opts["decode_tokens"]
    decoders = [n for n in names if n != CHECKPOINTED]  # checkpointing changes training only

    started_on = machine()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        mixtral_mlx.save(init_weights(Model(args), seed=0), None, model_dir)
        log(f"starting {', '.join(names)} on a {opts['preset']} model ({model_dir})")
        workers = {n: Worker(n, model_dir, opts, worker_env(n, opts)) for n in names}
        for n in list(workers):
            if (why := workers[n].ready()) is not None:
                log(f"skipping {n}: {why}")
                workers.pop(n).close()
        names = [n for n in names if n in workers]
        decoders = [n for n in decoders if n in workers]
        results = {n: {"step_seconds": [], "peak_memory": 0, "prefill_seconds": [], "decode_seconds": []}
                   for n in names}
        try:
            # Decoding first, while every framework still holds the same weights.
            log("decoding: warming up")
            for n in decoders:
                workers[n]("prefill", prompt=long_prompt)
                workers[n]("generate", prompt=prompt, n=4)
            outputs = {n: workers[n]("generate", prompt=prompt, n=16)["tokens"] for n in decoders}
            for r in range(opts["rounds"]):
                log(f"decoding: round {r + 1}/{opts['rounds']}")
                for n in _rotated(decoders, r):
                    results[n]["prefill_seconds"].append(workers[n]("prefill", prompt=long_prompt)["seconds"])
                    one = workers[n]("generate", prompt=prompt, n=1)["seconds"]
                    many = workers[n]("generate", prompt=prompt, n=n_new + 1)["seconds"]
                    results[n]["decode_seconds"].append(many - one)  # n_new tokens after the first
            log("training: warming up (compilation)")
            for n in names:
                workers[n]("train", batches=train_batches[: opts["warmup"]])
            for r in range(opts["rounds"]):
                log(f"training: round {r + 1}/{opts['rounds']}")
                start = opts["warmup"] + r * opts["steps"]
                for n in _rotated(names, r):  # every framework trains on the same batches
                    out = workers[n]("train", batches=train_batches[start : start + opts["steps"]])
                    results[n]["step_seconds"] += out["step_seconds"]
                    results[n]["peak_memory"] = max(results[n]["peak_memory"], out["peak_memory"])
        finally:
            for w in workers.values():
                w.close()

    flops = flops_per_token(args, L)["train_step"]
    peak = peak_flops()
    for n, res in results.items():
        step = median(res["step_seconds"])
        res["step_time"] = step
        res["train_tokens_per_s"] = B * L / step
        res["mfu"] = res["train_tokens_per_s"] * flops / peak if peak else None
        if n in decoders:
            res["prefill_tokens_per_s"] = L / median(res["prefill_seconds"])
            res["decode_tokens_per_s"] = n_new / median(res["decode_seconds"])
    ratios = {}
    for peer in (p for p in PEERS if p in results):
        ours, theirs = results[OURS], results[peer]
        ratios[peer] = {k: ours[k] / theirs[k] for k in ("train_tokens_per_s", "prefill_tokens_per_s",
                                                         "decode_tokens_per_s", "peak_memory")}
        if CHECKPOINTED in results:
            ratios[peer]["peak_memory_checkpointed"] = results[CHECKPOINTED]["peak_memory"] / theirs["peak_memory"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "preset": opts["preset"], "dtype": opts["dtype"], "batch_size": B, "seq_len": L,
        "steps": opts["steps"], "rounds": opts["rounds"], "prompt_len": opts["prompt_len"],
        "decode_tokens": n_new, "config": args.to_hf(), "machine": started_on,
        "load_average_at_end": machine()["load_average"], "mlx_device": str(mx.default_device()),
        "blas": blas.status, "kernel_flags": {n: kernel_flags(n, opts) for n in results if n != TRANSFORMERS},
        "peak_flops": peak, "flops_per_token": flops, "versions": versions(),
        "greedy_tokens_agree": len({tuple(t) for t in outputs.values()}) == 1, "results": results, "ratios": ratios,
    }


def table(report: dict) -> str:
    res = report["results"]

    def mib(b):
        return f"{b / 2**20:,.0f} MiB"

    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    lines = [f"{report['preset']}, {report['dtype']}, batch {report['batch_size']} x {report['seq_len']}; "
             f"medians of {report['rounds']} rounds x {report['steps']} steps; {report['mlx_device']}; {report['blas']}; "
             f"load average {report['machine']['load_average'][0]} -> {report['load_average_at_end'][0]}",
             f"{'':<26}{'train tok/s':>12}{'step s':>9}{'peak memory':>13}{'MFU':>7}{'prefill tok/s':>15}"
             f"{'decode tok/s':>14}"]
    for n, r in res.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"{n:<26}{r['train_tokens_per_s']:>12,.0f}{r['step_time']:>9.3f}{mib(r['peak_memory']):>13}"
                     f"{mfu:>7}{num(r.get('prefill_tokens_per_s'), ',.0f'):>15}"
                     f"{num(r.get('decode_tokens_per_s'), ',.1f'):>14}")
    for peer, q in report["ratios"].items():
        memory = f"{q['peak_memory']:.2f}x"
        if "peak_memory_checkpointed" in q:
            memory += f" ({q['peak_memory_checkpointed']:.2f}x)"
        lines.append(f"{'ours / ' + peer:<26}{q['train_tokens_per_s']:>11.2f}x{'':>9}{memory:>13}{'':>7}"
                     f"{q['prefill_tokens_per_s']:>14.2f}x{q['decode_tokens_per_s']:>13.2f}x")
    if not report["greedy_tokens_agree"]:
        lines.append("note: the frameworks' greedy continuations differ (ties or float error on random weights)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model shape (default: small)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's training batch size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the preset's training sequence length")
    p.add_argument("--steps", type=int, default=1, help="timed training steps per framework per round")
    p.add_argument("--rounds", type=int, default=9, help="rounds of interleaved measurements (frameworks take turns)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first (compilation)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--decode-tokens", type=int, default=128, help="tokens decoded at batch 1")
    p.add_argument("--skip-peer", action="append", default=[], choices=PEERS, help="leave a peer out (repeatable)")
    p.add_argument("--cpu-streams", type=int, help="our training step's CPU streams (default: the trainer's)")
    p.add_argument("--peer-cpu-jit", action="store_true",
                   help="build mlx-lm's fused CPU kernels with our flags too (cpu_jit.py); default: MLX's")
    p.add_argument("--json", default=None, help="where to write the report (default: bench-PRESET-DTYPE.json)")
    a = p.parse_args()
    train = read_preset(a.preset).get("train", {})
    opts = {"preset": a.preset, "dtype": a.dtype, "batch_size": a.batch_size or train.get("batch_size", 8),
            "seq_len": a.seq_len or train.get("seq_len", 256), "steps": a.steps, "rounds": a.rounds,
            "warmup": a.warmup, "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens,
            "skip_peer": a.skip_peer, "peer_cpu_jit": a.peer_cpu_jit, "cpu_streams": a.cpu_streams}
    report = run(opts, log=lambda m: print(m, file=sys.stderr, flush=True))
    path = Path(a.json or f"bench-{a.preset}-{a.dtype}.json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
