"""Single-view transforms on 2D slices: fine-tuning and MAE pretraining train on them, evaluations read them.

Classification and MAE see one view per slice, not DINOv2's multi-crop:

* ``eval``: the whole slice resized to ``size`` x ``size`` (bicubic), clipped to
  [0, 1] and normalised: deterministic, every pixel of the slice is seen;
* ``train``: a random resized crop (area fraction uniform in ``scale``, aspect
  ratio log-uniform in ``ratio``, torchvision's rule, shared with the multi-crop
  code), a horizontal flip with ``flip_p``, then the same clip and
  normalisation.

No photometric jitter: slice intensities are already normalised per volume in
the slice index, and the label may live in the intensities (a T2-bright
lesion). Pure numpy + PIL on the host; one ``np.random.Generator`` drives every
draw, so a view is a pure function of (image, generator state). Inputs are
``(H, W)`` or ``(H, W, C)`` float slices with values in [0, 1].
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from medjax.data.augment import crop_box


@dataclasses.dataclass(frozen=True)
class SingleView:
    """Output size, crop statistics and normalisation of the train and eval views."""

    size: int
    mean: tuple[float, ...] = (0.449,)
    std: tuple[float, ...] = (0.226,)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    channels: int = 1  # output channels; a 1-channel slice is repeated for a 3-channel model

    extent = "slice area"  # what ``scale`` is a fraction of (not a field)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size={self.size} must be a positive number of pixels.")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale={(lo, hi)} must satisfy 0 < low <= high <= 1 (fractions of the {self.extent}).")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={tuple(self.ratio)} must satisfy 0 < low <= high.")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p={self.flip_p} must lie in [0, 1].")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean={tuple(self.mean)} and std={tuple(self.std)} need equal lengths and std > 0.")
        if len(self.mean) not in (1, self.channels):
            raise ValueError(f"mean/std have {len(self.mean)} values for {self.channels} channels; give 1 or "
                             f"{self.channels}.")

    def eval(self, image) -> np.ndarray:
        """The whole slice as a ``(size, size, channels)`` float32 view."""
        planes, (h, w) = _planes(image)
        return self._finish(_resize(planes, (0, 0, h, w), self.size))

    def train(self, image, rng: np.random.Generator) -> np.ndarray:
        """A random resized crop of the slice, maybe flipped, as a ``(size, size, channels)`` float32 view."""
        planes, (h, w) = _planes(image)
        x = _resize(planes, crop_box(h, w, self.scale, self.ratio, rng), self.size)
        if rng.random() < self.flip_p:
            x = x[:, ::-1]
        return self._finish(x)

    def eval_batch(self, images) -> np.ndarray:
        return np.stack([self.eval(x) for x in images]) if len(images) else self._empty()

    def train_batch(self, images, rng: np.random.Generator) -> np.ndarray:
        return np.stack([self.train(x, rng) for x in images]) if len(images) else self._empty()

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.size, self.size, self.channels), np.float32)

    def _finish(self, x: np.ndarray) -> np.ndarray:
        c = x.shape[-1]
        if c != self.channels:
            if c != 1:
                raise ValueError(f"A {c}-channel slice cannot be made into {self.channels} channels.")
            x = np.repeat(x, self.channels, axis=-1)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return np.ascontiguousarray((np.clip(x, 0.0, 1.0) - mean) / std, dtype=np.float32)


def _planes(image):
    x = np.asarray(image, np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or not 1 <= x.shape[-1] <= 4:
        raise ValueError(f"image of shape {x.shape} is not a slice: pass (H, W) or (H, W, C) with C <= 4.")
    planes = [Image.fromarray(np.ascontiguousarray(x[:, :, i]), mode="F") for i in range(x.shape[-1])]
    return planes, x.shape[:2]


def _resize(planes, box, size: int) -> np.ndarray:
    """Bicubic resample of ``box`` = (top, left, h, w) of every plane to ``(size, size, C)``."""
    top, left, h, w = box
    return np.stack([np.asarray(p.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h)))
                     for p in planes], axis=-1)
