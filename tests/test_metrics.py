"""Classification metrics against scikit-learn; Dice and HD95 against direct computations."""

import json
import os

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from medjax import metrics
from tests.helpers import brute_force_hd95

SEEDS = (0, 1, 2, 3)


def _random_case(seed, n=60, c=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    return y, pred, probs


@pytest.mark.parametrize("seed", SEEDS)
def test_label_metrics_match_sklearn(seed):
    y, pred, _ = _random_case(seed)
    pred[:5] = (pred[:5] + 1) % 4  # some errors, whatever the draw
    assert metrics.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert metrics.balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred))
    np.testing.assert_array_equal(metrics.confusion_matrix(y, pred, 4), skm.confusion_matrix(y, pred, labels=range(4)))
    prf = metrics.precision_recall_f1(y, pred, 4)
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for ours, ref in zip((prf["precision"], prf["recall"], prf["f1"], prf["support"]), (p, r, f, s)):
        np.testing.assert_allclose(ours, ref)
    for avg_key, fn in (("macro_precision", skm.precision_score), ("macro_recall", skm.recall_score),
                        ("macro_f1", skm.f1_score)):
        assert prf[avg_key] == pytest.approx(fn(y, pred, average="macro", zero_division=0))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_class_never_predicted_and_class_never_true():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 1, 1, 3, 0])  # class 2 never predicted, class 3 never true
    prf = metrics.precision_recall_f1(y, pred, 5)  # class 4: in neither
    assert prf["precision"][2] == 0 and prf["recall"][3] == 0 and prf["f1"][4] == 0
    p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=range(5), zero_division=0)
    np.testing.assert_allclose(prf["precision"], p)
    np.testing.assert_allclose(prf["recall"], r)
    np.testing.assert_allclose(prf["f1"], f)
    # macro over classes seen in y or pred (0..3), as sklearn's default label set
    assert prf["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert metrics.balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred))


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_auc_with_ties_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 80)
    score = rng.integers(0, 5, 80) / 4.0  # heavy ties
    assert metrics.roc_auc_binary(y, score) == pytest.approx(skm.roc_auc_score(y, score))
    cont = rng.normal(size=80) + y
    assert metrics.roc_auc_binary(y, cont) == pytest.approx(skm.roc_auc_score(y, cont))


def test_binary_auc_edge_values():
    assert metrics.roc_auc_binary([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc_binary([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="only one class"):
        metrics.roc_auc_binary([1, 1, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_ovr_auc_matches_sklearn(seed):
    y, _, probs = _random_case(seed)
    probs = np.round(probs, 1)  # ties
    probs = probs / probs.sum(1, keepdims=True)
    ref = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert metrics.macro_ovr_auc(y, probs) == pytest.approx(ref)


def test_macro_ovr_auc_skips_absent_class():
    y, _, probs = _random_case(5, c=4)
    keep = y != 3
    y, probs = y[keep], probs[keep]
    ref = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert metrics.macro_ovr_auc(y, probs) == pytest.approx(ref)


@pytest.mark.parametrize("seed", SEEDS)
def test_mean_label_auc_excludes_single_class_labels(seed):
    rng = np.random.default_rng(seed)
    Y = rng.integers(0, 2, (50, 5))
    Y[:, 1] = 0  # no positives
    Y[:, 3] = 1  # no negatives
    scores = np.round(rng.normal(size=(50, 5)) + Y, 1)
    mean, per_label, excluded = metrics.mean_label_auc(Y, scores)
    assert excluded == [1, 3]
    assert np.isnan(per_label[[1, 3]]).all()
    keep = [0, 2, 4]
    assert mean == pytest.approx(skm.roc_auc_score(Y[:, keep], scores[:, keep], average="macro"))


@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, 70)
    scores = rng.integers(0, 4, (70, 8)).astype(float)  # ties
    for k in (1, 3, 5):
        ref = skm.top_k_accuracy_score(y, scores, k=k, labels=range(8))
        assert metrics.top_k_accuracy(y, scores, k) == pytest.approx(ref)


def test_classification_report_bundles_everything(tmp_path):
    y, pred, probs = _random_case(7, n=40, c=3)
    names = ["normal", "benign", "malignant"]
    report = metrics.classification_report(y, pred, probs, names)
    json.dumps(report)  # serialisable for metrics.jsonl
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert report["macro_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert report["auc_excluded_classes"] == []
    assert [row["name"] for row in report["per_class"]] == names
    assert sum(row["support"] for row in report["per_class"]) == 40
    f = skm.f1_score(y, pred, average=None, labels=range(3), zero_division=0)
    np.testing.assert_allclose([row["f1"] for row in report["per_class"]], f)

    path = metrics.save_confusion_matrix_png(np.array(report["confusion_matrix"]), names,
                                             str(tmp_path / "cm.png"), title="test")
    assert os.path.getsize(path) > 10_000
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_png_with_empty_row(tmp_path):
    cm = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])
    path = metrics.save_confusion_matrix_png(cm, ["a", "b", "c"], str(tmp_path / "cm.png"))
    assert os.path.getsize(path) > 5_000


# ---------------------------------------------------------------- segmentation


def _ref_dice(p, g):
    return 2 * (p & g).sum() / (p.sum() + g.sum())


def test_dice_rules_2d():
    target = np.zeros((8, 8), int)
    target[1:4, 1:4] = 1  # 9 px
    target[6, 6] = 2  # single pixel
    pred = np.zeros_like(target)
    pred[2:5, 2:5] = 1  # overlap 4
    pred[6, 6] = 2
    pred[0, 7] = 4  # class 4 absent from ground truth
    # class 3: empty in both
    d = metrics.dice_per_class(pred, target, 5)
    assert d.shape == (4,)
    assert d[0] == pytest.approx(_ref_dice(pred == 1, target == 1)) and d[0] == pytest.approx(8 / 18)
    assert d[1] == 1.0
    assert np.isnan(d[2])
    assert d[3] == 0.0
    assert np.nanmean(d) == pytest.approx((8 / 18 + 1 + 0) / 3)
    d1 = metrics.dice_per_class(pred, target, 5, empty_rule="one")
    assert d1[2] == 1.0
    dbg = metrics.dice_per_class(pred, target, 5, include_background=True)
    assert dbg.shape == (5,) and dbg[0] == pytest.approx(_ref_dice(pred == 0, target == 0))
    with pytest.raises(ValueError, match="empty_rule"):
        metrics.dice_per_class(pred, target, 5, empty_rule="zero")


def test_dice_3d_matches_direct_computation():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (6, 7, 5))
    pred = np.where(rng.random(target.shape) < 0.8, target, rng.integers(0, 3, target.shape))
    d = metrics.dice_per_class(pred, target, 3)
    np.testing.assert_allclose(d, [_ref_dice(pred == c, target == c) for c in (1, 2)])


def test_hd95_2d_squares_and_spacing():
    g = np.zeros((20, 20), bool)
    g[5:10, 5:10] = True
    p = np.zeros_like(g)
    p[5:10, 8:13] = True  # shifted by 3 columns
    assert metrics.hd95(g, g, (1.0, 1.0)) == 0.0
    h1 = metrics.hd95(p, g, (1.0, 1.0))
    assert h1 == pytest.approx(brute_force_hd95(p, g, (1.0, 1.0)))
    # shift is along axis 1: its spacing scales the distance, the other axis' spacing does not
    h2 = metrics.hd95(p, g, (1.0, 2.5))
    assert h2 == pytest.approx(brute_force_hd95(p, g, (1.0, 2.5)))
    assert h2 == pytest.approx(2.5 * h1)
    assert metrics.hd95(p, g, (4.0, 1.0)) == pytest.approx(brute_force_hd95(p, g, (4.0, 1.0)))


def test_hd95_single_voxels_and_empty_masks():
    g = np.zeros((5, 6, 7), bool)
    p = np.zeros_like(g)
    g[1, 2, 3] = True
    p[3, 2, 5] = True
    spacing = (3.0, 1.0, 0.5)
    assert metrics.hd95(p, g, spacing) == pytest.approx(np.hypot(2 * 3.0, 2 * 0.5))
    assert np.isnan(metrics.hd95(np.zeros_like(g), np.zeros_like(g), spacing))
    assert metrics.hd95(p, np.zeros_like(g), spacing) == np.inf
    assert metrics.hd95(np.zeros_like(g), g, spacing) == np.inf
    with pytest.raises(ValueError, match="spacing"):
        metrics.hd95(p, g, (1.0, 1.0))


def test_hd95_3d_blobs_match_brute_force():
    rng = np.random.default_rng(1)
    zz, yy, xx = np.mgrid[:12, :14, :10]
    g = (zz - 6) ** 2 / 16 + (yy - 7) ** 2 / 25 + (xx - 5) ** 2 / 9 <= 1
    p = ndimage.binary_dilation(g) & (rng.random(g.shape) < 0.9)
    for spacing in ((1.0, 1.0, 1.0), (2.5, 0.7, 0.7)):
        assert metrics.hd95(p, g, spacing) == pytest.approx(brute_force_hd95(p, g, spacing))
    per_class = metrics.hd95_per_class(p.astype(int), g.astype(int), 2, (2.5, 0.7, 0.7))
    assert per_class.shape == (1,) and per_class[0] == pytest.approx(brute_force_hd95(p, g, (2.5, 0.7, 0.7)))
