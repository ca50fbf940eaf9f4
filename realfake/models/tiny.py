"""Tiny models of the production architectures, built offline from configs.

Nothing can be downloaded on the build machines, so the tests and the demo build Stable Diffusion's
components (AutoencoderKL, UNet2DConditionModel, CLIP text encoder + BPE tokenizer) and a CLIP vision
encoder from small configs, save them with ``save_pretrained`` and load them back through the production
loaders in :mod:`realfake.models.loading`. Only the sizes differ from SD v1.5 / CLIP ViT-L/14: the code
paths (cross-attention width equal to the guidance width, 77-token context, VAE scaling) are the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UniPCMultistepScheduler
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

__all__ = [
    "TinySpec",
    "build_clip_tokenizer",
    "build_tiny_clip_vision",
    "build_tiny_sd",
    "save_tiny_sd",
]

# Words the tokenizer merges into single tokens; anything else still tokenizes, byte by byte.
_WORDS = (
    "photo of digit a the zero one two three four five six seven eight nine distorted unrealistic blurry out "
    "frame cropped deformed handwritten number class image picture 0 1 2 3 4 5 6 7 8 9"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level BPE maps every byte to a printable unicode character; reproduce that table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_clip_tokenizer(folder: str | Path, words: tuple[str, ...] | list[str] = tuple(_WORDS)) -> CLIPTokenizer:
    """Write a small CLIP BPE vocabulary (all bytes + whole-word merges for ``words``) and load it.

    The result is a genuine :class:`CLIPTokenizer` (same pre-tokenisation, ``</w>`` suffixes, start/end
    tokens, 77-token padding) with a vocabulary small enough for tiny text encoders.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    seen = set(vocab)
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            merged = a + b
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
            if merged not in seen:
                vocab.append(merged)
                seen.add(merged)
            symbols = [merged] + symbols[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=77,
    )
    tok.save_pretrained(folder)
    return tok


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny SD-architecture pipeline. ``width`` is both the text width and the guidance width."""

    image_size: int = 32
    width: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 32)
    unet_channels: tuple[int, ...] = (32, 64)
    # cross-attention only where the feature map is small: at 8x8 latents attention dominates CPU time
    unet_cross_attention: tuple[bool, ...] = (False, True)
    unet_layers: int = 1
    text_layers: int = 2
    vision_layers: int = 2
    patch_size: int = 4

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def build_tiny_sd(spec: TinySpec, tokenizer: CLIPTokenizer, seed: int = 0) -> dict:
    """Random-weight SD components of the real classes: vae, unet, text_encoder, tokenizer, scheduler."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        block_out_channels=spec.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=spec.image_size,
    )
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in spec.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.unet_cross_attention))
    unet = UNet2DConditionModel(
        sample_size=spec.latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=spec.unet_layers,
        block_out_channels=spec.unet_channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=spec.width,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.width,
            intermediate_size=spec.width * 4,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=spec.width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1,  # as in SD v1.5's scheduler config
    )
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def build_tiny_clip_vision(spec: TinySpec, seed: int = 0) -> tuple[CLIPVisionModelWithProjection, CLIPImageProcessor]:
    """A CLIP vision encoder whose projection width equals the text width (as ViT-L/14's 768 equals SD's)."""
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            hidden_size=spec.width,
            intermediate_size=spec.width * 4,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=4,
            projection_dim=spec.width,
        )
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return model, processor


def save_tiny_sd(folder: str | Path, components: dict, vision: tuple | None = None) -> Path:
    """Save components in the diffusers folder layout that ``load_sd_components`` reads (plus ``clip/``)."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    if vision is not None:
        model, processor = vision
        model.save_pretrained(folder / "clip")
        processor.save_pretrained(folder / "clip")
    return folder
