"""The built-in demo dataset written as real files: DICOM series, NIfTI volumes, a CSV manifest.

Why files: the demo should go through exactly the code paths a user's data
takes (manifest validation, DICOM slice sorting and rescale, NIfTI
reorientation), so it is written to disk in the formats a scanner or a
conversion tool produces, with the traps real data has: file names that do
not give the slice order, InstanceNumber counting from the head or from the
feet, a RescaleSlope that is not 1, a slice gap (SliceThickness is not the
slice spacing), LPS patient coordinates in DICOM and RAS in NIfTI.

Layout under `out_dir` (paths in the manifest are relative to it):

  dicom/<patient>/<contrast>/IM_####.dcm   one folder per series, numbering shuffled
  nifti/<patient>_<contrast>.nii.gz        the same series, int16 with scl_slope, RAS affine
  masks/<patient>_lesion.nii.gz            uint8 lesion mask (1 inside the lesion), same grid
  masks/<patient>_tissue.nii.gz            uint8 tissue labels (TISSUE_CLASSES), same grid
  manifest_dicom.csv, manifest_nifti.csv    one per format: patient_id, path, split, lesion,
                                           contrast, series_description, mask_path (lesion)
  manifest.csv                             a copy of the first format's (DICOM by default)
  manifest_tissue.csv                      manifest.csv with mask_path pointing at the tissue labels

Pixel data is a function of (seed, patient index) only, so two writes with the
same seed give byte-identical pixel data (and, for DICOM, identical files: the
UIDs are derived from the seed). Command line:
``python -m medjax.data.demo OUT_DIR [--patients N] [--seed S]``; ``--kind=cxr`` writes the chest X-ray
demo instead (``medjax.data.demo_cxr``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import time

import numpy as np

from medjax.data.demo_anatomy import CONTRASTS, synthesize_subject
from medjax.data.demo_dicom import decimal_string as _ds
from medjax.data.demo_dicom import demo_uid as _uid

LESION_CLASSES = ("none", "round", "ring", "diffuse")  # the `lesion` column holds the index into this
# Bumped when the files written change (2: tissue label maps), so an older demo folder is rewritten.
DEMO_LAYOUT_VERSION = 2
# Values of the tissue label maps: the brain-tissue segmentation task (as FAST or SynthSeg label MR).
TISSUE_CLASSES = ("background", "csf", "grey_matter", "white_matter", "lesion")
SPLITS = ("train", "val", "test")
FORMATS = ("dicom", "nifti")
MANIFEST_COLUMNS = ("patient_id", "path", "split", "lesion", "contrast", "series_description", "mask_path")
MAX_STORED = 4095  # BitsStored 12


def patient_id(index: int) -> str:
    return f"DEMO{index:04d}"


def assign_patients(num_patients: int, seed: int):
    """Lesion class and split per patient: classes balanced to one patient, splits stratified.

    Patient j of a seeded permutation gets class j % 4. Within each class, 15 % of its
    patients go to val (rounded half up), 15 % to test (rounded half down), at least one
    each once the class has three patients, the rest to train: every split sees every
    class, and a patient has exactly one split.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    labels = np.empty(num_patients, np.int64)
    labels[rng.permutation(num_patients)] = np.arange(num_patients) % len(LESION_CLASSES)
    splits = [""] * num_patients
    for c in range(len(LESION_CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        n, floor_ = members.size, 1 if members.size >= 3 else 0
        n_val = max(floor_, math.floor(0.15 * n + 0.5))
        n_test = max(floor_, math.ceil(0.15 * n - 0.5))
        for rank, p in enumerate(members):
            splits[p] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return labels, splits


def tissue_labels(fractions: dict, lesion_mask: np.ndarray) -> np.ndarray:
    """Each voxel's majority tissue (index into TISSUE_CLASSES); the lesion mask's voxels are ``lesion``.

    Background is what is not brain or CSF: skull, scalp, air. Oedema counts as the white matter it
    swells (the lesion label is the tumour itself, as in the lesion mask).
    """
    csf, gm = fractions["csf"], fractions["gm"]
    wm = fractions["wm"] + fractions["lesion"]
    background = np.clip(1.0 - csf - gm - wm, 0.0, None)
    labels = np.argmax(np.stack([background, csf, gm, wm]), axis=0).astype(np.uint8)
    labels[lesion_mask > 0] = TISSUE_CLASSES.index("lesion")
    return labels


def _quantise(volume: np.ndarray):
    """Stored uint16 values and the rescale slope: value = stored * slope (+ intercept 0)."""
    slope = float(f"{float(volume.max()) / (MAX_STORED - 95):.6g}")  # a little headroom under 4095
    stored = np.clip(np.rint(volume / np.float32(slope)), 0, MAX_STORED).astype(np.uint16)
    return stored, slope


def _write_dicom_series(folder: str, stored: np.ndarray, slope: float, geom, seq: dict, info: dict,
                        rng: np.random.Generator) -> None:
    """One axial series, one file per slice, in LPS patient coordinates."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # a previous write with other settings must not leave extra slices
        if name.startswith("IM_") and name.endswith(".dcm"):
            os.remove(os.path.join(folder, name))
    nx, ny, nz = stored.shape
    (dx, dy, dz), aff = geom.spacing, geom.affine
    # RAS voxel (i, j, k) -> LPS. Rows run posterior (+y LPS) and columns to the left (+x LPS),
    # so the first pixel is the right-anterior corner: pixel[r, c] = volume[nx-1-c, ny-1-r, k].
    x0, y0 = -(aff[0, 3] + (nx - 1) * dx), -(aff[1, 3] + (ny - 1) * dy)
    descending = bool(rng.random() < 0.5)  # InstanceNumber from the head down or from the feet up
    file_numbers = rng.permutation(nz) + 1
    window = np.percentile(stored[stored > 0], [1.0, 99.5]) * slope if np.any(stored > 0) else (0.0, 1.0)
    # One dataset per series; the loop below changes only what differs between slices (fast).
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = info["date"]
    ds.StudyTime, ds.SeriesTime = "090000", info["time"]
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Modality, ds.Manufacturer = "MR", "medjax synthetic"
    ds.StudyDescription = "Brain MRI (synthetic demo)"
    ds.SeriesDescription = seq["description"]
    ds.PatientName, ds.PatientID = info["patient_name"], info["patient_id"]
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence, ds.SequenceVariant = seq["scanning"], seq["variant"]
    ds.ScanOptions = "IR" if seq["ti"] is not None else ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = _ds(geom.thickness)
    ds.RepetitionTime, ds.EchoTime = _ds(seq["tr"]), _ds(seq["te"])
    if seq["ti"] is not None:
        ds.InversionTime = _ds(seq["ti"])
    ds.NumberOfAverages, ds.ImagingFrequency, ds.ImagedNucleus = "1", "63.87", "1H"
    ds.MagneticFieldStrength, ds.EchoTrainLength, ds.FlipAngle = "1.5", seq["etl"], "90"
    ds.SpacingBetweenSlices = _ds(dz)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = info["study_uid"], info["series_uid"]
    ds.StudyID, ds.SeriesNumber, ds.AcquisitionNumber = "1", info["series_number"], 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = info["frame_uid"], ""
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.PixelSpacing = [_ds(dy), _ds(dx)]  # row spacing (between rows), column spacing
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = _ds(round(np.mean(window), 1)), _ds(round(np.ptp(window), 1))
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", _ds(slope), "US"
    for k in range(nz):
        sop = _uid(info["seed"], info["patient_id"], info["contrast"], "sop", k)
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop
        ds.InstanceNumber = nz - k if descending else k + 1
        z = aff[2, 3] + k * dz
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.PixelData = np.ascontiguousarray(stored[::-1, ::-1, k].T).astype("<u2").tobytes()
        pydicom.dcmwrite(os.path.join(folder, f"IM_{file_numbers[k]:04d}.dcm"), ds, enforce_file_format=True)


def _write_nifti(path: str, data: np.ndarray, affine: np.ndarray, slope: float | None, descrip: str) -> None:
    """RAS NIfTI-1 with qform and sform; integer data with the same rescale slope as the DICOM."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)  # explicit scaling: nibabel writes the integers as they are
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip.encode()[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


def write_demo_dataset(out_dir: str, *, num_patients: int = 24, seed: int = 0, image_size: int = 128,
                       slices: int = 16, formats=FORMATS, contrasts=CONTRASTS) -> str:
    """Write the demo dataset under `out_dir` and return the path of its manifest.csv."""
    formats, contrasts = tuple(formats), tuple(contrasts)
    if num_patients < 1 or slices < 1:
        raise ValueError(f"num_patients={num_patients} and slices={slices} must both be at least 1.")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small for a head; use at least 32 pixels.")
    if not formats or set(formats) - set(FORMATS):
        raise ValueError(f"formats={formats} must be a non-empty selection of {FORMATS}.")
    if not contrasts or set(contrasts) - set(CONTRASTS):
        raise ValueError(f"contrasts={contrasts} must be a non-empty selection of {CONTRASTS}.")
    out_dir = os.path.abspath(out_dir)
    for sub in ("masks",) + formats:
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    labels, splits = assign_patients(num_patients, seed)
    rows = []
    for p in range(num_patients):
        pid, label = patient_id(p), int(labels[p])
        subj = synthesize_subject(seed, p, label, image_size=image_size, slices=slices, contrasts=contrasts)
        mask_rel = f"masks/{pid}_lesion.nii.gz"
        _write_nifti(os.path.join(out_dir, mask_rel), subj.mask, subj.geometry.affine, None, "lesion mask")
        _write_nifti(os.path.join(out_dir, _tissue_path(pid)), tissue_labels(subj.fractions, subj.mask),
                     subj.geometry.affine, None, "tissue labels")
        date = (datetime.date(2024, 1, 1) + datetime.timedelta(days=(seed * 37 + p * 11) % 365)).strftime("%Y%m%d")
        study_uid = _uid(seed, pid, "study")
        for number, c in enumerate(contrasts, start=1):
            seq = subj.sequences[c]
            stored, slope = _quantise(subj.images[c])
            if "dicom" in formats:
                rel = f"dicom/{pid}/{c}"
                info = dict(seed=seed, patient_id=pid, patient_name=f"Demo^{pid}", contrast=c, date=date,
                            time=f"09{number * 5:02d}00", study_uid=study_uid, series_uid=_uid(seed, pid, c, "series"),
                            frame_uid=_uid(seed, pid, "frame"), series_number=CONTRASTS.index(c) + 1)
                _write_dicom_series(os.path.join(out_dir, rel), stored, slope, subj.geometry, seq, info,
                                    np.random.default_rng([seed, p, 5, CONTRASTS.index(c)]))
                rows.append((pid, rel, splits[p], label, c, seq["description"], mask_rel))
            if "nifti" in formats:
                rel = f"nifti/{pid}_{c}.nii.gz"
                _write_nifti(os.path.join(out_dir, rel), stored.astype(np.int16), subj.geometry.affine, slope,
                             seq["description"])
                rows.append((pid, rel, splits[p], label, c, seq["description"], mask_rel))
    # One manifest per format (the same series twice would double-count slices in training);
    # manifest.csv is the first format's, DICOM by default.
    for fmt in formats:
        _write_manifest(os.path.join(out_dir, f"manifest_{fmt}.csv"), [r for r in rows if r[1].startswith(fmt)])
    path = os.path.join(out_dir, "manifest.csv")
    first = [r for r in rows if r[1].startswith(formats[0])]
    _write_manifest(path, first)
    _write_manifest(os.path.join(out_dir, "manifest_tissue.csv"), [r[:-1] + (_tissue_path(r[0]),) for r in first])
    return path


def _tissue_path(pid: str) -> str:
    return f"masks/{pid}_tissue.nii.gz"


def _write_manifest(path: str, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medjax.data.demo",
        description="Write a synthetic demo dataset: brain MRI (--kind=mri: DICOM, NIfTI, manifest.csv) or chest "
                    "X-ray (--kind=cxr: 16-bit PNG, DICOM CR/DX, lung masks, NIH-style tables, manifest.csv).")
    parser.add_argument("out_dir")
    parser.add_argument("--kind", choices=("mri", "cxr"), default="mri")
    parser.add_argument("--patients", type=int, default=None, help="default 24 (mri) or 40 (cxr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=16, help="mri only")
    parser.add_argument("--formats", default=",".join(FORMATS), help="mri only; comma-separated: dicom,nifti")
    parser.add_argument("--contrasts", default=",".join(CONTRASTS), help="mri only; comma-separated: T1,T2,FLAIR")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.kind == "cxr":
            from medjax.data.demo_cxr import DEFAULT_PATIENTS, write_cxr_dataset

            mri_only = [f"--{name}" for name in ("slices", "formats", "contrasts")
                        if getattr(args, name) != parser.get_default(name)]
            if mri_only:
                raise ValueError(f"{', '.join(mri_only)} apply to --kind=mri only; leave them out with --kind=cxr.")
            patients = DEFAULT_PATIENTS if args.patients is None else args.patients
            path = write_cxr_dataset(args.out_dir, num_patients=patients, seed=args.seed,
                                     image_size=args.image_size)
        else:
            patients = 24 if args.patients is None else args.patients
            path = write_demo_dataset(args.out_dir, num_patients=patients, seed=args.seed,
                                      image_size=args.image_size, slices=args.slices,
                                      formats=[f for f in args.formats.split(",") if f],
                                      contrasts=[c for c in args.contrasts.split(",") if c])
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {path} ({patients} {args.kind} patients) in {time.perf_counter() - start:.1f} s")

if __name__ == "__main__":
    main()
