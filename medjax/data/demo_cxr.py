"""The built-in synthetic chest X-ray dataset: PA radiographs from an anatomical model, written as a user's
data arrives (16-bit PNG, DICOM CR/DX, an NIH ChestX-ray14-style table), in seconds, with no download.

The films come from ``cxr_patient`` (anatomy in ``cxr_anatomy``, findings in ``cxr_findings``, whose
docstrings say what each finding looks like and how it is drawn). Findings (columns, 1 / 0 / -1 =
uncertain): Cardiomegaly (cardiothoracic ratio 0.53-0.66, normal 0.36-0.47), Effusion, Pneumothorax,
Nodule (< 30 mm), Mass (> 30 mm), Consolidation; ``diagnosis``: normal (no finding at all), pneumonia
(lobar consolidation in one lung), covid (bilateral peripheral lower-zone ground glass), left empty
(unlabelled) on films with other findings only. Several findings per film are possible.

Prevalence: each patient has one group, dealt round-robin over a seeded permutation of ten slots: normal
x3 (30 %), pneumonia, covid, cardiomegaly, effusion, pneumothorax, nodule, mass (10 % each); 25 % of the
non-normal patients carry an incidental nodule, enlarged heart or effusion, 30 % of pneumonias and 40 % of
enlarged hearts an effusion. Splits are by patient and stratified by group (15 % val rounded half up,
15 % test rounded half down, at least one each from three patients of a group; 40 / 10 / 10 patients at the
default 60): from 30 patients every group, so every finding and every diagnosis, has positives in train, val
and test,
and since the group's finding on a patient's first film is never marked uncertain these are certain
positives. Patients have 1-3 films (40 / 35 / 25 %). About 5-10 % of the positive finding labels are
-1 (fainter findings more often; see ``cxr_patient``).

Lung masks (``masks/*_lungs.png``, 0 background, 1 right lung, 2 left lung; the right lung is on the
image left of a PA film) are the lung fields as seen: inside the rib cage, below the apices, above the
domes, outside the heart and mediastinum; the retracted lung only in a pneumothorax (the air gap is not
lung on the film) and without the effusion fluid (the lung ends at the meniscus); consolidation, ground
glass, nodules and masses stay inside (they lie in the lung).

Layout under ``out_dir`` (paths relative to it):

  images/<8-digit patient>_<3-digit follow-up>.png   16-bit grayscale, bone bright, air dark
  dicom/<same stem>.dcm          the same pixels: CR (ImagerPixelSpacing, 12 bits, half MONOCHROME1) or DX
                                 (PixelSpacing and ImagerPixelSpacing, 14 bits, rescale 1/0, a quarter
                                 MONOCHROME1), window centre/width, StudyDate per follow-up, PA
  masks/<same stem>_lungs.png    lung labels (uint8)
  manifest.csv, manifest_dicom.csv   MANIFEST_COLUMNS; pixel_spacing "row,col" mm (the film spans 35-43 cm)
  Data_Entry.csv                 NIH's columns; uncertain findings are listed (NIH's table has no -1)
  labels.csv                     CheXpert-style: one column per finding, 1 / 0 / -1, and the diagnosis
  train_val_list.txt, test_list.txt   NIH's split lists; train_list.txt and val_list.txt split the first

``python -m medjax.data.make_manifest label-table`` on these tables reproduces the manifest's labels and
splits (labels.csv exactly with the fine lists; Data_Entry.csv with -1 read as 1). Pixel data is a
function of (seed, patient index) only: two writes with the same seed are byte-identical.
"""

from __future__ import annotations

import csv
import datetime
import math
import os

import numpy as np
from PIL import Image

from medjax.data.cxr_patient import DIAGNOSES, FINDINGS, GROUPS, patient_maps, render, spacing_mm, synthesize_patient
from medjax.data.demo_dicom import decimal_string, demo_uid

CXR_LAYOUT_VERSION = 1  # bumped when the files written change, so an older CXR demo folder is rewritten
GROUP_SLOTS = ("normal", "normal", "normal") + GROUPS[1:]
LUNG_CLASSES = ("background", "right_lung", "left_lung")  # values of the lung label PNGs
MANIFEST_COLUMNS = ("patient_id", "path", "split", *FINDINGS, "diagnosis", "mask_path", "pixel_spacing", "follow_up")
NIH_HEADER = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]")
LABELS_HEADER = ("Image Index", "Patient ID", "Follow-up #", "diagnosis", *FINDINGS)
DEFAULT_PATIENTS = 60
SPLITS = ("train", "val", "test")


def patient_id(index: int) -> str:
    return str(index + 1)  # NIH's Patient ID: a plain number


def image_stem(index: int, follow_up: int) -> str:
    return f"{index + 1:08d}_{follow_up:03d}"  # NIH's Image Index without .png


def assign_patients(num_patients: int, seed: int) -> tuple[list[str], list[str]]:
    """(group, split) per patient: groups dealt over GROUP_SLOTS, splits stratified by group (see module)."""
    rng = np.random.default_rng([seed, 0xC8, 0x5EED])
    slots = np.empty(num_patients, np.int64)
    slots[rng.permutation(num_patients)] = np.arange(num_patients) % len(GROUP_SLOTS)
    groups = [GROUP_SLOTS[s] for s in slots]
    splits = [""] * num_patients
    for group in GROUPS:
        members = rng.permutation([p for p in range(num_patients) if groups[p] == group])
        n, floor_ = len(members), 1 if len(members) >= 3 else 0
        n_val = max(floor_, math.floor(0.15 * n + 0.5))
        n_test = max(floor_, math.ceil(0.15 * n - 0.5))
        for rank, p in enumerate(members):
            splits[p] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return groups, splits


def detector(seed: int, index: int) -> dict:
    """How one patient's films are stored as DICOM: CR or DX, MONOCHROME1 or 2, bits stored."""
    rng = np.random.default_rng([seed, index, 0xD1C0])
    modality = "CR" if rng.random() < 0.5 else "DX"
    inverted = rng.random() < (0.5 if modality == "CR" else 0.25)
    return {"modality": modality, "photometric": "MONOCHROME1" if inverted else "MONOCHROME2",
            "bits": 12 if modality == "CR" else 14}


def _study_date(seed: int, index: int, follow_up: int) -> str:
    start = datetime.date(2023, 1, 1) + datetime.timedelta(days=(seed * 53 + index * 17) % 365)
    days = sum(7 + (index * 31 + k * 13 + seed) % 90 for k in range(follow_up))  # 1-3 months apart
    return (start + datetime.timedelta(days=days)).strftime("%Y%m%d")


def _write_dicom(path: str, pixels: np.ndarray, spacing: float, det: dict, info: dict) -> None:
    """One PA chest film; ``pixels`` in [0, 1] (bright = dense) stored on ``det['bits']`` bits."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                             ExplicitVRLittleEndian)

    top = 2 ** det["bits"] - 1
    stored = np.rint(pixels * top).astype(np.uint16)
    if det["photometric"] == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)  # high stored values are dark
    sop_class = ComputedRadiographyImageStorage if det["modality"] == "CR" else DigitalXRayImageStorageForPresentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = info["sop_uid"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, info["sop_uid"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = info["date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.Modality, ds.Manufacturer = det["modality"], "medjax synthetic"
    ds.StudyDescription, ds.SeriesDescription = "Chest PA (synthetic demo)", "CHEST PA"
    ds.PatientName, ds.PatientID = f"Demo^CXR{info['patient_id']}", info["patient_id"]
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = "", info["sex"], f"{info['age']:03d}Y"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PatientOrientation = ["R", "F"]  # PA: the image left is the patient's right, rows run to the feet
    ds.KVP = decimal_string(round(info["kvp"]))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = info["study_uid"], info["series_uid"]
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(info["follow_up"] + 1), 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, det["photometric"]
    ds.Rows, ds.Columns = pixels.shape
    ds.ImagerPixelSpacing = [decimal_string(spacing)] * 2
    if det["modality"] == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelSpacing = [decimal_string(spacing)] * 2
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, det["bits"], det["bits"] - 1, 0
    low, high = np.percentile(stored, (1.0, 99.0))
    ds.WindowCenter, ds.WindowWidth = decimal_string(round((low + high) / 2)), decimal_string(round(high - low + 1))
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = np.ascontiguousarray(stored).astype("<u2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _write_png16(path: str, pixels: np.ndarray) -> None:
    Image.fromarray(np.rint(pixels * 65535.0).astype(np.uint16)).save(path, compress_level=1)


def write_cxr_dataset(out_dir: str, *, num_patients: int = DEFAULT_PATIENTS, seed: int = 0,
                      image_size: int = 128) -> str:
    """Write the chest X-ray demo under ``out_dir``; returns the path of its manifest.csv."""
    if num_patients < 1:
        raise ValueError(f"num_patients={num_patients} must be at least 1.")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small for a chest film; use at least 32 pixels.")
    out_dir = os.path.abspath(out_dir)
    for sub in ("images", "masks", "dicom"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    groups, splits = assign_patients(num_patients, seed)
    rows, nih, table = [], [], []
    for p in range(num_patients):
        patient = synthesize_patient(seed, p, groups[p])
        maps = patient_maps(patient, image_size)
        spacing = spacing_mm(patient, image_size)
        det, pid = detector(seed, p), patient_id(p)
        sex = "F" if patient.female else "M"
        for k, view in enumerate(patient.views):
            film = render(patient, k, image_size, maps=maps)
            stem = image_stem(p, k)
            image, mask, dicom = f"images/{stem}.png", f"masks/{stem}_lungs.png", f"dicom/{stem}.dcm"
            _write_png16(os.path.join(out_dir, image), film.image)
            Image.fromarray(film.lungs).save(os.path.join(out_dir, mask), compress_level=1)
            info = dict(patient_id=pid, sex=sex, age=patient.age, kvp=view.kvp, follow_up=k,
                        date=_study_date(seed, p, k), study_uid=demo_uid(seed, "cxr", pid, k, "study"),
                        series_uid=demo_uid(seed, "cxr", pid, k, "series"), sop_uid=demo_uid(seed, "cxr", pid, k))
            _write_dicom(os.path.join(out_dir, dicom), film.image, spacing, det, info)
            labels = patient.labels[k]
            cells = [str(labels[f]) for f in FINDINGS]
            tail = [patient.diagnosis[k], mask, f"{spacing:.6g},{spacing:.6g}", str(k)]
            rows.append(([pid, image, splits[p], *cells, *tail], [pid, dicom, splits[p], *cells, *tail]))
            listed = [f for f in FINDINGS if labels[f] != 0]  # uncertain findings listed, as NIH had no -1
            nih.append([f"{stem}.png", "|".join(listed) or "No Finding", k, pid, patient.age, sex, "PA",
                        image_size, image_size, f"{spacing:.6g}", f"{spacing:.6g}"])
            table.append([f"{stem}.png", pid, k, patient.diagnosis[k], *cells])
    _write_csv(os.path.join(out_dir, "manifest_dicom.csv"), MANIFEST_COLUMNS, [r[1] for r in rows])
    _write_csv(os.path.join(out_dir, "Data_Entry.csv"), NIH_HEADER, nih)
    _write_csv(os.path.join(out_dir, "labels.csv"), LABELS_HEADER, table)
    names = {s: [entry[0] for entry, row in zip(nih, rows) if row[0][2] == s] for s in SPLITS}
    lists = {"train_val_list.txt": names["train"] + names["val"], "test_list.txt": names["test"],
             "train_list.txt": names["train"], "val_list.txt": names["val"]}
    for name, images in lists.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("".join(f"{n}\n" for n in images))
    path = os.path.join(out_dir, "manifest.csv")
    _write_csv(path, MANIFEST_COLUMNS, [r[0] for r in rows])  # last: its presence means the folder is whole
    return path


def _write_csv(path: str, header, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


__all__ = ["CXR_LAYOUT_VERSION", "DIAGNOSES", "FINDINGS", "LUNG_CLASSES", "MANIFEST_COLUMNS", "write_cxr_dataset"]
