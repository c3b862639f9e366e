"""PNG plots of validation results: error against depth (from --locate; matplotlib) and attention heatmaps
(Pillow, which matplotlib brings). pip install 'qkv-onnx[plots]'; without them the functions return a note
instead of a file."""

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


VIRIDIS = np.array([  # anchors of matplotlib's viridis, interpolated: 0 -> dark blue, 1 -> yellow
    (68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37),
], dtype=np.float64)  # fmt: skip


def _colors(values: np.ndarray) -> np.ndarray:
    """(…) values in [0, 1] -> (…, 3) uint8 viridis colours."""
    x = np.clip(values, 0, 1) * (len(VIRIDIS) - 1)
    low = np.floor(x).astype(int).clip(0, len(VIRIDIS) - 2)
    t = (x - low)[..., None]
    return ((1 - t) * VIRIDIS[low] + t * VIRIDIS[low + 1]).round().astype(np.uint8)


def heatmap(probs: np.ndarray, tokens: list[str] | None, title: str, path: Path) -> bool:
    """One layer's attention probabilities (H, Lq, Lk) of one sequence as a grid of heads (queries down,
    keys across, 0 dark to 1 yellow), token strings along the first column and the last row; False without
    Pillow. Drawn directly (Pillow) rather than with matplotlib: ~50 ms a layer instead of seconds."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        return False
    heads, n = probs.shape[0], probs.shape[-1]
    cols = min(heads, 4)
    rows = -(-heads // cols)
    cell = int(max(4, min(16, 360 // n)))
    font = ImageFont.load_default(size=max(8, min(12, cell)))
    label = max((int(font.getlength(t)) for t in tokens), default=0) + 6 if tokens else 0
    tile, gap, top = n * cell, 10, 44
    width = label + cols * tile + (cols - 1) * gap + 12
    height = top + rows * (tile + 18) + label + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 6), title, fill="black", font=ImageFont.load_default(size=13))
    pixels = np.repeat(np.repeat(_colors(probs), cell, axis=1), cell, axis=2)  # (H, L*cell, L*cell, 3)
    for h in range(heads):
        r, c = divmod(h, cols)
        x, y = label + c * (tile + gap), top + r * (tile + 18) + 16
        image.paste(Image.fromarray(pixels[h]), (x, y))
        draw.text((x, y - 15), f"head {h}", fill="black", font=font)
        if tokens and c == 0:
            for i, t in enumerate(tokens):
                draw.text((x - 4, y + i * cell + cell / 2), t, fill="black", font=font, anchor="rm")
        if tokens and (r == rows - 1 or h + cols >= heads):
            strip = Image.new("RGB", (label, tile), "white")
            strip_draw = ImageDraw.Draw(strip)
            for i, t in enumerate(tokens):
                strip_draw.text((label - 4, i * cell + cell / 2), t, fill="black", font=font, anchor="rm")
            image.paste(strip.rotate(90, expand=True), (x, y + tile + 2))
    image.save(path)
    return True
