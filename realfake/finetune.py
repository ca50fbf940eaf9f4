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
needed, so the same protocol (:mod:`realfake.data.commit`, as for shards) holds on object stores. A re-run resumes
from the checkpoint on the trajectory of an uninterrupted run, refuses one written under another recipe, and its
``train_log.json`` covers every step once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
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
from realfake.config import MMD_MIN_BATCH, BuildConfig, FinetuneConfig
from realfake.data.commit import (
    CHECKPOINT_STATE,
    CommitError,
    Payload,
    PayloadError,
    check_payload,
    read_record,
    sweep,
    write_payload,
    write_record,
)
from realfake.data.manifest import RealSample, read_captions, read_guidance, read_image, read_manifest
from realfake.data.storage import Store
from realfake.losses import min_snr_weights, realfake_loss

__all__ = [
    "LORA_TARGETS",
    "AdapterResult",
    "CheckpointError",
    "Schedule",
    "adapter_dir",
    "adapter_hash",
    "add_lora",
    "finetune",
    "load_adapter",
    "training_schedule",
]

log = logging.getLogger(__name__)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
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


def _canvas_size(width: int, height: int, resolution: int, step: int) -> tuple[int, int]:
    """The training canvas of a ``width`` x ``height`` image: the shorter side ``resolution`` (the authors'
    ``transforms.Resize(resolution)``), the longer one rounded so it exceeds ``resolution`` by whole latent cells
    of ``step`` pixels; a square crop of it then sits on the VAE's latent grid."""
    short = min(width, height)

    def side(x: int) -> int:
        return resolution + step * max(0, round((x * resolution / short - resolution) / step))

    return side(width), side(height)


def _training_image(sample: RealSample, resolution: int, step: int, crop: str,
                    storage_options: dict | None) -> Image.Image:
    """A training image resized (bilinear, as the authors' transform) onto its canvas; with ``crop=center`` the
    centred ``resolution`` square of it, with ``random`` the whole canvas (the crop is drawn per step)."""
    img = read_image(sample, storage_options)
    size = _canvas_size(img.width, img.height, resolution, step)
    if img.size != size:
        img = img.resize(size, Image.BILINEAR)
    if crop == "center":
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    return img


def _window(u: torch.Tensor, width: int, height: int, side: int) -> tuple[int, int]:
    """A random crop's (x, y) offset, in latent cells, of a ``side`` square on a ``width`` x ``height`` canvas, from
    two uniforms in [0, 1)."""
    return min(int(u[0] * (width - side + 1)), width - side), min(int(u[1] * (height - side + 1)), height - side)


def _latent_window(canvas: torch.Tensor, u: torch.Tensor, side: int, mirrored: bool) -> torch.Tensor:
    """The crop of a cached latent canvas (C, H, W) at the window ``u`` draws; on a ``mirrored`` canvas (the encoded
    flipped image) the mirror of that window: the flip of the crop the draw chose, as the authors crop, then flip."""
    height, width = canvas.shape[1:]
    x, y = _window(u, width, height, side)
    x = width - side - x if mirrored else x
    return canvas[:, y : y + side, x : x + side]


@dataclass(frozen=True)
class Schedule:
    """How many steps and images a fine-tuning run takes, and how each global batch is split."""

    images: int  # training images of the adapter's scope
    processes: int
    batch_size: int  # global: images per optimiser step over all processes and accumulated micro-batches
    gradient_accumulation: int
    micro_batch: int  # images per process per forward/backward (and per MMD term)
    steps_per_epoch: int
    steps: int
    samples: int  # images drawn in all: steps x batch_size

    def describe(self) -> str:
        return (f"global batch {self.batch_size} = {self.micro_batch} per process x {self.processes} processes x "
                f"{self.gradient_accumulation} accumulation; {self.steps} steps ({self.steps_per_epoch} per epoch "
                f"of {self.images} images), {self.samples} images drawn")


def training_schedule(ft: FinetuneConfig, images: int, processes: int = 1) -> Schedule:
    """The steps, images drawn and micro-batch of fine-tuning ``images`` images on ``processes`` processes.

    An epoch is ``ceil(images / batch_size)`` optimiser steps; the run takes ``epochs`` of them, capped by
    ``max_steps`` (or ``max_steps`` alone when ``epochs`` is None). Raises ValueError (one line naming the fields
    and the fix) when the global batch does not split evenly, or leaves an MMD term fewer than
    :data:`~realfake.config.MMD_MIN_BATCH` images.
    """
    if images < 1 or processes < 1:
        raise ValueError(f"a fine-tuning schedule needs images and processes (got {images} images, {processes} "
                         "processes)")
    b, accum = ft.batch_size, ft.gradient_accumulation
    split = processes * accum
    if b % split:
        lower, higher = b // split * split, (b // split + 1) * split
        raise ValueError(
            f"finetune.batch_size={b} does not split over {processes} process(es) x finetune.gradient_accumulation="
            f"{accum}: set finetune.batch_size to a multiple of {split} (e.g. {lower or higher} or {higher}) or "
            "change finetune.gradient_accumulation or the number of processes")
    micro = b // split
    if ft.mmd_weight > 0 and micro < MMD_MIN_BATCH:
        raise ValueError(
            f"finetune.batch_size={b} over {processes} process(es) x finetune.gradient_accumulation={accum} leaves "
            f"{micro} images per process for the MMD term, which needs at least {MMD_MIN_BATCH} (the authors' "
            f"per-GPU batch): set finetune.batch_size={MMD_MIN_BATCH * split} or more, "
            + ("lower finetune.gradient_accumulation, " if accum > 1 else "") + "or set finetune.mmd_weight=0")
    per_epoch = math.ceil(images / b)
    steps = ft.epochs * per_epoch if ft.epochs is not None else None
    if ft.max_steps is not None:
        steps = ft.max_steps if steps is None else min(steps, ft.max_steps)
    assert steps is not None  # the config requires epochs or max_steps
    return Schedule(images, processes, b, accum, micro, per_epoch, steps, steps * b)


def _epoch_order(seed: int, epoch: int, images: int, length: int) -> torch.Tensor:
    """The image indices epoch ``epoch`` draws, in order: a permutation of all images from a generator of its own
    (seeded by the run's seed and the epoch, so a resume recomputes it), wrapped around to ``length`` as torch's
    DistributedSampler pads: every image at least once per epoch and every batch full."""
    key = int.from_bytes(hashlib.sha256(f"realfake-epoch:{seed}:{epoch}".encode()).digest()[:8], "big") >> 1
    perm = torch.randperm(images, generator=torch.Generator().manual_seed(key))
    return perm.repeat(math.ceil(length / images))[:length]


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


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

    * ``finetune.epochs`` and ``finetune.max_steps``: the learning rate is constant and no draw of step k depends on
      the run's length (an epoch's image order depends on the seed and the epoch only), so the first k steps of a
      longer run are those of a shorter one. The length may grow (train longer) or shrink down to the checkpoint's
      step, never below it (checked on its own). A schedule that reads the length must join the recipe.
    * ``finetune.gradient_accumulation``: the global batch (``finetune.batch_size``) is recipe, its split is not. A
      run out of GPU memory may resume with smaller micro-batches and more of them, as its error advises; like the
      number of processes, the split only changes over how many images each MMD term is estimated.
    * ``finetune.mixed_precision``, ``cache_latents``, ``checkpoint_every``, ``enabled`` and ``scope`` (each adapter
      has its own checkpoint folder; the adapter's name is recorded below). ``cache_latents`` changes no draw; with
      ``crop=random`` the cached run crops the encoded canvas on the latent grid, the uncached one encodes the
      cropped pixels, so their latents differ near the window's edges (the encoder's context), not their steps.
    """
    from realfake.models.loading import model_fingerprint

    ft = cfg.finetune
    return {
        "finetune.rank": ft.rank,
        "finetune.alpha": float(ft.alpha or ft.rank),  # None means alpha = rank: the same scaling
        "finetune.learning_rate": ft.learning_rate,
        "finetune.batch_size": ft.batch_size,
        "finetune.max_grad_norm": ft.max_grad_norm,
        "finetune.resolution": ft.resolution,
        "finetune.crop": ft.crop,
        "finetune.random_flip": ft.random_flip,
        "finetune.latents": ft.latents,
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
                     ft: FinetuneConfig, steps: int) -> dict[str, Any] | None:
    """The committed checkpoint's ``state.json``, checked against this run of ``steps`` steps; None when there is none.

    Raises :class:`CheckpointError` when it was written under another recipe, is past ``steps`` or cannot be
    read. Anything under the checkpoint folder that ``state.json`` does not name (the folder of a checkpoint
    whose commit never happened, or everything when nothing was committed) is removed, once the check passed.
    """
    where = store.uri(*ckpt)
    try:
        state = read_record(store, *ckpt, CHECKPOINT_STATE)
    except CommitError as e:  # not JSON, or not a JSON object
        raise CheckpointError(f"{e}; delete {where} to train this adapter from scratch") from e
    if state is not None:
        if not {"step", "folder", "files", "recipe", "history"} <= state.keys():
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
        if int(state["step"]) > steps:
            raise CheckpointError(
                f"the fine-tune checkpoint at {where} is at step {state['step']}, past this run's {steps} steps "
                f"(finetune.epochs={ft.epochs}, finetune.max_steps={ft.max_steps}): raise finetune.max_steps (or "
                f"finetune.epochs) to at least {state['step']} steps to resume it, or delete {where} to train "
                f"{steps} steps from scratch")
    # what no commit names: a checkpoint interrupted before its commit (everything, when nothing was committed)
    sweep(store, {CHECKPOINT_STATE, *([state["folder"]] if state is not None else [])}, *ckpt)
    return state


def _checkpoint_files(store: Store, ckpt: tuple[str, ...], state: dict[str, Any]) -> dict[str, bytes]:
    """The files a committed ``state.json`` names, each checked against its recorded size and sha256."""
    out = {}
    for name, meta in sorted(state["files"].items()):
        payload = Payload("/".join((*ckpt, state["folder"], name)), meta["bytes"], meta["sha256"])
        try:
            out[name] = check_payload(store, payload)
        except PayloadError as e:
            raise CheckpointError(
                f"{store.uri(*ckpt, CHECKPOINT_STATE)} names {e.uri} ({meta['bytes']} bytes), which {e.found}: the "
                f"checkpoint of step {state['step']} is damaged. Delete {store.uri(*ckpt)} to train this adapter "
                "from scratch") from e
    return out


def _commit_checkpoint(store: Store, ckpt: tuple[str, ...], step: int, files: dict[str, bytes],
                       recipe: dict[str, Any], history: list[dict], world: int) -> None:
    """Write ``step-{N}/`` whole, then ``state.json`` naming it (the commit), then drop what it superseded."""
    folder = f"step-{step:08d}"
    written = {name: write_payload(store, data, *ckpt, folder, name).to_json() for name, data in files.items()}
    write_record(store, {"step": step, "folder": folder, "files": written, "recipe": recipe, "history": history,
                         "processes": world}, *ckpt, CHECKPOINT_STATE)
    sweep(store, {CHECKPOINT_STATE, folder}, *ckpt)


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
    main = rank == 0  # writes checkpoints, the adapter and its log; the others only compute
    t0 = time.time()
    samples, prompts, guide = _training_data(cfg, store, scope)
    plan = training_schedule(ft, len(samples), world)  # a batch that does not split fails before any loading
    if main:
        log.info("fine-tuning adapter %s: %s", scope, plan.describe())
    if components is None:
        components = load_sd_components(cfg.models.base, cfg.models.base_revision, device)
    vae, unet, text_encoder, tokenizer = (components[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    noise_sched = DDPMScheduler.from_config(components["scheduler"].config)

    res = ft.resolution
    dtype = torch.float32
    sf = vae.config.scaling_factor
    cell = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell
    side = res // cell  # the latent side of a training crop
    shape = (vae.config.latent_channels, side, side)
    sampled = ft.latents == "sample"

    def encode(px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scaled VAE posterior of a pixel batch: mean and (latents=sample) standard deviation, on the CPU."""
        dist = vae.encode(px.to(device, dtype)).latent_dist
        return dist.mean.cpu() * sf, dist.std.cpu() * sf if sampled else None

    # The checkpoint to resume, checked before the latents are encoded: a refused one fails at once
    folder = adapter_dir(scope)
    ckpt = (*folder, "checkpoint")
    recipe = _recipe(cfg, scope, samples, prompts, guide)
    state = _from_rank0(accelerator, lambda: _open_checkpoint(store, ckpt, recipe, ft, plan.steps))
    resumed = None
    if state is not None:
        files = _checkpoint_files(store, ckpt, state)  # every rank reads the folder rank 0 checked
        resumed = (load_safetensors(files[ADAPTER_FILE]),
                   torch.load(io.BytesIO(files[TRAINER_FILE]), map_location="cpu", weights_only=True))

    # Cache (cache_latents): per image the posterior of its canvas (crop=random; the crop is then a latent window)
    # or of its centre crop, and of its mirror image (flipping a latent is not encoding the flipped image)
    cache: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = []  # [plain, mirrored][image] -> (mean, std)
    with torch.no_grad():
        if ft.cache_latents:
            def unit_size(s: RealSample) -> tuple[int, int]:
                return _canvas_size(s.width, s.height, res, cell) if ft.crop == "random" else (res, res)

            by_size: dict[tuple[int, int], list[int]] = {}
            for i, s in enumerate(samples):
                by_size.setdefault(unit_size(s), []).append(i)
            cache = [[None] * len(samples) for _ in range(2 if ft.random_flip else 1)]  # type: ignore[list-item]
            for members in by_size.values():
                for j in range(0, len(members), 32):
                    chunk = members[j : j + 32]
                    px = torch.stack([_pixels(_training_image(samples[i], res, cell, ft.crop, storage_options))
                                      for i in chunk])
                    for view, images in enumerate([px, torch.flip(px, dims=[3])][: len(cache)]):
                        mean, std = encode(images)
                        for k, i in enumerate(chunk):
                            cache[view][i] = (mean[k], std[k] if std is not None else None)
        uniq = sorted(set(prompts))
        text = encode_prompts(tokenizer, text_encoder, uniq, device).cpu()
        prompt_idx = torch.tensor([uniq.index(p) for p in prompts])

    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights follow finetune.seed, not the caller's RNG
        torch.manual_seed(ft.seed)
        add_lora(unet, ft.rank, ft.alpha)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ft.learning_rate)  # weight decay 1e-2: torch's default, as the authors'
    gen = torch.Generator().manual_seed(ft.seed * 1_000_003)  # every draw of a step: flips, crops, latents, noise, t
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
    # Every process draws each accumulated chunk of the global batch whole, from the same generator, and keeps its
    # slice: with the MMD term off, N processes take exactly the optimiser steps of one. The MMD term is computed
    # per process over its micro-batch (as the authors', per GPU), which the schedule keeps at >= MMD_MIN_BATCH.
    chunk = plan.batch_size // plan.gradient_accumulation
    local = slice(rank * plan.micro_batch, (rank + 1) * plan.micro_batch)
    loss_value = float(history[-1]["loss"]) if history else float("nan")
    steps = range(start, plan.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc=f"finetune[{scope}]", initial=start, total=plan.steps)
    from realfake.progress import StageProgress

    shown = StageProgress("finetune", plan.steps, "step", cfg.dataset, cfg.version, scope=scope,
                          samples_per_unit=plan.batch_size, start=start)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if ft.mixed_precision == "bf16" else torch.float16,
                              enabled=amp)

    def latents(idx: list[int], flip: torch.Tensor | None, crops: torch.Tensor | None) -> torch.Tensor:
        """The clean latents of this process's images: a posterior sample or mean of each one's (flipped) crop."""
        flips = flip.tolist() if flip is not None else [False] * len(idx)
        if cache:
            means, stds = [], []
            for k, i in enumerate(idx):
                mean, std = cache[int(flips[k])][i]
                if crops is not None:
                    mean = _latent_window(mean, crops[k], side, flips[k])
                    std = _latent_window(std, crops[k], side, flips[k]) if std is not None else None
                means.append(mean)
                stds.append(std)
            return torch.stack(means), (torch.stack(stds) if sampled else None)
        images = []  # no cache: read, crop, flip and encode this batch's images, as the authors' script does
        for k, i in enumerate(idx):
            img = _training_image(samples[i], res, cell, ft.crop, storage_options)
            if crops is not None:
                x, y = _window(crops[k], img.width // cell, img.height // cell, side)
                img = img.crop((x * cell, y * cell, x * cell + res, y * cell + res))
            px = _pixels(img)
            images.append(torch.flip(px, dims=[2]) if flips[k] else px)
        with torch.no_grad():
            return encode(torch.stack(images))

    def accumulate(order: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward over the accumulated micro-batches of one step; the last loss and its parts."""
        loss, parts = torch.zeros(()), {}
        batch = order[(step % plan.steps_per_epoch) * plan.batch_size:][: plan.batch_size]
        for k in range(plan.gradient_accumulation):
            idx = batch[k * chunk : (k + 1) * chunk][local].tolist()
            flip = torch.rand(chunk, generator=gen)[local] < 0.5 if ft.random_flip else None
            crops = torch.rand(chunk, 2, generator=gen)[local] if ft.crop == "random" else None
            eps = torch.randn((chunk, *shape), generator=gen)[local]  # drawn for latents=mean too: same other draws
            noise = torch.randn((chunk, *shape), generator=gen)[local]
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (chunk,), generator=gen)[local]
            mean, std = latents(idx, flip, crops)
            z0 = mean + std * eps if sampled else mean
            zt = noise_sched.add_noise(z0, noise, t).to(device)
            rows = torch.tensor(idx)
            states = inject_guidance(text[prompt_idx[rows]], guide[rows] if guide is not None else None,
                                     cfg.guidance.slot).to(device)
            # all-reduce once per optimiser step, not per micro-batch
            sync = accelerator.no_sync(model) if accelerator is not None and k + 1 < plan.gradient_accumulation \
                else contextlib.nullcontext()
            with sync:
                with autocast:
                    pred = model(zt, t.to(device), states).sample
                w = min_snr_weights(noise_sched.alphas_cumprod, t, ft.snr_gamma).to(device)
                loss, parts = realfake_loss(pred, noise.to(device), w, ft.mmd_weight, ft.mmd_kernel)
                scaled = loss / plan.gradient_accumulation
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return loss, parts

    saved = start  # the step of the last committed checkpoint (or of the one resumed from)
    order, order_epoch = None, -1
    for step in steps:
        epoch = step // plan.steps_per_epoch
        if epoch != order_epoch:
            order, order_epoch = _epoch_order(ft.seed, epoch, n, plan.steps_per_epoch * plan.batch_size), epoch
        opt.zero_grad(set_to_none=True)
        try:
            loss, parts = accumulate(order, step)
        except torch.cuda.OutOfMemoryError as e:
            cause = str(e).splitlines()[0] if str(e) else type(e).__name__
            kept = f"the checkpoint of step {saved} is kept and a re-run resumes from it" if saved else \
                "no checkpoint was written yet (finetune.checkpoint_every)"
            raise torch.cuda.OutOfMemoryError(
                f"GPU out of memory fine-tuning adapter {scope!r} at step {step + 1} with finetune.batch_size="
                f"{ft.batch_size} ({plan.micro_batch} per process x {world} process(es) x "
                f"finetune.gradient_accumulation={ft.gradient_accumulation}) at finetune.resolution={ft.resolution}: "
                "raise finetune.gradient_accumulation to keep the global batch in smaller micro-batches (each "
                f"keeping >= {MMD_MIN_BATCH} images while finetune.mmd_weight > 0), or use "
                f"finetune.mixed_precision=bf16; {kept}. Cause: {cause}"
            ) from e
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        # the gradients are already averaged over the processes: every rank clips by the same norm
        norm = torch.nn.utils.clip_grad_norm_(params, ft.max_grad_norm or float("inf"))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        done = loss.detach()
        mmd_batch = torch.tensor([parts.pop("mmd_batch")], device=device)
        if accelerator is not None:
            loss_value = float(accelerator.reduce(done, "mean"))
            per_rank = [int(b) for b in accelerator.gather(mmd_batch).tolist()]
        else:
            loss_value, per_rank = float(done), [int(mmd_batch)]
        history.append({"step": step + 1, "loss": loss_value, **parts, "grad_norm": float(norm),
                        "mmd_batch_per_rank": per_rank})
        if main:
            shown.update(step + 1, loss=loss_value)  # a log line at most every few seconds (realfake.progress)
        if (step + 1) % ft.checkpoint_every == 0 and step + 1 < plan.steps:
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
        store.write_json({"scope": scope, "config": ft.model_dump(), "recipe": recipe, "images": n,
                          "schedule": dataclasses.asdict(plan), "history": history, "processes": world,
                          "resumed_from": start, "seconds": round(time.time() - t0, 2)}, *folder, "train_log.json")
        store.remove(*ckpt, recursive=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the adapter is written before any process returns
    unet.unload_lora()  # leave shared components as they came: base layers back, no peft wrappers
    return AdapterResult(scope, store.uri(*folder), plan.steps, time.time() - t0, loss_value, start)


def adapter_hash(store: Store, scope: str) -> str:
    """sha256 (first 16 hex) of an adapter's weights: recorded in every synthetic image's provenance."""
    return hashlib.sha256(store.read_bytes(*adapter_dir(scope), WEIGHTS_NAME)).hexdigest()[:16]


def load_adapter(pipe: Any, store: Store, scope: str, **kwargs: Any) -> None:
    """Load adapter ``scope`` into a diffusers pipeline (``pipe.load_lora_weights(folder, **kwargs)``).

    diffusers reads a local folder: the store's own one, or for a remote store a temporary copy that is removed as
    soon as the weights are loaded, whether or not loading succeeds.
    """
    if store.local:
        pipe.load_lora_weights(store.path(*adapter_dir(scope)), **kwargs)
        return
    with tempfile.TemporaryDirectory(prefix="realfake-adapter-") as tmp:
        Path(tmp, WEIGHTS_NAME).write_bytes(store.read_bytes(*adapter_dir(scope), WEIGHTS_NAME))
        pipe.load_lora_weights(tmp, **kwargs)

