"""Multi-crop augmentation for grayscale (or few-channel) medical slices.

DINOv2 trains on several random views of one image: large "global" crops that
teacher and student both see, and small "local" crops only the student sees.
The geometry (random resized crop + horizontal flip) follows the reference.
The photometric part does not: RGB colour jitter, random grayscale and
solarize mean nothing for MRI/CT/X-ray, so they are replaced by intensity
changes a scanner or protocol really produces (gain/offset, contrast, gamma,
blur, noise).

Everything is numpy on the host; one `np.random.Generator` drives all draws,
so a record's views are a pure function of (image, generator state).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image
from scipy import ndimage

# torchvision's GaussianBlur in the reference uses a 9-tap kernel.
_BLUR_RADIUS = 4


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
    """Sizes, counts and augmentation strengths for `multicrop`.

    Probabilities are per crop. `global_blur_p[i]` is the blur probability of
    global crop i (the last value is reused for extra crops). The reference
    means global crop 1 always blurred, crop 2 with p=0.1 and local crops with
    p=0.5, but its `GaussianBlur` passes `1 - p` to `RandomApply`, so in its code
    crop 1 is never blurred; medjax uses the intended values.
    """

    global_size: int = 224
    local_size: int = 96
    n_global: int = 2
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    # Brightness/contrast jitter (the grayscale part of the reference's
    # ColorJitter(0.4, 0.4, ...) with p=0.8): factors uniform in [1-s, 1+s].
    intensity_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    # Gamma: x ** g with g log-uniform in gamma_range (non-linear contrast, as
    # between MR protocols or CT windows).
    gamma_p: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    # Gaussian blur, sigma uniform in blur_sigma (pixels of the crop).
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    local_blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # Additive Gaussian noise, std uniform in noise_std (image range is [0, 1]).
    noise_p: float = 0.2
    noise_std: tuple[float, float] = (0.005, 0.05)
    # Output channels: None keeps the input's; 3 repeats a 1-channel slice for
    # weights trained on RGB.
    channels: int | None = None
    # Final normalisation, one value or one per output channel. The default is
    # the mean of ImageNet's RGB statistics, so converted RGB weights see inputs
    # of the scale they were trained on.
    mean: tuple[float, ...] = (0.449,)
    std: tuple[float, ...] = (0.226,)

    def __post_init__(self):
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive number of pixels.")
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError(
                    f"n_global={self.n_global}, n_local={self.n_local}: need n_global >= 1 and n_local >= 0."
            )
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name}={(lo, hi)} must satisfy 0 < low <= high <= 1 (fractions of the image area).")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={self.ratio} must satisfy 0 < low <= high.")
        probs = (self.flip_p, self.intensity_p, self.gamma_p, self.local_blur_p, self.noise_p)
        if any(not 0.0 <= p <= 1.0 for p in probs + tuple(self.global_blur_p)):
            raise ValueError("Every augmentation probability in MultiCropConfig must lie in [0, 1].")
        if not self.global_blur_p:
            raise ValueError("global_blur_p needs at least one value, e.g. (1.0, 0.1).")
        if self.gamma_range[0] <= 0 or self.blur_sigma[0] <= 0:
            raise ValueError(f"gamma_range={self.gamma_range} and blur_sigma={self.blur_sigma} must be positive.")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean={self.mean} and std={self.std} need equal lengths and std > 0.")


def crop_box(height: int, width: int, scale, ratio, rng: np.random.Generator):
    """Random crop box (top, left, h, w) as torchvision's RandomResizedCrop.

    Area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`, ten
    tries, then a centre crop clamped to `ratio`.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _resize_box(planes, box, size: int) -> np.ndarray:
    """Bicubic resample of `box` of each float plane to (size, size, C)."""
    top, left, h, w = box
    pil_box = (left, top, left + w, top + h)
    out = [np.asarray(p.resize((size, size), Image.BICUBIC, box=pil_box)) for p in planes]
    # Bicubic overshoots at edges; the input range is [0, 1], keep it (as uint8 PIL images do).
    return np.clip(np.stack(out, axis=-1), 0.0, 1.0)


def _intensity(x: np.ndarray, cfg: MultiCropConfig, blur_p: float, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentation of one crop (values in [0, 1] in and out, before noise); the crop is
    (H, W, C) or, for volumes, (D, H, W, C)."""
    if rng.random() < cfg.intensity_p:
        # Random order of the two, as torchvision's ColorJitter.
        for op in rng.permutation(2):
            if op == 0:
                x = x * np.float32(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))
            else:
                m = x.mean()
                x = (x - m) * np.float32(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)) + m
            x = np.clip(x, 0.0, 1.0)
    if rng.random() < cfg.gamma_p:
        g = math.exp(rng.uniform(math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1])))
        x = np.power(x, np.float32(g))
    if rng.random() < blur_p:
        sigma = rng.uniform(*cfg.blur_sigma)
        spatial = x.ndim - 1  # (H, W, C) slices or (D, H, W, C) volumes: never across channels
        x = ndimage.gaussian_filter(x, sigma=(sigma,) * spatial + (0,), mode="mirror",
                                    radius=(_BLUR_RADIUS,) * spatial + (0,))
    if rng.random() < cfg.noise_p:
        std = np.float32(rng.uniform(*cfg.noise_std))
        x = x + std * rng.standard_normal(x.shape, dtype=np.float32)
    return x


def finish_crop(x: np.ndarray, cfg: MultiCropConfig, blur_p: float, rng: np.random.Generator, mean,
                inv_std) -> np.ndarray:
    """A resized crop (channels last, values in [0, 1]) -> flipped left-right with ``cfg.flip_p``,
    photometrically augmented, repeated to ``cfg.channels`` and normalised; 2D slices and 3D volumes."""
    if rng.random() < cfg.flip_p:
        x = np.flip(x, axis=-2)  # the width axis of (H, W, C) and of (D, H, W, C)
    x = _intensity(x, cfg, blur_p, rng)
    if cfg.channels is not None and x.shape[-1] != cfg.channels:
        x = np.repeat(x, cfg.channels, axis=-1)
    return np.ascontiguousarray((x - mean) * inv_std, dtype=np.float32)


def output_normalisation(cfg: MultiCropConfig, channels: int, what: str):
    """(mean, 1 / std) of the crops' output channels; a channel count or mean/std that cannot fit the
    ``channels`` of the input ``what`` (image, volume) is refused in one sentence."""
    c_out = channels if cfg.channels is None else cfg.channels
    if c_out != channels and channels != 1:
        raise ValueError(f"channels={cfg.channels} cannot be made from a {channels}-channel {what}; use "
                         f"channels=None or {channels}.")
    if len(cfg.mean) not in (1, c_out):
        raise ValueError(f"mean/std have {len(cfg.mean)} values for {c_out} output channels; give 1 or {c_out}.")
    return np.asarray(cfg.mean, np.float32), 1.0 / np.asarray(cfg.std, np.float32)


def _one_crop(planes, hw, size, scale, blur_p, cfg, rng, mean, inv_std):
    box = crop_box(hw[0], hw[1], scale, cfg.ratio, rng)
    return finish_crop(_resize_box(planes, box, size), cfg, blur_p, rng, mean, inv_std)


def _as_hwc(image) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or not 1 <= x.shape[-1] <= 4:
        raise ValueError(f"image of shape {x.shape} is not a slice: pass (H, W) or (H, W, C) with C <= 4.")
    return x


def multicrop(image, rng: np.random.Generator, cfg: MultiCropConfig) -> dict:
    """Views of one slice: `{"global_crops": [...], "local_crops": [...]}`.

    `image` is `(H, W)` or `(H, W, C)` with intensities already in [0, 1]; each
    crop is float32 `(size, size, C_out)`, normalised with `cfg.mean/std`.
    """
    x = _as_hwc(image)
    height, width, c = x.shape
    largest = max(cfg.global_size, cfg.local_size)
    if largest > min(height, width):
        raise ValueError(
                f"crop size {largest} is larger than the {height}x{width} image; "
                "lower global_size/local_size or resample the slices to at least that size."
        )
    mean, inv_std = output_normalisation(cfg, c, "image")
    planes = [Image.fromarray(np.ascontiguousarray(x[:, :, i]), mode="F") for i in range(c)]
    hw = (height, width)
    blur = cfg.global_blur_p
    global_crops = [
        _one_crop(planes, hw, cfg.global_size, cfg.global_scale, blur[min(i, len(blur) - 1)], cfg, rng, mean, inv_std)
        for i in range(cfg.n_global)
    ]
    local_crops = [
        _one_crop(planes, hw, cfg.local_size, cfg.local_scale, cfg.local_blur_p, cfg, rng, mean, inv_std)
        for _ in range(cfg.n_local)
    ]
    return {"global_crops": global_crops, "local_crops": local_crops}
