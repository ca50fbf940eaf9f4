"""The bill of a build before it is paid: image counts, fine-tuning and classifier steps, bytes and GPU-hours.

:func:`build_plan` reads a validated configuration and, without loading a model, counts the real images (by
listing the source, or from the paper's Tab. 5 when it cannot be listed), derives the synthetic count, the
fine-tuning schedule (:func:`realfake.finetune.training_schedule`), the classifier's steps, the bytes the shards
will take (encoding a few representative images with the shard writer's encoder) and the GPU-hours of each stage
from the rates measured in ``benchmarks/results``. Every figure says where it comes from; a stage with no measured
rate for this configuration is reported as not measured, never guessed. :func:`format_plan` renders it as the
markdown tables printed by ``realfake plan`` and published as the build flow's first artifact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from realfake.config import DEMO_BASE, BuildConfig, ConfigError, load_config

__all__ = [
    "PAPER_COUNTS",
    "RESULTS_DIR",
    "build_plan",
    "format_plan",
    "load_plan_config",
]

# The paper's Tab. 5 (train images, test images, classes) as recorded in METHOD.md, keyed by preset dataset name.
PAPER_COUNTS: dict[str, tuple[int, int, int]] = {
    "imagenette": (12_811, 1_000, 10),
    "in100": (128_116, 10_000, 100),
    "in1k": (1_281_167, 100_000, 1000),
    "cub": (5_994, 5_794, 200),
    "cars": (8_144, 8_041, 196),
    "pets": (3_680, 3_669, 37),
    "eurosat": (21_600, 5_400, 10),
}
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
_UNSET_URI = "realfake-plan://source-uri-not-set"  # stands in for a preset's missing source.uri, never listed
_SAMPLE_IMAGES = 8  # source images encoded for the size estimate: enough to average content, cheap to read
_META_BYTES = 1024  # assumed size of a sample's provenance JSON (prompt, seed, sampler, hashes) for the estimate


def load_plan_config(preset: str | None = None, file: str | None = None,
                     overrides: list[str] | None = None) -> tuple[BuildConfig, bool]:
    """The configuration to plan, and whether its source may be listed.

    A preset without ``source.uri`` (the shipped ImageNet-family presets) can still be planned: its real counts
    then come from the paper's Tab. 5. Any other configuration error is raised as :class:`ConfigError`.
    """
    try:
        return load_config(preset=preset, file=file, overrides=overrides), True
    except ConfigError as e:
        if "source.uri is required" not in str(e):
            raise
    return load_config(preset=preset, file=file, overrides=[*(overrides or []), f"source.uri={_UNSET_URI}"]), False


# ------------------------------------------------------------------------------------------------------------
# Counts
# ------------------------------------------------------------------------------------------------------------
def _listed_counts(cfg: BuildConfig, storage_options: dict | None) -> dict[str, Any]:
    """Per-class train / test counts as ingest will split them, from one listing of the source (no image read)."""
    # the very listing (layout, source.classes) and split ingest makes, so the plan cannot drift
    from realfake.data.ingest import _split, scan_source, source_uri
    from realfake.redact import redact

    uri = source_uri(cfg.source)
    layout = scan_source(cfg.source, storage_options)
    train: dict[str, int] = {}
    test = 0
    samples: list[str] = []
    for c, split, files in _split([c for c in layout.classes if c.files], cfg.source.test_fraction,
                                  cfg.source.split_seed):
        if cfg.source.max_per_class:
            files = files[: cfg.source.max_per_class]
        if split == "train":
            train[c.folder] = train.get(c.folder, 0) + len(files)
            if files:
                samples.append(files[0])
        else:
            test += len(files)
    step = max(1, len(samples) // _SAMPLE_IMAGES)  # spread over the classes, not the first few
    return {"train": sum(train.values()), "test": test, "classes": len(train), "per_class_train": train,
            "source": f"listed {redact(uri, storage_options)} (files before ingest's decode and duplicate checks)",
            "sample_uris": samples[::step][:_SAMPLE_IMAGES]}


def _paper_counts(cfg: BuildConfig, why: str) -> dict[str, Any]:
    if cfg.dataset not in PAPER_COUNTS:
        raise ConfigError(f"cannot count the real images: {why}, and dataset {cfg.dataset!r} has no counts in the "
                          f"paper's Tab. 5 ({', '.join(PAPER_COUNTS)}); set source.uri to a folder that can be listed")
    n_train, n_test, classes = PAPER_COUNTS[cfg.dataset]
    per_class = {str(i): n_train // classes + (i < n_train % classes) for i in range(classes)}
    source = f"paper Tab. 5 for {cfg.dataset} (METHOD.md; {why}; per class: evenly divided)"
    if cfg.source.max_per_class:
        cap = cfg.source.max_per_class
        per_class = {k: min(v, cap) for k, v in per_class.items()}
        n_test = min(n_test, cap * classes)
        source += f", capped at source.max_per_class={cap}"
    return {"train": sum(per_class.values()), "test": n_test, "classes": classes, "per_class_train": per_class,
            "source": source, "sample_uris": []}


def real_counts(cfg: BuildConfig, list_source: bool = True, storage_options: dict | None = None) -> dict[str, Any]:
    """Real train / test images and classes: listed from the source when allowed and possible, else Tab. 5."""
    if not list_source:
        return _paper_counts(cfg, "source.uri not set" if cfg.source.uri == _UNSET_URI else "listing skipped")
    try:
        return _listed_counts(cfg, storage_options)
    except (OSError, ValueError) as e:
        from realfake.redact import redact

        first = redact(str(e), storage_options).splitlines()[0][:160] if str(e) else type(e).__name__
        return _paper_counts(cfg, f"source could not be listed: {first}")


# ------------------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------------------
def _finetune_plan(cfg: BuildConfig, per_class_train: dict[str, int], gpus: int) -> dict[str, Any]:
    from realfake.finetune import training_schedule

    ft = cfg.finetune
    scopes = per_class_train if ft.scope == "per_class" else {"all": sum(per_class_train.values())}
    try:
        adapters = [training_schedule(ft, n, processes=gpus) for n in scopes.values() if n]
    except ValueError as e:
        raise ConfigError(f"{e} (planned for --gpus {gpus})") from None
    steps = sum(a.steps for a in adapters)
    by_epochs = sum(ft.epochs * a.steps_per_epoch for a in adapters) if ft.epochs is not None else None
    return {"enabled": ft.enabled, "scope": ft.scope, "adapters": len(adapters), "epochs": ft.epochs,
            "max_steps": ft.max_steps, "batch_size": ft.batch_size, "gradient_accumulation": ft.gradient_accumulation,
            "micro_batch": adapters[0].micro_batch if adapters else None,
            "steps_per_epoch": adapters[0].steps_per_epoch if len(adapters) == 1 else None,
            "capped": by_epochs is not None and steps < by_epochs,
            "steps": steps, "samples": sum(a.samples for a in adapters)}


def _classifier_plan(cfg: BuildConfig, train_images: int, gpus: int) -> dict[str, Any]:
    from realfake.classify import batch_schedule

    c = cfg.classifier
    try:
        s = batch_schedule(c, max(train_images, 1), processes=gpus, streamed=cfg.train_data.streaming)
    except ValueError as e:
        raise ConfigError(f"{e} (planned for --gpus {gpus})") from None
    return {"train_images": train_images, "epochs": c.epochs, "batch_size": c.batch_size,
            "micro_batch": s.micro_batch, "gradient_accumulation": s.accumulation,
            "steps_per_epoch": s.steps_per_epoch, "steps": s.steps_per_epoch * c.epochs,
            "images_per_epoch": s.images_per_epoch, "image_passes": s.images_per_epoch * c.epochs, "model": c.model,
            "image_size": c.image_size}


# ------------------------------------------------------------------------------------------------------------
# Bytes
# ------------------------------------------------------------------------------------------------------------
def _reference_photographs() -> list:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a) for a in load_sample_images().images]


def _source_images(uris: list[str], storage_options: dict | None) -> list:
    import fsspec

    from realfake.data.images import decode_image

    images = []
    for uri in uris:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            images.append(decode_image(f.read()))
    return images


def bytes_estimate(cfg: BuildConfig, sample_uris: list[str], storage_options: dict | None = None) -> dict[str, Any]:
    """Bytes per synthetic sample: a few images at the output resolution through the shard writer's encoder.

    Synthetic images are made from their source images (img2img), so the source's own training images are the
    closest stand-in for their content; without them (source not listed) the two photographs scikit-learn ships.
    """
    from PIL import Image, ImageOps

    from realfake.data.shards import encode_image

    sh, res = cfg.shards, cfg.synthesis.resolution
    how = f"{len(sample_uris)} of the source's training images"
    try:
        images = _source_images(sample_uris, storage_options) if sample_uris else []
    except (OSError, ValueError):
        images = []
    if not images:
        images, how = _reference_photographs(), "scikit-learn's two bundled photographs (china.jpg, flower.jpg)"
    stretch = cfg.synthesis.source_resize == "stretch"
    sized = [img.resize((res, res), Image.BICUBIC) if stretch else ImageOps.fit(img, (res, res), Image.BICUBIC)
             for img in images]
    per_image = sum(len(encode_image(img, sh.image_format, sh.jpeg_quality)) for img in sized) / len(sized)
    quality = f" q{sh.jpeg_quality}" if sh.image_format != "png" else ""
    if sh.format == "webdataset":  # three members per sample, each a 512-byte header and padded to 512 bytes
        overhead, container = 3 * 512 + 512 + 256, "three 512-byte tar headers and padding"
    else:
        overhead, container = 256, "Parquet row and index columns, about 256 bytes"
    return {"per_image": round(per_image), "per_sample": round(per_image + _META_BYTES + overhead),
            "method": f"mean encoded size of {how} resized to {res} px as {sh.image_format}{quality} with the shard "
                      f"writer's encoder (content-dependent: generated images of other content differ), plus "
                      f"{_META_BYTES} bytes of provenance JSON (assumed) and {container}"}


# ------------------------------------------------------------------------------------------------------------
# Measured rates
# ------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _denoising_steps(steps: int, strength: float, img2img: bool) -> int:
    return min(int(steps * strength), steps) if img2img else steps  # as diffusers' img2img get_timesteps


def generation_rate(cfg: BuildConfig, results: Path = RESULTS_DIR) -> dict[str, Any]:
    """Measured images/s per GPU of realfake's engine for this sampler setting, or why there is none."""
    syn = cfg.synthesis
    if cfg.models.base == DEMO_BASE:
        return {"missing": "not measured for the demo base (the measured rates are SD v1.5 size)"}
    want = _denoising_steps(syn.steps, syn.strength, syn.latent_prior)
    candidates = []
    for name in ("gpu_synthesis_eager.json", "gpu_synthesis_compile.json"):
        data = _read_json(results / name)
        if not data or "generation" not in data:
            continue
        got = _denoising_steps(data["steps"], data["strength"], True)
        if data["resolution"] != syn.resolution or got != want or (data["guidance_scale"] > 1) != (
                syn.guidance_scale > 1) or bool(data.get("compile")) != syn.compile:
            continue
        for row in data["generation"]["rows"]:
            if row["loop"].startswith("realfake engine"):
                candidates.append((abs(row["batch"] - syn.batch_size), row["batch"], row["images_per_s"], name, data))
    if not candidates:
        return {"missing": f"not measured at {syn.resolution} px, {want} denoising steps, "
                           f"{'with' if syn.guidance_scale > 1 else 'without'} CFG"
                           f"{', compiled' if syn.compile else ''} (benchmarks/results/gpu_synthesis_*.json)"}
    _, batch, ips, name, data = min(candidates)
    nearest = "" if batch == syn.batch_size else f" (nearest measured batch to {syn.batch_size})"
    if cfg.finetune.enabled and cfg.finetune.scope == "per_class":
        nearest += ", one adapter for all classes (per-class adapter swaps not measured)"
    return {"per_s": ips, "unit": "images/s", "device": data["device"], "file": f"benchmarks/results/{name}",
            "detail": f"engine, batch {batch}{nearest}, {data['resolution']} px, {data.get('dtype', '')} "
                      f"{'compiled' if data.get('compile') else 'eager'}, random-weight SD v1.5"}


def finetune_rate(cfg: BuildConfig, results: Path = RESULTS_DIR, micro_batch: int | None = None) -> dict[str, Any]:
    """Measured fine-tuning samples/s per GPU for this configuration, or why there is none."""
    ft = cfg.finetune
    if cfg.models.base == DEMO_BASE:
        return {"missing": "not measured for the demo base (the measured rates are SD v1.5 size)"}
    data = _read_json(results / "gpu_finetune.json")
    if not data:
        return {"missing": "no benchmarks/results/gpu_finetune.json"}
    if data["resolution"] != ft.resolution:
        return {"missing": f"not measured at {ft.resolution} px (measured at {data['resolution']} px)"}
    mode = "cached" if ft.cache_latents else "uncached"
    # the first recorded run kept the card only in synthesis.md ("second session on a fresh H200")
    device = data.get("device") or "NVIDIA H200 (named in benchmarks/results/synthesis.md)"
    return {"per_s": data[f"{mode}_samples_per_s"], "unit": "samples/s", "device": device,
            "file": "benchmarks/results/gpu_finetune.json",
            "detail": f"realfake finetune, latents {mode}, {data['batch']} images per GPU"
                      + (f" (this plan: {micro_batch})" if micro_batch not in (None, data["batch"]) else "")
                      + f", {data['resolution']} px, bf16, rank 4, random-weight SD v1.5"}


# A published ResNet-50 training rate, not one of ours (no classifier has been timed on a GPU here): NVIDIA
# DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training performance: NVIDIA
# DGX1-16G", 1 GPU, FP32: 380.44 img/s at 224 px (mixed precision: 893.09). The slowest row of that table on an
# older card than a GPU pool of today, so a deadline derived from it errs long.
PUBLISHED_CLASSIFIER_RATE = {"per_s": 380.44, "pixels": 224, "device": "NVIDIA V100 16 GB (1 GPU, FP32)",
                             "file": "NVIDIA DeepLearningExamples resnet50v1.5 PyTorch README, training performance"}


def classifier_rate(cfg: BuildConfig) -> dict[str, Any]:
    """Image passes/s per GPU of classifier training for ``cfg``: the published ResNet-50 rate (
    :data:`PUBLISHED_CLASSIFIER_RATE`) scaled down by pixels above 224 px and never up below it (small images do
    not train proportionally faster), or why there is none (a CPU device: no GPU rate applies)."""
    if str(cfg.device).startswith("cpu"):
        return {"missing": "no classifier training rate on CPU (the published rate is a GPU's)"}
    ref = PUBLISHED_CLASSIFIER_RATE
    scale = min(1.0, (ref["pixels"] / cfg.classifier.image_size) ** 2)
    return {"per_s": ref["per_s"] * scale, "unit": "image passes/s", "device": ref["device"], "file": ref["file"],
            "detail": f"published ResNet-50 rate at {ref['pixels']} px"
                      + (f", scaled to {cfg.classifier.image_size} px" if scale < 1 else "")
                      + f" (this config: {cfg.classifier.model})"}


def _stage(name: str, work: str, amount: float, rate: dict[str, Any] | None, gpus: int,
           enabled: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {"stage": name, "work": work if enabled else "off", "gpu_hours": None, "wall_hours": None}
    if not enabled:
        return {**row, "rate": "-"}
    if rate is None or "missing" in rate:
        return {**row, "rate": (rate or {}).get("missing", "not measured")}
    hours = amount / rate["per_s"] / 3600
    return {**row, "gpu_hours": hours, "wall_hours": hours / gpus,
            "rate": f"{rate['per_s']:.3g} {rate['unit']} per GPU on {rate['device']} ({rate['detail']}; "
                    f"{rate['file']})"}


def build_plan(cfg: BuildConfig, gpus: int = 1, list_source: bool = True, storage_options: dict | None = None,
               results: Path = RESULTS_DIR) -> dict[str, Any]:
    """Everything a build of ``cfg`` will do and cost, as plain data (see :func:`format_plan`)."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    real = real_counts(cfg, list_source, storage_options)
    synthetic = real["train"] * cfg.synthesis.images_per_real
    ft = _finetune_plan(cfg, real["per_class_train"], gpus)
    clf = _classifier_plan(cfg, synthetic, gpus)
    size = bytes_estimate(cfg, real.pop("sample_uris"), storage_options)
    per_class = real.pop("per_class_train")
    stages = [
        _stage("captioning (BLIP-2)", f"{real['train']:,} images", real["train"], None, gpus, cfg.caption.enabled),
        _stage("guidance embedding (CLIP)", f"{real['train']:,} images", real["train"], None, gpus,
               cfg.guidance.enabled),
        _stage("fine-tuning (LoRA)", f"{ft['adapters']} adapter(s), {ft['steps']:,} steps x {ft['batch_size']} = "
               f"{ft['samples']:,} samples", ft["samples"], finetune_rate(cfg, results, ft["micro_batch"]), gpus,
               ft["enabled"]),
        _stage("generation", f"{synthetic:,} images", synthetic, generation_rate(cfg, results), gpus),
        _stage("classifier training", f"{clf['epochs']} epochs x {clf['images_per_epoch']:,} = "
               f"{clf['image_passes']:,} image passes", clf["image_passes"], None, gpus),
    ]
    measured = [s["gpu_hours"] for s in stages if s["gpu_hours"] is not None]
    return {
        "dataset": cfg.dataset, "version": cfg.version, "gpus": gpus,
        "real": {**real, "largest_class_train": max(per_class.values(), default=0)},
        "synthetic": {"images": synthetic, "images_per_real": cfg.synthesis.images_per_real},
        "finetune": ft, "classifier": clf,
        "bytes": {**size, "total": size["per_sample"] * synthetic},
        "stages": stages,
        "gpu_hours_measured": sum(measured),
        "not_measured": [s["stage"] for s in stages if s["gpu_hours"] is None and s["work"] != "off"],
    }


# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    k = 0 if n < 1000 else min(int(math.log10(n) // 3), len(units) - 1)
    return f"{n / 1000 ** k:.3g} {units[k]}"


def _hours(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h:.3g}" if h >= 0.01 else "<0.01"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as markdown: counts and schedules, then GPU-hours per stage with each rate's source."""
    r, ft, clf, b = plan["real"], plan["finetune"], plan["classifier"], plan["bytes"]
    length = f"{ft['epochs']} epochs" if ft["epochs"] is not None else "no epoch count"
    if ft["max_steps"] is not None:
        length += f", capped at {ft['max_steps']:,} steps" + (" (reached)" if ft["capped"] else "")
    per_epoch = f"{ft['steps_per_epoch']:,} steps per epoch, " if ft["steps_per_epoch"] else ""
    off = "" if ft["enabled"] else "; finetune.enabled is false"
    lines = [
        f"## Plan of {plan['dataset']}/{plan['version']} on {plan['gpus']} GPU(s)",
        "",
        "| what | amount | how it is known |",
        "|---|---|---|",
        f"| real images | {r['train']:,} train, {r['test']:,} test, {r['classes']:,} classes | {r['source']} |",
        f"| synthetic images | {plan['synthetic']['images']:,} | train x synthesis.images_per_real "
        f"({plan['synthetic']['images_per_real']}) |",
        f"| fine-tuning | {ft['steps']:,} steps, {ft['samples']:,} samples, {ft['adapters']} adapter(s) "
        f"({ft['scope']}) | {length}, {per_epoch}global batch {ft['batch_size']} (per GPU "
        f"{ft['micro_batch']} x {ft['gradient_accumulation']} accumulation){off} |",
        f"| classifier | {clf['steps']:,} steps, {clf['epochs']} epochs | one run: {clf['model']} at "
        f"{clf['image_size']} px on the synthetic images (a measured build also trains one on the real), "
        f"global batch {clf['batch_size']} (per GPU {clf['micro_batch']} x "
        f"{clf['gradient_accumulation']} accumulation), {clf['steps_per_epoch']:,} steps per epoch |",
        f"| bytes written | {_size(b['total'])} ({_size(b['per_sample'])} per sample) | {b['method']} |",
        "",
        "| stage | work | GPU-hours | wall hours on "
        f"{plan['gpus']} GPU(s) | measured rate (card, file) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s['stage']} | {s['work']} | {_hours(s['gpu_hours'])} | {_hours(s['wall_hours'])} | {s['rate']} |"
              for s in plan["stages"]]
    total, missing = plan["gpu_hours_measured"], ", ".join(plan["not_measured"])
    if len(plan["not_measured"]) == sum(s["work"] != "off" for s in plan["stages"]):
        lines += ["", "No stage of this configuration has a measured rate (benchmarks/results): no GPU-hours."]
    else:
        lines += ["", f"GPU-hours of the measured stages: {_hours(total)} ({_hours(total / plan['gpus'])} wall hours "
                  f"on {plan['gpus']} GPU(s))" + (f"; not measured, so not included: {missing}" if missing else "")
                  + "."]
    return "\n".join(lines)
