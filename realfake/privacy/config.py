"""The privacy audits' configuration: membership inference (LiRA) with shadow pipelines, and copy detection.

Typed like every section of :mod:`realfake.config` (strict, described, defaults with their sources); kept apart
because the audits run on a built version and are not part of a build's :class:`~realfake.config.BuildConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from realfake.config import _Strict

__all__ = ["CopyDetectionConfig", "LiraConfig", "PrivacyConfig", "ShadowFamily"]


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

    descriptor: Literal["auto", "sscd", "timm", "clip"] = Field(
        "auto", description="auto: SSCD when descriptor_path is a TorchScript file (the copy descriptor the method "
        "names), else the fallback clip; sscd: the SSCD TorchScript file in descriptor_path; timm: a timm backbone "
        "(descriptor_model, optional weights file in descriptor_path; random weights are for tests only); clip: a "
        "CLIP vision model (descriptor_path, or the build's models.clip when empty). timm and clip are fallbacks, "
        "named as such in every report: they are not trained for copy detection.",
    )
    descriptor_path: str | None = Field(
        None, description="SSCD TorchScript file (e.g. sscd_disc_mixup.torchscript.pt), timm weights file, or CLIP "
        "model folder / hub id, on the worker.",
    )
    descriptor_model: str = Field("resnet18", description="timm model name when descriptor is timm.")
    center: bool | None = Field(
        None, description="Subtract the mean real descriptor before L2 normalisation (None: for timm and clip, "
        "whose features share a large common component, not for SSCD, which is trained to be used as is).",
    )
    threshold: float | None = Field(
        None, ge=-1, le=1, description="Cosine similarity at or above which a synthetic image is flagged. None: "
        "0.5 for SSCD (its copy threshold, Somepalli et al. 2023); a fallback descriptor has no copy calibration, "
        "so it flags images above the 99th percentile of the real -> nearest other real similarity of the same "
        "data (needs reference), reported as such and not as a copy verdict.",
    )
    top_k: int = Field(5, ge=1, le=1000, description="Nearest real images kept per synthetic image.")
    n_pairs: int = Field(16, ge=1, le=256, description="Closest pairs listed and shown side by side.")
    reference: bool = Field(
        True, description="Also measure each real image against its nearest other real image, the baseline the "
        "threshold is read against.",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="Images per descriptor forward pass.")

    @model_validator(mode="after")
    def _fallback_needs_a_threshold_source(self) -> CopyDetectionConfig:
        if self.descriptor in ("timm", "clip") and self.threshold is None and not self.reference:
            raise ValueError(
                f"copy_detection.descriptor={self.descriptor} is a fallback without a calibrated copy threshold: "
                "set copy_detection.reference=true (threshold from the real-to-real similarities) or "
                "copy_detection.threshold"
            )
        return self


class PrivacyConfig(_Strict):
    """The privacy audits of a dataset version."""

    lira: LiraConfig = Field(default_factory=LiraConfig, description="Membership inference (LiRA).")
    copy_detection: CopyDetectionConfig = Field(
        default_factory=CopyDetectionConfig, description="Copy detection against the real training images.",
    )
