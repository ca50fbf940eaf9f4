"""Privacy audits of a built dataset: membership inference (LiRA) and copy detection.

:mod:`realfake.privacy.lira` scores membership from shadow-model confidences and reports ROC / AUC / TPR at
low FPR; :mod:`realfake.privacy.copydetect` embeds synthetic and real images with a copy-detection
descriptor and reports the nearest real image of every synthetic one; :mod:`realfake.privacy.plots` draws
the figures of both. The shadow-pipeline orchestration lives in the Prefect layer, not here.
"""

from realfake.privacy.copydetect import (
    CopyReport,
    Descriptor,
    build_descriptor,
    clip_descriptor,
    copy_report,
    embed_images,
    l2_normalize,
    nearest_real,
    sscd_descriptor,
    timm_descriptor,
)
from realfake.privacy.lira import (
    FPR_LEVELS,
    lira_attack,
    lira_report,
    lira_scores,
    logit_confidence,
    results_json,
    results_table,
    roc_metrics,
    shadow_splits,
    tpr_key,
)
from realfake.privacy.plots import pair_grid, plot_roc, similarity_histogram

__all__ = [
    "FPR_LEVELS",
    "CopyReport",
    "Descriptor",
    "build_descriptor",
    "clip_descriptor",
    "copy_report",
    "embed_images",
    "l2_normalize",
    "lira_attack",
    "lira_report",
    "lira_scores",
    "logit_confidence",
    "nearest_real",
    "pair_grid",
    "plot_roc",
    "results_json",
    "results_table",
    "roc_metrics",
    "shadow_splits",
    "similarity_histogram",
    "sscd_descriptor",
    "timm_descriptor",
    "tpr_key",
]
