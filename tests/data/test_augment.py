"""Multi-crop augmentation: shapes, crop geometry statistics, blur probabilities, the per-crop draws'
distributions, the fast path against the plain computation, errors."""

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medjax.data.augment import MultiCropConfig, Workspace, crop_box, draw_crop, multicrop, multicrop_into

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


def _plain_multicrop(image, rng, cfg):
    """The straightforward computation the fast path must reproduce (medjax's earlier implementation),
    drawing from the generator as it goes: resize (one array per plane), clip, flip, then out-of-place
    jitter, gamma, scipy's gaussian_filter, noise and normalisation."""
    x = image[:, :, None] if image.ndim == 2 else image
    planes = [Image.fromarray(np.ascontiguousarray(x[:, :, i]), mode="F") for i in range(x.shape[-1])]
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    blur = cfg.global_blur_p
    crops = [("global_crops", cfg.global_size, cfg.global_scale, blur[min(i, len(blur) - 1)])
             for i in range(cfg.n_global)]
    crops += [("local_crops", cfg.local_size, cfg.local_scale, cfg.local_blur_p)] * cfg.n_local
    out = {"global_crops": [], "local_crops": []}
    for key, size, scale, blur_p in crops:
        top, left, h, w = crop_box(x.shape[0], x.shape[1], scale, cfg.ratio, rng)
        y = np.stack([np.asarray(p.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h)))
                      for p in planes], axis=-1)
        y = np.clip(y, 0.0, 1.0)
        if rng.random() < cfg.flip_p:
            y = y[:, ::-1]
        if rng.random() < cfg.intensity_p:
            for op in rng.permutation(2):
                if op == 0:
                    y = y * np.float32(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
                else:
                    m = y.mean()
                    y = (y - m) * np.float32(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)) + m
                y = np.clip(y, 0.0, 1.0)
        if rng.random() < cfg.gamma_p:
            y = np.power(y, np.float32(math.exp(rng.uniform(math.log(cfg.gamma_range[0]),
                                                            math.log(cfg.gamma_range[1])))))
        if rng.random() < blur_p:
            s = rng.uniform(*cfg.blur_sigma)
            y = ndimage.gaussian_filter(y, sigma=(s, s, 0), mode="mirror", radius=(4, 4, 0))
        if rng.random() < cfg.noise_p:
            noise_std = np.float32(rng.uniform(*cfg.noise_std))
            y = y + noise_std * rng.standard_normal(y.shape, dtype=np.float32)
        if cfg.channels is not None and y.shape[-1] != cfg.channels:
            y = np.repeat(y, cfg.channels, axis=-1)
        out[key].append((y - mean) / std)
    return out


@pytest.mark.parametrize("channels, image_channels", [(None, None), (3, None), (None, 2)])
def test_fast_path_equals_the_plain_computation(channels, image_channels):
    # Every step on often (blur on every crop), 30 images: the same draws from the generator, and in-place
    # float32 steps, the flip folded into the copy out of PIL, scipy's blur without gaussian_filter and
    # shared scratch arrays give the plain computation's values to float32 rounding (a crop's mean summed
    # in another order: at most 7.2e-7 over 1500 crops, in normalised units; most crops bit for bit).
    n_mean = 3 if channels == 3 else 1
    cfg = MultiCropConfig(global_size=40, local_size=16, n_local=3, intensity_p=0.9, gamma_p=0.5,
                          global_blur_p=(1.0,), local_blur_p=1.0, noise_p=0.5, channels=channels,
                          mean=(0.449,) * n_mean, std=(0.226,) * n_mean)
    for seed in range(30):
        img = _image(56, 60, c=image_channels, seed=seed)
        fast = multicrop(img, np.random.default_rng(seed), cfg)
        plain = _plain_multicrop(img, np.random.default_rng(seed), cfg)
        for key in ("global_crops", "local_crops"):
            for a, b in zip(fast[key], plain[key], strict=True):
                assert a.shape == b.shape and a.dtype == np.float32
                np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_views_written_into_a_batch_equal_multicrop():
    # One workspace shared by several images (as a batch does) leaves nothing of one image in the next.
    cfg = MultiCropConfig(global_size=32, local_size=16, n_local=2, noise_p=0.5)
    images = [_image(seed=s) for s in range(3)]
    glob = np.full((2, 3, 32, 32, 1), np.nan, np.float32)
    local = np.full((2, 3, 16, 16, 1), np.nan, np.float32)
    workspace = Workspace()
    for b, img in enumerate(images):
        multicrop_into(img, np.random.default_rng(b), cfg, glob[:, b], local[:, b], workspace)
    for b, img in enumerate(images):
        want = multicrop(img, np.random.default_rng(b), cfg)
        for i in range(2):
            np.testing.assert_array_equal(glob[i, b], want["global_crops"][i])
            np.testing.assert_array_equal(local[i, b], want["local_crops"][i])


def test_crop_draws_follow_the_configured_distributions():
    # 20,000 crops' choices: rates within 4 sd, parameters uniform (or log-uniform) on their ranges,
    # choices independent of each other.
    cfg = MultiCropConfig()
    rng = np.random.default_rng(0)
    n = 20000
    draws = [draw_crop(cfg, 0.5, rng) for _ in range(n)]

    def rate(values, p):
        assert abs(np.mean(values) - p) < 4 * math.sqrt(p * (1 - p) / len(values)) + 1e-9, (np.mean(values), p)

    def uniform(values, lo, hi):
        v = np.asarray(values)
        assert lo <= v.min() and v.max() <= hi
        quartiles = lo + (hi - lo) * np.array([0.25, 0.5, 0.75])
        np.testing.assert_allclose(np.percentile(v, [25, 50, 75]), quartiles, atol=0.02 * (hi - lo))

    flip = [d.flip for d in draws]
    jitter = [d.brightness is not None for d in draws]
    rate(flip, 0.5)
    rate(jitter, 0.8)
    assert jitter == [d.contrast is not None for d in draws]  # ColorJitter: both factors or neither
    rate([d.brightness_first for d in draws if d.brightness is not None], 0.5)
    uniform([d.brightness for d in draws if d.brightness is not None], 0.6, 1.4)
    uniform([d.contrast for d in draws if d.contrast is not None], 0.6, 1.4)
    gamma = [d.gamma for d in draws if d.gamma is not None]
    rate([d.gamma is not None for d in draws], 0.3)
    uniform(np.log(gamma), math.log(0.7), math.log(1.5))
    rate([d.blur_sigma is not None for d in draws], 0.5)
    uniform([d.blur_sigma for d in draws if d.blur_sigma is not None], 0.1, 2.0)
    rate([d.noise_std is not None for d in draws], 0.2)
    uniform([d.noise_std for d in draws if d.noise_std is not None], 0.005, 0.05)
    assert abs(np.corrcoef(flip, jitter)[0, 1]) < 0.03  # sd 1/sqrt(n) = 0.007
    assert abs(np.corrcoef([d.gamma is not None for d in draws], [d.blur_sigma is not None for d in draws])[0, 1]) < 0.03
    assert all(draw_crop(cfg, 1.0, rng).blur_sigma is not None for _ in range(200))
    assert all(draw_crop(cfg, 0.0, rng).blur_sigma is None for _ in range(200))
