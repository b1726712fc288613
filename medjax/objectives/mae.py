"""Masked-autoencoder objective (He et al., 2022): patch layout, random masking and the loss.

Pure functions with the official MAE conventions, on channels-last images:

- a patch vector is ordered (row in patch, column in patch, channel) for NHWC images and
  (depth, row, column, channel) for NDHWC volumes -- the official ``nchpwq->nhwpqc`` layout;
  patches are in row-major grid order, as the patch embedding flattens its tokens;
- ``mask`` is 1 for removed (masked) patches and 0 for visible ones;
- the loss is the per-patch mean squared error averaged over removed patches only, computed in
  float32; with ``norm_pix_loss`` each target patch is standardised by its own mean and
  *unbiased* variance: ``(t - mean) / sqrt(var + 1e-6)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def _grid(shape: Sequence[int], patch_size: int) -> tuple:
    bad = [n for n in shape if n % patch_size]
    if bad:
        multiple = "x".join(str(n // patch_size * patch_size or patch_size) for n in shape)
        raise ValueError(f"Image size {'x'.join(map(str, shape))} is not divisible by patch_size={patch_size}; "
                         f"crop or pad it to a multiple of the patch size (e.g. {multiple}).")
    return tuple(n // patch_size for n in shape)


def patchify(imgs: Array, patch_size: int) -> Array:
    """(N, H, W, C) -> (N, L, p*p*C), or (N, D, H, W, C) -> (N, L, p**3*C), official patch layout."""
    if imgs.ndim not in (4, 5):
        raise ValueError(f"patchify takes (N, H, W, C) or (N, D, H, W, C) images, got shape {imgs.shape}.")
    n, c, p = imgs.shape[0], imgs.shape[-1], patch_size
    grid = _grid(imgs.shape[1:-1], p)
    sd = len(grid)
    # (N, g1, p, g2, p, [g3, p,] C): move the in-patch axes after the grid axes, keep C last.
    x = imgs.reshape((n,) + sum(((g, p) for g in grid), ()) + (c,))
    order = (0,) + tuple(range(1, 2 * sd, 2)) + tuple(range(2, 2 * sd + 1, 2)) + (2 * sd + 1,)
    return x.transpose(order).reshape(n, math.prod(grid), p**sd * c)


def unpatchify(x: Array, patch_size: int, *, spatial_dims: int = 2, grid: Optional[Sequence[int]] = None) -> Array:
    """Inverse of :func:`patchify`; ``grid`` (patches per side) defaults to a square / cubic grid."""
    n, length, dim = x.shape
    p, sd = patch_size, spatial_dims
    if grid is None:
        side = round(length ** (1.0 / sd))
        grid = (side,) * sd
    grid = tuple(int(g) for g in grid)
    if len(grid) != sd or math.prod(grid) != length or dim % p**sd:
        raise ValueError(f"Cannot unpatchify (N, L, dim) = {x.shape} into a {'x'.join(map(str, grid))} grid of "
                         f"{'x'.join([str(p)] * sd)} patches; pass grid= with prod(grid) == L.")
    c = dim // p**sd
    y = x.reshape((n,) + grid + (p,) * sd + (c,))
    order = (0,) + sum(((1 + i, 1 + sd + i) for i in range(sd)), ()) + (2 * sd + 1,)
    return y.transpose(order).reshape((n,) + tuple(g * p for g in grid) + (c,))


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """``int(L * (1 - mask_ratio))`` as the official code, checking the ratio leaves a visible patch."""
    ratio = float(mask_ratio)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio} must lie strictly between 0 and 1 (MAE uses 0.75).")
    keep = int(num_patches * (1 - ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves int({num_patches} * (1 - {mask_ratio})) = 0 of "
                         f"{num_patches} patches visible; lower it to at most 1 - 1/{num_patches} "
                         f"(= {1 - 1 / num_patches:.4g}) or use smaller patches.")
    return keep


def random_masking(x: Array, noise: Array, mask_ratio: float) -> tuple[Array, Array, Array, Array]:
    """Per-sample random masking by argsort of ``noise`` (N, L): the smallest-noise patches stay.

    Returns ``(x_visible (N, len_keep, D), mask (N, L) float32 with 1 = removed, ids_restore (N, L),
    ids_keep (N, len_keep))``; ``ids_restore`` undoes the shuffle as in the official code.
    """
    n, length = x.shape[:2]
    if noise.shape != (n, length):
        raise ValueError(f"noise has shape {noise.shape}; it must be (N, L) = {(n, length)}, one value per patch.")
    keep = num_visible(length, mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
    # Position in the shuffled order >= keep means removed: the official gather of [0]*keep + [1]*rest.
    mask = (ids_restore >= keep).astype(jnp.float32)
    return visible, mask, ids_restore, ids_keep


def mae_target(imgs: Array, patch_size: int, norm_pix_loss: bool = False) -> Array:
    """Float32 reconstruction target (N, L, patch_dim): pixels, or per-patch standardised pixels."""
    target = patchify(imgs.astype(jnp.float32), patch_size)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)  # unbiased, as torch's .var()
        target = (target - mean) / (var + 1e-6) ** 0.5
    return target


def mae_loss(imgs: Array, pred: Array, mask: Array, norm_pix_loss: bool = False, *,
             patch_size: Optional[int] = None) -> Array:
    """Official MAE loss: per-patch MSE, averaged over removed patches (``mask == 1``), in float32.

    ``imgs`` (N, H, W, C) or (N, D, H, W, C); ``pred`` (N, L, p**d * C) in :func:`patchify` order.
    ``patch_size`` is read from the shapes when not given.
    """
    if patch_size is None:
        sd, c, length = imgs.ndim - 2, imgs.shape[-1], pred.shape[1]
        patch_size = round((math.prod(imgs.shape[1:-1]) / length) ** (1.0 / sd))
        if patch_size**sd * c != pred.shape[-1]:
            raise ValueError(f"pred of shape {pred.shape} does not fit images of shape {imgs.shape}; "
                             "pass patch_size=.")
    target = mae_target(imgs, patch_size, norm_pix_loss)
    if target.shape != pred.shape:
        raise ValueError(f"pred has shape {pred.shape} but the patchified images have {target.shape}.")
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)
