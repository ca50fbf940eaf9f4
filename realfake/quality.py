"""Quality: what every synthetic image and class is worth, and the gates that regenerate the images that fail.

A *judge* (CLIP zero-shot against the class prompts in production, or a classifier trained once on the real train
split where CLIP cannot serve) gives each image the probability of its intended class and a feature vector; a
copy-detection descriptor (:mod:`realfake.privacy.copydetect`) gives its similarity to its own real source and to
its nearest synthetic neighbour. :func:`measure_quality` turns these into per-image scores
(``quality/scores.parquet``, keyed like the index) and the card's per-class table: count, label agreement, KID
(unbiased, with its standard error) and FID on the judge's features against the real class, within-class
diversity against the real class's, near-duplicates, classes far from their real counterpart first.
:class:`QualityGate` scores images as they are generated and makes the failing ones again with the next attempt's
seed before their shard commits; every decision depends on the image alone (never on which other images a worker
made first), so a gated build is as reproducible and as independent of the worker count as an ungated one.
Everything runs offline, from the configured models; no weights are fetched at run time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from realfake.config import BuildConfig, QualityConfig
from realfake.data.storage import Store

__all__ = [
    "JUDGES_DIR",
    "QUALITY_DIR",
    "Judge",
    "QualityGate",
    "diversity",
    "format_quality_table",
    "gate_recipe",
    "kid",
    "load_judge",
    "may_drop",
    "measure_quality",
    "parse_quality_table",
    "quality_descriptor",
]

log = logging.getLogger(__name__)

QUALITY_DIR = "quality"  # under the version: scores.parquet, worst.png
JUDGES_DIR = "judges"  # under {root}/{dataset}: classifier judges by content key, shared by the dataset's versions
_SCORES = (QUALITY_DIR, "scores.parquet")
_WORST = (QUALITY_DIR, "worst.png")


# --------------------------------------------------------------------------------------------------------
# Measures on features
# --------------------------------------------------------------------------------------------------------
def kid(x: np.ndarray, y: np.ndarray, subsets: int = 10) -> tuple[float, float | None]:
    """Kernel Inception Distance on given features: ``(estimate, standard error)``.

    Both sets are cut into ``B`` disjoint contiguous blocks (``B = min(subsets, len(x) // 2, len(y) // 2)``, so every
    block holds at least 2 images of each set); each block pair gives the unbiased MMD^2 under KID's cubic kernel
    ``(a.b / d + 1)^3`` (Binkowski et al. 2018, as :func:`realfake.measure.feature_mmd` with ``kernel="poly"``). The
    estimate is their mean and its standard error ``std(ddof=1) / sqrt(B)`` (None for one block). Blocks are runs
    in the given order: the callers pass index order (sorted by source id, unrelated to content).

    Raises:
        ValueError: fewer than 2 rows in a set, or feature widths that differ.
    """
    from realfake.measure import feature_mmd

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    b = max(1, min(subsets, len(x) // 2, len(y) // 2))
    values = [feature_mmd(xb, yb, kernel="poly") for xb, yb in zip(np.array_split(x, b), np.array_split(y, b),
                                                                    strict=True)]
    if b == 1:
        return float(values[0]), None
    return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(b))


def diversity(x: np.ndarray) -> float:
    """Mean cosine distance between distinct rows: ``1 - mean_{i != j} cos(x_i, x_j)`` (0: all alike).

    Computed in O(n d) from the norm of the sum of unit rows (``|sum u|^2 = n + sum_{i != j} u_i.u_j``)."""
    u = np.asarray(x, dtype=np.float64)
    if len(u) < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {len(u)}")
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    s = u.sum(0)
    n = len(u)
    return float(1.0 - (s @ s - n) / (n * (n - 1)))


def _nearest_other(desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unit rows, the similarity and index of each row's most similar *other* row (blocked top-2)."""
    from realfake.privacy.copydetect import nearest_real

    if len(desc) < 2:
        return np.full(len(desc), np.nan, np.float32), np.full(len(desc), -1, np.int64)
    sims, idx = nearest_real(desc, desc, k=2)
    self_first = idx[:, 0] == np.arange(len(desc))
    return np.where(self_first, sims[:, 1], sims[:, 0]), np.where(self_first, idx[:, 1], idx[:, 0])


# --------------------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------------------
@dataclass
class Judge:
    """Who says what class an image shows.

    Attributes:
        name: What the judge is, as the card names it.
        kind: ``clip`` or ``classifier``.
        run: A batch of PIL images -> (class probabilities ``[n, classes]``, features ``[n, d]``).
        batch_size: Images per call of ``run``.
    """

    name: str
    kind: str
    run: Callable[[list[Image.Image]], tuple[np.ndarray, np.ndarray]]
    batch_size: int = 64

    def score(self, images: Iterable[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and features of every image, in order, in batches."""
        probs, feats, batch = [], [], []
        for img in images:
            batch.append(img.convert("RGB"))
            if len(batch) == self.batch_size:
                p, f = self.run(batch)
                probs.append(p)
                feats.append(f)
                batch = []
        if batch:
            p, f = self.run(batch)
            probs.append(p)
            feats.append(f)
        if not probs:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(probs), np.concatenate(feats)


def _class_names(store: Store) -> list[str]:
    from realfake.recipe import manifest_class_map

    names = manifest_class_map(store)
    return [names[k] for k in sorted(names, key=int)]


def _config_json(folder: Path) -> dict[str, Any] | None:
    f = folder / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _local_model_folder(model_id: str) -> Path | None:
    """A local folder for a model id: the folder itself, the demo base's ``clip/``, or the hub cache's snapshot."""
    from realfake.models.loading import resolve_model

    p = Path(resolve_model(model_id))
    if (p / "clip" / "config.json").is_file():
        return p / "clip"
    if (p / "config.json").is_file():
        return p
    if p.exists() or "/" not in model_id:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not in the cache: nothing fetched at run time
        return None


def judge_kind(cfg: BuildConfig) -> str:
    """``clip`` or ``classifier``: what ``quality.judge`` resolves to for this config (auto: CLIP when the checkpoint
    has a text tower to read the class prompts with)."""
    q = cfg.quality
    if q.judge != "auto":
        return q.judge
    folder = _local_model_folder(q.judge_model or cfg.models.clip)
    conf = _config_json(folder) if folder is not None else None
    return "clip" if conf is not None and conf.get("model_type") == "clip" else "classifier"


def _projected(out: Any) -> torch.Tensor:
    """CLIP's projected features: transformers 5 returns them as the ``pooler_output`` of a model output, 4 as is."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _clip_judge(cfg: BuildConfig, store: Store, device: torch.device) -> Judge:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from realfake.conditioning import generation_prompt

    model_id = cfg.quality.judge_model or cfg.models.clip
    folder = _local_model_folder(model_id)
    if folder is None:
        raise FileNotFoundError(f"quality.judge=clip: {model_id!r} is neither a local CLIP folder nor in the hub "
                                "cache; set quality.judge_model to a full CLIP checkpoint folder, or quality.judge="
                                "classifier")
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
    prompts = [generation_prompt(cfg.synthesis, n) for n in _class_names(store)]  # the prompts in production
    with torch.inference_mode():
        tokens = tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(device)
        text = torch.nn.functional.normalize(_projected(model.get_text_features(**tokens)).float(), dim=-1)
        scale = model.logit_scale.exp().float()

    @torch.inference_mode()
    def run(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        pixels = processor(images=images, return_tensors="pt").pixel_values.to(device)
        feats = torch.nn.functional.normalize(_projected(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        probs = torch.softmax(scale * feats @ text.T, dim=1)
        return probs.cpu().numpy(), feats.cpu().numpy()

    return Judge(f"CLIP zero-shot {model_id} against the generation prompts ('{prompts[0]}', ...)", "clip", run,
                 cfg.quality.batch_size)


def _judge_recipe(cfg: BuildConfig, store: Store) -> dict[str, Any]:
    from realfake.data.manifest import read_manifest

    clf = cfg.classifier.model_copy(update={"epochs": cfg.quality.judge_epochs or cfg.classifier.epochs})
    train = read_manifest(store, "train")
    rows = hashlib.sha256(json.dumps([[s.sample_id, s.label, s.sha256] for s in train]).encode()).hexdigest()
    return {"classifier": clf.model_dump(mode="json"), "real train (sample_id, label, sha256)": rows,
            "classes": len({s.label for s in train})}


def _judge_store(cfg: BuildConfig, store: Store) -> Store:
    from realfake.data.storage import dataset_store

    recipe = _judge_recipe(cfg, store)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return dataset_store(cfg.root, cfg.dataset, store.storage_options).child(JUDGES_DIR, key)


def _classifier_judge(cfg: BuildConfig, store: Store, device: torch.device, progress: bool = False) -> Judge:
    """The classifier recipe trained on the real train split, cached by content (recipe + images) for the dataset:
    weights first, ``judge.json`` last, so a half-written judge is trained again, never read."""
    from realfake.classify import build_classifier, train_classifier
    from realfake.data.loaders import RealImages

    recipe = _judge_recipe(cfg, store)
    clf_cfg = cfg.classifier.model_copy(update={"epochs": recipe["classifier"]["epochs"]})
    n = recipe["classes"]
    jstore = _judge_store(cfg, store)
    if jstore.exists("judge.json") and jstore.read_json("judge.json").get("recipe") == recipe:
        model = build_classifier(clf_cfg, n)
        model.net.load_state_dict(torch.load(io.BytesIO(jstore.read_bytes("model.pt")), map_location="cpu",
                                             weights_only=True))
    else:
        t0 = time.time()
        model = train_classifier(RealImages(store, "train"), n, clf_cfg, device=device, progress=progress)
        buf = io.BytesIO()
        torch.save(model.net.state_dict(), buf)
        jstore.write_bytes(buf.getvalue(), "model.pt")
        jstore.write_json({"recipe": recipe, "train_s": round(time.time() - t0, 2)}, "judge.json")
    model.eval().to(device)
    transform = model.eval_transform

    @torch.inference_mode()
    def run(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        x = torch.stack([transform(im) for im in images]).to(device)
        feats = model.features(x)
        logits = model.net.get_classifier()(feats)
        return torch.softmax(logits.float(), dim=1).cpu().numpy(), feats.float().cpu().numpy()

    return Judge(f"classifier {clf_cfg.model} ({clf_cfg.epochs} epochs) trained on the real train split "
                 f"({jstore.uri()})", "classifier", run, cfg.quality.batch_size)


def load_judge(cfg: BuildConfig, store: Store, device: torch.device | str | None = None,
               progress: bool = False) -> Judge:
    """The judge ``quality.judge`` names (a classifier judge is trained the first time, then read from its cache)."""
    from realfake.models.loading import resolve_device

    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    if judge_kind(cfg) == "clip":
        return _clip_judge(cfg, store, device)
    return _classifier_judge(cfg, store, device, progress)


# --------------------------------------------------------------------------------------------------------
# The copy descriptor
# --------------------------------------------------------------------------------------------------------
_CENTER_IMAGES = 512  # real train images (evenly spaced in manifest order) whose mean centres a fallback descriptor


@dataclass
class _Descriptor:
    """A copy descriptor with its centring: unit vectors of images."""

    inner: Any
    center: np.ndarray | None
    batch_size: int

    @property
    def name(self) -> str:
        return self.inner.name + (" (centred on the real train mean)" if self.center is not None else "")

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        from realfake.privacy.copydetect import embed_images, l2_normalize

        if not len(images):
            return np.zeros((0, 0), np.float32)
        raw = embed_images([im.convert("RGB") for im in images], self.inner, self.batch_size, normalize=False)
        return l2_normalize(raw, self.center)


def quality_descriptor(cfg: BuildConfig, store: Store, device: torch.device | str | None = None,
                       storage_options: dict | None = None) -> _Descriptor:
    """The copy descriptor of ``quality.descriptor``; a fallback (CLIP / timm) is centred on the mean real train
    descriptor, as :mod:`realfake.privacy.copydetect` does, so similarities are not all near 1."""
    from realfake.data.manifest import load_real_image, read_manifest
    from realfake.models.loading import resolve_device
    from realfake.privacy.copydetect import build_descriptor, embed_images, resolve_descriptor_kind

    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    q = cfg.quality
    path = q.descriptor_path
    if path is None:
        folder = _local_model_folder(cfg.models.clip)
        if folder is None:
            raise FileNotFoundError(f"quality.descriptor_path is unset and models.clip {cfg.models.clip!r} is not a "
                                    "local CLIP folder: set quality.descriptor_path (SSCD TorchScript file or CLIP "
                                    "folder)")
        path = str(folder)
    kind = resolve_descriptor_kind(q.descriptor, path)
    inner = build_descriptor(kind, path, device=device)
    center = None
    if kind != "sscd":
        train = read_manifest(store, "train")
        step = max(1, len(train) // _CENTER_IMAGES)
        res = cfg.synthesis.resolution
        images = [load_real_image(s, res, storage_options, fit=cfg.synthesis.source_resize) for s in train[::step]]
        center = embed_images(images, inner, q.batch_size, normalize=False).mean(0)
    return _Descriptor(inner, center, q.batch_size)


# --------------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------------
# quality fields that only say how a version is measured, not which images a gate keeps: not in the recipe
_MEASURE_ONLY = ("enabled", "reference_split", "near_duplicate", "flag_agreement", "kid_subsets", "worst_examples",
                 "batch_size")


def gate_recipe(cfg: BuildConfig) -> dict[str, Any]:
    """What a gated build's images depend on beyond an ungated one's: the gate settings and the judge's recipe (a
    classifier judge: the classifier settings it is trained with). Empty without gates, so an ungated version's
    recipe is the one it always had."""
    if not cfg.quality.gated:
        return {}
    q = cfg.quality.model_dump(mode="json")
    out = {f"quality.{k}": v for k, v in q.items() if k not in _MEASURE_ONLY}
    out["quality judge"] = judge_kind(cfg)
    if out["quality judge"] == "classifier":
        out["quality judge classifier"] = cfg.classifier.model_copy(
            update={"epochs": cfg.quality.judge_epochs or cfg.classifier.epochs}).model_dump(mode="json")
    return out


def may_drop(cfg: BuildConfig) -> bool:
    """Whether a committed shard may hold fewer images than planned (a gate drops what fails its last attempt)."""
    return cfg.quality.gated and cfg.quality.on_fail == "drop"


def _round(v: float | None, nd: int = 6) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


@dataclass
class GateStats:
    """What a gate did: images scored, regenerated (per attempt), failed on the last attempt, dropped, seconds."""

    scored: int = 0
    regenerated: dict[int, int] = field(default_factory=dict)
    failed: int = 0
    dropped: int = 0
    score_s: float = 0.0
    regenerate_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"scored": self.scored, "regenerated": {str(k): v for k, v in sorted(self.regenerated.items())},
                "regenerated_images": sum(self.regenerated.values()), "failed_last_attempt": self.failed,
                "dropped": self.dropped, "score_s": round(self.score_s, 2),
                "regenerate_s": round(self.regenerate_s, 2)}


class QualityGate:
    """Scores images as they are generated and makes the failing ones again with the next attempt's seed.

    :meth:`run` takes one shard's work items and the records the engine made of them (attempt 0), and yields the
    records to write, in plan order: each carries ``meta["quality"]`` (``attempt``, ``label_agreement``,
    ``judge_label``, ``source_similarity``, ``passed``) and the seed of its attempt. The shard writer commits only
    after the last one, so a killed build redoes the whole shard, attempts included, with the same result.
    """

    def __init__(self, cfg: BuildConfig, store: Store, judge: Judge | None = None,
                 descriptor: _Descriptor | None = None, storage_options: dict | None = None) -> None:
        self.cfg = cfg
        self.q: QualityConfig = cfg.quality
        self.store = store
        self.storage_options = storage_options
        self.judge = judge if judge is not None else load_judge(cfg, store)
        self.descriptor = descriptor
        if descriptor is None and self.q.max_source_similarity is not None:
            self.descriptor = quality_descriptor(cfg, store, storage_options=storage_options)
        self.stats = GateStats()

    def _sources(self, items: Sequence[Any]) -> list[Image.Image]:
        from realfake.data.manifest import RealSample, load_real_image

        syn = self.cfg.synthesis
        return [load_real_image(RealSample(w.sample_id, "train", w.label, w.class_name, w.uri, "", 0, 0),
                                syn.resolution, self.storage_options, fit=syn.source_resize) for w in items]

    def score(self, items: Sequence[Any], records: Sequence[Any]) -> list[dict[str, Any]]:
        """Gate scores of records made from ``items`` (same order)."""
        t0 = time.time()
        images = [r.image if isinstance(r.image, Image.Image) else Image.open(io.BytesIO(r.image)) for r in records]
        probs, _ = self.judge.score(images)
        sims: list[float | None] = [None] * len(records)
        if self.descriptor is not None:
            a = self.descriptor.embed(images)
            b = self.descriptor.embed(self._sources(items))
            sims = [float(v) for v in (a * b).sum(1)]
        out = []
        for w, p, s in zip(items, probs, sims, strict=True):
            agree = float(p[w.label])
            ok = (self.q.min_label_agreement is None or agree >= self.q.min_label_agreement) and \
                (self.q.max_source_similarity is None or s is None or s <= self.q.max_source_similarity)
            out.append({"label_agreement": _round(agree), "judge_label": int(np.argmax(p)),
                        "source_similarity": _round(s), "passed": bool(ok)})
        self.stats.scored += len(records)
        self.stats.score_s += time.time() - t0
        return out

    def run(self, engine: Any, items: Sequence[Any], records: Iterable[Any]) -> Iterator[Any]:
        """The records to write for one shard's ``items`` (see the class docstring)."""
        chunk: list[tuple[Any, Any]] = []
        kept = 0
        for pair in zip(items, records, strict=True):
            chunk.append(pair)
            if len(chunk) >= max(1, self.q.batch_size):
                for rec in self._gate(engine, chunk):
                    kept += 1
                    yield rec
                chunk = []
        if chunk:
            for rec in self._gate(engine, chunk):
                kept += 1
                yield rec
        if items and not kept:  # a shard cannot be empty: say so rather than commit nothing or keep silently
            raise ValueError(
                f"quality.on_fail=drop dropped all {len(items)} images of a shard (first: {items[0].key}, class "
                f"{items[0].class_name!r}) after {self.q.attempts} attempt(s): lower quality.min_label_agreement / "
                "raise quality.max_source_similarity, or set quality.on_fail=keep to keep them marked as failed")

    def _gate(self, engine: Any, chunk: list[tuple[Any, Any]]) -> Iterator[Any]:
        items = [w for w, _ in chunk]
        best = [r for _, r in chunk]
        scores = self.score(items, best)
        attempt = [0] * len(items)
        for a in range(1, self.q.attempts):
            todo = [i for i, s in enumerate(scores) if not s["passed"]]
            if not todo:
                break
            t0 = time.time()
            again = list(engine.generate([replace(items[i], attempt=a) for i in todo]))
            self.stats.regenerate_s += time.time() - t0
            self.stats.regenerated[a] = self.stats.regenerated.get(a, 0) + len(todo)
            for i, rec, s in zip(todo, again, self.score([items[i] for i in todo], again), strict=True):
                best[i], scores[i], attempt[i] = rec, s, a  # the latest attempt is the image kept, passed or not
        for rec, s, a in zip(best, scores, attempt, strict=True):
            if not s["passed"]:
                self.stats.failed += 1
                if self.q.on_fail == "drop":
                    self.stats.dropped += 1
                    log.info("quality gate: %s failed %d attempt(s) and is dropped (%s)", rec.key, a + 1, s)
                    continue
            rec.meta["quality"] = {"attempt": a, **s}
            yield rec


# --------------------------------------------------------------------------------------------------------
# Measuring a version: per-image scores and the per-class table
# --------------------------------------------------------------------------------------------------------
def _planned_per_class(cfg: BuildConfig, store: Store) -> dict[int, int]:
    from realfake.data.manifest import read_manifest

    out: dict[int, int] = {}
    for s in read_manifest(store, "train"):
        out[s.label] = out.get(s.label, 0) + cfg.synthesis.images_per_real
    return out


def measure_quality(cfg: BuildConfig, store: Store, storage_options: dict | None = None, progress: bool = False,
                    judge: Judge | None = None, descriptor: _Descriptor | None = None) -> dict[str, Any]:
    """Score every committed synthetic image and summarise each class; writes ``quality/scores.parquet`` and
    ``quality/worst.png`` and returns the card's ``quality`` section (see :func:`format_quality_table`)."""
    import pyarrow as pa

    from realfake.data.loaders import RealImages
    from realfake.data.manifest import load_real_image, read_manifest
    from realfake.data.shards import iter_synthetic
    from realfake.measure import frechet_distance
    from realfake.recipe import manifest_class_map

    t0 = time.time()
    q = cfg.quality
    judge = judge if judge is not None else load_judge(cfg, store, progress=progress)
    t_judge = time.time()
    descriptor = descriptor if descriptor is not None else quality_descriptor(cfg, store,
                                                                              storage_options=storage_options)
    # Streamed in chunks: only scores, features and each class's worst few thumbnails are kept, never the images.
    train = {s.sample_id: s for s in read_manifest(store, "train")}
    res, fit = cfg.synthesis.resolution, cfg.synthesis.source_resize
    keys: list[str] = []
    labels: list[int] = []
    metas: list[dict[str, Any]] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    worst: dict[int, list[tuple[float, int, Image.Image]]] = {}
    chunk: list[tuple[Image.Image, int, dict[str, Any]]] = []

    def flush() -> None:
        images = [img for img, _, _ in chunk]
        p, f = judge.score(images)
        d = descriptor.embed(images)
        src = descriptor.embed([load_real_image(train[m["source_sample_id"]], res, storage_options, fit=fit)
                                for _, _, m in chunk])
        parts.append((p, f, d, (d * src).sum(1)))
        for j, (img, label, _) in enumerate(chunk):
            heap = worst.setdefault(label, [])
            heap.append((float(p[j, label]), len(keys) - len(chunk) + j, img.resize((64, 64), Image.NEAREST)))
            heap.sort(key=lambda t: (t[0], t[1]))
            del heap[max(1, q.worst_examples):]
        chunk.clear()

    for img, label, meta in iter_synthetic(store, check=False):
        keys.append(meta["key"])
        labels.append(int(label))
        metas.append(meta)
        chunk.append((img.convert("RGB"), int(label), meta))
        if len(chunk) >= q.batch_size:
            flush()
    if chunk:
        flush()
    if not parts:
        raise ValueError(f"{store.uri('synthetic')} holds no committed image to measure")
    probs, feats, desc, src_sim = (np.concatenate([pt[i] for pt in parts]) for i in range(4))
    labels_a = np.asarray(labels, dtype=np.int64)
    real = RealImages(store, q.reference_split)
    real_probs, real_feats = judge.score(real[i][0] for i in range(len(real)))
    real_labels = np.asarray(real.labels, dtype=np.int64)
    names = {int(k): v for k, v in manifest_class_map(store).items()}
    planned = _planned_per_class(cfg, store)

    nn_sim = np.full(len(keys), np.nan, np.float32)
    nn_key: list[str | None] = [None] * len(keys)
    classes: dict[str, dict[str, Any]] = {}
    for c in sorted(set(planned) | set(labels)):
        mine = np.flatnonzero(labels_a == c)
        ref = np.flatnonzero(real_labels == c)
        if len(mine) >= 2:
            s, j = _nearest_other(desc[mine])
            nn_sim[mine] = s
            for i, jj in zip(mine, j, strict=True):
                nn_key[i] = keys[mine[jj]]
        attempts = [int((metas[i].get("quality") or {}).get("attempt", 0)) for i in mine]
        failed = sum(1 for i in mine if (metas[i].get("quality") or {}).get("passed") is False)
        row: dict[str, Any] = {
            "class_name": names.get(c, str(c)),
            "count": int(len(mine)),
            "planned": int(planned.get(c, 0)),
            "dropped": int(planned.get(c, 0) - len(mine)),
            "regenerated": int(sum(1 for a in attempts if a > 0)),
            "failed_kept": int(failed),
            "agreement": _round(float(np.mean(probs[mine].argmax(1) == c))) if len(mine) else None,
            "label_prob": _round(float(np.mean(probs[mine, c]))) if len(mine) else None,
            "real_agreement": _round(float(np.mean(real_probs[ref].argmax(1) == c))) if len(ref) else None,
            "kid": None, "kid_se": None, "fid": None,
            "diversity": _round(diversity(feats[mine])) if len(mine) >= 2 else None,
            "real_diversity": _round(diversity(real_feats[ref])) if len(ref) >= 2 else None,
            "near_duplicates": int(np.sum(nn_sim[mine] >= q.near_duplicate)) if len(mine) >= 2 else 0,
            "source_similarity": _round(float(np.mean(src_sim[mine]))) if len(mine) else None,
        }
        if len(mine) >= 2 and len(ref) >= 2:
            value, se = kid(feats[mine], real_feats[ref], q.kid_subsets)
            row["kid"], row["kid_se"] = _round(value), _round(se)
            row["fid"] = _round(frechet_distance(feats[mine], real_feats[ref]), 4)
        if row["diversity"] is not None and row["real_diversity"]:
            row["diversity_ratio"] = _round(row["diversity"] / row["real_diversity"], 4)
        flags = []
        if row["agreement"] is not None and row["agreement"] < q.flag_agreement:
            flags.append(f"label agreement {row['agreement']:.1%} < {q.flag_agreement:.0%}")
        if row["dropped"]:
            flags.append(f"{row['dropped']} dropped by the gate")
        if row["near_duplicates"]:
            flags.append(f"{row['near_duplicates']} near-duplicate(s)")
        row["flags"] = flags
        classes[str(c)] = row

    scores = pa.table({
        "key": keys,
        "label": pa.array(labels, pa.int64()),
        "judge_label": pa.array(probs.argmax(1).tolist() if len(keys) else [], pa.int64()),
        "label_agreement": pa.array([float(probs[i, labels[i]]) for i in range(len(keys))], pa.float32()),
        "source_similarity": pa.array(src_sim.tolist(), pa.float32()),
        "nearest_synthetic_similarity": pa.array(nn_sim.tolist(), pa.float32()),
        "nearest_synthetic_key": pa.array(nn_key, pa.string()),
        "attempt": pa.array([int((m.get("quality") or {}).get("attempt", 0)) for m in metas], pa.int64()),
    })
    store.write_table(scores, *_SCORES)
    order = sorted(classes, key=lambda k: (classes[k]["kid"] is None, -(classes[k]["kid"] or 0.0), int(k)))
    buf = io.BytesIO()
    _worst_grid(order, classes, worst, q.worst_examples).save(buf, format="PNG")
    store.write_bytes(buf.getvalue(), *_WORST)
    total = len(keys)
    return {
        "judge": judge.name,
        "judge_kind": judge.kind,
        "descriptor": descriptor.name,
        "reference_split": q.reference_split,
        "gates": {"min_label_agreement": q.min_label_agreement, "max_source_similarity": q.max_source_similarity,
                  "attempts": q.attempts, "on_fail": q.on_fail},
        "images": total,
        "agreement": _round(float(np.mean(probs.argmax(1) == labels_a))) if total else None,
        "regenerated": sum(v["regenerated"] for v in classes.values()),
        "dropped": sum(v["dropped"] for v in classes.values()),
        "near_duplicates": sum(v["near_duplicates"] for v in classes.values()),
        "flagged": [k for k in order if classes[k]["flags"]],
        "order": order,
        "classes": classes,
        "scores": store.uri(*_SCORES),
        "worst_grid": store.uri(*_WORST),
        "seconds": round(time.time() - t0, 2),
        "judge_s": round(t_judge - t0, 2),
    }


def _worst_grid(order: list[str], classes: dict[str, dict], worst: dict[int, list[tuple[float, int, Image.Image]]],
                per_class: int, size: int = 64) -> Image.Image:
    """Rows = classes (far from real first), columns = their lowest-agreement images, lowest first."""
    head, label_w = 14, 150
    per_class = max(1, per_class)
    grid = Image.new("RGB", (label_w + per_class * size, head + max(1, len(order)) * size), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), "class (label agreement, KID)  | lowest label agreement first", fill=(0, 0, 0))
    for r, k in enumerate(order):
        row = classes[k]
        y = head + r * size
        agreement = f"{row['agreement']:.0%}" if row["agreement"] is not None else "-"
        draw.text((4, y + 4), f"{k} {row['class_name'][:14]}", fill=(0, 0, 0))
        draw.text((4, y + 18), f"agree {agreement}", fill=(0, 0, 0))
        draw.text((4, y + 32), f"KID {row['kid']:.4f}" if row["kid"] is not None else "KID -", fill=(0, 0, 0))
        for j, (_, _, thumb) in enumerate(worst.get(int(k), [])[:per_class]):
            grid.paste(thumb.resize((size, size), Image.NEAREST), (label_w + j * size, y))
    return grid


# --------------------------------------------------------------------------------------------------------
# The per-class table (card, report, inspect)
# --------------------------------------------------------------------------------------------------------
_COLUMNS = ("label", "class", "count", "dropped", "regen", "agree", "real agree", "KID", "KID se", "FID",
            "diversity", "real div", "near-dup", "src sim")


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_quality_table(section: dict[str, Any]) -> str:
    """The card's per-class quality table as markdown, classes far from their real counterpart (highest KID)
    first; flagged classes are listed under it."""
    lines = [f"judge: {section.get('judge')}", f"descriptor: {section.get('descriptor')}",
             f"against the real {section.get('reference_split')} split; images {section.get('images')}, "
             f"agreement {_cell(section.get('agreement'), '.1%')}, regenerated {section.get('regenerated')}, "
             f"dropped {section.get('dropped')}, near-duplicates {section.get('near_duplicates')}", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for k in section.get("order", []):
        r = section["classes"][k]
        cells = [k, r["class_name"], str(r["count"]), str(r["dropped"]), str(r["regenerated"]),
                 _cell(r["agreement"], ".4f"), _cell(r["real_agreement"], ".4f"), _cell(r["kid"], ".6f"),
                 _cell(r["kid_se"], ".6f"), _cell(r["fid"], ".4f"), _cell(r["diversity"], ".4f"),
                 _cell(r["real_diversity"], ".4f"), str(r["near_duplicates"]), _cell(r["source_similarity"], ".4f")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    flagged = section.get("flagged") or []
    if flagged:
        lines += ["", "flagged:"] + [f"- {k} {section['classes'][k]['class_name']}: "
                                     f"{'; '.join(section['classes'][k]['flags'])}" for k in flagged]
    return "\n".join(lines)


def parse_quality_table(text: str) -> dict[str, dict[str, Any]]:
    """The rows of a :func:`format_quality_table` table (as ``inspect`` prints it) back as label -> values."""
    out: dict[str, dict[str, Any]] = {}
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and ln.endswith(" |")]
    for ln in rows:
        cells = [c.strip() for c in ln[2:-2].split(" | ")]
        if cells[0] == _COLUMNS[0] or len(cells) != len(_COLUMNS):
            continue
        conv: dict[str, Any] = {}
        for name, c in zip(_COLUMNS, cells, strict=True):
            if name == "class":
                conv[name] = c
            elif c == "-":
                conv[name] = None
            elif name in ("label", "count", "dropped", "regen", "near-dup"):
                conv[name] = int(c)
            else:
                conv[name] = float(c)
        out[cells[0]] = conv
    return out
