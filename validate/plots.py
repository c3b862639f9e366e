"""PNG plots of validation results: error against depth (from --locate), attention heatmaps. Needs matplotlib
(pip install 'qkv-onnx[plots]'); without it the functions return a note instead of a file."""

from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install 'qkv-onnx[plots]'"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def error_by_depth(reports: list, directory: Path) -> list[str]:
    """One PNG per located artifact: each runtime's worst max abs error / atol per tap, in computation order
    (above 1 fails). Returns notes (what was written, or why not)."""
    located = [r for r in reports if r.localization and r.localization.checks]
    if not located:
        return ["--plots: nothing to plot (no artifact was located; add --locate)"]
    plt = _pyplot()
    if plt is None:
        return [f"--plots: matplotlib is not installed ({INSTALL_HINT})"]
    directory.mkdir(parents=True, exist_ok=True)
    notes = []
    for r in located:
        found = r.localization
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(found.order)), 4))
        for runtime in dict.fromkeys(c.runtime for c in found.checks):
            rows = found.table(runtime)
            ratios = [err / atol if err is not None and atol else np.nan for _, err, atol, _ in rows]
            ax.plot(range(len(rows)), ratios, marker="o", label=runtime)
        ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="atol (fails above)")
        ax.set_yscale("log")
        ax.set_xticks(range(len(found.order)), found.order, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("max abs error / atol")
        ax.set_title(f"{r.artifact}: error against depth")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / f"{r.artifact}-error-by-depth.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        notes.append(f"wrote {path}")
    return notes


def heatmap(probs: np.ndarray, tokens: list[str] | None, title: str, path: Path) -> bool:
    """One layer's attention probabilities (H, Lq, Lk) of one sequence as a grid of heads; False without
    matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    heads = probs.shape[0]
    cols = min(heads, 4)
    rows = -(-heads // cols)
    size = 2.2 + 0.12 * probs.shape[-1]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(probs[h], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"head {h}", fontsize=9)
        if tokens:
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
