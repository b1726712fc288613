"""A segmentation mask (label map) as it comes -> integer labels on its image's grid, or one sentence.

Masks arrive from annotation tools on their own grid (another field of view, a
coarser spacing), with values such as 255 for the structure. A mask is taken
onto its image's grid only when asked (``resample``), always with nearest
neighbour so labels stay labels, and its values are mapped (``values``, e.g.
{255: 1}) before the check that every value is an integer label 0..255;
anything else is refused naming the CSV line, the files and the config key.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from medjax.data.manifest import ManifestError

_SPACING_TOL = 1e-3  # mm: masks and images on the same grid agree far better than this
_SHOWN_VALUES = 5  # bad mask values listed in a message


def check_mask_values(values: Mapping | None) -> dict[float, int]:
    """``{stored mask value: label}`` with numeric keys and labels 0..255; ValueError naming the bad pair."""
    out = {}
    for key, label in (values or {}).items():
        try:
            source = float(key)
        except (TypeError, ValueError):
            source = float("nan")
        if not np.isfinite(source) or isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
                or not 0 <= label <= 255:
            raise ValueError(f"mask_values maps {key!r} to {label!r}; it must map stored mask values (numbers) to "
                             "integer labels 0..255, e.g. {\"255\": 1}.")
        out[source] = int(label)
    return out


def _mask_onto_image(data, shape: tuple, mdata, mask: np.ndarray) -> np.ndarray:
    """``mask`` resampled with nearest neighbour onto the image grid of ``shape``.

    Volumes go through their affines (millimetres), so a mask with another field of view
    lands where it was drawn, with background where it has no voxel; 2D images carry no
    geometry, so the mask is taken to cover the same field of view and is stretched.
    """
    if data.affine is not None and mdata.affine is not None:
        image_to_mask = np.linalg.inv(mdata.affine) @ data.affine
        return ndimage.affine_transform(mask, image_to_mask[:3, :3], image_to_mask[:3, 3], output_shape=shape,
                                        order=0, mode="grid-constant", cval=0.0)  # a voxel spans +-0.5
    index = [np.minimum(((np.arange(n) + 0.5) * (m / n)).astype(np.int64), m - 1) for n, m in zip(shape, mask.shape)]
    return mask[np.ix_(*index)]


def fit_mask(row, data, image, mdata, mask, *, resample: bool = False,
             values: Mapping[float, int] | None = None) -> tuple[np.ndarray, bool]:
    """``(uint8 labels on the image grid, whether they were resampled)`` of a row's mask, or one sentence.

    ``data``/``mdata`` are the image's and the mask's ImageData, ``image``/``mask`` their arrays.
    A mask on another grid (shape or spacing) is resampled with nearest neighbour when
    ``resample`` is set and refused otherwise; ``values`` maps stored values to labels
    before the check that every value is an integer label 0..255.
    """
    same_grid = image.shape == mask.shape and len(data.spacing) == len(mdata.spacing) and np.allclose(
        data.spacing, mdata.spacing, rtol=0.0, atol=_SPACING_TOL)
    if not same_grid and not resample:
        mm = [", ".join(f"{s:.5g}" for s in d.spacing) for d in (mdata, data)]
        raise ManifestError(
            f"line {row.line}: mask {row.mask_path} (shape {mask.shape}, spacing ({mm[0]})) does "
            f"not match image {row.path} (shape {image.shape}, spacing ({mm[1]})); resample the "
            "mask onto the image grid with nearest-neighbour interpolation, or set config.data.mask_resample=True "
            "to have it done when the files are read.", {"mask_mismatch": [row.line]})
    if not same_grid:
        mask = _mask_onto_image(data, image.shape, mdata, mask)
    if values:
        mapped = mask.copy()
        for source, label in values.items():
            mapped[mask == source] = label
        mask = mapped
    bad = mask[(mask < 0) | (mask > 255) | (mask != np.round(mask))]
    if bad.size:
        distinct = np.unique(bad)
        listed = ", ".join(f"{v:g}" for v in distinct[:_SHOWN_VALUES]) + (
            f" and {len(distinct) - _SHOWN_VALUES} more" if len(distinct) > _SHOWN_VALUES else "")
        raise ManifestError(
            f"line {row.line}: mask {row.mask_path} holds values other than integers 0..255 ({listed}; range "
            f"{mask.min():g}..{mask.max():g}); masks must be label maps: map such values to labels with "
            "config.data.mask_values (JSON, e.g. '{\"255\": 1}') and resample masks with nearest neighbour only.",
            {"mask_values": [row.line]})
    return mask.astype(np.uint8), not same_grid
