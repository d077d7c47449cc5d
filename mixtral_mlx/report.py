"""What a run shows: the progress bar, metrics.jsonl, and PNG plots of the run so far."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm


class Reporter:
    """Progress bar + metrics.jsonl (one JSON object a line: steps, evaluations, samples)."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, flops_per_token: float,
                 peak_flops: float, enabled: bool = True, wandb_project: str | None = None, config=None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.metrics_file = self.run_dir / "metrics.jsonl"
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, mininterval=0.5)
        self.wandb = None
        if enabled and wandb_project:
            try:
                import wandb
            except ImportError:
                tqdm.write("wandb is not installed: pip install wandb (continuing without it)")
            else:
                self.wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir))

    def truncate(self, last_step: int) -> None:
        """On resume: forget what was logged after the checkpoint we resume from."""
        if not self.enabled or not self.metrics_file.exists():
            return
        keep = [line for line in self.metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= last_step]
        self.metrics_file.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def step(self, record: dict) -> None:
        """A training step: log it and update the bar (loss, lr, tokens/s, memory, MFU)."""
        tok_s = record["tokens_per_s"]
        record["mfu"] = tok_s * self.flops_per_token / self.peak_flops if self.peak_flops else float("nan")
        record["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        self.log(record)
        self.bar.set_postfix_str(
            f"loss {record['loss']:.3f} lr {record['lr']:.2e} {tok_s:,.0f} tok/s "
            f"mem {record['peak_memory_gb']:.2f}GB MFU {100 * record['mfu']:.1f}%", refresh=False)
        self.bar.update(1)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(metrics_file: Path) -> list[dict]:
    if not metrics_file.exists():
        return []
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path) -> list[Path]:
    """(Re)draw out/plots/*.png from metrics.jsonl; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    steps = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("split") == "val"]
    if not steps:
        return []
    out = Path(run_dir) / "plots"
    out.mkdir(exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    x = [r["step"] for r in steps]
    tokens = [r["tokens_seen"] for r in steps]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, xs, label in ((axes[0], x, "step"), (axes[1], tokens, "tokens seen")):
        ax.plot(xs, [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train")
        ax.plot(xs, _smooth([r["loss"] for r in steps]), lw=1.5, label="train (smoothed)")
        if evals:
            ex = [e["step"] for e in evals] if label == "step" else [e["tokens_seen"] for e in evals]
            ax.plot(ex, [e["loss"] for e in evals], "o-", label="val")
        ax.set_xlabel(label)
        ax.set_ylabel("cross-entropy (nats/token)")
        # Log scale: the late drops (a model learning to read its context) are a small
        # share of the first step's loss but a large share of what is left.
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle("loss")
    save(fig, "loss.png")

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    axes[0].plot(x, [r["lr"] for r in steps])
    axes[0].set_title("learning rate")
    axes[1].plot(x, [r["tokens_per_s"] for r in steps], lw=0.8)
    axes[1].set_title("tokens/s")
    axes[2].plot(x, [r["aux_loss"] for r in steps], label="load-balancing (aux)")
    axes[2].plot(x, [r["z_loss"] for r in steps], label="router z")
    axes[2].set_title("router losses")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    save(fig, "lr_throughput_router.png")

    loads = [(r["step"], np.array(r["expert_load"])) for r in steps if "expert_load" in r]
    if loads:
        load = np.stack([l for _, l in loads])  # (points, layers, E)
        layers, E = load.shape[1:]
        cols = min(4, layers)
        rows = math.ceil(layers / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.2, 3.0 * rows + 0.6), squeeze=False,
                                 layout="constrained")
        for i in range(rows * cols):
            ax = axes[i // cols][i % cols]
            if i >= layers:
                ax.axis("off")
                continue
            im = ax.imshow(load[:, i, :].T, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.0 / E, load.max()),
                           extent=(loads[0][0], max(loads[-1][0], loads[0][0] + 1), E - 0.5, -0.5),
                           interpolation="nearest")
            ax.set_title(f"layer {i}")
            ax.set_xlabel("step")
            ax.set_ylabel("expert")
        fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of routings")
        fig.suptitle(f"expert load over training (uniform = {1 / E:.3f})")
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(out / "expert_load.png")
    return written


def _smooth(values: list[float], alpha: float = 0.9) -> list[float]:
    out, s = [], None
    for v in values:
        s = v if s is None else alpha * s + (1 - alpha) * v
        out.append(s)
    return out
