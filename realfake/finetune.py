"""LoRA fine-tuning of the UNet under the Real-Fake objective (distribution matching).

An explicit, linear training loop in the shape of diffusers' ``train_text_to_image_lora`` example: LoRA
adapters on the UNet's attention projections (peft), epsilon-prediction with min-SNR weights, plus the MMD
term of :mod:`realfake.losses`. Every sample is conditioned on its prompt with its CLIP guidance vector in
the last text slot. VAE latents (with their flipped twin) and text states are computed once per dataset
instead of every step. The adapter is saved in the diffusers/peft LoRA format (``pytorch_lora_weights.safetensors``)
that ``load_lora_weights`` reads.

Every ``checkpoint_every`` steps the run commits a checkpoint to ``adapters/{scope}/checkpoint/``: the adapter and
the trainer state (optimiser, gradient scaler, the data generator) go to a folder of their own, ``step-{N}/``, and
``state.json``, written last, names that folder with the files' sizes and hashes, the recipe the weights depend on
and the loss history so far. Only a folder that ``state.json`` names is a checkpoint: a crash part-way through a
checkpoint leaves the previous one in force, and its unfinished folder is removed by the next run. No rename is
needed, so the same protocol holds on object stores. A re-run resumes from the checkpoint on the trajectory of an
uninterrupted run, refuses one written under another recipe, and its ``train_log.json`` covers every step once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    "CheckpointError",
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
CHECKPOINT_STATE = "state.json"  # the checkpoint's commit record, written after the files it names
ADAPTER_FILE = "adapter.safetensors"
TRAINER_FILE = "trainer.pt"  # optimiser, gradient scaler and data generator states


class CheckpointError(ValueError):
    """A fine-tune checkpoint cannot be resumed: written under another recipe, incomplete, or unreadable.

    Never resolved by discarding the checkpoint silently; the message names its location, what is wrong and what
    to do.
    """


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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _training_data(cfg: BuildConfig, store: Store, scope: str
                   ) -> tuple[list[RealSample], list[str], torch.Tensor | None]:
    """The images an adapter of ``scope`` trains on, their prompts and (guidance on) their CLIP vectors."""
    samples = read_manifest(store, "train")
    if scope != "all":
        samples = [s for s in samples if str(s.label) == scope]
    if not samples:
        raise ValueError(f"finetune scope {scope!r} has no training images in {store.uri('real', 'manifest.parquet')}")
    captions = read_captions(store) if cfg.caption.enabled else {}
    prompts = [build_prompt(cfg.synthesis.prompt_template, s.class_name, captions.get(s.sample_id)) for s in samples]
    guide = None
    if cfg.guidance.enabled:
        guidance = read_guidance(store)
        missing = [s.sample_id for s in samples if s.sample_id not in guidance]
        if missing:
            raise ValueError(f"{len(missing)} training images have no guidance embedding (e.g. {missing[0]}); "
                             "re-run the prepare stage")
        guide = torch.from_numpy(np.stack([guidance[s.sample_id] for s in samples]))
    return samples, prompts, guide


def adapter_recipe(cfg: BuildConfig, store: Store, scope: str) -> dict[str, Any]:
    """The recipe (see :func:`_recipe`) an adapter of ``scope`` trained now would be recorded with in its
    ``train_log.json``: what decides whether an adapter already in the version can be reused."""
    return _recipe(cfg, scope, *_training_data(cfg, store, scope))


def _recipe(cfg: BuildConfig, scope: str, samples: list[RealSample], prompts: list[str],
            guide: torch.Tensor | None) -> dict[str, Any]:
    """What an adapter checkpoint's weights depend on, by the config field (or data) that sets it.

    A resume requires every value to match. Left out on purpose, because they change how the steps are run and not
    which steps are taken:

    * ``finetune.max_steps``: the learning rate is constant and no draw of step k depends on max_steps, so the first
      k steps of a longer run are those of a shorter one. It may grow (train longer) or shrink down to the
      checkpoint's step, never below it (checked on its own). A schedule that reads max_steps must join the recipe.
    * ``finetune.batch_size`` and ``finetune.gradient_accumulation`` each: only their product, the images per
      optimiser step, is recipe. A run out of GPU memory may resume with smaller micro-batches and more of them, as
      its error advises; like the number of processes (each takes a slice), the split only changes over how many
      images the MMD term is estimated.
    * ``finetune.mixed_precision``, ``cache_latents``, ``checkpoint_every``, ``enabled`` and ``scope`` (each adapter
      has its own checkpoint folder; the adapter's name is recorded below).
    """
    from realfake.models.loading import model_fingerprint

    ft = cfg.finetune
    return {
        "finetune.rank": ft.rank,
        "finetune.alpha": float(ft.alpha or ft.rank),  # None means alpha = rank: the same scaling
        "finetune.learning_rate": ft.learning_rate,
        "finetune.batch_size*finetune.gradient_accumulation": ft.batch_size * ft.gradient_accumulation,
        "finetune.resolution": ft.resolution,
        "finetune.random_flip": ft.random_flip,
        "finetune.snr_gamma": ft.snr_gamma,
        "finetune.mmd_weight": ft.mmd_weight,
        "finetune.mmd_kernel": ft.mmd_kernel,
        "finetune.seed": ft.seed,
        # the base weights themselves (a local folder by content, a hub id with its revision), not where they lie
        "models.base (weights fingerprint)": model_fingerprint(cfg.models.base, cfg.models.base_revision),
        "guidance.enabled": cfg.guidance.enabled,
        "guidance.slot": cfg.guidance.slot,
        "caption.enabled": cfg.caption.enabled,
        "synthesis.prompt_template": cfg.synthesis.prompt_template,
        "adapter scope": scope,
        # the data: the training images (identity, label and content hash), their prompts and guidance vectors
        "data.images": len(samples),
        "data.images_sha256": _sha256(json.dumps([[s.sample_id, s.label, s.class_name, s.sha256]
                                                  for s in samples]).encode()),
        "data.prompts_sha256": _sha256(json.dumps(prompts).encode()),
        "data.guidance_sha256": _sha256(guide.numpy().tobytes()) if guide is not None else None,
    }


def _open_checkpoint(store: Store, ckpt: tuple[str, ...], recipe: dict[str, Any],
                     max_steps: int) -> dict[str, Any] | None:
    """The committed checkpoint's ``state.json``, checked against this run; None when there is none.

    Raises :class:`CheckpointError` when it was written under another recipe, is past ``max_steps`` or cannot be
    read. Anything under the checkpoint folder that ``state.json`` does not name (the folder of a checkpoint
    whose commit never happened, or everything when nothing was committed) is removed, once the check passed.
    """
    where = store.uri(*ckpt)
    state = None
    if store.exists(*ckpt, CHECKPOINT_STATE):
        try:
            state = store.read_json(*ckpt, CHECKPOINT_STATE)
        except ValueError as e:  # not JSON, or not text at all
            raise CheckpointError(f"{store.uri(*ckpt, CHECKPOINT_STATE)} is not valid JSON ({e}); delete {where} "
                                  "to train this adapter from scratch") from e
        if not isinstance(state, dict) or not {"step", "folder", "files", "recipe", "history"} <= state.keys():
            raise CheckpointError(
                f"{store.uri(*ckpt, CHECKPOINT_STATE)} records no recipe or folder (a checkpoint of an earlier "
                "realfake, whose files could come from different steps), so it cannot be checked against this "
                f"config: delete {where} to train this adapter from scratch")
        saved = state["recipe"]
        differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {recipe.get(k)!r} now"
                  for k in sorted(set(saved) | set(recipe)) if saved.get(k) != recipe.get(k)]
        if differ:
            raise CheckpointError(
                f"the fine-tune checkpoint at {where} (step {state['step']}) was written under another recipe "
                f"({'; '.join(differ)}). Delete {where} to train this adapter from scratch with the current "
                "config, or restore the checkpoint's values to resume it")
        if int(state["step"]) > max_steps:
            raise CheckpointError(
                f"the fine-tune checkpoint at {where} is at step {state['step']}, past finetune.max_steps="
                f"{max_steps}: raise finetune.max_steps to at least {state['step']} to resume it, or delete {where} "
                f"to train {max_steps} steps from scratch")
    keep = state["folder"] if state is not None else None
    for name in store.listdir(*ckpt):
        if name not in (CHECKPOINT_STATE, keep):
            log.info("removing %s: no committed checkpoint names it (a checkpoint interrupted before its commit)",
                     store.uri(*ckpt, name))
            store.remove(*ckpt, name, recursive=True)
    return state


def _checkpoint_files(store: Store, ckpt: tuple[str, ...], state: dict[str, Any]) -> dict[str, bytes]:
    """The files a committed ``state.json`` names, each checked against its recorded size and sha256."""
    out = {}
    for name, meta in sorted(state["files"].items()):
        path = (*ckpt, state["folder"], name)
        try:
            data = store.read_bytes(*path)
        except FileNotFoundError:
            data = None
        if data is None or len(data) != meta["bytes"] or _sha256(data) != meta["sha256"]:
            found = "is missing" if data is None else f"holds {len(data)} bytes that are not the recorded ones"
            raise CheckpointError(
                f"{store.uri(*ckpt, CHECKPOINT_STATE)} names {store.uri(*path)} ({meta['bytes']} bytes), which "
                f"{found}: the checkpoint of step {state['step']} is damaged. Delete {store.uri(*ckpt)} to train "
                "this adapter from scratch")
        out[name] = data
    return out


def _commit_checkpoint(store: Store, ckpt: tuple[str, ...], step: int, files: dict[str, bytes],
                       recipe: dict[str, Any], history: list[dict], world: int) -> None:
    """Write ``step-{N}/`` whole, then ``state.json`` naming it (the commit), then drop what it superseded."""
    folder = f"step-{step:08d}"
    for name, data in files.items():
        store.write_bytes(data, *ckpt, folder, name)
    store.write_json({"step": step, "folder": folder,
                      "files": {n: {"bytes": len(d), "sha256": _sha256(d)} for n, d in files.items()},
                      "recipe": recipe, "history": history, "processes": world}, *ckpt, CHECKPOINT_STATE)
    for name in store.listdir(*ckpt):
        if name not in (CHECKPOINT_STATE, folder):
            store.remove(*ckpt, name, recursive=True)


def _from_rank0(accelerator: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result (or its error) handed to every process: all resume from one checkpoint."""
    if accelerator is None:
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    error: BaseException | None = None
    if accelerator.process_index == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # every rank fails with it, instead of the others waiting for rank 0
            error, box[0] = e, ("error", type(e).__name__, str(e))
    broadcast_object_list(box, from_process=0)
    if error is not None:
        raise error
    if box[0][0] == "error":
        _, kind, message = box[0]
        if kind == CheckpointError.__name__:
            raise CheckpointError(message)
        raise RuntimeError(f"rank 0 could not open the fine-tune checkpoint: {kind}: {message}")
    return box[0][1]


def finetune(cfg: BuildConfig, store: Store, scope: str = "all", components: dict | None = None,
             progress: bool = False, storage_options: dict | None = None) -> AdapterResult:
    """Train (or resume) one LoRA adapter and save it under ``adapters/{scope}/``.

    Args:
        cfg: the build configuration (``finetune``, ``guidance``, ``synthesis.prompt_template`` are read).
        store: the dataset version store (manifest and guidance must exist).
        scope: ``all`` or a class label (as a string) for per-class adapters.
        components: already-loaded SD components (vae, unet, text_encoder, tokenizer, scheduler); loaded
            from ``cfg.models.base`` when omitted. The UNet passed in gets the adapter attached.

    A committed checkpoint under ``adapters/{scope}/checkpoint/`` is resumed (rank 0 opens it, every process
    starts from its step); what no commit names is removed first.

    Raises:
        CheckpointError: the committed checkpoint was written under another recipe, is past ``finetune.max_steps``
            or is damaged; it is kept, and the message says what to delete or restore.
    """
    try:
        return _finetune(cfg, store, scope, components, progress, storage_options)
    except BaseException:
        unet = (components or {}).get("unet")
        if unet is not None and getattr(unet, "peft_config", None):
            unet.unload_lora()  # a failed run leaves a shared UNet as it came too: no adapter layers on it
        raise


def _finetune(cfg: BuildConfig, store: Store, scope: str, components: dict | None, progress: bool,
              storage_options: dict | None) -> AdapterResult:
    """The body of :func:`finetune`."""
    from diffusers import DDPMScheduler
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

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
    samples, prompts, guide = _training_data(cfg, store, scope)

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

    # The checkpoint to resume, checked before the latents are encoded: a refused one fails at once
    folder = adapter_dir(scope)
    ckpt = (*folder, "checkpoint")
    recipe = _recipe(cfg, scope, samples, prompts, guide)
    state = _from_rank0(accelerator, lambda: _open_checkpoint(store, ckpt, recipe, ft.max_steps))
    resumed = None
    if state is not None:
        files = _checkpoint_files(store, ckpt, state)  # every rank reads the folder rank 0 checked
        resumed = (load_safetensors(files[ADAPTER_FILE]),
                   torch.load(io.BytesIO(files[TRAINER_FILE]), map_location="cpu", weights_only=True))

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

    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights follow finetune.seed, not the caller's RNG
        torch.manual_seed(ft.seed)
        add_lora(unet, ft.rank, ft.alpha)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft.learning_rate)
    gen = torch.Generator().manual_seed(ft.seed * 1_000_003)  # every draw of the loop: images, flips, noise, t
    amp = device.type == "cuda" and ft.mixed_precision != "no"
    scaler = torch.amp.GradScaler("cuda") if amp and ft.mixed_precision == "fp16" else None  # fp16 gradients underflow
    start, history = 0, []
    if state is not None:
        weights, trainer = resumed
        set_peft_model_state_dict(unet, weights)
        opt.load_state_dict(trainer["optimizer"])
        gen.set_state(trainer["generator"])  # the draws go on where they stopped, as in an uninterrupted run
        if scaler is not None and trainer.get("scaler"):
            scaler.load_state_dict(trainer["scaler"])
        start, history = int(state["step"]), list(state["history"])
        log.info("resuming adapter %s from step %d (%s)", scope, start, store.uri(*ckpt))
    # several processes: DDP through accelerate, gradients of the LoRA weights all-reduced (averaged) each step
    model = accelerator.prepare_model(unet) if accelerator is not None else unet
    unet.train()
    n = len(samples)
    # Every process draws the whole batch from the same generator and keeps its slice: with the MMD term off,
    # N processes take exactly the optimiser steps of one (the MMD term is computed per process, over its slice).
    local = slice(rank * (micro // world), (rank + 1) * (micro // world))
    loss_value = float(history[-1]["loss"]) if history else float("nan")
    steps = range(start, ft.max_steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"finetune[{scope}]", initial=start, total=ft.max_steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if ft.mixed_precision == "bf16" else torch.float16,
                              enabled=amp)

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
            buf = io.BytesIO()
            torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state(),
                        "scaler": scaler.state_dict() if scaler is not None else None}, buf)
            adapter = save_safetensors({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()})
            _commit_checkpoint(store, ckpt, step + 1, {ADAPTER_FILE: adapter, TRAINER_FILE: buf.getvalue()}, recipe,
                               history, world)
    unet.eval()
    if main:
        with tempfile.TemporaryDirectory() as tmp:
            _save_adapter(unet, Path(tmp))
            _upload_folder(store, Path(tmp), *folder)
        # the history of the steps before a resume comes from the checkpoint: each step is logged once
        store.write_json({"scope": scope, "config": ft.model_dump(), "recipe": recipe, "images": n, "history": history,
                          "processes": world, "resumed_from": start, "seconds": round(time.time() - t0, 2)},
                         *folder, "train_log.json")
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

