"""Multi-crop augmentation for 3D volumes: the 2D recipe of `augment.py` with cubes for squares.

A volume is a (D, H, W) array (or (D, H, W, C)) with intensities in [0, 1];
each view is a random box resized to a cube of `global_size`**3 or
`local_size`**3 voxels. There is no official 3D DINOv2, so these are medjax's
choices, each the nearest analogue of the 2D step:

- Crop box: a fraction of the volume's voxels uniform in `global_scale` /
  `local_scale` (as 2D uses the image area), with two aspect ratios
  log-uniform in `ratio`: in-plane (W / H) and through-plane
  (D / sqrt(H * W)). Voxels are taken as isotropic (resample with
  `config.data.target_spacing` first), so a box is close to a physical cube.
  Ten tries, as torchvision; when none fits (a thin slab asked for a large
  box) the last try's box is clamped to the volume on each axis, at a random
  position, and the resize stretches it along the clamped axes.
- Resize: trilinear (`scipy.ndimage.zoom`, order 1, pixel-area grid as PIL's
  2D resize), values stay in [0, 1].
- Flip: along W, the patient's left-right axis for volumes in the axial
  display layout `pretrain_data3d` gives (never along D or H: anatomy is not
  symmetric head-feet or front-back).
- Intensity: the 2D steps (brightness/contrast, gamma, Gaussian blur over the
  three spatial axes, noise), then the same normalisation.

Output: `{"global_crops": [(S, S, S, C)] * n_global, "local_crops": [(s, s, s, C)] * n_local}`,
float32, the same keys and meaning as `augment.multicrop`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

from medjax.data.augment import MultiCropConfig, finish_crop, output_normalisation


@dataclasses.dataclass(frozen=True)
class MultiCrop3DConfig(MultiCropConfig):
    """`MultiCropConfig` for volumes: sizes are cube sides in voxels, scales are fractions of the
    volume's voxels; every other field means what it means in 2D."""

    global_size: int = 96
    local_size: int = 48


def crop_box_3d(shape, scale, ratio, rng: np.random.Generator):
    """Random box (start_d, start_h, start_w, d, h, w) inside a volume of `shape` (D, H, W); see module."""
    depth, height, width = (int(s) for s in shape[:3])
    volume = depth * height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = volume * rng.uniform(scale[0], scale[1])
        in_plane = math.exp(rng.uniform(log_lo, log_hi))  # w / h
        through = math.exp(rng.uniform(log_lo, log_hi))  # d / sqrt(h * w)
        q = (target / through) ** (1.0 / 3.0)  # sqrt(h * w); d * h * w = through * q**3 = target
        d, h, w = round(through * q), round(q / math.sqrt(in_plane)), round(q * math.sqrt(in_plane))
        if 0 < d <= depth and 0 < h <= height and 0 < w <= width:
            break
    else:
        d, h, w = min(max(d, 1), depth), min(max(h, 1), height), min(max(w, 1), width)
    starts = [int(rng.integers(0, n - c + 1)) for n, c in zip((depth, height, width), (d, h, w))]
    return (*starts, d, h, w)


def resize_box(x: np.ndarray, box, size: int) -> np.ndarray:
    """Trilinear resample of `box` of a (D, H, W, C) volume to (size, size, size, C)."""
    sd, sh, sw, d, h, w = box
    part = x[sd:sd + d, sh:sh + h, sw:sw + w]
    factors = (size / d, size / h, size / w, 1.0)
    out = ndimage.zoom(part, factors, order=1, mode="nearest", grid_mode=True)
    if out.shape[:3] != (size, size, size):  # zoom rounds the output shape; guard against a float slip
        raise AssertionError(f"resize of a {part.shape} box gave {out.shape}, not {size}^3.")
    return np.clip(out, 0.0, 1.0)


def _one_crop(x, size, scale, blur_p, cfg, rng, mean, inv_std):
    box = crop_box_3d(x.shape, scale, cfg.ratio, rng)
    return finish_crop(resize_box(x, box, size), cfg, blur_p, rng, mean, inv_std)


def _as_dhwc(volume) -> np.ndarray:
    x = np.asarray(volume, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or not 1 <= x.shape[-1] <= 4 or min(x.shape[:3]) < 1:
        raise ValueError(f"volume of shape {x.shape} is not a volume: pass (D, H, W) or (D, H, W, C) with C <= 4.")
    return x


def multicrop3d(volume, rng: np.random.Generator, cfg: MultiCropConfig) -> dict:
    """Views of one volume: `{"global_crops": [...], "local_crops": [...]}` (see module).

    `volume` is `(D, H, W)` or `(D, H, W, C)` with intensities already in [0, 1].
    """
    x = _as_dhwc(volume)
    mean, inv_std = output_normalisation(cfg, x.shape[-1], "volume")
    blur = cfg.global_blur_p
    global_crops = [
        _one_crop(x, cfg.global_size, cfg.global_scale, blur[min(i, len(blur) - 1)], cfg, rng, mean, inv_std)
        for i in range(cfg.n_global)
    ]
    local_crops = [
        _one_crop(x, cfg.local_size, cfg.local_scale, cfg.local_blur_p, cfg, rng, mean, inv_std)
        for _ in range(cfg.n_local)
    ]
    return {"global_crops": global_crops, "local_crops": local_crops}
