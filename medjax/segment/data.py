"""The segmentation trainer's data: slices with their masks, at the model input size and on their own grid.

Each slice is kept twice: eval-transformed at the model's input size (the whole
slice resized, image bicubic, mask nearest neighbour) for training and
prediction, and its mask on the slice's own grid with the pixel spacing in mm,
for the metrics. Predictions are upsampled back to that grid before any Dice or
HD95 is computed, so the figures are those of the scan, not of a resized copy.

A mask whose grid differs from its image (shape or spacing) is resampled onto
it with nearest neighbour when ``config.data.mask_resample`` is set and refused
otherwise, and mask values are mapped by ``config.data.mask_values``, both by the
slice index (``medjax.data.slices``); here, a label value that ``config.segment.class_names`` does not name, a row
without a mask and a class no training mask contains are refused, each in one
sentence. An empty mask (every value background) is valid by default
(``config.segment.empty_masks="allow"``): a slice or scan that does not show the structure (a brain
without a lesion on that slice), and the metrics apply their stated empty rule to it; a whole 2D
image (a manifest row with one slice, e.g. a radiograph) with an empty mask is named in a warning,
since a structure that is always in view is more often a failed label. With ``"refuse"`` (lungs on
chest films) every row whose mask shows no foreground on any of its slices is refused, all named
in one sentence with their manifest lines. Validation and test images must all carry a pixel spacing
or all lack one (HD95 in mm or in pixels, never a mean of both).
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
from PIL import Image

from medjax import console
from medjax.data import fractions
from medjax.data.demo import LESION_CLASSES
from medjax.data.job_manifest import manifest_path, open_manifest
from medjax.readers import read_image
from medjax.data.labelled import eval_transform
from medjax.data.slices import given_spacing
from medjax.data.sources import DEMO_COLUMNS, demo_manifest, slice_source, use_run_demo_data

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class SegSplit:
    """The slices of one split, in the order of the slice index."""

    images: np.ndarray  # (N, S, S, 1) float32, normalised as in pretraining
    masks: np.ndarray  # (N, S, S) uint8 labels at the input size (nearest neighbour)
    native: list  # N uint8 masks on each slice's own grid (rows, cols)
    spacing: np.ndarray  # (N, 2) mm per row and per column of the native slice
    slice_spacing: np.ndarray  # (N,) mm between neighbouring slices; NaN for 2D images
    patients: np.ndarray  # (N,) patient ids
    volumes: np.ndarray  # (N,) the image file (one manifest row = one volume)
    slice_index: np.ndarray  # (N,) position of the slice in its volume
    labels: np.ndarray  # (N,) classification target; -1 without one

    def subset(self, index) -> "SegSplit":
        index = np.asarray(index)
        return SegSplit(self.images[index], self.masks[index], [self.native[i] for i in index],
                        self.spacing[index], self.slice_spacing[index], self.patients[index],
                        self.volumes[index], self.slice_index[index], self.labels[index])

    def __len__(self) -> int:
        return len(self.masks)


def display_spacing(spacing, axis) -> tuple[tuple[float, float], float]:
    """((row, col) mm, slice spacing mm) of slices cut along ``axis`` in ``medjax.data.slices``' display
    orientation from an RAS+ volume with voxel ``spacing`` (x, y, z); a 2D image's own (row, col)."""
    s = [float(v) for v in spacing]
    if len(s) == 2:
        return (s[0], s[1]), float("nan")
    if axis == "axial":  # rows run along y, columns along x
        return (s[1], s[0]), s[2]
    if axis == "coronal":  # rows along z, columns along x
        return (s[2], s[0]), s[1]
    if axis == "sagittal":  # rows along z, columns along y
        return (s[2], s[1]), s[0]
    a = int(axis) % 3
    rest = [s[i] for i in range(3) if i != a]
    return (rest[0], rest[1]), s[a]


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))


@dataclasses.dataclass
class ManifestSource:
    """The validated manifest of a segmentation run, shared by the slice (2D) and volume (3D) loaders."""

    path: str
    rows: object  # medjax.data.manifest.Manifest
    row_of: dict  # image path -> row
    label_columns: tuple  # (classification column,) when multi-task, else ()
    extra: tuple  # demo columns that are neither labels nor known
    column: str
    demo: bool
    demo_rule: bool  # demo multi-task: the lesion class where the mask shows it, else none


def read_manifest(config, workdir: str, run_dir: str, say=console.say) -> ManifestSource:
    """The manifest (or the demo's) with its label column checked and a mask on every train/val/test row."""
    s = config.segment
    demo = not s.manifest
    if demo:
        if run_dir:
            use_run_demo_data(config, run_dir)
        manifest = demo_manifest(config, workdir, say=say)
        if s.demo_masks == "tissue":  # the same rows with the tissue label maps as masks
            manifest = os.path.join(os.path.dirname(manifest), "manifest_tissue.csv")
    else:
        manifest = manifest_path(s.manifest, "config.segment.manifest", " whose rows have a mask_path")
    with open(manifest, newline="") as f:
        header = next(csv.reader(f), [])
    classify = s.classification_weight > 0
    column = s.label_column or ("lesion" if demo and classify else "")
    if classify and not column:
        raise ValueError("config.segment.classification_weight > 0 but config.segment.label_column is empty; "
                         "name the manifest column the classification head should predict.")
    if column and column not in header:
        raise ValueError(f"config.segment.label_column={column!r} is not a column of {manifest} (it has "
                         f"{', '.join(header)}); name one of its label columns.")
    label_columns = (column,) if classify else ()
    extra = tuple(c for c in DEMO_COLUMNS if c not in label_columns) if demo else ()
    rows = open_manifest(config, manifest, label_columns=label_columns,
                         label_key="config.segment.label_column" if classify else "", extra=extra)
    for row in rows:
        if row.split in SPLITS and not row.mask_path:
            raise ValueError(f"Line {row.line} of {manifest} ({row.path}) has no mask_path; segmentation needs a "
                             "mask for every train, val and test row (an all-zero mask where the structure is "
                             "absent).")
    return ManifestSource(manifest, rows, {row.path: row for row in rows}, label_columns, extra, column, demo,
                          demo and classify and not s.label_column)


def check_label_values(mask: np.ndarray, names, row, source: str) -> None:
    """A mask value that ``config.segment.class_names`` does not name: one sentence."""
    counts = np.bincount(mask.ravel(), minlength=len(names))
    if len(counts) > len(names):
        bad = np.flatnonzero(counts[len(names):]) + len(names)
        named = ", ".join(f"{i} {n}" for i, n in enumerate(names))
        raise ValueError(f"The mask {row.mask_path} of {source} (patient {row.patient_id}) holds label value(s) "
                         f"{', '.join(map(str, bad))} that config.segment.class_names does not name (it names "
                         f"{named}); add names for them or map them to named labels with config.data.mask_values "
                         "(JSON, e.g. '{\"255\": 1}').")


def native_grid(config, row, expect_3d=None):
    """The file whose grid a row's masks are on for the metrics: the mask file (the index has checked it lies
    on the image's grid), or the image itself when ``config.data.mask_resample`` may have moved the mask."""
    if not config.data.mask_resample:
        return read_image(row.mask_path, expect_3d=expect_3d)
    picked = {"volume_index": config.data.volume_index} if config.data.volume_index >= 0 else {}
    return read_image(row.path, series_uid=row.series_uid, expect_3d=expect_3d, **picked)


def describe(config, src: ManifestSource, train_masks, unit: str, assumed) -> dict:
    """Refuses a class no training mask shows; info: the task, classification classes, HD95 unit."""
    s = config.segment
    names = tuple(s.class_names)
    present = np.zeros(len(names), bool)
    for m in train_masks:
        present |= np.bincount(m.ravel(), minlength=len(names))[: len(names)] > 0
    missing = [names[c] for c in range(1, len(names)) if not present[c]]
    if missing:
        raise ValueError(f"Class(es) {', '.join(missing)} of config.segment.class_names appear in no training mask, "
                         "so no head can learn them; remove them from class_names or add training cases.")
    classify = bool(src.label_columns)
    if src.demo_rule:
        cls_names = list(LESION_CLASSES)
    elif classify:
        codes = src.rows.classes[src.column]
        cls_names = [str(c) for c in range(max(codes.values()) + 1)]
        for v in src.rows.label_values(src.column):
            cls_names[codes[v]] = v
    else:
        cls_names = []
    shown = "slice" if s.spatial_dims == 2 else "volume"
    demo = "demo chest X-ray, lung masks" if s.demo_masks == "lungs" else f"demo brain MRI, {s.demo_masks} masks"
    task = (demo if src.demo else f"masks of {src.path}") + (
        "; classification: " + (f"lesion class shown on the {shown} (none when it does not show)" if src.demo_rule
                                else f"column {src.column!r}") if classify else "")
    return {"manifest": os.path.abspath(src.path), "task": task, "classification_classes": cls_names,
            "hd95_unit": unit, "spacing_assumed_for": sorted(assumed)}


def load_data(config, workdir: str, run_dir: str, *, size: int, mean: float, std: float, say=console.say):
    """``({split: SegSplit}, info)``; info holds the task, the classification classes and the spacing source."""
    src = read_manifest(config, workdir, run_dir, say)
    names = tuple(config.segment.class_names)
    splits, assumed, empty = {}, set(), []
    for split in SPLITS:
        splits[split] = _load_split(config, src.path, split, src.label_columns, src.extra, src.row_of, names, size,
                                    mean, std, demo_rule=src.demo_rule, with_spacing=split != "train",
                                    assumed=assumed)
        empty += empty_mask_rows(splits[split], src.row_of)
    check_empty_masks(config, empty, src.path, say)
    measured = len(set(splits["val"].volumes.tolist()) | set(splits["test"].volumes.tolist()))
    if assumed and len(assumed) < measured and not config.segment.assumed_spacing_mm:
        raise ValueError(f"{len(assumed)} of the {measured} val and test images of {src.path} carry no pixel spacing "
                         f"(e.g. {sorted(assumed)[0]}) while the others do, so HD95 would average millimetres with "
                         "pixels; give their rows a pixel_spacing (row,col mm) or set config.segment.assumed_spacing_mm.")
    unit = "px" if assumed and not config.segment.assumed_spacing_mm else "mm"
    return splits, describe(config, src, splits["train"].masks, unit, assumed)


def empty_mask_rows(split, row_of: dict) -> list[tuple]:
    """(manifest row, whether it is a whole 2D image) of each row whose mask shows no foreground on any of
    its slices in ``split``."""
    out = []
    for source in dict.fromkeys(split.volumes.tolist()):
        idx = np.flatnonzero(split.volumes == source)
        if not any(split.native[i].any() for i in idx):
            out.append((row_of[source], len(idx) == 1))
    return out


def check_empty_masks(config, empty: list, manifest: str, say=console.say) -> None:
    """``config.segment.empty_masks``: refuse every empty mask in one sentence, or allow them (whole 2D images
    named in a warning, slices of volumes counted)."""
    if not empty:
        return
    names = " or ".join(config.segment.class_names[1:])
    listed = ", ".join(f"{row.mask_path} (line {row.line})" for row, _ in empty)
    if config.segment.empty_masks == "refuse":
        raise ValueError(f"The mask(s) {listed} of {manifest} show no {names} at all (every pixel background) although "
                         "config.segment.empty_masks='refuse' says the structure is always in view; redraw or fix these "
                         "masks (or remove their rows), or set config.segment.empty_masks='allow' if they are right.")
    whole = [(row, w) for row, w in empty if w]
    if whole:
        shown = ", ".join(f"{row.mask_path} (line {row.line})" for row, _ in whole[:10])
        more = f" and {len(whole) - 10} more" if len(whole) > 10 else ""
        console.warn(f"{len(whole)} whole 2D image(s) of {manifest} have a mask with no {names} at all: {shown}{more}; "
                     "they count as images without the structure (config.segment.empty_masks='allow'); if the "
                     "structure is always in view (e.g. lungs on a radiograph), these are failed labels: fix them or "
                     "set config.segment.empty_masks='refuse'.")
    if len(whole) < len(empty):
        say(f"{len(empty) - len(whole)} volume(s) of {manifest} have masks with no {names} on any slice (cases "
            "without the structure).")


def _load_split(config, manifest, split, label_columns, extra, row_of, names, size, mean, std, *, demo_rule,
                with_spacing, assumed) -> SegSplit:
    records = slice_source(config, manifest, split, label_columns=label_columns, extra_columns=extra)
    spacing_of: dict = {}
    out = {k: [] for k in ("images", "masks", "native", "spacing", "slice_spacing", "patients", "volumes",
                           "slice_index", "labels")}
    for r in records:
        source = r["source"]
        row = row_of[source]
        mask = r["mask"]
        check_label_values(mask, names, row, source)
        if with_spacing and source not in spacing_of:
            spacing_of[source] = _slice_spacing(config, row, assumed)
        rows_cols, between = spacing_of.get(source, ((np.nan, np.nan), np.nan))
        label = r["label"] if label_columns else -1
        if demo_rule:
            label = label if mask.any() else 0
        out["images"].append(eval_transform(r["image"], size, mean, std))
        out["masks"].append(resize_mask(mask, size))
        out["native"].append(mask)
        out["spacing"].append(rows_cols)
        out["slice_spacing"].append(between)
        out["patients"].append(r["patient_id"])
        out["volumes"].append(source)
        out["slice_index"].append(r["slice_index"])
        out["labels"].append(label)
    if not out["masks"]:
        raise ValueError(f"The {split} split of {manifest} has no slices; segmentation needs train, val and test "
                         "patients.")
    unlabelled = sum(v < 0 for v in out["labels"]) if label_columns else 0
    if unlabelled == len(out["labels"]):
        raise ValueError(f"No {split} row of {manifest} has a {label_columns[0]!r} class; the multi-task "
                         "classification head needs labelled rows in train, val and test.")
    if unlabelled:  # an empty (or uncertain) cell: the row trains and scores the segmentation only
        console.say(f"{unlabelled} of the {len(out['labels'])} {split} slices of {manifest} have no "
                    f"{label_columns[0]!r} class (empty or uncertain cell): segmentation only, left out of the "
                    "classification loss and scores.")
    return SegSplit(np.stack(out["images"])[..., None], np.stack(out["masks"]), out["native"],
                    np.asarray(out["spacing"], np.float64), np.asarray(out["slice_spacing"], np.float64),
                    np.asarray(out["patients"]), np.asarray(out["volumes"]), np.asarray(out["slice_index"]),
                    np.asarray(out["labels"], np.int64))


def _slice_spacing(config, row, assumed: set):
    """The (row, col) and between-slice spacing of a row's slices, in mm (target spacing if resampled),
    read from the file whose grid the masks are on (``native_grid``). Order: the file's own spacing, then
    the manifest's pixel_spacing, then config.segment.assumed_spacing_mm, then 1 px."""
    data = given_spacing(row, native_grid(config, row), row.path if config.data.mask_resample else row.mask_path)
    spacing = data.spacing
    if config.data.target_spacing:
        spacing = tuple(config.data.target_spacing)[: len(spacing)]
    elif data.meta.get("spacing_source") == "assumed":  # PNG/JPEG, or DICOM without a pixel spacing
        assumed.add(data.meta.get("source") or row.mask_path)
        if config.segment.assumed_spacing_mm:
            spacing = tuple(config.segment.assumed_spacing_mm)
    return display_spacing(spacing, config.data.slice_axis)


def few_label_indices(split: SegSplit, fraction: float, seed: int, classify: bool) -> np.ndarray:
    """Slices of a ``fraction`` of the training patients (whole patients, stratified).

    Strata: the classification label with the multi-task head, else whether the slice's mask
    shows any structure (so a 10 % subset keeps patients with and without it).
    """
    strata = split.labels if classify else np.array([int(m.any()) for m in split.masks])
    return fractions.subset_indices(split.patients, strata, fraction, seed)


def augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, *, flip_p: float,
            crop_scale) -> tuple[np.ndarray, np.ndarray]:
    """Random resized crop (area share in ``crop_scale``, aspect 3/4..4/3) and horizontal flip, applied to
    image (bilinear) and mask (nearest neighbour) together; returns new arrays."""
    n, size = images.shape[0], images.shape[1]
    out_x, out_m = np.empty_like(images), np.empty_like(masks)
    crop = tuple(crop_scale) != (1.0, 1.0)
    for b in range(n):
        x, m = images[b, ..., 0], masks[b]
        if crop:
            area = rng.uniform(*crop_scale) * size * size
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w = int(min(size, round(np.sqrt(area * ratio))))
            h = int(min(size, round(np.sqrt(area / ratio))))
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            box = (left, top, left + w, top + h)
            x = np.asarray(Image.fromarray(x, mode="F").resize((size, size), Image.BILINEAR, box=box))
            m = np.asarray(Image.fromarray(m).resize((size, size), Image.NEAREST, box=box))
        if rng.random() < flip_p:
            x, m = x[:, ::-1], m[:, ::-1]
        out_x[b, ..., 0], out_m[b] = x, m
    return out_x, out_m
