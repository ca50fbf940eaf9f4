"""CPU throughput of realfake's resident synthesis engine against a reference-style generation loop.

Both loops make the same images from the same dataset version, prompts, guidance vectors, seeds and sampler
settings (30 UniPC steps at strength 0.75, CFG 2.0, LoRA scale 0.5), in one process, one after the other:

* **reference-style**: what the authors' ``generate.py`` does: a stock ``StableDiffusionImg2ImgPipeline``
  loaded once per process from the model folder (fp16 on CUDA, fp32 here), the LoRA loaded unfused with
  ``load_lora_weights`` and scaled through ``cross_attention_kwargs`` (no CPU offload on CPU);
* **realfake engine**: :class:`realfake.synthesize.SynthesisEngine`, loaded once with the LoRA fused.

Reported per model: images/s, each loop's one-off load time (and images/s including it), and the share of
wall time spent outside UNet + VAE compute, measured by forward hooks. The models are realfake's tiny SD
twin and a larger "small" one, both random-weight SD architectures built offline (weights do not change
the cost). The machinery (hook timer, both loops) is shared with ``gpu_synthesis.py``.

    python benchmarks/synthesis.py --out /tmp/synthesis_cpu.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_synthesis import bench_generation, prepare_version  # noqa: E402

from realfake.models.tiny import (  # noqa: E402
    TinySpec,
    build_clip_tokenizer,
    build_tiny_clip_vision,
    build_tiny_sd,
    save_tiny_sd,
)

__all__ = ["MODELS", "main"]

MODELS: dict[str, TinySpec] = {
    # realfake's test model: 32 px, 8x8 latents
    "tiny": TinySpec(),
    # a wider, deeper twin at 64 px (8x8 latents through a 4-level VAE), cross-attention at two levels
    "small": TinySpec(image_size=64, width=256, vae_channels=(32, 64, 128, 128), unet_channels=(64, 128, 256),
                      unet_cross_attention=(False, True, True), unet_layers=2, text_layers=4, vision_layers=2,
                      patch_size=8),
}


def build_model(work: Path, name: str) -> str:
    folder = work / f"{name}-sd"
    if not (folder / "model_index.json").exists():
        spec = MODELS[name]
        tok = build_clip_tokenizer(work / "tokenizer-src")
        save_tiny_sd(folder, build_tiny_sd(spec, tok), build_tiny_clip_vision(spec))
    return str(folder)


def _params(folder: str) -> dict[str, float]:
    from realfake.models.loading import load_sd_components

    comps = load_sd_components(folder)
    return {k: sum(p.numel() for p in comps[k].parameters()) / 1e6 for k in ("unet", "vae", "text_encoder")}


def run_model(work: Path, name: str, images: int, batch: int, steps: int, repeats: int = 3) -> dict:
    base = build_model(work, name)
    res = MODELS[name].image_size
    cfg, store = prepare_version(work / name, base, res, "cpu", batch, steps, ft_steps=2, ft_resolution=res)
    runs = [bench_generation(cfg, store, torch.device("cpu"), [batch], lambda bs: images, compile_unet=False,
                             reference=True, offload=False, peak=None) for _ in range(repeats)]
    # a shared CPU is noisy: each repeat runs both loops back to back; keep the repeat of median engine speed
    # and report every repeat's speed-up
    speedups = [r["rows"][0]["images_per_s"] / r["rows"][1]["images_per_s"] for r in runs]
    median = sorted(range(repeats), key=lambda i: runs[i]["rows"][0]["images_per_s"])[repeats // 2]
    return {"model": name, "resolution": res, "params_millions": _params(base), "speedups": speedups,
            **runs[median]}


def markdown(results: list[dict], header: str) -> str:
    cols = ["model", "loop", "batch", "images", "images/s", "wall s", "load s", "images/s incl. load",
            "UNet s", "VAE s", "outside UNet+VAE"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        for row in r["rows"]:
            engine = row["loop"].startswith("realfake")
            load = r["engine_load_s"] if engine else r["reference_load_s"]  # each loaded once, outside its wall
            incl = row["images"] / (row["wall_s"] + load)
            vals = [r["model"], row["loop"], row["batch"], row["images"], f"{row['images_per_s']:.3g}",
                    f"{row['wall_s']:.1f}", f"{load:.1f}", f"{incl:.3g}", f"{row['unet_s']:.1f}", f"{row['vae_s']:.1f}",
                    f"{100 * row['outside_share']:.0f}%"]
            lines.append("| " + " | ".join(str(v) for v in vals) + " |")
    for r in results:
        p = r["params_millions"]
        diff = r["mean_abs_pixel_diff_engine_vs_reference"]
        lines.append(f"\n{r['model']}: {r['resolution']} px, UNet {p['unet']:.2f}M / VAE {p['vae']:.2f}M / text "
                     f"{p['text_encoder']:.2f}M parameters, {r['flops_per_image'] / 1e9:.3g} GFLOP per image; mean "
                     f"|engine - reference| per pixel (0-255, same seeds): "
                     + ", ".join(f"{v:.3g}" for v in diff.values())
                     + "; engine/reference speed-up per repeat: " + ", ".join(f"{x:.2f}x" for x in r["speedups"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny", "small"], choices=sorted(MODELS))
    p.add_argument("--images", type=int, default=16, help="images per loop and model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="sampling steps before strength 0.75")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=3, help="runs of both loops per model (median reported)")
    p.add_argument("--workdir", default=None, help="keep models and data here (default: a temporary folder)")
    p.add_argument("--out", default=None, help="write results as JSON here (and the table as .md next to it)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="realfake-synth-bench-"))
    t0 = time.perf_counter()
    results = [run_model(work, m, a.images, a.batch_size, a.steps, a.repeats) for m in a.models]
    header = (f"CPU: {platform.processor() or platform.machine()}, {a.threads} torch threads, torch "
              f"{torch.__version__}; {a.steps} UniPC steps x strength 0.75, CFG 2.0, LoRA scale 0.5, fp32; "
              f"median of {a.repeats} repeats; total {time.perf_counter() - t0:.0f} s")
    table = markdown(results, header)
    print(table)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join(["python benchmarks/synthesis.py", *(argv or sys.argv[1:])]),
                                   "results": results}, indent=2, default=str))
        out.with_suffix(".md").write_text(table + "\n")
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
