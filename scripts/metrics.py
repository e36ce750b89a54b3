"""The paper's metrics (AUC, F1, ACC, SEN, SPE) and both evaluation protocols, on top of scikit-learn.

* Paper protocol (section 3.3): the threshold is the one with the best F1 on the scored set itself, which
  flatters every method equally but is not available in deployment.
* Deployment protocol (appendix A): a stratified 20/80 split; the threshold is chosen on the 20 % and applied
  unchanged to the 80 %; repeated over five folds for mean +- std (table 4).

A design study compares two designs on the same validation images with ``paired_rule``: higher in every seed, by
more than ``NOISE_MARGIN`` on average, and with the paired bootstrap interval of the gain
(``paired_auc_difference_interval``) above zero.

>>> m = anomaly_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
>>> round(m["auc"], 2), m["n_normal"], m["n_abnormal"]
(0.75, 2, 2)
"""

from __future__ import annotations

import logging
import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_curve, recall_score, roc_auc_score
from sklearn.model_selection import StratifiedShuffleSplit

logger = logging.getLogger(__name__)
METRICS = ("auc", "f1", "acc", "sen", "spe")


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=int).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores.")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} anomaly score(s) are not finite.")
    return labels, scores


def best_f1_threshold(labels, scores) -> float:
    """Smallest score threshold (score >= threshold means abnormal) that maximises F1."""
    labels, scores = _as_arrays(labels, scores)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(thresholds[int(np.argmax(f1[:-1]))])


def auc_standard_error(auc: float, n_abnormal: int, n_normal: int) -> float:
    """Hanley and McNeil's (1982) standard error of an ROC AUC measured on so many images: how far apart two
    designs' AUCs on one small validation split must be before the split can tell them apart."""
    q1, q2 = auc / (2.0 - auc), 2.0 * auc**2 / (1.0 + auc)
    variance = auc * (1 - auc) + (n_abnormal - 1) * (q1 - auc**2) + (n_normal - 1) * (q2 - auc**2)
    return math.sqrt(max(variance, 0.0) / (n_abnormal * n_normal))


def _rank_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (the Mann-Whitney statistic, ties counted half), vectorised over rows."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=-1)
    n_abnormal = labels.sum(axis=-1)
    n_normal = labels.shape[-1] - n_abnormal
    return ((ranks * labels).sum(axis=-1) - n_abnormal * (n_abnormal + 1) / 2) / (n_abnormal * n_normal)


def paired_auc_difference_interval(
    labels, new_scores, old_scores, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of the mean-over-seeds AUC difference between two designs scored on the same images.

    The images are resampled within each class, the same draw for both designs and every seed, so the interval
    shows how large a difference the validation sample alone can make: several seeds guard against training
    noise, not against a small split that happens to favour one design. ``new_scores`` and ``old_scores`` hold one
    row of image scores per seed."""
    labels = np.asarray(labels, dtype=int)
    new, old = (np.atleast_2d(np.asarray(scores, dtype=float)) for scores in (new_scores, old_scores))
    if new.shape != old.shape or new.shape[-1] != labels.size:
        raise ValueError(f"{labels.size} labels, but scores of shapes {new.shape} and {old.shape}.")
    if labels.min() == labels.max():
        raise ValueError("A paired AUC interval needs both normal and abnormal images.")
    rng = np.random.default_rng(seed)
    draws = np.concatenate(
        [
            rng.choice(members, size=(resamples, members.size))
            for members in (np.flatnonzero(labels == 0), np.flatnonzero(labels))
        ],
        axis=1,
    )
    drawn_labels = labels[draws]
    differences = np.mean(
        [_rank_auc(drawn_labels, a[draws]) - _rank_auc(drawn_labels, b[draws]) for a, b in zip(new, old)], axis=0
    )
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return float(low), float(high)


def anomaly_metrics(labels, scores, threshold: float | None = None) -> dict:
    """AUC plus F1/ACC/SEN/SPE at ``threshold`` (default: best F1 on these very scores, the paper's protocol)."""
    labels, scores = _as_arrays(labels, scores)
    n_abnormal, n_normal = int(labels.sum()), int((labels == 0).sum())
    result = {"n_normal": n_normal, "n_abnormal": n_abnormal}
    if n_abnormal == 0 or n_normal == 0:
        logger.warning(
            "Metrics need both normal and abnormal items (got %d normal, %d abnormal).", n_normal, n_abnormal
        )
        return {**result, **{name: math.nan for name in METRICS}, "threshold": math.nan}
    threshold = best_f1_threshold(labels, scores) if threshold is None else float(threshold)
    predicted = (scores >= threshold).astype(int)
    return {
        **result,
        "auc": float(roc_auc_score(labels, scores)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "acc": float(accuracy_score(labels, predicted)),
        "sen": float(recall_score(labels, predicted, zero_division=0)),
        "spe": float(recall_score(labels, predicted, pos_label=0, zero_division=0)),
        "threshold": threshold,
    }


def validation_protocol(labels, scores, n_folds: int = 5, validation_fraction: float = 0.2, seed: int = 0) -> dict:
    """Appendix A: threshold from a stratified validation part, metrics on the rest; mean and std over folds.

    Skipped (with the reason in the result and the log) when a validation part would lack a class: a threshold
    chosen on a part without abnormal items is no threshold."""
    labels, scores = _as_arrays(labels, scores)
    splitter = StratifiedShuffleSplit(n_splits=n_folds, test_size=1 - validation_fraction, random_state=seed)
    try:
        parts = list(splitter.split(scores.reshape(-1, 1), labels))
        lacking = next((f"a part of {len(val)} held one class" for val, _ in parts if len(set(labels[val])) < 2), None)
    except ValueError as error:  # scikit-learn's own refusal, e.g. a class of one item
        parts, lacking = [], str(error)
    if lacking is not None:
        counts = {"normal": int((labels == 0).sum()), "abnormal": int((labels == 1).sum())}
        reason = f"a {validation_fraction:.0%} part of {counts} cannot hold both classes: {lacking}"
        logger.warning("The %d-fold validation protocol is skipped: %s.", n_folds, reason)
        return {"skipped": reason, "folds": [], "summary": {}, "validation_fraction": validation_fraction, "seed": seed}
    folds = []
    for val_idx, test_idx in parts:
        threshold = best_f1_threshold(labels[val_idx], scores[val_idx])
        folds.append(anomaly_metrics(labels[test_idx], scores[test_idx], threshold))
    summary = {
        name: {"mean": float(np.mean([f[name] for f in folds])), "std": float(np.std([f[name] for f in folds]))}
        for name in METRICS
    }
    return {"folds": folds, "summary": summary, "validation_fraction": validation_fraction, "seed": seed}


NOISE_MARGIN = 0.81  # AUC points: the study's noise margin (docs/results.md), a rule's minimum average gain


def paired_rule(study: dict, baseline: dict, margin: float = NOISE_MARGIN) -> dict:
    """The study's pre-registered rule against an earlier study of the same seeds (each a seed summary: an
    ensemble's, or a ``compare`` variant's): a design replaces the baseline only if its validation AUC is higher in
    every seed and by more than ``margin`` points on average, and, where both studies kept their validation scores
    (``ensemble-seeds`` since bundle 0.12.2, ``compare`` since 0.12.3), only if the 95 % bootstrap interval of
    that mean difference over the validation images lies above zero: the seeds guard against training noise, the
    interval against a small validation split. Test AUC takes no part; both ran the same seeds, in the same order.
    A design, or a baseline, with a diverged seed has no validation AUC there: the rule is not met."""
    diverged = [side for side, summary in (("design", study), ("baseline", baseline)) if "diverged" in summary]
    if diverged:
        return {"diverged": diverged, "margin": margin, "met": False}
    new, old = (np.asarray(s["validation_auc"]["values"]) * 100 for s in (study, baseline))
    differences = new - old
    higher = int((differences > 0).sum())
    rule = {
        "baseline_validation_auc": [round(float(v), 2) for v in old],
        "differences": [round(float(d), 2) for d in differences],
        "higher_in": higher,
        "mean_difference": round(float(differences.mean()), 2),
        "margin": margin,
        "met": bool(higher == len(differences) and differences.mean() > margin),
    }
    scored = [s.get("validation_scores") for s in (study, baseline)]
    rule["validation_sample_interval"] = None  # an older study kept no scores: the rule without it
    if all(scored):
        if scored[0]["labels"] != scored[1]["labels"]:
            raise ValueError("The study and its baseline scored different validation images: no paired rule.")
        interval = paired_auc_difference_interval(scored[0]["labels"], scored[0]["values"], scored[1]["values"])
        rule["validation_sample_interval"] = [round(100 * bound, 2) for bound in interval]
        rule["met"] = bool(rule["met"] and interval[0] > 0)
    return rule


def seed_scores(per_seed: list[tuple]) -> dict:
    """Each seed's (labels, scores) on the validation images, which every seed scores in the same order."""
    labels = [int(label) for label in per_seed[0][0]]
    if any([int(label) for label in seed_labels] != labels for seed_labels, _ in per_seed):
        raise ValueError("The seeds scored different validation images.")
    return {"labels": labels, "values": [[float(score) for score in scores] for _, scores in per_seed]}
