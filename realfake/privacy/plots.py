"""Figures of the privacy audits: the log-log ROC of membership inference, the copy-similarity histogram
and the grid of closest synthetic/real pairs.

Each function returns PNG bytes (and writes them to ``path`` when given), so callers can put them on any
store or attach them to a Prefect artifact. Plotting uses matplotlib's object API on an Agg canvas, never
``pyplot``: no global backend is switched and nothing needs a display, on a GPU node or in a worker.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

__all__ = ["pair_grid", "plot_roc", "similarity_histogram"]


def _png(fig: Figure, path: str | Path | None) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    data = buf.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data


def plot_roc(
    curves: Mapping[str, Mapping[str, Any]],
    path: str | Path | None = None,
    title: str = "Membership inference (LiRA)",
    fpr_levels: Sequence[float] = (0.001, 0.01),
) -> bytes:
    """Log-log ROC curves of several membership attacks in one figure (e.g. real- vs synthetic-trained).

    The log scale shows the low-FPR regime where a membership attack is meaningful. An FPR of 0 cannot be
    drawn on it, so the axes start at half the smallest resolvable FPR (``0.5 / n_nonmembers``) of the
    curves, and zero values are drawn at that floor.

    Args:
        curves: Legend name -> the dict of :func:`realfake.privacy.lira.roc_metrics` (``fpr``, ``tpr``,
            ``auc``, ``n_nonmembers`` and the ``tpr_at_X%fpr`` values are used).
        path: Where to write the PNG (parents are created); None only returns the bytes.
        title: Figure title.
        fpr_levels: FPRs marked with dotted vertical lines.

    Returns:
        The PNG bytes.
    """
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    floor = min(0.5 / max(int(m["n_nonmembers"]), 1) for m in curves.values())
    floor = min(floor, min(fpr_levels) / 2) if fpr_levels else floor
    fig = Figure(figsize=(5.2, 5.0), dpi=120)
    ax = fig.add_subplot()
    ax.plot([floor, 1], [floor, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for name, m in curves.items():
        fpr = np.clip(np.asarray(m["fpr"], dtype=float), floor, 1.0)
        tpr = np.clip(np.asarray(m["tpr"], dtype=float), floor, 1.0)
        low = min(fpr_levels) if fpr_levels else None
        extra = ""
        if low is not None:
            key = f"tpr_at_{low * 100:g}%fpr"
            if key in m:
                extra = f", TPR@{low * 100:g}% {m[key]:.3f}"
        ax.step(fpr, tpr, where="post", linewidth=1.6, label=f"{name} (AUC {m['auc']:.3f}{extra})")
    for level in fpr_levels:
        ax.axvline(level, color="0.8", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, path)


def similarity_histogram(
    top1: np.ndarray,
    threshold: float,
    path: str | Path | None = None,
    reference: np.ndarray | None = None,
    bins: int = 60,
    title: str = "Nearest real image per synthetic image",
) -> bytes:
    """Histogram of each synthetic image's highest similarity to any real image, with the copy threshold.

    Args:
        top1: Top-1 cosine similarity of every synthetic image, ``[n_syn]``.
        threshold: Copy threshold, drawn as a vertical line; the share above it is in the legend.
        path: Where to write the PNG; None only returns the bytes.
        reference: Optional baseline, e.g. each real image's similarity to its nearest *other* real image:
            it shows how close two distinct real images of this dataset get under this descriptor.
        bins: Number of histogram bins over the joint range.
        title: Figure title.

    Returns:
        The PNG bytes.
    """
    top1 = np.asarray(top1, dtype=float)
    if top1.size == 0:
        raise ValueError("similarity_histogram needs at least one similarity")
    values = [top1] if reference is None else [top1, np.asarray(reference, dtype=float)]
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    lo, hi = min(lo, threshold) - 1e-6, max(hi, threshold) + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    fig = Figure(figsize=(6.0, 3.6), dpi=120)
    ax = fig.add_subplot()
    share = float((top1 >= threshold).mean())
    ax.hist(top1, bins=edges, alpha=0.75, label=f"synthetic -> real (n={top1.size})", color="tab:orange")
    if reference is not None:
        ax.hist(values[1], bins=edges, alpha=0.5, label=f"real -> other real (n={values[1].size})", color="tab:blue")
    ax.axvline(
        threshold,
        color="tab:red",
        linestyle="--",
        linewidth=1.2,
        label=f"threshold {threshold:g}: {share:.2%} of synthetic above",
    )
    ax.set_xlabel("cosine similarity to the nearest real image")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig, path)


def _tile(img: Image.Image, size: int) -> Image.Image:
    """Fit an image into a square tile, keeping its aspect ratio (letterboxed on white)."""
    img = img.convert("RGB")
    scale = size / max(img.size)
    resized = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    tile = Image.new("RGB", (size, size), "white")
    tile.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return tile


def pair_grid(
    pairs: Sequence[tuple[Image.Image, Image.Image, str]],
    path: str | Path | None = None,
    tile: int = 128,
    columns: int = 4,
    flagged: Sequence[bool] | None = None,
) -> bytes:
    """Grid of synthetic/real pairs side by side (synthetic left, real right), each pair captioned.

    Args:
        pairs: ``(synthetic image, real image, caption)`` per pair, in display order.
        path: Where to write the PNG; None only returns the bytes.
        tile: Side of each image tile in pixels.
        columns: Pairs per row.
        flagged: Per pair, whether to frame it in red (e.g. similarity above the copy threshold).

    Returns:
        The PNG bytes.
    """
    if not pairs:
        raise ValueError("pair_grid needs at least one pair")
    if flagged is not None and len(flagged) != len(pairs):
        raise ValueError(f"flagged has {len(flagged)} entries for {len(pairs)} pairs")
    columns = max(1, min(columns, len(pairs)))
    rows = -(-len(pairs) // columns)
    gap, caption_h = 8, 16
    cell_w, cell_h = 2 * tile + gap, tile + caption_h
    canvas = Image.new("RGB", (columns * cell_w + gap, rows * (cell_h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for n, (syn, real, caption) in enumerate(pairs):
        x = gap + (n % columns) * cell_w
        y = gap + (n // columns) * (cell_h + gap)
        canvas.paste(_tile(syn, tile), (x, y))
        canvas.paste(_tile(real, tile), (x + tile, y))
        hot = bool(flagged[n]) if flagged is not None else False
        frame = (220, 30, 30) if hot else (160, 160, 160)
        draw.rectangle([x, y, x + 2 * tile - 1, y + tile - 1], outline=frame, width=3 if hot else 1)
        draw.line([x + tile, y, x + tile, y + tile - 1], fill=frame)
        draw.text((x + 2, y + tile + 2), caption, fill=frame if hot else (0, 0, 0), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data
