"""Segmentation metrics as the trainer aggregates them, against straightforward references.

``medjax.metrics.dice_per_class`` / ``hd95`` themselves are checked in tests/test_metrics.py
(rules, single voxels, empty masks, anisotropic spacing, brute-force surface distances).
Here: the reference is HD95 by definition (``tests.helpers.brute_force_hd95``: every surface-to-surface
distance, no erosion or distance transform), and the trainer's
stacking of slices into volumes, its per-patient means, its empty-ground-truth rules and its
spacing bookkeeping (display orientation -> (row, col) and between-slice mm) are checked.
"""

import numpy as np
import pytest

from medjax import metrics
from medjax.segment import evaluate2d
from medjax.segment.data import SegSplit, display_spacing
from tests.helpers import brute_force_hd95


def _ref_dice(p, g):
    return 2.0 * (p & g).sum() / (p.sum() + g.sum())


def test_hd95_and_dice_match_references_on_hand_built_volumes():
    g = np.zeros((5, 12, 10), bool)
    g[1:4, 3:8, 2:6] = True
    p = np.zeros_like(g)
    p[2:5, 4:9, 2:7] = True
    p[0, 0, 0] = True  # a single stray voxel far away
    for spacing in ((1.0, 1.0, 1.0), (3.0, 0.8, 0.8), (2.5, 0.5, 1.7)):
        assert metrics.hd95(p, g, spacing) == pytest.approx(brute_force_hd95(p, g, spacing))
    d = metrics.dice_per_class(p.astype(int), g.astype(int), 2)
    assert d[0] == pytest.approx(_ref_dice(p, g))
    one = np.zeros((4, 4), bool)
    one[1, 2] = True
    assert metrics.hd95(one, one, (0.7, 0.7)) == 0.0  # a single voxel against itself
    other = np.zeros((4, 4), bool)
    other[3, 2] = True
    assert metrics.hd95(one, other, (0.7, 1.3)) == pytest.approx(2 * 0.7)  # rows are axis 0


def _split(slices, gts, spacing, slice_spacing, patients, volumes, positions):
    n = len(gts)
    return SegSplit(np.zeros((n, 4, 4, 1), np.float32), np.zeros((n, 4, 4), np.uint8), list(gts),
                    np.asarray([spacing] * n, float), np.full(n, slice_spacing, float), np.asarray(patients),
                    np.asarray(volumes), np.asarray(positions), np.full(n, -1))


def test_volumes_are_stacked_at_their_positions_with_the_slice_spacing():
    rng = np.random.default_rng(0)
    gt = np.zeros((4, 9, 8), np.uint8)
    gt[1:3, 2:6, 3:7] = 1
    pred = np.zeros_like(gt)
    pred[1:4, 3:7, 3:6] = 1
    pred[0, 0, 0] = 1
    order = rng.permutation(4)  # slices arrive in any order
    split = _split(None, [gt[k] for k in order], (0.9, 0.6), 2.5, ["P1"] * 4, ["vol1"] * 4, order)
    levels = evaluate2d.evaluate([pred[k] for k in order], split, 2, "nan")
    vol = levels["volume"]
    assert vol["ids"] == ["vol1"]
    assert vol["dice"][0, 0] == pytest.approx(_ref_dice(pred == 1, gt == 1))
    assert vol["hd95"][0, 0] == pytest.approx(brute_force_hd95(pred == 1, gt == 1, (2.5, 0.9, 0.6)))
    # per slice: 2D with the (row, col) spacing; slice 0 and 3 have an empty ground truth and a prediction
    sl = levels["slice"]
    k0 = list(order).index(0)
    assert sl["dice"][k0, 0] == 0.0 and sl["hd95"][k0, 0] == np.inf and sl["spurious"][k0, 0]
    k1 = list(order).index(1)
    assert sl["hd95"][k1, 0] == pytest.approx(brute_force_hd95(pred[1] == 1, gt[1] == 1, (0.9, 0.6)))


def test_empty_ground_truth_rules_and_patient_means():
    lesion = np.zeros((6, 6), np.uint8)
    lesion[2:4, 2:4] = 1
    empty = np.zeros((6, 6), np.uint8)
    spurious = empty.copy()
    spurious[0, 0] = 1
    gts = [lesion, lesion, empty, empty]
    preds = [lesion, np.zeros_like(lesion), empty, spurious]
    # four 2D images (no slice spacing): each its own volume; P1 has two, P2 and P3 one each
    split = _split(None, gts, (0.5, 0.5), np.nan, ["P1", "P1", "P2", "P3"], ["a", "b", "c", "d"], [0, 0, 0, 0])
    nan_rule = evaluate2d.evaluate(preds, split, 2, "nan")
    np.testing.assert_array_equal(nan_rule["volume"]["dice"][:, 0], [1.0, 0.0, np.nan, 0.0])
    assert nan_rule["patient"]["ids"] == ["P1", "P2", "P3"]
    np.testing.assert_array_equal(nan_rule["patient"]["dice"][:, 0], [0.5, np.nan, 0.0])
    one_rule = evaluate2d.evaluate(preds, split, 2, "one")
    np.testing.assert_array_equal(one_rule["patient"]["dice"][:, 0], [0.5, 1.0, 0.0])
    hd = nan_rule["volume"]["hd95"][:, 0]
    assert hd[0] == 0.0 and hd[1] == np.inf and np.isnan(hd[2]) and hd[3] == np.inf
    summary = evaluate2d.summarise(nan_rule, ("background", "lesion"))["patient"]["classes"]["lesion"]
    assert summary["dice_mean"] == pytest.approx(0.25) and summary["dice_n"] == 2 and summary["dice_left_out"] == 1
    assert summary["empty_ground_truth"] == 2 and summary["empty_ground_truth_with_prediction"] == 1
    # P1: the mean over its volumes with a finite HD95 (its missed image is counted at the volume level)
    np.testing.assert_array_equal(nan_rule["patient"]["hd95"][:, 0], [0.0, np.nan, np.inf])
    assert summary["hd95_inf"] == 1 and summary["hd95_n"] == 1
    assert evaluate2d.summarise(nan_rule, ("background", "lesion"))["volume"]["classes"]["lesion"]["hd95_inf"] == 2
    assert evaluate2d.summarise(one_rule, ("background", "lesion"))["patient"]["classes"]["lesion"]["dice_mean"] == \
        pytest.approx(0.5)


def test_display_spacing_follows_the_slice_orientation():
    spacing = (0.7, 0.9, 3.0)  # x, y, z of an RAS+ volume
    assert display_spacing(spacing, "axial") == ((0.9, 0.7), 3.0)  # rows run along y
    assert display_spacing(spacing, "coronal") == ((3.0, 0.7), 0.9)
    assert display_spacing(spacing, "sagittal") == ((3.0, 0.9), 0.7)
    assert display_spacing(spacing, 1) == ((0.7, 3.0), 0.9)
    rows_cols, between = display_spacing((0.4, 0.5), "axial")  # a 2D image keeps its own (row, col)
    assert rows_cols == (0.4, 0.5) and np.isnan(between)
