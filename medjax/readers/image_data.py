"""The type every medjax reader returns, its error, and the orientation helpers the readers share.

Readers disagree on units, axis order and orientation; downstream code (slicing, augmentation,
metrics in millimetres) should not have to care which format a record came from. Every reader
(``dicom``, ``nifti``, ``image``; dispatched by ``readers.read_image``) therefore returns an
:class:`ImageData` holding float32 values in physical units, the voxel spacing in millimetres and,
for volumes, a voxel -> RAS affine with the array already reoriented to the closest canonical RAS+
axes. A user error ends in one :class:`ImageReadError` sentence that names the file and the fix.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
from nibabel import orientations


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """An image or volume in physical units.

    array: float32. Volumes are (X, Y, Z) in RAS+ (axis 0 left -> Right, 1 posterior ->
      Anterior, 2 inferior -> Superior); a 4D NIfTI adds a trailing time/component axis.
      2D images are (rows, cols) as displayed, or (rows, cols, 3) for colour.
    spacing: millimetres per spatial axis (2 entries for 2D images, 3 for volumes); a
      trailing channel or time axis has no entry.
    affine: 4x4 voxel -> RAS millimetres for volumes; None for 2D images, which carry no
      patient geometry.
    meta: JSON-able facts about the source (format, modality, series UID, photometric
      interpretation, rescale, ...) and ``warnings``: problems found but not fatal.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    affine: np.ndarray | None
    meta: dict

    @property
    def is_volume(self) -> bool:
        """True for data with patient geometry (an affine), False for plain 2D images."""
        return self.affine is not None

    def with_given_spacing(self, given: tuple[float, float], source: str, rtol: float = 0.01) -> "ImageData | None":
        """This image with a (row, col) pixel spacing ``given`` from outside the file (``source`` goes into
        meta['spacing_source']), or None when the file's own spacing disagrees by more than ``rtol``.

        Only a 2D image whose file carries no spacing (meta 'spacing_source' 'assumed') takes it: a file's
        own header is never overridden, it is only compared (for a volume: with two of its axes).
        """
        if self.meta.get("spacing_source") == "assumed" and not self.is_volume:
            return dataclasses.replace(self, spacing=tuple(float(g) for g in given),
                                       meta={**self.meta, "spacing_source": source})
        pairs = itertools.permutations(self.spacing, 2) if self.is_volume else [self.spacing]
        agree = any(np.allclose(pair, given, rtol=rtol, atol=0.0) for pair in pairs)
        return self if agree else None


class ImageReadError(ValueError):
    """A file or folder that cannot be turned into an image; the message names it and the fix."""


def canonical_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Reorient ``array`` (first three axes spatial) to the closest canonical RAS+ axes.

    Only flips and axis permutations are applied (no interpolation), so values are
    untouched; the affine is updated so every voxel keeps its position in millimetres.
    Returns the reoriented array, its affine and the spacing per spatial axis.
    """
    ornt = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.axcodes2ornt(("R", "A", "S"))
    )
    out = orientations.apply_orientation(array, ornt)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, array.shape[:3])
    spacing = tuple(float(s) for s in np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0)))
    return np.ascontiguousarray(out), new_affine, spacing


def axcodes(affine: np.ndarray) -> str:
    """The orientation of an affine's voxel axes as a string such as 'LPS' (for meta)."""
    return "".join(str(c) for c in orientations.aff2axcodes(affine))


def reason(exc: BaseException) -> str:
    """A library exception as one line, so a wrapped error message stays one sentence."""
    return " ".join(str(exc).split()) or type(exc).__name__
