"""DICOM files and series -> :class:`ImageData` in physical units, volumes in RAS+.

DICOM leaves a lot to the reader, and each shortcut has cost someone a silent error:
file names and InstanceNumber do not give slice order (positions do), SliceThickness is
not slice spacing, one folder may hold several series, stored values are not Hounsfield
units until RescaleSlope/Intercept are applied (per frame in enhanced objects),
MONOCHROME1 means high values are dark, compressed pixel data needs decoder plugins, and a
Siemens mosaic tiles a whole volume into one frame (``mosaic``).
This module handles each of these explicitly and says so in ``meta['warnings']`` when it
had to guess.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np
import pydicom
from nibabel import orientations
from pydicom import pixels as dcm_pixels
from pydicom.errors import InvalidDicomError
from pydicom.uid import ImplicitVRLittleEndian

from medjax.readers.image_data import ImageData, ImageReadError, axcodes, canonical_ras, reason
from medjax.readers.mosaic import is_mosaic, mosaic_geometry, unpack_tiles

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GAP_TOLERANCE = 0.01  # relative deviation of a slice gap from the median that is reported
_DUPLICATE_MM = 1e-3  # slices closer than this along the normal are the same position
_DEFER = "64 KB"  # a folder's header pass leaves pixel bytes on disk until they are decoded
_AXIAL = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


@dataclasses.dataclass
class _Slice:
    """One 2D frame of a volume: where it is and how to get its stored values."""

    label: str
    ds: pydicom.Dataset
    frame: int
    ipp: np.ndarray | None
    iop: np.ndarray | None
    instance: int | None
    load: Callable[[], np.ndarray]


def read_dicom_file(path: str) -> ImageData:
    """Read one DICOM file: a single frame gives a 2D image, a multi-frame object a volume."""
    path = os.fspath(path)
    ds = _read(path, skip_non_dicom=False)
    _require_pixels(ds, path)
    return _from_dataset(path, ds, [])


def read_dicom_series(folder: str, series_uid: str | None = None, volume_index: int | None = None) -> ImageData:
    """Read the DICOM series in ``folder`` (its files only; subfolders are not searched).

    Several SeriesInstanceUIDs in one folder are refused unless ``series_uid`` picks one,
    because silently keeping the first is how a localizer or a second contrast ends up in
    a training set. Non-DICOM files and non-image DICOM objects are skipped with a warning.
    A folder of Siemens mosaic files is a 4D series (one volume per file and time point):
    ``volume_index`` picks one file in acquisition order; without it the folder is refused.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ImageReadError(f"{folder}: not a folder; pass the folder that holds the series' files.")
    files, skipped = series_files(folder, series_uid)
    warnings = []
    if skipped:
        warnings.append(f"skipped {len(skipped)} non-image or non-DICOM file(s): {', '.join(skipped[:5])}")
    if len(files) == 1:
        image = _from_dataset(files[0][0], files[0][1], warnings)
        return dataclasses.replace(image, meta={**image.meta, "source": folder})
    mosaics = [p for p, ds in files if is_mosaic(ds)]
    if mosaics:
        return _mosaic_series(folder, files, len(mosaics), volume_index, warnings)
    multi = [p for p, ds in files if _num_frames(ds) > 1]
    if multi:
        raise ImageReadError(f"{multi[0]}: is a multi-frame object inside a {len(files)}-file series; "
                             "read it with read_dicom_file.")
    slices = [_Slice(os.path.basename(path), ds, 0, _floats(ds.get("ImagePositionPatient"), 3),
                     _floats(ds.get("ImageOrientationPatient"), 6), _int(ds.get("InstanceNumber")),
                     lambda path=path, ds=ds: _decode(ds, path)) for path, ds in files]
    return _volume(folder, files[0][1], slices, warnings)


def mosaic_time_point(folder: str, files: list, n_mosaics: int, volume_index: int | None):
    """``(path, dataset)`` of the file (time point) ``volume_index`` picks, in acquisition order, of a folder of
    Siemens mosaic files; a folder mixing mosaics and plain slices, or no valid choice, is refused."""
    if n_mosaics != len(files):
        raise ImageReadError(f"{folder}: mixes {n_mosaics} Siemens mosaic files with {len(files) - n_mosaics} plain "
                             "slices in one series; keep one kind in the folder.")

    def when(item):  # AcquisitionNumber counts time points; InstanceNumber breaks ties
        ds = item[1]
        return tuple(_int(ds.get(k)) if _int(ds.get(k)) is not None else -1
                     for k in ("AcquisitionNumber", "InstanceNumber")) + (os.path.basename(item[0]),)

    files = sorted(files, key=when)
    if volume_index is None or not 0 <= volume_index < len(files):
        geometry = mosaic_geometry(files[0][0], files[0][1], [])
        shape = (*geometry.tile, geometry.n_slices, len(files))
        asked = "" if volume_index is None else f"volume_index={volume_index} is not one of 0..{len(files) - 1}; "
        raise ImageReadError(
            f"{folder}: holds {len(files)} Siemens mosaic files, the time points of a 4D series of shape {shape} "
            f"(rows, columns, slices, volumes); {asked}pick one with volume_index (config.data.volume_index in a "
            "medjax config, 0 = the first) or point the manifest at one file.")
    return files[volume_index]


def _mosaic_series(folder: str, files: list, n_mosaics: int, volume_index: int | None, warnings: list) -> ImageData:
    """One file (time point) of a folder of mosaic files, picked by ``volume_index`` in acquisition order."""
    path, ds = mosaic_time_point(folder, files, n_mosaics, volume_index)
    image = _from_dataset(path, ds, warnings)
    meta = {**image.meta, "source": folder, "file": path, "volume_index": int(volume_index),
            "num_volumes": len(files)}
    return dataclasses.replace(image, meta=meta)


def series_files(folder: str, series_uid: str | None = None) -> tuple[list[tuple[str, pydicom.Dataset]], list[str]]:
    """``(files, skipped)``: the (path, dataset) pairs of the folder's one series (or of ``series_uid``), and
    the names of the non-image or non-DICOM files left out; several series without a choice are refused."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n)))
    groups: dict[str, list[tuple[str, pydicom.Dataset]]] = {}
    skipped = []
    for name in names:
        path = os.path.join(folder, name)
        ds = _read(path, skip_non_dicom=not name.lower().endswith((".dcm", ".dicom")))
        if ds is not None and not _has_pixels(ds):
            if _looks_like_image(ds):  # a truncated slice must not silently leave a gap
                _require_pixels(ds, path)
            ds = None
        if ds is None:
            skipped.append(name)
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not groups:
        what = f"only non-image or non-DICOM files ({', '.join(skipped[:5])})" if skipped else "no files"
        raise ImageReadError(
            f"{folder}: contains {what}, so no DICOM image series was found; subfolders are not searched, "
            "so point the manifest at the folder that holds the image files."
        )
    listing = "; ".join(f"{uid} ({str(files[0][1].get('SeriesDescription', '')) or 'no description'!r}, "
                        f"{len(files)} files)" for uid, files in groups.items())
    if series_uid is None and len(groups) > 1:
        raise ImageReadError(f"{folder}: holds {len(groups)} DICOM series ({listing}); pass series_uid to choose one.")
    if series_uid is not None and series_uid not in groups:
        raise ImageReadError(f"{folder}: has no series {series_uid!r}; the series found are: {listing}.")
    return groups[series_uid if series_uid is not None else next(iter(groups))], skipped


def _read(path: str, *, skip_non_dicom: bool) -> pydicom.Dataset | None:
    """Parse a file's DICOM header, pixel bytes deferred; None for a non-DICOM file if asked."""
    try:
        return pydicom.dcmread(path, defer_size=_DEFER)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ImageReadError(f"{path}: cannot be opened ({exc.strerror}); check the path.") from None
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise ImageReadError(f"{path}: is a corrupt DICOM file ({reason(exc)}); re-export it or remove it.") from None
    # Old files without the 128-byte preamble are still DICOM; accept them only if forcing
    # the parse yields an image header, because forcing "succeeds" on arbitrary bytes.
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER)
        if "Rows" in ds and "Columns" in ds and _has_pixels(ds):
            ds.file_meta.setdefault("TransferSyntaxUID", ImplicitVRLittleEndian)
            return ds
    except Exception:
        pass
    if skip_non_dicom:
        return None
    raise ImageReadError(f"{path}: is not a DICOM file (no 'DICM' marker and no image header); convert or remove it.")


def _has_pixels(ds: pydicom.Dataset) -> bool:
    return any(tag in ds for tag in _PIXEL_TAGS)


def _sop_class(ds: pydicom.Dataset) -> str:
    return getattr(ds.get("SOPClassUID"), "name", None) or str(ds.get("Modality", "unknown kind"))


def _looks_like_image(ds: pydicom.Dataset) -> bool:
    """An image header or image SOP class: missing pixels then mean truncation (pydicom stops quietly at EOF)."""
    return "Rows" in ds or "Image Storage" in _sop_class(ds)


def _require_pixels(ds: pydicom.Dataset, path: str) -> None:
    """Refuse objects without pixel data, telling a truncated image from a non-image object."""
    if _has_pixels(ds):
        return
    kind = _sop_class(ds)
    if _looks_like_image(ds):
        raise ImageReadError(f"{path}: is a {kind} header without pixel data; the file is probably truncated, "
                             "re-copy it.")
    raise ImageReadError(f"{path}: is a DICOM object without pixel data ({kind}), not an image; "
                         "remove it from the dataset.")


def _decode(ds: pydicom.Dataset, path: str) -> np.ndarray:
    """Stored pixel values, decoded by pylibjpeg where it can (Pillow's JPEG 2000 path has given wrong pixels).

    pydicom 3 picks decoder plugins itself; naming the plugin makes the choice explicit, and
    an unsupported or unavailable decoder becomes a sentence saying what to install.
    """
    tsyntax = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
    try:
        decoder = dcm_pixels.get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageReadError(
            f"{path}: its pixel data use transfer syntax {tsyntax.name} ({tsyntax}), which no installed decoder "
            "supports; convert it to an uncompressed transfer syntax (e.g. gdcmconv --raw)."
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise ImageReadError(
            f"{path}: its pixel data are compressed with {tsyntax.name} and no decoder for it is installed "
            f"({missing}); install pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg."
        )
    plugin = "pylibjpeg" if "pylibjpeg" in decoder.available_plugins else ""
    try:
        return dcm_pixels.pixel_array(ds, decoding_plugin=plugin)
    except Exception as exc:
        raise ImageReadError(f"{path}: its pixel data could not be decoded ({reason(exc)}); the file is probably "
                             "truncated or corrupt.") from None


def _lookup(ds: pydicom.Dataset, frame: int, sequence: str, keyword: str):
    """An attribute from the frame's functional group, else the shared group, else the top level."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and index < len(items):
            inner = items[index].get(sequence)
            if inner and keyword in inner[0]:
                return inner[0].get(keyword)
    return ds.get(keyword)


def _floats(value, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _num_frames(ds: pydicom.Dataset) -> int:
    return _int(ds.get("NumberOfFrames")) or 1


def _rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float]:
    slope = _lookup(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _lookup(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    return float(1.0 if slope in (None, "") else slope), float(0.0 if intercept in (None, "") else intercept)


def _physical(stored: np.ndarray, ds: pydicom.Dataset, frame: int) -> np.ndarray:
    """Stored values -> modality units (e.g. HU), computed in float64 like pydicom's modality LUT."""
    if "ModalityLUTSequence" in ds:
        return dcm_pixels.apply_modality_lut(stored, ds).astype(np.float64)
    slope, intercept = _rescale(ds, frame)
    return stored.astype(np.float64) * slope + intercept


def _pixel_spacing(ds: pydicom.Dataset, frame: int, warnings: list) -> tuple[tuple[float, float], str]:
    """(row spacing, column spacing) in mm and the attribute it came from."""
    spacing = _floats(_lookup(ds, frame, "PixelMeasuresSequence", "PixelSpacing"), 2)
    if spacing is not None and np.all(spacing > 0):
        return (float(spacing[0]), float(spacing[1])), "PixelSpacing"
    if "PixelSpacing" in ds:
        warnings.append(f"PixelSpacing {list(ds.PixelSpacing)} is not a valid spacing and was ignored")
    spacing = _floats(ds.get("ImagerPixelSpacing"), 2)
    if spacing is not None and np.all(spacing > 0):
        return (float(spacing[0]), float(spacing[1])), "ImagerPixelSpacing"
    warnings.append("no pixel spacing in the file; 1 mm assumed")
    return (1.0, 1.0), "assumed"


def _meta(path: str, ds: pydicom.Dataset, warnings: list, rescale: list, **extra) -> dict:
    slopes, intercepts = [r[0] for r in rescale], [r[1] for r in rescale]
    uniform = len(set(rescale)) <= 1
    tsyntax = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
    return {
        "source": path,
        "format": "dicom",
        "modality": str(ds.get("Modality", "")) or None,
        "series_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "series_description": str(ds.get("SeriesDescription", "")),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "transfer_syntax": tsyntax.name,
        # one value per slice, along the output's slice axis (meta['slice_axis']), when they differ
        "rescale": {"slope": slopes[0] if uniform else slopes, "intercept": intercepts[0] if uniform else intercepts},
        **extra,
        "warnings": warnings,
    }


def _from_dataset(path: str, ds: pydicom.Dataset, warnings: list) -> ImageData:
    """One parsed file: a single frame -> 2D image, several frames -> volume."""
    frames = _num_frames(ds)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if is_mosaic(ds):
        if frames > 1:
            raise ImageReadError(f"{path}: is a Siemens mosaic with {frames} frames; mosaics hold one frame, "
                                 "convert the file with dcm2niix.")
        return _mosaic_volume(path, ds, warnings)
    if frames > 1:
        cache = {}

        def load(k):
            if "stored" not in cache:
                cache["stored"] = _decode(ds, path)
            return cache["stored"][k]

        iop = _floats(_lookup(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        # legacy multi-frame (RT dose): one position plus per-frame offsets along the normal
        offsets = None if "PerFrameFunctionalGroupsSequence" in ds else _floats(ds.get("GridFrameOffsetVector"), frames)
        slices = []
        for k in range(frames):
            ipp = _floats(_lookup(ds, k, "PlanePositionSequence", "ImagePositionPatient"), 3)
            frame_iop = _floats(_lookup(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
            if offsets is not None and ipp is not None and iop is not None:
                ipp = ipp + offsets[k] * np.cross(iop[:3], iop[3:])
            label = f"{os.path.basename(path)} frame {k + 1}"
            slices.append(_Slice(label, ds, k, ipp, frame_iop, k + 1, lambda k=k: load(k)))
        return _volume(path, ds, slices, warnings)
    stored = _decode(ds, path)
    spacing, source = _pixel_spacing(ds, 0, warnings)
    if stored.ndim == 3 or photometric == "PALETTE COLOR":  # colour: no modality rescale applies
        array = dcm_pixels.apply_color_lut(stored, ds) if photometric == "PALETTE COLOR" else stored
        meta = _meta(path, ds, warnings, [(1.0, 0.0)], spacing_source=source)
        return ImageData(array.astype(np.float32), spacing, None, meta)
    array = _physical(stored, ds, 0)
    if photometric == "MONOCHROME1":
        array = array.max() + array.min() - array
    meta = _meta(path, ds, warnings, [_rescale(ds, 0)], spacing_source=source)
    return ImageData(array.astype(np.float32), spacing, None, meta)


def _mosaic_volume(path: str, ds: pydicom.Dataset, warnings: list) -> ImageData:
    """A Siemens mosaic's tiles as the slices of a volume, each at its own position along the slice normal."""
    geometry = mosaic_geometry(path, ds, warnings)
    cache = {}

    def load(k):
        if "tiles" not in cache:
            stored = _decode(ds, path)
            if stored.shape != (int(ds.Rows), int(ds.Columns)):
                raise ImageReadError(f"{path}: is a Siemens mosaic whose pixel data have shape {stored.shape}, not "
                                     f"one grey frame of {int(ds.Rows)} x {int(ds.Columns)}; convert it with dcm2niix.")
            cache["tiles"] = unpack_tiles(stored, geometry)
        return cache["tiles"][k]

    name = os.path.basename(path)
    slices = [_Slice(f"{name} tile {k + 1}", ds, 0, geometry.first + k * geometry.gap * geometry.normal,
                     geometry.iop, k + 1, lambda k=k: load(k)) for k in range(geometry.n_slices)]
    image = _volume(path, ds, slices, warnings, tile=geometry.tile, single_gap=geometry.gap)
    mosaic = {"slices": geometry.n_slices, "grid": [geometry.per_side] * 2, "tile": list(geometry.tile),
              "slice_normal": geometry.normal_source}
    return dataclasses.replace(image, meta={**image.meta, "mosaic": mosaic, "spacing_source": geometry.gap_source})


def _volume(source: str, ds0: pydicom.Dataset, slices: list[_Slice], warnings: list, *,
            tile: tuple[int, int] | None = None, single_gap: float | None = None) -> ImageData:
    """Sort slices along the normal, derive spacing from positions, build the RAS+ volume.

    ``tile`` is the slices' (rows, columns) when they are not the frame's (a mosaic's tiles);
    ``single_gap`` the spacing along the normal of a one-slice volume (no positions to derive it from).
    """
    photometric = str(ds0.get("PhotometricInterpretation", ""))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(f"{source}: is a {photometric} colour volume; medjax reads colour only as 2D images.")
    iops = [s.iop for s in slices if s.iop is not None]
    iop = iops[0] if iops else _AXIAL
    if not iops:
        warnings.append("no ImageOrientationPatient; axial orientation assumed")
    for s in slices:
        if s.iop is not None and np.abs(s.iop - iop).max() > 1e-3:
            raise ImageReadError(
                f"{source}: slice {s.label} has ImageOrientationPatient {s.iop.tolist()} unlike {iop.tolist()} of "
                "the others (a localizer in the series?); remove the odd files or read them separately.")
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = np.cross(row_dir, col_dir)
    if len(slices) == 1 and slices[0].ipp is not None and single_gap:
        order, step, origin = np.zeros(1, np.int64), normal * single_gap, slices[0].ipp
        spacing_source = "SpacingBetweenSlices/SliceThickness"
    elif all(s.ipp is not None for s in slices):
        proj = np.array([s.ipp @ normal for s in slices])
        order = np.argsort(proj, kind="stable")
        gaps = np.diff(proj[order])
        if np.any(gaps < _DUPLICATE_MM):
            k = int(np.argmin(gaps))
            raise ImageReadError(
                f"{source}: slices {slices[order[k]].label} and {slices[order[k + 1]].label} share the position "
                f"{slices[order[k]].ipp.tolist()} (time points, echoes or a copied file?); keep one per position.")
        median = float(np.median(gaps))
        if np.abs(gaps - median).max() > _GAP_TOLERANCE * median:
            values, counts = np.unique(np.round(gaps, 3), return_counts=True)
            listed = ", ".join(f"{v:g} mm x{c}" for v, c in zip(values, counts))
            warnings.append(f"inconsistent slice spacing: gaps {listed} (median {median:g} mm); "
                            "missing slices? the mean spacing is used")
        first, last = slices[order[0]].ipp, slices[order[-1]].ipp
        step = (last - first) / (len(slices) - 1)
        if abs(step @ normal) < 0.9999 * np.linalg.norm(step):
            warnings.append("slice positions are not along the slice normal (gantry tilt?); "
                            "the affine follows the positions")
        origin, spacing_source = first, "ImagePositionPatient"
    else:
        instances = [s.instance for s in slices]
        if any(i is None for i in instances):
            raise ImageReadError(f"{source}: slices have neither ImagePositionPatient nor InstanceNumber, so their "
                                 "order is unknown; re-export the series with positions.")
        order = np.argsort(instances, kind="stable")
        gap = 1.0
        for keyword in ("SliceThickness", "SpacingBetweenSlices"):  # the latter wins when both are valid
            value = _floats([_lookup(ds0, 0, "PixelMeasuresSequence", keyword)], 1)
            gap = float(value[0]) if value is not None and value[0] > 0 else gap
        warnings.append(f"no ImagePositionPatient; slices ordered by InstanceNumber (frame order) with spacing "
                        f"{gap:g} mm from the header")
        step, spacing_source = normal * gap, "SpacingBetweenSlices/SliceThickness"
        origin = next((slices[i].ipp for i in order if slices[i].ipp is not None), np.zeros(3))
    (row_spacing, col_spacing), _ = _pixel_spacing(ds0, 0, warnings)
    rows, cols = tile or (int(ds0.Rows), int(ds0.Columns))
    array = np.empty((rows, cols, len(slices)), dtype=np.float32)
    rescale = []
    for k, index in enumerate(order):
        s = slices[index]
        stored = s.load()
        if stored.shape != (rows, cols):
            raise ImageReadError(f"{source}: slice {s.label} is {stored.shape}, the others ({rows}, {cols}); "
                                 "remove the odd file.")
        array[..., k] = _physical(stored, s.ds, s.frame)
        rescale.append(_rescale(s.ds, s.frame))
    if photometric == "MONOCHROME1":
        array = array.max() + array.min() - array
    # array axes are (row index, column index, slice): moving down a row follows the column
    # direction cosine by the row spacing, moving along a row follows the row cosine
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = col_dir * row_spacing, row_dir * col_spacing, step, origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    array, affine, spacing = canonical_ras(array, ras)
    slice_axis, flip = (int(v) for v in orientations.io_orientation(ras)[2])
    rescale = rescale[::flip]  # per-slice values follow the output's slice axis
    meta = _meta(source, ds0, warnings, rescale, num_slices=len(slices), slice_axis=slice_axis,
                 orientation=axcodes(ras), spacing_source=spacing_source)
    return ImageData(array, spacing, affine, meta)
