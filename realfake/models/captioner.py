"""The BLIP-2 captioner: loading by hub id or local folder, batched caption decoding, a tiny offline twin.

Production captions the ImageNet-family datasets with ``Salesforce/blip2-opt-2.7b``. Since transformers 4.47
the BLIP-2 processor expands ``<image>`` placeholder tokens (one per Q-Former query) in front of any text
prompt, and the model scatters the projected query outputs into exactly those positions; a checkpoint whose
processor lacks ``num_query_tokens`` or whose tokenizer's ``<image>`` id disagrees with the model's
``image_token_index`` would silently caption from no image at all, so :func:`load_captioner` repairs the
first and rejects the second. :func:`build_tiny_blip2` writes a BLIP-2 of the same classes (ViT vision
tower, Q-Former, OPT decoder, GPT-2 byte-level BPE tokenizer) small enough for CPU tests, built offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from realfake.models.loading import ModelLoadError, resolve_model

__all__ = ["build_opt_tokenizer", "build_tiny_blip2", "caption_images", "load_captioner"]

# OPT's special tokens, at OPT's ids: <s>=0, <pad>=1, </s>=2 (also BOS, as in OPT), <unk>=3.
_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
_WORDS = (
    "a photo of an image picture the digit number handwritten white black on background with and in small large "
    "close up view zero one two three four five six seven eight nine dog cat bird car"
).split()


def _byte_symbols() -> list[str]:
    # GPT-2 byte-level BPE maps each byte to a printable character; printable bytes map to themselves.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _merge(a: str, b: str, vocab: list[str], seen: set[str], merges: list[str]) -> str:
    rule = f"{a} {b}"
    if rule not in merges:
        merges.append(rule)
    if a + b not in seen:
        vocab.append(a + b)
        seen.add(a + b)
    return a + b


def build_opt_tokenizer(words: Sequence[str] = tuple(_WORDS)):
    """A small OPT-style byte-level BPE tokenizer: every byte plus whole-word merges for ``words``.

    The result is a genuine ``GPT2Tokenizer`` (the class OPT and BLIP-2-OPT checkpoints use) with OPT's
    special tokens at OPT's ids, so any text still tokenizes, byte by byte where no merge applies.
    """
    from transformers import GPT2Tokenizer

    vocab: list[str] = list(_SPECIALS) + _byte_symbols()
    seen = set(vocab)
    merges: list[str] = []
    space = _byte_symbols()[ord(" ")]
    for word in dict.fromkeys(w.lower() for w in words):
        # merge the word letter by letter, then its space-prefixed form (the pre-tokenizer keeps a word's
        # leading space), in that order of priority, so both "photo" and " photo" become one token each
        symbols = list(word)
        while len(symbols) > 1:
            symbols = [_merge(symbols[0], symbols[1], vocab, seen, merges)] + symbols[2:]
        _merge(space, word, vocab, seen, merges)
    return GPT2Tokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split(" ")) for m in merges],
                         bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def build_tiny_blip2(folder: str | Path, image_size: int = 32, num_query_tokens: int = 4, seed: int = 0) -> Path:
    """Save a random-weight BLIP-2 (ViT + Q-Former + OPT) and its processor in the hub layout.

    The folder loads with :func:`load_captioner` exactly as ``Salesforce/blip2-opt-2.7b`` does; only the
    sizes differ.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    folder = Path(folder)
    tokenizer = build_opt_tokenizer()
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    # the processor adds the <image> token to the tokenizer; the model's embedding table must cover it
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": image_size, "patch_size": 8},
        qformer_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "cross_attention_frequency": 1, "vocab_size": 128,
                        "max_position_embeddings": 64},
        text_config={"model_type": "opt", "vocab_size": len(processor.tokenizer), "hidden_size": 32,
                     "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "word_embed_proj_dim": 32,
                     "max_position_embeddings": 128, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1},
        num_query_tokens=num_query_tokens,
        image_token_index=image_token,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def load_captioner(model_id: str, revision: str | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32):
    """Load a BLIP-2 captioner and its processor from a hub id or a local folder.

    Returns:
        ``(Blip2ForConditionalGeneration, Blip2Processor)``, the model in eval mode on ``device``.

    Raises:
        ModelLoadError: the id cannot be loaded, or its processor and model disagree on the image token.
    """
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    path = resolve_model(model_id)
    kw = {"revision": revision} if revision else {}
    try:
        processor = Blip2Processor.from_pretrained(path, **kw)
        model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype, **kw)
    except Exception as e:  # any loader error becomes one clear message naming the id
        where = (
            "the folder exists but is not a complete BLIP-2 save (check its config.json, processor and "
            "tokenizer files)"
            if Path(path).exists()
            else "not a local folder; as a hub id it needs network access or HF_HOME with the model cached "
            "(set HF_HUB_OFFLINE=1 to use only the cache)"
        )
        raise ModelLoadError(
            f"cannot load BLIP-2 captioner from {model_id!r} (models.captioner): {where}. "
            f"Cause: {type(e).__name__}: {e}"
        ) from e
    cfg = model.config
    if not cfg.use_decoder_only_language_model:
        kind = cfg.text_config.model_type
        raise ModelLoadError(f"captioner {model_id!r} has an encoder-decoder language model ({kind}); realfake "
                             "supports BLIP-2 with a decoder-only (OPT) language model")
    if processor.num_query_tokens is None:
        # saves older than the image-token processor: without this, a text prompt would get no image tokens
        processor.num_query_tokens = cfg.num_query_tokens
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)
    if cfg.image_token_index is None or image_token != cfg.image_token_index:
        raise ModelLoadError(
            f"captioner {model_id!r}: the tokenizer's {processor.image_token.content!r} id is {image_token} but the "
            f"model's image_token_index is {cfg.image_token_index}; re-save the checkpoint with a current "
            "transformers so processor and model agree"
        )
    model.to(device=torch.device(device)).eval().requires_grad_(False)
    return model, processor


@torch.no_grad()
def caption_images(model, processor, images: Sequence[Image.Image], prompt: str | None = None,
                   max_new_tokens: int = 30, num_beams: int = 1) -> list[str]:
    """Greedy (or beam) captions of a batch of RGB images, with the prompt (if any) removed.

    Args:
        model: a ``Blip2ForConditionalGeneration`` from :func:`load_captioner`.
        processor: its ``Blip2Processor``.
        images: the images; the processor resizes them.
        prompt: optional text BLIP-2 continues (e.g. ``"a photo of"``); one prompt for the whole batch, so
            no padding is needed.
        max_new_tokens: longest caption in tokens.
        num_beams: beam width (1 is greedy decoding).
    """
    if not images:
        return []
    text = [prompt] * len(images) if prompt else None
    inputs = processor(images=list(images), text=text, return_tensors="pt")
    device = model.device
    pixel_values = inputs["pixel_values"].to(device=device, dtype=model.dtype)
    kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False}
    if text is not None:
        input_ids = inputs["input_ids"].to(device)
        out = model.generate(pixel_values=pixel_values, input_ids=input_ids,
                             attention_mask=inputs["attention_mask"].to(device), **kwargs)
    else:
        # BLIP-2 builds the start sequence itself: one image token per query, then BOS
        cfg = model.config
        start = [cfg.image_token_index] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]
        input_ids = torch.tensor([start], device=device).repeat(len(images), 1)
        out = model.generate(pixel_values=pixel_values, input_ids=input_ids, **kwargs)
    # decoder-only generation returns the start sequence followed by the new tokens: keep the new ones
    if out.shape[1] >= input_ids.shape[1] and torch.equal(out[:, : input_ids.shape[1]], input_ids):
        out = out[:, input_ids.shape[1] :]
    texts = processor.tokenizer.batch_decode(out, skip_special_tokens=True)
    # one line of printable text: captions are spliced into prompts
    return [" ".join("".join(ch for ch in t if ch.isprintable() or ch.isspace()).split()) for t in texts]
