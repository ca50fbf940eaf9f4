"""Production model loading: Stable Diffusion, CLIP and BLIP-2 by hub id or local folder.

The same functions load SD v1.5 from the hub on a GPU cluster and the tiny models the tests and the demo
save locally; nothing here knows about tiny models. A model that cannot be loaded fails at once with an
error naming the id, so a bad config never reaches GPU work.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

__all__ = [
    "ModelLoadError",
    "load_clip_vision",
    "load_sd_components",
    "model_fingerprint",
    "resolve_device",
    "resolve_model",
]


class ModelLoadError(RuntimeError):
    """A model id or folder that cannot be loaded; the message names it and says what to check."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_model(model_id: str) -> str:
    """Map special names to folders: ``realfake-demo-base`` is the demo's cached tiny generator."""
    from realfake.config import DEMO_BASE

    if model_id == DEMO_BASE:
        from realfake.models.demo_base import ensure_demo_base

        return str(ensure_demo_base())
    return os.path.expanduser(model_id)


def _fail(kind: str, model_id: str, err: Exception) -> ModelLoadError:
    local = Path(model_id).exists()
    hint = (
        "the folder exists but is not a complete diffusers/transformers save (check its model_index.json / "
        "config.json)"
        if local
        else "not a local folder; as a hub id it needs network access or HF_HOME with the model cached "
        "(set HF_HUB_OFFLINE=1 to use only the cache)"
    )
    return ModelLoadError(f"cannot load {kind} from {model_id!r}: {hint}. Cause: {type(err).__name__}: {err}")


def load_sd_components(model_id: str, revision: str | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> dict:
    """Load vae, unet, text_encoder, tokenizer and scheduler of an SD v1.x pipeline (hub id or folder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model(model_id)
    kw = {"revision": revision} if revision else {}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        scheduler = UniPCMultistepScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    except Exception as e:  # any loader error becomes one clear message
        raise _fail("Stable Diffusion pipeline", model_id, e) from e
    device = torch.device(device)
    for m in (text_encoder, vae, unet):
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
            "path": path}


def load_clip_vision(model_id: str, revision: str | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32):
    """Load a CLIP vision tower with its projection and the matching image processor.

    Accepts a full CLIP checkpoint (``openai/clip-vit-large-patch14``), a vision-only save, or a pipeline
    folder with a ``clip/`` sub-folder (the demo base).
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    path = resolve_model(model_id)
    if Path(path, "clip", "config.json").exists():
        path = str(Path(path, "clip"))
    kw = {"revision": revision} if revision else {}
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(path, **kw)
        processor = CLIPImageProcessor.from_pretrained(path, **kw)
    except Exception as e:
        raise _fail("CLIP vision model", model_id, e) from e
    model.to(device=torch.device(device), dtype=dtype).eval().requires_grad_(False)
    return model, processor


def model_fingerprint(model_id: str, revision: str | None = None) -> str:
    """A short, stable identifier of model weights for provenance and cache keys.

    Local folders hash their config files whole and each weight file's size plus its first and last MiB
    (cheap even for multi-GB checkpoints); hub ids use id@revision.
    """
    path = Path(resolve_model(model_id))
    h = hashlib.sha256()
    if path.exists():
        for f in sorted(path.rglob("*")):
            if not f.is_file() or f.suffix not in (".json", ".txt", ".safetensors", ".bin"):
                continue
            h.update(str(f.relative_to(path)).encode())
            if f.suffix in (".json", ".txt"):
                h.update(f.read_bytes())
            else:
                size = f.stat().st_size
                h.update(str(size).encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 20))
                    fh.seek(max(size - (1 << 20), 0))
                    h.update(fh.read(1 << 20))
        return h.hexdigest()[:16]
    h.update(json.dumps([model_id, revision]).encode())
    return h.hexdigest()[:16]
