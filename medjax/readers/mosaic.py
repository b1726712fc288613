"""Siemens mosaic DICOM: the slices of one MR volume tiled in one 2D frame -> the slices and where they lie.

Siemens scanners store each time point of an fMRI or diffusion series as one file whose single
frame holds every slice as a tile, row by row (ImageType contains MOSAIC). Read as a plain image it
is a wrong 2D picture. Its ImagePositionPatient describes the whole tiled frame as if it were one
large slice with the same centre, so taken as the first slice's position it misplaces the volume by
half the frame; the first tile's position is found by moving from the frame's corner to the tile's
corner around that shared centre. The number of tiles is in (0019,100a) NumberOfImagesInMosaic or
in the CSA image header (0029,1010); the CSA SliceNormalVector gives the direction in which the
tiles follow each other, which can be opposite to the cross product of the row and column cosines.
Without the count or the geometry the file is refused by name: guessing either gives a volume that
looks right and lies in the wrong place.
"""

from __future__ import annotations

import dataclasses
import math
import warnings as py_warnings

import numpy as np
import pydicom

from medjax.readers.image_data import ImageReadError, reason

with py_warnings.catch_warnings():  # importing nibabel.nicom warns that its DICOM *readers* are experimental
    py_warnings.simplefilter("ignore")
    from nibabel.nicom import csareader

_PARALLEL = 0.999  # |cos| between the CSA normal and the cross product that counts as the same axis


@dataclasses.dataclass(frozen=True)
class MosaicGeometry:
    """Where the tiles of a mosaic lie: tile k is at ``first + k * gap * normal`` (patient LPS, mm)."""

    n_slices: int
    per_side: int  # tiles per mosaic row and column
    tile: tuple[int, int]  # (rows, columns) of one slice
    first: np.ndarray  # ImagePositionPatient of tile 0
    iop: np.ndarray  # ImageOrientationPatient: row cosine, column cosine
    normal: np.ndarray  # unit vector from one tile's plane to the next's
    gap: float  # mm between neighbouring slices
    normal_source: str  # "CSA SliceNormalVector" or "ImageOrientationPatient"
    gap_source: str  # "SpacingBetweenSlices" or "SliceThickness"


def is_mosaic(ds: pydicom.Dataset) -> bool:
    """Whether ImageType marks the file as a Siemens mosaic."""
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return any(str(v).strip().upper() == "MOSAIC" for v in image_type)


def _number(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _vector(value, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _private_count(ds: pydicom.Dataset) -> int | None:
    """(0019,100a) NumberOfImagesInMosaic of the 'SIEMENS MR HEADER' block, raw bytes decoded if need be."""
    try:
        value = ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value
    except (KeyError, ValueError):
        return None
    if isinstance(value, bytes) and len(value) in (2, 4):  # implicit VR files leave unknown private tags raw
        little = ds.original_encoding[1] is not False
        value = int.from_bytes(value, "little" if little else "big")
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def _csa_image_header(path: str, ds: pydicom.Dataset, notes: list) -> dict | None:
    try:
        return csareader.get_csa_header(ds, "image")
    except Exception as exc:  # damaged or truncated CSA blobs raise several types
        notes.append(f"the CSA image header (0029,1010) could not be read ({reason(exc)}) and was ignored")
        return None


def mosaic_geometry(path: str, ds: pydicom.Dataset, notes: list) -> MosaicGeometry:
    """The tiles' count, size and positions; refuses (one sentence) a mosaic whose header lacks them."""
    csa = _csa_image_header(path, ds, notes)
    tagged = _private_count(ds)
    from_csa = csareader.get_n_mosaic(csa) if csa else None
    from_csa = int(from_csa) if isinstance(from_csa, (int, float)) and from_csa == int(from_csa) else None
    if tagged is not None and from_csa is not None and tagged != from_csa:
        raise ImageReadError(f"{path}: is a Siemens mosaic whose (0019,100a) NumberOfImagesInMosaic ({tagged}) and "
                             f"CSA header ({from_csa}) disagree on the number of slices; convert it with dcm2niix.")
    n_slices = tagged if tagged is not None else from_csa
    if n_slices is None or n_slices < 1:
        raise ImageReadError(f"{path}: is a Siemens mosaic (ImageType MOSAIC) without the number of slices "
                             "((0019,100a) NumberOfImagesInMosaic or the CSA image header (0029,1010), removed by "
                             "anonymisation?), so its tiles cannot be unpacked; convert the original with dcm2niix.")
    per_side = math.ceil(math.sqrt(n_slices))
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows % per_side or cols % per_side:
        raise ImageReadError(f"{path}: is a Siemens mosaic of {n_slices} slices, which tile as {per_side} x "
                             f"{per_side}, but its frame of {rows} x {cols} pixels does not divide into that grid; "
                             "the header is inconsistent, convert the original with dcm2niix.")
    tile = (rows // per_side, cols // per_side)
    iop, ipp = _vector(ds.get("ImageOrientationPatient"), 6), _vector(ds.get("ImagePositionPatient"), 3)
    spacing = _vector(ds.get("PixelSpacing"), 2)
    missing = [name for name, value in (("ImageOrientationPatient", iop), ("ImagePositionPatient", ipp),
                                        ("PixelSpacing", spacing)) if value is None]
    if spacing is not None and not np.all(spacing > 0):
        missing.append("PixelSpacing (not positive)")
    gap, gap_source = None, ""
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):  # the latter wins: it includes any gap
        value = _number(ds.get(keyword))
        gap, gap_source = (value, keyword) if value is not None and value > 0 else (gap, gap_source)
    if gap is None:
        missing.append("SpacingBetweenSlices or SliceThickness")
    if missing:
        raise ImageReadError(f"{path}: is a Siemens mosaic without a valid {', '.join(missing)}, so where its "
                             "slices lie is unknown; convert the original with dcm2niix.")
    if gap_source == "SliceThickness" and n_slices > 1:
        notes.append(f"no SpacingBetweenSlices; the SliceThickness {gap:g} mm is taken as the slice spacing "
                     "(a gap between slices would be missed)")
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    cross = np.cross(row_dir, col_dir)
    normal, normal_source = cross, "ImageOrientationPatient"
    csa_normal = csareader.get_slice_normal(csa) if csa else None
    if csa_normal is not None:
        csa_normal = np.asarray(csa_normal, np.float64)
        length = float(np.linalg.norm(csa_normal))
        if not length or abs(csa_normal @ cross) / length < _PARALLEL:
            raise ImageReadError(f"{path}: is a Siemens mosaic whose CSA SliceNormalVector {csa_normal.tolist()} is "
                                 f"not perpendicular to its ImageOrientationPatient {iop.tolist()}; the header is "
                                 "inconsistent, convert the original with dcm2niix.")
        normal, normal_source = csa_normal / length, "CSA SliceNormalVector"
    # The frame and a tile share their centre: shift from the frame's first pixel to the tile's.
    row_spacing, col_spacing = spacing
    first = ipp + (cols - tile[1]) / 2 * col_spacing * row_dir + (rows - tile[0]) / 2 * row_spacing * col_dir
    return MosaicGeometry(n_slices, per_side, tile, first, iop, normal, float(gap), normal_source, gap_source)


def unpack_tiles(stored: np.ndarray, geometry: MosaicGeometry) -> np.ndarray:
    """(n_slices, rows, cols): tile k is in mosaic row k // per_side, column k % per_side."""
    r, c = geometry.tile
    side = geometry.per_side
    grid = stored.reshape(side, r, side, c).transpose(0, 2, 1, 3).reshape(side * side, r, c)
    return np.ascontiguousarray(grid[: geometry.n_slices])
