"""The demo's base generator: a tiny Stable-Diffusion-architecture pipeline pre-trained on font digits.

The paper starts from SD v1.5, a generator that knows the classes but not the target distribution. The
demo mirrors that at toy scale: the ten digits rendered from the TrueType fonts bundled with matplotlib
(random size, position, rotation and stroke weight), prompted ``photo of digit N``, teach a tiny SD
pipeline what digits are; the demo's real data (handwriting) is a different distribution that Real-Fake
must then match. The trained pipeline is saved in the standard diffusers layout (plus ``clip/``, the tiny
guidance encoder) and loaded back through the production loader like any SD folder. The package ships the
trained copy (``demo_base_weights/``, reproduced by ``realfake demo-base --retrain``); without it, or with
``REALFAKE_RETRAIN_BASE=1``, the first demo run trains it and caches it in the user cache.

Pre-training runs in three steps: the VAE (reconstruction + small KL), the latent scaling factor (as SD
did, 1/std of the latents), then the UNet on cached latents with text conditioning, the guidance slot on
half of the samples and 10% unconditional samples for classifier-free guidance. The tiny text encoder is
trained jointly with the UNet: SD's comes pre-trained by CLIP, and a random one would leave the class
names nearly indistinguishable to the UNet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from realfake.conditioning import inject_guidance
from realfake.models.tiny import TinySpec, build_clip_tokenizer, build_tiny_clip_vision, build_tiny_sd, save_tiny_sd

__all__ = ["DemoBaseRecipe", "ensure_demo_base", "pretrain_demo_base", "render_font_digits", "shipped_demo_base"]

log = logging.getLogger(__name__)


class DemoBaseRecipe:
    """Every number of the demo base pre-training; its hash names the cache folder."""

    spec = TinySpec()
    n_images = 12000
    vae_steps = 600
    vae_batch = 64
    vae_lr = 1e-3
    vae_kl = 1e-6
    unet_steps = 2000
    unet_batch = 128
    unet_lr = 1e-3
    uncond_prob = 0.1
    guidance_prob = 0.5
    seed = 0
    text_lr = 5e-4
    revision = 2

    @classmethod
    def key(cls) -> str:
        fields = {k: getattr(cls, k) for k in dir(cls) if not k.startswith("_") and k not in ("key",)}
        fields["spec"] = repr(cls.spec)
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _fonts() -> list[Path]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
             "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf"]
    fonts = [folder / n for n in names if (folder / n).exists()]
    if not fonts:
        raise FileNotFoundError(f"no DejaVu fonts found in {folder}; matplotlib's bundled fonts are required")
    return fonts


def render_font_digits(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` digits (uint8 ``[n, size, size, 3]``, labels ``[n]``): white glyphs on black, varied."""
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    canvas = size * 3
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = rng.integers(0, 10, n)
    for i in range(n):
        font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(rng.uniform(0.45, 0.75) * canvas))
        img = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(img)
        stroke = int(rng.integers(0, 4))
        draw.text((canvas / 2, canvas / 2), str(labels[i]), fill=255, font=font, anchor="mm",
                  stroke_width=stroke, stroke_fill=255)
        img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        dx, dy = rng.uniform(-0.08, 0.08, 2) * canvas
        img = img.transform(img.size, Image.AFFINE, (1, 0, dx, 0, 1, dy), resample=Image.BILINEAR)
        img = img.resize((size, size), Image.LANCZOS)
        images[i] = np.asarray(img)[..., None]
    return images, labels


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pretrain_demo_base(folder: str | Path, recipe: type[DemoBaseRecipe] = DemoBaseRecipe,
                       progress: bool = True) -> Path:
    """Train the tiny base from scratch and save it to ``folder`` (diffusers layout + ``clip/``)."""
    from tqdm import tqdm

    folder = Path(folder)
    spec = recipe.spec
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tokenizer = build_clip_tokenizer(tmp / "_tokenizer_src")
    comps = build_tiny_sd(spec, tokenizer, seed=recipe.seed)
    vision, processor = build_tiny_clip_vision(spec, seed=recipe.seed)
    vae, unet, text_encoder = comps["vae"], comps["unet"], comps["text_encoder"]
    vision.requires_grad_(False).eval()

    images, labels = render_font_digits(recipe.n_images, spec.image_size, recipe.seed)
    x = _to_tensor(images)
    log.info("rendered %d font digits in %.1fs", len(x), time.time() - t0)

    # 1. VAE: reconstruction + a small KL, as SD's autoencoder (no adversarial/perceptual terms at this size)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    bar = tqdm(range(recipe.vae_steps), desc="demo base: VAE", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(x), (recipe.vae_batch,), generator=gen)
        batch = x[idx]
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample(generator=None)).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, batch) + F.mse_loss(rec, batch) + recipe.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)

    # 2. latent scaling factor, as SD chose 0.18215: unit variance latents for the UNet
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i : i + 512]).latent_dist.mean for i in range(0, len(x), 512)])
    scale = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scale)
    lat = lat * scale

    # 3. UNet (+ text encoder) on cached latents: guidance slot on half of the samples
    prompts = [f"photo of digit {d}" for d in range(10)] + [""]
    token_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        pix = processor(images=list(images), return_tensors="pt").pixel_values
        guide = torch.cat([vision(pixel_values=pix[i : i + 512]).image_embeds for i in range(0, len(pix), 512)])
    sched = comps["scheduler"]
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(sched.config)
    opt = torch.optim.AdamW([{"params": unet.parameters(), "lr": recipe.unet_lr},
                             {"params": text_encoder.parameters(), "lr": recipe.text_lr}], weight_decay=1e-2)
    warm = 200
    lr_at = lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / recipe.unet_steps))  # noqa: E731
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    labels_t = torch.from_numpy(labels)
    unet.train()
    text_encoder.train()
    bar = tqdm(range(recipe.unet_steps), desc="demo base: UNet", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(lat), (recipe.unet_batch,), generator=gen)
        z0 = lat[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        all_states = text_encoder(token_ids)[0]
        text, uncond = all_states[:10], all_states[10:]
        states = text[labels_t[idx]]
        use_guide = torch.rand(len(idx), generator=gen) < recipe.guidance_prob
        guided = inject_guidance(states, guide[idx])
        states = torch.where(use_guide[:, None, None], guided, states)
        drop = torch.rand(len(idx), generator=gen) < recipe.uncond_prob
        states = torch.where(drop[:, None, None], uncond.expand_as(states), states)
        pred = unet(zt, t, states).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        lr_sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    comps["tokenizer"] = tokenizer
    save_tiny_sd(tmp, comps, (vision, processor))
    (tmp / "realfake_demo_base.json").write_text(json.dumps({
        "recipe": DemoBaseRecipe.key(), "seconds": round(time.time() - t0, 1), "vae_scaling_factor": scale,
        "trained_on": "font-rendered digits (matplotlib DejaVu fonts)", "n_images": recipe.n_images,
    }, indent=2))
    shutil.rmtree(tmp / "_tokenizer_src", ignore_errors=True)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    log.info("demo base trained in %.1fs -> %s", time.time() - t0, folder)
    return folder


SHIPPED = Path(__file__).resolve().parent / "demo_base_weights"


def shipped_demo_base() -> Path | None:
    """The pre-trained base shipped in the package, when it was trained with the current recipe."""
    meta = SHIPPED / "realfake_demo_base.json"
    if not meta.exists() or not (SHIPPED / "model_index.json").exists():
        return None
    return SHIPPED if json.loads(meta.read_text()).get("recipe") == DemoBaseRecipe.key() else None


def ensure_demo_base(progress: bool = True, retrain: bool = False) -> Path:
    """The demo base folder: the shipped pre-trained copy, else the cached one, else trained now and cached.

    The package ships the base that ``realfake demo-base --retrain`` produces (a few MB), so the demo does not
    spend its first run pre-training; ``retrain=True`` (or ``REALFAKE_RETRAIN_BASE=1``) ignores the shipped
    copy and trains into the cache. A file lock keeps concurrent runs from training twice.
    """
    from filelock import FileLock

    retrain = retrain or os.environ.get("REALFAKE_RETRAIN_BASE") == "1"
    if not retrain and (shipped := shipped_demo_base()) is not None:
        return shipped
    cache = Path(os.environ.get("REALFAKE_CACHE", Path.home() / ".cache" / "realfake"))
    folder = cache / "models" / f"demo-base-{DemoBaseRecipe.key()}"
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "model_index.json").exists():
            for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # left by a run that was killed
                shutil.rmtree(stale, ignore_errors=True)
            pretrain_demo_base(folder, progress=progress)
    return folder
