"""Typed parameters of the flows: one pydantic model per flow, so the Prefect UI renders a validated form.

Every flow names a dataset version the same way: a preset (``configs/*.yaml``) and/or a YAML file, then the
fields a person most often changes (dataset, version, root, device), then optional sections mirroring the
library's config models (:mod:`realfake.config`), and finally dotted ``section.field=value`` overrides.

A section of the form never changes what the person did not touch. Each section is a *partial* copy of the
library's model (:func:`form_section`): every field optional, empty by default, with no default value in the
form's schema, so the UI prefills nothing and sends only the fields filled in; :meth:`ConfigParams.to_config`
merges those fields onto the preset's section. (The library model itself as the section type made the UI fill a
toggled section with the library defaults and send all of them, silently replacing the preset's rank, learning
rate, batch, resolution and flip with the paper's.) Prefilling the form with the preset's values instead would
freeze them into the deployment: a person switching the preset, or an edited preset file, would still get the old
values. Each field's description says the paper's (the library's) default and the ``demo`` preset's value where it
differs; every run publishes the effective configuration next to the paper's recipe as its ``...-config``
artifact. Nothing here duplicates a default: the library's models stay the single source, and
:func:`realfake.config.load_config` validates the merge once and names every bad field.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from realfake.build import BaselineKind
from realfake.config import (
    BuildConfig,
    CaptionConfig,
    ClassifierConfig,
    ConfigError,
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
    _merge,
    _preset_path,
    _read_yaml,
    load_config,
)

__all__ = [
    "BuildParams",
    "ConfigParams",
    "EvalData",
    "FanoutParams",
    "FinetuneParams",
    "MeasureParams",
    "PrepareParams",
    "RegenerateParams",
    "RerunLostParams",
    "ShardGroupParams",
    "SynthesizeParams",
    "TrainEvalParams",
    "config_rows",
    "form_section",
]

EvalData = Literal["real", "synthetic", "real+synthetic"]
# every section of BuildConfig (tests/test_config.py checks): a child run gets the parent's whole config
_SECTIONS = ("source", "models", "caption", "guidance", "finetune", "synthesis", "shards", "classifier", "train_data",
             "ood", "quality", "storage")


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


_SHOWN_PRESET = "demo"  # the form's default preset, whose values the field descriptions quote


def _preset_values(name: str) -> dict[str, Any]:
    try:
        return _read_yaml(_preset_path(name))
    except ConfigError:
        return {}


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = "None" if value is None else repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_default_no_null(schema: dict[str, Any]) -> None:
    # The form's schema of a partial field: the library's type without `null` and without a default, so the UI
    # shows an empty input of that type and sends the field only once a person fills it in.
    schema.pop("default", None)
    kept = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    if "anyOf" in schema:
        del schema["anyOf"]
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept
    if schema.get("type") == "boolean":
        # The UI's boolean switch starts off and sends false untouched (it would turn fine-tuning off); a choice of
        # true / false starts empty and sends nothing until a person picks one.
        del schema["type"]
        schema["enum"] = [True, False]


def form_section(model: type[BaseModel], section: str) -> type[BaseModel]:
    """A partial copy of a library section model for the form: every field optional and empty by default.

    An empty field keeps the preset's (or the config file's) value; a field set to None through the API is
    empty too (to set a library field to None, use an override, e.g. ``finetune.max_steps=null``). Each field's
    description ends with the paper's default (the library's) and the ``demo`` preset's value where it differs.
    """
    demo = (_preset_values(_SHOWN_PRESET).get(section) or {})
    fields: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        paper = f.get_default(call_default_factory=True)
        note = f"Empty: the preset's value. Paper (library default): {_shown(paper)}."
        if name in demo and _jsonable(demo[name]) != _jsonable(paper):
            note += f" {_SHOWN_PRESET} preset: {_shown(demo[name])}."
        description = f"{f.description or ''} {note}".strip()
        fields[name] = (f.annotation | None, Field(None, title=f.title, description=description,
                                                    json_schema_extra=_no_default_no_null))
    doc = (f"{model.__doc__ or ''}\n\nOnly the fields filled in are sent; every empty field keeps the preset's "
           "value.").strip()
    # the library's checks of the raw input (e.g. storage refuses credentials, masking them first) hold for the form too
    before = [n for n, d in model.__pydantic_decorators__.model_validators.items() if d.info.mode == "before"]
    checks = {n: model_validator(mode="before")(classmethod(lambda cls, data, check=getattr(model, n): check(data)))
              for n in before}
    form = create_model(f"{model.__name__}Form", __base__=_Params, __doc__=doc, __validators__=checks, **fields)
    form.model_config["title"] = f"Change {section} fields"  # the UI's button that opens the section
    return form


def _section(description: str) -> Any:
    """A section field of a form: empty (the preset's values) until a person opens it and fills fields in."""
    return Field(None, json_schema_extra=_section_toggle,
                 description=f"{description} Only the fields filled in are sent; the others keep the preset's values.")


def _section_toggle(schema: dict[str, Any]) -> None:
    # The UI shows a section as two buttons, one per branch of its anyOf: name the null branch for what it does.
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "null":
            branch["title"] = "Preset's values"


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


class FanoutParams(_Params):
    """How GPU work (per-class fine-tuning, shard groups) is spread over devices and nodes."""

    mode: Literal["local", "deployment"] = Field(
        "local",
        description="local: one worker process per visible GPU on this node (CUDA_VISIBLE_DEVICES pinned; "
        "in-process on a CPU-only or single-GPU node); deployment: one child flow run of the shard-group "
        "deployment per group (and of the fine-tune deployment per lane of adapters), each picked up by a worker "
        "of that deployment's pool (one pod per group).",
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
    measure_deployment: str = Field(
        "measure/measure",
        description="Deployment ('flow name/deployment name') that measures the built versions in deployment mode "
        "(one child run: the classifiers on real and on synthetic data, label fidelity, MMD and Frechet).",
    )
    finetune_deployment: str = Field(
        "finetune/finetune",
        description="Deployment ('flow name/deployment name') that trains one lane of adapter scopes in deployment "
        "mode (one child run per lane: fanout.groups lanes, or one per visible GPU).",
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


_LIBRARY_SECTIONS: dict[str, type[BaseModel]] = {
    "source": SourceConfig, "models": ModelsConfig, "caption": CaptionConfig, "guidance": GuidanceConfig,
    "finetune": FinetuneConfig, "synthesis": SynthesisConfig, "shards": ShardConfig, "classifier": ClassifierConfig,
    "train_data": TrainDataConfig, "ood": OODConfig, "quality": QualityConfig, "storage": StorageConfig,
}
_FORM = {name: form_section(model, name) for name, model in _LIBRARY_SECTIONS.items()}
SourceForm = _FORM["source"]
ModelsForm = _FORM["models"]
CaptionForm = _FORM["caption"]
GuidanceForm = _FORM["guidance"]
FinetuneForm = _FORM["finetune"]
SynthesisForm = _FORM["synthesis"]
ShardForm = _FORM["shards"]
ClassifierForm = _FORM["classifier"]
TrainDataForm = _FORM["train_data"]
OODForm = _FORM["ood"]
QualityForm = _FORM["quality"]
StorageForm = _FORM["storage"]


class ConfigParams(_Params):
    """Which dataset version to work on, and the recipe; later entries in this form win over earlier ones."""

    preset: str | None = Field(
        "demo",
        description="Shipped preset (configs/*.yaml): demo, imagenette, in100, in1k, cub, cars, pets, eurosat. "
        "None or empty starts from the library defaults (the paper's recipe) and needs dataset + source.",
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
    source: SourceForm | None = _section("Real data source.")
    models: ModelsForm | None = _section("Generator, CLIP and captioner ids (hub id or folder).")
    caption: CaptionForm | None = _section("BLIP-2 captions.")
    guidance: GuidanceForm | None = _section("CLIP visual guidance in the last text slot.")
    finetune: FinetuneForm | None = _section("LoRA fine-tuning with the MMD term.")
    synthesis: SynthesisForm | None = _section("img2img generation recipe.")
    shards: ShardForm | None = _section("Shard format and size.")
    classifier: ClassifierForm | None = _section("Downstream classifier recipe.")
    train_data: TrainDataForm | None = _section(
        "What the classifier trains on: synthetic versions pooled, scale xK, synthetic:real "
        "ratio, streaming.",
    )
    ood: OODForm | None = _section("Out-of-distribution test folders (ImageNet-V2/-Sketch/-R/-A).")
    quality: QualityForm | None = _section("Per-image scores, the per-class card, regeneration gates.")
    storage: StorageForm | None = _section(
        "Object storage endpoint, region and client options (MinIO, Ceph, R2); credentials come "
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
            if section is not None:  # only the fields filled in: an empty field keeps the preset's value
                filled = {k: v for k, v in section.model_dump(mode="json", exclude_unset=True).items() if v is not None}
                if filled:
                    data[name] = filled
        return data

    def to_config(self) -> BuildConfig:
        """Merge preset, file, form fields and overrides into one validated :class:`BuildConfig`.

        Raises:
            realfake.config.ConfigError: naming every bad field, before any work starts.
        """
        from realfake.redact import register_overrides

        register_overrides(self.overrides)  # a credential given as an override is refused, and masked wherever quoted
        cfg = load_config(
            preset=self.preset, file=self.config_file, overrides=list(self.overrides), data=self.config_data()
        )
        if self._publishes_config:
            _publish_config(self, cfg)
        return cfg

    _publishes_config: ClassVar[bool] = True  # a child run (its parent's config, pinned) publishes none

    def preset_config_data(self) -> dict[str, Any]:
        """The preset merged with the config file, as written (before the form's fields and overrides)."""
        data: dict[str, Any] = {}
        if self.preset:
            data = _merge(data, _read_yaml(_preset_path(self.preset)))
        if self.config_file:
            from pathlib import Path

            data = _merge(data, _read_yaml(Path(self.config_file)))
        return data

    def pinned(self, cfg: BuildConfig) -> dict[str, Any]:
        """Parameters that reproduce ``cfg`` exactly in a child run, whatever preset files it finds there."""
        data = cfg.model_dump(mode="json")
        if "://" not in data["root"]:
            # A child run may start in another working directory (its own pull step): pin the folder.
            data["root"] = os.path.abspath(os.path.expanduser(data["root"]))
        # An empty form field keeps the preset's value (here: the library default): a None the library does not
        # default to travels as an override
        nulls = [f"{name}.{field}=null" for name, model in _LIBRARY_SECTIONS.items()
                 for field, value in (data.get(name) or {}).items()
                 if value is None and model.model_fields[field].get_default(call_default_factory=True) is not None]
        # preset '' (not None): parameters sent without their None values (the server's schema has no null for a
        # section's fields) must not fall back to the form's default preset
        return {"preset": "", "config_file": None, **data, "overrides": nulls}


def config_rows(params: ConfigParams, cfg: BuildConfig) -> list[dict[str, Any]]:
    """The effective configuration next to the preset's and the paper's: one row per field that the preset, the
    form or an override sets away from the paper's recipe (the library's defaults), saying which of them did."""
    preset = params.preset_config_data()
    effective = cfg.model_dump(mode="json")
    rows = []
    for name, value in effective.items():
        model = _LIBRARY_SECTIONS.get(name)
        fields = value.items() if model is not None else [(None, value)]
        for field, v in fields:
            path = f"{name}.{field}" if field else name
            if model is not None:
                paper = _jsonable(model.model_fields[field].get_default(call_default_factory=True))
                from_preset = (preset.get(name) or {}).get(field, paper)
            else:
                info = BuildConfig.model_fields[name]
                paper = None if info.is_required() else _jsonable(info.default)
                from_preset = preset.get(name, paper)
            from_preset = _jsonable(from_preset)
            if v == paper and from_preset == paper:
                continue
            set_by = "paper" if v == paper else "preset" if v == from_preset else "form or override"
            rows.append({"field": path, "this run": _shown(v), "preset": _shown(from_preset), "paper": _shown(paper),
                         "set by": set_by})
    return rows


def _publish_config(params: ConfigParams, cfg: BuildConfig) -> None:
    # Inside a flow run only (the CLI checks a form before Prefect starts): the effective-configuration artifact.
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    from prefect import get_run_logger

    try:
        from tasks.artifacts import publish_config

        publish_config(config_rows(params, cfg), params.preset, cfg.dataset, cfg.version)
    except Exception as e:  # noqa: BLE001 - the artifact informs, it never stops a run
        get_run_logger().warning("no configuration artifact: %s: %s", type(e).__name__, e)


class PrepareParams(ConfigParams):
    """Parameters of the prepare flow: ingest the real images, then captions and guidance embeddings."""


class FinetuneParams(ConfigParams):
    """Parameters of the fine-tune flow: one LoRA adapter per scope (all, or one per class)."""

    fanout: FanoutParams = Field(default_factory=FanoutParams, description="Spread of per-class adapters.")
    scopes: list[str] | None = Field(
        None, description="Adapter scopes this run trains ('all' or class labels; empty: every scope of the config). "
        "A fanned-out build sets it: one child run per lane of scopes.",
    )


class SynthesizeParams(ConfigParams):
    """Parameters of the synthesis flow: plan shards, run shard groups in parallel, then index + card."""

    fanout: FanoutParams = Field(default_factory=FanoutParams, description="Spread of shard groups.")
    finalize: bool = Field(True, description="Write the index and dataset card and verify once all shards exist.")


class ShardGroupParams(ConfigParams):
    """Parameters of one shard group (a child run): synthesize and commit these shards, skip committed ones."""

    _publishes_config: ClassVar[bool] = False

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



class MeasureParams(ConfigParams):
    """Parameters of the measure flow: the measures of a built version (and its baseline) on the real test split."""

    compare_baseline: bool = Field(
        False, description="Also measure the version's text-to-image baseline ({version}-baseline, built before).",
    )
    baseline_prompt: BaselineKind = Field(
        "caption", description="Which baseline version (as the build's baseline_prompt): caption, class_name or "
        "a_photo_of.",
    )
    gpu_limit: str = Field("realfake-gpu", description="Global concurrency limit whose slot the measure holds.")


class RerunLostParams(_Params):
    """Parameters of the rerun-lost flow (set by realfake's re-run automation from the crash event)."""

    flow_run: str = Field(
        "", description="The crashed flow run: its id, or the event's resource id prefect.flow-run.{id}.",
    )


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
