"""Few-label subsets: a fraction of the training patients, never a fraction of a patient.

Label-efficiency studies (1 %, 10 %, 25 %, 50 %, 100 % of the labels) must sample
whole patients: slices of one patient are near-duplicates, so splitting a
patient across "labelled" and "unlabelled" would overstate what a few labels
buy. Patients are stratified by class where the counts allow it, and every
fraction is drawn again for each seed so a result can carry its spread.

A patient's stratum is the rarest class among its examples (for a slice-level
task most slices of a lesion patient are "no lesion"; the lesion class is what
makes the patient informative). Multi-label rows use their rarest positive
label, or "no finding" when they have none (masked entries, < 0, are not positives).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_FRACTIONS = (0.01, 0.1, 0.25, 0.5, 1.0)


def validate_fractions(fractions: Sequence[float], what: str = "config.fractions") -> None:
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{what} holds {f!r}; every label fraction must lie in (0, 1] (e.g. 0.01 for 1 %).")


def patient_strata(patient_ids: Sequence[str], labels: np.ndarray) -> dict[str, int]:
    """{patient: stratum}; labels are (N,) class indices (< 0 = unlabelled) or (N, L) multi-label rows of 1, 0
    and masked (< 0) entries."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        classes = labels
        counts = np.bincount(classes[classes >= 0], minlength=1)
    else:  # multi-label: stratum = the rarest positive label, or L for "no finding"; masked (< 0) entries
        positive = labels > 0  # are not positives (summing the raw rows would count each as -1)
        counts = np.append(positive.sum(0), max(1, int((~positive.any(1)).sum())))
        order = np.argsort(counts[:-1], kind="stable")
        rarest_first = positive[:, order]
        first = rarest_first.argmax(1)
        classes = np.where(rarest_first.any(1), order[first], labels.shape[1])
    strata: dict[str, int] = {}
    for pid, c in zip(patient_ids, classes):
        c = int(c)
        if c < 0:
            continue
        old = strata.get(pid)
        if old is None or (counts[c], c) < (counts[old], old):
            strata[pid] = c
    for pid in patient_ids:  # patients with only unlabelled rows still count as patients
        strata.setdefault(pid, -1)
    return strata


def sample_patients(patient_ids: Sequence[str], labels: np.ndarray, fraction: float, seed: int) -> list[str]:
    """The patients of a ``fraction`` subset, stratified by class where possible.

    ``max(1, round(fraction * patients))`` patients are drawn. They are shared among
    the strata in proportion to their sizes (largest remainders first), with one
    patient per stratum first whenever there are at least as many picks as strata,
    so that a 10 % subset still shows every class. ``fraction=1`` returns everyone.
    """
    validate_fractions([fraction], "fraction")
    strata = patient_strata(patient_ids, labels)
    patients = sorted(strata)
    total = max(1, int(round(fraction * len(patients))))
    if total >= len(patients):
        return patients
    groups: dict[int, list[str]] = {}
    for pid in patients:
        groups.setdefault(strata[pid], []).append(pid)
    keys = sorted(groups)
    sizes = np.array([len(groups[k]) for k in keys], np.float64)
    take = np.zeros(len(keys), np.int64)
    if total >= len(keys):
        take[:] = 1
    share = (total - take.sum()) * (sizes - take) / max(1.0, (sizes - take).sum())
    take += np.floor(share).astype(np.int64)
    rng = np.random.default_rng([seed, 0xF4AC])
    remainder = share - np.floor(share) + rng.uniform(0, 1e-9, len(keys))  # random tie-break
    for i in np.argsort(-remainder):
        if take.sum() >= total:
            break
        if take[i] < sizes[i]:
            take[i] += 1
    chosen = []
    for k, n in zip(keys, take):
        members = groups[k]
        chosen += [members[i] for i in rng.permutation(len(members))[:n]]
    return sorted(chosen)


def subset_indices(patient_ids: Sequence[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Row indices of the examples whose patient is in the ``fraction`` subset (sorted)."""
    keep = set(sample_patients(patient_ids, labels, fraction, seed))
    return np.flatnonzero(np.array([p in keep for p in patient_ids], bool))


def summarise(values: Sequence[float]) -> dict:
    """Mean, standard deviation (ddof 1 when there are several) and the values themselves."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}
