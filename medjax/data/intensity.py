"""Intensity normalisation chosen per dataset, and resampling to a target spacing.

CT values are Hounsfield units, an absolute scale, so a CT dataset is windowed (a level
and width in HU that show the tissue of interest). MRI and X-ray have no absolute scale:
they are clipped at per-image percentiles and rescaled (or z-scored). The config names
the method per dataset as a small dict, and :func:`normalise` returns, besides the
array, a JSON-able record of the exact transform applied so it can be logged and
repeated.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from medjax.readers.image_data import ImageData

# name -> (level, width) in Hounsfield units; the usual radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40, 400),
    "lung": (-600, 1500),
    "brain": (40, 80),
    "bone": (400, 1800),
    "liver": (60, 160),
    "mediastinum": (50, 350),
    "subdural": (75, 215),
    "stroke": (40, 40),
}

# method -> the spec keys it accepts besides "method"; a typo in a config is an error.
_METHODS: dict[str, set[str]] = {
    "ct_window": {"preset", "level", "width"},
    "percentile": {"low", "high", "nonzero"},
    "percentile_zscore": {"low", "high", "nonzero"},
    "zscore": {"nonzero"},
}


def window(x: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map [level - width/2, level + width/2] linearly onto [0, 1], clipping outside."""
    if not width > 0:
        raise ValueError(f"window width must be positive, got {width}.")
    low = level - width / 2.0
    return np.clip((np.asarray(x, dtype=np.float32) - np.float32(low)) / np.float32(width), 0.0, 1.0)


def percentile_clip(x: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip at this image's ``low``/``high`` percentiles and rescale that range to [0, 1]."""
    return _percentile(np.asarray(x, dtype=np.float32), low, high, None)[0]


def zscore(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation over this image (a constant image becomes zeros)."""
    return _zscore(np.asarray(x, dtype=np.float32), None)[0]


def normalise(x: np.ndarray, spec: dict) -> tuple[np.ndarray, dict]:
    """Normalise ``x`` as ``spec`` says; return the float32 result and the transform applied.

    spec examples: ``{"method": "ct_window", "preset": "soft_tissue"}``,
    ``{"method": "ct_window", "level": 50, "width": 350}``,
    ``{"method": "percentile", "low": 0.5, "high": 99.5}`` (MRI/X-ray default, output in
    [0, 1]), ``{"method": "percentile_zscore", "low": 0.5, "high": 99.5}`` (clip, then
    z-score), ``{"method": "zscore"}``. ``"nonzero": True`` takes the statistics from
    nonzero voxels only and leaves zero voxels at 0 (skull-stripped MRI, whose background
    would otherwise dominate the percentiles).
    """
    spec = dict(spec)
    method = spec.pop("method", None)
    if method not in _METHODS:
        raise ValueError(f"unknown normalisation method {method!r}; valid methods: {', '.join(sorted(_METHODS))}.")
    unknown = set(spec) - _METHODS[method]
    if unknown:
        raise ValueError(
            f"normalisation {method!r} got unknown keys {sorted(unknown)}; valid keys: {sorted(_METHODS[method])}."
        )
    x = np.asarray(x, dtype=np.float32)
    if method == "ct_window":
        level, width, preset = _window_params(spec)
        info = {"method": method, "level": level, "width": width}
        if preset is not None:
            info["preset"] = preset
        return window(x, level, width), info
    mask = (x != 0) if spec.get("nonzero", False) else None
    info = {"method": method, "nonzero": bool(spec.get("nonzero", False))}
    if method == "zscore":
        out, mean, std = _zscore(x, mask)
        return out, {**info, "mean": mean, "std": std}
    low, high = float(spec.get("low", 0.5)), float(spec.get("high", 99.5))
    out, low_value, high_value = _percentile(x, low, high, mask)
    info.update(low=low, high=high, low_value=low_value, high_value=high_value)
    if method == "percentile_zscore":  # z-score of the clipped values, mean/std in the input's units
        out, mean, std = _zscore(np.clip(x, np.float32(low_value), np.float32(high_value)), mask)
        info.update(mean=mean, std=std)
    return out, info


def _window_params(spec: dict) -> tuple[float, float, str | None]:
    if "preset" in spec:
        if "level" in spec or "width" in spec:
            raise ValueError("give a CT window either as a preset or as level and width, not both.")
        preset = spec["preset"]
        if preset not in CT_WINDOWS:
            raise ValueError(f"unknown CT window preset {preset!r}; valid presets: {', '.join(sorted(CT_WINDOWS))}.")
        level, width = CT_WINDOWS[preset]
        return float(level), float(width), preset
    if "level" not in spec or "width" not in spec:
        raise ValueError(f"a CT window needs a preset ({', '.join(sorted(CT_WINDOWS))}) or both level and width.")
    return float(spec["level"]), float(spec["width"]), None


def _stats_values(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The voxels statistics are taken from: finite ones (inside the mask, if any)."""
    keep = np.isfinite(x) if mask is None else (np.isfinite(x) & mask)
    return x[keep]


def _percentile(x, low, high, mask):
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}.")
    values = _stats_values(x, mask)
    if values.size == 0:
        return np.zeros_like(x), 0.0, 0.0
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    out = np.zeros_like(x) if hi <= lo else np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)
    if mask is not None:
        out = np.where(mask, out, np.float32(0.0))
    return out.astype(np.float32), lo, hi


def _zscore(x, mask):
    values = _stats_values(x, mask).astype(np.float64)
    mean = float(values.mean()) if values.size else 0.0
    std = float(values.std()) if values.size else 0.0
    out = (x - np.float32(mean)) / np.float32(std if std > 0 else 1.0)
    if mask is not None:
        out = np.where(mask, out, np.float32(0.0))
    return out.astype(np.float32), mean, std


def resample(image: ImageData, target_spacing, order: int = 1) -> ImageData:
    """Resample ``image`` to ``target_spacing`` mm (one value per spatial axis).

    Use ``order=1`` (linear) or 3 for images and ``order=0`` (nearest) for masks, so
    label values stay labels. The output grid keeps the first voxel's centre in place and
    steps exactly by the target spacing; samples past the last input voxel repeat the
    edge. The affine (volumes) and spacing are updated; trailing channel or time axes are
    resampled one by one.
    """
    source = np.asarray(image.spacing, dtype=np.float64)
    target = np.asarray([float(s) for s in target_spacing], dtype=np.float64)
    if target.shape != source.shape or not np.all(target > 0):
        raise ValueError(
            f"target_spacing must be {source.size} positive values (one per spatial axis), got {list(target_spacing)}."
        )
    step = target / source  # input voxels per output voxel
    spatial = image.array.shape[: source.size]
    out_shape = tuple(max(1, int(round(n / s))) for n, s in zip(spatial, step))
    extra = image.array.shape[source.size :]
    out = np.empty(out_shape + extra, dtype=np.float32)
    for index in np.ndindex(*extra):
        src = image.array[(Ellipsis, *index)] if extra else image.array
        out[(Ellipsis, *index)] = ndimage.affine_transform(
            src.astype(np.float32, copy=False), step, output_shape=out_shape, order=order, mode="nearest"
        )
    affine = None
    if image.affine is not None:
        affine = image.affine.copy()
        affine[:3, : source.size] = image.affine[:3, : source.size] * step
    meta = {**image.meta, "resampled_from": [float(s) for s in source], "resample_order": int(order)}
    return dataclasses.replace(image, array=out, spacing=tuple(float(t) for t in target), affine=affine, meta=meta)
