"""The privacy audits of a dataset version, end to end: LiRA over shadow pipelines, and copy detection.

:mod:`realfake.privacy.lira` and :mod:`realfake.privacy.copydetect` score and report; this module produces
what they score. For membership inference it draws the shadow membership of the version's real training set
(:func:`plan_lira`), builds each synthetic shadow as a dataset version of its own, ``{version}-shadow{i}``,
whose manifest is the parent's restricted to the shadow's half (:func:`derive_shadow_version`; the parent's
test split and its guidance / caption rows of the half are carried over, so nothing is re-ingested or
re-embedded), fine-tunes, synthesizes, finalizes and verifies it with the ordinary build stages, and trains a
classifier on its synthetic images (:func:`run_synthetic_shadow`); the real family trains the same classifier
on each real half directly (:func:`run_real_shadow`). Every shadow stores its logits on the whole real
training set under ``runs/privacy-lira/logits/``, keyed by a fingerprint of everything that made it, so
re-runs skip finished shadows and a changed recipe never mixes with stale ones. :func:`score_lira` then runs
online and offline LiRA per family and writes the table and log-log ROC. :func:`run_lira` and
:func:`run_copy_detection` are the sequential entry points; the Prefect flow fans the same calls out.

Training a shadow seeds and draws from this process's torch, numpy and python generators (initial weights, each
image's augmentation, dropout), so the shadows of one process run one at a time whatever thread calls them: two
at once would interleave their draws and each would depend on the other's timing. Shadows run in parallel in
processes of their own: ``python -m realfake.privacy.audit`` trains one (:func:`main`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.utils.data

from realfake.config import BuildConfig
from realfake.data.manifest import CAPTIONS, GUIDANCE, MANIFEST, MANIFEST_SCHEMA, REJECTS, RealSample, read_manifest
from realfake.data.storage import Store
from realfake.privacy.config import CopyDetectionConfig, LiraConfig, PrivacyConfig, ShadowFamily

__all__ = [
    "COPY_RUN",
    "CopyDetectionConfig",
    "LIRA_RUN",
    "LiraConfig",
    "PrivacyConfig",
    "SHADOW_RUNNERS",
    "ShadowFamily",
    "copy_descriptor",
    "derive_shadow_version",
    "main",
    "one_shadow_at_a_time",
    "plan_lira",
    "real_logits",
    "run_copy_detection",
    "run_lira",
    "run_real_shadow",
    "run_synthetic_shadow",
    "score_lira",
    "shadow_config",
    "shadow_membership",
    "shadow_version",
]

log = logging.getLogger(__name__)

LIRA_RUN = ("runs", "privacy-lira")
COPY_RUN = ("runs", "privacy-copy")
_LABELS = {"real": "real-trained", "synthetic": "synthetic-trained"}
_ONE_SHADOW = threading.RLock()  # held by the shadow training in this process (see the module's docstring)


# -- shadow versions -------------------------------------------------------------------------------------


def _store(cfg: BuildConfig, storage_options: dict | None) -> Store:
    from realfake.build import store_of

    return store_of(cfg, storage_options)


def shadow_version(cfg: BuildConfig, index: int) -> str:
    """Name of the synthetic shadow version ``index`` of ``cfg``'s version: ``{version}-shadow{index}``."""
    return f"{cfg.version}-shadow{index}"


def shadow_config(cfg: BuildConfig, index: int) -> BuildConfig:
    """The build config of synthetic shadow ``index``: the same recipe under its own version and seeds.

    Fine-tuning and classifier seeds are offset by the index so shadows differ in their randomness as well as
    in their data, as independently trained models do; synthesis seeds already derive from the version name.
    """
    data = cfg.model_dump()
    data["version"] = shadow_version(cfg, index)
    data["finetune"]["seed"] = cfg.finetune.seed + index
    data["classifier"]["seed"] = cfg.classifier.seed + index
    return BuildConfig.model_validate(data)


def _ensure_prepared(cfg: BuildConfig, progress: bool, storage_options: dict | None) -> Store:
    """The parent version's store, prepared (manifest, guidance, captions) if it is not yet."""
    from realfake.build import prepare

    store = _store(cfg, storage_options)
    needed = [MANIFEST] + [GUIDANCE] * cfg.guidance.enabled + [CAPTIONS] * cfg.caption.enabled
    if not all(store.exists(*parts) for parts in needed):
        # Ingest is deterministic and the feature stages skip what exists, so this completes a partial prepare.
        log.info("privacy audit: %s is not fully prepared, running the prepare stage", store.uri())
        prepare(cfg, progress, storage_options)
    return store


def _filter_rows(store: Store, parts: tuple[str, str], keep: set[str]) -> pa.Table | None:
    if not store.exists(*parts):
        return None
    table = store.read_table(*parts)
    ids = table.column("sample_id").to_pylist()
    return table.filter(pa.array([i in keep for i in ids]))


def derive_shadow_version(parent: Store, shadow: Store, member_ids: list[str]) -> dict[str, int]:
    """Write the real data of a shadow version: the parent's manifest restricted to ``member_ids``.

    The shadow keeps only the training rows of its half and every test row (its classifier is tested on the
    same real test split), plus the parent's rejects and the guidance / caption rows of its half, in
    manifest order. Those rows are exactly what the prepare stage would compute for the half (same images,
    same models), so the shadow skips ingest and embedding; the later stages read it like any version.

    Args:
        parent: Store of the prepared parent version.
        shadow: Store of the shadow version (written once; a re-run checks it instead).
        member_ids: Sample ids of the parent's training split this shadow trains on.

    Returns:
        Counts of the shadow's ``train`` and ``test`` rows.

    Raises:
        ValueError: an id is not in the parent's training split, or the shadow version already holds a
            different half (versions are immutable: remove it or audit under another version name).
    """
    keep = set(member_ids)
    rows = read_manifest(parent)
    train_ids = {s.sample_id for s in rows if s.split == "train"}
    unknown = keep - train_ids
    if unknown:
        raise ValueError(
            f"{len(unknown)} shadow member id(s) are not training images of {parent.uri(*MANIFEST)}, "
            f"e.g. {sorted(unknown)[:3]}"
        )
    if shadow.exists(*MANIFEST):
        have = {s.sample_id for s in read_manifest(shadow, "train")}
        if have != keep:
            raise ValueError(
                f"shadow version {shadow.uri()} already holds another training half ({len(have)} images, "
                f"{len(have ^ keep)} differ from the planned {len(keep)}); versions are immutable: delete it or "
                "run the audit under another version name"
            )
        n_test = sum(s.split == "test" for s in read_manifest(shadow))
        return {"train": len(have), "test": n_test}
    selected = [s for s in rows if s.split == "test" or s.sample_id in keep]
    table = pa.Table.from_pylist([vars(s) for s in selected], schema=MANIFEST_SCHEMA)
    # Features first, manifest last: a shadow with a manifest is complete, like a prepared version.
    for parts in (GUIDANCE, CAPTIONS):
        sub = _filter_rows(parent, parts, keep)
        if sub is not None:
            shadow.write_table(sub, *parts)
    if parent.exists(*REJECTS):
        shadow.write_bytes(parent.read_bytes(*REJECTS), *REJECTS)
    shadow.write_table(table, *MANIFEST)
    return {"train": len(keep), "test": sum(s.split == "test" for s in selected)}


# -- the plan --------------------------------------------------------------------------------------------


def _run_store(cfg: BuildConfig, storage_options: dict | None, run: tuple[str, str] = LIRA_RUN) -> Store:
    return _store(cfg, storage_options).child(*run)


def plan_lira(cfg: BuildConfig, lira: LiraConfig, progress: bool = False,
              storage_options: dict | None = None) -> dict[str, Any]:
    """Prepare the parent version if needed and write the shadow membership of its real training set.

    Writes ``runs/privacy-lira/membership.parquet`` (one row per training image: ``sample_id``, ``label`` and
    ``shadow_in``, the list of shadows that train on it) and ``plan.json``. The membership is a pure function
    of the manifest and the LiRA settings (:func:`realfake.privacy.lira.shadow_splits`), so every worker and
    every re-run draws the same halves.

    Returns:
        The plan written to ``plan.json``: ``n_train``, ``n_shadows``, ``families``, ``split_seed``, ``paired``,
        ``version`` and ``shadow_versions``.
    """
    from realfake.privacy.lira import shadow_splits

    store = _ensure_prepared(cfg, progress, storage_options)
    samples = read_manifest(store, "train")
    if len(samples) < 2:
        raise ValueError(f"{store.uri(*MANIFEST)} has {len(samples)} training image(s); LiRA needs at least 2")
    mask = shadow_splits(len(samples), lira.n_shadows, lira.split_seed, paired=lira.paired)
    if (mask.sum(axis=1) == 0).any():
        raise ValueError(f"a shadow drew an empty half of {len(samples)} images; use more training images")
    run = _run_store(cfg, storage_options)
    run.write_table(
        pa.table(
            {
                "sample_id": [s.sample_id for s in samples],
                "label": pa.array([s.label for s in samples], pa.int32()),
                "shadow_in": [np.flatnonzero(mask[:, j]).astype(np.int32).tolist() for j in range(len(samples))],
            }
        ),
        "membership.parquet",
    )
    plan = {"n_train": len(samples), "n_shadows": lira.n_shadows, "families": list(lira.families),
            "split_seed": lira.split_seed, "paired": lira.paired, "version": store.uri(),
            "shadow_versions": [shadow_version(cfg, i) for i in range(lira.n_shadows)]
            if "synthetic" in lira.families else []}
    run.write_json(plan, "plan.json")
    return plan


def shadow_membership(cfg: BuildConfig, lira: LiraConfig,
                      storage_options: dict | None = None) -> tuple[list[RealSample], np.ndarray]:
    """The parent's training samples (manifest order) and the shadow mask ``[n_shadows, n]`` over them."""
    from realfake.privacy.lira import shadow_splits

    samples = read_manifest(_store(cfg, storage_options), "train")
    return samples, shadow_splits(len(samples), lira.n_shadows, lira.split_seed, paired=lira.paired)


# -- shadow models ---------------------------------------------------------------------------------------


@torch.inference_mode()
def real_logits(model: torch.nn.Module, dataset: torch.utils.data.Dataset, device: torch.device,
                batch_size: int = 256) -> np.ndarray:
    """Raw logits ``[n, n_classes]`` (float32) of a trained :class:`~realfake.classify.Classifier` on
    ``dataset``, preprocessed with the classifier's own evaluation transform, in dataset order.

    LiRA needs logits, not softmax outputs: a confident member's ``1 - p`` underflows in float32.
    """
    transform = model.eval_transform

    def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([transform(img) for img, _ in batch]), torch.tensor([y for _, y in batch])

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    model.eval().to(device)
    out = [model(x.to(device)).float().cpu() for x, _ in loader]
    return torch.cat(out).numpy()


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _logits_name(family: str, index: int) -> str:
    return f"{family}-{index:03d}.npz"


def _load_logits(run: Store, family: str, index: int, fingerprint: str | None) -> dict[str, Any] | None:
    """The stored logits of one shadow, or None when absent or made by another recipe / membership."""
    name = _logits_name(family, index)
    if not run.exists("logits", name):
        return None
    with np.load(io.BytesIO(run.read_bytes("logits", name)), allow_pickle=False) as z:
        found = str(z["fingerprint"])
        if fingerprint is not None and found != fingerprint:
            return None
        return {"logits": z["logits"], "fingerprint": found, "summary": json.loads(str(z["summary"]))}


def _save_logits(run: Store, family: str, index: int, logits: np.ndarray, fingerprint: str,
                 summary: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, logits=logits.astype(np.float32), fingerprint=np.array(fingerprint),
                        summary=np.array(json.dumps(summary, sort_keys=True, default=str)))
    run.write_bytes(buf.getvalue(), "logits", _logits_name(family, index))


def _train_and_score(train_set: torch.utils.data.Dataset, cfg: BuildConfig, parent: Store, num_classes: int,
                     lira: LiraConfig, progress: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """Train ``cfg.classifier`` on ``train_set``; logits on the parent's real training set, test accuracy."""
    from realfake.classify import evaluate, train_classifier
    from realfake.data.loaders import RealImages
    from realfake.models.loading import resolve_device

    device = resolve_device(cfg.device)
    t0 = time.time()
    model = train_classifier(train_set, num_classes, cfg.classifier, device=device, progress=progress)
    train_s = time.time() - t0
    logits = real_logits(model, RealImages(parent, "train"), device, lira.batch_size)
    test = evaluate(model, RealImages(parent, "test"), num_classes, device=device, batch_size=lira.batch_size)
    return logits, {"train_images": len(train_set), "test_top1": test["top1"], "train_s": round(train_s, 2)}


@contextmanager
def one_shadow_at_a_time(what: str) -> Iterator[None]:
    """Hold this process's shadow lock for the block: a shadow draws from process-wide random generators.

    The shadow pipelines take it around their training; a caller may take it earlier (the Prefect task takes it
    before its GPU slot, so a waiting shadow holds none). Reentrant in one thread; ``what`` names the waiter.
    """
    if not _ONE_SHADOW.acquire(blocking=False):
        log.info("%s waits for the shadow training in this process (one at a time: they share its random "
                 "generators)", what)
        _ONE_SHADOW.acquire()
    try:
        yield
    finally:
        _ONE_SHADOW.release()


def _num_classes(parent: Store) -> int:
    return len({s.label for s in read_manifest(parent)})


def _shadow_key(cfg: BuildConfig, family: str, index: int, member_ids: list[str], all_ids: list[str]) -> str:
    recipe: dict[str, Any] = {"classifier": cfg.classifier.model_dump(mode="json")}
    if family == "synthetic":
        recipe.update({k: getattr(cfg, k).model_dump(mode="json")
                       for k in ("models", "caption", "guidance", "finetune", "synthesis")})
    return _fingerprint({"family": family, "index": index, "members": member_ids, "targets": all_ids, **recipe})


def run_real_shadow(cfg: BuildConfig, lira: LiraConfig, index: int, progress: bool = False,
                    storage_options: dict | None = None) -> dict[str, Any]:
    """Train real shadow ``index`` on its half of the real training set; store its logits on all of it.

    Skipped when logits made by the same recipe and half are already stored.

    Returns:
        ``family``, ``index``, ``members``, ``test_top1``, ``train_s`` and ``skipped``.
    """
    from realfake.data.loaders import RealImages

    parent = _store(cfg, storage_options)
    samples, mask = shadow_membership(cfg, lira, storage_options)
    members = np.flatnonzero(mask[index]).tolist()
    ids = [s.sample_id for s in samples]
    shadow_cfg = shadow_config(cfg, index)
    key = _shadow_key(shadow_cfg, "real", index, [ids[j] for j in members], ids)
    run = _run_store(cfg, storage_options)
    done = _load_logits(run, "real", index, key)
    if done is not None:
        return done["summary"] | {"skipped": True}
    train_set = torch.utils.data.Subset(RealImages(parent, "train"), members)
    with one_shadow_at_a_time(f"real shadow {index}"):
        logits, info = _train_and_score(train_set, shadow_cfg, parent, _num_classes(parent), lira, progress)
    summary = {"family": "real", "index": index, "members": len(members), **info}
    _save_logits(run, "real", index, logits, key, summary)
    log.info("real shadow %d: %d images, test top-1 %.3f", index, len(members), info["test_top1"])
    return summary | {"skipped": False}


def _build_shadow_version(shadow_cfg: BuildConfig, progress: bool, storage_options: dict | None) -> dict[str, Any]:
    """Fine-tune, synthesize and finalize a derived shadow version with the build's stages (its manifest is
    derived, so no prepare); skip a verified one."""
    from dataclasses import replace

    from realfake import build
    from realfake.data.card import verify_version

    store = build.store_of(shadow_cfg, storage_options)
    if store.exists("dataset.json") and not verify_version(store):
        return {"uri": store.uri(), "skipped": True}
    t0 = time.time()
    stages = build.local_stages(progress, storage_options)
    stages = replace(stages, prepare=None, finalize=lambda c, stats: build.finalize(
        c, stats | {"privacy_shadow": True}, storage_options, verify=False))
    built = build.build_version(shadow_cfg, storage_options=storage_options, stages=stages)
    return {"uri": store.uri(), "skipped": False, "images": built["synthesis"].get("images"),
            "seconds": round(time.time() - t0, 2)}


def run_synthetic_shadow(cfg: BuildConfig, lira: LiraConfig, index: int, progress: bool = False,
                         storage_options: dict | None = None) -> dict[str, Any]:
    """One synthetic shadow pipeline: derive ``{version}-shadow{index}`` from its half, fine-tune, synthesize,
    finalize, then train the classifier on its synthetic images and store its logits on the real training set.

    Each step skips what is already done (verified shadow version, stored logits of the same recipe), so a
    retried shadow resumes.

    Returns:
        ``family``, ``index``, ``members``, ``shadow_version`` (URI), ``synthetic_images``, ``test_top1``,
        ``train_s`` and ``skipped``.
    """
    from realfake.build import store_of, synthetic_dataset

    parent = _store(cfg, storage_options)
    samples, mask = shadow_membership(cfg, lira, storage_options)
    ids = [s.sample_id for s in samples]
    member_ids = [ids[j] for j in np.flatnonzero(mask[index])]
    shadow_cfg = shadow_config(cfg, index)
    key = _shadow_key(shadow_cfg, "synthetic", index, member_ids, ids)
    run = _run_store(cfg, storage_options)
    done = _load_logits(run, "synthetic", index, key)
    if done is not None:
        return done["summary"] | {"skipped": True}
    shadow = store_of(shadow_cfg, storage_options)
    derive_shadow_version(parent, shadow, member_ids)
    # Fine-tuning and synthesis draw from the same generators as the classifier's training.
    with one_shadow_at_a_time(f"synthetic shadow {index}"):
        built = _build_shadow_version(shadow_cfg, progress, storage_options)
        train_set = synthetic_dataset(shadow)
        logits, info = _train_and_score(train_set, shadow_cfg, parent, _num_classes(parent), lira, progress)
    summary = {"family": "synthetic", "index": index, "members": len(member_ids), "shadow_version": shadow.uri(),
               "synthetic_images": len(train_set), "version_skipped": built["skipped"], **info}
    _save_logits(run, "synthetic", index, logits, key, summary)
    log.info("synthetic shadow %d: %d real -> %d synthetic images, test top-1 %.3f", index, len(member_ids),
             len(train_set), info["test_top1"])
    return summary | {"skipped": False}


SHADOW_RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {"real": run_real_shadow,
                                                             "synthetic": run_synthetic_shadow}
"""Family -> the function that runs one shadow pipeline of it."""


# -- scoring ---------------------------------------------------------------------------------------------


def score_lira(cfg: BuildConfig, lira: LiraConfig, storage_options: dict | None = None) -> dict[str, Any]:
    """Attack every stored shadow family with online and offline LiRA and write the report.

    Every model of a family is a target in turn, with the family's other models as its shadows
    (:func:`realfake.privacy.lira.lira_attack`). Writes ``lira_results.md`` / ``.json`` and ``lira_roc.png``
    (:func:`realfake.privacy.lira.lira_report`) and ``shadows.json`` (each shadow's test accuracy) into
    ``runs/privacy-lira/``.

    Returns:
        ``table`` (markdown), ``metrics`` (row name -> AUC and TPRs), ``shadows`` (family -> summaries),
        ``files`` (kind -> URI).

    Raises:
        FileNotFoundError: a shadow's logits are missing or were made by another recipe or half.
    """
    from realfake.privacy.lira import lira_attack, lira_report, logit_confidence, roc_metrics, tpr_key

    samples, mask = shadow_membership(cfg, lira, storage_options)
    ids = [s.sample_id for s in samples]
    labels = np.array([s.label for s in samples])
    run = _run_store(cfg, storage_options)
    rows: dict[str, dict[str, Any]] = {}
    shadows: dict[str, list[dict[str, Any]]] = {}
    for family in lira.families:
        logits, summaries = [], []
        for i in range(lira.n_shadows):
            member_ids = [ids[j] for j in np.flatnonzero(mask[i])]
            key = _shadow_key(shadow_config(cfg, i), family, i, member_ids, ids)
            got = _load_logits(run, family, i, key)
            if got is None:
                raise FileNotFoundError(
                    f"{run.uri('logits', _logits_name(family, i))}: no logits of {family} shadow {i} for this "
                    "recipe and membership; run that shadow first (run_lira runs all of them)"
                )
            logits.append(got["logits"])
            summaries.append(got["summary"])
        conf = np.stack([logit_confidence(z, labels) for z in logits])  # [n_shadows, n]
        for online in (True, False):
            scores, members = lira_attack(conf, mask, online=online, fixed_variance=lira.fixed_variance,
                                          min_std=lira.min_std)
            rows[f"{_LABELS[family]} ({'online' if online else 'offline'})"] = roc_metrics(scores, members)
        shadows[family] = summaries
    settings = {"n_shadows": lira.n_shadows, "n_train": len(ids), "split_seed": lira.split_seed,
                "paired": lira.paired, "fixed_variance": lira.fixed_variance, "min_std": lira.min_std,
                "protocol": "leave-one-model-out", "version": _store(cfg, storage_options).uri(),
                "shadow_test_top1": {f: [s["test_top1"] for s in v] for f, v in shadows.items()}}
    report = lira_report(rows, run, title=f"Membership inference (LiRA) on {cfg.dataset}/{cfg.version}",
                         settings=settings)
    run.write_json(shadows, "shadows.json")
    keys = ["auc", *(tpr_key(f) for f in (0.001, 0.01)), "balanced_accuracy"]
    metrics = {name: {k: m[k] for k in keys} for name, m in rows.items()}
    accuracy = {f: float(np.mean([s["test_top1"] for s in v])) for f, v in shadows.items()}
    table = report["table"] + "\nMean real-test top-1 of the shadow classifiers: " + ", ".join(
        f"{_LABELS[f]} {a:.3f}" for f, a in accuracy.items()) + "\n"
    files = report["files"] | {"shadows": run.uri("shadows.json"), "membership": run.uri("membership.parquet")}
    return {"table": table, "metrics": metrics, "shadow_test_top1": accuracy, "shadows": shadows,
            "n_train": len(ids), "files": files}


def run_lira(cfg: BuildConfig, privacy_cfg: PrivacyConfig | LiraConfig, progress: bool = False,
             storage_options: dict | None = None) -> dict[str, Any]:
    """The whole LiRA audit in this process: plan, every shadow of every family, then the scores.

    Args:
        cfg: The build config of the audited version (its recipe is the shadows' recipe).
        privacy_cfg: The audit settings (a :class:`PrivacyConfig`, or its ``lira`` part).
        progress: Progress bars in the stages.
        storage_options: fsspec options of the storage root.

    Returns:
        The :func:`score_lira` result plus ``seconds``.
    """
    lira = privacy_cfg.lira if isinstance(privacy_cfg, PrivacyConfig) else privacy_cfg
    t0 = time.time()
    plan_lira(cfg, lira, progress, storage_options)
    for family in lira.families:
        for i in range(lira.n_shadows):
            SHADOW_RUNNERS[family](cfg, lira, i, progress, storage_options)
    out = score_lira(cfg, lira, storage_options)
    out["seconds"] = round(time.time() - t0, 2)
    return out


# -- copy detection --------------------------------------------------------------------------------------


def copy_descriptor(cfg: BuildConfig, copy: CopyDetectionConfig):
    """The :class:`~realfake.privacy.copydetect.Descriptor` the settings name, on the build's device.

    ``auto`` is SSCD when ``descriptor_path`` is its TorchScript file, else the fallback ``clip``
    (:func:`~realfake.privacy.copydetect.resolve_descriptor_kind`). ``clip`` without a path uses the build's own
    CLIP model through the production loader (which also resolves the demo's cached base); a folder or hub id in
    ``descriptor_path`` is loaded the same way.
    """
    from realfake.models.loading import resolve_device
    from realfake.privacy.copydetect import Descriptor, build_descriptor, resolve_descriptor_kind

    device = resolve_device(cfg.device)
    kind = resolve_descriptor_kind(copy.descriptor, copy.descriptor_path)
    if kind != "clip":
        return build_descriptor(kind, copy.descriptor_path, copy.descriptor_model, device)
    from realfake.models.loading import load_clip_vision

    model_id = copy.descriptor_path or cfg.models.clip
    revision = None if copy.descriptor_path else cfg.models.clip_revision
    model, processor = load_clip_vision(model_id, revision, device)
    size = int(model.config.image_size)  # what its position embeddings were trained at
    return Descriptor(
        name=f"clip:{model_id}",
        model=lambda x: model(pixel_values=x).image_embeds,
        size=size,
        resize="center_crop",
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        device=device,
        kind="clip",
    )


class _SyntheticImages:
    """Random access to committed synthetic images by position, reading only the shard that holds one."""

    def __init__(self, store: Store) -> None:
        from realfake.data.shards import committed_keys, committed_shards

        self.store = store
        self.commits = {c.name: c for c in committed_shards(store)}
        self.where: list[tuple[str, str]] = [(name, k) for name, keys in committed_keys(store).items() for k in keys]

    def __len__(self) -> int:
        return len(self.where)

    def __iter__(self):
        from realfake.data.shards import iter_synthetic

        for img, _, meta in iter_synthetic(self.store):
            yield img, meta

    def __call__(self, i: int):
        from PIL import Image

        from realfake.data.shards import iter_shard

        name, key = self.where[i]
        for s in iter_shard(self.store.child("synthetic"), self.commits[name], check=False):
            if s.key == key:
                img = Image.open(io.BytesIO(s.image))
                img.load()
                return img
        raise KeyError(f"synthetic image {key} is not in shard {name} of {self.store.uri()}")


def run_copy_detection(cfg: BuildConfig, privacy_cfg: PrivacyConfig | CopyDetectionConfig,
                       progress: bool = False, storage_options: dict | None = None) -> dict[str, Any]:
    """Embed every synthetic image of the version and every real training image, and write the copy report.

    Writes into ``runs/privacy-copy/`` what :func:`realfake.privacy.copydetect.copy_report` writes (summary
    JSON, neighbour table, similarity histogram, closest-pairs grid). Because every Real-Fake image is made
    from one real image, the summary adds ``share_nearest_is_source``: how often the nearest real image is the
    image the synthetic one was generated from (chance is about ``1 / n_real``); high values with low
    similarities mean the generator keeps each source's layout without copying it.

    Returns:
        The report summary (``CopyReport.to_dict()``) plus ``share_nearest_is_source``, ``chance`` and
        ``seconds``.

    Raises:
        FileNotFoundError: the version has no committed synthetic images (build it first).
    """
    from realfake.data.loaders import RealImages
    from realfake.privacy.copydetect import copy_report, embed_images, l2_normalize, resolve_threshold

    copy = privacy_cfg.copy_detection if isinstance(privacy_cfg, PrivacyConfig) else privacy_cfg
    t0 = time.time()
    store = _store(cfg, storage_options)
    synthetic = _SyntheticImages(store)
    if not len(synthetic):
        raise FileNotFoundError(f"{store.uri('synthetic')} holds no committed shards: build the version first")
    real = RealImages(store, "train")
    descriptor = copy_descriptor(cfg, copy)
    if descriptor.kind != "sscd":
        log.warning("copy detection uses the fallback descriptor %s, not SSCD (give copy_detection.descriptor_path "
                    "= the SSCD TorchScript file): its similarities are not calibrated for copies", descriptor.name)
        if copy.threshold is None and not (copy.reference and len(real) > 1):  # before any image is embedded
            resolve_threshold(descriptor.kind, None, None)
    center = copy.center if copy.center is not None else descriptor.kind != "sscd"

    def stream(images, what: str):
        if progress:
            from tqdm import tqdm

            return tqdm(images, desc=f"embed {what}", unit="img")
        return images

    sources: list[str] = []
    keys: list[str] = []

    def synthetic_stream():
        for img, meta in synthetic:
            keys.append(str(meta.get("key")))
            sources.append(str(meta.get("source_sample_id")))
            yield img

    syn_raw = embed_images(stream(synthetic_stream(), "synthetic"), descriptor, copy.batch_size, normalize=False)
    real_raw = embed_images(stream((real[i][0] for i in range(len(real))), "real"), descriptor, copy.batch_size,
                            normalize=False)
    if keys != [k for _, k in synthetic.where]:
        # The pair grid looks images up by position: shards must not change between listing and reading.
        raise RuntimeError(f"the committed shards of {store.uri('synthetic')} changed during copy detection; re-run")
    mean = real_raw.mean(axis=0) if center else None
    real_ids = [s.sample_id for s in real.samples]
    out = _run_store(cfg, storage_options, COPY_RUN)
    report = copy_report(
        l2_normalize(syn_raw, mean), l2_normalize(real_raw, mean), out, threshold=copy.threshold, k=copy.top_k,
        syn_ids=keys, real_ids=real_ids, syn_images=synthetic, real_images=lambda i: real[i][0],
        n_pairs=copy.n_pairs, reference=copy.reference and len(real) > 1, descriptor_name=descriptor.name,
        device=descriptor.device, descriptor_kind=descriptor.kind,
    ).to_dict()
    neighbours = out.read_table("copy_neighbours.parquet").to_pylist()
    top1 = {r["syn_id"]: r["real_id"] for r in neighbours if r["rank"] == 0}
    hits = sum(top1[k] == src for k, src in zip(keys, sources, strict=True))
    report.update(share_nearest_is_source=hits / len(keys), chance=1.0 / len(real_ids), centered=center,
                  seconds=round(time.time() - t0, 2))
    out.write_json(report, "copy_detection.json")
    log.info("copy detection on %s: nearest real is the source for %d/%d synthetic images", store.uri(), hits,
             len(keys))
    return report


# -- one shadow in a process of its own ------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m realfake.privacy.audit FAMILY INDEX CONFIG.json LIRA.json RESULT.json``: train one shadow.

    Runs shadow ``INDEX`` of ``FAMILY`` (:data:`SHADOW_RUNNERS`) with the build config and LiRA settings in the
    two JSON files and writes its result as JSON. The privacy flow starts one such process per shadow, pinned to
    one GPU with ``CUDA_VISIBLE_DEVICES``, when a node has several GPUs: shadows in separate processes train at
    the same time without sharing random generators. Returns the exit code.
    """
    from realfake.config import BuildConfig

    p = argparse.ArgumentParser(prog="python -m realfake.privacy.audit",
                                description="Train one LiRA shadow in this process and write its result as JSON.")
    p.add_argument("family", choices=sorted(SHADOW_RUNNERS))
    p.add_argument("index", type=int)
    p.add_argument("config", type=Path, help="The audited version's BuildConfig as JSON.")
    p.add_argument("lira", type=Path, help="The LiraConfig its plan was drawn with, as JSON.")
    p.add_argument("result", type=Path, help="Where the shadow's result is written, as JSON.")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = BuildConfig.model_validate_json(a.config.read_text())
    lira = LiraConfig.model_validate_json(a.lira.read_text())
    if not 0 <= a.index < lira.n_shadows:
        p.error(f"index {a.index} is outside 0..{lira.n_shadows - 1} (lira.n_shadows)")
    result = SHADOW_RUNNERS[a.family](cfg, lira, a.index)
    a.result.write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
