"""Single-view transforms for supervised training and evaluation on 3D volumes.

``SingleView`` with cubes for squares, for (D, H, W) volumes in the
axial display layout of ``medjax.data.sources`` (W = left-right):

* ``eval``: the whole volume resized to ``size``**3 (trilinear, as the 3D
  multi-crop resizes), clipped to [0, 1] and normalised. An axis shorter or
  longer than the others is stretched, as in the pretraining crops;
* ``train``: a random box (fraction of the voxels uniform in ``scale``,
  in-plane and through-plane aspect ratios log-uniform in ``ratio``: the 3D
  multi-crop's ``crop_box_3d``, drawn relative to the volume's extent, see
  ``relative_box``), resized the same way, flipped along W with ``flip_p``
  (never along D or H: anatomy is not symmetric head-feet or front-back), then
  the same clip and normalisation.

Why relative boxes: the multi-crop draws near-cubes of voxels, which a thin
slab (the demo's 16 x 75 x 75) cannot hold, so they are clamped to all 16
slices and ~40 of the 75 rows and columns whatever ``scale`` asks: every
training view is a zoomed-in centre while the eval view is the whole volume.
Drawn on the volume's extent, ``scale=(1, 1), ratio=(1, 1)`` is exactly the
eval view, and the fraction of voxels is the one asked for. (On the 3D demo,
val balanced accuracy of the contrast head after 120 steps: 0.75 with voxel
boxes, 0.96 with relative ones.)

Pure numpy + scipy on the host; one ``np.random.Generator`` drives every draw.
Inputs are ``(D, H, W)`` or ``(D, H, W, C)`` float volumes with values in [0, 1];
views are ``(size, size, size, channels)`` float32.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from medjax.data.augment3d import crop_box_3d, resize_box
from medjax.data.views import SingleView

_GRID = 1000  # the volume's extent as a 1000^3 grid for the box sampler (0.1 % resolution)


@dataclasses.dataclass(frozen=True)
class SingleView3D(SingleView):
    """The 2D fields, read for volumes: ``size`` is a cube side, ``scale`` a fraction of the voxels."""

    extent = "volume's voxels"

    def eval(self, volume) -> np.ndarray:
        x = _dhwc(volume)
        return self._finish(resize_box(x, (0, 0, 0) + x.shape[:3], self.size))

    def train(self, volume, rng: np.random.Generator) -> np.ndarray:
        x = _dhwc(volume)
        view = resize_box(x, relative_box(x.shape, self.scale, self.ratio, rng), self.size)
        if rng.random() < self.flip_p:
            view = view[:, :, ::-1]
        return self._finish(view)

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.size, self.size, self.size, self.channels), np.float32)


def relative_box(shape, scale, ratio, rng: np.random.Generator):
    """A box (start_d, start_h, start_w, d, h, w) of a volume of ``shape``: ``crop_box_3d`` on a cube standing
    for the volume's extent, mapped to its voxels (sides and aspects relative to the volume's sides)."""
    drawn = crop_box_3d((_GRID,) * 3, scale, ratio, rng)
    starts, sizes = [], []
    for n, start, side in zip(shape[:3], drawn[:3], drawn[3:]):
        size = min(n, max(1, round(side * n / _GRID)))
        starts.append(min(round(start * n / _GRID), n - size))
        sizes.append(size)
    return (*starts, *sizes)


def _dhwc(volume) -> np.ndarray:
    x = np.asarray(volume, np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or not 1 <= x.shape[-1] <= 4 or min(x.shape[:3]) < 1:
        raise ValueError(f"image of shape {x.shape} is not a volume: pass (D, H, W) or (D, H, W, C) with C <= 4.")
    return x
