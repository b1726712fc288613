"""Predictions on the scan's own grid and the segmentation metrics at three levels.

Logits are predicted at the model input size, upsampled bilinearly to each slice's own
shape and turned into labels there; every metric compares those labels with the mask as
stored (never with a resized copy).

Levels (each metric per foreground class; background is never averaged in):

* slice: Dice of the 2D slice; HD95 in mm with the slice's (row, col) pixel spacing.
* volume: the slices of one manifest row stacked at their positions (a 3D volume; a 2D image
  is its own volume): Dice over all its voxels, HD95 in 3D with the between-slice spacing.
* patient: the mean of the patient's volumes (e.g. its T1, T2 and FLAIR series). This is
  the headline figure: patients, not slices, are the independent samples. A patient's HD95
  is the mean over its volumes with a finite HD95 (inf only when none has one).

Empty ground truth (``medjax.metrics``): a prediction where the mask is empty gives Dice 0;
both empty gives NaN, left out of every mean (``empty_rule="nan"``, as MONAI), or 1.0
(``empty_rule="one"``). HD95 is NaN when both are empty (left out) and inf when exactly
one is (a missed or a spurious structure); summaries give the mean over finite values and
count the infinite ones.
"""

from __future__ import annotations

import warnings

import numpy as np

from medjax import metrics
from medjax import batching
from medjax.segment import model


def padded_batches(split, feats: dict | None, batch: int):
    """(start, stop, inputs) per batch of ``split``: its images and, for a frozen backbone, its tokens."""
    return batching.padded_batches({"images": split.images, **(feats or {})}, batch)


def predict(spec, params, stats, split, feats: dict | None, batch: int) -> tuple[list, np.ndarray | None]:
    """(labels on each slice's own grid, class probabilities (N, K) or None) for every slice of ``split``."""
    fn = model.predict_fn(spec)
    return predict_with(lambda part: fn(params, stats, part), split, feats, batch)


def predict_with(fn, split, feats: dict | None, batch: int) -> tuple[list, np.ndarray | None]:
    """``predict`` for any model: ``fn(inputs) -> (seg logits at the input size, class probabilities or None)``."""
    native, probs = [], []
    for i, j, part in padded_batches(split, feats, batch):
        seg, cls = fn(part)
        seg = seg[: j - i]
        if cls is not None:
            probs.append(np.asarray(cls[: j - i]))
        shapes = [split.native[k].shape for k in range(i, j)]
        for shape in sorted(set(shapes)):
            rows = np.flatnonzero([s == shape for s in shapes])
            labels = np.asarray(model.upsample_fn(tuple(shape))(seg[rows]))
            native.extend(zip(rows + i, labels))
    native = [p for _, p in sorted(native, key=lambda t: t[0])]
    return native, (np.concatenate(probs) if probs else None)


def input_size_dice(spec, params, stats, split, feats, batch: int, num_classes: int) -> float:
    """Mean foreground Dice per slice at the model input size (both-empty slices left out): for curves."""
    fn = model.predict_fn(spec)
    return input_size_dice_with(lambda part: fn(params, stats, part), split, feats, batch, num_classes)


def input_size_dice_with(fn, split, feats, batch: int, num_classes: int) -> float:
    """``input_size_dice`` for any model (``fn`` as in ``predict_with``)."""
    values = []
    for i, j, part in padded_batches(split, feats, batch):
        pred = np.asarray(fn(part)[0][: j - i]).argmax(-1)
        values += [metrics.dice_per_class(p, g, num_classes) for p, g in zip(pred, split.masks[i:j])]
    values = np.asarray(values)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def case_metrics(pred, gt, num_classes: int, spacing, rule: str) -> dict:
    dice = metrics.dice_per_class(pred, gt, num_classes, empty_rule=rule)
    hd = metrics.hd95_per_class(pred, gt, num_classes, spacing)
    gt_empty = np.array([not (gt == c).any() for c in range(1, num_classes)])
    pred_any = np.array([(pred == c).any() for c in range(1, num_classes)])
    return {"dice": dice, "hd95": hd, "gt_empty": gt_empty, "spurious": gt_empty & pred_any}


def stack_volume(slices: list, positions: np.ndarray) -> np.ndarray:
    """(Z, rows, cols) with each slice at its position (minimum first); gaps (skipped background
    slices) are empty in prediction and ground truth alike."""
    z0 = int(positions.min())
    out = np.zeros((int(positions.max()) - z0 + 1,) + slices[0].shape, slices[0].dtype)
    for s, z in zip(slices, positions):
        out[int(z) - z0] = s
    return out


def evaluate(native_pred: list, split, num_classes: int, rule: str) -> dict:
    """Per-slice, per-volume and per-patient metric arrays: {level: {"dice": (n, C-1), "hd95": ..., "ids": ...}}."""
    per_slice = [case_metrics(p, g, num_classes, tuple(sp), rule)
                 for p, g, sp in zip(native_pred, split.native, split.spacing)]
    levels = {"slice": collect(per_slice, [f"{v}#{z}" for v, z in zip(split.volumes, split.slice_index)])}
    vols, per_volume, vol_patient = sorted(set(split.volumes.tolist())), [], []
    for v in vols:
        idx = np.flatnonzero(split.volumes == v)
        if len(idx) == 1 and np.isnan(split.slice_spacing[idx[0]]):  # a 2D image
            per_volume.append(per_slice[idx[0]])
        else:
            pos = split.slice_index[idx]
            pred = stack_volume([native_pred[i] for i in idx], pos)
            gt = stack_volume([split.native[i] for i in idx], pos)
            spacing = (split.slice_spacing[idx[0]], *split.spacing[idx[0]])
            per_volume.append(case_metrics(pred, gt, num_classes, spacing, rule))
        vol_patient.append(split.patients[idx[0]])
    levels["volume"] = collect(per_volume, vols)
    levels["patient"] = patient_level(levels["volume"], np.asarray(vol_patient))
    return levels


def patient_level(volume: dict, vol_patient: np.ndarray) -> dict:
    """Per-patient arrays from per-volume ones: the mean over a patient's volumes (see module)."""
    patients = sorted(set(vol_patient.tolist()))
    dice, hd, empty, spurious = [], [], [], []
    with warnings.catch_warnings():  # an all-NaN column (nothing to score) is NaN by design
        warnings.simplefilter("ignore", RuntimeWarning)
        for p in patients:
            k = vol_patient == p
            dice.append(np.nanmean(volume["dice"][k], axis=0))
            v = volume["hd95"][k]
            mean = np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=0)
            hd.append(np.where(np.isnan(mean) & np.isinf(v).any(axis=0), np.inf, mean))
            empty.append(volume["gt_empty"][k].all(axis=0))
            spurious.append(volume["spurious"][k].any(axis=0))
    return {"ids": patients, "dice": np.asarray(dice), "hd95": np.asarray(hd), "gt_empty": np.asarray(empty),
            "spurious": np.asarray(spurious)}


def collect(cases: list, ids: list) -> dict:
    keys = ("dice", "hd95", "gt_empty", "spurious")
    return {"ids": list(ids), **{k: np.asarray([c[k] for c in cases]) for k in keys}}


def summarise(levels: dict, class_names) -> dict:
    """JSON-ready summary: per level and foreground class, Dice mean/std/n and HD95 mean/std/median over
    finite values, with the counts of left-out (NaN), infinite and empty-ground-truth cases."""
    out = {}
    for level, arrays in levels.items():
        per_class = {}
        for c, name in enumerate(class_names[1:]):
            d, h = arrays["dice"][:, c], arrays["hd95"][:, c]
            fd, fh = d[np.isfinite(d)], h[np.isfinite(h)]
            per_class[name] = {
                "dice_mean": float(fd.mean()) if len(fd) else float("nan"),
                "dice_std": float(fd.std(ddof=1)) if len(fd) > 1 else 0.0,
                "dice_n": int(len(fd)), "dice_left_out": int(np.isnan(d).sum()),
                "hd95_mean": float(fh.mean()) if len(fh) else float("nan"),
                "hd95_std": float(fh.std(ddof=1)) if len(fh) > 1 else 0.0,
                "hd95_median": float(np.median(fh)) if len(fh) else float("nan"),
                "hd95_n": int(len(fh)), "hd95_inf": int(np.isinf(h).sum()),
                "empty_ground_truth": int(arrays["gt_empty"][:, c].sum()),
                "empty_ground_truth_with_prediction": int(arrays["spurious"][:, c].sum()),
            }
        out[level] = {"cases": len(arrays["ids"]), "classes": per_class}
    return out


def per_case_table(levels: dict, class_names) -> dict:
    """The raw per-patient and per-volume values (JSON-ready; NaN and inf as strings)."""
    def clean(x):
        return [[v if np.isfinite(v) else str(v) for v in row.tolist()] for row in x]

    return {level: {"ids": levels[level]["ids"], "classes": list(class_names[1:]),
                    "dice": clean(levels[level]["dice"]), "hd95": clean(levels[level]["hd95"])}
            for level in ("volume", "patient")}
