"""The stages of a build as plain functions, and their one composition.

Each stage takes a validated :class:`~realfake.config.BuildConfig`, reads and writes only through the
version's store, and returns a small JSON-able dict; the Prefect tasks in ``tasks/`` wrap exactly these
functions. Stages are idempotent: a re-run skips what the version already holds (manifest, embeddings,
adapters, committed shards). :func:`build_version` and :func:`build_and_report` compose them, once, for
every caller: the CLI (:func:`run_build`, stages called in this process), the build flow (its tasks as the
:class:`Stages`) and the privacy audit's shadow versions (without prepare).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

from realfake.config import BuildConfig
from realfake.data.storage import Store, resolve_storage_options, version_store

__all__ = [
    "BASELINE_PROMPTS",
    "BaselineKind",
    "Stages",
    "ablation_config",
    "baseline_config",
    "build_and_report",
    "build_version",
    "finalize",
    "finetune",
    "finetune_scopes",
    "local_stages",
    "measure_versions",
    "measures_path",
    "plan_synthesis",
    "prepare",
    "read_measures",
    "report_markdown",
    "run_build",
    "store_of",
    "synthesize",
    "synthetic_dataset",
    "train_eval",
    "verify_or_raise",
    "write_measures",
]

log = logging.getLogger(__name__)


def report_markdown(report: dict) -> str:
    """The comparison table of a :func:`run_build` report, as markdown."""
    from realfake.report import format_table

    return format_table(report)


def store_of(cfg: BuildConfig, storage_options: dict | None = None) -> Store:
    """The version's store; ``storage_options`` go over the config's ``storage`` section (endpoint, region, ...)."""
    return version_store(cfg.root, cfg.dataset, cfg.version, resolve_storage_options(cfg.storage, storage_options))


BaselineKind = Literal["caption", "class_name", "a_photo_of"]
BASELINE_PROMPTS: dict[str, str | None] = {
    # The authors' text-to-image baseline (paper G.5; generate.py method SDT2I, prompts from get_prompt): the build's
    # own prompt, BLIP-2 caption kept where the preset captions, and its prompt_suffix.
    "caption": None,
    "class_name": "{class_name}",  # the class name alone, no caption
    "a_photo_of": "a photo of {class_name}",  # CLIP's zero-shot template, no caption
}


def baseline_config(cfg: BuildConfig, kind: BaselineKind = "caption") -> BuildConfig:
    """The text-to-image baseline for the same data: the base generator without latent prior, LoRA, MMD or guidance.

    ``kind`` names its prompt (:data:`BASELINE_PROMPTS`): ``caption`` (default) is the authors' baseline, the
    build's own prompt template with the caption where the preset uses captions (``photo of {class}, {caption}``);
    ``class_name`` and ``a_photo_of`` are the usual weaker prompts, without captions. Every kind keeps
    ``synthesis.prompt_suffix`` and the negative prompt. The version is ``{version}-baseline`` for ``caption``,
    ``{version}-baseline-class-name`` / ``-a-photo-of`` for the others.
    """
    if kind not in BASELINE_PROMPTS:
        raise ValueError(f"baseline {kind!r} is unknown: use one of {', '.join(BASELINE_PROMPTS)}")
    suffix = "" if kind == "caption" else "-" + kind.replace("_", "-")
    base = ablation_config(cfg, latent_prior=False, lora=False, mmd=False, guidance=False,
                           version=f"{cfg.version}-baseline{suffix}")
    template = BASELINE_PROMPTS[kind]
    if template is None:
        return base
    data = base.model_dump()
    data["synthesis"]["prompt_template"] = template
    data["caption"]["enabled"] = False
    return BuildConfig.model_validate(data)


def ablation_config(cfg: BuildConfig, *, latent_prior: bool, lora: bool, mmd: bool, guidance: bool,
                    version: str) -> BuildConfig:
    """A copy of ``cfg`` with the method's parts switched on or off (the rows of the paper's ablation).

    Prompts and captions stay the build's in every row, as in the paper's ablation and the authors' baseline.
    """
    data = cfg.model_dump()
    data["version"] = version
    data["synthesis"]["latent_prior"] = latent_prior
    data["finetune"]["enabled"] = lora
    if not mmd:
        data["finetune"]["mmd_weight"] = 0.0
    data["guidance"]["enabled"] = guidance
    return BuildConfig.model_validate(data)


def prepare(cfg: BuildConfig, progress: bool = False, storage_options: dict | None = None) -> dict:
    """Ingest the source (manifest + rejects), then captions and guidance embeddings where enabled.

    In a version that already holds synthetic shards, a source whose class names differ from those the shards were
    made with is refused before anything is written, unless ``mode`` is overwrite (then synthesize rebuilds them).
    """
    storage_options = resolve_storage_options(cfg.storage, storage_options)
    store = store_of(cfg, storage_options)
    t0 = time.time()
    res = _ingest_under_shards(cfg, store, storage_options, progress)
    out: dict[str, Any] = {"train": res.train, "test": res.test, "rejects": res.rejects, "classes": res.classes,
                           "reject_reasons": res.reject_reasons, "normalised": res.normalised,
                           "ingest_warnings": res.warnings, "ingest_s": round(time.time() - t0, 2)}
    if cfg.caption.enabled:
        from realfake.caption import compute_captions

        out["captions"] = compute_captions(cfg, store, progress=progress, storage_options=storage_options)
    if cfg.guidance.enabled:
        from realfake.guidance import compute_guidance

        out["guidance"] = compute_guidance(cfg, store, progress=progress, storage_options=storage_options)
    out["seconds"] = round(time.time() - t0, 2)
    return out


def _ingest_under_shards(cfg: BuildConfig, store: Store, storage_options: dict | None, progress: bool):
    """Ingest into the version, or, when it holds committed shards, into a scratch folder first: the new manifest
    replaces the version's only if its class map is the one the shards were made with (see :func:`prepare`)."""
    import tempfile

    from realfake.data.ingest import ingest
    from realfake.data.manifest import MANIFEST, REJECTS
    from realfake.data.shards import committed_shards, read_recipe
    from realfake.recipe import RecipeMismatchError, manifest_class_map, recipe_diff, suggest_version

    commits = committed_shards(store) if cfg.mode != "overwrite" else []
    recorded = read_recipe(store) if commits else None
    if recorded is not None and "class names" in recorded:
        before = recorded["class names"]
    elif commits and store.exists(*MANIFEST):
        before = manifest_class_map(store)  # shards of an earlier realfake: made from the manifest they sit beside
    else:
        return ingest(cfg.source, store, storage_options, progress=progress)
    with tempfile.TemporaryDirectory(prefix="realfake-prepare-") as tmp:
        scratch = Store(tmp)
        try:
            res = ingest(cfg.source, scratch, storage_options, progress=progress)
        except FileNotFoundError as e:
            # its message points at the scratch rejects table, which is deleted on the way out: name the reasons
            if not scratch.exists(*REJECTS):
                raise
            from collections import Counter

            from realfake.data.images import reject_category

            reasons = Counter(reject_category(r) for r in scratch.read_table(*REJECTS).column("reason").to_pylist())
            shown = ", ".join(f"{n} {category}" for category, n in reasons.most_common())
            raise FileNotFoundError(
                f"source {cfg.source.uri} has no usable image in any class folder ({shown or 'nothing to read'}); "
                f"nothing was written to {store.uri()}, which holds committed shards: fix the source, or prepare a "
                f"new version (--set version={suggest_version(cfg.version)}) to get its rejects table") from e
        old, new = {"class names": before}, {"class names": manifest_class_map(scratch)}
        differ = recipe_diff(old, new, ("class names",) if cfg.mode == "extend" else ())
        if differ:
            grows_only = not recipe_diff(old, new, ("class names",))
            fix = "add the new classes to this version (--set mode=extend), " if grows_only else ""
            raise RecipeMismatchError(
                f"prepare: the {len(commits)} committed synthetic shard(s) of {store.uri()} were made with other "
                f"class names than the source gives now ({'; '.join(differ)}); nothing was written. To use the new "
                f"names, {fix}rebuild this version's images (--set mode=overwrite, for prepare and synthesize) or "
                f"write a new version (e.g. --set version={suggest_version(cfg.version)})")
        for parts in (MANIFEST, REJECTS):
            store.write_bytes(scratch.read_bytes(*parts), *parts)
    return res


def finetune_scopes(cfg: BuildConfig, storage_options: dict | None = None) -> list[str]:
    """``["all"]``, or one scope per class label for per-class adapters (none when fine-tuning is off)."""
    if not cfg.finetune.enabled:
        return []
    if cfg.finetune.scope == "all":
        return ["all"]
    from realfake.data.manifest import read_manifest

    return sorted({str(s.label) for s in read_manifest(store_of(cfg, storage_options), "train")}, key=int)


def finetune(cfg: BuildConfig, scope: str = "all", progress: bool = False, components: dict | None = None,
             storage_options: dict | None = None) -> dict:
    """Train one adapter unless the version already holds one trained with this exact recipe: the same finetune
    settings, base weights, training images, prompts and guidance vectors (an adapter logged without its recipe,
    by an earlier realfake, is trained again)."""
    from realfake.finetune import adapter_dir
    from realfake.finetune import finetune as train_adapter

    storage_options = resolve_storage_options(cfg.storage, storage_options)
    store = store_of(cfg, storage_options)
    folder = adapter_dir(scope)
    differ = _adapter_differences(cfg, store, scope)
    if not differ:
        return {"scope": scope, "adapter": store.uri(*folder), "skipped": True, "seconds": 0.0}
    if store.exists(*folder, "train_log.json"):
        log.info("adapter %s was trained under another recipe (%s): training it again", store.uri(*folder),
                 "; ".join(differ))
    res = train_adapter(cfg, store, scope, components=components, progress=progress, storage_options=storage_options)
    return {"scope": scope, "adapter": res.uri, "steps": res.steps, "seconds": round(res.seconds, 2),
            "final_loss": res.final_loss, "resumed_from": res.resumed_from, "skipped": False}


def _adapter_differences(cfg: BuildConfig, store: Store, scope: str) -> list[str]:
    """Why the version's adapter of ``scope`` is not the one ``cfg`` would train, field by field (empty: it is)."""
    from realfake.finetune import WEIGHTS_NAME, adapter_dir, adapter_recipe
    from realfake.recipe import recipe_diff

    folder = adapter_dir(scope)
    if not (store.exists(*folder, "train_log.json") and store.exists(*folder, WEIGHTS_NAME)):
        return ["not trained yet"]
    logged = store.read_json(*folder, "train_log.json")
    recipe = adapter_recipe(cfg, store, scope)
    if logged.get("config") == cfg.finetune.model_dump() and logged.get("recipe") == recipe:
        return []
    return recipe_diff(logged.get("recipe") or {}, recipe) or ["finetune settings (logged -> now)"]


def _check_before_synthesis(cfg: BuildConfig, store: Store) -> dict[str, Any] | None:
    """Refuse to synthesize with an adapter the config would train differently (e.g. on prompts with the old class
    names): the images would carry a stale adapter. One adapter for all classes only: checking one per class would
    read the training data once per class; the finetune stage, which a build runs first, checks those.

    Without mode=overwrite, committed shards made under another recipe are named first (the user's first question);
    the adapter is checked before overwrite deletes anything. Returns the synthesis recipe where the shard check
    computed it (see :func:`realfake.synthesize.check_synthesis_recipe`), for the caller to plan with."""
    from realfake.finetune import adapter_dir
    from realfake.recipe import RecipeMismatchError
    from realfake.synthesize import check_synthesis_recipe

    recipe = check_synthesis_recipe(cfg, store, "synthesize", cfg.mode) if cfg.mode != "overwrite" else None
    if not (cfg.finetune.enabled and cfg.finetune.scope == "all"):
        return recipe
    differ = _adapter_differences(cfg, store, "all")
    if differ:
        raise RecipeMismatchError(
            f"synthesize: the adapter {store.uri(*adapter_dir('all'))} is not the one this config trains "
            f"({'; '.join(differ)}): run the finetune stage first (realfake finetune with the same config and "
            "--set), or the whole build (realfake build), which does")
    return recipe


def plan_synthesis(cfg: BuildConfig, storage_options: dict | None = None) -> list[str]:
    """Names of every shard the version will hold, in order (deterministic from the manifest and config).

    Run once per build before its shard groups start (under the version's lease): committed shards made under
    another recipe are refused, or deleted with ``mode`` overwrite, crash leftovers are removed, the recipe is
    recorded and the plan of the pending shards is written beside it (``synthetic/_plan.parquet``), so the groups
    find the version settled and each reads only its own shards' plans instead of planning the whole version again
    (see :func:`realfake.synthesize.synthesize`; benchmarks/results/scale.md, finding 3).
    """
    from realfake.data.shards import plan_pending, plan_shards
    from realfake.data.shards.reader import committed_names
    from realfake.quality import load_judge, may_drop
    from realfake.synthesize import MAY_GROW, plan_work, synthesis_recipe, write_group_plans

    store = store_of(cfg, storage_options)
    recipe = _check_before_synthesis(cfg, store)
    recipe = recipe if recipe is not None else synthesis_recipe(cfg, store)
    items = plan_work(cfg, store)
    pending = plan_pending(store, items, key=lambda w: w.key, max_count=cfg.shards.max_count, mode=cfg.mode,
                           recipe=recipe, may_grow=MAY_GROW, may_drop=may_drop(cfg))
    write_group_plans(cfg, store, pending, recipe, len(plan_shards(items, cfg.shards.max_count)))
    if pending and cfg.quality.gated:
        load_judge(cfg, store)  # a classifier judge is trained here, once, before the shard groups load it
    return sorted(set(committed_names(store)) | {p.name for p in pending})



def synthesize(cfg: BuildConfig, shard_names: list[str] | None = None, progress: bool = False,
               engine=None, on_shard: Callable | None = None, storage_options: dict | None = None,
               lease_owner: str | None = None) -> dict:
    """Write and commit the named shards (default: all still missing); committed shards are skipped.

    ``lease_owner``: the build this call works for, whose process holds the version's lease (a shard group of
    a Prefect build); every commit first checks that build still holds it.
    """
    from realfake.data.lease import VersionLease
    from realfake.synthesize import synthesize as run

    storage_options = resolve_storage_options(cfg.storage, storage_options)
    store = store_of(cfg, storage_options)
    lease = VersionLease(store, owner=lease_owner, heartbeat=False).join() if lease_owner else None
    if shard_names is not None:
        from realfake.synthesize import read_group_plans

        # a shard group of a build: its shards' part of the plan the build recorded, checked against the recipe
        group = read_group_plans(cfg, store, shard_names)
        if group is not None:
            return run(cfg, store, shard_names, engine=engine, on_shard=on_shard, progress=progress,
                       storage_options=storage_options, lease=lease, group=group)
    recipe = _check_before_synthesis(cfg, store)
    return run(cfg, store, shard_names, engine=engine, on_shard=on_shard, progress=progress,
               storage_options=storage_options, lease=lease, recipe=recipe)


def finalize(cfg: BuildConfig, stats: dict | None = None, storage_options: dict | None = None,
             verify: bool = True) -> dict:
    """Index, WebDataset ``_info.json`` and the card (``dataset.json``); then verify the whole version.

    A build that holds the version's lease passes ``verify=False`` and calls :func:`verify` after releasing
    it (verification reports a lease still present as a problem).
    """
    from realfake.data.card import write_card
    from realfake.data.shards import PLAN_FILE, committed_shards, io_retry, write_wds_info
    from realfake.synthesize import check_synthesis_recipe

    store = store_of(cfg, storage_options)
    commits = committed_shards(store)  # read once for the whole finalize (under the lease: none commits meanwhile)
    # the card describes the config: it must be the shards' recipe
    check_synthesis_recipe(cfg, store, "finalize", commits=commits)
    if cfg.shards.format == "webdataset":
        write_wds_info(store, commits=commits)
    quality = None
    if cfg.quality.enabled:  # per-image scores and the per-class table (realfake.quality); off: the card as before
        from realfake.quality import measure_quality

        quality = measure_quality(cfg, store, store.storage_options)
    card = write_card(store, cfg.model_dump(mode="json"), stats or {}, quality=quality, commits=commits)
    # the build's plan for its shard groups is spent: a later build plans again (plan_synthesis)
    io_retry(lambda: store.remove("synthetic", PLAN_FILE), f"remove {store.uri('synthetic', PLAN_FILE)}")
    if verify:
        verify_or_raise(cfg, storage_options)
    return card


def verify_or_raise(cfg: BuildConfig, storage_options: dict | None = None) -> None:
    """Verify a version end to end; raise listing the first problems."""
    from realfake.data.card import verify_version

    store = store_of(cfg, storage_options)
    problems = verify_version(store)
    if problems:
        raise RuntimeError(f"version {store.uri()} failed verification:\n  " + "\n  ".join(problems[:20]))


def synthetic_dataset(store: Store):
    """The committed synthetic images of a version as an in-memory ``(image, label)`` dataset."""
    from realfake.data.loaders import LabelledImages
    from realfake.data.shards import iter_synthetic

    return LabelledImages((img, label) for img, label, _ in iter_synthetic(store))


def train_eval(cfg: BuildConfig, data: str = "synthetic", run: str | None = None, progress: bool = False,
               storage_options: dict | None = None, return_model: bool = False, keep_checkpoint: bool = False) -> dict:
    """Train ``cfg.classifier`` on real, synthetic or real+synthetic data; evaluate on the real test split.

    ``cfg.train_data`` refines the mode (see :func:`realfake.data.loaders.training_data`): the synthetic
    versions pooled, the scale xK (replicas ``0..K-1``), the synthetic:real ratio of a mix, streaming.

    Writes ``runs/{run}/metrics.json`` (config, data version, seed, metrics) and returns the metrics. Training
    checkpoints to ``runs/{run}/checkpoint`` and a re-run resumes from it; the checkpoint is removed once the
    metrics are written, unless ``keep_checkpoint`` (the caller removes it: the result then carries its path in the
    version as ``checkpoint``; a re-run restores the trained model from it without training). Under torchrun
    (:mod:`realfake.train_dist`) every process trains and rank 0 alone evaluates and writes; the other ranks return
    ``{"data", "rank"}``.
    """
    from realfake.classify import evaluate, train_classifier
    from realfake.data.loaders import RealImages, training_data
    from realfake.data.manifest import read_manifest
    from realfake.distributed import process_rank
    from realfake.models.loading import resolve_device

    if data not in ("real", "synthetic", "real+synthetic"):
        raise ValueError(f"data must be real, synthetic or real+synthetic, got {data!r}")
    storage_options = resolve_storage_options(cfg.storage, storage_options)
    store = store_of(cfg, storage_options)
    device = resolve_device(cfg.device)
    num_classes = len({s.label for s in read_manifest(store)})
    if num_classes < 2:
        raise ValueError(
            f"{store.uri('real', 'manifest.parquet')} has {num_classes} class: a classifier needs at least 2"
        )
    from realfake.ood import check_ood_folders, class_folders, configured_sets, evaluate_ood
    from realfake.report import write_confusion_plot

    ood_sets = configured_sets(cfg)
    folders = class_folders(store) if ood_sets else None
    if ood_sets:
        check_ood_folders(cfg, folders, storage_options)  # a wrong OOD folder fails now, not after training
    selection = training_data(cfg, data, storage_options)  # mode, versions, scale, ratio: cfg.train_data
    train_set = selection.dataset
    run = run or f"{data.replace('+', '-')}{selection.tag}-{cfg.classifier.model}-s{cfg.classifier.seed}"
    t0 = time.time()
    model = train_classifier(train_set, num_classes, cfg.classifier, device=device, progress=progress,
                             checkpoint=store.child("runs", run, "checkpoint"))
    train_s = time.time() - t0
    rank, world = process_rank()
    if rank:
        return {"data": data, "rank": rank}
    metrics = evaluate(model, RealImages(store, "test"), num_classes, device=device)
    out = {"data": data, "train_images": selection.real_images + selection.synthetic_images, **selection.summary(),
           "top1": metrics["top1"], "top5": metrics["top5"],
           "per_class": metrics["per_class"], "confusion": metrics["confusion"], "train_s": round(train_s, 2),
           "seed": cfg.classifier.seed, "processes": world, "resumed_from_epoch": model.resumed_from_epoch}
    if ood_sets and (ood := evaluate_ood(model, cfg, folders, device, storage_options)):
        out["ood"] = ood  # per set: top-1/top-5 on the classes it shares with training (-R/-A: logits restricted)
    out["confusion_plot"] = write_confusion_plot(store, run, out)
    store.write_json({"config": cfg.model_dump(mode="json"), "version": store.uri(), "metrics": out,
                      "git_revision": _git_revision()}, "runs", run, "metrics.json")
    if keep_checkpoint:
        out["checkpoint"] = ("runs", run, "checkpoint")
    else:
        store.remove("runs", run, "checkpoint", recursive=True)  # the run is recorded: nothing left to resume
    if return_model:
        out["model"] = model
    return out


def measure_versions(configs: dict[str, BuildConfig], progress: bool = False,
                     storage_options: dict | None = None) -> dict[str, Any]:
    """The three measures of each version (see :mod:`realfake.report`): train on real data once, then on each
    version's synthetic data, all evaluated on the real test split; label fidelity and feature distances to the
    real test split taken with the real-trained classifier.

    Resumable: every classifier checkpoints as it trains, and the real-trained one is kept until every version is
    measured, so a measure lost while a synthetic classifier trains restores it instead of training it again.
    """
    from realfake.classify import extract_features
    from realfake.data.loaders import RealImages
    from realfake.measure import feature_mmd, frechet_distance, label_fidelity
    from realfake.models.loading import resolve_device

    first = next(iter(configs.values()))
    device = resolve_device(first.device)
    t0 = time.time()
    real = train_eval(first, "real", progress=progress, storage_options=storage_options, return_model=True,
                      keep_checkpoint=True)
    real_model, real_checkpoint = real.pop("model"), real.pop("checkpoint")
    test = RealImages(store_of(first, storage_options), "test")
    test_feats = extract_features(real_model, test, device)
    out: dict[str, Any] = {"real": {**_row(real), "seconds": round(time.time() - t0, 2)}}
    for name, cfg in configs.items():
        t = time.time()
        m = train_eval(cfg, "synthetic", progress=progress, storage_options=storage_options)
        syn = synthetic_dataset(store_of(cfg, storage_options))
        n_classes = len(m["per_class"])
        feats = extract_features(real_model, syn, device)
        out[name] = {
            **_row(m),
            "label_fidelity": float(label_fidelity(real_model, syn, n_classes, device)),
            "mmd": float(feature_mmd(test_feats, feats)),
            "frechet": float(frechet_distance(test_feats, feats)),
            "seconds": round(time.time() - t, 2),
        }
    # every version is measured: nothing left to resume
    store_of(first, storage_options).remove(*real_checkpoint, recursive=True)
    return out


def measures_path(cfg: BuildConfig) -> tuple[str, ...]:
    """Where the measures of ``cfg``'s classifier are recorded in the version: one file per classifier model and
    seed, as its ``runs/`` folders are named, so measures of other seeds taken at the same time (the paper reports
    three) never overwrite each other or the file a parent reads back."""
    return "runs", "measure", f"{cfg.classifier.model}-s{cfg.classifier.seed}", "measures.json"


def write_measures(cfg: BuildConfig, measures: dict[str, Any], storage_options: dict | None = None) -> str:
    """Record what :func:`measure_versions` returned in the version (:func:`measures_path`), for a parent run that
    measured it in a child run on another node; returns its URI."""
    store, path = store_of(cfg, storage_options), measures_path(cfg)
    store.write_json(measures, *path)
    return store.uri(*path)


def read_measures(cfg: BuildConfig, storage_options: dict | None = None) -> dict[str, Any]:
    """The measures :func:`write_measures` recorded in the version for ``cfg``'s classifier."""
    return store_of(cfg, storage_options).read_json(*measures_path(cfg))


def _row(m: dict) -> dict:
    return {"top1": float(m["top1"]), "top5": float(m["top5"]), "train_images": int(m["train_images"]),
            "train_s": m["train_s"], "per_class": m["per_class"]}


def _git_revision() -> str | None:
    import subprocess
    from pathlib import Path

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass(frozen=True)
class Stages:
    """How :func:`build_version` runs each stage of one version: the stage functions of this module in this
    process (:func:`local_stages`), or the build flow's Prefect tasks (``flows/build.py``). ``prepare`` None
    skips ingest (a privacy shadow's manifest is derived from its parent's)."""

    lease: Callable[[BuildConfig], AbstractContextManager]  # the version's lease, held while the stages write
    prepare: Callable[[BuildConfig], dict] | None
    finetune: Callable[[BuildConfig], list[dict]]  # every adapter scope
    synthesize: Callable[[BuildConfig, Any], dict]  # (cfg, the lease held): every shard of the plan
    finalize: Callable[[BuildConfig, dict], dict]  # index and card with these stats, unverified; returns the card
    verify: Callable[[BuildConfig], None]
    measure: Callable[[dict[str, BuildConfig]], dict]  # name -> config: the measures of each version
    report: Callable[[BuildConfig, dict, dict[str, BuildConfig]], dict]  # (cfg, report, configs): files written


def local_stages(progress: bool = False, storage_options: dict | None = None,
                 components: dict | None = None) -> Stages:
    """The stages as calls of this module's functions in this process."""
    from realfake.data.lease import VersionLease
    from realfake.report import write_report

    so = storage_options
    return Stages(
        lease=lambda cfg: VersionLease(store_of(cfg, so)).acquire(wait_s=0),
        prepare=lambda cfg: prepare(cfg, progress, so),
        finetune=lambda cfg: [finetune(cfg, s, progress, components, so) for s in finetune_scopes(cfg, so)],
        synthesize=lambda cfg, lease: synthesize(cfg, progress=progress, storage_options=so),
        finalize=lambda cfg, stats: finalize(cfg, stats, so, verify=False),
        verify=lambda cfg: verify_or_raise(cfg, so),
        measure=lambda configs: measure_versions(configs, progress, so),
        report=lambda cfg, report, configs: write_report(cfg, report, configs, so),
    )


def build_version(cfg: BuildConfig, progress: bool = False, storage_options: dict | None = None,
                  components: dict | None = None, stages: Stages | None = None) -> dict:
    """prepare -> finetune (every scope) -> synthesize -> finalize for one version under its lease, then verify
    once the lease is released (verification reports a lease still present as a problem).

    ``stages`` runs each stage (default :func:`local_stages` with ``progress``, ``storage_options`` and
    ``components``). Returns ``uri``, each stage's result (``prepare``, ``adapters``, ``synthesis``, ``card``) and
    ``timings_s``; the card's stats are the stage results and timings before finalize.
    """
    stages = stages or local_stages(progress, storage_options, components)
    out: dict[str, Any] = {"uri": store_of(cfg, storage_options).uri()}
    timings: dict[str, float] = {}

    def timed(stage: str, fn: Callable, *args: Any) -> Any:
        t0 = time.time()
        result = fn(cfg, *args)
        timings[stage] = round(time.time() - t0, 2)
        return result

    with stages.lease(cfg) as lease:
        if stages.prepare is not None:
            out["prepare"] = timed("prepare", stages.prepare)
        out["adapters"] = timed("finetune", stages.finetune)
        out["synthesis"] = timed("synthesize", stages.synthesize, lease)
        stats = {k: v for k, v in out.items() if k != "uri"} | {"timings_s": dict(timings)}
        t0 = time.time()
        out["card"] = stages.finalize(cfg, stats)
    stages.verify(cfg)
    timings["finalize"] = round(time.time() - t0, 2)
    return out | {"timings_s": timings}


def run_build(cfg: BuildConfig, compare_baseline: bool = False, measure: bool = True, progress: bool = False,
              storage_options: dict | None = None, baseline: BaselineKind = "caption") -> dict:
    """Build the Real-Fake version (and the ``baseline`` kind's version), then measure them; returns the report."""
    from realfake.preflight import preflight

    storage_options = resolve_storage_options(cfg.storage, storage_options)
    preflight(cfg, storage_options, measure=measure)  # every field and model checked before any model loads
    return build_and_report(cfg, local_stages(progress, storage_options), compare_baseline, baseline, measure,
                            storage_options)


def build_and_report(cfg: BuildConfig, stages: Stages, compare_baseline: bool = False,
                     baseline: BaselineKind = "caption", measure: bool = True,
                     storage_options: dict | None = None) -> dict:
    """Build the version (and the ``baseline`` kind's) with ``stages``, measure them and write the report files;
    returns the report (what :func:`run_build` returns; the build flow passes its tasks as ``stages``)."""
    t0 = time.time()
    configs = {"realfake": cfg} | ({"baseline": baseline_config(cfg, baseline)} if compare_baseline else {})
    versions = {name: build_version(c, storage_options=storage_options, stages=stages) for name, c in configs.items()}
    report: dict[str, Any] = {"dataset": cfg.dataset, "version": cfg.version, "versions": versions}
    if measure:
        report["measures"] = stages.measure(configs)
    report["total_s"] = round(time.time() - t0, 2)
    report.update(stages.report(cfg, report, configs))
    return report
