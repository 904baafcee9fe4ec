r"""Slide-level classification metrics (scikit-learn), bootstrap confidence intervals and thresholds.

Every function takes integer labels ``y_true`` [N] and class probabilities ``probs`` [N, C]
(rows summing to one) as NumPy arrays or tensors.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score,
                             roc_auc_score, roc_curve)

#: Metric names in the order they are reported.
METRIC_NAMES = ("auc", "balanced_acc", "f1", "acc", "qwk")


def _arrays(y_true, probs):
    y_true = np.asarray(_numpy(y_true)).astype(np.int64).reshape(-1)
    probs = np.asarray(_numpy(probs), dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0]:
        raise ValueError(f"probs must be [N, C] with N = len(y_true) (got {probs.shape} for {y_true.shape[0]} labels)")
    return y_true, probs


def _numpy(value):
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value


def _labels(y_pred, n: int) -> np.ndarray:
    y_pred = np.asarray(_numpy(y_pred)).astype(np.int64).reshape(-1)
    if y_pred.shape[0] != n:
        raise ValueError(f"y_pred has {y_pred.shape[0]} entries for {n} labels")
    return y_pred


def predict_labels(probs, threshold: Optional[float] = None) -> np.ndarray:
    r"""Predicted classes: ``argmax`` of the probabilities, or for two classes
    :math:`\hat y = [p_1 \ge t]` when a decision threshold :math:`t` is given."""
    probs = np.asarray(_numpy(probs), dtype=np.float64)
    if threshold is not None:
        if probs.shape[1] != 2:
            raise ValueError("a decision threshold applies to binary tasks only")
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1).astype(np.int64)


def auc_score(y_true, probs) -> float:
    r"""ROC AUC: of :math:`p_1` for two classes, macro-averaged one-vs-rest for more; NaN when a
    class needed for it is absent from ``y_true``."""
    y_true, probs = _arrays(y_true, probs)
    num_classes = probs.shape[1]
    present = np.unique(y_true)
    if num_classes == 2:
        if present.size < 2:
            return float("nan")
        return float(roc_auc_score(y_true, probs[:, 1]))
    if present.size != num_classes:
        # One-vs-rest over the classes present would silently change the metric's meaning.
        return float("nan")
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=np.arange(num_classes)))


def classification_metrics(y_true, probs, threshold: Optional[float] = None,
                           ordinal: bool = False, y_pred=None) -> Dict[str, float]:
    r"""AUC, balanced accuracy, weighted F1 and accuracy of one set of predictions, and the
    quadratic-weighted Cohen's kappa when ``ordinal`` (class indices are ordered grades).

    Args:
        y_true: labels [N].
        probs: probabilities [N, C].
        threshold: binary decision threshold on :math:`p_1` (chosen on validation data, see
            :func:`youden_threshold`); ``None`` predicts the argmax.
        ordinal: also report ``qwk``.
        y_pred: predicted classes [N], overriding ``threshold`` (e.g. pooled predictions of
            folds with different thresholds).

    Returns:
        ``{"auc", "balanced_acc", "f1", "acc"}`` (and ``"qwk"``) → value; the AUC is NaN when a
        class is missing from ``y_true``.
    """
    y_true, probs = _arrays(y_true, probs)
    y_pred = predict_labels(probs, threshold) if y_pred is None else _labels(y_pred, y_true.shape[0])
    labels = np.arange(probs.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-class bootstrap resamples: metrics defined as NaN/0
        out = {
            "auc": auc_score(y_true, probs),
            "balanced_acc": float(balanced_accuracy_score(y_true, y_pred)),
            "f1": float(f1_score(y_true, y_pred, average="weighted", labels=labels, zero_division=0)),
            "acc": float(accuracy_score(y_true, y_pred)),
        }
        if ordinal:
            out["qwk"] = _qwk(y_true, y_pred, labels)
    return out


def _qwk(y_true, y_pred, labels) -> float:
    value = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=labels)
    # Kappa is undefined (0/0) when both raters use one single class; sklearn then gives NaN.
    return float(value)


def resampled_metrics(y_true, probs, index, threshold: Optional[float] = None,
                      ordinal: bool = False, y_pred=None) -> Dict[str, np.ndarray]:
    r"""The metrics of :func:`classification_metrics` on many resamples at once.

    Vectorised over resamples (ranks for the AUC, one confusion matrix per resample for the
    rest), with the same definitions as scikit-learn's functions: macro one-vs-rest AUC (NaN
    when a class is missing), balanced accuracy over the classes present, support-weighted F1
    with :math:`0/0 = 0`, and quadratic-weighted kappa (NaN when undefined).

    Args:
        index: ``[S, n]`` integer array; row :math:`s` lists the slides of resample :math:`s`.

    Returns:
        metric name → ``[S]`` array.
    """
    from scipy.stats import rankdata
    y_true, probs = _arrays(y_true, probs)
    index = np.asarray(index, dtype=np.int64)
    num_resamples, n = index.shape
    num_classes = probs.shape[1]
    labels = y_true[index]                                   # [S, n]
    predicted = predict_labels(probs, threshold) if y_pred is None else _labels(y_pred, y_true.shape[0])
    predicted = predicted[index]                             # [S, n]

    # AUC: Mann-Whitney statistic from average ranks, one class against the rest.
    def binary_auc(score, positive):
        ranks = rankdata(score, axis=1)
        num_positive = positive.sum(axis=1)
        num_negative = n - num_positive
        rank_sum = (ranks * positive).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = (rank_sum - num_positive * (num_positive + 1) / 2.0) / (num_positive * num_negative)
        return np.where((num_positive > 0) & (num_negative > 0), auc, np.nan)

    if num_classes == 2:
        auc = binary_auc(probs[index, 1], labels == 1)
    else:
        per_class = np.stack([binary_auc(probs[index, c], labels == c) for c in range(num_classes)], axis=1)
        auc = per_class.mean(axis=1)  # NaN as soon as one class is missing, like the point estimate

    flat = (np.arange(num_resamples)[:, None] * num_classes + labels) * num_classes + predicted
    confusion = np.bincount(flat.ravel(), minlength=num_resamples * num_classes * num_classes)
    confusion = confusion.reshape(num_resamples, num_classes, num_classes).astype(np.float64)
    true_positive = np.diagonal(confusion, axis1=1, axis2=2)
    support = confusion.sum(axis=2)
    predicted_count = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, true_positive / support, 0.0)
        balanced = recall.sum(axis=1) / (support > 0).sum(axis=1)
        denominator = support + predicted_count
        f1 = np.where(denominator > 0, 2.0 * true_positive / denominator, 0.0)
    out = {
        "auc": auc,
        "balanced_acc": balanced,
        "f1": (f1 * support).sum(axis=1) / n,
        "acc": true_positive.sum(axis=1) / n,
    }
    if ordinal:
        grades = np.arange(num_classes, dtype=np.float64)
        weight = (grades[:, None] - grades[None, :]) ** 2
        expected = support[:, :, None] * predicted_count[:, None, :] / n
        observed_cost = (confusion * weight).sum(axis=(1, 2))
        expected_cost = (expected * weight).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out["qwk"] = np.where(expected_cost > 0, 1.0 - observed_cost / expected_cost, np.nan)
    return out


def bootstrap_ci(y_true, probs, threshold: Optional[float] = None, ordinal: bool = False,
                 num_samples: int = 1000, alpha: float = 0.05, seed: int = 0, y_pred=None) -> Dict[str, tuple]:
    r"""Percentile bootstrap :math:`(1-\alpha)` confidence intervals of :func:`classification_metrics`.

    Slides are resampled with replacement ``num_samples`` times (:func:`resampled_metrics`);
    resamples on which a metric is undefined (e.g. one class only for the AUC) are left out of
    that metric's interval.

    Returns:
        metric name → ``(low, high)``; ``(nan, nan)`` when no resample defines the metric.
    """
    y_true, probs = _arrays(y_true, probs)
    n = y_true.shape[0]
    if n == 0 or num_samples < 1:
        names = METRIC_NAMES if ordinal else METRIC_NAMES[:-1]
        return {name: (float("nan"), float("nan")) for name in names}
    index = np.random.default_rng(seed).integers(0, n, size=(int(num_samples), n))
    out = {}
    for name, samples in resampled_metrics(y_true, probs, index, threshold, ordinal, y_pred).items():
        samples = samples[np.isfinite(samples)]
        if samples.size == 0:
            out[name] = (float("nan"), float("nan"))
        else:
            low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
            out[name] = (float(low), float(high))
    return out


def youden_threshold(y_true, probs) -> float:
    r"""Binary decision threshold maximising Youden's :math:`J = \mathrm{TPR} - \mathrm{FPR}`
    on the given (validation) predictions; 0.5 when one class is missing."""
    y_true, probs = _arrays(y_true, probs)
    if probs.shape[1] != 2:
        raise ValueError("a decision threshold applies to binary tasks only")
    if np.unique(y_true).size < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, probs[:, 1])
    best = int(np.argmax(tpr - fpr))
    threshold = float(thresholds[best])
    return min(threshold, 1.0) if math.isfinite(threshold) else 1.0


def cross_entropy(y_true, probs) -> float:
    r"""Mean negative log-likelihood of the true classes."""
    y_true, probs = _arrays(y_true, probs)
    picked = probs[np.arange(y_true.shape[0]), y_true]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean()) if y_true.size else float("nan")
