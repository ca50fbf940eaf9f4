"""Copy detection: does the generator reproduce its real training images?

Every synthetic image of Real-Fake is made by img2img from one real image, so near-copies are the first
privacy risk to rule out. This module embeds synthetic and real images with a copy-detection descriptor
(:class:`Descriptor`: the SSCD TorchScript model when its file is supplied, else a timm or CLIP backbone
loaded from local files only), L2-normalises the descriptors, finds the top-k most similar real images of
every synthetic image with blocked matrix products (:func:`nearest_real`; memory is bounded by the block
size, never a loop over pairs) and writes the report (:func:`copy_report`): the similarity histogram,
the share of synthetic images above a copy threshold, a grid of the closest pairs side by side, the
neighbour table and a JSON summary. Cosine similarity of SSCD descriptors is calibrated for copies (threshold
0.5); timm and CLIP backbones are fallbacks, named as such in every summary, whose default threshold is read off
the real-to-real reference distribution of the same data (:func:`resolve_threshold`), never SSCD's.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from realfake.data.storage import Store
from realfake.privacy.plots import pair_grid, similarity_histogram

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FALLBACK_QUANTILE",
    "SSCD_THRESHOLD",
    "CopyReport",
    "Descriptor",
    "build_descriptor",
    "is_torchscript_file",
    "resolve_descriptor_kind",
    "resolve_threshold",
    "clip_descriptor",
    "copy_report",
    "embed_images",
    "l2_normalize",
    "nearest_real",
    "sscd_descriptor",
    "timm_descriptor",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# SSCD's copy threshold, as used for replication by "Diffusion Art or Digital Forgery?" (Somepalli et al., 2023).
SSCD_THRESHOLD = 0.5
# A fallback descriptor's default threshold: this quantile of the real -> nearest other real similarities.
FALLBACK_QUANTILE = 0.99
_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript", ".jit")

DescriptorKind = Literal["sscd", "timm", "clip"]
ResizeMode = Literal["square", "short_side", "center_crop"]
ImageLike = Image.Image | np.ndarray


# -- descriptors -----------------------------------------------------------------------------------------


@dataclass
class Descriptor:
    """A copy-detection descriptor: a network plus the preprocessing it expects.

    Attributes:
        name: What produced the descriptors (recorded in the report).
        model: Maps a normalised image batch ``[b, 3, h, w]`` to descriptors (or to an output ``extract``
            turns into descriptors).
        size: Resize target in pixels (see ``resize``).
        resize: ``square`` resizes to ``size x size``; ``short_side`` scales the short side to ``size`` and
            keeps the aspect ratio (SSCD's recommended "small edge 288"); ``center_crop`` does that and
            crops the centre square (CLIP's preprocessing).
        mean: Per-channel normalisation mean (images scaled to [0, 1] first).
        std: Per-channel normalisation std.
        device: Where the model runs.
        extract: Optional function from the model output to a ``[b, d]`` tensor.
        kind: ``sscd``, or the fallback it is (``timm``, ``clip``); decides the default threshold.
    """

    name: str
    model: Callable[[torch.Tensor], Any]
    size: int
    resize: ResizeMode = "square"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    extract: Callable[[Any], torch.Tensor] | None = None
    kind: DescriptorKind = "sscd"

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """Size ``(width, height)`` an image of this size is resized to before any crop."""
        if self.resize == "square":
            return self.size, self.size
        short, long = min(width, height), max(width, height)
        long_new = int(self.size * long / short)  # the rounding torchvision's Resize(int) uses
        return (self.size, long_new) if width <= height else (long_new, self.size)

    def preprocess(self, image: ImageLike) -> torch.Tensor:
        """One image (PIL, or uint8 array ``HxW`` / ``HxWxC``) -> normalised float tensor ``[3, h, w]``."""
        img = _to_pil(image)
        img = img.resize(self.target_size(*img.size), Image.BILINEAR)
        if self.resize == "center_crop":
            left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Descriptors ``[b, d]`` (float32, not yet normalised) of a preprocessed batch."""
        out = self.model(batch.to(self.device))
        out = self.extract(out) if self.extract is not None else out
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            raise TypeError(
                f"descriptor {self.name!r} must return a [batch, dim] tensor, got "
                f"{type(out).__name__} {getattr(out, 'shape', '')}; pass `extract` to select it"
            )
        return out.float().cpu()


def _to_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"array images must be uint8 (HxW or HxWxC), got dtype {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
        return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[2] == 1 else arr).convert("RGB")
    raise TypeError(f"array images must be HxW or HxWxC with C in (1, 3, 4), got shape {arr.shape}")


def _existing_file(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p} (give the path of a local file; nothing is downloaded)")
    return p


def sscd_descriptor(path: str | Path, size: int = 288, device: str | torch.device = "cpu") -> Descriptor:
    """The SSCD copy-detection model (e.g. ``sscd_disc_mixup.torchscript.pt``) from a local TorchScript file.

    SSCD's recommended preprocessing is used: short side resized to 288 px, aspect ratio kept, ImageNet
    normalisation; the model outputs one descriptor per image (ResNeXt-101: 1024-d, ResNet-50: 512-d).

    Args:
        path: TorchScript file of an SSCD model.
        size: Short-side length.
        device: Torch device to run on.
    """
    p = _existing_file(path, "SSCD TorchScript")
    dev = torch.device(device)
    try:
        model = torch.jit.load(str(p), map_location=dev)
    except RuntimeError as e:
        raise ValueError(f"{p} is not a TorchScript model file ({e}); export SSCD with torch.jit.save") from e
    model.eval()
    return Descriptor(name=f"sscd:{p.name}", model=model, size=size, resize="short_side", device=dev, kind="sscd")


def timm_descriptor(
    model_name: str = "resnet18",
    weights: str | Path | None = None,
    size: int | None = None,
    device: str | torch.device = "cpu",
) -> Descriptor:
    """A timm backbone's pooled features as descriptor (classifier head removed).

    Without ``weights`` the network has random weights: nothing is downloaded, which is only meaningful
    for tests and plumbing. Give a local weights file (``.safetensors`` / ``.pth``) for a real audit; the
    classifier head in it is dropped.

    Args:
        model_name: Any ``timm.create_model`` name.
        weights: Local weights file of that architecture, or None.
        size: Square input size; default the model's pretrained input size.
        device: Torch device to run on.
    """
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0}
    if weights is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(_existing_file(weights, "timm weights"))})
    else:
        log.warning("timm descriptor %s has random weights (no weights file given); use it for tests only", model_name)
    try:
        model = timm.create_model(model_name, **kwargs)
    except RuntimeError as e:
        raise ValueError(f"cannot load {weights} into timm model {model_name!r}: {e}") from e
    dev = torch.device(device)
    model.eval().to(dev)
    cfg = model.pretrained_cfg or {}
    input_size = size or int(cfg.get("input_size", (3, 224, 224))[-1])
    tag = Path(weights).name if weights is not None else "random-init"
    return Descriptor(
        name=f"timm:{model_name}:{tag}",
        model=model,
        size=input_size,
        resize="square",
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        device=dev,
        kind="timm",
    )


def clip_descriptor(folder: str | Path, device: str | torch.device = "cpu") -> Descriptor:
    """The projected image embedding of a CLIP vision model saved in a local folder (``save_pretrained``).

    A full ``CLIPModel`` folder (e.g. a copy of ``openai/clip-vit-large-patch14``) works as well as a
    vision-only one. CLIP preprocessing: short side to the model's image size, centre crop, CLIP mean/std.

    Args:
        folder: Local folder with ``config.json`` and the weights.
        device: Torch device to run on.
    """
    from transformers import CLIPVisionModelWithProjection

    p = Path(folder).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP model folder at {p} (expected config.json from save_pretrained)")
    dev = torch.device(device)
    model = CLIPVisionModelWithProjection.from_pretrained(str(p), local_files_only=True).eval().to(dev)
    mean, std = CLIP_MEAN, CLIP_STD
    proc = p / "preprocessor_config.json"
    if proc.is_file():
        cfg = json.loads(proc.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return Descriptor(
        name=f"clip:{p.name}",
        model=lambda x: model(pixel_values=x).image_embeds,
        size=int(model.config.image_size),
        resize="center_crop",
        mean=mean,
        std=std,
        device=dev,
        kind="clip",
    )


def is_torchscript_file(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``), told apart from a ``torch.save`` weights
    file by the ``code/`` and ``constants.pkl`` entries only TorchScript writes; the model is not loaded."""
    p = Path(path).expanduser()
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def resolve_descriptor_kind(descriptor: str, path: str | Path | None) -> DescriptorKind:
    """The descriptor a ``copy_detection.descriptor`` setting names; ``auto`` is SSCD whenever ``path`` is its
    TorchScript file (or a missing file named like one, so loading it says what is missing), else the fallback
    ``clip`` (``path`` then names a CLIP folder or hub id; None: the build's CLIP model)."""
    if descriptor in ("sscd", "timm", "clip"):
        return descriptor  # type: ignore[return-value]
    if descriptor != "auto":
        raise ValueError(f"copy_detection.descriptor = {descriptor!r} is unknown: use auto, sscd, timm or clip")
    if path is None:
        return "clip"
    p = Path(path).expanduser()
    if p.is_file():
        if is_torchscript_file(p):
            return "sscd"
        raise ValueError(
            f"copy_detection.descriptor_path = {str(path)!r} is not a TorchScript file: give the SSCD TorchScript "
            "file (sscd_disc_mixup.torchscript.pt), or set copy_detection.descriptor to timm or clip for a fallback"
        )
    if not p.exists() and p.suffix in _TORCHSCRIPT_SUFFIXES:
        return "sscd"
    return "clip"


def resolve_threshold(kind: str, threshold: float | None, reference: np.ndarray | None) -> tuple[float, str]:
    """The similarity threshold of a copy report and where it comes from.

    A given ``threshold`` is used as given. Otherwise SSCD's is :data:`SSCD_THRESHOLD`; a fallback descriptor's
    is the :data:`FALLBACK_QUANTILE` quantile of ``reference`` (each real image's similarity to its nearest other
    real image): SSCD's 0.5 means nothing on another descriptor's scale, and no copy calibration exists for these.

    Raises:
        ValueError: a fallback descriptor without ``threshold`` or ``reference``.
    """
    if threshold is not None:
        return float(threshold), "set by copy_detection.threshold"
    if kind == "sscd":
        return SSCD_THRESHOLD, "SSCD copy threshold (Somepalli et al. 2023)"
    if reference is None or not len(reference):
        raise ValueError(
            f"the fallback descriptor ({kind}) has no calibrated copy threshold and no real-to-real reference to "
            "read one from: set copy_detection.reference=true (needs 2+ real images) or copy_detection.threshold"
        )
    value = float(np.quantile(np.asarray(reference, dtype=np.float64), FALLBACK_QUANTILE))
    return value, (f"p{FALLBACK_QUANTILE * 100:g} of real -> nearest other real similarity on this data (no copy "
                   "calibration exists for a fallback descriptor)")


def build_descriptor(
    kind: Literal["auto", "sscd", "timm", "clip"],
    path: str | Path | None = None,
    model_name: str = "resnet18",
    device: str | torch.device = "cpu",
) -> Descriptor:
    """Factory by name: ``sscd`` (``path`` = TorchScript file), ``timm`` (``model_name``, ``path`` = optional
    weights file), ``clip`` (``path`` = model folder) or ``auto`` (:func:`resolve_descriptor_kind`)."""
    if kind == "auto":
        if path is None:
            raise ValueError("descriptor kind 'auto' needs a path here: the SSCD TorchScript file or a CLIP folder")
        kind = resolve_descriptor_kind(kind, path)
    if kind == "sscd":
        if path is None:
            raise ValueError("descriptor kind 'sscd' needs the path of the SSCD TorchScript file")
        return sscd_descriptor(path, device=device)
    if kind == "timm":
        return timm_descriptor(model_name, weights=path, device=device)
    if kind == "clip":
        if path is None:
            raise ValueError("descriptor kind 'clip' needs the path of a local CLIP model folder")
        return clip_descriptor(path, device=device)
    raise ValueError(f"unknown descriptor kind {kind!r}; use 'auto', 'sscd', 'timm' or 'clip'")


# -- embedding and search --------------------------------------------------------------------------------


def l2_normalize(x: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Unit-norm rows (float32), optionally after subtracting ``center`` (e.g. the mean real descriptor).

    Centring matters for backbones whose features are all non-negative (ReLU + average pooling): without
    it every pair of images has a cosine similarity near 1 and the scale says little about copying.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"descriptors must be a 2-D array [n, dim], got shape {a.shape}")
    if center is not None:
        a = a - np.asarray(center, dtype=np.float32)[None, :]
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} descriptor(s) are all zero and cannot be normalised")
    return a / norms


def embed_images(
    images: Iterable[ImageLike],
    descriptor: Descriptor,
    batch_size: int = 64,
    normalize: bool = True,
) -> np.ndarray:
    """Descriptors of images, in input order, computed in batches.

    Images are streamed: at most one pending batch per distinct preprocessed size is held in memory
    (``short_side`` resizing keeps aspect ratios, so differently shaped images are batched separately).

    Args:
        images: PIL images or uint8 arrays, any iterable (a lazy reader works).
        descriptor: The descriptor network and its preprocessing.
        batch_size: Images per forward pass.
        normalize: L2-normalise the descriptors (False returns the raw outputs, e.g. to centre them first).

    Returns:
        float32 ``[n, dim]``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    done: list[tuple[np.ndarray, np.ndarray]] = []

    def flush(key: tuple[int, ...]) -> None:
        items = pending.pop(key)
        idx = np.array([i for i, _ in items])
        done.append((idx, descriptor(torch.stack([t for _, t in items])).numpy()))

    n = 0
    for n, image in enumerate(images, start=1):
        x = descriptor.preprocess(image)
        key = tuple(x.shape)
        pending.setdefault(key, []).append((n - 1, x))
        if len(pending[key]) >= batch_size:
            flush(key)
    for key in list(pending):
        flush(key)
    if n == 0:
        raise ValueError("embed_images got no images")
    dim = done[0][1].shape[1]
    out = np.empty((n, dim), dtype=np.float32)
    for idx, vecs in done:
        out[idx] = vecs
    return l2_normalize(out) if normalize else out


def nearest_real(
    syn: np.ndarray | torch.Tensor,
    real: np.ndarray | torch.Tensor,
    k: int = 5,
    block: int = 4096,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k most similar real descriptors of every synthetic descriptor, by inner product.

    Works in tiles of ``block`` synthetic x ``block`` real rows: each tile is one matrix product, its top-k
    is merged into the running top-k of those synthetic rows. Memory is ``O(block^2)`` whatever the set
    sizes, so millions of images fit on one GPU; descriptors should be L2-normalised (then the inner
    product is the cosine similarity).

    Args:
        syn: Synthetic descriptors ``[m, d]``.
        real: Real descriptors ``[n, d]``.
        k: Neighbours to keep; capped at ``n``.
        block: Tile side, in rows.
        device: Torch device for the products.

    Returns:
        ``(sims, idx)``: float32 and int64 arrays ``[m, min(k, n)]``, most similar first; ``idx`` indexes
        ``real``.
    """
    s = torch.as_tensor(np.asarray(syn, dtype=np.float32) if not isinstance(syn, torch.Tensor) else syn)
    r = torch.as_tensor(np.asarray(real, dtype=np.float32) if not isinstance(real, torch.Tensor) else real)
    if s.ndim != 2 or r.ndim != 2 or s.shape[1] != r.shape[1]:
        raise ValueError(
            f"descriptors must be [m, d] and [n, d] with the same d, got {tuple(s.shape)}, {tuple(r.shape)}"
        )
    if k < 1 or block < 1:
        raise ValueError(f"k and block must be >= 1, got k={k}, block={block}")
    if r.shape[0] == 0:
        raise ValueError("nearest_real needs at least one real descriptor")
    dev = torch.device(device)
    k = min(k, r.shape[0])
    m = s.shape[0]
    sims = torch.empty((m, k), dtype=torch.float32)
    idx = torch.empty((m, k), dtype=torch.int64)
    with torch.inference_mode():
        real_blocks = [r[j : j + block].to(dev, torch.float32) for j in range(0, r.shape[0], block)]
        for i in range(0, m, block):
            q = s[i : i + block].to(dev, torch.float32)
            best_s = torch.full((q.shape[0], k), -math.inf, device=dev)
            best_i = torch.zeros((q.shape[0], k), dtype=torch.int64, device=dev)
            offset = 0
            for rb in real_blocks:
                tile = q @ rb.T
                kk = min(k, rb.shape[0])
                ts, ti = torch.topk(tile, kk, dim=1)
                cand_s = torch.cat([best_s, ts], dim=1)
                cand_i = torch.cat([best_i, ti + offset], dim=1)
                best_s, pos = torch.topk(cand_s, k, dim=1)
                best_i = torch.gather(cand_i, 1, pos)
                offset += rb.shape[0]
            sims[i : i + q.shape[0]] = best_s.cpu()
            idx[i : i + q.shape[0]] = best_i.cpu()
    return sims.numpy(), idx.numpy()


# -- report ----------------------------------------------------------------------------------------------


@dataclass
class CopyReport:
    """Summary of a copy-detection run (also written as ``copy_detection.json``)."""

    descriptor: str
    descriptor_kind: str  # sscd, or the fallback (timm, clip) it is
    fallback: bool  # not SSCD: similarities are not calibrated for copies
    note: str  # one line naming the descriptor and the meaning of the threshold, for every summary shown
    n_synthetic: int
    n_real: int
    k: int
    threshold: float
    threshold_source: str
    share_above_threshold: float
    n_above_threshold: int
    top1_quantiles: dict[str, float]
    reference_quantiles: dict[str, float] | None
    closest_pairs: list[dict[str, Any]]
    files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantiles(x: np.ndarray) -> dict[str, float]:
    qs = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999, "max": 1.0}
    return {name: float(np.quantile(x, q)) for name, q in qs.items()} | {"mean": float(x.mean())}


def _get(images: Sequence[ImageLike] | Callable[[int], ImageLike], i: int) -> Image.Image:
    return _to_pil(images(i) if callable(images) else images[i])


def copy_report(
    syn_emb: np.ndarray,
    real_emb: np.ndarray,
    out: Store | str | Path,
    threshold: float | None = None,
    k: int = 5,
    syn_ids: Sequence[str] | None = None,
    real_ids: Sequence[str] | None = None,
    syn_images: Sequence[ImageLike] | Callable[[int], ImageLike] | None = None,
    real_images: Sequence[ImageLike] | Callable[[int], ImageLike] | None = None,
    n_pairs: int = 16,
    reference: bool = False,
    descriptor_name: str = "unknown",
    block: int = 4096,
    device: str | torch.device = "cpu",
    descriptor_kind: str | None = None,
) -> CopyReport:
    """Search the nearest real images of every synthetic one and write the copy-detection report.

    Writes to ``out`` (a :class:`Store`, e.g. the run folder, or a local folder): ``copy_detection.json``
    (the summary), ``copy_neighbours.parquet`` (``syn_id, rank, real_id, similarity`` for the top-k),
    ``copy_similarity_hist.png`` and, when images are given, ``copy_closest_pairs.png``.

    Args:
        syn_emb: L2-normalised synthetic descriptors ``[m, d]`` (:func:`embed_images`).
        real_emb: L2-normalised real descriptors ``[n, d]``.
        out: Destination store or folder.
        threshold: Cosine similarity at or above which a synthetic image is flagged; None: the descriptor's
            default (:func:`resolve_threshold`: SSCD's 0.5, the copy threshold of "Diffusion Art or Digital
            Forgery?", Somepalli et al. 2023; for a fallback descriptor a quantile of ``reference``).
        k: Nearest real images kept per synthetic image.
        syn_ids: Names of the synthetic images (default: their positions).
        real_ids: Names of the real images (default: their positions).
        syn_images: The synthetic images (sequence or index -> image), for the pair grid.
        real_images: The real images, for the pair grid.
        n_pairs: Closest pairs listed in the summary and shown in the grid.
        reference: Also compute each real image's similarity to its nearest other real image (costs a
            second search of the same size) and draw it as the baseline distribution.
        descriptor_name: Recorded in the summary (``Descriptor.name``).
        block: Tile size of the search (:func:`nearest_real`).
        device: Torch device of the search.
        descriptor_kind: ``sscd``, ``timm`` or ``clip`` (``Descriptor.kind``); None reads it from the name's
            prefix (``sscd:...``), and a name without a known prefix counts as a fallback.

    Returns:
        The :class:`CopyReport` that was written.
    """
    store = out if isinstance(out, Store) else Store(str(Path(out).expanduser().resolve()))
    syn_emb, real_emb = np.asarray(syn_emb, dtype=np.float32), np.asarray(real_emb, dtype=np.float32)
    m, n = len(syn_emb), len(real_emb)
    if m == 0 or n == 0:
        raise ValueError(f"copy_report needs synthetic and real descriptors, got {m} and {n}")
    syn_ids = [str(i) for i in range(m)] if syn_ids is None else [str(s) for s in syn_ids]
    real_ids = [str(j) for j in range(n)] if real_ids is None else [str(r) for r in real_ids]
    if len(syn_ids) != m or len(real_ids) != n:
        raise ValueError(f"syn_ids ({len(syn_ids)}) / real_ids ({len(real_ids)}) must match the descriptors ({m}, {n})")
    for name, emb in (("syn_emb", syn_emb), ("real_emb", real_emb)):
        if emb.size and not np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3):
            raise ValueError(f"{name} rows must be L2-normalised (use embed_images or l2_normalize)")
    if (syn_images is None) != (real_images is None):
        raise ValueError("give both syn_images and real_images for the pair grid, or neither")

    sims, idx = nearest_real(syn_emb, real_emb, k=k, block=block, device=device)
    top1 = sims[:, 0]
    ref = None
    if reference:
        if n < 2:
            raise ValueError("reference=True needs at least two real images")
        rs, ri = nearest_real(real_emb, real_emb, k=2, block=block, device=device)
        # Drop each image's match with itself; with exact duplicates in the real set either column may be it.
        self_first = ri[:, 0] == np.arange(n)
        ref = np.where(self_first, rs[:, 1], rs[:, 0])

    kind = descriptor_kind or descriptor_name.split(":", 1)[0]
    kind = kind if kind in ("sscd", "timm", "clip") else "unknown"
    threshold, threshold_source = resolve_threshold(kind, threshold, ref)
    fallback = kind != "sscd"
    if fallback:
        note = (f"fallback descriptor {descriptor_name}, not SSCD: its similarities are not calibrated for copies; "
                f"threshold {threshold:.3f} ({threshold_source})")
    else:
        note = f"SSCD descriptor {descriptor_name}: threshold {threshold:g} ({threshold_source})"

    kk = sims.shape[1]
    store.write_table(
        pa.table(
            {
                "syn_id": np.repeat(np.array(syn_ids, dtype=object), kk),
                "rank": np.tile(np.arange(kk, dtype=np.int32), m),
                "real_id": np.array(real_ids, dtype=object)[idx.ravel()],
                "similarity": sims.ravel(),
            }
        ),
        "copy_neighbours.parquet",
    )
    files = {"neighbours": store.uri("copy_neighbours.parquet")}
    title = f"Nearest real image per synthetic image\n{descriptor_name}" + (" (fallback, not SSCD)" if fallback else "")
    store.write_bytes(similarity_histogram(top1, threshold, reference=ref, title=title), "copy_similarity_hist.png")
    files["histogram"] = store.uri("copy_similarity_hist.png")

    order = np.argsort(-top1, kind="stable")[:n_pairs]
    pairs = [
        {
            "syn_id": syn_ids[i],
            "real_id": real_ids[int(idx[i, 0])],
            "similarity": float(top1[i]),
            "syn_index": int(i),
            "real_index": int(idx[i, 0]),
        }
        for i in order
    ]
    if syn_images is not None and pairs:
        # Caption: similarity, then "synthetic id ~ real id", cut to what fits under two tiles.
        grid = [
            (
                _get(syn_images, p["syn_index"]),
                _get(real_images, p["real_index"]),
                f"{p['similarity']:.3f}  {p['syn_id']} ~ {p['real_id']}"[:42],
            )
            for p in pairs
        ]
        flagged = [p["similarity"] >= threshold for p in pairs]
        store.write_bytes(pair_grid(grid, flagged=flagged), "copy_closest_pairs.png")
        files["closest_pairs"] = store.uri("copy_closest_pairs.png")

    n_above = int((top1 >= threshold).sum())
    report = CopyReport(
        descriptor=descriptor_name,
        descriptor_kind=kind,
        fallback=fallback,
        note=note,
        n_synthetic=m,
        n_real=n,
        k=kk,
        threshold=float(threshold),
        threshold_source=threshold_source,
        share_above_threshold=n_above / m,
        n_above_threshold=n_above,
        top1_quantiles=_quantiles(top1),
        reference_quantiles=_quantiles(ref) if ref is not None else None,
        closest_pairs=pairs,
        files=files | {"summary": store.uri("copy_detection.json")},
    )
    store.write_json(report.to_dict(), "copy_detection.json")
    log.info(
        "copy detection: %d/%d synthetic images at or above %.3f (max %.3f); %s",
        n_above,
        m,
        threshold,
        report.top1_quantiles["max"],
        note,
    )
    return report
