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

Speed (a worker process must keep up with a GPU at 2 x 224 + 8 x 96 crops per
image): each crop is cut and resampled in one PIL call, its flip is folded into
the copy out of PIL, every photometric step works in place in float32 on two
scratch arrays that all crops (and all images of a batch, see
`multicrop_into`) share, the blur is scipy's separable 9-tap Gaussian without
its per-call set-up.
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


class Workspace:
    """Two float32 scratch arrays per crop shape, reused by every crop (and every image of a batch): a crop
    is resampled into one, blurred into the other and back, and only its normalised result is written out."""

    def __init__(self):
        self._pairs = {}

    def pair(self, shape) -> tuple[np.ndarray, np.ndarray]:
        shape = tuple(shape)
        if shape not in self._pairs:
            self._pairs[shape] = (np.empty(shape, np.float32), np.empty(shape, np.float32))
        return self._pairs[shape]


def _resize_box(planes, box, size: int, flip: bool, out: np.ndarray) -> np.ndarray:
    """Bicubic resample of `box` of each float plane into `out` (size, size, C), mirrored left-right when
    `flip`: the clip that must copy PIL's read-only pixels anyway writes them flipped, for free."""
    top, left, h, w = box
    pil_box = (left, top, left + w, top + h)
    for i, plane in enumerate(planes):
        pixels = np.asarray(plane.resize((size, size), Image.BICUBIC, box=pil_box))
        # Bicubic overshoots at edges; the input range is [0, 1], keep it (as uint8 PIL images do).
        np.clip(pixels[:, ::-1] if flip else pixels, 0.0, 1.0, out=out[:, :, i])
    return out


@dataclasses.dataclass(frozen=True)
class CropDraws:
    """The random choices of one crop's flip and photometric augmentation; None = not applied."""

    flip: bool
    brightness: float | None  # factor, with the contrast factor below (ColorJitter applies both or neither)
    contrast: float | None
    brightness_first: bool  # ColorJitter's random order of the two
    gamma: float | None
    blur_sigma: float | None
    noise_std: float | None


def draw_crop(cfg: MultiCropConfig, blur_p: float, rng: np.random.Generator) -> CropDraws:
    """Every choice of one crop but its noise field, in the order they have always been drawn (so seeded
    runs keep their views, to float32 rounding): flip, ColorJitter (both factors or neither, in a random
    order), gamma, blur, noise."""
    flip = rng.random() < cfg.flip_p
    factors = {}
    brightness_first = True
    if rng.random() < cfg.intensity_p:
        order = rng.permutation(2)  # torchvision's ColorJitter applies its parts in a random order
        brightness_first = bool(order[0] == 0)
        for op in order:
            strength = cfg.brightness if op == 0 else cfg.contrast
            factors[int(op)] = rng.uniform(1 - strength, 1 + strength)
    gamma = None
    if rng.random() < cfg.gamma_p:
        gamma = math.exp(rng.uniform(math.log(cfg.gamma_range[0]), math.log(cfg.gamma_range[1])))
    blur_sigma = rng.uniform(*cfg.blur_sigma) if rng.random() < blur_p else None
    noise_std = rng.uniform(*cfg.noise_std) if rng.random() < cfg.noise_p else None
    return CropDraws(flip=flip, brightness=factors.get(0), contrast=factors.get(1),
                     brightness_first=brightness_first, gamma=gamma, blur_sigma=blur_sigma, noise_std=noise_std)


def gaussian_weights(sigma: float) -> np.ndarray:
    """The 9 taps of scipy.ndimage's Gaussian of radius 4 (same formula: blurs match gaussian_filter's)."""
    x = np.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def _blur(x: np.ndarray, sigma: float, spare: np.ndarray):
    """Separable Gaussian blur of the spatial axes of a channels-last crop (never across channels), mirror
    edges, passing between ``x`` and ``spare``; returns (blurred, the other buffer)."""
    weights = gaussian_weights(sigma)
    for axis in range(x.ndim - 1):
        ndimage.correlate1d(x, weights, axis=axis, output=spare, mode="mirror")
        x, spare = spare, x
    return x, spare


def photometric(x: np.ndarray, draws: CropDraws, rng: np.random.Generator, spare: np.ndarray | None = None):
    """Photometric augmentation of one crop (values in [0, 1] in and out, before noise), in place: ``x``
    (H, W, C) or, for volumes, (D, H, W, C) float32 is overwritten, ``spare`` (its shape, float32;
    allocated if None) is scratch. Returns the augmented crop: ``x`` or ``spare``."""
    if draws.brightness is not None:
        for brightness in (True, False) if draws.brightness_first else (False, True):
            if brightness:
                x *= np.float32(draws.brightness)
            else:
                m = x.mean()
                x -= m
                x *= np.float32(draws.contrast)
                x += m
            np.clip(x, 0.0, 1.0, out=x)
    if draws.gamma is not None:
        np.power(x, np.float32(draws.gamma), out=x)
    if spare is None and (draws.blur_sigma is not None or draws.noise_std is not None):
        spare = np.empty(x.shape, np.float32)
    if draws.blur_sigma is not None:
        x, spare = _blur(x, draws.blur_sigma, spare)
    if draws.noise_std is not None:
        # Drawn into the free buffer (a flipped 3D view is not one: then a new array).
        noise = (rng.standard_normal(dtype=np.float32, out=spare) if spare.flags.c_contiguous
                 else rng.standard_normal(x.shape, dtype=np.float32))
        noise *= np.float32(draws.noise_std)
        x += noise
    return x


def normalise(x: np.ndarray, cfg: MultiCropConfig, mean, inv_std, out: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / std into ``out`` (a fresh contiguous float32 array if None), a 1-channel crop repeated
    to ``cfg.channels``."""
    if out is None:
        c_out = x.shape[-1] if cfg.channels is None else cfg.channels
        out = np.empty(x.shape[:-1] + (c_out,), np.float32)
    np.subtract(x, mean, out=out)  # broadcasting repeats a single channel
    out *= inv_std
    return out


def finish_crop(x: np.ndarray, cfg: MultiCropConfig, blur_p: float, rng: np.random.Generator, mean,
                inv_std) -> np.ndarray:
    """A resized crop (channels last, values in [0, 1], a fresh float32 array that is overwritten) ->
    flipped left-right with ``cfg.flip_p``, photometrically augmented, repeated to ``cfg.channels`` and
    normalised; 2D slices and 3D volumes."""
    draws = draw_crop(cfg, blur_p, rng)
    if draws.flip:
        x = np.flip(x, axis=-2)  # the width axis of (H, W, C) and of (D, H, W, C)
    return normalise(photometric(x, draws, rng), cfg, mean, inv_std)


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


def _as_hwc(image) -> np.ndarray:
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or not 1 <= x.shape[-1] <= 4:
        raise ValueError(f"image of shape {x.shape} is not a slice: pass (H, W) or (H, W, C) with C <= 4.")
    return x


def output_channels(cfg: MultiCropConfig, image) -> int:
    """Channels of the crops ``multicrop`` makes of ``image``."""
    c = _as_hwc(image).shape[-1]
    return c if cfg.channels is None else cfg.channels


def multicrop_into(image, rng: np.random.Generator, cfg: MultiCropConfig, global_out: np.ndarray,
                   local_out: np.ndarray, workspace: Workspace | None = None) -> None:
    """Writes the views of one slice into ``global_out[i]`` (n_global, Sg, Sg, C_out) and ``local_out[i]``
    (n_local, Sl, Sl, C_out), e.g. an image's rows of a batch; ``workspace`` can be shared by the images
    of a batch. Same views as ``multicrop`` for the same generator state."""
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
    workspace = workspace or Workspace()
    blur = cfg.global_blur_p
    crops = [(global_out[i], cfg.global_size, cfg.global_scale, blur[min(i, len(blur) - 1)])
             for i in range(cfg.n_global)]
    crops += [(local_out[i], cfg.local_size, cfg.local_scale, cfg.local_blur_p) for i in range(cfg.n_local)]
    for out, size, scale, blur_p in crops:
        box = crop_box(height, width, scale, cfg.ratio, rng)
        draws = draw_crop(cfg, blur_p, rng)
        resized, spare = workspace.pair((size, size, c))
        _resize_box(planes, box, size, draws.flip, resized)
        normalise(photometric(resized, draws, rng, spare), cfg, mean, inv_std, out=out)


def multicrop(image, rng: np.random.Generator, cfg: MultiCropConfig) -> dict:
    """Views of one slice: `{"global_crops": [...], "local_crops": [...]}`.

    `image` is `(H, W)` or `(H, W, C)` with intensities already in [0, 1]; each
    crop is float32 `(size, size, C_out)`, normalised with `cfg.mean/std`.
    """
    c_out = output_channels(cfg, image)
    global_out = np.empty((cfg.n_global, cfg.global_size, cfg.global_size, c_out), np.float32)
    local_out = np.empty((cfg.n_local, cfg.local_size, cfg.local_size, c_out), np.float32)
    multicrop_into(image, rng, cfg, global_out, local_out)
    return {"global_crops": list(global_out), "local_crops": list(local_out)}
