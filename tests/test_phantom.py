"""In-memory synthetic phantom slices: record format, determinism, class balance, patient-level splits."""

import grain
import numpy as np
import pytest

from tests.phantom import DemoSlices


@pytest.fixture(scope="module")
def demo():
    return DemoSlices(num_patients=40, slices_per_patient=3, size=64, seed=0)


def test_record_format(demo):
    assert len(demo) == 120
    for i in (0, 1, 59, 119):
        rec = demo[i]
        assert set(rec) == {"image", "label", "mask", "patient_id", "split"}
        assert rec["image"].shape == (64, 64) and rec["image"].dtype == np.float32
        assert 0.0 <= rec["image"].min() and rec["image"].max() <= 1.0
        assert rec["mask"].shape == (64, 64) and rec["mask"].dtype == np.uint8
        assert isinstance(rec["label"], int) and 0 <= rec["label"] < 4
        assert rec["patient_id"] == f"demo{i // 3:05d}" and rec["split"] in ("train", "val", "test")
    assert demo[-1]["patient_id"] == demo[119]["patient_id"]
    with pytest.raises(IndexError):
        demo[120]


def test_deterministic_random_access(demo):
    again = DemoSlices(num_patients=40, slices_per_patient=3, size=64, seed=0)
    _ = demo[77]  # access order must not matter
    np.testing.assert_array_equal(demo[5]["image"], again[5]["image"])
    np.testing.assert_array_equal(demo[5]["mask"], again[5]["mask"])
    other = DemoSlices(num_patients=40, slices_per_patient=3, size=64, seed=1)
    assert not np.array_equal(demo[5]["image"], other[5]["image"])
    assert grain.MapDataset.source(demo)[5]["patient_id"] == demo[5]["patient_id"]


def test_neighbouring_levels_look_like_one_volume():
    ds = DemoSlices(num_patients=12, slices_per_patient=8, size=64, seed=0)

    def corr(i, j):
        return np.corrcoef(ds[i]["image"].ravel(), ds[j]["image"].ravel())[0, 1]

    same = np.mean([corr(8 * p + 3, 8 * p + 4) for p in range(11)])  # adjacent levels, one patient
    other = np.mean([corr(8 * p + 3, 8 * p + 11) for p in range(11)])  # same level, next patient
    assert same > 0.85 and same - other > 0.15, (same, other)


def test_classes_balanced_overall_and_per_split(demo):
    counts = np.bincount(demo.patient_labels, minlength=4)
    assert counts.max() - counts.min() <= 1
    for name in ("train", "val", "test"):
        labels = demo.patient_labels[demo.split(name).patients]
        c = np.bincount(labels, minlength=4)
        assert c.max() - c.min() <= 1, (name, c)
    big = DemoSlices(num_patients=1000, slices_per_patient=1, size=64)
    assert np.bincount(big.patient_labels).tolist() == [250] * 4


def test_patients_never_split(demo):
    seen = {}
    for i in range(len(demo)):
        rec = demo[i]
        key = (rec["split"], rec["label"])
        assert seen.setdefault(rec["patient_id"], key) == key
    by_split = {}
    for name in ("train", "val", "test"):
        view = demo.split(name)
        by_split[name] = {view[i]["patient_id"] for i in range(len(view))}
        assert all(view[i]["split"] == name for i in range(len(view)))
    assert sum(len(demo.split(n)) for n in by_split) == len(demo)
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    assert [len(by_split[n]) for n in ("train", "val", "test")] == [28, 6, 6]
    with pytest.raises(ValueError, match="not one of"):
        demo.split("validation")


def test_lesion_masks(demo):
    for p in range(12):
        label = int(demo.patient_labels[p])
        for level in range(3):
            rec = demo[p * 3 + level]
            area = int(rec["mask"].sum())
            if label == 0:
                assert area == 0
            else:  # visible on every level of the patient, small next to the slice
                assert 4 <= area <= 0.06 * 64 * 64, (p, level, area)
                assert rec["image"][rec["mask"] > 0].mean() > 0.1  # inside the head, not in the air


def test_classes_differ_locally_not_in_global_brightness():
    ds = DemoSlices(num_patients=80, slices_per_patient=1, size=64, seed=3)
    means = np.array([ds[i]["image"].mean() for i in range(80)])
    labels = ds.patient_labels
    class_means = np.array([means[labels == c].mean() for c in range(4)])
    # Patient-to-patient spread of the slice mean dwarfs the differences between classes.
    assert np.ptp(class_means) < 0.5 * means.std()
    # Ring lesions: bright rim around a dark core (local structure).
    p = int(np.flatnonzero(labels == 2)[0])
    rec = ds[p]
    ys, xs = np.nonzero(rec["mask"])
    cy, cx = int(round(ys.mean())), int(round(xs.mean()))
    rim = rec["image"][rec["mask"] > 0].max()
    assert rim - rec["image"][cy, cx] > 0.3


def test_other_sizes_and_errors():
    small = DemoSlices(num_patients=4, slices_per_patient=2, size=48)
    assert small[3]["image"].shape == (48, 48)
    one = DemoSlices(num_patients=2, slices_per_patient=1, size=32)
    assert len(one) == 2 and one[1]["image"].shape == (32, 32)
    with pytest.raises(ValueError, match="num_patients"):
        DemoSlices(num_patients=0)
    with pytest.raises(ValueError, match="size"):
        DemoSlices(size=16)
    with pytest.raises(ValueError, match="split_fractions"):
        DemoSlices(split_fractions=(0.5, 0.5, 0.5))
