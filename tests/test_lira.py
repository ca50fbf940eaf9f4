"""Tests of the LiRA membership-inference scorer, its metrics and its report (realfake.privacy.lira)."""

from __future__ import annotations

import io
import json
import statistics
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from scipy.special import softmax
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from realfake.data.storage import Store
from realfake.privacy.lira import (
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
from realfake.privacy.plots import plot_roc

# -- logit_confidence ------------------------------------------------------------------------------------


def test_logit_confidence_matches_log_odds_of_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(50, 7))
    labels = rng.integers(0, 7, size=50)
    p = softmax(logits, axis=1)[np.arange(50), labels]
    np.testing.assert_allclose(logit_confidence(logits, labels), np.log(p / (1 - p)), rtol=1e-10, atol=1e-10)


def test_logit_confidence_is_exact_where_probabilities_saturate():
    # p = 1 - 2e-400 is 1.0 in floating point, yet the log-odds are exactly 400 + log(1/2) here.
    logits = np.array([[400.0, 0.0, 0.0], [0.0, -50.0, 0.0]])
    phi = logit_confidence(logits, np.array([0, 1]))
    np.testing.assert_allclose(phi, [400.0 - np.log(2.0), -50.0 - np.log(2.0)], rtol=1e-12)


def test_logit_confidence_broadcasts_labels_over_queries():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4, 5))  # examples x augmentations x classes
    labels = rng.integers(0, 5, size=6)
    phi = logit_confidence(logits, labels)
    assert phi.shape == (6, 4)
    for q in range(4):
        np.testing.assert_allclose(phi[:, q], logit_confidence(logits[:, q], labels))


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (np.zeros((3, 1)), np.zeros(3, int), "n_classes >= 2"),
        (np.zeros((3, 4)), np.array([0, 4, 1]), "labels must lie"),
        (np.zeros((3, 4)), np.zeros(2, int), "prefix"),
        (np.zeros((3, 4)), np.zeros(3), "integers"),
        (np.array([[0.0, np.nan]]), np.array([0]), "NaN"),
    ],
)
def test_logit_confidence_rejects_bad_input(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        logit_confidence(logits, labels)


# -- shadow_splits ---------------------------------------------------------------------------------------


def test_shadow_splits_put_every_example_in_half_the_shadows():
    mask = shadow_splits(1000, 16, seed=3)
    assert mask.shape == (16, 1000) and mask.dtype == bool
    assert (mask.sum(axis=0) == 8).all()
    # Each shadow trains on about half the set (Binomial(1000, 1/2): sd ~16).
    assert np.all(np.abs(mask.sum(axis=1) - 500) < 80)
    np.testing.assert_array_equal(mask, shadow_splits(1000, 16, seed=3))
    assert not np.array_equal(mask, shadow_splits(1000, 16, seed=4))


def test_shadow_splits_odd_count_and_paired_design():
    odd = shadow_splits(501, 5, seed=0).sum(axis=0)
    assert set(np.unique(odd)) == {2, 3}
    paired = shadow_splits(501, 6, seed=0, paired=True)
    assert (paired.sum(axis=0) == 3).all()
    assert set(paired.sum(axis=1)) <= {250, 251}
    np.testing.assert_array_equal(paired[0], ~paired[1])
    with pytest.raises(ValueError, match="even"):
        shadow_splits(10, 5, seed=0, paired=True)
    with pytest.raises(ValueError, match="n_shadows"):
        shadow_splits(10, 1, seed=0)


# -- lira_scores against a hand computation --------------------------------------------------------------

# Four shadows, two examples. Example 0: IN for shadows 0 and 2, example 1: IN for shadows 1, 2, 3.
TINY_CONF = np.array([[2.0, -1.0], [0.5, 3.0], [2.6, 2.2], [0.1, 2.9]])
TINY_IN = np.array([[True, False], [False, True], [True, True], [False, True]])
TINY_TARGET = np.array([1.7, 0.0])


def test_online_score_is_the_gaussian_log_likelihood_ratio():
    expected = []
    for i in range(2):
        ins = [TINY_CONF[s, i] for s in range(4) if TINY_IN[s, i]]
        outs = [TINY_CONF[s, i] for s in range(4) if not TINY_IN[s, i]]
        if len(outs) < 2:  # example 1 has one OUT shadow: its std is the pooled OUT std of the example set
            continue
        lr = stats.norm.pdf(TINY_TARGET[i], statistics.mean(ins), statistics.stdev(ins)) / stats.norm.pdf(
            TINY_TARGET[i], statistics.mean(outs), statistics.stdev(outs)
        )
        expected.append(np.log(lr))
    scores = lira_scores(TINY_TARGET, TINY_CONF, TINY_IN, online=True)
    assert scores.shape == (2,)
    np.testing.assert_allclose(scores[0], expected[0], rtol=1e-10)


def test_single_out_shadow_falls_back_to_pooled_variance_and_offline_is_one_sided():
    # OUT residuals: example 0 {0.5, 0.1} around 0.3 -> 0.2^2 * 2 = 0.08 over 1 dof; example 1 has one OUT.
    pooled_out = np.sqrt(0.08 / 1)
    ins1 = [3.0, 2.2, 2.9]
    online = lira_scores(TINY_TARGET, TINY_CONF, TINY_IN, online=True)
    expected1 = stats.norm.logpdf(0.0, np.mean(ins1), np.std(ins1, ddof=1)) - stats.norm.logpdf(0.0, -1.0, pooled_out)
    np.testing.assert_allclose(online[1], expected1, rtol=1e-10)

    offline = lira_scores(TINY_TARGET, TINY_CONF, TINY_IN, online=False)
    # Lambda = 1 - Pr[Z > phi], Z ~ N(mu_out, sd_out); returned as -log Pr[Z > phi] (same ranking).
    lam = np.array([1 - stats.norm.sf(1.7, 0.3, pooled_out), 1 - stats.norm.sf(0.0, -1.0, pooled_out)])
    np.testing.assert_allclose(1 - np.exp(-offline), lam, rtol=1e-10)


def test_fixed_variance_uses_the_pooled_within_example_std():
    # IN residuals: example 0 {2.0, 2.6} -> 0.18 over 1 dof; example 1 {3.0, 2.2, 2.9} -> 0.38 over 2 dof.
    ins1 = np.array([3.0, 2.2, 2.9])
    sd_in = np.sqrt((0.18 + ((ins1 - ins1.mean()) ** 2).sum()) / 3)
    sd_out = np.sqrt(0.08 / 1)
    scores = lira_scores(TINY_TARGET, TINY_CONF, TINY_IN, online=True, fixed_variance=True)
    expected = [
        stats.norm.logpdf(1.7, 2.3, sd_in) - stats.norm.logpdf(1.7, 0.3, sd_out),
        stats.norm.logpdf(0.0, ins1.mean(), sd_in) - stats.norm.logpdf(0.0, -1.0, sd_out),
    ]
    np.testing.assert_allclose(scores, expected, rtol=1e-10)


def test_queries_are_scored_separately_then_averaged():
    rng = np.random.default_rng(5)
    mask = shadow_splits(30, 8, seed=1)
    conf = rng.normal(size=(8, 30, 3))
    target = rng.normal(size=(30, 3))
    per_query = [lira_scores(target[:, q], conf[:, :, q], mask) for q in range(3)]
    np.testing.assert_allclose(lira_scores(target, conf, mask), np.mean(per_query, axis=0), rtol=1e-12)


def test_lira_scores_validate_shapes_and_membership():
    with pytest.raises(ValueError, match="shadow_in shape"):
        lira_scores(TINY_TARGET, TINY_CONF, TINY_IN[:, :1])
    with pytest.raises(ValueError, match="boolean"):
        lira_scores(TINY_TARGET, TINY_CONF, TINY_IN.astype(int))
    never_in = TINY_IN.copy()
    never_in[:, 0] = False
    with pytest.raises(ValueError, match="no IN shadow model .first: index 0"):
        lira_scores(TINY_TARGET, TINY_CONF, never_in, online=True)
    assert np.isfinite(lira_scores(TINY_TARGET, TINY_CONF, never_in, online=False)).all()  # OUT-only is fine
    with pytest.raises(ValueError, match="no OUT shadow model .first: index 1"):
        lira_scores(TINY_TARGET, TINY_CONF, TINY_IN | np.array([[False, True]]), online=False)


def test_per_example_calibration_beats_a_global_threshold():
    """Examples differ in difficulty far more than membership shifts them: only a per-example test sees it."""
    rng = np.random.default_rng(7)
    n, n_models = 2000, 17
    difficulty = rng.normal(0, 4, size=n)
    mask = shadow_splits(n, n_models, seed=2)
    conf = difficulty[None] + 1.0 * mask + rng.normal(0, 0.5, size=(n_models, n))
    scores, members = lira_attack(conf, mask, online=True, targets=[0, 1, 2])
    lira_auc = roc_metrics(scores, members)["auc"]
    naive_auc = roc_metrics(conf[:3].ravel(), mask[:3].ravel())["auc"]
    # The separation is d' = 2 (AUC = Phi(sqrt(2)) ~ 0.92 with known Gaussians); the raw confidence barely sees it.
    assert lira_auc > 0.85
    assert naive_auc < 0.6


# -- planted membership with real classifiers ------------------------------------------------------------


def _digits_pool(n: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A pool of digits for the audit (with a share of flipped labels) and disjoint spare digits."""
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    pool, spare = order[:n], order[n:]
    yp = y[pool].copy()
    # Mislabelled examples can only be fitted by memorising them: the planted membership signal.
    flip = rng.random(n) < noise
    yp[flip] = (yp[flip] + rng.integers(1, 10, size=flip.sum())) % 10
    return x[pool], yp, x[spare], y[spare]


def _fit(x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    # Weak regularisation and a fixed iteration budget: the model fits its half almost perfectly (overfits).
    # One BLAS thread: these fits are tiny, and oversubscribed threads on a shared machine cost 40x.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=100.0, max_iter=200).fit(x, y)


@pytest.fixture(scope="module")
def digits_models():
    x, y, x_spare, y_spare = _digits_pool(400, seed=0, noise=0.1)
    mask = shadow_splits(len(x), 12, seed=0)
    conf = np.stack([logit_confidence(_fit(x[m], y[m]).decision_function(x), y) for m in mask])
    return x, y, x_spare, y_spare, mask, conf


def test_memorising_classifiers_are_detected(digits_models):
    _, _, _, _, mask, conf = digits_models
    for online in (True, False):
        scores, members = lira_attack(conf, mask, online=online, fixed_variance=True)
        m = roc_metrics(scores, members)
        assert m["n_members"] == m["n_nonmembers"] == 12 * 200
        assert m["auc"] > 0.7, (online, m["auc"])
        # At 1% FPR a blind guess finds 1% of members; the attack finds many times that.
        assert m[tpr_key(0.01)] > 0.05, (online, m[tpr_key(0.01)])


def test_model_trained_on_disjoint_data_looks_like_a_non_member(digits_models):
    x, y, x_spare, y_spare, mask, conf = digits_models
    outsider = _fit(x_spare[:200], y_spare[:200])  # never saw any audited example
    target_conf = logit_confidence(outsider.decision_function(x), y)
    claimed = shadow_splits(len(x), 2, seed=99)[0]  # "membership" the target does not actually have
    m = roc_metrics(lira_scores(target_conf, conf, mask, fixed_variance=True), claimed)
    assert abs(m["auc"] - 0.5) < 0.08, m["auc"]


# -- metrics and report ----------------------------------------------------------------------------------


def test_roc_metrics_on_a_hand_example_with_ties():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.85, 0.8, 0.1, 0.05])
    member = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    m = roc_metrics(scores, member, fpr_levels=(0.2, 0.3))
    # Distinct thresholds: 0.9 (1 TP), 0.85 (+1 FP), 0.8 (+2 TP, +1 FP), 0.3 (+1 TP), 0.1, 0.05.
    np.testing.assert_allclose(m["tpr"], [0, 0.25, 0.25, 0.75, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(m["fpr"], [0, 0, 0.25, 0.5, 0.5, 0.75, 1.0])
    # AUC = P(member > non-member) + 0.5 P(tie), counted over all pairs.
    pairwise = np.mean([(a > b) + 0.5 * (a == b) for a in scores[member] for b in scores[~member]])
    assert m["auc"] == pytest.approx(pairwise)
    # Best TPR with FPR <= level; no interpolation towards the point at FPR 0.5.
    assert m[tpr_key(0.2)] == 0.25 and m[tpr_key(0.3)] == 0.25
    assert m["resolved"] == {tpr_key(0.2): False, tpr_key(0.3): True}
    assert any("TPR at FPR = 0" in note for note in m["notes"])


def test_roc_metrics_extremes_and_errors():
    y = np.r_[np.ones(500, bool), np.zeros(2000, bool)]
    perfect = roc_metrics(np.r_[np.ones(500), np.zeros(2000)], y)
    assert perfect["auc"] == 1.0 and perfect[tpr_key(0.001)] == 1.0 and perfect["balanced_accuracy"] == 1.0
    assert all(perfect["resolved"].values())
    worst = roc_metrics(np.r_[np.zeros(500), np.ones(2000)], y)
    assert worst["auc"] == 0.0 and worst[tpr_key(0.01)] == 0.0
    with pytest.raises(ValueError, match="both members and non-members"):
        roc_metrics(np.ones(3), np.ones(3, bool))


def test_results_table_json_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random(3000) < 0.5
    rows = {
        "real-trained": roc_metrics(rng.normal(size=3000) + 1.5 * y, y),
        "synthetic-trained": roc_metrics(rng.normal(size=3000) + 0.1 * y, y),
        "few targets": roc_metrics(rng.normal(size=40) + y[:40], y[:40]),
    }
    table = results_table(rows)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| target | AUC | TPR @ 0.1% FPR | TPR @ 1% FPR")
    assert lines[2].startswith(f"| real-trained | {rows['real-trained']['auc']:.3f} |")
    assert "*" in lines[4] and "TPR at FPR = 0" in table

    blob = json.dumps(results_json(rows, curve_points=50))
    back = json.loads(blob)
    assert back["real-trained"]["auc"] == pytest.approx(rows["real-trained"]["auc"])
    assert len(back["real-trained"]["roc"]["fpr"]) <= 50
    assert back["real-trained"]["roc"]["fpr"][0] == 0.0 and back["real-trained"]["roc"]["tpr"][-1] == 1.0

    png = plot_roc(rows, tmp_path / "roc" / "lira_roc.png")
    assert (tmp_path / "roc" / "lira_roc.png").read_bytes() == png
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300

    written = lira_report(rows, Store(str(tmp_path / "run")), settings={"n_shadows": 16, "online": True})
    assert written["table"] == table
    assert (tmp_path / "run" / "lira_results.md").read_text().startswith("# Membership inference (LiRA)\n\n| target")
    on_disk = json.loads((tmp_path / "run" / "lira_results.json").read_text())
    assert on_disk["settings"]["n_shadows"] == 16 and set(on_disk["targets"]) == set(rows)
    with Image.open(tmp_path / "run" / "lira_roc.png") as im:
        assert im.format == "PNG"
