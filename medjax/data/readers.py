"""One entry point for every image format medjax reads, and the type they all return.

Readers disagree on units, axis order and orientation; downstream code (slicing,
augmentation, metrics in millimetres) should not have to care which format a record
came from. Every reader therefore returns an :class:`ImageData` holding float32 values
in physical units, the voxel spacing in millimetres and, for volumes, a voxel -> RAS
affine with the array already reoriented to the closest canonical RAS+ axes. A user
error (missing file, broken header, several series in one folder) ends in one
:class:`ImageReadError` sentence that names the file and, where possible, the fix.
"""

from __future__ import annotations

import dataclasses
import os

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


_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path: str, *, series_uid: str | None = None, expect_3d: bool | None = None) -> ImageData:
    """Read a DICOM series folder, a DICOM file, a NIfTI file or a PNG/JPEG image.

    Dispatch is by what the path is: a directory is read as one DICOM series (pick one
    with ``series_uid`` when the folder holds several); ``.nii``/``.nii.gz`` is NIfTI;
    ``.png``/``.jpg``/``.jpeg`` is a raster image; any other file, with or without an
    extension, is tried as DICOM because DICOM files often have none.

    ``expect_3d=True`` refuses anything that is not a single 3D volume (a 2D image, or a
    4D NIfTI), ``expect_3d=False`` refuses volumes, so a manifest that mixes them fails
    on the offending file rather than deep inside the pipeline. None accepts both.
    """
    # The format modules are imported here, not at the top, because they import this
    # module's types; it also keeps reading a PNG from importing pydicom.
    path = os.fspath(path)
    lower = path.lower()
    if os.path.isdir(path):
        from medjax.data.dicom import read_dicom_series

        image = read_dicom_series(path, series_uid=series_uid)
    elif not os.path.exists(path):
        raise ImageReadError(f"{path}: no such file or folder; check the path in the manifest.")
    elif lower.endswith(_NIFTI_SUFFIXES):
        from medjax.data.nifti import read_nifti

        image = read_nifti(path)
    elif lower.endswith(_RASTER_SUFFIXES):
        from medjax.data.image import read_png

        image = read_png(path)
    else:
        from medjax.data.dicom import read_dicom_file

        image = read_dicom_file(path)
    if series_uid is not None and not os.path.isdir(path):
        found = image.meta.get("series_uid")
        if found != series_uid:
            raise ImageReadError(
                f"{path}: series_uid={series_uid!r} was asked for but the file belongs to series {found!r}; "
                "series_uid selects a series inside a folder."
            )
    _check_dimensionality(path, image, expect_3d)
    return image


def _check_dimensionality(path: str, image: ImageData, expect_3d: bool | None) -> None:
    """Raise when the data is not the kind (2D image or 3D volume) the caller asked for."""
    if expect_3d is None:
        return
    shape = tuple(image.array.shape)
    is_3d = image.is_volume and image.array.ndim == 3
    if expect_3d and not is_3d:
        kind = f"a {image.array.ndim}D volume" if image.is_volume else "a 2D image"
        raise ImageReadError(
            f"{path}: expected a 3D volume but got {kind} of shape {shape}; "
            "use a 3D file or series, or set expect_3d to False/None for this dataset."
        )
    if expect_3d is False and image.is_volume:
        raise ImageReadError(
            f"{path}: expected a 2D image but got a volume of shape {shape}; "
            "set expect_3d to True/None for this dataset, or slice the volume first."
        )
