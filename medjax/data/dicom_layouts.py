"""DICOM layouts: ``dicom-tree`` (one row per series of a folder tree) and ``rle-table`` (SIIM-ACR masks).

Both read headers only (``stop_before_pixels``), so a tree of thousands of files is indexed in
seconds. A file that is not DICOM (no 'DICM' marker and no .dcm suffix) is left out and counted;
a .dcm file that cannot be parsed is a problem.

``dicom-tree`` groups files by SeriesInstanceUID: the row's path is the series' folder, plus a
``series_uid`` when that folder holds several series (the reader then picks that one). The patient
is the PatientID tag; where it is empty, the first folder under ROOT (ROOT/<patient>/...), and
``--patient-pattern`` overrides both. ``series_description`` and ``modality`` are written as extra
columns; a label column ``label`` can be filled from one of them (``label_from``) or from a map
file (``label_map``: a CSV ``pattern,label`` whose case-insensitive regexes are searched in the
series description, the first match winning) so series types (T1 / T2 / FLAIR) become a task.

``rle-table`` reads SIIM-ACR's ``train-rle.csv``: pairs (start, length) where each start counts
from the end of the previous run, pixels numbered down the columns first over the DICOM's Rows x
Columns; ``-1`` is an empty mask, several rows of one image are united. Masks are written as 0/1
uint8 PNGs with the image's rows and columns, so they line up with the DICOM as medjax reads it.
"""

from __future__ import annotations

import csv
import os
import re

import numpy as np

from medjax.data.layouts import (Entry, Layout, LayoutError, PatientRule, Problems, read_table, require_columns,
                                 require_folder, walk_files)

_TAGS = ["PatientID", "SeriesInstanceUID", "SeriesDescription", "Modality", "SOPInstanceUID", "SOPClassUID", "Rows",
         "Columns"]
LABEL_SOURCES = ("series_description", "modality")


def read_header(path: str, problems: Problems):
    """The tags above of a DICOM image, None for a file that is not one (not DICOM, a report, a DICOMDIR);
    a damaged or truncated image file is a problem."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    dicom_name = path.lower().endswith((".dcm", ".dicom")) or "." not in os.path.basename(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        sop_class = getattr(ds.get("SOPClassUID"), "name", "")
        if "Rows" in ds:
            return ds
        if not len(ds) or "Image Storage" in sop_class:  # pydicom stops quietly at a truncated header
            problems.add("DICOM files whose image header is cut short or empty; re-copy or remove them.", path)
        return None
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many types for damaged headers
        problems.add("DICOM files whose header cannot be read; re-copy or remove them.", f"{path} ({exc})")
        return None
    if dicom_name:  # old files without the preamble: accept only what parses to an image header
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=True)
            if "Rows" in ds and "SOPInstanceUID" in ds:
                return ds
        except Exception:
            pass
        if path.lower().endswith((".dcm", ".dicom")):
            problems.add("DICOM files whose header cannot be read; re-copy or remove them.", path)
    return None


def _text(ds, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _read_label_map(path: str) -> list[tuple[re.Pattern, str]]:
    if not os.path.isfile(path):
        raise LayoutError(f"--label-map {path} does not exist; give a CSV with columns pattern,label.")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"pattern", "label"} <= set(rows[0]):
        raise LayoutError(f"--label-map {path} needs a header 'pattern,label' and one row per series type.")
    compiled = []
    for number, row in enumerate(rows, 2):
        try:
            compiled.append((re.compile(row["pattern"], re.IGNORECASE), row["label"].strip()))
        except re.error as exc:
            raise LayoutError(f"--label-map {path} line {number}: {row['pattern']!r} is not a regular expression "
                              f"({exc}); fix it.") from None
    return compiled


def dicom_tree(root: str, patients: PatientRule, *, label_from: str = "", label_map: str = "") -> Layout:
    """One row per DICOM series under ``root``; see the module docstring."""
    root = require_folder(root)
    if label_from and label_map:
        raise LayoutError("--label-from and --label-map both fill the label column; pass one of them.")
    if label_from and label_from not in LABEL_SOURCES:
        raise LayoutError(f"--label-from {label_from!r} is not one of {', '.join(LABEL_SOURCES)}.")
    mapping = _read_label_map(label_map) if label_map else None
    problems, skipped = Problems(f"dicom-tree {root}"), []
    series: dict[str, dict] = {}  # SeriesInstanceUID -> folders, patient ids, description, modality
    for path in walk_files(root):
        ds = read_header(path, problems)
        if ds is None:  # not DICOM, or no image (a report, a DICOMDIR)
            skipped.append(path)
            continue
        if not _text(ds, "SeriesInstanceUID"):
            problems.add("DICOM images without a SeriesInstanceUID; fix or remove them.", path)
            continue
        s = series.setdefault(_text(ds, "SeriesInstanceUID"), {"folders": set(), "patients": set(), "files": 0,
                                                               "description": _text(ds, "SeriesDescription"),
                                                               "modality": _text(ds, "Modality")})
        s["folders"].add(os.path.dirname(path))
        s["patients"].add(_text(ds, "PatientID"))
        s["files"] += 1
    if not series:
        problems.add("a ROOT without any DICOM image; give the folder that holds the series.", root)
    per_folder: dict[str, int] = {}
    for uid, s in series.items():
        if len(s["folders"]) > 1:
            problems.add("series whose files lie in several folders (the reader reads one folder); move them "
                         "into one.", f"{uid}: {', '.join(sorted(s['folders']))}")
        if len(s["patients"]) > 1:
            problems.add("series whose files name several PatientIDs; fix the headers.",
                         f"{uid}: {', '.join(sorted(s['patients']))}")
        for folder in s["folders"]:
            per_folder[folder] = per_folder.get(folder, 0) + 1
    entries, fallback, unlabelled = [], 0, []
    for uid, s in sorted(series.items(), key=lambda item: (min(item[1]["folders"]), item[0])):
        folder = min(s["folders"])
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        known = min(s["patients"])
        if not known and rel != ".":
            known, fallback = rel.split("/")[0], fallback + 1
        shared = per_folder[folder] > 1
        where = f"series {uid} in {folder}"
        patient = patients.patient(rel + (f"#{uid}" if shared else ""), known or None, problems, where)
        labels = {}
        if label_from or mapping:
            value = s["description" if label_from != "modality" else "modality"]
            if mapping is not None:
                value = next((label for pattern, label in mapping if pattern.search(value)), "")
            if not value:
                unlabelled.append(f"{rel} ({s['description'] or 'no description'})")
            labels = {"label": value}
        entries.append(Entry(folder, patient, labels=labels, series_uid=uid if shared else None,
                             extras={"series_description": s["description"], "modality": s["modality"]}))
    problems.raise_if_any()
    notes = []
    if skipped:
        notes.append(f"{len(skipped)} file(s) under ROOT are no DICOM image and were left out (e.g. {skipped[0]}).")
    if fallback:
        notes.append(f"{fallback} series have an empty PatientID; their patient is the first folder under ROOT.")
    if unlabelled:
        notes.append(f"{len(unlabelled)} series got no label (empty cell, left out of labelled tasks), "
                     f"e.g. {', '.join(unlabelled[:3])}.")
    return Layout(entries, ("label",) if labels or unlabelled else (), ("series_description", "modality"), notes,
                  not patients.each_image)


def rle_runs(text: str, n_pixels: int) -> list[tuple[int, int]]:
    """Absolute (first pixel, length) runs of a SIIM encoding; starts count from the previous run's end.

    ``-1`` (or an empty cell) is no run. Raises ValueError naming what is wrong.
    """
    text = text.strip()
    if text in ("", "-1"):
        return []
    try:
        numbers = [int(v) for v in text.split()]
    except ValueError:
        raise ValueError("holds something that is not an integer") from None
    if len(numbers) % 2:
        raise ValueError(f"has {len(numbers)} numbers; it needs (start, length) pairs")
    runs, position = [], 0
    for offset, length in zip(numbers[0::2], numbers[1::2]):
        if offset < 0 or length < 1:
            raise ValueError(f"has a negative start or a length below 1 ({offset} {length})")
        position += offset
        if position + length > n_pixels:
            raise ValueError(f"runs past the image's {n_pixels} pixels")
        runs.append((position, length))
        position += length
    return runs


def rle_mask(runs, rows: int, columns: int) -> np.ndarray:
    """0/1 uint8 mask (rows, columns) of absolute runs over pixels numbered down the columns first."""
    flat = np.zeros(rows * columns, np.uint8)
    for start, length in runs:
        flat[start:start + length] = 1
    return flat.reshape(columns, rows).T  # column-major numbering: pixel p is (p % rows, p // rows)


def rle_table(root: str, table: str, patients: PatientRule, *, mask_dir: str, image_column: str = "ImageId",
              rle_column: str = "EncodedPixels", label_name: str = "pneumothorax") -> Layout:
    """One row per image of ``table`` (its DICOM found by SOPInstanceUID under ROOT), mask written as PNG."""
    from PIL import Image

    root = require_folder(root)
    header, rows = read_table(table)
    require_columns(table, header, {"--image-column": image_column, "--rle-column": rle_column})
    problems, name = Problems(f"rle-table {table}"), os.path.basename(table)
    images: dict[str, tuple[str, int, int, str]] = {}  # SOPInstanceUID -> path, rows, columns, PatientID
    skipped = []
    for path in walk_files(root):
        ds = read_header(path, problems)
        if ds is None:
            skipped.append(path)
            continue
        uid = _text(ds, "SOPInstanceUID")
        if uid in images:
            problems.add("DICOM files sharing a SOPInstanceUID; remove the copies.", f"{images[uid][0]} and {path}")
        images[uid] = (path, int(ds.Rows), int(ds.Columns), _text(ds, "PatientID"))
    runs: dict[str, list] = {}  # ImageId -> absolute runs, in table order
    for line, cells in rows:
        uid, where = cells[image_column], f"{name} line {line}"
        if uid not in images:
            problems.add(f"table images with no DICOM of that SOPInstanceUID under ROOT {root}; fix ROOT or the "
                         "table.", f"{where}: {uid!r}", line)
            continue
        try:
            runs.setdefault(uid, []).extend(rle_runs(cells[rle_column], images[uid][1] * images[uid][2]))
        except ValueError as exc:
            problems.add("run-length cells that are no valid SIIM encoding (start length pairs or -1); fix them.",
                         f"{where}: {cells[rle_column][:40]!r} {exc}", line)
    entries, masks = [], []
    for uid in runs:
        path, _, _, known = images[uid]
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if not known and not (patients.pattern or patients.each_image):
            problems.add("DICOM images with an empty PatientID; pass --patient-pattern or --no-patient-ids.", path)
            continue
        patient = patients.patient(rel, known, problems, path)
        mask_path = os.path.join(mask_dir, f"{uid}.png")
        entries.append(Entry(path, patient, labels={label_name: "1" if runs[uid] else "0"}, mask_path=mask_path))
        masks.append((uid, mask_path))
    problems.raise_if_any()
    os.makedirs(mask_dir, exist_ok=True)
    for uid, mask_path in masks:  # written only once the whole table is known to be good
        _, n_rows, n_columns, _ = images[uid]
        Image.fromarray(rle_mask(runs[uid], n_rows, n_columns)).save(mask_path)
    notes = [f"{len(skipped)} file(s) under ROOT are no DICOM image and were left out (e.g. {skipped[0]})."] \
        if skipped else []
    unlisted = len(images) - len(runs)
    if unlisted:
        notes.append(f"{unlisted} DICOM image(s) under ROOT are not in {name} (no mask) and were left out.")
    return Layout(entries, (label_name,), (), notes, not patients.each_image)
