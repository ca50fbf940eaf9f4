"""LoRA fine-tuning of the UNet under the Real-Fake objective (distribution matching).

An explicit, linear training loop in the shape of diffusers' ``train_text_to_image_lora`` example: LoRA
adapters on the UNet's attention projections (peft), epsilon-prediction with min-SNR weights, plus the MMD
term of :mod:`realfake.losses`. Every sample is conditioned on its prompt with its CLIP guidance vector in
the last text slot. VAE latents (with their flipped twin) and text states are computed once per dataset
instead of every step. Checkpoints (adapter + optimiser + step) are written every ``checkpoint_every``
steps and a re-run resumes from the last one. The adapter is saved in the diffusers/peft LoRA format
(``pytorch_lora_weights.safetensors``) that ``load_lora_weights`` reads.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from realfake.conditioning import build_prompt, encode_prompts, inject_guidance
from realfake.config import BuildConfig
from realfake.data.manifest import CAPTIONS, RealSample, read_guidance, read_manifest
from realfake.data.storage import Store
from realfake.losses import min_snr_weights, realfake_loss

__all__ = [
    "LORA_TARGETS",
    "AdapterResult",
    "adapter_dir",
    "adapter_hash",
    "add_lora",
    "finetune",
    "load_real_image",
    "local_adapter",
    "read_captions",
]

log = logging.getLogger(__name__)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class AdapterResult:
    scope: str
    uri: str
    steps: int
    seconds: float
    final_loss: float
    resumed_from: int = 0


def adapter_dir(scope: str) -> tuple[str, str]:
    return ("adapters", scope)


def add_lora(unet, rank: int, alpha: float | None = None) -> None:
    """Attach a LoRA adapter (peft) to the UNet's attention projections, as diffusers' LoRA script does."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )


def load_real_image(sample: RealSample, resolution: int, storage_options: dict | None = None) -> Image.Image:
    """Read a manifest image through fsspec, RGB, resized (bicubic) to a square of ``resolution``."""
    import fsspec

    from realfake.data.ingest import decode_image

    with fsspec.open(sample.uri, "rb", **(storage_options or {})) as f:
        img = decode_image(f.read())
    if img.size != (resolution, resolution):
        # center crop to square, then resize: the SD training transform
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
    return img


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def read_captions(store: Store) -> dict[str, str]:
    if not store.exists(*CAPTIONS):
        return {}
    t = store.read_table(*CAPTIONS)
    return dict(zip(t.column("sample_id").to_pylist(), t.column("caption").to_pylist(), strict=True))


def _save_adapter(unet, folder: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(folder), unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )


def _upload_folder(store: Store, local: Path, *parts: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            store.write_bytes(f.read_bytes(), *parts, *f.relative_to(local).parts)


def _data_parallel(device: torch.device):
    """``(accelerator, rank, world)`` when started by ``torchrun`` / ``accelerate launch`` with several processes
    (``WORLD_SIZE`` > 1: one per GPU, NCCL; gloo on CPU), else ``(None, 0, 1)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, 0, 1
    from accelerate import Accelerator

    acc = Accelerator(cpu=device.type == "cpu")
    return acc, acc.process_index, acc.num_processes


def finetune(cfg: BuildConfig, store: Store, scope: str = "all", components: dict | None = None,
             progress: bool = False, storage_options: dict | None = None) -> AdapterResult:
    """Train (or resume) one LoRA adapter and save it under ``adapters/{scope}/``.

    Args:
        cfg: the build configuration (``finetune``, ``guidance``, ``synthesis.prompt_template`` are read).
        store: the dataset version store (manifest and guidance must exist).
        scope: ``all`` or a class label (as a string) for per-class adapters.
        components: already-loaded SD components (vae, unet, text_encoder, tokenizer, scheduler); loaded
            from ``cfg.models.base`` when omitted. The UNet passed in gets the adapter attached.
    """
    from diffusers import DDPMScheduler
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from realfake.models.loading import load_sd_components, resolve_device

    ft = cfg.finetune
    device = resolve_device(cfg.device)
    accelerator, rank, world = _data_parallel(device)
    if accelerator is not None:
        device = accelerator.device  # this process's GPU (cuda:LOCAL_RANK), or the CPU
    micro = max(1, ft.batch_size)
    if micro % world:
        raise ValueError(f"finetune.batch_size={micro} must be a multiple of the number of training processes "
                         f"({world}): each process takes an equal slice of every batch")
    main = rank == 0  # writes checkpoints, the adapter and its log; the others only compute
    t0 = time.time()
    if components is None:
        components = load_sd_components(cfg.models.base, cfg.models.base_revision, device)
    vae, unet, text_encoder, tokenizer = (components[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    noise_sched = DDPMScheduler.from_config(components["scheduler"].config)
    samples = read_manifest(store, "train")
    if scope != "all":
        samples = [s for s in samples if str(s.label) == scope]
    if not samples:
        raise ValueError(f"finetune scope {scope!r} has no training images in {store.uri('real', 'manifest.parquet')}")
    guidance = read_guidance(store) if cfg.guidance.enabled else {}
    captions = read_captions(store) if cfg.caption.enabled else {}

    # Cache: latents of each image and its mirror, text states per distinct prompt (once per dataset)
    res = ft.resolution
    dtype = torch.float32
    sf = vae.config.scaling_factor

    def pixels(chunk: list[RealSample]) -> torch.Tensor:
        return torch.stack([_pixels(load_real_image(s, res, storage_options)) for s in chunk]).to(device, dtype)

    def encode(px: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        if flip is not None:
            px = torch.where(flip.to(device)[:, None, None, None], torch.flip(px, dims=[3]), px)
        return vae.encode(px).latent_dist.mean.cpu() * sf

    prompts = [build_prompt(cfg.synthesis.prompt_template, s.class_name, captions.get(s.sample_id)) for s in samples]
    lat = lat_flip = None
    with torch.no_grad():
        if ft.cache_latents:
            plain, mirrored = [], []
            for i in range(0, len(samples), 32):
                px = pixels(samples[i : i + 32])
                plain.append(encode(px))
                if ft.random_flip:
                    mirrored.append(encode(torch.flip(px, dims=[3])))
            lat = torch.cat(plain)
            lat_flip = torch.cat(mirrored) if ft.random_flip else None
        uniq = sorted(set(prompts))
        text = encode_prompts(tokenizer, text_encoder, uniq, device).cpu()
        prompt_idx = torch.tensor([uniq.index(p) for p in prompts])
        guide = None
        if cfg.guidance.enabled:
            missing = [s.sample_id for s in samples if s.sample_id not in guidance]
            if missing:
                raise ValueError(f"{len(missing)} training images have no guidance embedding (e.g. {missing[0]}); "
                                 "re-run the prepare stage")
            guide = torch.from_numpy(np.stack([guidance[s.sample_id] for s in samples]))

    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights follow finetune.seed, not the caller's RNG
        torch.manual_seed(ft.seed)
        add_lora(unet, ft.rank, ft.alpha)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft.learning_rate)
    # several processes: DDP through accelerate, gradients of the LoRA weights all-reduced (averaged) each step
    model = accelerator.prepare_model(unet) if accelerator is not None else unet
    folder = adapter_dir(scope)
    start = 0
    ckpt = (*folder, "checkpoint")
    if store.exists(*ckpt, "state.json"):
        state = store.read_json(*ckpt, "state.json")
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "a.safetensors").write_bytes(store.read_bytes(*ckpt, "adapter.safetensors"))
            set_peft_model_state_dict(unet, load_file(Path(tmp, "a.safetensors")))
        opt.load_state_dict(torch.load(io.BytesIO(store.read_bytes(*ckpt, "optimizer.pt")), weights_only=True))
        start = int(state["step"])
        log.info("resuming adapter %s from step %d", scope, start)
    gen = torch.Generator().manual_seed(ft.seed * 1_000_003 + start)
    history: list[dict] = []
    unet.train()
    n = len(samples)
    # Every process draws the whole batch from the same generator and keeps its slice: with the MMD term off,
    # N processes take exactly the optimiser steps of one (the MMD term is computed per process, over its slice).
    local = slice(rank * (micro // world), (rank + 1) * (micro // world))
    loss_value = float("nan")
    steps = range(start, ft.max_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"finetune[{scope}]", initial=start, total=ft.max_steps)
    amp = device.type == "cuda" and ft.mixed_precision != "no"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if ft.mixed_precision == "bf16" else torch.float16,
                              enabled=amp)
    scaler = torch.amp.GradScaler("cuda") if amp and ft.mixed_precision == "fp16" else None  # fp16 gradients underflow

    def accumulate() -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward over ``finetune.gradient_accumulation`` micro-batches; the last loss and parts."""
        loss, parts = torch.zeros(()), {}
        for k in range(ft.gradient_accumulation):
            idx = torch.randint(0, n, (micro,), generator=gen)
            flip = torch.rand(micro, generator=gen) < 0.5 if ft.random_flip else None
            idx, flip = idx[local], (flip[local] if flip is not None else None)
            if lat is None:  # no cache: read and encode this batch's images, as the reference script does
                with torch.no_grad():
                    z0 = encode(pixels([samples[i] for i in idx.tolist()]), flip)
            else:
                z0 = lat[idx] if flip is None else torch.where(flip[:, None, None, None], lat_flip[idx], lat[idx])
            noise = torch.randn((micro, *z0.shape[1:]), generator=gen)[local]
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (micro,), generator=gen)[local]
            zt = noise_sched.add_noise(z0, noise, t).to(device)
            states = inject_guidance(text[prompt_idx[idx]], guide[idx] if guide is not None else None,
                                     cfg.guidance.slot).to(device)
            # all-reduce once per optimiser step, not per micro-batch
            sync = accelerator.no_sync(model) if accelerator is not None and k + 1 < ft.gradient_accumulation \
                else contextlib.nullcontext()
            with sync:
                with autocast:
                    pred = model(zt, t.to(device), states).sample
                w = min_snr_weights(noise_sched.alphas_cumprod, t, ft.snr_gamma).to(device)
                loss, parts = realfake_loss(pred, noise.to(device), w, ft.mmd_weight, ft.mmd_kernel)
                scaled = loss / ft.gradient_accumulation
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss, parts

    saved = start  # the step of the last committed checkpoint (or of the one resumed from)
    for step in steps:
        opt.zero_grad(set_to_none=True)
        try:
            loss, parts = accumulate()
        except torch.cuda.OutOfMemoryError as e:
            cause = str(e).splitlines()[0] if str(e) else type(e).__name__
            kept = f"the checkpoint of step {saved} is kept and a re-run resumes from it" if saved else \
                "no checkpoint was written yet (finetune.checkpoint_every)"
            raise torch.cuda.OutOfMemoryError(
                f"GPU out of memory fine-tuning adapter {scope!r} at step {step + 1} with finetune.batch_size="
                f"{ft.batch_size} at finetune.resolution={ft.resolution} ({world} process(es)): lower "
                "finetune.batch_size and raise finetune.gradient_accumulation to keep the effective batch, or use "
                f"finetune.mixed_precision=bf16; {kept}. Cause: {cause}"
            ) from e
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        done = loss.detach()
        loss_value = float(accelerator.reduce(done, "mean") if accelerator is not None else done)
        history.append({"step": step + 1, "loss": loss_value, **parts})
        if (step + 1) % ft.checkpoint_every == 0 and step + 1 < ft.max_steps:
            saved = step + 1  # every rank knows the step of the checkpoint rank 0 commits
        if main and saved == step + 1:
            with tempfile.TemporaryDirectory() as tmp:
                save_file(get_peft_model_state_dict(unet), Path(tmp, "a.safetensors"))
                store.write_bytes(Path(tmp, "a.safetensors").read_bytes(), *ckpt, "adapter.safetensors")
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            store.write_bytes(buf.getvalue(), *ckpt, "optimizer.pt")
            store.write_json({"step": step + 1}, *ckpt, "state.json")  # written last: the checkpoint's commit
    unet.eval()
    if main:
        with tempfile.TemporaryDirectory() as tmp:
            _save_adapter(unet, Path(tmp))
            _upload_folder(store, Path(tmp), *folder)
        prev = store.read_json(*folder, "train_log.json")["history"] \
            if start and store.exists(*folder, "train_log.json") else []
        store.write_json({"scope": scope, "config": ft.model_dump(), "images": n, "history": prev + history,
                          "processes": world, "seconds": round(time.time() - t0, 2)}, *folder, "train_log.json")
        store.remove(*ckpt, recursive=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the adapter is written before any process returns
    unet.unload_lora()  # leave shared components as they came: base layers back, no peft wrappers
    return AdapterResult(scope, store.uri(*folder), ft.max_steps, time.time() - t0, loss_value, start)


def adapter_hash(store: Store, scope: str) -> str:
    """sha256 (first 16 hex) of an adapter's weights: recorded in every synthetic image's provenance."""
    import hashlib

    return hashlib.sha256(store.read_bytes(*adapter_dir(scope), WEIGHTS_NAME)).hexdigest()[:16]


def local_adapter(store: Store, scope: str) -> str:
    """A local folder holding the adapter (the store's own folder, or a temporary copy of a remote one)."""
    if store.local:
        return store.path(*adapter_dir(scope))
    tmp = tempfile.mkdtemp(prefix="realfake-adapter-")
    Path(tmp, WEIGHTS_NAME).write_bytes(store.read_bytes(*adapter_dir(scope), WEIGHTS_NAME))
    return tmp

