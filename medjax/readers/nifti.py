"""NIfTI files -> :class:`ImageData` in RAS+ with float32 values.

NIfTI affines come as LAS, RAS, LPS or oblique; reorienting every file to the closest
canonical RAS+ makes "axial slice k" mean the same thing for every volume, whichever
tool wrote it. ``get_fdata`` is asked for float32 because its default upcasts to
float64 and doubles the memory of every volume.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from medjax.readers.image_data import ImageData, ImageReadError, axcodes, reason


def read_nifti(path: str, volume_index: int | None = None) -> ImageData:
    """Read a ``.nii``/``.nii.gz`` file, reoriented to the closest canonical RAS+.

    Returns a 3D volume, or a 4D one (X, Y, Z, T) when the fourth axis is real (time
    points, components); singleton axes beyond the third are dropped. The spacing is the
    three spatial header zooms after reorientation; a fourth zoom goes to
    ``meta['time_step']``. Whether a 4D result is acceptable is the caller's decision
    (``read_image(..., expect_3d=True)`` refuses it). ``volume_index`` reads only that volume
    of a 4D file (``meta['volume_index']`` and ``meta['num_volumes']`` record it); a 3D file
    ignores it.
    """
    path = os.fspath(path)
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file; check the path in the manifest.") from None
    except Exception as exc:  # nibabel raises several types for broken headers
        raise ImageReadError(f"{path}: is not a readable NIfTI file ({reason(exc)}); the header is damaged, "
                             "re-export the volume.") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(f"{path}: is a {type(img).__name__}, not NIfTI; convert it to .nii.gz.")
    warnings = []
    header = img.header
    if int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        warnings.append("neither sform nor qform is set, so the orientation is unknown; RAS+ with the header "
                        "zooms assumed")
    if len(img.shape) == 2:  # a single slice stored as 2D: give it a slice axis like any volume
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., None], img.affine, header)
    original = axcodes(img.affine)
    selected = None
    if volume_index is not None and len(img.shape) == 4 and img.shape[3] > 1:
        count = int(img.shape[3])
        if not 0 <= volume_index < count:
            raise ImageReadError(f"{path}: volume_index={volume_index} asks for a volume that the 4D data of shape "
                                 f"{tuple(img.shape)} do not have; choose one of 0..{count - 1}.")
        img = img.slicer[:, :, :, volume_index]  # only that volume's voxels are read
        selected = {"volume_index": int(volume_index), "num_volumes": count}
    try:
        canonical = nib.as_closest_canonical(img)
        data = canonical.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise ImageReadError(f"{path}: its voxel data could not be read ({reason(exc)}); the file is truncated "
                             "or its header is damaged, re-copy or re-export it.") from None
    data = data.reshape(data.shape[:3] + tuple(n for n in data.shape[3:] if n != 1))
    if data.ndim > 4:
        raise ImageReadError(f"{path}: has {data.ndim} dimensions {data.shape}; medjax reads 3D and 4D NIfTI only.")
    zooms = [float(z) for z in canonical.header.get_zooms()]
    if not np.isfinite(data).all():
        warnings.append(f"{int((~np.isfinite(data)).sum())} voxels are NaN or infinite")
    slope, intercept = header.get_slope_inter()
    meta = {
        "source": path,
        "format": "nifti",
        "modality": None,
        "series_uid": None,
        "series_description": header["descrip"].item().decode("latin-1").strip("\x00 "),
        "photometric": None,
        "rescale": {"slope": float(1.0 if slope is None else slope), "intercept": float(intercept or 0.0)},
        "orientation": original,
        "stored_dtype": str(img.get_data_dtype()),
        "warnings": warnings,
    }
    if data.ndim == 4 and len(zooms) > 3:
        meta["time_step"] = zooms[3]
    meta.update(selected or {})
    return ImageData(np.ascontiguousarray(data), tuple(zooms[:3]), canonical.affine.copy(), meta)
