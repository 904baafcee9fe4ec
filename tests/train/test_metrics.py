import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score,
                             roc_auc_score, roc_curve)

from wsigraph.train.metrics import (bootstrap_ci, classification_metrics, cross_entropy, predict_labels,
                                    resampled_metrics, youden_threshold)


def _sample(rng, n, num_classes, ties=False):
    y = rng.integers(0, num_classes, n)
    probs = rng.dirichlet(np.ones(num_classes), n)
    probs[np.arange(n), y] += rng.uniform(0, 0.5, n)  # some signal
    probs /= probs.sum(1, keepdims=True)
    if ties:  # coarse scores give tied ranks
        probs = np.round(probs, 1) + 1e-9
        probs /= probs.sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_metrics_equal_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    y, probs = _sample(rng, 57, num_classes)
    out = classification_metrics(y, probs, ordinal=True)
    y_hat = probs.argmax(1)
    if num_classes == 2:
        auc = roc_auc_score(y, probs[:, 1])
    else:
        auc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert out["auc"] == pytest.approx(auc)
    assert out["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, y_hat))
    assert out["f1"] == pytest.approx(f1_score(y, y_hat, average="weighted"))
    assert out["acc"] == pytest.approx(accuracy_score(y, y_hat))
    assert out["qwk"] == pytest.approx(cohen_kappa_score(y, y_hat, weights="quadratic"))
    assert "qwk" not in classification_metrics(y, probs)


def test_threshold_applies_to_positive_probability():
    rng = np.random.default_rng(0)
    y, probs = _sample(rng, 40, 2)
    threshold = 0.7
    y_hat = (probs[:, 1] >= threshold).astype(int)
    np.testing.assert_array_equal(predict_labels(probs, threshold), y_hat)
    out = classification_metrics(y, probs, threshold=threshold)
    assert out["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, y_hat))
    assert out["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]))  # threshold-free
    with pytest.raises(ValueError):
        predict_labels(np.full((3, 3), 1 / 3), 0.5)


def test_auc_is_nan_when_a_class_is_missing():
    probs = np.array([[0.2, 0.8], [0.6, 0.4]])
    assert np.isnan(classification_metrics([1, 1], probs)["auc"])
    probs3 = np.full((4, 3), 1 / 3)
    assert np.isnan(classification_metrics([0, 1, 1, 0], probs3)["auc"])


@pytest.mark.parametrize("num_classes,ties", [(2, False), (2, True), (3, False), (3, True)])
def test_resampled_metrics_equal_sklearn_on_every_resample(num_classes, ties):
    rng = np.random.default_rng(10 + num_classes)
    y, probs = _sample(rng, 13, num_classes, ties)
    index = rng.integers(0, len(y), size=(40, len(y)))  # small n: one-class resamples happen
    threshold = 0.35 if num_classes == 2 else None
    batched = resampled_metrics(y, probs, index, threshold, ordinal=True)
    for s in range(index.shape[0]):
        reference = classification_metrics(y[index[s]], probs[index[s]], threshold, ordinal=True)
        for name, value in reference.items():
            np.testing.assert_allclose(batched[name][s], value, rtol=1e-10, atol=1e-12, err_msg=name)


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(3)
    for num_classes in (2, 3):
        y, probs = _sample(rng, 80, num_classes)
        point = classification_metrics(y, probs, ordinal=True)
        ci = bootstrap_ci(y, probs, ordinal=True, num_samples=300, seed=1)
        assert set(ci) == set(point)
        for name, (low, high) in ci.items():
            assert low <= point[name] <= high, name
            assert high - low > 0
        assert ci == bootstrap_ci(y, probs, ordinal=True, num_samples=300, seed=1)  # seeded


def test_youden_threshold_maximises_j_on_the_given_slides():
    rng = np.random.default_rng(4)
    y, probs = _sample(rng, 60, 2)
    threshold = youden_threshold(y, probs)
    fpr, tpr, thresholds = roc_curve(y, probs[:, 1])

    def j(t):
        pred = probs[:, 1] >= t
        return pred[y == 1].mean() - pred[y == 0].mean()
    assert j(threshold) == pytest.approx(max(j(t) for t in np.unique(probs[:, 1])))
    assert youden_threshold([1, 1, 1], probs[:3]) == 0.5


def test_cross_entropy():
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    assert cross_entropy([0, 1], probs) == pytest.approx(-(np.log(0.9) + np.log(0.7)) / 2)
