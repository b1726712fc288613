"""Siemens mosaic DICOM: tiles unpacked into a volume whose affine puts every voxel where it was acquired.

The files are written here with pydicom: a frame of 4 x 4 tiles (14 slices, the last two tiles
empty) of 8 x 6 pixels with unequal pixel spacing, so a transposed tile, a swapped spacing or an
unshifted ImagePositionPatient all give wrong positions. Every pixel value encodes its slice,
row and column, and the test checks each one at the position the affine gives it.
"""

import os
import struct

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

from medjax.readers import ImageReadError, read_image

N, TILE, SIDE = 14, (8, 6), 4  # slices, (rows, cols) of a tile, tiles per mosaic side
SPACING = (2.0, 2.5)  # PixelSpacing: between rows, between columns
GAP = 3.0  # SpacingBetweenSlices
FIRST = np.array([-20.0, -30.0, 10.0])  # where tile 0's first pixel really lies (LPS mm)


def _csa2(tags: dict) -> bytes:
    """A CSA2 ('SV10') blob holding ``tags``: name -> (VR, list of values)."""
    out = [b"SV10", b"\x04\x03\x02\x01", struct.pack("<2I", len(tags), 77)]
    for name, (vr, values) in tags.items():
        out.append(struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 3, len(values), 77))
        for value in values:
            text = f"{value}".encode() + b"\x00"
            out.append(struct.pack("<4i", len(text), len(text), 77, len(text)) + text + b"\x00" * (-len(text) % 4))
    return b"".join(out)


def _truth(k, i, j, t=0):
    """The value written at slice k, tile row i, tile column j of time point t."""
    return 1000 * t + 64 * k + 8 * i + j


def _write_mosaic(path, *, iop=(1, 0, 0, 0, 1, 0), normal_sign=1.0, count_tag=True, csa=True, csa_count=True,
                  t=0, implicit=False, **changes):
    """A mosaic whose tile k lies at FIRST + k * GAP * normal (normal = sign * row x col cosines)."""
    row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal = normal_sign * np.cross(row_dir, col_dir)
    rows, cols = SIDE * TILE[0], SIDE * TILE[1]
    frame = np.zeros((rows, cols), np.uint16)
    for k in range(N):
        r0, c0 = (k // SIDE) * TILE[0], (k % SIDE) * TILE[1]
        i, j = np.mgrid[: TILE[0], : TILE[1]]
        frame[r0 : r0 + TILE[0], c0 : c0 + TILE[1]] = _truth(k, i, j, t)
    # the frame's ImagePositionPatient: as if it were one large slice around the tiles' common centre
    ipp = FIRST - (cols - TILE[1]) / 2 * SPACING[1] * row_dir - (rows - TILE[0]) / 2 * SPACING[0] * col_dir
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
    ds.SeriesInstanceUID = changes.pop("series_uid", "1.2.3.4")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.AcquisitionNumber, ds.InstanceNumber = t + 1, t + 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = list(SPACING)
    ds.SliceThickness, ds.SpacingBetweenSlices = 2.5, GAP
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.ImagePositionPatient = [float(v) for v in ipp]
    if count_tag:
        ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0A, "US", N)
    if csa:
        tags = {"SliceNormalVector": ("FD", [f"{v:.8f}" for v in normal])}
        if csa_count:
            tags["NumberOfImagesInMosaic"] = ("US", [N])
        ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", _csa2(tags))
    ds.PixelData = frame.tobytes()
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return normal


def _assert_every_voxel_in_place(image, iop, normal, t=0):
    """Each written pixel sits at the voxel the affine puts at its true position, with its value."""
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    k, i, j = (a.ravel() for a in np.mgrid[:N, : TILE[0], : TILE[1]])
    lps = FIRST + np.outer(j * SPACING[1], row_dir) + np.outer(i * SPACING[0], col_dir) + np.outer(k * GAP, normal)
    ras = lps * [-1, -1, 1]
    voxel = (np.c_[ras, np.ones(len(ras))] @ np.linalg.inv(image.affine).T)[:, :3]
    np.testing.assert_allclose(voxel, np.rint(voxel), atol=1e-6)  # every pixel lands on a voxel centre
    index = tuple(np.rint(voxel).astype(int).T)
    np.testing.assert_array_equal(image.array[index], _truth(k, i, j, t))
    assert image.array.size == N * TILE[0] * TILE[1]  # nothing else: the empty tiles are gone


@pytest.mark.parametrize("iop, normal_sign", [((1, 0, 0, 0, 1, 0), 1.0),  # axial
                                              ((0, 1, 0, 0, 0, -1), -1.0),  # sagittal, tiles against the cross
                                              ((1, 0, 0, 0, 0.8, -0.6), 1.0)])  # oblique
def test_mosaic_unpacked_with_every_voxel_in_place(tmp_path, iop, normal_sign):
    path = tmp_path / "mosaic.dcm"
    normal = _write_mosaic(path, iop=iop, normal_sign=normal_sign)
    image = read_image(str(path), expect_3d=True)
    assert sorted(image.array.shape) == sorted((*TILE, N)) and image.array.dtype == np.float32
    assert sorted(image.spacing) == sorted((*SPACING, GAP))
    assert image.meta["mosaic"] == {"slices": N, "grid": [SIDE, SIDE], "tile": list(TILE),
                                    "slice_normal": "CSA SliceNormalVector"}
    assert image.meta["spacing_source"] == "SpacingBetweenSlices" and image.meta["warnings"] == []
    _assert_every_voxel_in_place(image, iop, normal)


def test_mosaic_matches_nibabel_mosaic_wrapper(tmp_path):
    """nibabel's independent MosaicWrapper puts each value at the same patient position."""
    from nibabel.nicom import dicomwrappers

    path = tmp_path / "mosaic.dcm"
    _write_mosaic(path, iop=(0, 1, 0, 0, 0, -1), normal_sign=-1.0)
    image = read_image(str(path))
    wrapper = dicomwrappers.MosaicWrapper(pydicom.dcmread(path))
    data, affine = wrapper.get_data(), wrapper.affine  # nibabel: voxel -> LPS
    ours = {}
    for index in np.ndindex(*image.array.shape):
        ours[int(image.array[index])] = (image.affine @ [*index, 1])[:3] * [-1, -1, 1]
    for index in np.ndindex(*data.shape):
        np.testing.assert_allclose(ours[int(data[index])], (affine @ [*index, 1])[:3], atol=1e-6)


def test_count_from_either_header_and_normal_from_the_cosines(tmp_path):
    _write_mosaic(tmp_path / "csa_only.dcm", count_tag=False)
    _write_mosaic(tmp_path / "tag_only.dcm", csa=False, implicit=True)  # raw private bytes in implicit VR
    a, b = read_image(str(tmp_path / "csa_only.dcm")), read_image(str(tmp_path / "tag_only.dcm"))
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    assert b.meta["mosaic"]["slice_normal"] == "ImageOrientationPatient"
    _assert_every_voxel_in_place(b, (1, 0, 0, 0, 1, 0), np.array([0.0, 0.0, 1.0]))


def test_slice_thickness_fallback_is_said(tmp_path):
    _write_mosaic(tmp_path / "m.dcm", SpacingBetweenSlices=None, SliceThickness=GAP)
    image = read_image(str(tmp_path / "m.dcm"))
    assert image.meta["spacing_source"] == "SliceThickness"
    assert any("SliceThickness 3 mm is taken as the slice spacing" in w for w in image.meta["warnings"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(count_tag=False, csa_count=False), r"m\.dcm: is a Siemens mosaic .*without the number of slices.*"
                                             r"NumberOfImagesInMosaic"),
    (dict(ImagePositionPatient=None), r"m\.dcm: is a Siemens mosaic without a valid ImagePositionPatient"),
    (dict(ImageOrientationPatient=None, PixelSpacing=None), r"without a valid ImageOrientationPatient, PixelSpacing"),
    (dict(SpacingBetweenSlices=None, SliceThickness=None), r"SpacingBetweenSlices or SliceThickness"),
    (dict(Columns=SIDE * TILE[1] - 2), r"frame of 32 x 22 pixels does not divide into that grid"),
])
def test_mosaic_without_what_it_needs_is_refused_by_name(tmp_path, kwargs, message):
    if "Columns" in kwargs:  # keep the pixel data consistent with the smaller frame
        kwargs["PixelData"] = np.zeros((SIDE * TILE[0], kwargs["Columns"]), np.uint16).tobytes()
    _write_mosaic(tmp_path / "m.dcm", **kwargs)
    with pytest.raises(ImageReadError, match=message):
        read_image(str(tmp_path / "m.dcm"))


def test_mosaic_folder_is_a_4d_series_picked_by_volume_index(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for t, name in ((2, "a.dcm"), (0, "b.dcm"), (1, "c.dcm")):  # names do not give the time order
        _write_mosaic(folder / name, t=t)
    with pytest.raises(ImageReadError, match=r"run: holds 3 Siemens mosaic files.*shape \(8, 6, 14, 3\).*"
                                             r"config\.data\.volume_index"):
        read_image(str(folder))
    image = read_image(str(folder), volume_index=1, expect_3d=True)
    assert image.meta["volume_index"] == 1 and image.meta["num_volumes"] == 3
    assert os.path.basename(image.meta["file"]) == "c.dcm"
    _assert_every_voxel_in_place(image, (1, 0, 0, 0, 1, 0), np.array([0.0, 0.0, 1.0]), t=1)
    with pytest.raises(ImageReadError, match=r"volume_index=3 is not one of 0\.\.2"):
        read_image(str(folder), volume_index=3)
