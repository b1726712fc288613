"""iBOT block masks, sampled per batch as the reference DINOv2 collate does.

The student sees some global crops with patches replaced by a mask token and
must predict the teacher's tokens there. Masks are BEiT-style rectangles; in a
batch of n global-crop images exactly ``int(n * mask_probability)`` are masked,
each with a ratio from its own bin of ``linspace(lo, hi, k + 1)`` so that a
batch spans the whole range of ratios.

The jitted loss needs static shapes, so masked positions are handed over as a
fixed-length index list padded to the batch's upper bound M (the reference's
``upperbound``), with per-entry weights that are zero on the padding.
"""

from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    """BEiT block masking on a (height, width) patch grid.

    Blocks have at least ``min_num_patches`` patches and a log-uniform aspect
    ratio in [min_aspect, 1/min_aspect]; each block is retried up to ten times
    and may add at most ``max_num_patches`` new patches (default: half the
    grid, as the reference training script sets it).
    """

    def __init__(self, grid: tuple[int, int], *, min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = int(grid[0]), int(grid[1])
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid={grid} must have positive sides (image size // patch size).")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_new: float, rng: np.random.Generator, blocks: list) -> int:
        """Tries up to ten rectangles; returns how many patches the first useful one added."""
        for _ in range(10):
            # Plain a + (b - a) * u: like `random.uniform`, valid when max_new < min_num_patches.
            area = self.min_num_patches + (max_new - self.min_num_patches) * rng.random()
            aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * rng.random())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                region = mask[top:top + h, left:left + w]
                new = h * w - int(region.sum())
                if 0 < new <= max_new:
                    region[...] = True
                    blocks.append((top, left, h, w))
                    return new
        return 0

    def sample_blocks(self, num_masking_patches: int, rng: np.random.Generator):
        """Mask with about ``num_masking_patches`` patches (never more), and its blocks (top, left, h, w)."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks: list[tuple[int, int, int, int]] = []
        count = 0
        while count < num_masking_patches:
            max_new = min(num_masking_patches - count, self.max_num_patches)
            delta = self._add_block(mask, max_new, rng, blocks)
            if delta == 0:
                break
            count += delta
        return mask, blocks

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """(height, width) bool mask with at most ``num_masking_patches`` True."""
        return self.sample_blocks(num_masking_patches, rng)[0]


class MaskingGenerator3D:
    """Block masking on a (depth, height, width) token grid of a 3D model: BEiT's rectangles as boxes.

    No reference exists for 3D; medjax extends the 2D rule: a block's volume is uniform in
    [min_num_patches, max_new], its in-plane aspect (w / h) and through-plane aspect (d / sqrt(h w))
    log-uniform in [min_aspect, 1 / min_aspect], every side strictly shorter than the grid's, ten
    tries per block. Masks flatten in (D, H, W) order, as the 3D patch embedding's tokens.
    """

    def __init__(self, grid: tuple[int, int, int], *, min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.shape = tuple(int(g) for g in grid)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"grid={grid} must have three positive sides (volume size // patch size).")
        self.num_patches = int(np.prod(self.shape))
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, max_new: float, rng: np.random.Generator) -> int:
        lo, hi = self.log_aspect
        for _ in range(10):
            volume = self.min_num_patches + (max_new - self.min_num_patches) * rng.random()
            in_plane = math.exp(lo + (hi - lo) * rng.random())
            through = math.exp(lo + (hi - lo) * rng.random())
            q = (volume / through) ** (1.0 / 3.0)
            sides = (round(through * q), round(q / math.sqrt(in_plane)), round(q * math.sqrt(in_plane)))
            if all(0 < s < g for s, g in zip(sides, self.shape)):
                start = [int(rng.integers(0, g - s + 1)) for s, g in zip(sides, self.shape)]
                region = mask[tuple(slice(a, a + s) for a, s in zip(start, sides))]
                new = int(np.prod(sides)) - int(region.sum())
                if 0 < new <= max_new:
                    region[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        """(depth, height, width) bool mask with at most ``num_masking_patches`` True."""
        mask = np.zeros(self.shape, dtype=bool)
        count = 0
        while count < num_masking_patches:
            delta = self._add_block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if delta == 0:
                break
            count += delta
        return mask


def _ratio_bins(n: int, mask_probability: float, mask_ratio: tuple[float, float]):
    n_masked = int(n * mask_probability)
    return n_masked, np.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1)


def mask_upper_bound(n: int, num_patches: int, mask_probability: float = 0.5,
                     mask_ratio: tuple[float, float] = (0.1, 0.5)) -> int:
    """Static bound M on the masked patches of a batch of n images: sum of int(N * bin_max)."""
    n_masked, bins = _ratio_bins(n, mask_probability, mask_ratio)
    return int(sum(int(num_patches * bins[i + 1]) for i in range(n_masked)))


def sample_batch_masks(n: int, generator: MaskingGenerator, rng: np.random.Generator,
                       mask_probability: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5)) -> np.ndarray:
    """(n, N) bool masks: int(n * p) images masked, one ratio bin each, the rest empty, shuffled."""
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability={mask_probability} must lie in [0, 1].")
    if not 0.0 <= mask_ratio[0] <= mask_ratio[1] <= 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must satisfy 0 <= low <= high <= 1.")
    n_masked, bins = _ratio_bins(n, mask_probability, mask_ratio)
    num_patches = generator.num_patches
    masks = np.zeros((n, num_patches), dtype=bool)
    for i in range(n_masked):
        target = int(num_patches * rng.uniform(bins[i], bins[i + 1]))
        masks[i] = generator(target, rng).reshape(-1)
    return masks[rng.permutation(n)]


def mask_index_arrays(masks: np.ndarray, upper_bound: int):
    """Padded flat indices and iBOT weights of the masked patches.

    Returns ``mask_indices`` int32 (M,) into the flattened (n * N) patches,
    ``mask_weights`` float32 (M,) equal to 1 / (masked patches of that image)
    and 0 on padding, and ``n_masked`` int32 () — the number of real entries.
    """
    masks = np.asarray(masks, dtype=bool)
    flat = np.flatnonzero(masks.reshape(-1))
    if flat.size > upper_bound:
        raise ValueError(f"{flat.size} masked patches exceed the upper bound M={upper_bound}; "
                         "compute M with mask_upper_bound for the same batch and ratios.")
    per_image = masks.sum(axis=1)
    weights = (1.0 / np.maximum(per_image, 1)).astype(np.float32)
    indices = np.zeros(upper_bound, np.int32)
    mask_weights = np.zeros(upper_bound, np.float32)
    indices[:flat.size] = flat
    mask_weights[:flat.size] = weights[flat // masks.shape[1]]
    return indices, mask_weights, np.asarray(flat.size, np.int32)
