"""Reporting measured versions: the comparison table, the sample grid and the confusion plots.

Three measures per synthetic dataset, because one number hides why: the accuracy on the real test split
of a classifier trained on it (the paper's measure); label fidelity, the accuracy of the real-trained
classifier on the synthetic images (are they recognisably their class?); and the distance the method
minimises, an MMD and a Frechet distance between real-test and synthetic features, both taken from one
fixed feature extractor (the real-trained classifier's penultimate layer). :func:`realfake.build.measure_versions`
takes them; this module presents them and never imports the build (it reads versions through their stores). A
run's confusion matrix is drawn next to its metrics (``runs/{run}/confusion.png``) to show which classes the
accuracy is lost on.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from realfake.config import BuildConfig
from realfake.data.storage import Store

__all__ = [
    "confusion_png",
    "format_table",
    "report_markdown",
    "sample_grid",
    "write_confusion_plot",
    "write_report",
]


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of the measures, image counts and stage times."""
    meas = report.get("measures", {})
    lines = [
        "| data | train images | real-test top-1 | label fidelity | MMD to real test | Frechet to real test |",
        "|---|---|---|---|---|---|",
    ]
    names = {"real": "(a) real train", "baseline": "(b) baseline synthetic", "realfake": "(c) Real-Fake synthetic"}
    for key in ("real", "baseline", "realfake"):
        if key not in meas:
            continue
        m = meas[key]
        fid = f"{m['label_fidelity']:.1%}" if "label_fidelity" in m else "-"
        mmd = f"{m['mmd']:.4f}" if "mmd" in m else "-"
        fd = f"{m['frechet']:.2f}" if "frechet" in m else "-"
        lines.append(f"| {names[key]} | {m['train_images']} | {m['top1']:.1%} | {fid} | {mmd} | {fd} |")
    lines += ["", "| stage | " + " | ".join(report["versions"]) + " |", "|---|" + "---|" * len(report["versions"])]
    stages = ["prepare", "finetune", "synthesize", "finalize"]
    for st in stages:
        cells = [f"{v['timings_s'].get(st, 0):.1f} s" for v in report["versions"].values()]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    if meas:
        cells = [f"{meas[k]['seconds']:.1f} s" for k in report["versions"] if k in meas]
        real_s = meas["real"]["seconds"]
        lines.append("| train + measure | " + " | ".join(cells) + f" |  (real classifier: {real_s:.1f} s)")
    return "\n".join(lines)


def sample_grid(stores: dict[str, Store], per_class: int = 4, scale: int = 2) -> Image.Image:
    """Rows = classes, each labelled with its class name and label on the left; columns = real sources | each
    version's images made from those same sources."""
    from realfake.data.manifest import load_real_image, read_manifest
    from realfake.data.shards import iter_synthetic

    first = next(iter(stores.values()))
    train = read_manifest(first, "train")
    labels = sorted({s.label for s in train})
    chosen = {lab: [s for s in train if s.label == lab][:per_class] for lab in labels}
    wanted = {s.sample_id for ss in chosen.values() for s in ss}
    synth: dict[str, dict[str, Image.Image]] = {}
    for name, store in stores.items():
        synth[name] = {}
        for img, _, meta in iter_synthetic(store, check=False):
            sid = meta.get("source_sample_id")
            if sid in wanted and meta.get("replica", 0) == 0:
                synth[name][sid] = img.convert("RGB")
    size = max(64, next(iter(chosen.values()))[0].width * scale) if chosen else 64
    cols = ["real"] + list(stores)
    gap, head = 6, 18
    # Each row is labelled with its class name (and label), truncated to what fits a fixed left column
    names = {lab: _row_label(lab, chosen[lab][0].class_name) for lab in labels}
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 8 + max([int(probe.textlength(t)) for t in names.values()] or [0])
    w = left + len(cols) * per_class * size + (len(cols) - 1) * gap
    h = head + len(labels) * size
    grid = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(cols):
        draw.text((left + c * (per_class * size + gap) + 4, 3), name, fill=(0, 0, 0))
    for r, lab in enumerate(labels):
        draw.text((4, head + r * size + size // 2 - 6), names[lab], fill=(0, 0, 0))
        for k, s in enumerate(chosen[lab]):
            tiles = [load_real_image(s, size)] + [synth[n].get(s.sample_id) for n in stores]
            for c, tile in enumerate(tiles):
                if tile is None:
                    continue
                x = left + c * (per_class * size + gap) + k * size
                grid.paste(tile.resize((size, size), Image.NEAREST), (x, head + r * size))
    return grid


_ROW_LABEL_CHARS = 24  # ours: a class name longer than this (some ImageNet names) is cut with an ellipsis


def _row_label(label: int, class_name: str | None) -> str:
    name = str(class_name or label)
    if len(name) > _ROW_LABEL_CHARS:
        name = name[: _ROW_LABEL_CHARS - 3] + "..."
    name = name.encode("latin-1", "replace").decode("latin-1")  # what PIL's default bitmap font can draw
    return name if name == str(label) else f"{name} ({label})"


def write_report(cfg: BuildConfig, report: dict[str, Any], configs: dict[str, BuildConfig],
                 storage_options: dict | None = None) -> dict[str, str]:
    """Write ``report/report.md``, ``report/report.json`` and ``report/grid.png`` into the Real-Fake version."""
    import json

    from realfake.data.storage import resolve_storage_options, version_store

    def store_of(c: BuildConfig) -> Store:
        return version_store(c.root, c.dataset, c.version, resolve_storage_options(c.storage, storage_options))

    store = store_of(cfg)
    stores = {name: store_of(c) for name, c in configs.items()}
    order = [n for n in ("baseline", "realfake") if n in stores]
    grid = sample_grid({n: stores[n] for n in order})
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    store.write_bytes(buf.getvalue(), "report", "grid.png")
    table = format_table(report)
    locations = {
        "shards": {n: s.uri("synthetic") for n, s in stores.items()},
        "card": {n: s.uri("dataset.json") for n, s in stores.items()},
        "grid": store.uri("report", "grid.png"),
    }
    md = f"# realfake report: {cfg.dataset} {cfg.version}\n\n{table}\n\n" + "\n".join(
        f"- {k}: {json.dumps(v)}" for k, v in locations.items()
    )
    md += _quality_markdown(stores)
    store.write_bytes(md.encode(), "report", "report.md")
    slim = {k: v for k, v in report.items() if k != "versions"}
    store.write_json({**slim, "locations": locations}, "report", "report.json")
    return {"table": table, "grid": locations["grid"], "locations": locations, "report": store.uri("report")}


def _quality_markdown(stores: dict[str, Store]) -> str:
    """The per-class quality table and worst-examples grid of each measured version (``quality`` in its card)."""
    from realfake.data.card import CARD_FILE
    from realfake.quality import format_quality_table

    out = ""
    for name, s in stores.items():
        quality = s.read_json(CARD_FILE).get("quality") if s.exists(CARD_FILE) else None
        if quality:
            out += (f"\n\n## Quality per class: {name} (far from the real class first)\n\n"
                    f"{format_quality_table(quality)}\n\nWorst examples per class: {quality['worst_grid']}\n")
    return out


def confusion_png(confusion: Sequence[Sequence[int]], class_names: Sequence[str] | None = None,
                  title: str | None = None) -> bytes:
    """A confusion matrix as a PNG: rows are true classes, each row normalised to the share of that class.

    Row normalisation makes a rare class as readable as a common one; the counts are written in the cells
    while there are at most 20 classes, class names label the axes up to 40 classes.

    Raises:
        ValueError: the matrix is not square, or ``class_names`` does not have one name per row.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"a confusion matrix must be square and non-empty, got shape {cm.shape}")
    if (cm < 0).any() or not np.isfinite(cm).all():
        raise ValueError("a confusion matrix holds counts: negative or non-finite entries found")
    n = cm.shape[0]
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for a {n}x{n} confusion matrix")
    support = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)
    side = min(max(4.0, 0.3 * n + 2.5), 20.0)
    fig = Figure(figsize=(side + 1.2, side), dpi=100)  # no pyplot: safe in worker threads, no display needed
    ax = fig.add_subplot()
    image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:
        ticks = list(range(n))
        ax.set_xticks(ticks, labels=names, rotation=90, fontsize=8)
        ax.set_yticks(ticks, labels=names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = cm.sum()
    accuracy = f"top-1 {np.trace(cm) / total:.1%} of {int(total)}" if total else "no images"
    ax.set_title(f"{title}: {accuracy}" if title else accuracy)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def write_confusion_plot(store: Store, run: str, metrics: dict[str, Any],
                         class_names: Sequence[str] | None = None) -> str:
    """Write ``runs/{run}/confusion.png`` of a version from a metrics dict holding ``confusion``; returns its URI.

    Class names default to the version's manifest (label -> class name).
    """
    if "confusion" not in metrics:
        raise ValueError(f"the metrics of run {run!r} have no 'confusion' matrix to plot")
    if class_names is None:
        from realfake.data.manifest import read_manifest

        by_label = {s.label: s.class_name for s in read_manifest(store)}
        n = len(metrics["confusion"])
        class_names = [by_label.get(i, str(i)) for i in range(n)]
    title = f"{metrics.get('data', run)} -> real test" if metrics.get("data") else run
    store.write_bytes(confusion_png(metrics["confusion"], class_names, title), "runs", run, "confusion.png")
    return store.uri("runs", run, "confusion.png")


report_markdown = format_table
