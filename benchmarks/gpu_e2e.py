"""The production build flow end to end at SD v1.5 size: per-stage seconds, in-flow vs standalone synthesis, memory.

Builds (once per workdir) random-weight SD v1.5 (``realfake/models/sd15.py``), a random-weight CLIP ViT-L/14
vision tower as the guidance model, and a generated image folder (``--classes`` x ``--per-class`` images of
class-coloured shapes at 512 px), writes a config over the ``imagenette`` preset (captioning off, no hub ids) and
runs the real build flow in this process through its own entry point, exactly as ``make demo`` does
(``python -m flows.build --preset imagenette --config <file> --no-baseline``: ephemeral Prefect, local storage):
prepare, fine-tune (cached latents, batch 8), synthesize (batch 16, 512 px, 30 UniPC steps x 0.75), finalize +
verify, measure (train-eval of ResNet-50 at 224 from the shards, AMP, 2 epochs, on real and on synthetic data).

Recorded (``--out``, JSON + markdown beside it): the flow's per-stage seconds (its ``report.json``), synthesis
images/s inside the flow (synthetic images / synthesize-stage seconds) against the standalone engine on the same
version (``SynthesisEngine``, load and generation timed apart), peak GPU memory (this process's
``max_memory_allocated`` and the card's used memory sampled every 0.2 s), and whether the classifier waits on its
loader: the library logs no data time, so every ``DataLoader`` iterator's ``__next__`` is timed here (the time
the training loop blocks for a batch; the loop reads the loss each step, so the GPU is idle meanwhile), per
loader, against the run's ``train_s``.

``--smoke`` runs the same path on CPU with the tiny models (tiny SD twin, tiny CLIP vision, narrow ResNet-18 at
32 px, 10 classes x 8 images) in about two minutes.

    python benchmarks/gpu_e2e.py --workdir /tmp/realfake-gpu-bench --out benchmarks/results/gpu_e2e.json
    python benchmarks/gpu_e2e.py --smoke --out /tmp/gpu_e2e_smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["LoaderWaits", "MemorySampler", "image_folder", "main"]

def image_folder(dest: Path, classes: int, per_class: int, size: int) -> Path:
    """``classes`` folders of ``per_class`` PNGs: noisy shapes whose hue and form follow the class (learnable)."""
    import numpy as np
    from PIL import Image, ImageDraw

    if dest.exists() and len(list(dest.glob("*/*.png"))) == classes * per_class:
        return dest
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = dest / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        hue = np.array([255 * (c % 3 == 0), 255 * (c % 3 == 1), 255 * (c % 3 == 2)]) * (0.5 + 0.5 * c / classes)
        for i in range(per_class):
            base = rng.normal(96, 24, (size, size, 3)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(base)
            d = ImageDraw.Draw(img)
            for _ in range(3):
                x, y = rng.integers(0, size * 3 // 4, 2)
                w = int(rng.integers(size // 8, size // 3))
                box = (int(x), int(y), int(x) + w, int(y) + w)
                colour = tuple(int(v) for v in (hue + rng.normal(0, 20, 3)).clip(0, 255))
                (d.ellipse if c % 2 else d.rectangle)(box, fill=colour)
            img.save(folder / f"{i:03d}.png")
    return dest


def build_models(work: Path, smoke: bool) -> tuple[str, str]:
    """(base, clip): random SD v1.5 + CLIP ViT-L/14 vision, or (``smoke``) the tiny twins."""
    from gpu_synthesis import build_base

    base = build_base(work / ("tiny-sd" if smoke else "sd15-random"), smoke)
    if smoke:
        return str(base), str(base)  # the tiny base carries its tiny CLIP vision in clip/
    clip = work / "clip-vit-l14-random"
    if not (clip / "config.json").exists():
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        from realfake.models.sd15 import CLIP_L14_VISION

        torch.manual_seed(0)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14_VISION)).save_pretrained(clip)
        CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(clip)
    return str(base), str(clip)


def e2e_config(work: Path, base: str, clip: str, source: Path, smoke: bool, ft_steps: int) -> dict:
    """The config merged over the imagenette preset: paper-shaped stages at benchmark lengths."""
    res = 32 if smoke else 512
    cfg = {
        "dataset": "e2e", "version": "v1", "root": str(work / "out-e2e"), "device": "cpu" if smoke else "auto",
        "source": {"kind": "image_folder", "uri": str(source), "classes": None, "test_fraction": 0.25},
        "models": {"base": base, "clip": clip},
        "caption": {"enabled": False},
        "finetune": {"epochs": None, "max_steps": ft_steps, "batch_size": 8, "gradient_accumulation": 1,
                     "resolution": res, "checkpoint_every": 100_000},
        "synthesis": {"resolution": res, "batch_size": 16, **({"steps": 4} if smoke else {})},
        "shards": {"max_count": 100},
        "classifier": {"epochs": 2, "batch_size": 64, "lr": 0.1, "sched": "cosine", "warmup_epochs": 0,
                       "workers": 0 if smoke else 8, "amp": True,
                       **({"model": "resnet18", "model_kwargs": {"channels": [8, 16, 32, 64]}, "image_size": 32,
                           "crop_pct": 1.0} if smoke else {"model": "resnet50", "image_size": 224})},
    }
    return cfg


class LoaderWaits:
    """Seconds each DataLoader iterator's ``__next__`` blocked, per loader (dataset and sampler type, batch)."""

    def __init__(self) -> None:
        self.stats: dict[str, dict] = {}
        self._orig = None

    def __enter__(self) -> LoaderWaits:
        from torch.utils.data import dataloader

        cls = dataloader._BaseDataLoaderIter
        self._orig = orig = cls.__next__
        stats, labels = self.stats, {}

        def timed_next(it):
            t0 = time.perf_counter()
            try:
                return orig(it)
            finally:
                inner = getattr(it._index_sampler, "sampler", it._index_sampler)
                kind = f"{type(it._dataset).__name__}/{type(inner).__name__}/workers={it._num_workers}"
                loader = labels.setdefault(id(it._dataset), f"#{len(labels)} {kind}")  # epochs of a loader add up
                s = stats.setdefault(loader, {"batches": 0, "wait_s": 0.0, "passes": 0, "_its": set()})
                if id(it) not in s["_its"]:
                    s["_its"].add(id(it))
                    s["passes"] += 1
                s["batches"] += 1
                s["wait_s"] += time.perf_counter() - t0

        cls.__next__ = timed_next
        return self

    def __exit__(self, *exc) -> None:
        from torch.utils.data import dataloader

        dataloader._BaseDataLoaderIter.__next__ = self._orig
        for s in self.stats.values():
            s.pop("_its", None)


class MemorySampler(threading.Thread):
    """The card's used memory (total - free, every process) sampled every ``every`` s; CPU: max RSS at the end."""

    def __init__(self, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def standalone_rate(cfg_dict: dict, images: int, device: torch.device) -> dict:
    """The resident engine on the built version: load seconds, then images/s after one warm-up batch."""
    from gpu_synthesis import work_items

    from realfake.config import load_config
    from realfake.data.storage import version_store
    from realfake.synthesize import SynthesisEngine

    cfg = load_config(data=cfg_dict)
    store = version_store(cfg.root, cfg.dataset, cfg.version)
    t0 = time.perf_counter()
    engine = SynthesisEngine(cfg, store)
    load_s = time.perf_counter() - t0
    bs = cfg.synthesis.batch_size
    items = work_items(cfg, store, bs + images)
    list(engine.generate(items[:bs]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = len(list(engine.generate(items[bs:])))
    if device.type == "cuda":
        torch.cuda.synchronize()
    gen_s = time.perf_counter() - t0
    return {"load_s": load_s, "images": n, "generate_s": gen_s, "images_per_s": n / gen_s}


def _merged_config(preset: str, path: Path) -> dict:
    from flows.params import BuildParams

    return BuildParams(preset=preset, config_file=str(path)).to_config().model_dump(mode="json")


def markdown(r: dict) -> str:
    def f(v):
        return "n/a" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = [f"device: {r['device']}; torch {r['torch']}; diffusers {r.get('diffusers')}; command: `{r['command']}`",
             f"flow: `{r['flow_command']}`; exit {r['flow_exit']}; {r['images']['source']} source images, "
             f"{r['images'].get('synthetic')} synthetic", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {f(v)} |" for k, v in r["stage_s"].items()]
    s = r.get("synthesis", {})
    lines += ["", "synthesis images/s inside the flow (images / synthesize stage): "
              f"{f(s.get('in_flow_images_per_s'))}; standalone engine: "
              f"{f(s.get('standalone', {}).get('images_per_s'))} (load "
              f"{f(s.get('standalone', {}).get('load_s'))} s, not counted); in-flow / standalone "
              f"{f(s.get('in_flow_share'))} (target >= 0.9)",
              f"peak memory: process {f(r['memory'].get('process_peak_gib'))} GiB allocated, card "
              f"{f(r['memory'].get('card_peak_gib'))} GiB used; host max RSS "
              f"{f(r['memory'].get('host_max_rss_gib'))} GiB",
              "", "| loader (dataset/sampler/workers) | passes | batches | wait s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['passes']} | {v['batches']} | {v['wait_s']:.2f} |" for k, v in r["loader_waits"].items()]
    lines += ["", "| train-eval run | train_s | loader wait share |", "|---|---|---|"]
    lines += [f"| {k} | {f(v.get('train_s'))} | {f(v.get('loader_wait_share'))} |" for k, v in r["train_eval"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models, 10 x 8 images (~2 min)")
    p.add_argument("--workdir", default=None, help="models, images and the built version")
    p.add_argument("--out", required=True, help="results JSON (the table beside it as .md)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=None, help="default 32 (smoke 8)")
    p.add_argument("--ft-steps", type=int, default=None, help="fine-tune optimiser steps (default 30; smoke 2)")
    p.add_argument("--standalone-images", type=int, default=None, help="default 48 (smoke 16)")
    a = p.parse_args(argv)

    cuda = torch.cuda.is_available() and not a.smoke
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="realfake-gpu-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))  # the ephemeral server's database stays here
    # a fresh database is migrated at the first start: on a loaded machine that outlasts Prefect's default 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    per_class = a.per_class or (8 if a.smoke else 32)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()})"
    t0 = time.perf_counter()
    base, clip = build_models(work, a.smoke)
    source = image_folder(work / f"images-{a.classes}x{per_class}", a.classes, per_class, 32 if a.smoke else 512)
    cfg_file = work / "e2e.yaml"
    import yaml

    override = e2e_config(work, base, clip, source, a.smoke, a.ft_steps or (2 if a.smoke else 30))
    cfg_file.write_text(yaml.safe_dump(override))
    setup_s = time.perf_counter() - t0
    print(f"# {name}; setup {setup_s:.1f} s; config {cfg_file}", flush=True)
    cfg_dict = _merged_config("imagenette", cfg_file)
    root = Path(cfg_dict["root"])
    if (root / "e2e").exists():  # versions are immutable: each run builds afresh
        import shutil

        shutil.rmtree(root / "e2e")
    flow_argv = ["--preset", "imagenette", "--config", str(cfg_file), "--no-baseline"]  # the same run as a command
    from flows.build import build_flow
    from flows.params import BuildParams

    sampler = MemorySampler() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        sampler.start()
    # the flow `python -m flows.build` runs, called as its main() calls it (same parameters): its return value is
    # the report with the per-stage seconds (the report.json it writes keeps the measures only)
    params = BuildParams(preset="imagenette", config_file=str(cfg_file), compare_baseline=False)
    t0 = time.perf_counter()
    report, code = None, 0
    with LoaderWaits() as waits:
        try:
            report = build_flow(params)
        except Exception as e:  # noqa: BLE001 - recorded as the run's result
            code, failure = 1, f"{type(e).__name__}: {e}"
    flow_s = time.perf_counter() - t0
    memory = {"host_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if cuda:
        memory["card_peak_gib"] = sampler.stop() / 2**30
        memory["process_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result: dict = {"device": name, "torch": torch.__version__, "setup_s": setup_s, "flow_s": flow_s,
                    "flow_exit": code, "flow_command": "python -m flows.build " + " ".join(flow_argv),
                    "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                    "config": override, "memory": memory, "loader_waits": waits.stats, "stage_s": {},
                    "train_eval": {}, "synthesis": {},
                    "images": {"source": a.classes * per_class}}
    with contextlib.suppress(ImportError):
        import diffusers

        result["diffusers"] = diffusers.__version__
    if report is not None:
        result["stage_s"] = dict(report["versions"]["realfake"].get("timings_s", {}))
        measures = report.get("measures", {})
        result["stage_s"].update({f"train-eval {k}": v.get("seconds") for k, v in measures.items()})
        result["stage_s"]["total (report)"] = report.get("total_s")
        from realfake.build import synthetic_dataset
        from realfake.data.storage import version_store

        syn_images = len(synthetic_dataset(version_store(str(root), "e2e", "v1")))
        result["images"]["synthetic"] = syn_images
        for k, v in measures.items():
            row = {"train_s": v.get("train_s"), "top1": v.get("top1"), "train_images": v.get("train_images")}
            result["train_eval"][k] = row
        # one training loader per train-eval run, in order (real first): its blocked time over the run's train_s
        # (the loaders passed over once per epoch; evaluation and feature loaders pass once)
        train_loaders = [v for v in waits.stats.values() if v["passes"] > 1]
        for row, w in zip(result["train_eval"].values(), train_loaders, strict=False):
            if row["train_s"]:
                row["loader_wait_share"] = w["wait_s"] / row["train_s"]
        in_flow = syn_images / result["stage_s"]["synthesize"] if result["stage_s"].get("synthesize") else None
        standalone = standalone_rate(cfg_dict, a.standalone_images or (16 if a.smoke else 48), device)
        result["synthesis"] = {"in_flow_images_per_s": in_flow, "standalone": standalone,
                               "in_flow_share": in_flow / standalone["images_per_s"] if in_flow else None}
    else:
        result["error"] = failure
    out.write_text(json.dumps(result, indent=2, default=str))
    table = markdown(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table, flush=True)
    return result


if __name__ == "__main__":
    main()
