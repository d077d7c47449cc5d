"""PNG figures for `mixtral-mlx analyze`: expert usage, token routes, attention maps, hidden norms.

Figures are drawn on matplotlib `Figure` objects with the Agg canvas directly, never through
pyplot, so no GUI back end is touched and the caller's matplotlib state is left alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm, Normalize, PowerNorm, TwoSlopeNorm
from matplotlib.figure import Figure

MAX_ANNOTATED_CELLS = 600  # beyond this, numbers in cells are too small to read
MAX_TICK_LABELS = 80  # beyond this, token labels on an axis overlap
MAX_PANEL_WIDTH = 14.0  # inches: many experts share the width rather than grow the figure


def _panel_width(num_experts: int) -> float:
    return min(max(3.0, 0.45 * num_experts + 1.2), MAX_PANEL_WIDTH)


def _save(fig: Figure, path: str | Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return Path(path)


def _annotate(ax, data: np.ndarray, image, fmt: str) -> None:
    """Write each cell's value, dark on light cells and light on dark ones."""
    if data.size > MAX_ANNOTATED_CELLS:
        return
    for (row, col), value in np.ndenumerate(data):
        if np.isnan(value):
            continue
        r, g, b, _ = image.cmap(image.norm(value))
        colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=7, color=colour)


def _token_axis(ax, axis: str, labels: list[str], rotation: int = 90) -> None:
    if len(labels) > MAX_TICK_LABELS:
        return
    ticks = range(len(labels))
    if axis == "x":
        ax.set_xticks(ticks, labels, rotation=rotation, fontsize=7)
    else:
        ax.set_yticks(ticks, labels, fontsize=7)


def _expert_axis(ax, num_experts: int) -> None:
    ax.set_xlabel("expert")
    ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)], fontsize=10 if num_experts <= 16 else 6)


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


# ---------------------------------------------------------------------- experts
def expert_shares(shares: dict[str, np.ndarray], path) -> Path:
    """One layer x expert heatmap per data set, on one colour scale, uniform usage marked."""
    names = list(shares)
    layers, E = shares[names[0]].shape
    fig = Figure(figsize=(_panel_width(E) * len(names) + 1.2, max(2.5, 0.32 * layers + 1.4)),
                 layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    norm = Normalize(0, max(float(s.max()) for s in shares.values()) * 100)
    for ax, name in zip(axes, names):
        image = ax.imshow(shares[name] * 100, cmap="viridis", norm=norm, aspect="auto")
        _annotate(ax, shares[name] * 100, image, "{:.0f}")
        ax.set_title(name, fontsize=10)
        _expert_axis(ax, E)
        ax.set_yticks(range(layers))
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="share of routed tokens (top-k slots), %", shrink=0.9)
    fig.suptitle(f"Expert usage per layer (uniform = {100 / E:.1f}%)")
    return _save(fig, path)


def expert_differences(shares: dict[str, np.ndarray], path) -> Path:
    """Layer x expert differences of usage between each pair of data sets (percentage points)."""
    names = list(shares)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    layers, E = shares[names[0]].shape
    diffs = [(shares[a] - shares[b]) * 100 for a, b in pairs]
    limit = max(max(float(np.abs(d).max()) for d in diffs), 1e-9)
    fig = Figure(figsize=(_panel_width(E) * len(pairs) + 1.2, max(2.5, 0.32 * layers + 1.4)),
                 layout="constrained")
    axes = fig.subplots(1, len(pairs), squeeze=False)[0]
    norm = TwoSlopeNorm(0, -limit, limit)
    for ax, (a, b), d in zip(axes, pairs, diffs):
        image = ax.imshow(d, cmap="RdBu_r", norm=norm, aspect="auto")
        _annotate(ax, d, image, "{:+.0f}")
        ax.set_title(f"{a} − {b}", fontsize=10)
        _expert_axis(ax, E)
        ax.set_yticks(range(layers))
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label="difference in share, percentage points", shrink=0.9)
    fig.suptitle("Where data sets use experts differently (red: more by the first)")
    return _save(fig, path)


def first_last_layers(shares: dict[str, np.ndarray], path) -> Path:
    """Per-expert usage by data set in the first, middle and last layers, as grouped bars."""
    names = list(shares)
    layers, E = shares[names[0]].shape
    chosen = sorted({0, layers // 2, layers - 1})
    fig = Figure(figsize=(min(max(4.0, 0.3 * E * len(names) + 1.5), 16.0) * len(chosen), 3.2), layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False, sharey=True)[0]
    width = 0.8 / len(names)
    colours = colormaps["tab10"]
    for ax, layer in zip(axes, chosen):
        for j, name in enumerate(names):
            ax.bar(np.arange(E) + (j - (len(names) - 1) / 2) * width, shares[name][layer] * 100, width,
                   label=name, color=colours(j % 10))
        ax.axhline(100 / E, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}", fontsize=10)
        _expert_axis(ax, E)
    axes[0].set_ylabel("share of routed tokens, %")
    axes[-1].legend(fontsize=8, loc="upper right")
    fig.suptitle("Expert usage by data set, first vs last layer (dashed: uniform)")
    return _save(fig, path)


def expert_breakdowns(breakdowns: dict[str, dict], path) -> Path:
    """For each breakdown (e.g. token kind, position), group x expert shares in the first and last layers."""
    titles = list(breakdowns)
    layers = len(next(iter(breakdowns.values()))["topk_share"])
    chosen = sorted({0, layers - 1})
    heights = [max(1.8, 0.3 * len(b["groups"]) + 1.0) for b in breakdowns.values()]
    E = len(next(iter(breakdowns.values()))["topk_share"][0][0])
    fig = Figure(figsize=((_panel_width(E) + 1.0) * len(chosen) + 1.0, sum(heights) + 0.8), layout="constrained")
    axes = fig.subplots(len(titles), len(chosen), squeeze=False, gridspec_kw={"height_ratios": heights})
    for row, title in enumerate(titles):
        b = breakdowns[title]
        labels = [f"{g} ({n:,})" for g, n in zip(b["groups"], b["tokens"])]
        data = [np.asarray(b["topk_share"][layer]) * 100 for layer in chosen]
        norm = Normalize(0, max(float(d.max()) for d in data))
        for ax, layer, d in zip(axes[row], chosen, data):
            image = ax.imshow(d, cmap="viridis", norm=norm, aspect="auto")
            _annotate(ax, d, image, "{:.0f}")
            ax.set_title(f"{title}, layer {layer}", fontsize=10)
            _expert_axis(ax, E)
            ax.set_yticks(range(len(labels)), labels if ax is axes[row][0] else [""] * len(labels), fontsize=8)
        fig.colorbar(image, ax=list(axes[row]), label="share of the group's\nrouted tokens, %", shrink=0.9)
    fig.suptitle(f"Expert usage by group of tokens, first vs last layer (uniform = {100 / E:.1f}%)")
    return _save(fig, path)


# ---------------------------------------------------------------------- routes
def expert_colours(num_experts: int) -> ListedColormap:
    name = "tab10" if num_experts <= 10 else "tab20"
    base = colormaps[name]
    return ListedColormap([base(e % base.N) for e in range(num_experts)])


def route_grid(tokens: list[str], experts: np.ndarray, gates: np.ndarray, num_experts: int, path,
               tokens_per_row: int = 32) -> Path:
    """Layers x tokens, each cell coloured by the token's first-choice expert and labelled with its
    top-k; long prompts wrap onto several rows of tokens."""
    layers, T, k = experts.shape
    cmap = expert_colours(num_experts).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(num_experts + 1) - 0.5, num_experts)
    blocks = [range(start, min(start + tokens_per_row, T)) for start in range(0, T, tokens_per_row)]
    width = 0.42 * min(T, tokens_per_row) + 2.0
    block_height = 0.36 * layers * (1 + 0.3 * (k - 1)) + 1.0
    fig = Figure(figsize=(width, block_height * len(blocks) + 0.6), layout="constrained")
    axes = fig.subplots(len(blocks), 1, squeeze=False)[:, 0]
    for ax, block in zip(axes, blocks):
        cells = experts[:, block.start : block.stop]
        first = np.full((layers, tokens_per_row), np.nan)  # a short last row keeps the cell width
        first[:, : len(block)] = cells[:, :, 0]
        image = ax.imshow(np.ma.masked_invalid(first), cmap=cmap, norm=norm, aspect="auto",
                          extent=(block.start - 0.5, block.start + tokens_per_row - 0.5, layers - 0.5, -0.5))
        if cells[:, :, 0].size <= 2 * MAX_ANNOTATED_CELLS:
            for (layer, t), _ in np.ndenumerate(cells[:, :, 0]):
                label = "\n".join(str(e) for e in cells[layer, t])
                ax.text(block.start + t, layer, label, ha="center", va="center", fontsize=6.5 if k <= 2 else 5,
                        linespacing=0.9)
        ax.set_xticks(block, [tokens[t] for t in block], rotation=90, fontsize=7)
        ax.set_yticks(range(layers))
        ax.set_ylabel("layer")
    axes[0].set_title(f"Top-{k} experts of each token (colour: first choice; mean first-choice gate "
                      f"{gates[:, :, 0].mean():.2f})", fontsize=10)
    height = block_height * len(blocks) + 0.6
    bar = fig.colorbar(image, ax=list(axes), ticks=range(num_experts), shrink=min(0.9, 4.0 / height), aspect=25)
    bar.set_label("first-choice expert")
    return _save(fig, path)


# ---------------------------------------------------------------------- attention
def attention_heads(tokens: list[str], weights: np.ndarray, heads: list[int], title: str, path,
                    window: int | None = None) -> Path:
    """(heads, T, T) attention maps as a grid, token labels on both axes, masked cells grey."""
    H, T, _ = weights.shape
    rows, cols = _grid(H)
    side = max(2.6, min(0.16 * T + 1.0, 9.0, 36.0 / cols)) if H > 1 else max(4.0, min(0.25 * T + 1.5, 16.0))
    fig = Figure(figsize=(side * cols + 1.0, side * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    q, kpos = np.arange(T)[:, None], np.arange(T)[None, :]
    hidden = (kpos > q) | ((q - kpos >= window) if window else False)
    cmap = colormaps["magma"].with_extremes(bad="#dddddd")
    norm = PowerNorm(0.5, 0, 1)
    for ax, h, w in zip(axes.flat, heads, weights):
        image = ax.imshow(np.ma.masked_where(hidden, w), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"head {h}", fontsize=9)
        labelled = side / T >= 0.12  # inches per token: enough for a 7-point label
        _token_axis(ax, "x", tokens if labelled else [""] * T)
        _token_axis(ax, "y", tokens if labelled else [""] * T)
    for ax in axes.flat[H:]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("key (attended to)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="attention weight (square-root scale)", shrink=0.8)
    fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------- hidden states
def hidden_norms(tokens: list[str], norms: np.ndarray, cosine: list[float], path) -> Path:
    """Hidden-state norms per layer and token (log colour scale), beside per-layer summaries:
    the mean norm, and the mean cosine of each token's state to its state before the layer."""
    rows, T = norms.shape
    labels = ["embed"] + [str(i) for i in range(rows - 1)]
    fig = Figure(figsize=(min(0.18 * T + 7.0, 30.0), max(4.0, 0.3 * rows + 1.8)), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[max(T, 10), 9])
    heat = fig.add_subplot(grid[:, 0])
    image = heat.imshow(norms, cmap="viridis", norm=LogNorm(max(norms.min(), 1e-6), norms.max()), aspect="auto")
    _token_axis(heat, "x", tokens)
    heat.set_yticks(range(rows), labels, fontsize=8)
    heat.set_ylabel("after layer")
    heat.set_title("L2 norm of each token's hidden state", fontsize=10)
    fig.colorbar(image, ax=heat, label="norm (log scale)", shrink=0.9)
    mean = fig.add_subplot(grid[0, 1])
    mean.plot(range(rows), norms.mean(1), marker="o")
    mean.set_title("mean norm", fontsize=10)
    turn = fig.add_subplot(grid[1, 1], sharex=mean)
    turn.plot(range(1, rows), cosine, marker="o", color="tab:orange")
    turn.set_title("cosine to the state before the layer", fontsize=10)
    turn.set_xticks(range(rows), labels, fontsize=8)
    turn.set_xlabel("after layer")
    for ax in (mean, turn):
        ax.grid(alpha=0.3)
    return _save(fig, path)
