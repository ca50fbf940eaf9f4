"""Conditioning: the prompt template and the visual-guidance slot.

Real-Fake conditions every fine-tuning step and every generation on text *and* one real image: the CLIP
image embedding of that image overwrites the last of the text encoder's 77 hidden states (slot 76). The
width of that embedding equals the cross-attention width (768 for CLIP ViT-L/14 and SD v1.5), so the UNet
sees it as one more token to attend to. Fine-tuning prompts are the filled template (:func:`build_prompt`);
generation prompts add ``synthesis.prompt_suffix`` (:func:`generation_prompt`), as the authors' scripts do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from realfake.config import SynthesisConfig

__all__ = ["build_prompt", "encode_prompts", "generation_prompt", "inject_guidance"]


def build_prompt(template: str, class_name: str, caption: str | None = None, suffix: str = "") -> str:
    """Fill the template; an empty caption drops the ``, {caption}`` part rather than leaving ", ".

    ``suffix`` is appended verbatim (e.g. ``", best quality"``).
    """
    caption = (caption or "").strip()
    if not caption:
        template = template.replace(", {caption}", "").replace(" {caption}", "").replace("{caption}", "")
    return template.format(class_name=class_name, caption=caption).strip() + suffix


def generation_prompt(synthesis: SynthesisConfig, class_name: str, caption: str | None = None) -> str:
    """The prompt one synthetic image is generated with: the template filled, then ``prompt_suffix``.

    The authors' ``generate.py`` appends ``, best quality`` at generation only (lines 283, 285); their fine-tuning
    captions (``train_text_to_image_lora.py`` metadata) are the template alone, which :func:`build_prompt` gives.
    """
    return build_prompt(synthesis.prompt_template, class_name, caption, suffix=synthesis.prompt_suffix)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: torch.device | str) -> torch.Tensor:
    """Text-encoder hidden states ``[B, 77, width]`` exactly as Stable Diffusion computes them."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def inject_guidance(hidden: torch.Tensor, guidance: torch.Tensor | None, slot: int = -1) -> torch.Tensor:
    """Return a copy of ``hidden`` whose token ``slot`` is the guidance vector of each sample.

    Args:
        hidden: text hidden states ``[B, T, D]``.
        guidance: image embeddings ``[B, D]`` (or None to return ``hidden`` unchanged).
        slot: token index to overwrite; -1 is the last (76 for SD's 77-token context).
    """
    if guidance is None:
        return hidden
    if guidance.shape != (hidden.shape[0], hidden.shape[2]):
        raise ValueError(
            f"guidance embeddings have shape {tuple(guidance.shape)} but the text states are {tuple(hidden.shape)}: "
            f"the guidance model's projection width must equal the text width ({hidden.shape[2]})"
        )
    out = hidden.clone()
    out[:, slot] = guidance.to(device=hidden.device, dtype=hidden.dtype)
    return out
