"""Data-loader throughput: realfake's shard streaming against timm's image-folder reader, on the same images.

Both sides deliver what a training step receives: batched tensors after JPEG decode and the classifier's
evaluation transform (``realfake.classify.build_transforms(cfg, train=False)``), through a
``torch.utils.data.DataLoader`` with the same workers and batch size. The images are the same bytes on both sides:
``--images`` photo-like JPEGs (``benchmarks/shard_io.make_images``) written once as a version's committed
WebDataset shards (``ShardWriter``) and once as an image folder (one sub-folder per class).

- *timm*: ``timm.data.ImageDataset(folder)`` (timm's folder reader: open, ``PIL.Image.open``, ``convert("RGB")``),
  shuffled by the DataLoader's sampler.
- *ours*: ``StreamingImages`` over the committed shards (per-epoch shard shuffle, 1000-image shuffle buffer,
  sha256 and count of every shard checked as it streams), decoded in the workers.
- *ours + draft*: the same with ``decode_size`` = the transform's resize target, so JPEG decoding scales down in
  the DCT (``PIL.Image.draft``) when the transform would shrink the image by 2x or more anyway. The pixels then
  differ slightly from a full decode; the table gives the mean absolute difference of the delivered images.
- *ours, whole shards*: ``open_shards`` lowered to the shards per worker, so the shards are split whole between
  the workers (each tar read once) instead of striped (every worker reads every tar) as a small version is.

Classifier transforms measured: ``default`` (``ClassifierConfig()``: 224 px, crop 0.875, model mean/std) and
``demo`` (the demo preset's classifier: 32 px, crop 1.0, per-image standardisation). Every cell is the median of
``--repeats`` full epochs, the readers interleaved in rotating order after one warm-up epoch each (page cache
warm on both sides). Each epoch is timed from ``iter(loader)`` to the last batch, worker start-up included; its CPU
time (main process + workers, from ``getrusage``) is reported too, as *vs timm (CPU)* = timm's CPU time / ours:
on a shared machine wall time swings with other people's load, CPU time per image much less.

    .venv/bin/python benchmarks/loader_throughput.py --images 2000 --size 256 --workers 2 --repeats 5 \\
        --out benchmarks/results/loader_throughput.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import timm  # noqa: E402
import timm.data  # noqa: E402
from PIL import Image  # noqa: E402
from shard_io import make_images  # noqa: E402

from realfake.classify import build_transforms  # noqa: E402
from realfake.config import ClassifierConfig, ShardConfig, load_config  # noqa: E402
from realfake.data.shards import ShardWriter, SyntheticRecord, plan_shards  # noqa: E402
from realfake.data.storage import Store  # noqa: E402
from realfake.data.streaming import StreamingImages, read_shard_entries  # noqa: E402


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare(folder: Path, n: int, size: int, quality: int, shard_size: int) -> tuple[Store, Path, int]:
    """Write the images as committed shards and as an image folder; returns the store, the folder, bytes."""
    images = make_images(n, size, quality)
    store = Store(str(folder / "version"))
    writer = ShardWriter(store, ShardConfig(format="webdataset", image_format="jpg", max_count=shard_size),
                         durable=False)
    records = [SyntheticRecord(key, label, f"class{label}", jpeg, meta) for key, label, jpeg, meta in images]
    for plan in plan_shards(records, shard_size):
        writer.write_shard(plan.name, plan.items)
    tree = folder / "image-folder"
    for key, label, jpeg, _ in images:
        (tree / f"class{label}").mkdir(parents=True, exist_ok=True)
        (tree / f"class{label}" / f"{key}.jpg").write_bytes(jpeg)
    return store, tree, sum(len(j) for _, _, j, _ in images)


def classifier_configs() -> dict[str, ClassifierConfig]:
    demo = load_config("demo").classifier
    return {"default": ClassifierConfig(), "demo": demo}


def eval_size(cfg: ClassifierConfig) -> int:
    """The shorter side timm's evaluation transform resizes to (``floor(image_size / crop_pct)``)."""
    return math.floor(cfg.image_size / (cfg.crop_pct or timm.data.DEFAULT_CROP_PCT))


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers of past epochs)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def epoch(dataset: torch.utils.data.Dataset, workers: int, batch: int, shuffle: bool) -> tuple[float, float, int]:
    """Wall seconds and CPU seconds (main process + workers) for one full epoch of batched tensors, and the
    images delivered. CPU time is what a busy shared machine disturbs least."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, shuffle=shuffle)
    cpu, t = _cpu_seconds(), time.perf_counter()
    n = 0
    for images, labels in loader:
        assert images.dtype == torch.float32 and images.ndim == 4
        n += len(labels)
    wall = time.perf_counter() - t
    del loader  # non-persistent workers have exited once the epoch ends: their CPU time is counted now
    return wall, _cpu_seconds() - cpu, n


def draft_difference(store: Store, cfg: ClassifierConfig, samples: int = 200) -> float:
    """Mean absolute difference (0-255 levels) between draft-decoded and fully decoded delivered images."""
    plain = timm.data.create_transform(input_size=cfg.image_size, is_training=False, interpolation="bilinear",
                                       crop_pct=cfg.crop_pct, normalize=False)
    units = [e.unit() for e in read_shard_entries(store)]
    full = StreamingImages(units, shuffle=False, transform=plain)
    draft = StreamingImages(units, shuffle=False, transform=plain, decode_size=eval_size(cfg))
    diffs = []
    for (a, _), (b, _), _ in zip(full, draft, range(samples), strict=False):
        diffs.append(float((a.float() - b.float()).abs().mean()))
    return float(np.mean(diffs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="Side of the square JPEG images.")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--configs", nargs="+", default=["default", "demo"], choices=["default", "demo"])
    p.add_argument("--out", default=None, help="Markdown file for the results (default: print only).")
    a = p.parse_args()
    torch.set_num_threads(1)
    load_before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="realfake-loader-bench-"))
    try:
        store, tree, payload = prepare(tmp, a.images, a.size, a.quality, a.shard_size)
        units = [e.unit() for e in read_shard_entries(store)]
        rows: list[dict[str, Any]] = []
        for name in a.configs:
            cfg = classifier_configs()[name]
            tf = build_transforms(cfg, train=False)
            readers = {
                "timm ImageFolder": (lambda tf=tf: timm.data.ImageDataset(str(tree), transform=tf), True),
                "ours (shards)": (lambda tf=tf: StreamingImages(units, transform=tf), False),
                "ours + draft": (lambda tf=tf, cfg=cfg: StreamingImages(units, transform=tf,
                                                                        decode_size=eval_size(cfg)), False),
                # Enough shards per worker for whole-shard splitting (no striping): each tar read once.
                "ours, whole shards": (lambda tf=tf: StreamingImages(
                    units, transform=tf, open_shards=max(1, len(units) // max(1, a.workers))), False),
            }
            times: dict[str, list[float]] = {r: [] for r in readers}
            cpus: dict[str, list[float]] = {r: [] for r in readers}
            for make, shuffle in readers.values():  # warm-up: page cache, imports in the workers
                epoch(make(), a.workers, a.batch, shuffle)
            order = list(readers)
            for i in range(a.repeats):
                for r in order[i % len(order):] + order[: i % len(order)]:
                    make, shuffle = readers[r]
                    seconds, cpu, n = epoch(make(), a.workers, a.batch, shuffle)
                    assert n == a.images, (r, n)
                    times[r].append(seconds)
                    cpus[r].append(cpu)
                print(name, i, {r: round(a.images / t[-1]) for r, t in times.items()}, flush=True)
            base = a.images / statistics.median(times["timm ImageFolder"])
            base_cpu = statistics.median(cpus["timm ImageFolder"])
            diff = draft_difference(store, cfg)
            for r, t in times.items():
                rate = a.images / statistics.median(t)
                cpu = statistics.median(cpus[r])
                rows.append({"config": name, "input": f"{cfg.image_size} px (resize {eval_size(cfg)})", "reader": r,
                             "rate": rate, "ratio": rate / base, "spread": (a.images / max(t), a.images / min(t)),
                             "cpu_ms": 1000 * cpu / a.images, "cpu_ratio": base_cpu / cpu,
                             "diff": diff if "draft" in r else 0.0})
        load_after = load_average()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"{a.images} JPEG images ({a.size} px, q{a.quality}, {payload / 1e6:.1f} MB), shards of {a.shard_size}; "
        f"DataLoader with {a.workers} workers, batch {a.batch}; median of {a.repeats} epochs per cell.",
        f"Machine: {cpu}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, timm {timm.__version__}, Pillow {Image.__version__}.",
        f"Load average (1, 5, 15 min) before: {load_before}; after: {load_after} (`uptime`: {uptime}).",
        "",
        "| classifier transform | input | reader | images/s | vs timm | range over repeats | CPU ms/image | "
        "vs timm (CPU) | draft pixel diff |",
        "|---|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['input']} | {r['reader']} | {r['rate']:.0f} | {r['ratio']:.2f}x | "
            f"{r['spread'][0]:.0f}-{r['spread'][1]:.0f} | {r['cpu_ms']:.2f} | {r['cpu_ratio']:.2f}x | {r['diff']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = out.read_text() if out.exists() else ""
        marker = "\n## Run of "
        keep = header.split(marker)[0].rstrip() + "\n\n" if header else ""
        out.write_text(keep + text)


if __name__ == "__main__":
    main()
