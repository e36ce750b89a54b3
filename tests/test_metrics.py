"""The paper's metrics agree with scikit-learn and with a brute-force best-F1 search."""

import numpy as np
import pytest
from scripts.metrics import (
    anomaly_metrics,
    auc_standard_error,
    best_f1_threshold,
    paired_auc_difference_interval,
    validation_protocol,
)
from sklearn.metrics import f1_score, roc_auc_score


def _brute_force_best_f1(labels, scores):
    return max(f1_score(labels, (scores >= t).astype(int)) for t in np.unique(scores))


def test_metrics_match_sklearn_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    m = anomaly_metrics(labels, scores)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["f1"] == pytest.approx(_brute_force_best_f1(labels, scores))
    predicted = scores >= m["threshold"]
    assert m["sen"] == pytest.approx(predicted[labels == 1].mean())
    assert m["spe"] == pytest.approx((~predicted[labels == 0]).mean())
    assert m["acc"] == pytest.approx((predicted == labels).mean())


def test_metrics_by_hand_with_a_given_threshold():
    m = anomaly_metrics([0, 0, 0, 1, 1], [0.1, 0.2, 0.6, 0.5, 0.9], threshold=0.5)
    # predicted abnormal: 0.6, 0.5, 0.9 -> TP 2, FP 1, TN 2, FN 0
    assert (m["sen"], m["spe"], m["acc"]) == (1.0, pytest.approx(2 / 3), pytest.approx(4 / 5))
    assert m["f1"] == pytest.approx(0.8)
    assert m["auc"] == pytest.approx(5 / 6)


def test_single_class_gives_nan_not_a_crash():
    m = anomaly_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert np.isnan(m["auc"]) and m["n_normal"] == 3


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="not finite"):
        anomaly_metrics([0, 1], [0.1, float("nan")])


def test_best_f1_threshold_is_an_observed_score():
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.2, 0.8, 0.4, 0.3])
    assert best_f1_threshold(labels, scores) in scores


def test_validation_protocol_is_stratified_and_uses_held_out_thresholds():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(100, int), np.ones(150, int)]
    scores = rng.normal(size=250) + 1.5 * labels
    result = validation_protocol(labels, scores, n_folds=5, seed=3)
    assert len(result["folds"]) == 5
    for fold in result["folds"]:
        assert (fold["n_normal"], fold["n_abnormal"]) == (80, 120)  # 80 % of each class
    assert result["summary"]["auc"]["std"] > 0
    assert 0.7 < result["summary"]["auc"]["mean"] < 1.0


def test_validation_protocol_is_skipped_with_its_reason_when_a_part_could_hold_no_abnormal_item(caplog):
    """With 2 abnormal items of 40, a 20 % validation part holds none, and its best-F1 threshold means nothing;
    with 1, scikit-learn's stratified split raised, losing the evaluation's other metrics."""
    for abnormal in (1, 2):
        labels = np.r_[np.zeros(40, int), np.ones(abnormal, int)]
        with caplog.at_level("WARNING"):
            result = validation_protocol(labels, np.arange(labels.size, dtype=float), n_folds=5)
        assert result["folds"] == [] and result["summary"] == {}
        assert "cannot hold both classes" in result["skipped"] and "skipped" in caplog.text
    result = validation_protocol(np.r_[np.zeros(40, int), np.ones(5, int)], np.arange(45.0))
    assert len(result["folds"]) == 5 and "skipped" not in result


def test_auc_standard_error_matches_the_spread_of_aucs_over_resampled_validation_splits():
    """Hanley and McNeil's formula against the spread of the AUC over 400 fresh binormal splits of 98 normal and
    100 abnormal images (HAM10000's validation split)."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(98, int), np.ones(100, int)]
    aucs = [roc_auc_score(labels, rng.normal(size=198) + 1.1 * labels) for _ in range(400)]
    estimate = auc_standard_error(float(np.mean(aucs)), 100, 98)
    assert estimate == pytest.approx(np.std(aucs), rel=0.15)
    assert auc_standard_error(0.78, 100, 98) > auc_standard_error(0.78, 400, 392) > 0  # more images, less noise
    assert auc_standard_error(1.0, 10, 10) == 0.0


def test_paired_auc_interval_separates_a_real_gain_from_what_the_validation_sample_alone_can_make():
    """Two designs on the same 98 + 100 images: the same scores give a zero interval; a second design that adds
    independent noise to the first lies below it (interval under zero); one whose gain is three images' luck
    does not lie above zero; each bound is an AUC difference that one resample of the images actually gave."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(98, int), np.ones(100, int)]
    signal = rng.normal(size=(3, 198)) + 1.1 * labels
    assert paired_auc_difference_interval(labels, signal, signal) == (0.0, 0.0)
    noisier = signal + 2.0 * rng.normal(size=signal.shape)
    low, high = paired_auc_difference_interval(labels, noisier, signal)
    assert low < high < 0
    point = np.mean([roc_auc_score(labels, n) - roc_auc_score(labels, s) for n, s in zip(noisier, signal)])
    assert low < point < high
    lucky = signal.copy()
    lucky[:, np.flatnonzero(labels)[:3]] += 5.0  # three abnormal images pushed to the top
    low, high = paired_auc_difference_interval(labels, lucky, signal)
    assert low <= 0 < high
    with pytest.raises(ValueError, match="labels"):
        paired_auc_difference_interval(labels, signal[:, :10], signal[:, :10])
