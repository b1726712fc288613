"""Intensity normalisation (CT windows, percentiles, z-score) and resampling, on real CT/MR/NIfTI data."""

import os

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medjax.data.intensity import CT_WINDOWS, normalise, percentile_clip, resample, window, zscore
from medjax.readers import ImageData, read_image

ANATOMICAL = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")


def test_window_maps_level_and_edges():
    level, width = CT_WINDOWS["soft_tissue"]
    assert (level, width) == (40, 400)
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(window(hu, level, width), [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="width must be positive"):
        window(hu, 40, 0)


def test_ct_window_on_real_ct():
    hu = read_image(get_testdata_file("CT_small.dcm")).array  # Hounsfield units after rescale
    out, info = normalise(hu, {"method": "ct_window", "preset": "soft_tissue"})
    assert out.dtype == np.float32
    assert info == {"method": "ct_window", "level": 40.0, "width": 400.0, "preset": "soft_tissue"}
    np.testing.assert_allclose(out, np.clip((hu + 160.0) / 400.0, 0, 1), atol=1e-6)
    assert 0.0 < out.mean() < 1.0
    out, info = normalise(hu, {"method": "ct_window", "level": -600, "width": 1500})
    np.testing.assert_allclose(out, window(hu, *CT_WINDOWS["lung"]))
    assert "preset" not in info


def test_percentile_on_real_mr():
    mr = read_image(get_testdata_file("MR_small.dcm")).array
    lo, hi = np.percentile(mr, [0.5, 99.5])
    expected = np.clip((mr - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(percentile_clip(mr), expected, atol=1e-6)
    out, info = normalise(mr, {"method": "percentile", "low": 0.5, "high": 99.5})
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0 and info["low_value"] == pytest.approx(lo)
    out, info = normalise(mr, {"method": "percentile_zscore"})
    clipped = np.clip(mr, lo, hi)
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / clipped.std(), atol=1e-4)
    assert abs(out.mean()) < 1e-5 and out.std() == pytest.approx(1.0, abs=1e-5)


def test_zscore_and_constant_and_nonzero():
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    np.testing.assert_allclose(zscore(x), (x - 2.5) / np.std(x))
    assert np.all(zscore(np.full(5, 7.0)) == 0.0)
    assert np.all(percentile_clip(np.full(5, 7.0)) == 0.0)
    brain = np.array([0.0, 0.0, 0.0, 10.0, 20.0, 30.0], np.float32)
    out, info = normalise(brain, {"method": "zscore", "nonzero": True})
    np.testing.assert_allclose(out, [0, 0, 0, -np.sqrt(1.5), 0, np.sqrt(1.5)], atol=1e-6)
    assert info["mean"] == pytest.approx(20.0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"method": "minmax"}, "valid methods: ct_window, percentile, percentile_zscore, zscore"),
        ({"method": "ct_window", "preset": "abdomenn"}, "valid presets: bone, brain, liver, lung"),
        ({"method": "ct_window", "level": 40}, "needs a preset"),
        ({"method": "percentile", "lo": 1}, "unknown keys"),
        ({"method": "percentile", "low": 99, "high": 1}, "0 <= low < high <= 100"),
    ],
)
def test_bad_specs_list_the_valid_choices(spec, message):
    with pytest.raises(ValueError, match=message):
        normalise(np.zeros(4), spec)


def test_resample_volume_keeps_world_positions():
    image = read_image(ANATOMICAL)  # 2 mm isotropic, RAS
    fine = resample(image, (1.0, 1.0, 1.0))
    assert fine.array.shape == (66, 82, 50) and fine.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(fine.array[::2, ::2, ::2], image.array, rtol=1e-5, atol=1e-3)  # grid points kept
    np.testing.assert_allclose(fine.affine @ [10, 6, 4, 1], image.affine @ [5, 3, 2, 1])
    coarse = resample(image, (4.0, 4.0, 2.0))
    assert coarse.array.shape == (16, 20, 25) and coarse.meta["resampled_from"] == [2.0, 2.0, 2.0]
    np.testing.assert_allclose(coarse.affine @ [3, 2, 1, 1], image.affine @ [6, 4, 1, 1])


def test_resample_mask_nearest_keeps_labels():
    labels = (read_image(ANATOMICAL).array > 2000).astype(np.float32) * 3
    mask = ImageData(labels, (2.0, 2.0, 2.0), np.diag([2.0, 2.0, 2.0, 1.0]), {})
    out = resample(mask, (1.5, 1.5, 3.0), order=0)
    assert set(np.unique(out.array)) <= {0.0, 3.0} and out.array.max() == 3.0


def test_resample_2d_rgb_and_bad_spacing():
    rgb = ImageData(np.random.default_rng(0).random((10, 12, 3)).astype(np.float32), (0.5, 0.5), None, {})
    out = resample(rgb, (1.0, 1.0))
    assert out.array.shape == (5, 6, 3) and out.affine is None
    np.testing.assert_allclose(out.array, rgb.array[::2, ::2], atol=1e-6)
    with pytest.raises(ValueError, match="one per spatial axis"):
        resample(rgb, (1.0, 1.0, 1.0))
