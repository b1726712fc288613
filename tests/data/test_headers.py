"""Header-only facts agree with a full read (shape and spacing in RAS+) and refuse what it refuses."""

import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from medjax.data.headers import read_header, resampled_shape
from medjax.data.intensity import resample
from medjax.readers import ImageData, ImageReadError, read_image
from tests.readers.test_dicom_reader import _file, _write_series
from tests.readers.test_mosaic import _write_mosaic


def _same(path, **kwargs):
    header, image = read_header(path, **kwargs), read_image(path, **kwargs)
    assert header.shape == image.array.shape and header.is_volume == image.is_volume
    np.testing.assert_allclose(header.spacing, image.spacing, rtol=1e-6)
    return header


def test_dicom_series_in_any_orientation_match_the_reader(tmp_path):
    _write_series(tmp_path / "ax", [(-158.1, -179.0, -75.7 + 2.5 * k) for k in (3, 0, 4, 1, 2)])
    _write_series(tmp_path / "sag", [(3.0 * k, -20.0, 40.0) for k in (2, 0, 1)], iop=(0, 1, 0, 0, 0, -1))
    _write_series(tmp_path / "cor", [(0.0, 4.0 * k, 0.0) for k in range(4)], iop=(-1, 0, 0, 0, 0, -1))
    assert _same(str(tmp_path / "ax")).shape == (128, 128, 5)
    assert _same(str(tmp_path / "sag")).shape == (3, 128, 128)  # the slices run left -> right: array axis 0
    assert _same(str(tmp_path / "cor")).shape == (128, 4, 128)
    os.makedirs(tmp_path / "nopos")
    for k in range(3):  # no positions: InstanceNumber order, SliceThickness spacing
        ds = pydicom.dcmread(_file("CT_small.dcm"))
        del ds.ImagePositionPatient
        ds.InstanceNumber, ds.SOPInstanceUID = k + 1, pydicom.uid.generate_uid()
        ds.save_as(tmp_path / "nopos" / f"{k}.dcm")
    _same(str(tmp_path / "nopos"))


@pytest.mark.parametrize("name", ["eCT_Supplemental.dcm", "emri_small.dcm", "CT_small.dcm", "MR_small.dcm"])
def test_dicom_files_match_the_reader(name):
    _same(_file(name))


def test_mosaic_file_and_folder_match_the_reader(tmp_path):
    _write_mosaic(tmp_path / "one.dcm", iop=(0, 1, 0, 0, 0, -1))
    assert _same(str(tmp_path / "one.dcm")).shape[0] == 14  # a sagittal mosaic's 14 slices run along x
    os.makedirs(tmp_path / "run")
    for t in range(2):
        _write_mosaic(tmp_path / "run" / f"t{t}.dcm", t=t)
    _same(str(tmp_path / "run"), volume_index=1)
    with pytest.raises(ImageReadError, match="holds 2 Siemens mosaic files"):
        read_header(str(tmp_path / "run"))


def test_nifti_orientations_2d_and_4d_match_the_reader(tmp_path):
    las = np.diag([-2.0, 1.5, 3.0, 1.0])
    oblique = np.array([[0.0, 0.0, 2.0, 5.0], [-1.0, 0.1, 0.0, 2.0], [0.0, 1.2, 0.1, -3.0], [0, 0, 0, 1]])
    for name, shape, affine in [("las.nii.gz", (4, 5, 6), las), ("obl.nii", (4, 5, 6), oblique),
                                ("flat.nii.gz", (4, 5), np.eye(4)), ("bold.nii.gz", (4, 5, 3, 2), las)]:
        nib.save(nib.Nifti1Image(np.ones(shape, np.float32), affine), str(tmp_path / name))
    assert _same(str(tmp_path / "las.nii.gz")).shape == (4, 5, 6)
    assert _same(str(tmp_path / "obl.nii")).shape == (6, 4, 5)  # file axes go P, S, R
    assert _same(str(tmp_path / "flat.nii.gz")).shape == (4, 5, 1)
    assert _same(str(tmp_path / "bold.nii.gz")).shape == (4, 5, 3, 2)
    assert _same(str(tmp_path / "bold.nii.gz"), volume_index=1).shape == (4, 5, 3)
    with pytest.raises(ImageReadError, match=r"expected a 3D volume but got a 4D volume of shape \(4, 5, 3, 2\)"):
        read_header(str(tmp_path / "bold.nii.gz"), expect_3d=True)


def test_png_header_is_one_2d_image(tmp_path):
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(tmp_path / "x.png")
    assert read_header(str(tmp_path / "x.png")).shape == (7, 9)
    with pytest.raises(ImageReadError, match="expected a 3D volume but got a 2D image"):
        read_header(str(tmp_path / "x.png"), expect_3d=True)


def test_refusals_are_the_readers_sentences(tmp_path):
    _write_series(tmp_path / "dup", [(0.0, 0.0, z) for z in (0.0, 2.5, 2.5)], names=["a", "b", "c"])
    _write_series(tmp_path / "two", [(0, 0, z) for z in (0, 3)], description="first", names=["1", "2"])
    _write_series(tmp_path / "two", [(0, 0, z) for z in (0, 5)], description="second", names=["3", "4"])
    os.makedirs(tmp_path / "empty")
    for folder in ("dup", "two", "empty", "missing"):
        with pytest.raises(ImageReadError) as full:
            read_image(str(tmp_path / folder))
        with pytest.raises(ImageReadError) as header:
            read_header(str(tmp_path / folder))
        assert str(header.value) == str(full.value)


def test_truncated_files_are_found_from_their_headers(tmp_path):
    _write_series(tmp_path / "s", [(0.0, 0.0, z) for z in (0.0, 2.5, 5.0)], names=["a", "b", "c"])
    victim = tmp_path / "s" / "b"
    victim.write_bytes(victim.read_bytes()[:-300])  # pixel data cut short (after 126 bytes of padding): the header is intact
    with pytest.raises(ImageReadError, match=r"s/b: holds 32606 bytes of pixel data where its header describes "
                                             r"32768; the file is truncated"):
        read_header(str(tmp_path / "s"))
    for name in ("v.nii", "v.nii.gz"):
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / name))
        whole = (tmp_path / name).read_bytes()
        assert read_header(str(tmp_path / name)).shape == (8, 8, 8)
        (tmp_path / name).write_bytes(whole[: len(whole) - 40])
        with pytest.raises(ImageReadError, match=f"{name}: .*truncated"):
            read_header(str(tmp_path / name))


def test_resampled_shape_is_the_grid_resample_makes():
    affine = np.diag([0.7, 1.3, 2.5, 1.0])
    image = ImageData(np.zeros((11, 7, 9), np.float32), (0.7, 1.3, 2.5), affine, {})
    for target in [(1.0, 1.0, 1.0), (0.5, 2.0, 3.3), (5.0, 5.0, 5.0)]:
        assert resampled_shape((11, 7, 9), (0.7, 1.3, 2.5), target) == resample(image, target).array.shape
    assert resampled_shape((11, 7), (1.0, 1.0), (0.5, 0.5, 2.0)) == (22, 14)
