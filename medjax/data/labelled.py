"""Labelled slices of a manifest split, transformed as an evaluation sees them.

Shared by the linear probe, kNN, the in-run evaluators and segmentation (``eval_transform``). One
label column gives a multi-class task; several columns of 0/1 values give a multi-label task (one
sigmoid output per column, as for chest X-ray findings).

Uncertain labels (a -1 cell, ``UNCERTAIN`` in ``medjax.data.manifest``) follow
``config.data.uncertain_labels``, as in CheXpert practice: ``ignore`` leaves the entry out (a
multi-label row keeps its other findings; the entry counts in neither the loss nor that finding's
AUC), ``zeros`` / ``ones`` read it as 0 / 1, which only means something for a 0/1 column. A blank
cell is never labelled. Both kinds of unlabelled entry are ``MASKED`` in the label arrays.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from medjax.data.manifest import UNCERTAIN, Manifest, ManifestError
from medjax.data.sources import slice_source

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")  # config.data.uncertain_labels
MASKED = -1  # a label entry that is not used: blank, or uncertain under "ignore"
BINARY_VALUES = {"0", "1"}  # the labels of a 0/1 (finding) column
MULTILABEL_CELLS = ("0", "1", "-1", "")  # what a multi-label column may hold: negative, positive, uncertain, blank
_SHOWN = 5  # bad cells listed per column


def uncertain_policy(config) -> str:
    """``config.data.uncertain_labels``, checked: one sentence naming the key."""
    policy = config.data.uncertain_labels
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"config.data.uncertain_labels={policy!r} is not valid; choose ignore (an uncertain -1 label "
                         "is left out), zeros (read as 0) or ones (read as 1).")
    return policy


def resolve_label(code: int, policy: str) -> int:
    """A label code after the uncertain-label policy: the class, or ``MASKED`` when the entry is not used."""
    if code == UNCERTAIN and policy != "ignore":
        return 1 if policy == "ones" else 0
    return code if code >= 0 else MASKED


def is_binary(manifest: Manifest, column: str) -> bool:
    """Whether a label column holds 0/1 labels only (besides uncertain and blank cells)."""
    return set(manifest.label_values(column)) <= BINARY_VALUES


def check_uncertain_columns(manifest: Manifest, columns, policy: str, key: str = "config.data.uncertain_labels"):
    """Refuses zeros/ones for a column that holds uncertain cells but is not a 0/1 column: one sentence per
    column, all at once."""
    if policy == "ignore":
        return
    name = os.path.basename(manifest.csv_path)
    problems, lines_of = [], []
    for c in columns:
        lines = [r.line for r in manifest if r.label(c) == UNCERTAIN]
        if lines and not is_binary(manifest, c):
            problems.append(f"{key}={policy!r} reads an uncertain -1 as {int(policy == 'ones')}, which makes no sense "
                            f"for label column {c!r} of {name} (classes {', '.join(manifest.label_values(c))}; -1 on "
                            f"line(s) {_lines(lines)}); use {key}='ignore' or fix those cells.")
            lines_of += lines
    if problems:
        raise ManifestError("\n".join(problems), {"uncertain_in_non_binary": sorted(lines_of)})


def check_multilabel_cells(manifest: Manifest, columns) -> None:
    """Every cell of the multi-label columns is 1, 0, -1 (uncertain) or blank; the others are named by column
    and CSV line, all at once."""
    name = os.path.basename(manifest.csv_path)
    problems, lines_of = [], []
    for c in columns:
        bad = [(r.line, dict(r.labels)[c]) for r in manifest if dict(r.labels)[c] not in MULTILABEL_CELLS]
        if bad:
            shown = ", ".join(f"{v!r} (line {line})" for line, v in bad[:_SHOWN])
            more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
            problems.append(f"Multi-label column {c!r} of {name} holds {shown}{more}; a finding column holds 1 "
                            "(present), 0 (absent), -1 (uncertain) or a blank cell (not labelled), so fix those "
                            "cells.")
            lines_of += [line for line, _ in bad]
    if problems:
        raise ManifestError("\n".join(problems), {"multilabel_values": sorted(lines_of)})


def _lines(lines) -> str:
    more = f" and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    return ", ".join(map(str, lines[:_SHOWN])) + more


@dataclasses.dataclass
class Split:
    """Eval-transformed slices ``(N, S, S, 1)``, labels ``(N,)`` or ``(N, L)`` (1, 0 or ``MASKED``), patient
    ids ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index], self.patients[index])


def eval_transform(image: np.ndarray, size: int, mean: float, std: float) -> np.ndarray:
    """The whole slice resized to ``size`` (bicubic), clipped to [0, 1] and normalised as in pretraining."""
    x = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
    return ((np.clip(x, 0.0, 1.0) - np.float32(mean)) / np.float32(std)).astype(np.float32)


def split_examples(config, manifest: str, split: str, label_columns, *, demo_rule: bool = False,
                   extra_columns=()) -> Split:
    """The labelled slices of one split (slices without a label are dropped).

    With the demo rule a slice's label is its patient's lesion class when the lesion mask shows
    on that slice, else 0 (none): a slice-level task, so the answer is in the pixels. Uncertain
    labels follow ``config.data.uncertain_labels`` (``resolve_label``). With several label columns
    a slice is kept when some column is labelled; its other entries are ``MASKED``.
    """
    label_columns = (label_columns,) if isinstance(label_columns, str) else tuple(label_columns)
    # Only the demo rule looks at the masks; a classification task neither checks nor reads them.
    records = slice_source(config, manifest, split, label_columns=label_columns, extra_columns=extra_columns,
                           masks=demo_rule)
    size, mean, std = config.crops.global_size, config.crops.mean[0], config.crops.std[0]
    policy = uncertain_policy(config)
    xs, ys, pids = [], [], []
    for r in records:
        values = [resolve_label(v, policy) for v in [r["label"]] + [r[f"label_{c}"] for c in label_columns[1:]]]
        if demo_rule:
            values = [values[0] if r["mask"].any() else 0]
        if max(values) < 0:
            continue
        xs.append(eval_transform(r["image"], size, mean, std))
        ys.append(values if len(label_columns) > 1 else values[0])
        pids.append(r["patient_id"])
    if not xs:
        raise ValueError(f"The {split} split of {manifest} has no labelled slices; the probe needs labelled "
                         f"train, val and test slices.")
    return Split(np.stack(xs)[..., None], np.asarray(ys, np.int64), np.asarray(pids))


def split_images(config, manifest: str, split: str, label_column: str, *, demo_rule: bool,
                 extra_columns=()) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split; see ``split_examples``."""
    s = split_examples(config, manifest, split, label_column, demo_rule=demo_rule, extra_columns=extra_columns)
    return s.images, s.labels
