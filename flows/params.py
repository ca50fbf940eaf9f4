"""Typed parameters of the flows: one pydantic model per flow, so the Prefect UI renders a validated form.

Every flow names a dataset version the same way: a preset (``configs/*.yaml``) and/or a YAML file, then the
fields a person most often changes (dataset, version, root, device), then optional whole sections whose
types are the library's own config models (:mod:`realfake.config`), so the form shows the paper's defaults
and their descriptions, and finally dotted ``section.field=value`` overrides. Nothing here duplicates a
default: the library's models stay the single source. :meth:`ConfigParams.to_config` merges all of it
through :func:`realfake.config.load_config`, which validates once and names every bad field.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from realfake.build import BaselineKind
from realfake.config import (
    BuildConfig,
    CaptionConfig,
    ClassifierConfig,
    FinetuneConfig,
    GuidanceConfig,
    ModelsConfig,
    OODConfig,
    QualityConfig,
    ShardConfig,
    SourceConfig,
    StorageConfig,
    SynthesisConfig,
    TrainDataConfig,
    load_config,
)

__all__ = [
    "BuildParams",
    "ConfigParams",
    "EvalData",
    "FanoutParams",
    "FinetuneParams",
    "PrepareParams",
    "RegenerateParams",
    "ShardGroupParams",
    "SynthesizeParams",
    "TrainEvalParams",
]

EvalData = Literal["real", "synthetic", "real+synthetic"]
# every section of BuildConfig (tests/test_config.py checks): a child run gets the parent's whole config
_SECTIONS = ("source", "models", "caption", "guidance", "finetune", "synthesis", "shards", "classifier", "train_data",
             "ood", "quality", "storage")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FanoutParams(_Params):
    """How GPU work (per-class fine-tuning, shard groups) is spread over devices and nodes."""

    mode: Literal["local", "deployment"] = Field(
        "local",
        description="local: one worker process per visible GPU on this node (CUDA_VISIBLE_DEVICES pinned; "
        "in-process on a CPU-only or single-GPU node); deployment: one child flow run of the shard-group "
        "deployment per group, each picked up by a worker of that deployment's pool (one pod per group).",
    )
    groups: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Shard groups to split the work into (None: one per visible GPU, at least one). Each "
        "group loads the pipeline once and keeps it warm across its shards.",
    )
    shard_deployment: str = Field(
        "synthesize-shards/synthesize-shards",
        description="Deployment ('flow name/deployment name') that runs one shard group in deployment mode.",
    )
    gpu_limit: str = Field(
        "realfake-gpu",
        description="Prefect global concurrency limit that bounds GPU use; named after the GPU work pool. "
        "Created with one slot per visible GPU (at least one) when missing.",
    )
    poll_seconds: float = Field(
        5.0, gt=0, le=600, description="How often the parent refreshes its progress artifact while groups run."
    )
    data_parallel_finetune: bool = Field(
        True, description="With one adapter for the whole dataset and several GPUs on the node, train it on all of "
        "them at once (torchrun + DDP; finetune.batch_size is split across GPUs) instead of on one.",
    )


class ConfigParams(_Params):
    """Which dataset version to work on, and the recipe; later entries in this form win over earlier ones."""

    preset: str | None = Field(
        "demo",
        description="Shipped preset (configs/*.yaml): demo, imagenette, in100, in1k, cub, cars, pets, eurosat. "
        "None starts from the library defaults (the paper's recipe) and needs dataset + source.",
    )
    config_file: str | None = Field(
        None, description="Optional YAML file (path on the worker) merged over the preset."
    )
    dataset: str | None = Field(None, description="Dataset name (None: the preset's).")
    version: str | None = Field(None, description="Version name (None: the preset's). Versions are immutable.")
    root: str | None = Field(
        None, description="Storage root: local path, file:// or s3://bucket/prefix (None: the preset's)."
    )
    device: str | None = Field(None, description="torch device: auto, cpu, cuda, cuda:N (None: the preset's).")
    mode: Literal["resume", "extend", "overwrite"] | None = Field(
        None, description="Synthetic shards the version already holds: resume (keep those made under this recipe, "
        "refuse others), extend (also add new images), overwrite (rebuild those made under another recipe). None: "
        "the preset's (resume).",
    )
    source: SourceConfig | None = Field(None, description="Real data source; replaces the preset's fields sent.")
    models: ModelsConfig | None = Field(None, description="Generator, CLIP and captioner ids (hub id or folder).")
    caption: CaptionConfig | None = Field(None, description="BLIP-2 captions.")
    guidance: GuidanceConfig | None = Field(None, description="CLIP visual guidance in the last text slot.")
    finetune: FinetuneConfig | None = Field(None, description="LoRA fine-tuning with the MMD term.")
    synthesis: SynthesisConfig | None = Field(None, description="img2img generation recipe.")
    shards: ShardConfig | None = Field(None, description="Shard format and size.")
    classifier: ClassifierConfig | None = Field(None, description="Downstream classifier recipe.")
    train_data: TrainDataConfig | None = Field(
        None, description="What the classifier trains on: synthetic versions pooled, scale xK, synthetic:real "
        "ratio, streaming; replaces the preset's fields sent.",
    )
    ood: OODConfig | None = Field(None, description="Out-of-distribution test folders (ImageNet-V2/-Sketch/-R/-A).")
    quality: QualityConfig | None = Field(None, description="Per-image scores, the per-class card, regeneration gates.")
    storage: StorageConfig | None = Field(
        None, description="Object storage endpoint, region and client options (MinIO, Ceph, R2); credentials come "
        "from the worker's environment, AWS profile or instance role, never from here.")
    overrides: list[str] = Field(
        default_factory=list,
        description="Dotted overrides applied last, e.g. 'finetune.max_steps=200' or 'synthesis.seed=3'.",
    )

    def config_data(self) -> dict[str, Any]:
        """The explicit fields of this form as a partial config dict (sections keep only the fields sent)."""
        data: dict[str, Any] = {}
        for name in ("dataset", "version", "root", "device", "mode"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        for name in _SECTIONS:
            section = getattr(self, name)
            if section is not None:
                data[name] = section.model_dump(mode="json", exclude_unset=True)
        return data

    def to_config(self) -> BuildConfig:
        """Merge preset, file, form fields and overrides into one validated :class:`BuildConfig`.

        Raises:
            realfake.config.ConfigError: naming every bad field, before any work starts.
        """
        from realfake.redact import register_overrides

        register_overrides(self.overrides)  # a credential given as an override is refused, and masked wherever quoted
        return load_config(
            preset=self.preset, file=self.config_file, overrides=list(self.overrides), data=self.config_data()
        )

    def pinned(self, cfg: BuildConfig) -> dict[str, Any]:
        """Parameters that reproduce ``cfg`` exactly in a child run, whatever preset files it finds there."""
        data = cfg.model_dump(mode="json")
        if "://" not in data["root"]:
            # A child run may start in another working directory (its own pull step): pin the folder.
            data["root"] = os.path.abspath(os.path.expanduser(data["root"]))
        return {"preset": None, "config_file": None, **data}


class PrepareParams(ConfigParams):
    """Parameters of the prepare flow: ingest the real images, then captions and guidance embeddings."""


class FinetuneParams(ConfigParams):
    """Parameters of the fine-tune flow: one LoRA adapter per scope (all, or one per class)."""

    fanout: FanoutParams = Field(default_factory=FanoutParams, description="Spread of per-class adapters.")


class SynthesizeParams(ConfigParams):
    """Parameters of the synthesis flow: plan shards, run shard groups in parallel, then index + card."""

    fanout: FanoutParams = Field(default_factory=FanoutParams, description="Spread of shard groups.")
    finalize: bool = Field(True, description="Write the index and dataset card and verify once all shards exist.")


class ShardGroupParams(ConfigParams):
    """Parameters of one shard group (a child run): synthesize and commit these shards, skip committed ones."""

    shard_names: list[str] = Field(
        default_factory=list, description="Shards of the plan this group writes (empty: the whole plan)."
    )
    gpu_limit: str = Field("realfake-gpu", description="Global concurrency limit holding one GPU slot per group.")
    lease_owner: str | None = Field(
        None, description="The build holding the version's lease (set by the parent run); each commit checks it "
        "still does. Empty when the group is run by hand: it then writes without a lease.",
    )


class TrainEvalParams(ConfigParams):
    """Parameters of the train-eval flow: train the classifier on each data source, test on real test data."""

    data: list[EvalData] = Field(
        default_factory=lambda: ["real", "synthetic"],
        description="Training sets to measure: real train, the synthetic version, or both together (mixed at "
        "train_data.mix_ratio).",
    )
    nproc_per_node: int = Field(
        1, ge=1, le=64, description="Training processes per set on the worker (torchrun + DDP, one per GPU); 1 "
        "trains in the task's own process.",
    )
    synthetic_scales: list[int] = Field(
        default_factory=list, description="Also train on synthetic data at each of these scales (x1..x10 synthetic "
        "images per real image, replicas 0..K-1 of the synthetic versions): one run per scale, named "
        "synthetic-xK in the results.",
    )

    @field_validator("synthetic_scales")
    @classmethod
    def _scales(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if not 1 <= k <= 10]
        if bad:
            raise ValueError(f"synthetic_scales must lie in 1..10 (train_data.synthetic_scale), got {bad[0]}")
        return list(dict.fromkeys(v))



class BuildParams(ConfigParams):
    """Parameters of the end-to-end build: prepare, fine-tune, synthesize, finalize, measure, report."""

    fanout: FanoutParams = Field(default_factory=FanoutParams, description="Spread of GPU work.")
    compare_baseline: bool = Field(
        False,
        description="Also build the paper's baseline version ({version}-baseline: plain text-to-image from the "
        "base generator) and measure it next to the Real-Fake version.",
    )
    baseline_prompt: BaselineKind = Field(
        "caption",
        description="The baseline's prompt: caption (the authors' text-to-image baseline, paper G.5: the build's "
        "prompt with the BLIP-2 caption where the preset captions), class_name (the class name alone) or "
        "a_photo_of ('a photo of {class}'); the last two write {version}-baseline-class-name / -a-photo-of.",
    )
    measure: bool = Field(
        True,
        description="Measure the built versions: classifier accuracy on the real test split, label fidelity, "
        "and feature MMD / Frechet distance to real test data.",
    )


class RegenerateParams(BuildParams):
    """Parameters of scheduled regeneration: rebuild a dataset as a new version, move `latest` if it verifies."""

    version_prefix: str = Field(
        "r", description="New versions are named {prefix}{UTC time as YYYYmmdd-HHMMSS}; must be a valid name."
    )
    from_latest: bool = Field(
        True,
        description="Rebuild from the config recorded in the card of the current `latest` version when one "
        "exists (then only dataset/root/overrides of this form apply); otherwise from this form.",
    )
