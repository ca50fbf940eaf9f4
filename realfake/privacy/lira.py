"""Membership inference with the Likelihood Ratio Attack (LiRA, Carlini et al. 2022).

A classifier leaks its training set when it is measurably more confident on examples it was trained on.
LiRA makes that measurable per example: N shadow models are trained on seeded random halves of the real
training set (:func:`shadow_splits`), so every example has shadows that saw it (IN) and shadows that did
not (OUT). Their logit-scaled confidences on the example (:func:`logit_confidence`) are fitted with one
Gaussian each, and the target model's confidence is scored with the likelihood ratio of the two
(:func:`lira_scores`; the *offline* variant uses OUT shadows only, with a one-sided test). Scores of many
target examples with known membership give a ROC curve, its AUC and the true-positive rate at low
false-positive rates (:func:`roc_metrics`), the numbers the paper asks for. The audit compares targets
trained on real data with targets trained on Real-Fake synthetic data; :func:`lira_attack` runs the
standard leave-one-model-out protocol for one such family of models. Needs only numpy and scipy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from scipy.special import logsumexp

from realfake.data.storage import Store
from realfake.privacy.plots import plot_roc

__all__ = [
    "FPR_LEVELS",
    "lira_attack",
    "lira_report",
    "lira_scores",
    "logit_confidence",
    "results_json",
    "results_table",
    "roc_metrics",
    "shadow_splits",
    "tpr_key",
]

#: False-positive rates at which the true-positive rate is reported (Carlini et al. report 0.1% and 1%).
FPR_LEVELS: tuple[float, ...] = (0.001, 0.01)


def tpr_key(fpr: float) -> str:
    """Name of the metric "TPR at this FPR", e.g. ``tpr_at_0.1%fpr`` for 0.001."""
    return f"tpr_at_{fpr * 100:g}%fpr"


# -- confidences -----------------------------------------------------------------------------------------


def logit_confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit-scaled confidence ``phi = log(p / (1 - p))`` of the true class, computed stably from logits.

    With softmax probabilities ``p_y = exp(z_y) / sum_j exp(z_j)`` the odds ``p_y / (1 - p_y)`` equal
    ``exp(z_y) / sum_{j != y} exp(z_j)``, so ``phi = z_y - logsumexp_{j != y} z_j`` exactly. This
    "logit difference" form never forms ``p`` and so keeps full precision where the model is very confident
    (``1 - p`` underflows to 0 in float32 already for ``phi > 17``), which is where members live.

    Args:
        logits: Raw classifier outputs, shape ``[..., n_classes]``; any leading shape (e.g. examples x
            augmentations) is kept.
        labels: True class of each example, integer, shape equal to a prefix of ``logits.shape[:-1]``
            (e.g. ``[n]`` for logits ``[n, n_queries, n_classes]``); broadcast over the remaining axes.

    Returns:
        float64 array of shape ``logits.shape[:-1]``.

    Raises:
        ValueError: fewer than two classes, a label outside ``[0, n_classes)``, mismatched shapes or
            non-finite logits.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    if z.ndim < 2 or z.shape[-1] < 2:
        raise ValueError(f"logits must have shape [..., n_classes] with n_classes >= 2, got {z.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers (class ids), got dtype {y.dtype}")
    lead = z.shape[:-1]
    if y.shape != lead[: y.ndim]:
        raise ValueError(f"labels shape {y.shape} must be a prefix of the logits' leading shape {lead}")
    n_classes = z.shape[-1]
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), got range [{y.min()}, {y.max()}]")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity; check the model outputs before scoring")
    y = y.reshape(y.shape + (1,) * (len(lead) - y.ndim))
    y = np.broadcast_to(y, lead)[..., None]
    true = np.take_along_axis(z, y, axis=-1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, y, -np.inf, axis=-1)
    return true - logsumexp(others, axis=-1)


# -- shadow membership -----------------------------------------------------------------------------------


def shadow_splits(n: int, n_shadows: int, seed: int, paired: bool = False) -> np.ndarray:
    """Membership mask of the shadow models: which examples each shadow model trains on.

    The default follows Carlini et al.: for every example an independent random permutation of the
    shadows decides which of them include it, so every example is IN for exactly ``n_shadows / 2`` shadows
    (for odd ``n_shadows``, ``floor`` or ``ceil`` at random) and each shadow trains on about half of the
    set (binomially distributed). With ``paired=True`` shadows come in complementary pairs (shadow ``2i``
    trains on a random half, ``2i + 1`` on the rest), so each shadow's set is exactly half the data as well;
    this needs an even ``n_shadows``.

    Args:
        n: Number of examples in the real training set.
        n_shadows: Number of shadow models (the paper uses 16); at least 2.
        seed: Seed of the split; the same seed gives the same mask on every machine.
        paired: Use complementary pairs (exact halves per shadow).

    Returns:
        Boolean array ``[n_shadows, n]``; ``mask[s, i]`` is True when shadow ``s`` trains on example ``i``.
    """
    if n < 1:
        raise ValueError(f"n (number of examples) must be >= 1, got {n}")
    if n_shadows < 2:
        raise ValueError(f"n_shadows must be >= 2 so every example has IN and OUT shadows, got {n_shadows}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, n, n_shadows, int(paired)]))
    if paired:
        if n_shadows % 2:
            raise ValueError(f"paired=True needs an even n_shadows (complementary pairs), got {n_shadows}")
        mask = np.zeros((n_shadows, n), dtype=bool)
        half = n // 2
        for pair in range(n_shadows // 2):
            # Alternate which side gets the odd example so sizes balance over the pairs.
            first = rng.permutation(n)[: half + (n % 2) * (pair % 2)]
            mask[2 * pair, first] = True
            mask[2 * pair + 1] = ~mask[2 * pair]
        return mask
    # rank[s, i] is shadow s's position in a random ordering of the shadows for example i.
    rank = rng.random((n_shadows, n)).argsort(axis=0).argsort(axis=0)
    n_in = np.full(n, n_shadows // 2)
    if n_shadows % 2:
        n_in += rng.integers(0, 2, size=n)
    return rank < n_in[None, :]


# -- scoring ---------------------------------------------------------------------------------------------


def _as_queries(x: np.ndarray, name: str, ndim: int) -> np.ndarray:
    """Add a trailing query axis when the caller gave one confidence per example."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == ndim:
        a = a[..., None]
    if a.ndim != ndim + 1:
        raise ValueError(f"{name} must have {ndim} or {ndim + 1} dimensions, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinity; compute it with logit_confidence from logits")
    return a


def _gaussian_fit(
    conf: np.ndarray, mask: np.ndarray, fixed_variance: bool, min_std: float, side: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example, per-query mean and std of the shadow confidences selected by ``mask``.

    ``conf`` is ``[n_shadows, n, q]`` and ``mask`` ``[n_shadows, n]``. The global variance is the pooled
    *within-example* variance (residuals around each example's own mean), which is what the per-example
    model assumes is shared; pooling raw values would add the spread of the means and flatten every ratio.
    Examples with fewer than two shadows on this side also fall back to the pooled variance.
    """
    m = mask[:, :, None].astype(np.float64)
    count = m.sum(axis=0)  # [n, 1]
    if (count[:, 0] == 0).any():
        missing = np.flatnonzero(count[:, 0] == 0)
        raise ValueError(
            f"{missing.size} example(s) have no {side} shadow model (first: index {missing[0]}); use "
            "shadow_splits so every example is IN for some shadows and OUT for others, or more shadows"
        )
    mean = (conf * m).sum(axis=0) / count
    sq = (((conf - mean[None]) ** 2) * m).sum(axis=0)  # [n, q]
    dof = count - 1.0
    if dof.sum() <= 0:
        raise ValueError(f"every example has a single {side} shadow model; a variance cannot be estimated")
    pooled = np.sqrt(sq.sum(axis=0) / dof.sum(axis=0))  # [q]
    if fixed_variance:
        std = np.broadcast_to(pooled, mean.shape).copy()
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(sq / dof)
        std = np.where(dof > 0, std, pooled[None, :])
    return mean, np.maximum(std, min_std)


def lira_scores(
    target_conf: np.ndarray,
    shadow_conf: np.ndarray,
    shadow_in: np.ndarray,
    online: bool = True,
    fixed_variance: bool = False,
    min_std: float = 1e-3,
) -> np.ndarray:
    """LiRA membership score of each target example; higher means "more likely a member".

    Online (both IN and OUT shadows): the log likelihood ratio
    ``log N(phi; mu_in, sigma_in^2) - log N(phi; mu_out, sigma_out^2)`` of the target's confidence ``phi``.
    Offline (OUT shadows only): the one-sided test of the paper, ``Lambda = 1 - Pr[Z > phi]`` with
    ``Z ~ N(mu_out, sigma_out^2)``; returned as ``-log Pr[Z > phi]``, which ranks identically but keeps
    resolution far in the upper tail, where ``1 - Pr`` rounds to 1. With several queries per example
    (augmentations), a Gaussian is fitted per query and the per-query scores are averaged, as in the paper.

    Args:
        target_conf: Logit-scaled confidences of the target model, ``[n]`` or ``[n, n_queries]``.
        shadow_conf: The shadow models' confidences on the same examples, ``[n_shadows, n]`` or
            ``[n_shadows, n, n_queries]`` (queries in the same order as for the target).
        shadow_in: Boolean ``[n_shadows, n]``: True where the shadow trained on the example.
        online: Use IN and OUT shadows (stronger); False uses OUT shadows only (no shadow has to train on a
            target example, so the shadows can be reused for new targets).
        fixed_variance: Share one variance (pooled over examples) per side and query instead of a
            per-example one; the paper recommends it when there are few shadows (e.g. fewer than 64).
        min_std: Floor of every standard deviation, in logit units, so a saturated example whose shadows
            all agree does not produce an infinite ratio.

    Returns:
        float64 array ``[n]`` of scores.
    """
    target = _as_queries(target_conf, "target_conf", 1)
    shadows = _as_queries(shadow_conf, "shadow_conf", 2)
    mask = np.asarray(shadow_in)
    if mask.dtype != bool:
        raise ValueError(f"shadow_in must be a boolean mask [n_shadows, n], got dtype {mask.dtype}")
    if mask.shape != shadows.shape[:2]:
        raise ValueError(f"shadow_in shape {mask.shape} must equal shadow_conf's [n_shadows, n] {shadows.shape[:2]}")
    if target.shape != shadows.shape[1:]:
        raise ValueError(
            f"target_conf shape {target.shape} must match shadow_conf's [n, n_queries] {shadows.shape[1:]}"
        )
    if min_std <= 0:
        raise ValueError(f"min_std must be > 0, got {min_std}")
    mu_out, sd_out = _gaussian_fit(shadows, ~mask, fixed_variance, min_std, "OUT")
    if online:
        mu_in, sd_in = _gaussian_fit(shadows, mask, fixed_variance, min_std, "IN")
        score = stats.norm.logpdf(target, mu_in, sd_in) - stats.norm.logpdf(target, mu_out, sd_out)
    else:
        score = -stats.norm.logsf(target, mu_out, sd_out)
    return score.mean(axis=-1)


def lira_attack(
    conf: np.ndarray,
    membership: np.ndarray,
    online: bool = True,
    fixed_variance: bool = False,
    targets: Sequence[int] | None = None,
    min_std: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-model-out LiRA over a family of models trained on known halves.

    Each model in ``targets`` is attacked in turn with all other models as its shadows, and the scores of
    all (target, example) pairs are pooled, the evaluation protocol of Carlini et al. Run it once on the
    models trained on real halves and once on the models trained on synthetic data made from those halves
    to compare the two.

    Args:
        conf: Logit-scaled confidences of every model on every example, ``[n_models, n]`` or
            ``[n_models, n, n_queries]``.
        membership: Boolean ``[n_models, n]``: True where the model's (real) training half holds the example.
        online: See :func:`lira_scores`.
        fixed_variance: See :func:`lira_scores`.
        targets: Indices of the models to attack (default: all of them).
        min_std: See :func:`lira_scores`.

    Returns:
        ``(scores, is_member)``, two flat arrays of length ``len(targets) * n``.
    """
    c = np.asarray(conf, dtype=np.float64)
    mask = np.asarray(membership, dtype=bool)
    if c.ndim not in (2, 3) or mask.shape != c.shape[:2]:
        raise ValueError(f"conf {c.shape} must be [n_models, n(, q)] and membership {mask.shape} [n_models, n]")
    n_models = c.shape[0]
    if n_models < 3:
        raise ValueError(f"leave-one-out LiRA needs at least 3 models (1 target + 2 shadows), got {n_models}")
    chosen = list(range(n_models)) if targets is None else [int(t) for t in targets]
    for t in chosen:
        if not 0 <= t < n_models:
            raise ValueError(f"target index {t} out of range for {n_models} models")
    scores, members = [], []
    for t in chosen:
        rest = np.arange(n_models) != t
        scores.append(lira_scores(c[t], c[rest], mask[rest], online, fixed_variance, min_std))
        members.append(mask[t])
    return np.concatenate(scores), np.concatenate(members)


# -- metrics ---------------------------------------------------------------------------------------------


def roc_metrics(scores: np.ndarray, is_member: np.ndarray, fpr_levels: Sequence[float] = FPR_LEVELS) -> dict:
    """ROC curve, AUC and TPR at fixed low FPRs of a membership score.

    The TPR at an FPR level is the best TPR of any threshold whose FPR does not exceed the level (a step
    read of the empirical ROC, no interpolation towards better points; this is achievable by a plain
    threshold and never optimistic). With ``n_neg`` non-members the smallest non-zero FPR is ``1/n_neg``:
    below it the measured value is the TPR at FPR = 0, and the result says so in ``notes`` and in
    ``resolved``. Ties in the scores are handled as ties (one ROC point per distinct score).

    Args:
        scores: Membership scores, higher = more likely member, shape ``[m]``.
        is_member: Ground truth, boolean ``[m]``; both classes must be present.
        fpr_levels: FPRs to read the TPR at; keys are named by :func:`tpr_key`.

    Returns:
        dict with ``fpr``, ``tpr``, ``thresholds`` (arrays, ROC from the strictest threshold), ``auc``,
        ``balanced_accuracy`` (best over thresholds), one ``tpr_at_X%fpr`` per level, ``resolved`` (per key,
        whether the level is at least ``1/n_neg``), ``n_members``, ``n_nonmembers``, ``min_fpr`` and
        ``notes`` (list of caveats).
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(is_member).ravel()
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ValueError("is_member must be boolean (or 0/1)")
        y = y.astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and is_member ({y.size}) must have the same length")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need both members and non-members, got {n_pos} members and {n_neg} non-members")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # One ROC point per distinct score: the last index of each run of equal scores.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    thresholds = np.r_[np.inf, s_sorted[last]]
    auc = float(np.trapezoid(tpr, fpr))
    out: dict[str, Any] = {
        "fpr": fpr,
        "tpr": tpr,
        "thresholds": thresholds,
        "auc": auc,
        "balanced_accuracy": float(np.max(1.0 - (fpr + (1.0 - tpr)) / 2.0)),
        "n_members": n_pos,
        "n_nonmembers": n_neg,
        "min_fpr": 1.0 / n_neg,
        "resolved": {},
        "notes": [],
    }
    for level in fpr_levels:
        key = tpr_key(level)
        out[key] = float(tpr[fpr <= level + 1e-12].max())
        out["resolved"][key] = bool(level >= 1.0 / n_neg)
        if not out["resolved"][key]:
            out["notes"].append(
                f"{key}: only {n_neg} non-members, so the smallest non-zero FPR is {1.0 / n_neg:.2g}; the value "
                f"is the TPR at FPR = 0 (need >= {math.ceil(1.0 / level)} non-members to resolve {level:g})"
            )
        elif n_neg * level < 10:
            out["notes"].append(
                f"{key}: decided by {math.floor(n_neg * level + 1e-9)} false positive(s) of {n_neg} non-members; "
                "expect a large sampling error"
            )
    return out


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def results_table(rows: Mapping[str, Mapping[str, Any]], fpr_levels: Sequence[float] = FPR_LEVELS) -> str:
    """Markdown table of LiRA results, one row per target family (e.g. ``real`` and ``synthetic``).

    Args:
        rows: Name of the row -> the dict returned by :func:`roc_metrics`.
        fpr_levels: The FPR levels to show (must have been computed).

    Returns:
        A GitHub-flavoured markdown table; values measured below the FPR resolution carry a ``*`` and a
        footnote.
    """
    head = [
        "target",
        "AUC",
        *[f"TPR @ {lvl * 100:g}% FPR" for lvl in fpr_levels],
        "best bal. acc.",
        "members",
        "non-members",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    unresolved = False
    for name, m in rows.items():
        cells = [name, _fmt(m["auc"])]
        for lvl in fpr_levels:
            key = tpr_key(lvl)
            if key not in m:
                raise KeyError(f"row {name!r} has no {key}; compute roc_metrics with fpr_levels including {lvl}")
            mark = "" if m.get("resolved", {}).get(key, True) else "*"
            unresolved |= bool(mark)
            cells.append(_fmt(m[key], 4) + mark)
        cells += [_fmt(m["balanced_accuracy"]), str(m["n_members"]), str(m["n_nonmembers"])]
        lines.append("| " + " | ".join(cells) + " |")
    if unresolved:
        lines.append("")
        lines.append("\\* fewer non-members than 1/FPR: the value is the TPR at FPR = 0, not at the stated FPR.")
    return "\n".join(lines) + "\n"


def _downsample_curve(fpr: np.ndarray, tpr: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    """Keep a ROC curve small for JSON while preserving its low-FPR end (log-spaced picks)."""
    if fpr.size <= max_points:
        return fpr.tolist(), tpr.tolist()
    idx = np.unique(np.r_[0, np.geomspace(1, fpr.size - 1, max_points - 1).astype(int), fpr.size - 1])
    return fpr[idx].tolist(), tpr[idx].tolist()


def results_json(rows: Mapping[str, Mapping[str, Any]], curve_points: int = 200) -> dict[str, Any]:
    """JSON-serialisable form of :func:`roc_metrics` results, curves downsampled to ``curve_points``."""
    if curve_points < 2:
        raise ValueError(f"curve_points must be >= 2, got {curve_points}")
    out: dict[str, Any] = {}
    for name, m in rows.items():
        entry = {k: v for k, v in m.items() if k not in ("fpr", "tpr", "thresholds")}
        entry["resolved"] = dict(m.get("resolved", {}))
        entry["notes"] = list(m.get("notes", []))
        fpr, tpr = _downsample_curve(np.asarray(m["fpr"]), np.asarray(m["tpr"]), curve_points)
        entry["roc"] = {"fpr": fpr, "tpr": tpr}
        out[name] = entry
    return out


def lira_report(
    rows: Mapping[str, Mapping[str, Any]],
    out: Store | str | Path,
    title: str = "Membership inference (LiRA)",
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the LiRA results of several target families: ``lira_results.md``, ``.json`` and ``lira_roc.png``.

    Args:
        rows: Family name (e.g. ``real-trained``, ``synthetic-trained``) -> :func:`roc_metrics` result.
        out: Destination store (e.g. the run folder) or local folder.
        title: Title of the plot and the markdown file.
        settings: Attack settings recorded with the results (number of shadows, online, fixed variance...).

    Returns:
        ``{"table": markdown, "results": JSON dict, "files": {kind: URI}}``.
    """
    if not rows:
        raise ValueError("lira_report needs at least one row of results")
    store = out if isinstance(out, Store) else Store(str(Path(out).expanduser().resolve()))
    table = results_table(rows)
    results = {"settings": dict(settings or {}), "targets": results_json(rows)}
    notes = [f"- {name}: {note}" for name, m in rows.items() for note in m.get("notes", [])]
    markdown = f"# {title}\n\n{table}" + ("\n" + "\n".join(notes) + "\n" if notes else "")
    store.write_bytes(markdown.encode(), "lira_results.md")
    store.write_bytes(json.dumps(results, indent=2, sort_keys=True).encode(), "lira_results.json")
    store.write_bytes(plot_roc(rows, title=title), "lira_roc.png")
    files = {
        kind: store.uri(name)
        for kind, name in (("table", "lira_results.md"), ("results", "lira_results.json"), ("roc", "lira_roc.png"))
    }
    return {"table": table, "results": results, "files": files}
