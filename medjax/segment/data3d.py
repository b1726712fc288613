"""The 3D segmentation trainer's data: whole volumes with their masks, at one model input shape and on their own grid.

Each manifest row with a mask is one example. Image and mask are read by
``VolumeIndex`` (RAS+, resampled to the pretraining run's
``config.data.target_spacing``: image linear, mask nearest; intensities
normalised per volume as in pretraining) and laid out as (D, H, W) axial
volumes (``pretrain_data3d.axial_dhw``: ``volume[k]`` is axial display slice k).

Model input: one shape per run, (D, H, W) voxels, each side a multiple of the
patch size: ``config.segment.volume_shape``, or by default the largest volume's
sides rounded up to a multiple (the demo's 16 x 75 x 75 voxels at 3 mm with
patch 8 -> 16 x 80 x 80). A volume is centred in it and padded with 0 (the
background of the [0, 1] normalisation, as pretraining's crops pad) before the
run's mean/std; a volume larger than the input along any side is first scaled
down, the same factor on every axis, so voxels stay isotropic. Padding rather
than resizing keeps the physical scale the backbone was pretrained at.

Each volume also keeps its mask as stored in its mask file (RAS+, in the same
axial layout), that grid's voxel spacing, and ``to_input``: per axis the affine
map from a native voxel index to a coordinate on the input grid (resampling,
the axial flips, scaling and padding composed). Predictions are mapped back
through it (``segment_eval3d``) before any argmax or metric.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from scipy import ndimage

from medjax import console
from medjax.readers import read_image
from medjax.data.label_maps import fit_mask
from medjax.data.slices import VolumeIndex
from medjax.data.sources import axial_dhw, index_options
from medjax.segment.data import SPLITS, check_empty_masks, check_label_values, describe, native_grid, read_manifest

_RAS_OF_DHW = (2, 1, 0)  # D runs along z, H along y, W along x
_FLIPPED = (False, True, True)  # axial_dhw reverses x and y


@dataclasses.dataclass
class VolSplit:
    """The volumes of one split, in manifest order."""

    images: np.ndarray  # (N, D, H, W, 1) float32 model input, normalised as in pretraining
    masks: np.ndarray  # (N, D, H, W) uint8 labels on the input grid (nearest neighbour, padding 0)
    native: list  # N uint8 masks (d, h, w) as stored in the mask files, axial layout
    spacing: np.ndarray  # (N, 3) mm per native voxel along (d, h, w)
    to_input: np.ndarray  # (N, 3, 2): native index j on axis a -> input coordinate to_input[a, 0] * j + [a, 1]
    affines: list  # N 4x4 native voxel (RAS+ array) -> mm, to write predictions as NIfTI
    patients: np.ndarray  # (N,) patient ids
    volumes: np.ndarray  # (N,) the image path (one manifest row = one volume)
    labels: np.ndarray  # (N,) classification target; -1 without one

    def subset(self, index) -> "VolSplit":
        index = np.asarray(index)
        return VolSplit(self.images[index], self.masks[index], [self.native[i] for i in index], self.spacing[index],
                        self.to_input[index], [self.affines[i] for i in index], self.patients[index],
                        self.volumes[index], self.labels[index])

    def __len__(self) -> int:
        return len(self.masks)


def input_shape(shapes, patch: int, configured=()) -> tuple:
    """The model input (D, H, W): ``configured`` (checked), else the largest sides rounded up to the patch."""
    if configured:
        if any(int(n) % patch for n in configured):
            raise ValueError(f"config.segment.volume_shape={tuple(configured)} has sides that are not multiples of "
                             f"the patch size {patch}; choose e.g. "
                             f"{tuple(max(patch, int(n) // patch * patch) for n in configured)}.")
        return tuple(int(n) for n in configured)
    return tuple(int(math.ceil(max(s[a] for s in shapes) / patch) * patch) for a in range(3))


def native_to_resampled(native_shape, native_spacing, resampled_shape, target_spacing) -> np.ndarray:
    """(3, 2) per (D, H, W) axis: native index j -> coordinate c * j + d on the resampled axial grid.

    ``intensity.resample`` keeps the first voxel (in RAS+ order) in place and steps by the target
    spacing; ``axial_dhw`` then reverses y and x, so on those axes the last voxels line up instead.
    Shapes and spacings are (D, H, W); no target spacing: the identity.
    """
    out = np.zeros((3, 2))
    for a in range(3):
        c = native_spacing[a] / target_spacing[a] if target_spacing else 1.0
        d = (resampled_shape[a] - 1) - (native_shape[a] - 1) * c if _FLIPPED[a] else 0.0
        out[a] = (c, d)
    return out


def place(volume: np.ndarray, shape: tuple, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(``volume`` centred in ``shape``, padded with 0 and first scaled down if it does not fit, the (3, 2)
    affine from its voxel index to the placed coordinate)."""
    f = min(1.0, min(t / n for t, n in zip(shape, volume.shape)))
    if f < 1.0:  # the same factor on every axis: isotropic voxels stay isotropic
        scaled = tuple(max(1, min(t, round(n * f))) for t, n in zip(shape, volume.shape))
        volume = ndimage.affine_transform(volume, [1.0 / f] * volume.ndim, output_shape=scaled, order=order,
                                          mode="nearest")
    pad = [((t - n) // 2, t - n - (t - n) // 2) for t, n in zip(shape, volume.shape)]
    return np.pad(volume, pad), np.array([(f, p[0]) for p in pad], np.float64)


def load_volumes(config, workdir: str, run_dir: str, run_data, *, patch: int, mean: float, std: float, say=console.say):
    """``({split: VolSplit}, info)`` with ``info["input_shape"]``; ``run_data`` is the pretraining run's
    ``config.data`` (target spacing and normalisation)."""
    s = config.segment
    src = read_manifest(config, workdir, run_dir, say)
    names = tuple(s.class_names)
    target = tuple(float(t) for t in run_data.target_spacing)
    normalisation = json.loads(run_data.normalisation)
    options = index_options(config)
    loaded, assumed = {}, set()
    for split in SPLITS:
        rows = src.rows.split(split)
        if not len(rows):
            raise ValueError(f"The {split} split of {src.path} has no volumes; segmentation needs train, val and "
                             "test patients.")
        # Every volume stays in the index's cache: each is read once.
        index = VolumeIndex(rows, normalisation=normalisation, label_columns=src.label_columns,
                            skip_bad=config.data.skip_bad, target_spacing=target, cache_volumes=len(rows),
                            **options)
        loaded[split] = [_one_volume(config, index[i], src, names, target, assumed) for i in range(len(index))]
    empty = [(src.row_of[v["volume"]], False) for vs in loaded.values() for v in vs if not v["native"].any()]
    check_empty_masks(config, empty, src.path, say)
    shape = input_shape([v["image"].shape for vs in loaded.values() for v in vs], patch, s.volume_shape)
    splits = {split: _stack(vols, shape, mean, std, src) for split, vols in loaded.items()}
    info = describe(config, src, splits["train"].masks, "voxels" if assumed else "mm", assumed)
    info["input_shape"] = list(shape)
    info["target_spacing"] = list(target)
    return splits, info


def _one_volume(config, record: dict, src, names, target, assumed: set) -> dict:
    """One volume with its mask on the native grid: the mask file's, or the image's when the mask may have
    been resampled onto it (``config.data.mask_resample``), its values mapped as the index mapped them."""
    row = src.row_of[record["source"]]
    options = index_options(config)
    data = native_grid(config, row, expect_3d=True)
    if data.meta.get("spacing_source") == "assumed":
        assumed.add(data.meta.get("source") or row.mask_path)
    mdata = data if not options["mask_resample"] else read_image(row.mask_path, expect_3d=True)
    labels, _ = fit_mask(row, data, data.array, mdata, mdata.array, resample=options["mask_resample"],
                         values=options["mask_values"])
    native = axial_dhw(labels)
    check_label_values(native, names, row, record["source"])
    image, mask = axial_dhw(record["image"]), axial_dhw(record["mask"])
    spacing = tuple(float(data.spacing[k]) for k in _RAS_OF_DHW)
    target_dhw = tuple(target[k] for k in _RAS_OF_DHW) if target else ()
    return {"image": image, "mask": mask, "native": native, "spacing": spacing, "affine": data.affine,
            "to_resampled": native_to_resampled(native.shape, spacing, image.shape, target_dhw),
            "patient": record["patient_id"], "volume": record["source"],
            "label": record["label"] if src.label_columns else -1}


def _stack(vols: list, shape: tuple, mean: float, std: float, src) -> VolSplit:
    images, masks, to_input, labels = [], [], [], []
    for v in vols:
        x, placed = place(v["image"], shape, order=1)
        m, _ = place(v["mask"], shape, order=0)
        images.append((x - mean) / std)  # after padding: padding is 0 before normalisation, as in pretraining
        masks.append(m)
        r = v["to_resampled"]
        to_input.append(np.stack([placed[:, 0] * r[:, 0], placed[:, 0] * r[:, 1] + placed[:, 1]], axis=1))
        label = v["label"]
        if src.demo_rule:  # the demo's lesion class where the volume shows the lesion, else none
            label = label if v["native"].any() else 0
        labels.append(label)
    unlabelled = sum(v < 0 for v in labels) if src.label_columns else 0
    if unlabelled == len(labels):
        raise ValueError(f"No row of one split of {src.path} has a {src.label_columns[0]!r} class; the multi-task "
                         "classification head needs labelled rows in train, val and test.")
    if unlabelled:  # an empty (or uncertain) cell: the volume trains and scores the segmentation only
        console.say(f"{unlabelled} of {len(labels)} volumes of {src.path} have no {src.label_columns[0]!r} class: "
                    "segmentation only, left out of the classification loss and scores.")
    return VolSplit(np.stack(images).astype(np.float32)[..., None], np.stack(masks).astype(np.uint8),
                    [v["native"] for v in vols], np.asarray([v["spacing"] for v in vols], np.float64),
                    np.stack(to_input), [v["affine"] for v in vols], np.asarray([v["patient"] for v in vols]),
                    np.asarray([v["volume"] for v in vols]), np.asarray(labels, np.int64))


def augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator, *, flip_p: float,
            crop_scale) -> tuple[np.ndarray, np.ndarray]:
    """Random resized crop and left-right flip of (N, D, H, W, 1) images (trilinear) and (N, D, H, W) masks
    (nearest) together; returns new arrays.

    The crop keeps a share of the voxels uniform in ``crop_scale``: each side that share's cube root,
    times a per-axis factor that lets any two sides' proportions change by up to 4/3 (the 2D aspect
    range), at a random position, resized back to the input shape. The flip mirrors W, the patient's
    left-right axis in the axial layout (anatomy is not symmetric head-feet or front-back).
    """
    shape = np.asarray(images.shape[1:4])
    out_x, out_m = np.empty_like(images), np.empty_like(masks)
    crop = tuple(crop_scale) != (1.0, 1.0)
    for b in range(images.shape[0]):
        x, m = images[b, ..., 0], masks[b]
        if crop:
            side = rng.uniform(*crop_scale) ** (1.0 / 3.0)
            jitter = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), 3) / 2)
            size = np.clip(np.round(shape * side * jitter), 1, shape).astype(int)
            start = np.array([rng.integers(0, n - c + 1) for n, c in zip(shape, size)])
            scale = size / shape
            offset = start + 0.5 * scale - 0.5  # voxel-area alignment, as PIL's box resize in 2D
            x = ndimage.affine_transform(x, scale, offset, output_shape=tuple(shape), order=1, mode="nearest")
            m = ndimage.affine_transform(m, scale, offset, output_shape=tuple(shape), order=0, mode="nearest")
        if rng.random() < flip_p:
            x, m = x[..., ::-1], m[..., ::-1]
        out_x[b, ..., 0], out_m[b] = x, m
    return out_x, out_m
