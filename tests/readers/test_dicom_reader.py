"""DICOM reader on real files: modality LUT parity, MONOCHROME1, lossless twins, geometry, errors.

Files come from pydicom's test data and the pydicom-data package. The lossless twin of a
``*_J2KR.dcm`` (JPEG 2000 reversible) file is ``*_UNCR.dcm``; ``*_UNCI.dcm`` is the
decoded lossy ``*_J2KI.dcm`` and differs from it.
"""

import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import MPEG2MPML, generate_uid

from medjax.readers import dicom
from medjax.readers import ImageReadError, read_image


def _file(name):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"test file {name} is not installed (pip install pydicom-data)")
    return path


def _modality(name):
    ds = pydicom.dcmread(_file(name))
    return apply_modality_lut(ds.pixel_array, ds).astype(np.float32)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm", "MR2_UNCR.dcm"])
def test_single_file_equals_pydicom_modality_lut(name):
    image = read_image(_file(name))
    ds = pydicom.dcmread(_file(name), stop_before_pixels=True)
    assert image.array.dtype == np.float32 and image.affine is None
    np.testing.assert_array_equal(image.array, _modality(name))
    assert image.spacing == tuple(float(v) for v in ds.PixelSpacing)
    rescale = {"slope": float(ds.get("RescaleSlope", 1)), "intercept": float(ds.get("RescaleIntercept", 0))}
    assert image.meta["rescale"] == rescale
    assert image.meta["modality"] == ds.Modality and image.meta["series_uid"] == ds.SeriesInstanceUID


def test_mr_rescale_slope_applied():
    image = read_image(_file("MR2_UNCR.dcm"))
    stored = pydicom.dcmread(_file("MR2_UNCR.dcm")).pixel_array
    assert image.meta["rescale"]["slope"] == pytest.approx(3.774114)
    np.testing.assert_allclose(image.array, stored * 3.774114 + 0.000061, rtol=1e-6)


def test_monochrome1_inverted_after_rescale():
    image = read_image(_file("RG3_UNCR.dcm"))
    raw = _modality("RG3_UNCR.dcm")
    assert image.meta["photometric"] == "MONOCHROME1" and image.meta["modality"] == "CR"
    np.testing.assert_array_equal(image.array, raw.max() + raw.min() - raw)


def test_zero_pixel_spacing_is_reported_not_used():
    image = read_image(_file("RG1_UNCR.dcm"))
    assert image.spacing == (1.0, 1.0) and image.meta["spacing_source"] == "assumed"
    assert any("PixelSpacing" in w and "not a valid spacing" in w for w in image.meta["warnings"])


@pytest.mark.parametrize(
    "compressed, reference",
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("693_J2KR.dcm", "693_UNCR.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
        ("RG3_J2KR.dcm", "RG3_UNCR.dcm"),
    ],
)
def test_lossless_twins_decode_identically(compressed, reference):
    a, b = read_image(_file(compressed)), read_image(_file(reference))
    assert a.array.shape == b.array.shape and a.spacing == b.spacing
    np.testing.assert_array_equal(a.array, b.array)


def test_jpeg_lossless_and_baseline_decode():
    image = read_image(_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert image.array.shape == (768, 1024)
    np.testing.assert_array_equal(image.array, pixel_array(_file("JPGLosslessP14SV1_1s_1f_8b.dcm")))
    rgb = read_image(_file("SC_jpeg_no_color_transform.dcm"))
    assert rgb.array.shape == (256, 256, 3) and rgb.affine is None


def test_unsupported_and_missing_decoders_are_clear(tmp_path, monkeypatch):
    ds = pydicom.dcmread(_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    path = tmp_path / "video.dcm"
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"video\.dcm.*MPEG2.*no installed decoder"):
        read_image(str(path))

    class Unavailable:
        is_available, available_plugins = False, ()
        missing_dependencies = ["plugin 'pylibjpeg' requires pylibjpeg-openjpeg"]

    monkeypatch.setattr(dicom.dcm_pixels, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(ImageReadError, match=r"MR_small_jp2klossless\.dcm.*JPEG 2000.*install pylibjpeg"):
        read_image(_file("MR_small_jp2klossless.dcm"))


def _stored_frames(name):
    return pydicom.dcmread(_file(name)).pixel_array.astype(np.float64)


def test_enhanced_ct_shared_rescale_and_geometry():
    """eCT_Supplemental: 2 frames, IOP (-1,0,0 / 0,1,0), rescale only in the shared functional group."""
    image = read_image(_file("eCT_Supplemental.dcm"), expect_3d=True)
    frames = _stored_frames("eCT_Supplemental.dcm") - 1024.0  # z = -159, -149
    expected = np.stack(list(frames), axis=-1).transpose(1, 0, 2)[:, ::-1, :]  # cols go R, rows go P
    np.testing.assert_array_equal(image.array, expected.astype(np.float32))
    np.testing.assert_allclose(image.spacing, (0.388672, 0.388672, 10.0), rtol=1e-6)
    first_voxel_lps = np.array([99.5, -301.5 + 511 * 0.388672, -159.0])
    first_voxel_ras = [-first_voxel_lps[0], -first_voxel_lps[1], -159.0, 1]
    np.testing.assert_allclose(image.affine @ [0, 0, 0, 1], first_voxel_ras, atol=1e-4)
    assert image.meta["rescale"] == {"slope": 1.0, "intercept": -1024.0}


def test_enhanced_ct_per_frame_rescale(tmp_path):
    ds = pydicom.dcmread(_file("eCT_Supplemental.dcm"))
    shared = ds.SharedFunctionalGroupsSequence[0]
    transform = shared.PixelValueTransformationSequence
    del shared.PixelValueTransformationSequence
    for item, (slope, intercept) in zip(ds.PerFrameFunctionalGroupsSequence, [(1.0, -1024.0), (2.0, -1000.0)]):
        item.PixelValueTransformationSequence = pydicom.Sequence([pydicom.Dataset()])
        item.PixelValueTransformationSequence[0].update(transform[0])
        item.PixelValueTransformationSequence[0].RescaleSlope = slope
        item.PixelValueTransformationSequence[0].RescaleIntercept = intercept
    ds.save_as(tmp_path / "per_frame.dcm")
    image = read_image(str(tmp_path / "per_frame.dcm"))
    stored = _stored_frames("eCT_Supplemental.dcm")
    np.testing.assert_array_equal(image.array[:, ::-1, 0].T, (stored[0] - 1024.0).astype(np.float32))
    np.testing.assert_array_equal(image.array[:, ::-1, 1].T, (stored[1] * 2.0 - 1000.0).astype(np.float32))
    assert image.meta["rescale"] == {"slope": [1.0, 2.0], "intercept": [-1024.0, -1000.0]}


def test_multiframe_without_geometry_is_flagged():
    image = read_image(_file("emri_small.dcm"))
    frames = _stored_frames("emri_small.dcm")
    assert image.array.shape == (64, 64, 10)
    np.testing.assert_array_equal(image.array, np.stack(list(frames), -1).transpose(1, 0, 2)[::-1, ::-1, :])
    assert any("no ImagePositionPatient" in w for w in image.meta["warnings"])


# --- series built from CT_small copies -------------------------------------------------

def _write_series(folder, positions, *, iop=(1, 0, 0, 0, 1, 0), series_uid=None, description="axial", names=None):
    """Write CT_small copies at ``positions``; slice k's stored values are offset by 10*k.

    InstanceNumber runs opposite to the positions and file names are shuffled, so only
    the positions can give the right order. Returns (physical slice, IPP, name) per k.
    """
    os.makedirs(folder, exist_ok=True)
    series_uid = series_uid or generate_uid()
    rng = np.random.default_rng(len(positions))
    names = names or [f"{n:08x}" for n in rng.permutation(len(positions)) * 7919 + 12345]
    written = []
    for k, ipp in enumerate(positions):
        ds = pydicom.dcmread(_file("CT_small.dcm"))
        stored = ds.pixel_array + np.int16(10 * k)
        ds.PixelData = stored.astype(np.int16).tobytes()
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [float(v) for v in ipp], list(iop)
        ds.InstanceNumber = len(positions) - k
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesDescription = series_uid, generate_uid(), description
        ds.save_as(os.path.join(folder, names[k]))
        written.append((stored * 1.0 - 1024.0, np.asarray(ipp, float), names[k]))
    return series_uid, written


def _assert_geometry(image, written, iop):
    """Every voxel holds the pixel that lies at the affine's position in the source slices."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    normal, spacing = np.cross(row, col), 0.661468
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in image.array.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = idx @ image.affine[:3, :3].T + image.affine[:3, 3]
    lps = ras * [-1, -1, 1]
    for values, ipp, _ in written:
        on = np.abs((lps - ipp) @ normal) < 1e-3
        i = np.rint((lps[on] - ipp) @ col / spacing).astype(int)
        j = np.rint((lps[on] - ipp) @ row / spacing).astype(int)
        assert on.sum() == values.size
        np.testing.assert_array_equal(image.array[tuple(idx[on].T)], values[i, j])


def test_series_sorted_by_position_not_names_or_instance(tmp_path):
    positions = [(-158.1, -179.0, -75.7 + 2.5 * k) for k in (3, 0, 4, 1, 2)]
    _, written = _write_series(tmp_path / "s", positions)
    image = read_image(str(tmp_path / "s"), expect_3d=True)
    assert image.array.shape == (128, 128, 5) and image.meta["warnings"] == []
    np.testing.assert_allclose(image.spacing, (0.661468, 0.661468, 2.5), rtol=1e-6)
    assert image.meta["orientation"] == "PLS"  # stored axes: rows go posterior, columns left
    _assert_geometry(image, written, (1, 0, 0, 0, 1, 0))
    lowest = min(written, key=lambda w: w[1][2])
    np.testing.assert_array_equal(image.array[..., 0], lowest[0].T[::-1, ::-1])


def test_sagittal_series_sorted_along_normal(tmp_path):
    iop = (0, 1, 0, 0, 0, -1)
    _, written = _write_series(tmp_path / "sag", [(3.0 * k, -20.0, 40.0) for k in (2, 0, 1)], iop=iop)
    image = read_image(str(tmp_path / "sag"))
    np.testing.assert_allclose(image.spacing, (3.0, 0.661468, 0.661468), rtol=1e-6)
    assert image.meta["slice_axis"] == 0 and image.meta["orientation"] == "IPR"  # rows go I, columns P, slices R
    _assert_geometry(image, written, iop)


def test_gantry_tilt_warned_and_followed(tmp_path):
    _, written = _write_series(tmp_path / "tilt", [(0.0, 0.5 * k, 2.5 * k) for k in range(4)])
    image = read_image(str(tmp_path / "tilt"))
    assert any("gantry tilt" in w for w in image.meta["warnings"])
    np.testing.assert_allclose(image.affine[:3, 2], [0.0, -0.5, 2.5])  # RAS: y negated


def test_inconsistent_gap_warned_with_values(tmp_path):
    _write_series(tmp_path / "gap", [(0.0, 0.0, z) for z in (0.0, 2.5, 5.0, 10.0, 12.5)])
    image = read_image(str(tmp_path / "gap"))
    warning = " ".join(image.meta["warnings"])
    assert "inconsistent slice spacing" in warning and "2.5 mm x3" in warning and "5 mm x1" in warning


def test_duplicate_positions_refused(tmp_path):
    _, written = _write_series(tmp_path / "dup", [(0.0, 0.0, z) for z in (0.0, 2.5, 2.5)], names=["a", "b", "c"])
    with pytest.raises(ImageReadError, match=r"dup.*slices [bc] and [bc] share the position"):
        read_image(str(tmp_path / "dup"))


def test_two_series_refused_unless_chosen(tmp_path):
    uid_a, _ = _write_series(tmp_path / "two", [(0, 0, z) for z in (0, 3, 6)], description="first",
                             names=["1", "2", "3"])
    uid_b, _ = _write_series(tmp_path / "two", [(0, 0, z) for z in (0, 5)], description="second", names=["4", "5"])
    with pytest.raises(ImageReadError, match="holds 2 DICOM series") as err:
        read_image(str(tmp_path / "two"))
    assert all(s in str(err.value) for s in (uid_a, uid_b, "'first', 3 files", "'second', 2 files", "series_uid"))
    image = read_image(str(tmp_path / "two"), series_uid=uid_b)
    assert image.array.shape[2] == 2 and image.meta["series_uid"] == uid_b and image.spacing[2] == pytest.approx(5.0)
    with pytest.raises(ImageReadError, match=f"no series '1.2.3'.*{uid_a}"):
        read_image(str(tmp_path / "two"), series_uid="1.2.3")


def test_missing_positions_fall_back_to_instance_number(tmp_path):
    _, written = _write_series(tmp_path / "nopos", [(0, 0, z) for z in (0, 5, 10)])
    for name in os.listdir(tmp_path / "nopos"):
        ds = pydicom.dcmread(tmp_path / "nopos" / name)
        del ds.ImagePositionPatient
        ds.save_as(tmp_path / "nopos" / name)
    image = read_image(str(tmp_path / "nopos"))
    assert any("InstanceNumber" in w for w in image.meta["warnings"])
    np.testing.assert_array_equal(image.array[..., 0], written[-1][0].T[::-1, ::-1])  # InstanceNumber 1


def test_non_dicom_files_skipped_with_warning(tmp_path):
    _write_series(tmp_path / "mixed", [(0, 0, z) for z in (0, 1, 2)])
    (tmp_path / "mixed" / "notes.txt").write_text("scanner notes")
    image = read_image(str(tmp_path / "mixed"))
    assert image.array.shape[2] == 3 and any("notes.txt" in w for w in image.meta["warnings"])


def test_broken_inputs_name_the_file(tmp_path):
    data = open(_file("CT_small.dcm"), "rb").read()
    (tmp_path / "cut_pixels.dcm").write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ImageReadError, match=r"cut_pixels\.dcm.*could not be decoded"):
        read_image(str(tmp_path / "cut_pixels.dcm"))
    (tmp_path / "cut_header").write_bytes(data[:2000])
    with pytest.raises(ImageReadError, match=r"cut_header.*probably truncated"):
        read_image(str(tmp_path / "cut_header"))
    with pytest.raises(ImageReadError, match=r"rtplan\.dcm.*without pixel data \(RT Plan Storage\)"):
        read_image(_file("rtplan.dcm"))
    (tmp_path / "report").write_text("not an image at all")
    with pytest.raises(ImageReadError, match=r"report.*not a DICOM file"):
        read_image(str(tmp_path / "report"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match=r"empty.*no DICOM image series"):
        read_image(str(tmp_path / "empty"))
    (tmp_path / "series_cut").mkdir()
    (tmp_path / "series_cut" / "x1").write_bytes(data[:2000])
    with pytest.raises(ImageReadError, match=r"x1.*probably truncated"):
        read_image(str(tmp_path / "series_cut"))


def test_expect_3d_names_the_shape():
    with pytest.raises(ImageReadError, match=r"CT_small\.dcm.*expected a 3D volume.*\(128, 128\)"):
        read_image(_file("CT_small.dcm"), expect_3d=True)
    with pytest.raises(ImageReadError, match=r"expected a 2D image.*\(512, 512, 2\)"):
        read_image(_file("eCT_Supplemental.dcm"), expect_3d=False)
