"""Multi-crop augmentation: shapes, crop geometry statistics, blur probabilities, errors."""

import math

import numpy as np
import pytest
from PIL import Image

from medjax.data.augment import MultiCropConfig, crop_box, multicrop

# Only geometry, output left unnormalised: lets tests read pixel values directly.
PLAIN = dict(intensity_p=0.0, gamma_p=0.0, noise_p=0.0, global_blur_p=(0.0,), local_blur_p=0.0,
             mean=(0.0,), std=(1.0,))


def _image(h=64, w=64, c=None, seed=0):
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_shapes_and_dtypes():
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=3)
    out = multicrop(_image(), np.random.default_rng(0), cfg)
    assert [c.shape for c in out["global_crops"]] == [(32, 32, 1)] * 2
    assert [c.shape for c in out["local_crops"]] == [(16, 16, 1)] * 3
    assert all(c.dtype == np.float32 and c.flags.c_contiguous for c in out["global_crops"] + out["local_crops"])
    rgb = multicrop(_image(c=3), np.random.default_rng(0), cfg)
    assert rgb["global_crops"][0].shape == (32, 32, 3)
    rep = multicrop(_image(), np.random.default_rng(0), MultiCropConfig(global_size=32, local_size=16, n_local=0,
                                                                         channels=3, mean=(0.485, 0.456, 0.406),
                                                                         std=(0.229, 0.224, 0.225)))
    g = rep["global_crops"][0]
    assert g.shape == (32, 32, 3) and rep["local_crops"] == []
    # A repeated gray channel normalised per channel: undoing the normalisation gives equal channels.
    raw = g * np.array([0.229, 0.224, 0.225], np.float32) + np.array([0.485, 0.456, 0.406], np.float32)
    np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-5)


def test_deterministic_given_generator():
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=2)
    a = multicrop(_image(), np.random.default_rng(7), cfg)
    b = multicrop(_image(), np.random.default_rng(7), cfg)
    c = multicrop(_image(), np.random.default_rng(8), cfg)
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a["global_crops"][0], c["global_crops"][0])


def _boxes(scale, n=4000, size=256, seed=0):
    rng = np.random.default_rng(seed)
    boxes = np.array([crop_box(size, size, scale, (3 / 4, 4 / 3), rng) for _ in range(n)])
    return boxes, boxes[:, 2] * boxes[:, 3] / size**2


def test_local_crop_scale_is_uniform():
    # Small areas always fit, so the accepted area fraction is uniform on (0.05, 0.32).
    boxes, frac = _boxes((0.05, 0.32))
    assert frac.min() > 0.05 - 0.01 and frac.max() < 0.32 + 0.01  # rounding of h, w to pixels
    assert abs(frac.mean() - 0.185) < 0.006  # sd 0.078 / sqrt(4000) = 0.0012
    np.testing.assert_allclose(np.percentile(frac, [25, 50, 75]), 0.05 + 0.27 * np.array([0.25, 0.5, 0.75]),
                               atol=0.01)
    aspect = boxes[:, 3] / boxes[:, 2]
    assert aspect.min() > 0.75 * 0.9 and aspect.max() < 4 / 3 * 1.1
    assert abs(np.log(aspect).mean()) < 0.01  # log-uniform, symmetric around 1
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 256).all()


def test_global_crop_scale_matches_torchvision_rule():
    # A try is accepted when both sides fit: area s <= min(a, 1/a); after ten failed tries the
    # full image is used. Expected mean area fraction from that rule, integrated numerically.
    _, frac = _boxes((0.32, 1.0))
    s = np.linspace(0.32, 1.0, 2001)[:, None]
    a = np.exp(np.linspace(math.log(3 / 4), math.log(4 / 3), 2001))[None, :]
    ok = s <= np.minimum(a, 1 / a)
    p_ok = ok.mean()
    mean_ok = (s * ok).sum() / ok.sum()
    p_fallback = (1 - p_ok) ** 10
    expected = (1 - p_fallback) * mean_ok + p_fallback * 1.0
    assert abs(frac.mean() - expected) < 0.01, (frac.mean(), expected)  # sd ~0.18/sqrt(4000) = 0.003
    assert frac.min() > 0.32 - 0.01 and frac.max() <= 1.0


def test_full_image_crop_is_a_bicubic_resize():
    img = _image(64, 64)
    cfg = MultiCropConfig(global_size=48, local_size=16, n_local=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                          flip_p=0.0, **PLAIN)
    out = multicrop(img, np.random.default_rng(0), cfg)["global_crops"][0][..., 0]
    want = np.clip(np.asarray(Image.fromarray(img, mode="F").resize((48, 48), Image.BICUBIC)), 0, 1)
    np.testing.assert_allclose(out, want, atol=1e-6)


def test_flip_probability():
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=0, **PLAIN)
    flips = 0
    for s in range(400):
        for crop in multicrop(ramp, np.random.default_rng(s), cfg)["global_crops"]:
            flips += crop[0, -1, 0] < crop[0, 0, 0]
    assert abs(flips / 800 - 0.5) < 0.06  # sd 0.018


def _roughness(x):
    x = x[..., 0]
    return np.abs(np.diff(x, axis=1)).mean() / (x.std() + 1e-8)


def test_blur_probabilities_are_the_intended_ones():
    # Crops that copy pixels exactly (scale 1 and 1/16 of a 64x64 noise image), so only blur
    # changes the roughness: 1.19 sharp, < 0.6 blurred with sigma >= 1.
    cfg = MultiCropConfig(global_size=64, local_size=16, n_local=4, global_scale=(1.0, 1.0),
                          local_scale=(0.0625, 0.0625), ratio=(1.0, 1.0), flip_p=0.0, intensity_p=0.0, gamma_p=0.0,
                          noise_p=0.0, blur_sigma=(1.0, 2.0), mean=(0.0,), std=(1.0,))
    img = _image()
    blurred = np.zeros(3)
    n = 300
    for s in range(n):
        out = multicrop(img, np.random.default_rng(s), cfg)
        blurred[0] += _roughness(out["global_crops"][0]) < 0.8
        blurred[1] += _roughness(out["global_crops"][1]) < 0.8
        blurred[2] += np.mean([_roughness(c) < 0.8 for c in out["local_crops"]])
    rate = blurred / n
    assert rate[0] == 1.0  # the reference code never blurs this crop (its p is inverted)
    assert abs(rate[1] - 0.1) < 0.06 and abs(rate[2] - 0.5) < 0.06


def test_intensity_augmentations_stay_finite_and_vary():
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=2, intensity_p=1.0, gamma_p=1.0, noise_p=1.0)
    means = []
    for s in range(50):
        out = multicrop(_image(), np.random.default_rng(s), cfg)
        crops = out["global_crops"] + out["local_crops"]
        assert all(np.isfinite(c).all() for c in crops)
        means.append(out["global_crops"][1].mean())
    assert np.std(means) > 0.05  # brightness/contrast/gamma change the crop statistics


def test_constant_image_survives_geometry():
    out = multicrop(np.full((40, 40), 0.25, np.float32), np.random.default_rng(0),
                    MultiCropConfig(global_size=32, local_size=16, n_local=2, **PLAIN))
    for c in out["global_crops"] + out["local_crops"]:
        np.testing.assert_allclose(c, 0.25, atol=1e-6)


def test_user_errors_are_clear():
    with pytest.raises(ValueError, match="larger than the 64x64 image"):
        multicrop(_image(), np.random.default_rng(0), MultiCropConfig(global_size=96, local_size=16))
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropConfig(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="probability"):
        MultiCropConfig(noise_p=1.5)
    with pytest.raises(ValueError, match="not a slice"):
        multicrop(np.zeros((2, 64, 64, 1), np.float32), np.random.default_rng(0), MultiCropConfig(32, 16))
