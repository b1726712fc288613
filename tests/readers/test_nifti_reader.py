"""NIfTI reader on real files: nibabel's LAS anatomical.nii, nilearn's MNI152 template, 4D data, damage."""

import os

import nibabel as nib
import nilearn
import numpy as np
import pytest

from medjax.readers.nifti import read_nifti
from medjax.readers import ImageReadError, read_image

NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
ANATOMICAL = os.path.join(NIBABEL_DATA, "anatomical.nii")  # 33 x 41 x 25, LAS, 2 mm
EXAMPLE_4D = os.path.join(NIBABEL_DATA, "example4d.nii.gz")  # 128 x 96 x 24 x 2
MNI_T1 = os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                      "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")  # 197 x 233 x 189, RAS, 1 mm


def test_las_file_reoriented_like_nibabel_canonical():
    image = read_image(ANATOMICAL, expect_3d=True)
    original = nib.load(ANATOMICAL)
    canonical = nib.as_closest_canonical(original)
    assert nib.aff2axcodes(original.affine) == ("L", "A", "S") and image.meta["orientation"] == "LAS"
    assert image.array.dtype == np.float32 and image.array.shape == (33, 41, 25)
    np.testing.assert_array_equal(image.array, canonical.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(image.affine, canonical.affine)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S") and image.spacing == (2.0, 2.0, 2.0)
    # LAS -> RAS is a flip of the first axis; every voxel keeps its world position
    np.testing.assert_array_equal(image.array, original.get_fdata(dtype=np.float32)[::-1])
    world = original.affine @ [0, 5, 7, 1]
    np.testing.assert_allclose(image.affine @ [32, 5, 7, 1], world)


def test_mni_template_is_ras_1mm():
    image = read_image(MNI_T1)
    assert image.array.shape == (197, 233, 189) and image.array.dtype == np.float32
    assert image.spacing == (1.0, 1.0, 1.0) and image.meta["orientation"] == "RAS" and image.meta["warnings"] == []
    np.testing.assert_array_equal(image.array, nib.load(MNI_T1).get_fdata(dtype=np.float32))


def test_4d_kept_by_reader_refused_by_expect_3d():
    image = read_nifti(EXAMPLE_4D)
    assert image.array.shape == (128, 96, 24, 2) and len(image.spacing) == 3
    assert image.meta["time_step"] == pytest.approx(2000.0)
    with pytest.raises(ImageReadError, match=r"example4d\.nii\.gz.*expected a 3D volume.*\(128, 96, 24, 2\)"):
        read_image(EXAMPLE_4D, expect_3d=True)


def test_singleton_fourth_axis_squeezed(tmp_path):
    original = nib.load(ANATOMICAL)
    data = np.asanyarray(original.dataobj)[..., None]
    path = tmp_path / "single_volume.nii.gz"
    nib.save(nib.Nifti1Image(data, original.affine), path)
    image = read_image(str(path), expect_3d=True)
    np.testing.assert_array_equal(image.array, read_nifti(ANATOMICAL).array)


def test_missing_orientation_is_warned(tmp_path):
    path = tmp_path / "no_affine.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6), np.float32), None), path)
    image = read_nifti(str(path))
    assert image.array.shape == (4, 5, 6) and any("orientation is unknown" in w for w in image.meta["warnings"])


def test_damaged_files_name_the_file(tmp_path):
    data = open(ANATOMICAL, "rb").read()
    garbled = bytearray(data)
    garbled[:348] = np.random.default_rng(0).integers(0, 256, 348, dtype=np.uint8).tobytes()
    (tmp_path / "garbled.nii").write_bytes(bytes(garbled))
    with pytest.raises(ImageReadError, match=r"garbled\.nii: is not a readable NIfTI file"):
        read_image(str(tmp_path / "garbled.nii"))
    (tmp_path / "half.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"half\.nii: its voxel data could not be read") as err:
        read_image(str(tmp_path / "half.nii"))
    assert "\n" not in str(err.value)
    with pytest.raises(ImageReadError, match=r"absent\.nii\.gz: no such file"):
        read_image(str(tmp_path / "absent.nii.gz"))


def test_volume_index_reads_one_volume_of_a_4d_file():
    whole = read_nifti(EXAMPLE_4D)
    second = read_image(EXAMPLE_4D, volume_index=1, expect_3d=True)
    assert second.array.shape == (128, 96, 24) and second.spacing == whole.spacing
    np.testing.assert_array_equal(second.array, whole.array[..., 1])
    np.testing.assert_array_equal(second.affine, whole.affine)
    assert second.meta["volume_index"] == 1 and second.meta["num_volumes"] == 2 and "time_step" not in second.meta
    assert read_image(ANATOMICAL, volume_index=1).array.shape == (33, 41, 25)  # a 3D file ignores it
    with pytest.raises(ImageReadError, match=r"example4d\.nii\.gz: volume_index=2 .*shape \(128, 96, 24, 2\).*0\.\.1"):
        read_image(EXAMPLE_4D, volume_index=2)


def test_4d_refusal_names_shape_and_config_key():
    with pytest.raises(ImageReadError, match=r"example4d\.nii\.gz: expected a 3D volume but got a 4D volume of shape "
                                             r"\(128, 96, 24, 2\) \(2 time points.*config\.data\.volume_index"):
        read_image(EXAMPLE_4D, expect_3d=True)
