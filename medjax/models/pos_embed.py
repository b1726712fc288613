"""Positional-embedding resampling that reproduces PyTorch's bicubic ``F.interpolate``.

Official DINOv2 weights were trained with torch's bicubic resize of the patch grid, and the two
flavours it uses differ (cubic coefficient, border rule, how coordinates are derived), so
``jax.image.resize`` would shift every pretrained model's features. Grid sizes are static, so the
separable 1-D interpolation matrices are built in numpy at trace time and applied with an einsum.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel with coefficient ``a``."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _plain_bicubic_matrix(n_in: int, n_out: int, ratio: float) -> np.ndarray:
    """Torch ``bicubic`` without antialias: a = -0.75, border taps clamped to the edge.

    ``ratio`` is input/output step; torch evaluates the source coordinate in float32.
    """
    ratio32 = np.float32(ratio)
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = float(ratio32 * np.float32(i + 0.5) - np.float32(0.5))
        base = min(math.floor(src), n_in - 1)
        t = min(max(src - base, 0.0), 1.0)
        taps = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
        for k, tap in enumerate(taps):
            w[i, min(max(base - 1 + k, 0), n_in - 1)] += tap
    return w


def _antialias_bicubic_matrix(n_in: int, n_out: int, ratio: float) -> np.ndarray:
    """Torch ``bicubic`` with ``antialias=True``: a = -0.5, kernel widened by ``ratio`` when
    downsampling, out-of-range taps dropped and the remaining weights renormalised."""
    support = 2.0 * ratio if ratio >= 1.0 else 2.0
    inv = 1.0 / ratio if ratio >= 1.0 else 1.0
    w = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = ratio * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
        w[i, lo:hi] = taps / taps.sum()
    return w


def bicubic_matrix(n_in: int, n_out: int, *, antialias: bool, scale_factor: float | None = None) -> np.ndarray:
    """(n_out, n_in) matrix equal to torch's 1-D bicubic resize (align_corners=False).

    With ``scale_factor`` torch derives coordinates from it (not from the sizes); otherwise from
    ``n_in / n_out``.
    """
    ratio = 1.0 / scale_factor if scale_factor is not None else n_in / n_out
    if antialias:
        return _antialias_bicubic_matrix(n_in, n_out, ratio)
    return _plain_bicubic_matrix(n_in, n_out, ratio)


def _axis_matrices(m: int, grid: Sequence[int], *, antialias: bool, offset: float) -> list:
    """One (g, m) resize matrix per axis of ``grid``, with the official offset rule (see below)."""
    mats = []
    for g in grid:
        if offset:
            scale = (g + offset) / m
            mats.append(bicubic_matrix(m, math.floor(m * scale), antialias=antialias, scale_factor=scale))
        else:
            mats.append(bicubic_matrix(m, g, antialias=antialias))
    got = tuple(w.shape[0] for w in mats)
    if got != tuple(grid):
        sides = "x".join([str(m)] * len(grid))
        raise ValueError(f"interpolate_offset={offset} maps a {sides} grid to {'x'.join(map(str, got))}, "
                         f"not {'x'.join(map(str, grid))}.")
    return mats


def interpolate_pos_embed(
    pos_embed: jnp.ndarray,
    grid: Sequence[int],
    *,
    antialias: bool,
    offset: float,
) -> jnp.ndarray:
    """Resample a ``(1, 1 + M*M, D)`` CLS+patch positional embedding to a ``(gh, gw)`` patch grid.

    Same rule as the official backbone: offset != 0 passes the scale factor ``(g + offset) / M``
    (output size floor(M * scale)), offset == 0 passes the target size. The CLS entry is kept.
    The official code compares pixel sizes to decide when to skip; comparing grids instead only
    differs for non-square images whose patch grid still equals the built one.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a square grid; cannot interpolate.")
    gh, gw = int(grid[0]), int(grid[1])
    if (gh, gw) == (m, m):
        return pos_embed
    wh, ww = _axis_matrices(m, (gh, gw), antialias=antialias, offset=offset)
    pe = pos_embed.astype(jnp.float32)
    patches = pe[0, 1:].reshape(m, m, -1)
    out = jnp.einsum(
        "ia,jb,abd->ijd",
        jnp.asarray(wh, jnp.float32),
        jnp.asarray(ww, jnp.float32),
        patches,
        precision="highest",
    )
    return jnp.concatenate([pe[:, :1], out.reshape(1, gh * gw, -1)], axis=1).astype(pos_embed.dtype)


def interpolate_pos_embed_3d(
    pos_embed: jnp.ndarray,
    grid: Sequence[int],
    *,
    antialias: bool,
    offset: float,
) -> jnp.ndarray:
    """Resample a ``(1, 1 + M**3, D)`` CLS+patch positional embedding to a ``(gd, gh, gw)`` patch grid.

    There is no official 3D DINOv2, so this is medjax's choice: tricubic as the separable product of
    the same 1-D kernels the 2D path uses (torch's bicubic rule, with the model's ``antialias`` and
    ``offset``), so each axis of a 3D model resizes as a 2D model's axes do. Patch positions are
    flattened in (D, H, W) order, as the 3D patch embedding flattens its tokens.
    """
    n = pos_embed.shape[1] - 1
    m = round(n ** (1.0 / 3.0))
    if m**3 != n:
        raise ValueError(f"pos_embed holds {n} patch positions, not a cubic grid; cannot interpolate in 3D.")
    target = tuple(int(g) for g in grid)
    if len(target) != 3:
        raise ValueError(f"grid={grid} must have three sides (D, H, W) for a 3D positional embedding.")
    if target == (m, m, m):
        return pos_embed
    wd, wh, ww = (jnp.asarray(w, jnp.float32) for w in _axis_matrices(m, target, antialias=antialias,
                                                                      offset=offset))
    pe = pos_embed.astype(jnp.float32)
    patches = pe[0, 1:].reshape(m, m, m, -1)
    out = jnp.einsum("ia,jb,kc,abcd->ijkd", wd, wh, ww, patches, precision="highest")
    flat = out.reshape(1, math.prod(target), -1)
    return jnp.concatenate([pe[:, :1], flat], axis=1).astype(pos_embed.dtype)
