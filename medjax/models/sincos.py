"""Fixed sine-cosine positional embeddings (MAE), in numpy float64.

2D follows the official MAE table exactly: the first half of the channels encodes the *column*
index and the second half the *row* index (the reference meshgrid puts the width axis first), each
half as ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 1 / 10000 ** (i / (D / 4))``;
tokens are in row-major (H, W) order and the optional CLS row is all zeros.

3D extends that layout: the channels are split into three equal thirds for the W, H and D
indices (fastest-varying grid axis first, as the 2D table does), each third again half sine,
half cosine. ``embed_dim`` must therefore be a multiple of 6. Tokens are in (D, H, W) order, as
the 3D patch embedding flattens them.

Tables are float64 (as the reference computes them); cast when storing them as params.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

Grid = Union[int, Sequence[int]]


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M, embed_dim) table ``[sin(p * omega), cos(p * omega)]`` for the flattened ``positions``."""
    if embed_dim % 2:
        raise ValueError(f"A sin-cos embedding needs an even number of channels, got {embed_dim}.")
    omega = 1.0 / 10000.0 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(np.asarray(positions, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def _sides(grid_size: Grid, n: int) -> tuple:
    sides = (int(grid_size),) * n if np.isscalar(grid_size) else tuple(int(g) for g in grid_size)
    if len(sides) != n or min(sides) < 1:
        raise ValueError(f"grid_size={grid_size!r} must be a positive int or {n} positive sides.")
    return sides


def _with_cls(table: np.ndarray, cls_token: bool) -> np.ndarray:
    if not cls_token:
        return table
    return np.concatenate([np.zeros((1, table.shape[1])), table], axis=0)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Grid, cls_token: bool = False) -> np.ndarray:
    """(gh*gw [+1], embed_dim) table equal to the official MAE ``get_2d_sincos_pos_embed``.

    ``grid_size`` is the side of a square grid (as the reference) or ``(gh, gw)``. With
    ``cls_token`` a zero row is prepended for the CLS token.
    """
    if embed_dim % 4:
        raise ValueError(f"A 2D sin-cos embedding needs embed_dim divisible by 4 (sine and cosine for two axes), "
                         f"got {embed_dim}.")
    gh, gw = _sides(grid_size, 2)
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    table = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    return _with_cls(table, cls_token)


def get_3d_sincos_pos_embed(embed_dim: int, grid_size: Grid, cls_token: bool = False) -> np.ndarray:
    """(gd*gh*gw [+1], embed_dim) table: thirds of the channels for the W, H and D indices.

    ``grid_size`` is the side of a cubic grid or ``(gd, gh, gw)``; tokens are in (D, H, W) order.
    """
    if embed_dim % 6:
        lower, upper = embed_dim // 6 * 6, embed_dim // 6 * 6 + 6
        raise ValueError(f"A 3D sin-cos embedding needs embed_dim divisible by 6 (sine and cosine for three "
                         f"axes), got {embed_dim}; use e.g. {lower or upper} or {upper}.")
    gd, gh, gw = _sides(grid_size, 3)
    depth, rows, cols = np.meshgrid(np.arange(gd), np.arange(gh), np.arange(gw), indexing="ij")
    third = embed_dim // 3
    table = np.concatenate([sincos_1d(third, cols), sincos_1d(third, rows), sincos_1d(third, depth)], axis=1)
    return _with_cls(table, cls_token)


def sincos_pos_embed(embed_dim: int, grid_size: Grid, spatial_dims: int = 2, cls_token: bool = True) -> np.ndarray:
    """The 2D or 3D table by ``spatial_dims``, with the CLS row by default (MAE's layout)."""
    if spatial_dims == 2:
        return get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token)
    if spatial_dims == 3:
        return get_3d_sincos_pos_embed(embed_dim, grid_size, cls_token)
    raise ValueError(f"spatial_dims={spatial_dims} must be 2 or 3.")
