"""kNN vote against a direct numpy implementation; separation, clipping, chunking."""

import numpy as np
import pytest

from medjax.probe import knn


def _numpy_knn(train, train_labels, test, num_classes, k, temperature):
    """The DINO weighted vote written out directly, one test sample at a time."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    probs = np.zeros((len(test), num_classes))
    for i, t in enumerate(test):
        sims = train @ t
        nearest = np.argsort(-sims, kind="stable")[:k]
        for j in nearest:
            probs[i, train_labels[j]] += np.exp(sims[j] / temperature)
        probs[i] /= probs[i].sum()
    return probs.argmax(1), probs


def _features(seed, n_train=90, n_test=37, dim=16, num_classes=4, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 2
    ytr = rng.integers(0, num_classes, n_train)
    yte = rng.integers(0, num_classes, n_test)
    xtr = centres[ytr] + spread * rng.normal(size=(n_train, dim))
    xte = centres[yte] + spread * rng.normal(size=(n_test, dim))
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte


@pytest.mark.parametrize("seed,k,temperature", [(0, 20, 0.07), (1, 5, 0.07), (2, 50, 0.5), (3, 1, 0.07)])
def test_matches_numpy_reference(seed, k, temperature):
    xtr, ytr, xte, _ = _features(seed, spread=3.0)
    pred, probs = knn.knn_classify(xtr, ytr, xte, 4, k=k, temperature=temperature, batch_size=16)
    ref_pred, ref_probs = _numpy_knn(xtr.astype(np.float64), ytr, xte.astype(np.float64), 4, k, temperature)
    assert probs.shape == (37, 4)
    np.testing.assert_allclose(probs, ref_probs, atol=2e-5)
    np.testing.assert_array_equal(pred, ref_pred)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_scale_invariant_and_chunking_independent():
    xtr, ytr, xte, _ = _features(4, spread=3.0)
    _, p1 = knn.knn_classify(xtr, ytr, xte, 4, k=10, batch_size=256)
    _, p2 = knn.knn_classify(xtr * 7.0, ytr, xte * 0.01, 4, k=10, batch_size=5)
    np.testing.assert_allclose(p1, p2, atol=1e-5)


def test_perfect_separation_gives_accuracy_one():
    xtr, ytr, xte, yte = _features(5, num_classes=3, spread=0.05)
    results = knn.knn_evaluate(xtr, ytr, xte, yte, 3, ks=(1, 10, 20), batch_size=8,
                               class_names=["a", "b", "c"])
    for k in (1, 10, 20):
        assert results[k]["accuracy"] == 1.0
        assert results[k]["balanced_accuracy"] == 1.0
        assert results[k]["macro_f1"] == 1.0
        assert results[k]["macro_auc"] == 1.0
        assert not results[k]["clipped"]


def test_k_larger_than_train_set_is_clipped_and_reported():
    xtr, ytr, xte, yte = _features(6, n_train=12, num_classes=3)
    results = knn.knn_evaluate(xtr, ytr, xte, yte, 3, ks=(5, 200))
    assert results[200]["k_used"] == 12 and results[200]["clipped"]
    assert results[5]["k_used"] == 5 and not results[5]["clipped"]
    _, ref_probs = _numpy_knn(xtr.astype(np.float64), ytr, xte.astype(np.float64), 3, 12, 0.07)
    ref_acc = np.mean(ref_probs.argmax(1) == yte)
    assert results[200]["accuracy"] == pytest.approx(ref_acc)
    with pytest.raises(ValueError, match="train set size"):
        knn.knn_classify(xtr, ytr, xte, 3, k=13)


def test_evaluate_several_k_matches_single_k_and_reports_top5():
    xtr, ytr, xte, yte = _features(7, num_classes=8, spread=3.0)
    results = knn.knn_evaluate(xtr, ytr, xte, yte, 8, ks=(10, 20))
    for k in (10, 20):
        pred, _ = knn.knn_classify(xtr, ytr, xte, 8, k=k)
        assert results[k]["accuracy"] == pytest.approx(np.mean(pred == yte))
        assert results[k]["top5_accuracy"] >= results[k]["accuracy"]
