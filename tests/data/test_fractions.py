import numpy as np
import pytest

from medjax.data import fractions


def _dataset(n_patients=40, slices=5, classes=4, seed=0):
    """Slice-level labels: patient p has class p % classes on its first two slices, 0 elsewhere."""
    pids, labels = [], []
    for p in range(n_patients):
        for s in range(slices):
            pids.append(f"P{p:03d}")
            labels.append(p % classes if s < 2 else 0)
    return pids, np.array(labels)


def test_whole_patients_only_and_stratified():
    pids, labels = _dataset()
    for fraction in (0.1, 0.25, 0.5):
        for seed in range(3):
            idx = fractions.subset_indices(pids, labels, fraction, seed)
            chosen = {pids[i] for i in idx}
            assert len(chosen) == round(fraction * 40)
            # every slice of a chosen patient is in, no slice of another patient is
            assert sorted(idx.tolist()) == [i for i, p in enumerate(pids) if p in chosen]
            # patients are stratified by their lesion class (the rarest class on their slices)
            per_class = np.bincount([int(p[1:]) % 4 for p in chosen], minlength=4)
            assert per_class.min() >= 1 and per_class.max() - per_class.min() <= 1


def test_seeds_differ_and_repeat():
    pids, labels = _dataset()
    a = fractions.sample_patients(pids, labels, 0.25, seed=0)
    assert a == fractions.sample_patients(pids, labels, 0.25, seed=0)
    assert a != fractions.sample_patients(pids, labels, 0.25, seed=1)


def test_tiny_fraction_keeps_one_patient_and_full_fraction_everyone():
    pids, labels = _dataset()
    assert len(fractions.sample_patients(pids, labels, 0.01, seed=0)) == 1
    assert len(fractions.sample_patients(pids, labels, 1.0, seed=0)) == 40


def test_multilabel_strata_use_rarest_positive():
    labels = np.array([[1, 0, 0], [1, 0, 1], [0, 0, 0], [1, 1, 0]])
    strata = fractions.patient_strata(["a", "b", "c", "d"], labels)
    assert strata == {"a": 0, "b": 2, "c": 3, "d": 1}


def test_bad_fraction_is_one_sentence():
    with pytest.raises(ValueError, match=r"lie in \(0, 1\]"):
        fractions.validate_fractions([0.1, 10.0], "config.probe.label_fractions")


def test_summarise():
    s = fractions.summarise([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
