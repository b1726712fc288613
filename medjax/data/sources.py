"""What every job reads from a manifest: the slices or volumes of one split, and the demo dataset in place
of a manifest.

``slice_source`` gives 2D slices (through the ArrayRecord slice cache when ``config.data.cache_dir``
is set); ``volume_source`` gives whole volumes from ``VolumeIndex`` (RAS+ (X, Y, Z), resampled to
``config.data.target_spacing`` and normalised per volume) in the axial display layout (D, H, W): D
runs from the feet to the head, and ``volume[k]`` is exactly the axial slice k a 2D job sees
(anterior up, patient-right on the image left), so W is the left-right axis a flip mirrors. With
``config.data.manifest`` empty the built-in demo dataset is written once (``demo_manifest``), and an
evaluation of a demo run reuses that run's files when they are the same dataset (``use_run_demo_data``).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from medjax import sharding
from medjax.data.cache import CachedRecords, cache_is_valid, write_cache
from medjax.data.demo import DEMO_LAYOUT_VERSION, write_demo_dataset
from medjax.data.demo_cxr import CXR_LAYOUT_VERSION, DIAGNOSES, FINDINGS, write_cxr_dataset
from medjax.data.label_maps import check_mask_values
from medjax.data import job_manifest
from medjax.data.slices import SliceIndex, VolumeIndex

# The demo manifests' label and extra columns: the brain-MRI demo's, then the chest X-ray demo's.
DEMO_COLUMNS = ("lesion", "contrast", "series_description", *FINDINGS, "diagnosis", "follow_up")
DEMO_KINDS = ("mri", "cxr")
CXR_EXAMPLE_LABELS = ",".join(FINDINGS)


def demo_kind(config) -> str:
    """``config.data.demo_kind``, checked: one sentence naming the key."""
    kind = config.data.demo_kind
    if kind not in DEMO_KINDS:
        raise ValueError(f"config.data.demo_kind={kind!r} is not valid; choose mri (brain MRI) or cxr (chest X-ray).")
    return kind


def demo_fingerprint(config) -> dict:
    """What identifies a written demo dataset: its kind, size, seed and file layout. The brain-MRI demo's
    stamp has no kind (as before the chest X-ray demo), so its folders stay valid and never match a CXR one."""
    d = config.data
    if demo_kind(config) == "cxr":
        return {"kind": "cxr", "patients": d.demo_patients, "image_size": d.demo_image_size, "seed": config.seed,
                "layout": CXR_LAYOUT_VERSION}
    return {"patients": d.demo_patients, "image_size": d.demo_image_size, "slices": d.demo_slices,
            "seed": config.seed, "layout": DEMO_LAYOUT_VERSION}


def check_cxr_demo_labels(config) -> None:
    """With the chest X-ray demo, a job whose label setting is empty (which on the brain-MRI demo means its
    ``lesion`` class) or that would read the MRI demo's masks ends in one sentence naming the key to set."""
    if demo_kind(config) != "cxr":
        return
    labels = f"{CXR_EXAMPLE_LABELS} (multi-label) or diagnosis ({' / '.join(DIAGNOSES)})"
    where = "the chest X-ray demo (config.data.demo_kind='cxr') has no lesion column"
    if "segment" in config and not config.segment.manifest and config.segment.demo_masks != "lungs":
        raise ValueError(f"config.segment.manifest is empty and config.segment.demo_masks={config.segment.demo_masks!r} "
                         "names the brain-MRI demo's masks; for the chest X-ray demo's lung masks set "
                         "config.segment.demo_masks='lungs' and config.segment.class_names="
                         "('background','right_lung','left_lung') (configs/segment.py:demo_cxr does).")
    if "finetune" in config and not config.finetune.targets:
        raise ValueError(f"config.finetune.targets is empty and {where}; name its columns, e.g. "
                         f"--config.finetune.targets='(\"diagnosis\",)', from {labels}.")
    if "probe" in config and not config.probe.label_column:
        key = "config.evals.label_column" if "evals" in config else "config.probe.label_column"
        raise ValueError(f"{key} is empty and {where}; name its columns, e.g. {key}={CXR_EXAMPLE_LABELS}, from "
                         f"{labels}.")


def is_demo_folder(folder: str, fingerprint: dict) -> bool:
    """Whether ``folder`` holds the demo dataset of ``fingerprint`` (its stamp matches)."""
    stamp = os.path.join(folder, "demo.json")
    if not os.path.exists(stamp):
        return False
    with open(stamp) as f:
        return json.load(f) == fingerprint


def demo_manifest(config, workdir: str, say=None) -> str:
    """Writes the built-in demo dataset once (``config.data.demo_kind``: brain MRI, real DICOM series + NIfTI
    masks; or chest X-ray, PNG + DICOM films with lung masks); returns its manifest."""
    d = config.data
    check_cxr_demo_labels(config)
    out = d.demo_dir or os.path.join(workdir, "demo_data")
    manifest = os.path.join(out, "manifest.csv")
    fingerprint = demo_fingerprint(config)
    current = is_demo_folder(out, fingerprint)
    stamp = os.path.join(out, "demo.json")
    cxr = fingerprint.get("kind") == "cxr"
    if not current and jax.process_index() == 0:
        if os.path.exists(stamp):
            os.remove(stamp)  # a half-rewritten folder must not pass for the old dataset
        if say:
            what = "chest X-ray patients, PA films as PNG and DICOM" if cxr else \
                "brain-MRI patients, T1/T2/FLAIR DICOM series"
            say(f"config.data.manifest is empty: writing the built-in demo dataset ({d.demo_patients} synthetic "
                f"{what}) to {out} ...")
        if cxr:
            write_cxr_dataset(out, num_patients=d.demo_patients, seed=config.seed, image_size=d.demo_image_size)
        else:
            write_demo_dataset(out, num_patients=d.demo_patients, seed=config.seed, image_size=d.demo_image_size,
                               slices=d.demo_slices)
        with open(stamp, "w") as f:
            json.dump(fingerprint, f)
    elif say:
        say(f"config.data.manifest is empty: using the built-in {'chest X-ray' if cxr else 'brain-MRI'} demo "
            f"dataset in {out}.")
    sharding.barrier("medjax_demo_data")  # the other processes read what process 0 wrote
    return manifest


def use_run_demo_data(config, run_dir: str) -> None:
    """With no manifest and no demo_dir, point ``config.data.demo_dir`` at the pretraining run's demo files
    when they are the same dataset, of the same ``config.data.demo_kind`` (never rewriting that run's folder)."""
    run_data = os.path.join(os.path.abspath(run_dir), "demo_data")
    if not config.data.demo_dir and is_demo_folder(run_data, demo_fingerprint(config)):
        config.data.demo_dir = run_data


def check_slice_cache(config) -> None:
    """The slice cache with volumes (``config.model.spatial_dims=3``): one sentence naming the fix."""
    if config.model.spatial_dims == 3 and config.data.cache_dir:
        raise ValueError("config.data.cache_dir caches 2D slices; 3D pretraining (config.model.spatial_dims=3) "
                         "reads whole volumes, so leave config.data.cache_dir empty.")


def index_options(config) -> dict:
    """How ``SliceIndex``/``VolumeIndex`` take odd files, from ``config.data``: ``volume_index``,
    ``mask_resample`` and the parsed ``mask_values``; a bad value ends in one sentence naming its key."""
    d = config.data
    if isinstance(d.volume_index, bool) or not isinstance(d.volume_index, int) or d.volume_index < -1:
        raise ValueError(f"config.data.volume_index={d.volume_index!r} must be -1 (refuse 4D files) or the volume "
                         "of each 4D file to use (0 = the first).")
    if not isinstance(d.mask_resample, bool):
        raise ValueError(f"config.data.mask_resample={d.mask_resample!r} must be True or False.")
    example = "give a JSON object from stored mask values to labels, e.g. '{\"255\": 1}', or leave it empty"
    try:
        values = json.loads(d.mask_values) if d.mask_values.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"config.data.mask_values is not valid JSON ({e.msg}): {d.mask_values!r}; {example}.") from None
    if not isinstance(values, dict):
        raise ValueError(f"config.data.mask_values={d.mask_values!r} is not a JSON object; {example}.")
    try:
        values = check_mask_values(values)
    except ValueError as e:
        raise ValueError(f"config.data.{e}") from None
    if isinstance(d.index_workers, bool) or not isinstance(d.index_workers, int) or d.index_workers < -1:
        raise ValueError(f"config.data.index_workers={d.index_workers!r} must be -1 (one process per CPU core), "
                         "0 (the main process) or a number of processes.")
    if not isinstance(d.index_from_headers, bool):
        raise ValueError(f"config.data.index_from_headers={d.index_from_headers!r} must be True or False.")
    return {"volume_index": d.volume_index, "mask_resample": d.mask_resample, "mask_values": values,
            "workers": d.index_workers, "index_dir": d.index_dir or None, "headers_only": d.index_from_headers}


def split_rows(config, manifest_path: str, split: str, *, label_columns=(), extra_columns=(), masks=True):
    """``(normalisation dict, rows)`` of one split of a manifest (``config.data.folds`` mapping a fold column
    to splits): what slice and volume sources start from.

    ``masks=False`` leaves the mask_path column out (neither checked nor read), for jobs that read images only."""
    d = config.data
    try:
        normalisation = json.loads(d.normalisation)
    except json.JSONDecodeError as e:
        raise ValueError(f"config.data.normalisation is not valid JSON ({e.msg}): {d.normalisation!r}.") from None
    manifest = job_manifest.open_manifest(config, manifest_path, label_columns=label_columns, extra=extra_columns,
                                          masks=masks)
    rows = manifest.split(split)
    if not len(rows):
        where = "config.data.folds" if job_manifest.data_folds(config) else "its split column"
        raise ValueError(f"The manifest {manifest_path} has no rows in the {split!r} split; add some or fix "
                         f"{where}.")
    return normalisation, rows


def slice_source(config, manifest_path: str, split: str, *, label_columns=(), extra_columns=(), say=None,
                 masks=True, fields=None):
    """The slices of one split of a manifest (through the slice cache when config.data.cache_dir is set);
    ``masks=False``: images only, the mask_path column is neither checked nor read; ``fields``: the record
    entries a cached record is decoded into (None: all)."""
    d = config.data
    options = index_options(config)
    normalisation, rows = split_rows(config, manifest_path, split, label_columns=label_columns,
                                     extra_columns=extra_columns, masks=masks)
    fingerprint = {"manifest": os.path.abspath(manifest_path), "mtime": os.path.getmtime(manifest_path),
                   "split": split, "folds": d.folds, "axis": d.slice_axis, "normalisation": normalisation,
                   "skip_background": d.skip_background, "labels": list(label_columns),
                   "target_spacing": list(d.target_spacing), "volume_index": d.volume_index}
    if d.cache_dir and cache_is_valid(d.cache_dir, fingerprint):
        return CachedRecords(d.cache_dir, fingerprint=fingerprint, fields=fields)
    index = SliceIndex(rows, axis=d.slice_axis, skip_background=d.skip_background, normalisation=normalisation,
                       label_columns=label_columns, skip_bad=d.skip_bad, target_spacing=tuple(d.target_spacing),
                       cache_volumes=d.volumes_in_memory, **options)
    if say:
        say(f"{split} split: {len(rows)} series of {len(rows.patients())} patients -> {len(index)} slices"
            + (f" ({index.skipped['background_slices']} background slices skipped)"
               if index.skipped["background_slices"] else ""))
    if d.cache_dir and jax.process_index() == 0:
        write_cache(index, d.cache_dir, fingerprint=fingerprint, say=say, workers=d.index_workers)
        return CachedRecords(d.cache_dir, fingerprint=fingerprint, fields=fields)
    return index


def training_manifest(config, workdir: str, say=None) -> tuple[str, tuple[str, ...]]:
    """``(manifest path, columns to accept besides the known ones)`` of ``config.data``: the config's
    manifest, or the demo dataset's (written first if needed)."""
    if not config.data.manifest:
        return demo_manifest(config, workdir, say), DEMO_COLUMNS
    path = job_manifest.manifest_path(config.data.manifest, "config.data.manifest",
                                      " (columns patient_id, path, split, ...)")
    return path, ()


def training_source(config, workdir: str, say=None):
    """The records to pretrain on: the training split of the manifest (or of the demo dataset's), as
    slices, or as whole volumes when ``config.model.spatial_dims`` is 3. Pretraining reads images only:
    the mask_path column is neither checked nor read, so a missing or broken mask cannot stop it."""
    manifest, extra = training_manifest(config, workdir, say)
    if config.model.spatial_dims == 3:
        return volume_source(config, manifest, "train", extra_columns=extra, say=say, masks=False)
    return slice_source(config, manifest, "train", extra_columns=extra, say=say, masks=False, fields=("image",))


def axial_dhw(volume: np.ndarray) -> np.ndarray:
    """An RAS+ (X, Y, Z) volume as (D, H, W) = (Z, A->P, R->L): ``out[k]`` is the axial display slice k."""
    return np.ascontiguousarray(np.asarray(volume)[::-1, ::-1, :].transpose(2, 1, 0))


class AxialVolumes:
    """Random-access source of records whose ``image`` is a (D, H, W) volume (see ``axial_dhw``)."""

    def __init__(self, index: VolumeIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        record = dict(self.index[i])
        record.pop("mask", None)  # pretraining reads images only
        record["image"] = axial_dhw(record["image"])
        return record


def volume_source(config, manifest_path: str, split: str, *, label_columns=(), extra_columns=(),
                  say=None, masks=True) -> AxialVolumes:
    """The volumes of one split of a manifest, resampled, normalised and in the (D, H, W) layout; with
    ``label_columns`` each record carries their codes (``label``, then ``label_<column>``), as a slice's;
    ``masks=False``: the mask_path column is neither checked nor read."""
    d = config.data
    options = index_options(config)
    normalisation, rows = split_rows(config, manifest_path, split, label_columns=label_columns,
                                     extra_columns=extra_columns, masks=masks)
    index = VolumeIndex(rows, normalisation=normalisation, label_columns=label_columns, skip_bad=d.skip_bad,
                        target_spacing=tuple(d.target_spacing), cache_volumes=d.volumes_in_memory, **options)
    if say:
        shapes = {tuple(int(n) for n in axial_dhw(index[0]["image"]).shape)} if len(index) else set()
        first = f"; first volume {'x'.join(map(str, next(iter(shapes))))} (D x H x W)" if shapes else ""
        spacing = (f" at {'x'.join(f'{s:g}' for s in d.target_spacing)} mm" if d.target_spacing
                   else " on their own voxel grids (config.data.target_spacing is empty)")
        say(f"{split} split: {len(rows)} series of {len(rows.patients())} patients -> {len(index)} volumes"
            f"{spacing}{first}")
    return AxialVolumes(index)
