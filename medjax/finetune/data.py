"""The fine-tuning trainer's data: the slices (or volumes) of each split with one label per target column.

Slices come from the manifest through the slice index (``slice_source``), as for
pretraining, and are held in memory at their native size, normalised to [0, 1]:
the train transform crops them afresh at every step, the eval transform is
applied once. A row's label for a target is negative when its cell is empty or
uncertain (``medjax.data.manifest``); a head is trained and evaluated only on the
rows labelled for it. ``config.data.uncertain_labels`` decides what an uncertain -1 of a 0/1
column is: left out for that head only (``ignore``), or read as 0 / 1 (``zeros`` / ``ones``;
a column with other classes and uncertain cells is refused under those). A 0/1 target needs a
positive training example. The splits come from the manifest's split column, or from its
fold column through ``config.data.folds``.

With the built-in demo dataset the ``lesion`` target is slice-level: a slice
shows its patient's lesion class when the lesion mask appears on it, else
``none`` (so the answer is in the pixels). ``contrast`` (T1, T2, FLAIR) is a
second demo target.

For a 3D backbone (``volumes=True``) each manifest row is one example: its
whole volume from ``volume_source`` ((D, H, W), resampled to
``config.data.target_spacing`` and normalised to [0, 1]) with that row's labels;
the demo's ``lesion`` is then the patient's lesion class, with no slice rule.
"""

from __future__ import annotations

import csv
import dataclasses

import numpy as np

from medjax import console
from medjax.data.demo import LESION_CLASSES
from medjax.data.job_manifest import manifest_path, open_manifest
from medjax.data.labelled import check_uncertain_columns, is_binary, resolve_label, uncertain_policy
from medjax.data.manifest import check_labels
from medjax.data.sources import DEMO_COLUMNS, demo_manifest, slice_source, use_run_demo_data, volume_source

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class Split:
    images: list  # native-size float32 slices (or (D, H, W) volumes), values in [0, 1]
    labels: np.ndarray  # (N, targets) int64, -1 = no label for that target
    patient_ids: list


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    class_names: tuple
    description: str


def resolve_manifest(config, workdir: str, run_dir: str | None) -> tuple[str, bool]:
    """(manifest path, is the built-in demo); the demo files of ``run_dir`` are reused when identical."""
    f = config.finetune
    if f.manifest:
        return manifest_path(f.manifest, "config.finetune.manifest", " with label columns"), False
    if run_dir:
        use_run_demo_data(config, run_dir)
    return demo_manifest(config, workdir, say=console.say), True


def target_columns(config, demo: bool) -> tuple[str, ...]:
    columns = tuple(config.finetune.targets) or (("lesion",) if demo else ())
    if not columns:
        raise ValueError("config.finetune.targets is empty; name the manifest's label column(s), e.g. "
                         "--config.finetune.targets='(\"diagnosis\",)'.")
    if len(set(columns)) != len(columns):
        raise ValueError(f"config.finetune.targets={columns} names a column twice; name each once.")
    return columns


def _class_names(manifest, column: str, demo_lesion: bool, policy: str) -> tuple:
    if demo_lesion:  # the demo's column holds the index into LESION_CLASSES
        return tuple(LESION_CLASSES)
    if policy != "ignore" and is_binary(manifest, column):
        return ("0", "1")  # an uncertain -1 read as 0 or 1 may give the class a column's cells lack
    codes = manifest.classes[column]
    names = [str(c) for c in range(max(codes.values()) + 1)]
    for value, code in codes.items():
        names[code] = value
    return tuple(names)


def load_splits(config, workdir: str, run_dir: str | None = None, *, volumes: bool = False):
    """({split: Split}, [Target]) for the config's manifest (or the demo) and targets; one example per
    slice, or with ``volumes`` one per manifest row (its whole volume)."""
    path, demo = resolve_manifest(config, workdir, run_dir)
    columns = target_columns(config, demo)
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    for column in columns:
        if column not in header:
            raise ValueError(f"config.finetune.targets names {column!r}, which is not a column of {path} "
                             f"(it has {', '.join(header)}); name its label columns.")
    extra = tuple(c for c in DEMO_COLUMNS if c not in columns and c in header) if demo else ()
    manifest = open_manifest(config, path, label_columns=columns, label_key="config.finetune.targets", extra=extra,
                             masks=demo)  # masks matter only to the demo's lesion rule
    for column in columns:
        check_labels(manifest, column)
    policy = uncertain_policy(config)
    check_uncertain_columns(manifest, columns, policy)
    demo_lesion = [demo and c == "lesion" for c in columns]
    slice_rule = [rule and not volumes for rule in demo_lesion]
    splits = {s: _read_split(config, path, s, columns, slice_rule, extra, volumes, policy) for s in SPLITS}
    targets = []
    for t, column in enumerate(columns):
        names = _class_names(manifest, column, demo_lesion[t], policy)
        if slice_rule[t]:
            description = "demo lesion class per slice (none unless the lesion mask shows on the slice)"
        elif demo_lesion[t]:
            description = "demo lesion class of the patient, on each of its volumes"
        else:
            description = f"label column {column!r} of {path}"
        targets.append(Target(column, names, description))
        _check_split_labels(splits, t, column, names, "volume" if volumes else "slice")
    unlearnable = [c for t, c in enumerate(columns) if not demo_lesion[t] and is_binary(manifest, c)
                   and not (splits["train"].labels[:, t] == 1).any()]
    if unlearnable:
        raise ValueError(f"Target column(s) {', '.join(map(repr, unlearnable))} of {path} have no positive (1) train "
                         f"{'volume' if volumes else 'slice'} (uncertain labels read with config.data.uncertain_labels="
                         f"{policy!r}), so no head can learn them; add training patients with those findings or leave "
                         "them out of config.finetune.targets.")
    return splits, targets


def _read_split(config, manifest_path, split, columns, slice_rule, extra, volumes, policy) -> Split:
    masks = any(slice_rule)  # only the demo's slice-level lesion rule looks at the masks
    if volumes:
        records = volume_source(config, manifest_path, split, label_columns=columns, extra_columns=extra,
                                say=console.say, masks=masks)
    else:
        records = slice_source(config, manifest_path, split, label_columns=columns, extra_columns=extra,
                               masks=masks)
    unit = "volume" if volumes else "slice"
    images, labels, patients = [], [], []
    for r in records:
        row = [resolve_label(v, policy) for v in [r["label"]] + [r[f"label_{c}"] for c in columns[1:]]]
        for t, rule in enumerate(slice_rule):
            if rule and row[t] >= 0 and not r["mask"].any():
                row[t] = 0  # the lesion does not show on this slice
        if max(row) < 0:
            continue  # labelled for no target
        images.append(np.asarray(r["image"], np.float32))
        labels.append(row)
        patients.append(r["patient_id"])
    if not images:
        raise ValueError(f"The {split} split of {manifest_path} has no {unit} labelled for any of "
                         f"{', '.join(columns)}; fine-tuning needs labelled train, val and test {unit}s.")
    return Split(images, np.asarray(labels, np.int64).reshape(len(labels), len(columns)), patients)


def _check_split_labels(splits, t: int, column: str, names, unit: str) -> None:
    for s in SPLITS:
        if not (splits[s].labels[:, t] >= 0).any():
            raise ValueError(f"The {s} split has no {unit} labelled for target {column!r}; every target needs "
                             f"labelled train, val and test {unit}s.")
    seen = set(splits["train"].labels[:, t].tolist())
    for s in ("val", "test"):
        orphans = sorted(c for c in set(splits[s].labels[:, t].tolist()) - seen if c >= 0)
        if orphans:
            raise ValueError(f"Class(es) {', '.join(names[c] for c in orphans)} of target {column!r} occur in {s} "
                             f"{unit}s but in no train {unit}, so no head can learn them; add training patients of "
                             "those classes.")
