"""What an image file will be once read, from its header alone: shape and spacing in RAS+, no pixels decoded.

An index of 2D slices only needs to know how many slices each volume has along the chosen
axis; decoding 300,000 DICOM files to count them is most of the time a build takes.
``read_header`` answers with what ``readers.read_image`` would return as ``array.shape`` and
``spacing`` (volumes reoriented to the closest canonical RAS+, 2D images as (rows, cols)),
refusing in the same sentences what a full read refuses and headers can tell: several series
in a folder, slices at one position, mixed orientations or sizes, 4D data without a
``volume_index``, colour volumes, compressed data without a decoder, and files shorter than
their header says (a truncated copy). What headers cannot tell (a corrupt compressed
stream) is found when the file is first decoded, and that error names its file.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct

import numpy as np
from nibabel import orientations

from medjax.readers import ImageReadError, four_d_refusal
from medjax.readers.image_data import reason

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass(frozen=True)
class Header:
    """shape: the array shape ``read_image`` returns (volumes (X, Y, Z[, T]) in RAS+, 2D images (rows, cols)
    or (rows, cols, 3)); spacing: millimetres per spatial axis; is_volume: it has patient geometry;
    num_volumes: how many volumes the 4D data held when ``volume_index`` picked one (else None)."""

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    is_volume: bool
    num_volumes: int | None = None


def read_header(path: str, *, series_uid: str | None = None, volume_index: int | None = None,
                expect_3d: bool | None = None) -> Header:
    """The header facts of a DICOM series folder or file, a NIfTI file or a PNG/JPEG image (see module)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        header = dicom_series_header(path, series_uid, volume_index)
    elif not os.path.exists(path):
        raise ImageReadError(f"{path}: no such file or folder; check the path in the manifest.")
    elif path.lower().endswith(_NIFTI_SUFFIXES):
        header = nifti_header(path, volume_index)
    elif path.lower().endswith(_RASTER_SUFFIXES):
        header = raster_header(path)
    else:
        header = dicom_file_header(path, series_uid)
    _check_kind(path, header, expect_3d)
    return header


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple:
    """The grid ``intensity.resample`` makes: each spatial axis n voxels at s mm -> round(n * s / t) >= 1."""
    if not target:
        return tuple(shape)
    target = tuple(float(t) for t in target[: len(spacing)])
    spatial = tuple(max(1, int(round(n / (t / s)))) for n, s, t in zip(shape, spacing, target))
    return spatial + tuple(shape[len(spacing):])


def ras_grid(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, spacing) of a volume with voxel -> RAS ``affine`` once reoriented to the closest canonical RAS+
    (what ``image_data.canonical_ras`` does to the array, computed on a zero-size stand-in)."""
    ornt = orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))
    stand_in = np.broadcast_to(np.float32(0), tuple(shape[:3]))  # no memory: only the shape moves
    out_shape = orientations.apply_orientation(stand_in, ornt).shape
    new_affine = affine @ orientations.inv_ornt_aff(ornt, tuple(shape[:3]))
    spacing = tuple(float(s) for s in np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0)))
    return tuple(int(n) for n in out_shape) + tuple(shape[3:]), spacing


def _check_kind(path: str, header: Header, expect_3d: bool | None) -> None:
    """``read_image``'s dimensionality rule, on the header's shape."""
    if expect_3d is None:
        return
    if expect_3d and header.is_volume and len(header.shape) == 4:
        raise four_d_refusal(path, header.shape)
    if expect_3d and not (header.is_volume and len(header.shape) == 3):
        kind = f"a {len(header.shape)}D volume" if header.is_volume else "a 2D image"
        raise ImageReadError(f"{path}: expected a 3D volume but got {kind} of shape {header.shape}; "
                             "use a 3D file or series, or set expect_3d to False/None for this dataset.")
    if expect_3d is False and header.is_volume:
        raise ImageReadError(f"{path}: expected a 2D image but got a volume of shape {header.shape}; "
                             "set expect_3d to True/None for this dataset, or slice the volume first.")


def nifti_header(path: str, volume_index: int | None = None) -> Header:
    """A NIfTI file's shape and spacing after ``readers.nifti.read_nifti``'s reorientation, voxels unread."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as exc:  # nibabel raises several types for broken headers
        raise ImageReadError(f"{path}: is not a readable NIfTI file ({reason(exc)}); the header is damaged, "
                             "re-export the volume.") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(f"{path}: is a {type(img).__name__}, not NIfTI; convert it to .nii.gz.")
    _check_nifti_length(path, img)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 2:
        shape = shape + (1,)
    shape = shape[:3] + tuple(n for n in shape[3:] if n != 1)
    if len(shape) > 4:
        raise ImageReadError(f"{path}: has {len(shape)} dimensions {shape}; medjax reads 3D and 4D NIfTI only.")
    if volume_index is not None and len(shape) == 4:
        if not 0 <= volume_index < shape[3]:
            raise ImageReadError(f"{path}: volume_index={volume_index} asks for a volume that the 4D data of shape "
                                 f"{tuple(img.shape)} do not have; choose one of 0..{shape[3] - 1}.")
        count, shape = shape[3], shape[:3]
    else:
        count = None
    ras_shape, _ = ras_grid(img.affine, shape)
    # the reader's spacing is the reoriented header's zooms: each axis keeps its own zoom
    zooms = [float(z) for z in img.header.get_zooms()[:3]] + [1.0] * (3 - len(img.header.get_zooms()[:3]))
    ornt = orientations.ornt_transform(orientations.io_orientation(img.affine), orientations.axcodes2ornt("RAS"))
    spacing = [0.0] * 3
    for axis, (to, _) in enumerate(ornt):
        spacing[int(to)] = zooms[axis]
    return Header(ras_shape, tuple(spacing), True, count)


def _check_nifti_length(path: str, img) -> None:
    """A NIfTI file shorter than its header says is a truncated copy (``.nii``: the file size; ``.nii.gz``:
    the uncompressed size the gzip trailer records, exact for files under 4 GiB)."""
    need = int(img.dataobj.offset) + int(np.prod(img.shape)) * np.dtype(img.get_data_dtype()).itemsize
    if path.lower().endswith(".nii"):
        have = os.path.getsize(path)
        if have < need:
            raise ImageReadError(f"{path}: holds {have} bytes but its header describes {need}; the file is "
                                 "truncated, re-copy it.")
        return
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        recorded = struct.unpack("<I", f.read(4))[0]  # gzip's ISIZE: uncompressed length mod 2**32
    if need < 2**32 and recorded != need:
        raise ImageReadError(f"{path}: its gzip stream records {recorded} uncompressed bytes but the NIfTI header "
                             f"describes {need}; the file is truncated (re-copy it) or not one gzip stream "
                             f"(re-save it with gzip).")


def raster_header(path: str) -> Header:
    """A PNG/JPEG's size and channels from its header (Pillow opens files lazily)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            cols, rows = img.size
            mode = img.mode
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError for damaged files
        raise ImageReadError(f"{path}: is not a readable PNG/JPEG image ({reason(exc)}); re-export it.") from None
    shape = (rows, cols) if mode in ("1", "L", "I", "I;16", "F", "LA", "La") else (rows, cols, 3)
    return Header(shape, (1.0, 1.0), False)



def dicom_series_header(folder: str, series_uid: str | None = None, volume_index: int | None = None) -> Header:
    """``readers.dicom.read_dicom_series`` without decoding: the same grouping, choices and refusals."""
    from medjax.readers import dicom as rd

    files, _ = rd.series_files(folder, series_uid)
    if len(files) == 1:
        return _dataset_header(*files[0])
    mosaics = [p for p, ds in files if rd.is_mosaic(ds)]
    if mosaics:
        return _mosaic_series_header(folder, files, len(mosaics), volume_index)
    multi = [p for p, ds in files if rd._num_frames(ds) > 1]
    if multi:
        raise ImageReadError(f"{multi[0]}: is a multi-frame object inside a {len(files)}-file series; "
                             "read it with read_dicom_file.")
    rows, cols = int(files[0][1].Rows), int(files[0][1].Columns)
    entries = []
    for path, ds in files:
        _check_pixels(ds, path)
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ImageReadError(f"{folder}: slice {os.path.basename(path)} is ({int(ds.Rows)}, {int(ds.Columns)}), "
                                 f"the others ({rows}, {cols}); remove the odd file.")
        entries.append((os.path.basename(path), rd._floats(ds.get("ImagePositionPatient"), 3),
                        rd._floats(ds.get("ImageOrientationPatient"), 6), rd._int(ds.get("InstanceNumber"))))
    return _volume_header(folder, files[0][1], entries, (rows, cols))


def dicom_file_header(path: str, series_uid: str | None = None) -> Header:
    """``readers.dicom.read_dicom_file`` without decoding (``series_uid`` must name the file's series)."""
    from medjax.readers import dicom as rd

    ds = rd._read(path, skip_non_dicom=False)
    rd._require_pixels(ds, path)
    found = str(ds.get("SeriesInstanceUID", "")) or None
    if series_uid is not None and found != series_uid:
        raise ImageReadError(f"{path}: series_uid={series_uid!r} was asked for but the file belongs to series "
                             f"{found!r}; series_uid selects a series inside a folder.")
    return _dataset_header(path, ds)


def _mosaic_series_header(folder: str, files: list, n_mosaics: int, volume_index: int | None) -> Header:
    """The file ``volume_index`` picks (acquisition order) of a folder of Siemens mosaics."""
    from medjax.readers import dicom as rd

    picked = rd.mosaic_time_point(folder, files, n_mosaics, volume_index)
    return dataclasses.replace(_dataset_header(*picked), num_volumes=len(files))


def _dataset_header(path: str, ds) -> Header:
    """One parsed file: a single frame -> 2D image, several frames or a mosaic -> volume."""
    from medjax.readers import dicom as rd

    _check_pixels(ds, path)
    frames, name = rd._num_frames(ds), os.path.basename(path)
    if rd.is_mosaic(ds):
        if frames > 1:
            raise ImageReadError(f"{path}: is a Siemens mosaic with {frames} frames; mosaics hold one frame, "
                                 "convert the file with dcm2niix.")
        g = rd.mosaic_geometry(path, ds, [])
        entries = [(f"{name} tile {k + 1}", g.first + k * g.gap * g.normal, g.iop, k + 1) for k in range(g.n_slices)]
        return _volume_header(path, ds, entries, tuple(g.tile), single_gap=g.gap)
    if frames > 1:
        iop = rd._floats(rd._lookup(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        offsets = None if "PerFrameFunctionalGroupsSequence" in ds else rd._floats(ds.get("GridFrameOffsetVector"),
                                                                                   frames)
        entries = []
        for k in range(frames):
            ipp = rd._floats(rd._lookup(ds, k, "PlanePositionSequence", "ImagePositionPatient"), 3)
            frame_iop = rd._floats(rd._lookup(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
            if offsets is not None and ipp is not None and iop is not None:
                ipp = ipp + offsets[k] * np.cross(iop[:3], iop[3:])
            entries.append((f"{name} frame {k + 1}", ipp, frame_iop, k + 1))
        return _volume_header(path, ds, entries, (int(ds.Rows), int(ds.Columns)))
    spacing, _ = rd._pixel_spacing(ds, 0, [])
    colour = rd._int(ds.get("SamplesPerPixel")) not in (None, 1) or ds.get("PhotometricInterpretation") == "PALETTE COLOR"
    return Header((int(ds.Rows), int(ds.Columns)) + ((3,) if colour else ()), spacing, False)


def _volume_header(source: str, ds0, entries: list, size: tuple[int, int], *,
                   single_gap: float | None = None) -> Header:
    """``readers.dicom._volume``'s geometry (order, spacing, RAS+ axes) from (label, position, orientation,
    instance) per slice, refusing what it refuses."""
    from medjax.readers import dicom as rd

    photometric = str(ds0.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{source}: is a {photometric} colour volume; medjax reads colour only as 2D images.")
    iops = [e[2] for e in entries if e[2] is not None]
    iop = iops[0] if iops else rd._AXIAL
    for label, _, other, _ in entries:
        if other is not None and np.abs(other - iop).max() > 1e-3:
            raise ImageReadError(
                f"{source}: slice {label} has ImageOrientationPatient {other.tolist()} unlike {iop.tolist()} of "
                "the others (a localizer in the series?); remove the odd files or read them separately.")
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    if len(entries) == 1 and entries[0][1] is not None and single_gap:
        step = normal * single_gap
    elif all(e[1] is not None for e in entries):
        proj = np.array([e[1] @ normal for e in entries])
        order = np.argsort(proj, kind="stable")
        gaps = np.diff(proj[order])
        if np.any(gaps < rd._DUPLICATE_MM):
            k = int(np.argmin(gaps))
            first, second = entries[order[k]], entries[order[k + 1]]
            raise ImageReadError(
                f"{source}: slices {first[0]} and {second[0]} share the position {first[1].tolist()} (time points, "
                "echoes or a copied file?); keep one per position.")
        step = (entries[order[-1]][1] - entries[order[0]][1]) / (len(entries) - 1)
    else:
        if any(e[3] is None for e in entries):
            raise ImageReadError(f"{source}: slices have neither ImagePositionPatient nor InstanceNumber, so their "
                                 "order is unknown; re-export the series with positions.")
        gap = 1.0
        for keyword in ("SliceThickness", "SpacingBetweenSlices"):  # the latter wins when both are valid
            value = rd._floats([rd._lookup(ds0, 0, "PixelMeasuresSequence", keyword)], 1)
            gap = float(value[0]) if value is not None and value[0] > 0 else gap
        step = normal * gap
    (row_spacing, col_spacing), _ = rd._pixel_spacing(ds0, 0, [])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = col_dir * row_spacing, row_dir * col_spacing, step
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    shape, spacing = ras_grid(ras, (*size, len(entries)))
    return Header(shape, spacing, True)


@functools.lru_cache(maxsize=None)
def _missing_decoder(tsyntax: str) -> str | None:
    """Why pixel data in ``tsyntax`` cannot be decoded here (the reader's sentence), None if they can;
    asked once per transfer syntax, not once per file."""
    from pydicom import pixels as dcm_pixels
    from pydicom.uid import UID

    uid = UID(tsyntax)
    try:
        decoder = dcm_pixels.get_decoder(uid)
    except NotImplementedError:
        return (f"its pixel data use transfer syntax {uid.name} ({uid}), which no installed decoder supports; "
                "convert it to an uncompressed transfer syntax (e.g. gdcmconv --raw).")
    if not decoder.is_available:
        return (f"its pixel data are compressed with {uid.name} and no decoder for it is installed "
                f"({'; '.join(decoder.missing_dependencies)}); install pylibjpeg, pylibjpeg-libjpeg and "
                "pylibjpeg-openjpeg.")
    return None


def _check_pixels(ds, path: str) -> None:
    """Pixel data that are there, decodable by what is installed, and as long as the header says."""
    from pydicom.uid import ImplicitVRLittleEndian

    from medjax.readers import dicom as rd

    rd._require_pixels(ds, path)
    tsyntax = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
    missing = _missing_decoder(str(tsyntax))
    if missing is not None:
        raise ImageReadError(f"{path}: {missing}")
    if tsyntax.is_compressed or "PixelData" not in ds:
        return
    element = ds.get_item("PixelData")
    bits = rd._int(ds.get("BitsAllocated")) or 8
    need = (int(ds.Rows) * int(ds.Columns) * (rd._int(ds.get("SamplesPerPixel")) or 1) * rd._num_frames(ds)
            * bits + 7) // 8
    if element.value is None:  # deferred: its bytes are on disk from value_tell on
        have = max(0, min(element.length, os.path.getsize(path) - element.value_tell))
    else:
        have = len(element.value)
    if have < need:
        raise ImageReadError(f"{path}: holds {have} bytes of pixel data where its header describes {need}; "
                             "the file is truncated, re-copy it.")
