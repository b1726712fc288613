"""Medical image files in: DICOM series and files (``dicom``, Siemens mosaics: ``mosaic``), NIfTI (``nifti``),
PNG / JPEG (``raster``).

``read_image`` picks the reader by what the path is. Every reader returns an
:class:`~medjax.readers.image_data.ImageData` in physical units and RAS+ orientation (re-exported here
with :class:`ImageReadError`, the one error a user's unreadable file ends in).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from medjax.readers.image_data import ImageData, ImageReadError, axcodes, canonical_ras, reason  # noqa: F401


_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_image(path: str, *, series_uid: str | None = None, expect_3d: bool | None = None,
               volume_index: int | None = None) -> ImageData:
    """Read a DICOM series folder, a DICOM file, a NIfTI file or a PNG/JPEG image.

    Dispatch is by what the path is: a directory is read as one DICOM series (pick one
    with ``series_uid`` when the folder holds several); ``.nii``/``.nii.gz`` is NIfTI;
    ``.png``/``.jpg``/``.jpeg`` is a raster image; any other file, with or without an
    extension, is tried as DICOM because DICOM files often have none.

    ``expect_3d=True`` refuses anything that is not a single 3D volume (a 2D image, or a
    4D NIfTI), ``expect_3d=False`` refuses volumes, so a manifest that mixes them fails
    on the offending file rather than deep inside the pipeline. None accepts both.

    ``volume_index`` picks one 3D volume of 4D data (a 4D NIfTI's time points or diffusion
    directions, a folder of Siemens mosaic files); the result's ``meta['volume_index']`` and
    ``meta['num_volumes']`` say which. None keeps a 4D NIfTI as it is and refuses a mosaic
    folder, whose files are only read when one of them is asked for.
    """
    # The format modules are imported here, not at the top: reading a PNG does not import pydicom.
    path = os.fspath(path)
    lower = path.lower()
    if os.path.isdir(path):
        from medjax.readers.dicom import read_dicom_series

        image = read_dicom_series(path, series_uid=series_uid, volume_index=volume_index)
    elif not os.path.exists(path):
        raise ImageReadError(f"{path}: no such file or folder; check the path in the manifest.")
    elif lower.endswith(_NIFTI_SUFFIXES):
        from medjax.readers.nifti import read_nifti

        image = read_nifti(path, volume_index=volume_index)
    elif lower.endswith(_RASTER_SUFFIXES):
        from medjax.readers.raster import read_png

        image = read_png(path)
    else:
        from medjax.readers.dicom import read_dicom_file

        image = read_dicom_file(path)
    if series_uid is not None and not os.path.isdir(path):
        found = image.meta.get("series_uid")
        if found != series_uid:
            raise ImageReadError(
                f"{path}: series_uid={series_uid!r} was asked for but the file belongs to series {found!r}; "
                "series_uid selects a series inside a folder."
            )
    if volume_index is not None and image.is_volume and image.array.ndim == 4:
        image = select_volume(path, image, volume_index)
    _check_dimensionality(path, image, expect_3d)
    return image


def select_volume(path: str, image: ImageData, volume_index: int) -> ImageData:
    """Volume ``volume_index`` of a 4D (X, Y, Z, T) image, with meta saying which of how many it is."""
    count = image.array.shape[3]
    if not 0 <= volume_index < count:
        raise ImageReadError(
            f"{path}: volume_index={volume_index} asks for a volume that the 4D data of shape "
            f"{tuple(image.array.shape)} do not have; choose one of 0..{count - 1}."
        )
    meta = {**image.meta, "volume_index": int(volume_index), "num_volumes": int(count)}
    meta.pop("time_step", None)
    array = np.ascontiguousarray(image.array[..., volume_index])
    return dataclasses.replace(image, array=array, meta=meta)


def four_d_refusal(path: str, shape: tuple) -> ImageReadError:
    """The one sentence for 4D data where a single 3D volume is needed."""
    return ImageReadError(
        f"{path}: expected a 3D volume but got a 4D volume of shape {tuple(shape)} ({shape[-1]} time points or "
        "diffusion directions); pick one with volume_index (config.data.volume_index in a medjax config, "
        "0 = the first) or split the file into 3D volumes."
    )


def _check_dimensionality(path: str, image: ImageData, expect_3d: bool | None) -> None:
    """Raise when the data is not the kind (2D image or 3D volume) the caller asked for."""
    if expect_3d is None:
        return
    shape = tuple(image.array.shape)
    is_3d = image.is_volume and image.array.ndim == 3
    if expect_3d and image.is_volume and image.array.ndim == 4:
        raise four_d_refusal(path, shape)
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
