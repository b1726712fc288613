"""Labelled slices of a manifest split, transformed as an evaluation sees them.

Shared by the linear probe, kNN, the in-run evaluators and segmentation (``eval_transform``). One
label column gives a multi-class task; several columns of 0/1 values give a multi-label task (one
sigmoid output per column, as for chest X-ray findings).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from medjax.data.sources import slice_source


@dataclasses.dataclass
class Split:
    """Eval-transformed slices ``(N, S, S, 1)``, labels ``(N,)`` or ``(N, L)`` 0/1, patient ids ``(N,)``."""

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
    on that slice, else 0 (none): a slice-level task, so the answer is in the pixels. With
    several label columns a slice is kept when every column is labelled.
    """
    label_columns = (label_columns,) if isinstance(label_columns, str) else tuple(label_columns)
    # Only the demo rule looks at the masks; a classification task neither checks nor reads them.
    records = slice_source(config, manifest, split, label_columns=label_columns, extra_columns=extra_columns,
                           masks=demo_rule)
    size, mean, std = config.crops.global_size, config.crops.mean[0], config.crops.std[0]
    xs, ys, pids = [], [], []
    for r in records:
        values = [r["label"]] + [r[f"label_{c}"] for c in label_columns[1:]]
        if demo_rule:
            values = [values[0] if r["mask"].any() else 0]
        if min(values) < 0:
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
