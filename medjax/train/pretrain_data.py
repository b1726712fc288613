"""The pretraining trainer's view of the data: a Grain iterator of multi-crop batches as global arrays.

It picks the source (the user's manifest, or the built-in demo dataset when
``config.data.manifest`` is empty, which it says), builds the Grain pipeline
for this process's share of the global batch, and places each host batch on
the mesh with the batch dimension split over the devices.
"""

from __future__ import annotations

import json
import os

import jax

from medjax import sharding
from medjax.data import pipeline
from medjax.data.augment import MultiCropConfig
from medjax.data.cache import CachedRecords, cache_is_valid, write_cache
from medjax.data.demo import write_demo_dataset
from medjax.data.manifest import load_manifest
from medjax.data.slices import SliceIndex

# Batch entries split over devices along their first axis; the iBOT buffers are whole on every device.
_SPLIT_KEYS = ("global_crops", "local_crops", "masks")


def crop_config(config) -> MultiCropConfig:
    crops = dict(config.crops)
    for key, value in crops.items():
        if isinstance(value, list):
            crops[key] = tuple(value)
    try:
        return MultiCropConfig(channels=config.model.in_chans, **crops)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.crops is not valid: {e}") from None


def demo_manifest(config, workdir: str, say=None) -> str:
    """Writes the built-in demo dataset (real DICOM series + NIfTI masks) once; returns its manifest."""
    d = config.data
    out = d.demo_dir or os.path.join(workdir, "demo_data")
    manifest = os.path.join(out, "manifest.csv")
    fingerprint = {"patients": d.demo_patients, "image_size": d.demo_image_size, "slices": d.demo_slices,
                   "seed": config.seed}
    stamp = os.path.join(out, "demo.json")
    current = os.path.exists(stamp) and json.load(open(stamp)) == fingerprint
    if not current and jax.process_index() == 0:
        if say:
            say(f"config.data.manifest is empty: writing the built-in demo dataset ({d.demo_patients} synthetic "
                f"brain-MRI patients, T1/T2/FLAIR DICOM series) to {out} ...")
        write_demo_dataset(out, num_patients=d.demo_patients, seed=config.seed, image_size=d.demo_image_size,
                           slices=d.demo_slices)
        with open(stamp, "w") as f:
            json.dump(fingerprint, f)
    elif say:
        say(f"config.data.manifest is empty: using the built-in demo dataset in {out}.")
    return manifest


DEMO_COLUMNS = ("lesion", "contrast", "series_description")  # the demo manifest's label and extra columns


def slice_source(config, manifest_path: str, split: str, *, label_columns=(), extra_columns=(), say=None):
    """The slices of one split of a manifest (through the slice cache when config.data.cache_dir is set)."""
    d = config.data
    try:
        normalisation = json.loads(d.normalisation)
    except json.JSONDecodeError as e:
        raise ValueError(f"config.data.normalisation is not valid JSON ({e.msg}): {d.normalisation!r}.") from None
    ignore = tuple(c for c in d.extra_columns.split(",") if c) + tuple(extra_columns)
    manifest = load_manifest(manifest_path, label_columns=label_columns,
                             ignore_columns=tuple(c for c in ignore if c not in label_columns))
    rows = manifest.split(split)
    if not len(rows):
        raise ValueError(f"The manifest {manifest_path} has no rows in the {split!r} split; add some or fix "
                         "its split column.")
    fingerprint = {"manifest": os.path.abspath(manifest_path), "mtime": os.path.getmtime(manifest_path),
                   "split": split, "axis": d.slice_axis, "normalisation": normalisation,
                   "skip_background": d.skip_background, "labels": list(label_columns),
                   "target_spacing": list(d.target_spacing)}
    if d.cache_dir and cache_is_valid(d.cache_dir, fingerprint):
        return CachedRecords(d.cache_dir, fingerprint=fingerprint)
    index = SliceIndex(rows, axis=d.slice_axis, skip_background=d.skip_background, normalisation=normalisation,
                       label_columns=label_columns, skip_bad=d.skip_bad, target_spacing=tuple(d.target_spacing),
                       cache_volumes=d.volumes_in_memory)
    if say:
        say(f"{split} split: {len(rows)} series of {len(rows.patients())} patients -> {len(index)} slices"
            + (f" ({index.skipped['background_slices']} background slices skipped)"
               if index.skipped["background_slices"] else ""))
    if d.cache_dir and jax.process_index() == 0:
        write_cache(index, d.cache_dir, fingerprint=fingerprint, say=say)
        return CachedRecords(d.cache_dir, fingerprint=fingerprint)
    return index


def pretrain_source(config, workdir: str, say=None):
    """The records to pretrain on: the training split of the manifest (or of the demo dataset's)."""
    if not config.data.manifest:
        return slice_source(config, demo_manifest(config, workdir, say), "train", extra_columns=DEMO_COLUMNS,
                            say=say)
    if not os.path.exists(config.data.manifest):
        raise FileNotFoundError(f"config.data.manifest={config.data.manifest!r} does not exist; give the path "
                                "of a CSV manifest (columns patient_id, path, split, ...).")
    return slice_source(config, config.data.manifest, "train", say=say)


def pretrain_iterator(config, source, batch_size: int, *, num_workers: int | None = None):
    """The config's Grain pipeline (multi-crop + masks + batches) over ``source``, this process's share."""
    return pipeline.make_iterator(
        source,
        crop_config(config),
        batch_size=batch_size,
        patch_size=config.model.patch_size,
        mask_probability=config.loss.mask_probability,
        mask_ratio=(config.loss.mask_ratio_min, config.loss.mask_ratio_max),
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=config.data.num_workers if num_workers is None else num_workers,
    )


class PretrainData:
    """Iterator of global batches; ``iterator`` is what checkpoints save and restore."""

    def __init__(self, config, mesh, workdir: str, say=None):
        per_process = config.train.batch_size_per_device * jax.local_device_count()
        if jax.process_count() > 1 and config.loss.ibot_weight > 0:
            raise ValueError(
                "Multi-process pretraining with iBOT is not supported in this version: run on one host "
                "or set config.loss.ibot_weight=0."
            )
        self.source = pretrain_source(config, workdir, say)
        if len(self.source) < per_process:
            raise ValueError(
                f"The dataset has {len(self.source)} training images, fewer than one batch of {per_process}; "
                "lower config.train.batch_size_per_device or add data."
            )
        self.iterator = pretrain_iterator(config, self.source, per_process)
        split, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)
        self.shardings = {
            key: split if key in _SPLIT_KEYS else whole
            for key in ("global_crops", "local_crops", "masks", "mask_indices", "mask_weights", "n_masked")
        }

    def next_batch(self) -> dict:
        return sharding.to_global(next(self.iterator), self.shardings)

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()

