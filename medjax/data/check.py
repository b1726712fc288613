"""Checks a manifest before any training: reads every row and says what is there and what is wrong.

    python -m medjax.data.check MANIFEST.csv [--preview DIR] [--dump DIR]
        [--label-columns lesion] [--ignore-columns contrast,series_description]
        [--normalisation '{"method": "percentile", "low": 0.5, "high": 99.5}'] [--axis axial]

Prints a summary (patients, series, slices, shapes, spacing, orientation,
intensity ranges, problems); ``--preview`` writes PNGs of three slices per row;
``--dump`` writes each row's normalised array (.npy) and a JSON of its metadata
(spacing, orientation, intensity transform). Exit status 1 when any row is bad.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import numpy as np

from medjax.data.intensity import normalise
from medjax.data.manifest import ManifestError, load_manifest
from medjax.readers import ImageReadError, axcodes, read_image
from medjax.data.slices import AXES, DEFAULT_NORMALISATION, display_slice


def _row_name(row) -> str:
    return f"line{row.line:04d}_{''.join(c if c.isalnum() or c in '-_' else '_' for c in row.patient_id)}"


def _orientation(image) -> str:
    return axcodes(image.affine) if image.affine is not None else "2D"


def _save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image

    lo, hi = float(np.min(array)), float(np.max(array))
    scaled = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
    Image.fromarray((np.clip(scaled, 0, 1) * 255).astype(np.uint8)).save(path)


def _preview_slices(array: np.ndarray, is_volume: bool, axis) -> list[tuple[int, np.ndarray]]:
    if not is_volume:
        return [(0, array if array.ndim == 2 else array.mean(axis=-1))]
    n = array.shape[AXES[axis] if isinstance(axis, str) else axis]
    picks = sorted({int(n * f) for f in (0.25, 0.5, 0.75)})
    return [(k, display_slice(array, axis, k)) for k in picks]


def check_row(row, *, normalisation: dict, axis, preview_dir=None, dump_dir=None) -> dict:
    """Reads one row (and its mask); returns its facts, or raises ImageReadError."""
    image = read_image(row.path, series_uid=row.series_uid)
    array, transform = normalise(image.array, normalisation)
    facts = {
        "line": row.line,
        "patient_id": row.patient_id,
        "split": row.split,
        "path": row.path,
        "format": image.meta.get("format"),
        "series_uid": image.meta.get("series_uid"),
        "shape": list(image.array.shape),
        "spacing": [round(float(s), 4) for s in image.spacing],
        "orientation": _orientation(image),
        "raw_range": [float(np.min(image.array)), float(np.max(image.array))],
        "warnings": list(image.meta.get("warnings", [])),
        "transform": transform,
        "axis": axis,
        # records a slice index gives along `axis`: the RAS+ array's axis it names (a 2D image is one)
        "slices": int(image.array.shape[AXES[axis] if isinstance(axis, str) else axis]) if image.is_volume else 1,
    }
    if row.mask_path:
        mask = read_image(row.mask_path)
        if mask.array.shape != image.array.shape:
            raise ImageReadError(
                f"{row.mask_path}: mask shape {mask.array.shape} differs from its image {row.path} "
                f"{image.array.shape}; resample the mask onto the image grid (nearest neighbour)."
            )
        facts["mask_labels"] = sorted(int(v) for v in np.unique(mask.array))
    name = _row_name(row)
    if preview_dir:
        for k, plane in _preview_slices(array, image.is_volume, axis):
            _save_png(plane, os.path.join(preview_dir, f"{name}_slice{k:03d}.png"))
    if dump_dir:
        np.save(os.path.join(dump_dir, f"{name}.npy"), array.astype(np.float32))
        with open(os.path.join(dump_dir, f"{name}.json"), "w") as f:
            json.dump({**facts, "affine": None if image.affine is None else image.affine.tolist()}, f, indent=2)
    return facts


def summarise(facts: list[dict], problems: list[str], manifest) -> str:
    lines = [f"manifest: {manifest.csv_path}"]
    splits = collections.Counter(r.split for r in manifest)
    lines.append(f"rows: {len(manifest)} ({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}); "
                 f"patients: {len(manifest.patients())}")
    if facts:
        series = {f["series_uid"] or f["path"] for f in facts}
        slices = sum(f["slices"] for f in facts)
        axes = "/".join(sorted({str(f["axis"]) for f in facts}))
        shapes = collections.Counter(tuple(f["shape"]) for f in facts)
        orient = collections.Counter(f["orientation"] for f in facts)
        spacing = np.array([f["spacing"][:2] + f["spacing"][2:3] for f in facts if len(f["spacing"]) == 3])
        lo = min(f["raw_range"][0] for f in facts)
        hi = max(f["raw_range"][1] for f in facts)
        lines.append(f"series/images read: {len(series)}; 2D slices ({axes}): {slices}")
        lines.append("shapes: " + ", ".join(f"{'x'.join(map(str, s))} ({n})" for s, n in shapes.most_common(5)))
        if len(spacing):
            lines.append("volume spacing (mm): " + ", ".join(
                f"axis {i} {spacing[:, i].min():.3g}-{spacing[:, i].max():.3g}" for i in range(3)))
        lines.append("orientation: " + ", ".join(f"{k} ({v})" for k, v in orient.most_common()))
        lines.append(f"raw intensity range: {lo:.6g} to {hi:.6g}")
        warned = [f for f in facts if f["warnings"]]
        for f in warned[:10]:
            lines.append(f"warning, line {f['line']} ({f['path']}): {'; '.join(f['warnings'])}")
    if problems:
        lines.append(f"PROBLEMS: {len(problems)} bad row(s)")
        lines += [f"  {p}" for p in problems]
    else:
        lines.append("problems: none")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medjax.data.check", description=__doc__.split("\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("--preview", help="folder for PNG previews of a few slices per row")
    parser.add_argument("--dump", help="folder for each row's normalised array (.npy) and metadata (.json)")
    parser.add_argument("--label-columns", default="", help="comma-separated label columns")
    parser.add_argument("--ignore-columns", default="", help="comma-separated extra columns to accept")
    parser.add_argument("--normalisation", default=json.dumps(DEFAULT_NORMALISATION), help="JSON spec")
    parser.add_argument("--axis", default="axial", choices=sorted(AXES))
    args = parser.parse_args(argv)
    split = lambda s: tuple(c for c in s.split(",") if c)  # noqa: E731
    try:
        manifest = load_manifest(args.manifest, label_columns=split(args.label_columns),
                                 ignore_columns=split(args.ignore_columns))
        spec = json.loads(args.normalisation)
        normalise(np.zeros((2, 2), np.float32) + np.arange(4).reshape(2, 2), spec)  # validates the spec
    except (ManifestError, ValueError, FileNotFoundError) as e:
        print(f"medjax.data.check: error: {e}", file=sys.stderr)
        return 1
    for folder in (args.preview, args.dump):
        if folder:
            os.makedirs(folder, exist_ok=True)
    facts, problems = [], []
    for row in manifest:
        try:
            facts.append(check_row(row, normalisation=spec, axis=args.axis,
                                   preview_dir=args.preview, dump_dir=args.dump))
        except ImageReadError as e:
            problems.append(f"line {row.line} (patient {row.patient_id!r}): {e}")
    print(summarise(facts, problems, manifest))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
