"""Untrusted image bytes to a normalised RGB image, or a reject with its reason: the one decoder.

Used by ingest (every source file once), and wherever a stored real image is read again (training loaders,
captioning, guidance, OOD sets, the plan). A declared size above :data:`MAX_PIXELS` is refused from the header
before any pixel is decoded (decompression bombs), and any decoder failure becomes :class:`RejectedImage`
instead of an exception of the decoder's own. What can be used is normalised to 8-bit sRGB RGB (EXIF
orientation applied; alpha composited on white; 16-bit and float scaled; CMYK and embedded colour profiles
converted; the first frame of an animation). A reject's reason is ``"<category>: <detail>"`` with its category
from :data:`REJECT_CATEGORIES`.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

__all__ = [
    "ALPHA_BACKGROUND",
    "MAX_PIXELS",
    "MIN_SIDE",
    "REJECT_CATEGORIES",
    "DecodedImage",
    "RejectedImage",
    "decode",
    "decode_image",
    "reject_category",
    "stable_text",
]

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # declared width x height above this is a decompression bomb: refused before decoding
MIN_SIDE = 8  # images with a side below this carry no usable content at any generation resolution
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white: cut-out objects are shot on white
REJECT_CATEGORIES = (
    "empty file",
    "not an image",
    "truncated",
    "unreadable",
    "decompression bomb",
    "too small",
    "duplicate",
    "label conflict",
    "empty class",
    "skipped",
    "unsafe",
)
_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>|\bat 0x[0-9a-fA-F]+|0x[0-9a-fA-F]{8,}")
_TRUNCATED = ("truncated", "broken data stream", "end of file", "unexpected end", "premature end", "eof")


class RejectedImage(ValueError):
    """Bytes that do not make a usable image; ``str()`` is the reject reason ``"<category>: <detail>"``."""

    def __init__(self, category: str, detail: str) -> None:
        assert category in REJECT_CATEGORIES, category
        self.category = category
        self.detail = stable_text(detail)
        super().__init__(f"{category}: {self.detail}")


@dataclass
class DecodedImage:
    """A decoded, normalised RGB image and what normalisation did to it (e.g. ``"alpha composited on white"``)."""

    image: Image.Image
    format: str | None
    notes: tuple[str, ...] = ()


def stable_text(text: str, limit: int = 200) -> str:
    """An error text fit for a table that is grouped and diffed: no memory addresses, one line, bounded."""
    text = _ADDRESS.sub("", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reject_category(reason: str) -> str:
    """The category of a reject reason (the part before the first ``:``), for per-category counts."""
    return reason.partition(":")[0].strip()


def _check_declared_size(img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise RejectedImage("decompression bomb", f"declares {w}x{h} pixels (limit {MAX_PIXELS:,})")
    if min(w, h) < MIN_SIDE:
        raise RejectedImage("too small", f"{w}x{h} pixels (a side must be at least {MIN_SIDE})")


def _to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (I;16*, I, F) scaled to L; PIL's own convert would clip at 255 instead."""
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = 1.0 if a.max(initial=0.0) <= 1.0 and a.min(initial=0.0) >= 0.0 else 255.0
        scaled = a / peak * 255.0
    else:
        a = a.astype(np.int64)
        peak = 255 if a.max(initial=0) <= 255 else 65535
        scaled = a * 255.0 / peak
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _normalise(img: Image.Image) -> tuple[Image.Image, list[str]]:
    notes: list[str] = []
    if getattr(img, "is_animated", False):
        notes.append("animated: first frame used")
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
            notes.append("exif orientation applied")
    except Exception as e:  # noqa: BLE001 - a broken EXIF block is metadata noise; the pixels are fine
        notes.append("exif unreadable: orientation ignored")
        log.debug("ignoring unreadable EXIF: %s", e)
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            img = ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            notes.append("colour profile converted to sRGB")
        except Exception:  # noqa: BLE001 - a broken profile: fall back to the plain conversion below
            notes.append("colour profile unreadable: ignored")
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _to_8bit(img)
        notes.append("high bit depth scaled to 8-bit")
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif mode in ("P", "PA") and ("transparency" in img.info or mode == "PA"):
        img = img.convert("RGBA")
    elif mode in ("1", "L", "P"):
        notes.append("grayscale or palette converted to RGB" if mode != "P" else "palette converted to RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
            img = Image.alpha_composite(background, rgba)
            notes.append("alpha composited on white")
        else:
            img = rgba
    return img.convert("RGB"), notes


def decode(data: bytes) -> DecodedImage:
    """Decode untrusted bytes into a normalised RGB image.

    The declared size is checked from the header before any pixel is decoded; every failure of the decoders
    is contained and turned into :class:`RejectedImage`.

    Raises:
        RejectedImage: the bytes are not a usable image; the message is the reject reason.
    """
    if not data:
        raise RejectedImage("empty file", "0 bytes")
    with warnings.catch_warnings():
        # Pillow warns about corrupt tags and about large images: the first are noise for a reject table, and
        # our own limit (MAX_PIXELS) is below Pillow's warning threshold, so both are silenced here
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))  # parses the header only
            _check_declared_size(img)
            img.load()
            fmt = img.format
            img, notes = _normalise(img)
        except RejectedImage:
            raise
        except Image.DecompressionBombError as e:
            # Pillow's own header check fired first (it runs inside open()); report it like ours
            n = re.search(r"\((\d+) pixels\)", str(e))
            declared = f"{int(n.group(1)):,} pixels" if n else "a size above Pillow's limit"
            raise RejectedImage("decompression bomb", f"declares {declared} (limit {MAX_PIXELS:,})") from None
        except UnidentifiedImageError:
            raise RejectedImage("not an image", "format not recognised") from None
        except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types (OSError, SyntaxError, struct...)
            text = f"{type(e).__name__}: {e}"
            category = "truncated" if any(t in text.lower() for t in _TRUNCATED) else "unreadable"
            raise RejectedImage(category, text) from None
    _check_declared_size(img)  # EXIF rotation swaps sides; a decoder may also report a different size
    return DecodedImage(img, fmt, tuple(notes))


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes to a normalised RGB image, or raise :class:`RejectedImage` (a ``ValueError``) with the reason."""
    return decode(data).image
