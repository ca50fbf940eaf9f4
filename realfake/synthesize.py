"""Synthesis: the Real-Fake image-to-image engine and the execution of a shard plan.

Each real training image yields ``images_per_real`` synthetic images. One image is generated from: its
real source's VAE latent noised to ``strength`` (the latent prior), the prompt ``photo of {class},
{caption}`` whose last text slot holds the source's CLIP embedding (visual guidance), the fine-tuned LoRA
fused at ``lora_scale``, classifier-free guidance against the negative prompt, and its own seed. The seed
derives from (version, source sample_id, replica, synthesis seed) alone, and every image gets its own
``torch.Generator``, so an image does not depend on the batch it falls in or on the number of workers.

The engine loads the pipeline once and keeps it resident across shards. A batch that runs the GPU out of
memory is not fatal: the cache is emptied and the batch retried in halves (down to single images), and
later batches start at the size that worked; since every image has its own generator, the images are the
same whatever the batch size. Turning the method's parts off
(``latent_prior``, ``finetune.enabled``, ``guidance.enabled``) gives the ablation rows, and with all of
them off it is the paper's baseline: plain text-to-image from the base generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from realfake.conditioning import encode_prompts, generation_prompt, inject_guidance
from realfake.config import BuildConfig
from realfake.data.manifest import (
    CAPTIONS,
    GUIDANCE,
    MANIFEST,
    load_real_image,
    read_captions,
    read_guidance,
    read_manifest,
)
from realfake.data.shards import (
    PLAN_FILE,
    ShardPlan,
    ShardWriter,
    SyntheticRecord,
    committed_shards,
    make_key,
    plan_pending,
    plan_shards,
    read_recipe,
    remove_partial_shards,
)
from realfake.data.storage import Store, io_retry
from realfake.finetune import adapter_hash, load_adapter
from realfake.quality import QualityGate, gate_recipe, may_drop
from realfake.recipe import (
    RecipeMismatchError,
    canonical,
    manifest_class_map,
    mismatch_message,
    recipe_bytes,
    recipe_diff,
)

__all__ = [
    "MAY_GROW",
    "SCHEDULERS",
    "GroupPlan",
    "SynthesisEngine",
    "WorkItem",
    "check_synthesis_recipe",
    "group_pending",
    "image_seed",
    "plan_work",
    "read_group_plans",
    "synthesis_recipe",
    "synthesize",
    "write_group_plans",
]

log = logging.getLogger(__name__)


def _scheduler_classes() -> dict[str, type]:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    return {"unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
            "dpm": DPMSolverMultistepScheduler}


SCHEDULERS = ("unipc", "ddim", "euler", "dpm")


@dataclass(frozen=True)
class WorkItem:
    """One synthetic image to make: its real source and its replica number."""

    sample_id: str
    label: int
    class_name: str
    uri: str
    replica: int
    attempt: int = 0  # a quality gate's regeneration (0: the image an ungated build makes); same key, another seed

    @property
    def key(self) -> str:
        return make_key(self.label, self.sample_id, self.replica)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """RGB images in [0, 1] (N, C, H, W, any float dtype, any device) as PIL images, quantised where they are.

    The same numbers as diffusers' ``output_type="pil"`` (float32, x255, round half to even, 8 bits), but the
    scaling and rounding run on the GPU and only the 8-bit pixels are copied back, instead of float32 copies that
    the CPU then scales, rounds and converts image by image while the GPU waits.
    """
    pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in pixels]


def image_seed(version: str, sample_id: str, replica: int, seed: int, attempt: int = 0) -> int:
    """A 63-bit seed from the image's identity alone (never its batch position or worker); a quality gate's attempt
    ``a > 0`` hashes the attempt number after the same fields (attempt 0 is the seed an ungated build uses)."""
    tail = f"\x1f{attempt}" if attempt else ""
    digest = hashlib.sha256(f"{version}\x1f{sample_id}\x1f{replica}\x1f{seed}{tail}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def plan_work(cfg: BuildConfig, store: Store) -> list[WorkItem]:
    """Work items of a version, sorted by (label, sample_id, replica) so shards and batches group classes."""
    items = [
        WorkItem(s.sample_id, s.label, s.class_name, s.uri, r)
        for s in read_manifest(store, "train")
        for r in range(cfg.synthesis.images_per_real)
    ]
    return sorted(items, key=lambda w: (w.label, w.sample_id, w.replica))


# Config fields that change how the images are computed, not which images: not part of the recipe, so a resume
# may change them. Every other field of these sections is, including fields added later.
_NOT_RECIPE = {
    "synthesis.batch_size": "every image has its own generator, and an out-of-memory batch is split at run time",
    "synthesis.compile": "the same UNet, compiled or not",
    "synthesis.overlap_writes": "when the writer runs, not what it writes",
    "shards.max_bytes": "how a shard is cut into files; lowering it is the fix for an object-size limit",
    "guidance.batch_size": "the vectors themselves are in the recipe (their file's sha256)",
}
# Recipe fields that mode=extend may change: the class map and the real images may gain classes (not change the
# ones there); the images per real image and per shard may change, as plan_pending then checks that the committed
# images are all still planned.
MAY_GROW = ("class names", "real images (sha256 per class)", "synthesis.images_per_real", "shards.max_count")


def _section(cfg: BuildConfig, name: str) -> dict[str, Any]:
    dump = getattr(cfg, name).model_dump(mode="json")
    return {f"{name}.{k}": v for k, v in dump.items() if f"{name}.{k}" not in _NOT_RECIPE}


def _file_sha256(store: Store, *parts: str) -> str:
    with store.open(*parts) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def synthesis_recipe(cfg: BuildConfig, store: Store) -> dict[str, Any]:
    """What every synthetic image of the version depends on, by the config field or data that sets it.

    The class names (which fill the prompts), the real training images, the whole ``synthesis`` and ``shards``
    sections but for the fields in ``_NOT_RECIPE``, the base weights (by content, not where they lie), the captions
    and guidance vectors (sha256 of their files) with the guidance settings, each adapter's weights (sha256) and the
    version name (every image seed derives from it). Computed from the config and the version alone, so every
    worker of a build gets the same recipe; recorded with the shards by :func:`~realfake.data.shards.plan_pending`.
    """
    per_class = _real_image_hashes(store)
    scopes = [] if not cfg.finetune.enabled else ["all"] if cfg.finetune.scope == "all" else \
        list(per_class)  # as the fine-tune stage's: every label with a training image, in label order
    # the config's own fields (gate fields are empty without quality gates: an ungated version's recipe is
    # unchanged), then what the version's data adds; recorded with sorted keys (realfake.recipe.recipe_bytes)
    return {
        "class names": manifest_class_map(store),
        "real images (sha256 per class)": per_class,
        **_config_recipe(cfg),
        "captions (features/captions.parquet sha256)": _file_sha256(store, *CAPTIONS) if cfg.caption.enabled
        else None,
        "guidance vectors (features/guidance.parquet sha256)": _file_sha256(store, *GUIDANCE)
        if cfg.guidance.enabled else None,
        "adapters (weights sha256)": {s: adapter_hash(store, s) for s in scopes} or None,
    }


def _config_recipe(cfg: BuildConfig) -> dict[str, Any]:
    """The fields of :func:`synthesis_recipe` that come from the config and this node's base weights alone, without
    reading the version's data (manifest, feature files, adapters): what a shard group checks itself, and the
    part of every recipe that :func:`synthesis_recipe` adds the data's fields to."""
    from realfake.models.loading import model_fingerprint

    out: dict[str, Any] = {"version (image seeds)": cfg.version, **_section(cfg, "synthesis"),
                           "models.base (weights fingerprint)": model_fingerprint(cfg.models.base,
                                                                                  cfg.models.base_revision),
                           "caption.enabled": cfg.caption.enabled, "finetune.enabled": cfg.finetune.enabled}
    out.update(_section(cfg, "guidance") if cfg.guidance.enabled else {"guidance.enabled": False})
    out.update(_section(cfg, "shards"))
    out.update(gate_recipe(cfg))
    return out


# The build's plan of the shards still to write (realfake.build.plan_synthesis writes it once, before its shard
# groups start; each group reads its own shards' rows): one row group per shard, in plan order.
_PLAN_SCHEMA = pa.schema([("shard", pa.string()), ("sample_id", pa.string()), ("label", pa.int32()),
                          ("class_name", pa.string()), ("uri", pa.string()), ("replica", pa.int32())])
_PLAN_META = b"realfake.plan"


def write_group_plans(cfg: BuildConfig, store: Store, pending: Sequence[ShardPlan], recipe: dict[str, Any],
                      shards_total: int) -> None:
    """Record the build's plan (``synthetic/_plan.parquet``) for its shard groups: the items of every pending shard,
    one row group per shard, keyed by the recipe recorded with the shards and the mode it was planned in, so that
    a group (:func:`read_group_plans`) reads only its own shards' rows and never uses a plan made under another."""
    import io

    meta = {"format": 1, "recipe_sha256": hashlib.sha256(recipe_bytes(recipe)).hexdigest(), "mode": cfg.mode,
            "shards_total": shards_total, "shards": [[p.name, p.index] for p in pending]}
    schema = _PLAN_SCHEMA.with_metadata({_PLAN_META: json.dumps(meta).encode()})
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema, compression="zstd") as w:
        for p in pending:
            its: tuple[WorkItem, ...] = p.items
            w.write_table(pa.table({"shard": [p.name] * len(its), "sample_id": [i.sample_id for i in its],
                                    "label": [i.label for i in its], "class_name": [i.class_name for i in its],
                                    "uri": [i.uri for i in its], "replica": [i.replica for i in its]},
                                   schema=schema), row_group_size=max(1, len(its)))
    target = store.child("synthetic")
    io_retry(lambda: target.write_bytes(buf.getvalue(), PLAN_FILE), f"write {target.uri(PLAN_FILE)}")


@dataclass(frozen=True)
class GroupPlan:
    """A shard group's part of the build's plan (:func:`read_group_plans`)."""

    plans: tuple[ShardPlan, ...]  # the group's shards that were pending when the build planned, in plan order
    recipe: dict[str, Any]  # the recipe recorded with the shards
    shards_total: int


def read_group_plans(cfg: BuildConfig, store: Store, names: Sequence[str]) -> GroupPlan | None:
    """The plans of the shards ``names`` from the build's recorded plan (:func:`write_group_plans`), or None when
    there is none to use: no plan, one made under another recipe or mode, a ``cfg`` whose own settings or base
    weights differ from the recorded recipe, or a named shard neither planned nor committed. The caller then plans
    the whole version itself (:func:`plan_work`), which names any mismatch.

    Reads the recipe once, the plan's footer, the rows of the group's own shards and the commit listing."""
    from realfake.data.shards.reader import commit_records

    target = store.child("synthetic")
    recorded = read_recipe(store)

    def load() -> tuple[str, dict[str, Any], list[str], pa.Table | None]:
        with target.fs.open(target.path(PLAN_FILE), "rb") as f:
            pf = pq.ParquetFile(f)
            meta = json.loads((pf.schema_arrow.metadata or {}).get(_PLAN_META, b"{}"))
            why = _stale(cfg, meta, recorded)
            if why:
                return why, meta, [], None
            position = {name: k for k, (name, _) in enumerate(meta["shards"])}
            mine = [n for n in names if n in position]
            rows = pf.read_row_groups([position[n] for n in mine], use_threads=False) if mine else None
            return "", meta, mine, rows

    try:
        why, meta, mine, rows = io_retry(load, f"read {target.uri(PLAN_FILE)}")
    except FileNotFoundError:
        return None
    if why:
        log.info("shard group: the build's plan %s is not used (%s): planning the version here",
                 target.uri(PLAN_FILE), why)
        return None
    position = {name: index for name, index in meta["shards"]}
    unplanned = set(names) - set(mine)
    lost = unplanned - {c.name for c in commit_records(store, unplanned)} if unplanned else set()
    if lost:
        log.info("shard group: %d of its shards (e.g. %s) are neither in the build's plan nor committed: planning "
                 "the version here", len(lost), min(lost))
        return None
    items: dict[str, list[WorkItem]] = {n: [] for n in mine}
    if rows is not None:
        cols = [rows.column(c).to_pylist() for c in _PLAN_SCHEMA.names]
        for shard, sample_id, label, class_name, uri, replica in zip(*cols, strict=True):
            items[shard].append(WorkItem(sample_id, label, class_name, uri, replica))
    plans = tuple(ShardPlan(n, position[n], tuple(items[n])) for n in mine)
    return GroupPlan(plans, recorded, int(meta["shards_total"]))  # type: ignore[arg-type]


def _stale(cfg: BuildConfig, meta: dict[str, Any], recorded: dict[str, Any] | None) -> str:
    """Why a recorded plan may not be used by a shard group of ``cfg`` (empty: it may)."""
    if meta.get("format") != 1:
        return "not a plan of this realfake"
    if recorded is None or hashlib.sha256(recipe_bytes(recorded)).hexdigest() != meta.get("recipe_sha256"):
        return "made under another recipe than the one recorded with the shards"
    if meta.get("mode") != cfg.mode:
        return f"planned with mode={meta.get('mode')}, this group runs with mode={cfg.mode}"
    own = canonical(_config_recipe(cfg))
    differ = sorted(k for k, v in own.items() if k not in recorded or canonical({k: recorded[k]})[k] != v)
    if differ:
        return f"this group's config differs from the recorded recipe in {', '.join(differ[:3])}"
    return ""


def _real_image_hashes(store: Store) -> dict[str, str]:
    """Per label (in label order), the first 16 hex digits of the sha256 of the JSON list ``[[sample_id, sha256],
    ...]`` of its training images in sample_id order: each source image by identity and content (the latent prior
    starts from it). Computed class by class from the manifest's columns, never its rows as Python objects (1.3 GB
    at ImageNet-1K's size, benchmarks/results/scale.md); the same digests as from ``read_manifest``'s samples."""
    import pyarrow.compute as pc

    if not store.exists(*MANIFEST):
        raise FileNotFoundError(f"{store.uri(*MANIFEST)} does not exist: run the prepare stage first")
    t = store.read_table(*MANIFEST).select(["split", "label", "sample_id", "sha256"])
    t = t.filter(pc.equal(t.column("split"), "train")).sort_by([("label", "ascending"), ("sample_id", "ascending")])
    labels = t.column("label").to_numpy()
    starts = [0, *(np.flatnonzero(np.diff(labels)) + 1).tolist(), len(labels)] if len(labels) else [0]
    out: dict[str, str] = {}
    for a, b in zip(starts, starts[1:], strict=False):
        part = t.slice(a, b - a)
        pairs = [[i, h] for i, h in zip(part.column("sample_id").to_pylist(), part.column("sha256").to_pylist(),
                                        strict=True)]
        out[str(int(labels[a]))] = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
    return out


def check_synthesis_recipe(cfg: BuildConfig, store: Store, stage: str, mode: str = "resume",
                           commits: Sequence | None = None) -> dict[str, Any] | None:
    """Refuse (:class:`~realfake.recipe.RecipeMismatchError`) when the version's committed shards were made under
    another recipe than ``cfg``'s (but for the :data:`MAY_GROW` fields in ``extend`` mode): what ``stage`` would
    describe (finalize) or add to (synthesize) is not what the shards hold. Reads only, as plan_pending's check.

    Returns ``cfg``'s :func:`synthesis_recipe` when it was computed for the check (None when nothing was compared),
    so that a caller going on to plan the shards does not hash the version's feature files a second time.
    ``commits``: the version's commit records where the caller already read them (read here otherwise)."""
    recorded = read_recipe(store)
    commits = committed_shards(store) if commits is None else commits
    if recorded is None or not commits:
        return None  # nothing made yet, or made by an earlier realfake (synthesize itself refuses to resume those)
    current = synthesis_recipe(cfg, store)
    differ = recipe_diff(recorded, current, MAY_GROW if mode == "extend" else ())
    if differ:
        grows = not recipe_diff(recorded, current, MAY_GROW)
        raise RecipeMismatchError(mismatch_message(f"{stage}: the {len(commits)} committed shard(s) in "
                                                   f"{store.uri('synthetic')}", differ, grows, cfg.version))
    return current


class SynthesisEngine:
    """A resident generation pipeline: load once, then :meth:`generate` any number of work items."""

    def __init__(self, cfg: BuildConfig, store: Store, components: dict | None = None,
                 storage_options: dict | None = None) -> None:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        from realfake.models.loading import load_sd_components, model_fingerprint, resolve_device

        self.cfg = cfg
        self.store = store
        self.storage_options = storage_options
        self.device = resolve_device(cfg.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        if components is None:
            components = load_sd_components(cfg.models.base, cfg.models.base_revision, self.device, self.dtype)
        syn = cfg.synthesis
        scheduler = _scheduler_classes()[syn.scheduler].from_config(components["scheduler"].config)
        parts = {k: components[k] for k in ("vae", "unet", "text_encoder", "tokenizer")}
        cls = StableDiffusionImg2ImgPipeline if syn.latent_prior else StableDiffusionPipeline
        self.pipe = cls(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                        requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        if self.device.type == "cuda":
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.vae.to(memory_format=torch.channels_last)
        self.base_hash = model_fingerprint(cfg.models.base, cfg.models.base_revision)
        self.guidance = read_guidance(store) if cfg.guidance.enabled else {}
        self.captions = read_captions(store) if cfg.caption.enabled else {}
        self.adapters: dict[str, str] = {}
        self._active_scope: str | None = None
        self.max_batch = syn.batch_size  # lowered after a GPU out-of-memory error, for the rest of the run
        self.oom_retries = 0
        if cfg.finetune.enabled:
            scopes = ["all"] if cfg.finetune.scope == "all" else sorted({str(s.label) for s in
                                                                        read_manifest(store, "train")})
            for scope in scopes:
                self.adapters[scope] = adapter_hash(store, scope)
                load_adapter(self.pipe, store, scope, adapter_name=f"scope_{scope}")
            if cfg.finetune.scope == "all":
                # fused at the generation scale: no LoRA branch left in the UNet's hot path
                self.pipe.fuse_lora(lora_scale=syn.lora_scale, adapter_names=["scope_all"])
                self.pipe.unload_lora_weights()
                self._active_scope = "all"
        if self._active_scope == "all" or not self.adapters:
            # one matmul for q/k/v (self-attention) and k/v (cross-attention) instead of three or two; done only
            # with no LoRA layers left in the attention projections (per-class adapters keep them)
            self.pipe.fuse_qkv_projections()
        if syn.compile:
            # after fusing: the compiled graph holds the final weights, no LoRA branches. Default inductor mode:
            # measured on an H200 at batch 16, 5.27 -> 7.36 images/s (benchmarks/results/synthesis.md)
            self.pipe.unet = torch.compile(self.pipe.unet)
        with torch.no_grad():
            self.negative = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [syn.negative_prompt],
                                           self.device)

    def _use_scope(self, label: int) -> str | None:
        if not self.adapters:
            return None
        if self.cfg.finetune.scope == "all":
            return "all"
        scope = str(label)
        if scope != self._active_scope:
            self.pipe.set_adapters([f"scope_{scope}"], adapter_weights=[self.cfg.synthesis.lora_scale])
            self._active_scope = scope
        return scope

    def prompt_for(self, item: WorkItem) -> str:
        return generation_prompt(self.cfg.synthesis, item.class_name, self.captions.get(item.sample_id))

    @torch.no_grad()
    def _generate_batch(self, items: Sequence[WorkItem], sources: list | None = None) -> list[SyntheticRecord]:
        syn, cfg = self.cfg.synthesis, self.cfg
        scope = self._use_scope(items[0].label)
        prompts = [self.prompt_for(w) for w in items]
        states = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.device)
        if cfg.guidance.enabled:
            guide = torch.from_numpy(np.stack([self.guidance[w.sample_id] for w in items]))
            states = inject_guidance(states, guide, cfg.guidance.slot)
        seeds = [image_seed(cfg.version, w.sample_id, w.replica, syn.seed, w.attempt) for w in items]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        kwargs = dict(
            prompt_embeds=states.to(self.dtype),
            negative_prompt_embeds=self.negative.expand(len(items), -1, -1).to(self.dtype),
            num_inference_steps=syn.steps,
            guidance_scale=syn.guidance_scale,
            generator=generators,
            output_type="pt",  # quantised to 8 bits on the device below: a quarter of the bytes to copy back
        )
        if syn.latent_prior:
            sources = sources if sources else self._load_sources(items)
            out = self.pipe(image=sources, strength=syn.strength, **kwargs)
        else:
            out = self.pipe(height=syn.resolution, width=syn.resolution, **kwargs)
        sampler = {"scheduler": syn.scheduler, "steps": syn.steps, "strength": syn.strength if syn.latent_prior
                   else 1.0, "guidance_scale": syn.guidance_scale, "lora_scale": syn.lora_scale if scope else 0.0,
                   "resolution": syn.resolution, "latent_prior": syn.latent_prior, "visual_guidance":
                   cfg.guidance.enabled}
        return [
            SyntheticRecord(
                key=w.key, label=w.label, class_name=w.class_name, image=img,
                meta={"source_sample_id": w.sample_id, "replica": w.replica, "prompt": p,
                      "negative_prompt": syn.negative_prompt, "seed": s, "sampler": sampler,
                      "base_model": cfg.models.base, "base_model_hash": self.base_hash,
                      "adapter_scope": scope, "adapter_hash": self.adapters.get(scope) if scope else None},
            )
            for w, img, p, s in zip(items, to_pil(out.images), prompts, seeds, strict=True)
        ]

    def _batches(self, items: Sequence[WorkItem]) -> list[Sequence[WorkItem]]:
        # planned with the batch size that fits so far (an out-of-memory split lowers it for later calls; within
        # this call the split itself halves the batch). Per-class adapters: a batch never mixes classes.
        per_class = bool(self.adapters) and self.cfg.finetune.scope == "per_class"
        bs, out, i = self.max_batch, [], 0
        while i < len(items):
            j = i
            while j < len(items) and j - i < bs and (not per_class or items[j].label == items[i].label):
                j += 1
            out.append(items[i:j])
            i = j
        return out

    def _load_sources(self, items: Sequence[WorkItem]) -> list:
        if not self.cfg.synthesis.latent_prior:
            return []
        res, fit = self.cfg.synthesis.resolution, self.cfg.synthesis.source_resize
        return [load_real_image(_as_sample(w), res, self.storage_options, fit=fit) for w in items]

    def _generate_or_split(self, items: Sequence[WorkItem], sources: list | None = None) -> list[SyntheticRecord]:
        """Generate a batch; on GPU out-of-memory empty the cache and retry it in halves, down to one image."""
        try:
            return self._generate_batch(items, sources)
        except torch.cuda.OutOfMemoryError as e:
            if len(items) == 1:
                raise torch.cuda.OutOfMemoryError(
                    f"GPU out of memory generating a single image ({items[0].key}) at synthesis.resolution="
                    f"{self.cfg.synthesis.resolution}; lower the resolution or use a GPU with more memory. "
                    f"Cause: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                ) from e
            err = str(e).splitlines()[0] if str(e) else type(e).__name__
        # outside the except block: the exception's frames (and the tensors they hold) are released first
        _release_gpu_memory(self.device)
        half = (len(items) + 1) // 2
        self.max_batch = min(self.max_batch, half)
        self.oom_retries += 1
        log.warning("GPU out of memory on a batch of %d images (%s); cache emptied, retrying as %d + %d; later "
                    "batches use at most %d", len(items), err, half, len(items) - half, self.max_batch)
        first, second = (sources[:half], sources[half:]) if sources else (None, None)
        return self._generate_or_split(items[:half], first) + self._generate_or_split(items[half:], second)

    def generate(self, items: Sequence[WorkItem]) -> Iterator[SyntheticRecord]:
        """Generate in batches of at most ``max_batch``; the next batch's source images load meanwhile."""
        from concurrent.futures import ThreadPoolExecutor

        batches = self._batches(items)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._load_sources, batches[0]) if batches else None
            for k, batch in enumerate(batches):
                sources = pending.result()
                if k + 1 < len(batches):
                    pending = pool.submit(self._load_sources, batches[k + 1])
                yield from self._generate_or_split(batch, sources)


def _release_gpu_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _as_sample(w: WorkItem):
    from realfake.data.manifest import RealSample

    return RealSample(w.sample_id, "train", w.label, w.class_name, w.uri, "", 0, 0)


def synthesize(cfg: BuildConfig, store: Store, shard_names: Sequence[str] | None = None,
               engine: SynthesisEngine | None = None, mode: str | None = None, lease=None,
               on_shard: Callable[[str, int, float], None] | None = None, progress: bool = False,
               storage_options: dict | None = None, recipe: dict[str, Any] | None = None,
               group: GroupPlan | None = None) -> dict:
    """Write and commit the shards of a version that are still missing (all, or those named).

    ``mode`` (default ``cfg.mode``) says what happens to committed shards made under another recipe (see
    :func:`synthesis_recipe` and :func:`~realfake.data.shards.plan_pending`): refused (resume, extend) or deleted
    and rebuilt (overwrite). ``recipe`` is ``synthesis_recipe(cfg, store)`` where the caller already computed it
    (computed here otherwise). ``group``: the named shards' part of the build's plan (:func:`read_group_plans`);
    then the version is not planned again, only the group's own shards' leftovers are removed and its committed
    shards skipped. Returns counts and timings: shards written and skipped, images, seconds, images/s.
    """
    t0 = time.time()
    if group is not None and shard_names is not None:
        pending, recipe, total = group_pending(store, group, shard_names, lease), group.recipe, group.shards_total
    else:
        items = plan_work(cfg, store)
        recipe = recipe if recipe is not None else synthesis_recipe(cfg, store)
        pending = plan_pending(store, items, key=lambda w: w.key, max_count=cfg.shards.max_count,
                               mode=mode or cfg.mode, lease=lease, recipe=recipe, may_grow=MAY_GROW,
                               may_drop=may_drop(cfg), shards=shard_names)
        if shard_names is not None:
            wanted = set(shard_names)
            pending = [p for p in pending if p.name in wanted]
        total = len(plan_shards(items, cfg.shards.max_count))
    writer = ShardWriter(store, cfg.shards, class_names=list(recipe["class names"].values()), lease=lease)
    if pending and engine is None:
        engine = SynthesisEngine(cfg, store, storage_options=storage_options)
    # quality gates score each image before its shard commits and make the failing ones again (realfake.quality)
    gate = QualityGate(cfg, store, storage_options=storage_options) if pending and cfg.quality.gated else None

    def produce(plan) -> Iterator[SyntheticRecord]:
        made = engine.generate(list(plan.items))  # type: ignore[union-attr]
        return gate.run(engine, plan.items, made) if gate is not None else made

    images = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(p.items) for p in pending), desc="synthesize", unit="img")
    ahead = _GenerateAhead(produce, pending, 2 * engine.max_batch) if pending and cfg.synthesis.overlap_writes \
        else None
    try:
        for plan in pending:
            s0 = time.time()
            records = ahead.records() if ahead else produce(plan)
            if bar is not None:
                records = _counting(records, bar)
            images += writer.write_shard(plan.name, records).count
            if on_shard is not None:
                on_shard(plan.name, len(plan.items), time.time() - s0)
    finally:
        if ahead is not None:
            ahead.close()
        if bar is not None:
            bar.close()
    seconds = time.time() - t0
    return {"shards_written": [p.name for p in pending], "shards_total": total, "images": images,
            "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 3) if images else 0.0,
            "oom_retries": getattr(engine, "oom_retries", 0),
            **({"quality_gate": gate.stats.to_dict()} if gate is not None else {})}


def group_pending(store: Store, group: GroupPlan, shard_names: Sequence[str], lease=None) -> list[ShardPlan]:
    """What a shard group still has to write of its part of the build's plan: its shards' leftovers removed (only
    theirs, other groups write meanwhile), its committed shards skipped (a retried or resumed group)."""
    from realfake.data.shards.reader import commit_records

    if lease is not None:
        lease.check()
    remove_partial_shards(store, "synthetic", set(shard_names))
    done = {c.name for c in commit_records(store, shard_names)}
    return [p for p in group.plans if p.name not in done]


class _GenerateAhead:
    """The engine runs over every pending shard on a background thread, up to ``depth`` records ahead.

    While the writer encodes, hashes and uploads one batch (CPU and network work, mostly outside the GIL), the
    engine computes the next. Records reach the writer in plan order, shard by shard, so the output is the same
    as without it. An engine error is raised in the writer's thread at the record it would have produced; a
    writer error (or the end of the run) stops the engine at its next record.
    """

    _END = object()

    def __init__(self, produce: Callable[[Any], Iterator[SyntheticRecord]], plans: Sequence, depth: int) -> None:
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce, list(plans)), name="realfake-generate",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce: Callable[[Any], Iterator[SyntheticRecord]], plans: list) -> None:
        try:
            for plan in plans:
                for rec in produce(plan):
                    if not self._put(rec):
                        return
                if not self._put(self._END):
                    return
        except BaseException as e:  # handed to the writer's thread, which raises it
            self._put(_Failed(e))

    def records(self) -> Iterator[SyntheticRecord]:
        """The next shard's records."""
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the engine thread (after the batch it is computing) and wait for it."""
        self._stop.set()
        self._thread.join(timeout=600)
        if self._thread.is_alive():
            log.warning("the generation thread did not stop within 600 s of the writer ending")


@dataclass
class _Failed:
    error: BaseException


def _counting(records, bar):
    for r in records:
        bar.update(1)
        yield r

