"""Benchmark of index building: series/s and slices/s counting slices from headers, and skipping background.

    python -m medjax.bench.index [--series=2000] [--slices=150] [--size=64] [--format=dicom]
        [--workers=1,2] [--cases=headers,background] [--dir=runs/bench_index] [--keep]

Writes ``--series`` synthetic axial series (one DICOM file per slice in a series folder, or one
NIfTI file per series; ``--size`` x ``--size`` pixels, the first and last tenth of the slices
blank) and a manifest, then builds a ``SliceIndex`` over them for each case and worker count:
``headers`` counts slices from file headers (``headers_only=True, skip_background=False``: no pixel
is decoded), ``background`` decodes every volume to leave out blank slices (``skip_background=True``).
``workers=1`` reads in the main process. Prints one line per case and ``series_per_sec=... slices_per_sec=...``.
The data are written once per size and reused (``--keep`` leaves them on disk).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time

import numpy as np
from absl import app, flags, logging

from medjax import console
from medjax.data.manifest import load_manifest
from medjax.data.slices import SliceIndex

_SERIES = flags.DEFINE_integer("series", 2000, "Series (one patient each) to write and index.")
_SLICES = flags.DEFINE_integer("slices", 150, "Axial slices per series.")
_SIZE = flags.DEFINE_integer("size", 64, "Rows and columns of each slice.")
_FORMAT = flags.DEFINE_enum("format", "dicom", ["dicom", "nifti"], "DICOM series folders or NIfTI files.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker-process counts to try (1 = the main process).")
_CASES = flags.DEFINE_list("cases", ["headers", "background"], "headers and/or background.")
_DIR = flags.DEFINE_string("dir", "runs/bench_index", "Where the synthetic data are written.")
_KEEP = flags.DEFINE_bool("keep", True, "Keep the written data for the next run.")


def _stored_volume(size: int, slices: int) -> np.ndarray:
    """uint16 (rows, cols, slices): an ellipsoid of tissue with texture; the outer tenth of slices blank."""
    r, c = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    disc = (r**2 / 0.8 + c**2 / 0.6) < 1.0
    volume = np.zeros((size, size, slices), np.uint16)
    blank = max(1, slices // 10)
    rng = np.random.default_rng(0)
    for k in range(blank, slices - blank):
        volume[..., k] = disc * (800 + rng.integers(0, 400, (size, size)))
    return volume


def _write_dicom_series(folder: str, number: int, volume: np.ndarray) -> None:
    """One axial series, a file per slice; one dataset changed in place per slice (fast)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    os.makedirs(folder, exist_ok=True)
    rows, cols, slices = volume.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.Modality = MRImageStorage, "MR"
    ds.PatientID, ds.SeriesDescription = f"BENCH{number:05d}", "bench axial"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"2.25.{number + 1}1", f"2.25.{number + 1}2"
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.PixelSpacing, ds.SliceThickness = rows, cols, ["0.9", "0.9"], "2.5"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    for k in range(slices):
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"2.25.{number + 1}3{k}"
        ds.InstanceNumber, ds.ImagePositionPatient = k + 1, ["-28.8", "-28.8", format(2.5 * k, "g")]
        ds.PixelData = volume[..., k].tobytes()
        pydicom.dcmwrite(os.path.join(folder, f"IM{k:04d}.dcm"), ds, enforce_file_format=True)


def _write_one(args) -> str:
    root, number, fmt, size, slices = args
    volume = _stored_volume(size, slices)
    if fmt == "dicom":
        path = os.path.join(root, "dicom", f"S{number:05d}")
        _write_dicom_series(path, number, volume)
        return path
    import nibabel as nib

    path = os.path.join(root, "nifti", f"S{number:05d}.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.diag([0.9, 0.9, 2.5, 1.0])), path)
    return path


def write_dataset(root: str, *, series: int, slices: int, size: int, fmt: str, workers: int = 2) -> str:
    """The synthetic series and their manifest (patient_id,path,split); reused when already written."""
    stamp = {"series": series, "slices": slices, "size": size, "format": fmt}
    manifest, stamp_path = os.path.join(root, "manifest.csv"), os.path.join(root, "bench.json")
    if os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp:
        return manifest
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, fmt))
    start = time.perf_counter()
    jobs = [(root, n, fmt, size, slices) for n in range(series)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        paths = list(pool.map(_write_one, jobs, chunksize=8))
    with open(manifest, "w") as f:
        f.write("patient_id,path,split\n" + "".join(f"BENCH{n:05d},{p},train\n" for n, p in enumerate(paths)))
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    console.say(f"wrote {series} {fmt} series of {slices} slices ({size}x{size}) in "
                f"{time.perf_counter() - start:.0f} s to {root}")
    return manifest


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    root = os.path.abspath(_DIR.value)
    manifest = write_dataset(root, series=_SERIES.value, slices=_SLICES.value, size=_SIZE.value, fmt=_FORMAT.value)
    rows = load_manifest(manifest)
    total = _SERIES.value * _SLICES.value
    options = {"headers": dict(skip_background=False, headers_only=True),
               "background": dict(skip_background=True)}
    for case in _CASES.value:
        for workers in (int(w) for w in _WORKERS.value):
            start = time.perf_counter()
            index = SliceIndex(rows, workers=workers, **options[case])
            seconds = time.perf_counter() - start
            print(f"format={_FORMAT.value} case={case} workers={workers} series={len(rows)} slices_read={total} "
                  f"records={len(index)} seconds={seconds:.1f} series_per_sec={len(rows) / seconds:.1f} "
                  f"slices_per_sec={total / seconds:.0f}", flush=True)
    if not _KEEP.value:
        shutil.rmtree(root)


if __name__ == "__main__":
    app.run(main)
