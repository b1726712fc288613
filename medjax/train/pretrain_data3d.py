"""3D pretraining data (``config.model.spatial_dims == 3``): whole volumes of the manifest's training split.

``pretrain_data`` calls in here for the source; the Grain pipeline, batching,
masks and device placement are the 2D ones (the crop config's type,
``MultiCrop3DConfig``, makes the pipeline cut cubes and mask 3D token grids).

Volumes come from ``VolumeIndex`` (RAS+ (X, Y, Z), resampled to
``config.data.target_spacing`` and normalised per volume) and are handed to the
augmentation as (D, H, W) in the axial display layout: D runs from the feet to
the head, and ``volume[k]`` is exactly the axial slice k that the 2D trainer
sees (anterior up, patient-right on the image left), so W is the left-right
axis the random flip mirrors.
"""

from __future__ import annotations

import numpy as np

from medjax.data.slices import VolumeIndex
from medjax.train.pretrain_data import pretrain_manifest, split_rows


def axial_dhw(volume: np.ndarray) -> np.ndarray:
    """An RAS+ (X, Y, Z) volume as (D, H, W) = (Z, A->P, R->L): ``out[k]`` is the axial display slice k."""
    return np.ascontiguousarray(np.asarray(volume)[::-1, ::-1, :].transpose(2, 1, 0))


class AxialVolumes:
    """Random-access source of records whose ``image`` is a (D, H, W) volume (see ``axial_dhw``)."""

    def __init__(self, index: VolumeIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        record = dict(self.index[i])
        record.pop("mask", None)  # pretraining reads images only
        record["image"] = axial_dhw(record["image"])
        return record


def volume_source(config, manifest_path: str, split: str, *, label_columns=(), extra_columns=(),
                  say=None) -> AxialVolumes:
    """The volumes of one split of a manifest, resampled, normalised and in the (D, H, W) layout; with
    ``label_columns`` each record carries their codes (``label``, then ``label_<column>``), as a slice's."""
    d = config.data
    normalisation, rows = split_rows(config, manifest_path, split, label_columns=label_columns,
                                     extra_columns=extra_columns)
    index = VolumeIndex(rows, normalisation=normalisation, label_columns=label_columns, skip_bad=d.skip_bad,
                        target_spacing=tuple(d.target_spacing), cache_volumes=d.volumes_in_memory)
    if say:
        shapes = {tuple(int(n) for n in axial_dhw(index[0]["image"]).shape)} if len(index) else set()
        first = f"; first volume {'x'.join(map(str, next(iter(shapes))))} (D x H x W)" if shapes else ""
        spacing = (f" at {'x'.join(f'{s:g}' for s in d.target_spacing)} mm" if d.target_spacing
                   else " on their own voxel grids (config.data.target_spacing is empty)")
        say(f"{split} split: {len(rows)} series of {len(rows.patients())} patients -> {len(index)} volumes"
            f"{spacing}{first}")
    return AxialVolumes(index)


def volume_pretrain_source(config, workdir: str, say=None) -> AxialVolumes:
    """The volumes to pretrain on: the training split of the manifest (or of the demo dataset's)."""
    manifest, extra = pretrain_manifest(config, workdir, say)
    return volume_source(config, manifest, "train", extra_columns=extra, say=say)
