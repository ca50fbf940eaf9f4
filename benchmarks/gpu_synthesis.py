"""GPU throughput of Real-Fake generation and LoRA fine-tuning at Stable Diffusion v1.5 size.

One self-contained script for a lent H100 / H200 node (no Prefect, no network, no downloaded weights): it
builds SD v1.5's exact component configs with random weights (throughput does not depend on the weights),
saves them in the diffusers layout, prepares a small dataset version from the bundled handwritten digits
(manifest, CLIP guidance from a 768-d stand-in encoder, a LoRA adapter), then measures in one process:

* generation images/s at several batch sizes, 512x512, 30 UniPC steps, strength 0.75, CFG 2.0, bf16, SDPA,
  channels-last, optionally ``torch.compile``: a *reference-style* loop shaped as the authors' ``generate.py`` (a
  stock ``StableDiffusionImg2ImgPipeline`` loaded once per process in fp16, LoRA loaded unfused and scaled through
  ``cross_attention_kwargs``, model CPU offload) against realfake's resident ``SynthesisEngine`` (loaded once, bf16,
  LoRA fused), with the share of wall time spent outside UNet + VAE compute (forward hooks timed with CUDA
  events), the FLOPs of one image counted by ``torch.utils.flop_counter``, achieved TFLOP/s and the fraction
  of the card's dense bf16 peak;
* LoRA fine-tuning samples/s at 512 px, batch 8: realfake's ``finetune`` (VAE latents and text states cached
  once) against a loop that encodes every batch with the VAE and text encoder at every step.

``--smoke`` runs the same code on CPU with a tiny model in about a minute, to prove the script works.

    python benchmarks/gpu_synthesis.py --out benchmarks/results/gpu_synthesis.json          # on the GPU node
    python benchmarks/gpu_synthesis.py --smoke --out /tmp/gpu_smoke.json                    # anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from realfake.conditioning import encode_prompts, generation_prompt, inject_guidance  # noqa: E402
from realfake.config import BuildConfig, load_config  # noqa: E402
from realfake.data.storage import Store, version_store  # noqa: E402
from realfake.models.sd15 import CLIP_L14_TEXT, SD15_UNET, SD15_VAE  # noqa: E402

__all__ = [
    "ComputeTimer", "dense_bf16_peak", "engine_run", "main", "prepare_version", "reference_pipeline", "reference_run",
]

# Dense (no sparsity) bf16 tensor-core peaks from the vendor data sheets, TFLOP/s; matched by card name.
BF16_PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),  # H100 SXM5 / HBM3
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
SD15_FLOOR_TFLOP_PER_IMAGE = 39.0  # UNet x 22 steps x 2 (CFG) + VAE encode + decode at 512 px


def dense_bf16_peak(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a card by its ``torch.cuda.get_device_name`` (None if unknown)."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


class ComputeTimer:
    """Time spent inside the UNet and VAE of a pipeline, by forward hooks (CUDA events on GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.handles: list = []
        self.open: dict[int, object] = {}
        self.spans: dict[str, list] = {"unet": [], "vae": []}

    def attach(self, pipe) -> ComputeTimer:
        for name, module in (("unet", pipe.unet), ("vae", pipe.vae.encoder), ("vae", pipe.vae.decoder)):
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))
        return self

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _start(self, name: str):
        def hook(module, args):
            self.open[id(module)] = self._now()

        return hook

    def _stop(self, name: str):
        def hook(module, args, output):
            self.spans[name].append((self.open.pop(id(module)), self._now()))

        return hook

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1000 for k, v in self.spans.items()}
        return {k: sum(b - a for a, b in v) for k, v in self.spans.items()}


def bench_device(smoke: bool, cpu_threads: int) -> tuple[bool, torch.device]:
    """The benchmark's device: CUDA with TF32 matmuls and cuDNN autotuning, unless absent or ``smoke`` (then the
    CPU with ``cpu_threads`` threads)."""
    cuda = torch.cuda.is_available() and not smoke
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(cpu_threads)
    return cuda, torch.device("cuda" if cuda else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_base(folder: Path, smoke: bool) -> Path:
    """Random-weight SD v1.5 (or, with ``smoke``, realfake's tiny twin) in the diffusers layout + ``clip/``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from realfake.models.tiny import TinySpec, build_clip_tokenizer, build_tiny_clip_vision, build_tiny_sd, save_tiny_sd

    if (folder / "model_index.json").exists():
        return folder
    tokenizer = build_clip_tokenizer(folder.parent / "tokenizer-src")
    if smoke:
        spec = TinySpec()
        return save_tiny_sd(folder, build_tiny_sd(spec, tokenizer), build_tiny_clip_vision(spec))
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear")
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**SD15_VAE), unet=UNet2DConditionModel(**SD15_UNET),
                                   text_encoder=text, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # a small vision tower with ViT-L/14's 768-d projection stands in for CLIP image features
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=256,
                                                            intermediate_size=1024, num_hidden_layers=2,
                                                            num_attention_heads=4, projection_dim=768))
    vision.save_pretrained(folder / "clip")
    CLIPImageProcessor().save_pretrained(folder / "clip")
    return folder


def single_class_folder(dest: Path) -> str:
    """The bundled digits of one class as an image folder: every batch of the engine can be full-size."""
    from realfake.data.sources import write_demo_folder

    digits = write_demo_folder("demo_digits", dest.parent / "digits", 32)
    if not (dest / "zero").exists():
        shutil.copytree(digits / "0", dest / "zero")
    return str(dest)


def prepare_version(work: Path, base: str, resolution: int, device: str, batch_size: int, steps: int,
                    ft_steps: int = 2, ft_resolution: int | None = None, ft_batch: int = 8,
                    lora_scale: float = 0.5, version: str = "bench") -> tuple[BuildConfig, Store]:
    """Config + store with manifest, guidance and a trained LoRA adapter (scope ``all``)."""
    from realfake.data.ingest import ingest
    from realfake.finetune import finetune
    from realfake.guidance import compute_guidance

    cfg = load_config(data={
        "dataset": "bench", "version": version, "root": str(work / "out"), "device": device,
        "source": {"kind": "image_folder", "uri": single_class_folder(work / "src"), "test_fraction": 0.1},
        "models": {"base": base, "clip": base},
        "finetune": {"max_steps": ft_steps, "batch_size": ft_batch, "resolution": ft_resolution or resolution,
                     "checkpoint_every": 10_000, "rank": 4},
        "synthesis": {"steps": steps, "resolution": resolution, "batch_size": batch_size, "strength": 0.75,
                      "guidance_scale": 2.0, "scheduler": "unipc", "lora_scale": lora_scale},
    })
    store = version_store(cfg.root, cfg.dataset, cfg.version)
    if not store.exists("real", "manifest.parquet"):
        ingest(cfg.source, store, workers=4)
    compute_guidance(cfg, store)
    if not store.exists("adapters", "all", "pytorch_lora_weights.safetensors"):
        finetune(cfg, store)
    return cfg, store


def work_items(cfg: BuildConfig, store: Store, n: int):
    """``n`` work items cycling over the training images (replicas beyond the first have their own seeds)."""
    from realfake.synthesize import WorkItem, plan_work

    base = plan_work(cfg, store)
    return [WorkItem(w.sample_id, w.label, w.class_name, w.uri, i // len(base))
            for i, w in ((i, base[i % len(base)]) for i in range(n))]


def engine_run(engine, items: Sequence, device: torch.device) -> dict:
    """Generate ``items`` with a resident engine; wall time, hook-timed compute and the images."""
    timer = ComputeTimer(device).attach(engine.pipe)
    _sync(device)
    t0 = time.perf_counter()
    records = list(engine.generate(items))
    _sync(device)
    wall = time.perf_counter() - t0
    timer.detach()
    return {"wall_s": wall, **{f"{k}_s": v for k, v in timer.seconds().items()}, "images": records}


def reference_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA as the authors' ``generate.py`` (``torch_dtype=torch.float16``, line 117); fp32 on CPU (smoke)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def reference_pipeline(cfg: BuildConfig, store: Store, device: torch.device, offload: bool):
    """The authors' generation pipeline, loaded once per process as their ``generate.py`` does.

    ``generate.py`` builds it once before its loop (``self.pipe = self.get_pipe(prev_class_id)``, line 310) and again
    only when a per-class adapter changes (lines 211-212; one adapter for the whole dataset here, its default
    ``if_full``): a stock ``StableDiffusionImg2ImgPipeline`` in fp16 (line 117), the LoRA loaded unfused (line 120;
    peft's ``load_lora_weights`` here), the UniPC scheduler (line 133), then ``enable_model_cpu_offload()``
    (line 127). The LoRA scale 0.5 is applied per call (``cross_attention_kwargs``, line 226).
    """
    from diffusers import StableDiffusionImg2ImgPipeline, UniPCMultistepScheduler

    from realfake.finetune import load_adapter

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(cfg.models.base, dtype=reference_dtype(device),
                                                          safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    load_adapter(pipe, store, "all")
    if offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_run(pipe, cfg: BuildConfig, store: Store, items: Sequence, device: torch.device) -> dict:
    """The reference-style loop over ``items`` with a pipeline from :func:`reference_pipeline`, batch by batch.

    Conditioning is identical to the engine's (same prompts, guidance slot, negative prompt, per-image seeds), so
    the two differ in how the LoRA is applied (unfused at scale 0.5 against fused), the dtype (fp16 against bf16)
    and model CPU offload. The pipeline's one-off load is not in ``wall_s``, as the engine's is not.
    """
    from realfake.data.manifest import load_real_image, read_guidance
    from realfake.synthesize import _as_sample, image_seed

    syn = cfg.synthesis
    guidance = read_guidance(store)
    dtype = pipe.unet.dtype
    images = []
    timer = ComputeTimer(device).attach(pipe)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(items), syn.batch_size):
        batch = items[i : i + syn.batch_size]
        with torch.no_grad():
            prompts = [generation_prompt(syn, w.class_name) for w in batch]  # with generate.py's ", best quality"
            states = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, device)
            guide = torch.stack([torch.from_numpy(guidance[w.sample_id]) for w in batch])
            states = inject_guidance(states, guide, cfg.guidance.slot)
            negative = encode_prompts(pipe.tokenizer, pipe.text_encoder, [syn.negative_prompt], device)
            # stretched to the square by default, as generate.py line 328 (synthesis.source_resize)
            sources = [load_real_image(_as_sample(w), syn.resolution, fit=syn.source_resize) for w in batch]
            generators = [torch.Generator("cpu").manual_seed(image_seed(cfg.version, w.sample_id, w.replica, syn.seed))
                          for w in batch]
            out = pipe(image=sources, strength=syn.strength, num_inference_steps=syn.steps,
                       guidance_scale=syn.guidance_scale, prompt_embeds=states.to(dtype),
                       negative_prompt_embeds=negative.expand(len(batch), -1, -1).to(dtype), generator=generators,
                       cross_attention_kwargs={"scale": syn.lora_scale}, output_type="pil")
        images += out.images
    _sync(device)
    wall = time.perf_counter() - t0
    timer.detach()
    compute = timer.seconds()
    return {"wall_s": wall, "unet_s": compute["unet"], "vae_s": compute["vae"], "images": images}


def flops_per_image(engine, item) -> float:
    """FLOPs of generating one image, counted by torch's FLOP counter (matmuls, convolutions, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        list(engine.generate([item]))
    return float(counter.get_total_flops())


def _row(name: str, bs: int, n: int, r: dict, flops: float, peak: float | None) -> dict:
    ips = n / r["wall_s"]
    compute = r["unet_s"] + r["vae_s"]
    tflops = ips * flops / 1e12
    return {"loop": name, "batch": bs, "images": n, "images_per_s": ips, "wall_s": r["wall_s"],
            "unet_s": r["unet_s"], "vae_s": r["vae_s"],
            "outside_share": max(0.0, 1 - compute / r["wall_s"]), "tflops": tflops,
            "peak_fraction": tflops / peak if peak else None}


def _mean_abs_diff(a: list, b: list) -> float:
    import numpy as np

    diffs = [np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b, strict=True)]
    return float(np.mean(diffs))


def bench_generation(cfg: BuildConfig, store: Store, device: torch.device, batch_sizes: Sequence[int],
                     images_for, compile_unet: bool, reference: bool, offload: bool, peak: float | None,
                     tuned: bool = False) -> dict:
    from realfake.synthesize import SynthesisEngine

    t0 = time.perf_counter()
    engine = SynthesisEngine(cfg, store)  # loaded once, LoRA fused, channels-last on CUDA
    _sync(device)
    load_s = time.perf_counter() - t0
    dtype = engine.dtype
    flops = flops_per_image(engine, work_items(cfg, store, 1)[0])
    if compile_unet:
        if tuned:
            # inductor settings of PyTorch's "Accelerating generative AI: diffusion" recipe: 1x1 convolutions as
            # matmuls, coordinate-descent tuning of the generated kernels
            import torch._inductor.config as inductor

            inductor.conv_1x1_as_mm = True
            inductor.coordinate_descent_tuning = True
            inductor.epilogue_fusion = False
            inductor.coordinate_descent_check_all_directions = True
        engine.pipe.unet = torch.compile(engine.pipe.unet)
    ref_pipe, ref_load_s = None, None
    if reference:  # once per process, as the authors' generate.py
        _sync(device)
        t0 = time.perf_counter()
        ref_pipe = reference_pipeline(cfg, store, device, offload)
        _sync(device)
        ref_load_s = time.perf_counter() - t0
    rows, agreement = [], {}
    for bs in batch_sizes:
        engine.cfg.synthesis.batch_size = bs
        engine.max_batch = bs  # the engine plans batches with this (set from the config at load)
        n = images_for(bs)
        items = work_items(cfg, store, n)
        engine_run(engine, items[:bs], device)  # warm-up: kernels, allocator, compilation for this shape
        ours = engine_run(engine, items, device)
        label = "realfake engine" + (" +compile" if compile_unet else "") + (" (tuned inductor)" if tuned else "")
        rows.append(_row(label, bs, n, ours, flops, peak))
        if ref_pipe is not None:
            c = cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update={"batch_size": bs})})
            reference_run(ref_pipe, c, store, items[:bs], device)  # warm-up, as the engine's
            ref = reference_run(ref_pipe, c, store, items, device)
            rows.append(_row("reference-style" + (" (offload)" if offload and device.type == "cuda" else ""), bs,
                             n, ref, flops, peak))
            agreement[bs] = _mean_abs_diff([r.image for r in ours["images"]], ref["images"])
    return {"engine_load_s": load_s, "reference_load_s": ref_load_s,
            "reference_dtype": str(reference_dtype(device)) if reference else None, "flops_per_image": flops,
            "dtype": str(dtype), "rows": rows, "mean_abs_pixel_diff_engine_vs_reference": agreement}


def bench_finetune(cfg: BuildConfig, store: Store, device: torch.device, batch: int, resolution: int,
                   steps: tuple[int, int]) -> dict:
    """samples/s of realfake's ``finetune`` with VAE latents + text states cached once, and without the cache.

    Each mode runs a warm-up (CUDA context, cuDNN autotuning) and then two run lengths; the per-step rate is the
    difference of the two, so the one-off work (caching, adapter save) falls out and is reported separately.
    """
    from realfake.finetune import finetune
    from realfake.models.loading import load_sd_components

    comps = load_sd_components(cfg.models.base, cfg.models.base_revision, device)
    if device.type == "cuda":
        comps["unet"].to(memory_format=torch.channels_last)
    out: dict = {"batch": batch, "resolution": resolution, "steps": list(steps)}
    for mode, cached in (("cached", True), ("uncached", False)):
        ft = cfg.finetune.model_copy(update={"batch_size": batch, "resolution": resolution, "cache_latents": cached})
        times = []
        for s in (steps[0], *steps):  # the first is the warm-up
            c = cfg.model_copy(update={"finetune": ft.model_copy(update={"max_steps": s})})
            _sync(device)
            t0 = time.perf_counter()
            finetune(c, store, components=comps)
            _sync(device)
            times.append(time.perf_counter() - t0)
        rate = batch * (steps[1] - steps[0]) / (times[2] - times[1])
        out[f"{mode}_seconds"] = times
        out[f"{mode}_samples_per_s"] = rate
        out[f"{mode}_fixed_s"] = times[1] - steps[0] * batch / rate  # caching (if any), model moves, adapter save
    return out

def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    lines = [f"device: {result['device']}, command: {result['command']}"]
    if "generation" in result:
        g = result["generation"]
        head = ["loop", "batch", "images", "images_per_s", "wall_s", "unet_s", "vae_s", "outside_share", "tflops",
                "peak_fraction"]
        lines += [f"dtype {result['dtype']}, peak bf16 dense: {_fmt(result['peak_tflops'])} "
                  f"TFLOP/s, FLOPs/image counted: {g['flops_per_image'] / 1e12:.3g} TFLOP "
                  f"(SD v1.5 floor {SD15_FLOOR_TFLOP_PER_IMAGE} at 512 px), engine load {g['engine_load_s']:.1f} s"
                  + (f", reference pipeline load {g['reference_load_s']:.1f} s ({g['reference_dtype']}, once per "
                     "process)" if g.get("reference_load_s") is not None else ""), "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(_fmt(r[k]) for k in head) + " |" for r in g["rows"]]
        if g["mean_abs_pixel_diff_engine_vs_reference"]:
            diffs = g["mean_abs_pixel_diff_engine_vs_reference"].items()
            lines += ["", "mean |engine - reference| per pixel (0-255), same seeds: "
                      + ", ".join(f"batch {k}: {v:.3g}" for k, v in diffs)]
    if "finetune" in result:
        f = result["finetune"]
        lines += ["", f"LoRA fine-tune (realfake finetune) at {f['resolution']} px, batch {f['batch']}: latents "
                  f"cached {f['cached_samples_per_s']:.3g} samples/s (one-off work {f['cached_fixed_s']:.1f} s), "
                  f"uncached {f['uncached_samples_per_s']:.3g} samples/s (one-off {f['uncached_fixed_s']:.1f} s); "
                  f"ratio {f['cached_samples_per_s'] / f['uncached_samples_per_s']:.2f}x"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny sizes: proves the script runs")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 16 32 (smoke: 1 2)")
    p.add_argument("--batches", type=int, default=3, help="timed batches per batch size (images = batches x size)")
    p.add_argument("--min-images", type=int, default=16, help="at least this many timed images per batch size")
    p.add_argument("--steps", type=int, default=None, help="sampling steps before strength (default 30; smoke 4)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (smoke 32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's UNet")
    p.add_argument("--inductor-tuned", action="store_true", help="with --compile: 1x1 conv as matmul, coordinate "
                   "descent tuning")
    p.add_argument("--no-generation", action="store_true", help="skip the generation benchmark")
    p.add_argument("--no-reference", action="store_true", help="skip the reference-style loop")
    p.add_argument("--no-offload", action="store_true", help="reference-style loop without model CPU offload")
    p.add_argument("--no-finetune", action="store_true", help="skip the fine-tuning benchmark")
    p.add_argument("--ft-steps", type=int, nargs=2, default=None, help="two run lengths (default 5 25; smoke 1 3)")
    p.add_argument("--workdir", default=None, help="keep models and data here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write the results as JSON here (and the table next to it as .md)")
    a = p.parse_args(argv)

    cuda, device = bench_device(a.smoke, cpu_threads=max(1, min(4, torch.get_num_threads())))
    res = a.resolution or (32 if a.smoke else 512)
    steps = a.steps or (4 if a.smoke else 30)
    batch_sizes = a.batch_sizes or ([1, 2] if a.smoke else [1, 8, 16, 32])
    ft_steps = tuple(a.ft_steps or ((1, 3) if a.smoke else (5, 25)))
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    peak = dense_bf16_peak(name) if cuda else None
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="realfake-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# {name}; workdir {work}", flush=True)
    t0 = time.perf_counter()
    base = str(build_base(work / ("tiny-sd" if a.smoke else "sd15-random"), a.smoke))
    cfg, store = prepare_version(work, base, res, device.type, batch_sizes[0], steps,
                                 ft_resolution=min(res, 64) if not a.smoke else res)
    print(f"# setup {time.perf_counter() - t0:.1f} s", flush=True)
    result = {"device": name, "peak_tflops": peak, "torch": torch.__version__, "resolution": res, "steps": steps,
              "strength": 0.75, "guidance_scale": 2.0, "scheduler": "unipc", "compile": a.compile,
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    if not a.no_finetune:  # first: its numbers are in hand even if a long compile below runs out of time
        # 8 images per GPU: the authors' per-GPU batch, and the fewest an MMD term may take (config.MMD_MIN_BATCH)
        result["finetune"] = {**bench_finetune(cfg, store, device, 8, res, ft_steps), "device": name}
        print(json.dumps(result["finetune"]), flush=True)
    if not a.no_generation:
        gen = bench_generation(cfg, store, device, batch_sizes, lambda bs: max(a.min_images, a.batches * bs),
                               a.compile, not a.no_reference, not a.no_offload, peak, a.inductor_tuned)
        result["dtype"] = gen["dtype"]
        result["generation"] = {k: v for k, v in gen.items() if k != "dtype"}
    table = markdown(result)
    print(table, flush=True)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        out.with_suffix(".md").write_text(table + "\n")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
