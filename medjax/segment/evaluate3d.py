"""3D predictions on each volume's own grid, their metrics, overlays and NIfTI prediction files.

Logits are predicted on the model input grid and mapped back to the grid of the
volume's mask file (``VolSplit.to_input``: padding, scaling, the axial flips
and the resampling undone in one trilinear interpolation per class); the argmax
is taken there and every metric compares those labels with the mask as stored.

Levels: volume (Dice over all voxels; HD95 in mm with the native voxel spacing)
and patient (the mean of its volumes, as ``segment_eval.patient_level``); the
empty-ground-truth rules are ``segment_eval``'s. There is no slice level: the
model never sees a slice alone.
"""

from __future__ import annotations

import dataclasses
import os
import re

import nibabel as nib
import numpy as np
from scipy import ndimage

from medjax import metrics
from medjax.segment import evaluate2d, model, report


def to_native(values: np.ndarray, to_input: np.ndarray, shape: tuple, order: int = 1) -> np.ndarray:
    """(D, H, W) or (D, H, W, C) ``values`` on the input grid, sampled at a volume's native voxels ``shape``."""
    def one(v):
        return ndimage.affine_transform(np.asarray(v, np.float32), to_input[:, 0], to_input[:, 1],
                                        output_shape=tuple(shape), order=order, mode="nearest")

    if values.ndim == 3:
        return one(values)
    return np.stack([one(values[..., c]) for c in range(values.shape[-1])], axis=-1)


def predict(spec, params, stats, split, feats: dict | None, batch: int) -> tuple[list, np.ndarray | None]:
    """(labels on each volume's native grid, class probabilities (N, K) or None) for every volume of ``split``."""
    fn = model.predict_fn(spec)
    native, probs = [], []
    for i, j, part in evaluate2d.padded_batches(split, feats, batch):
        seg, cls = fn(params, stats, part)
        seg = np.asarray(seg[: j - i], np.float32)
        if cls is not None:
            probs.append(np.asarray(cls[: j - i]))
        for k in range(i, j):
            logits = to_native(seg[k - i], split.to_input[k], split.native[k].shape)
            native.append(np.argmax(logits, axis=-1).astype(np.uint8))
    return native, (np.concatenate(probs) if probs else None)


def evaluate(native_pred: list, split, num_classes: int, rule: str) -> dict:
    """Per-volume and per-patient metric arrays: {level: {"dice": (n, C-1), "hd95": ..., "ids": ...}}."""
    per_volume = [evaluate2d.case_metrics(p, g, num_classes, tuple(sp), rule)
                  for p, g, sp in zip(native_pred, split.native, split.spacing)]
    levels = {"volume": evaluate2d.collect(per_volume, split.volumes.tolist())}
    levels["patient"] = evaluate2d.patient_level(levels["volume"], split.patients)
    return levels


@dataclasses.dataclass
class SliceView:
    """Axial slices of volumes, read as ``segment_report`` reads a split of slices."""

    images: list  # (rows, cols, 1) images on the native grid
    native: list  # (rows, cols) ground truth
    patients: np.ndarray
    volumes: np.ndarray
    slice_index: np.ndarray


def save_outputs(workdir: str, tag: str, split, native_pred: list, n_cases: int, class_names, title: str) -> None:
    """overlays_<tag>.png: for each patient the axial slice with the largest ground-truth structure (and one
    slice of a patient without any), as in 2D; predictions/<tag>/: those volumes' predictions as NIfTI."""
    vol_of = np.concatenate([np.full(len(m), i) for i, m in enumerate(split.native)])
    z_of = np.concatenate([np.arange(len(m)) for m in split.native])
    slices = SliceView([], [split.native[v][z] for v, z in zip(vol_of, z_of)], split.patients[vol_of],
                       split.volumes[vol_of], z_of)
    dice = [metrics.dice_per_class(native_pred[v][z], split.native[v][z], len(class_names))
            for v, z in zip(vol_of, z_of)]
    cases = report.pick_cases(slices, n_cases, score=[np.nan_to_num(d, nan=-1.0).max() for d in dice])
    if not cases:
        return
    images = {v: to_native(split.images[v, ..., 0], split.to_input[v], split.native[v].shape)
              for v in sorted({int(vol_of[c]) for c in cases})}
    view = SliceView([images[vol_of[c]][z_of[c]][..., None] for c in cases], [slices.native[c] for c in cases],
                     slices.patients[cases], slices.volumes[cases], z_of[cases])
    report.save_overlays(os.path.join(workdir, f"overlays_{tag}.png"), view,
                     [native_pred[vol_of[c]][z_of[c]] for c in cases], list(range(len(cases))), class_names, title,
                     dice_of=lambda k: dice[cases[k]])
    folder = os.path.join(workdir, "predictions", tag)
    os.makedirs(folder, exist_ok=True)
    for v in images:
        save_nifti(os.path.join(folder, _stem(split, v) + ".nii.gz"), native_pred[v], split.affines[v])


def save_nifti(path: str, labels_dhw: np.ndarray, affine: np.ndarray) -> None:
    """An axial (D, H, W) label volume back in the mask file's RAS+ voxel order, with its affine."""
    ras = np.ascontiguousarray(labels_dhw.transpose(2, 1, 0)[::-1, ::-1, :])  # axial_dhw undone
    nib.save(nib.Nifti1Image(ras.astype(np.uint8), np.asarray(affine, np.float64)), path)


def _stem(split, i: int) -> str:
    vol = re.sub(r"\.nii(\.gz)?$|\.dcm$", "", str(split.volumes[i]), flags=re.I)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{split.patients[i]}_{os.path.basename(vol.rstrip('/'))}")
