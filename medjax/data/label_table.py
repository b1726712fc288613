"""The ``label-table`` layout: a CSV of image names (or relative paths) with findings, images under ROOT.

Two kinds of tables are read:

* one cell of findings per image, joined by a separator (NIH ChestX-ray14's ``Finding Labels``:
  ``Effusion|Infiltration``): ``labels_column`` and ``separator`` give one 0/1 column per finding,
  named after it; the ``no_finding`` value (``No Finding``) means all zeros, it is no class;
* one column per finding holding 1 / 0 / -1 (uncertain) / blank (not mentioned), as CheXpert's
  ``train.csv``: ``finding_columns`` names them, or ``findings_after`` takes every column after the
  named one. Values are kept as they are (``1.0`` is written ``1``); anything else is refused.

Images are found with one walk of ROOT (a name -> path dict, so a table of 112,120 rows costs one
walk, not one search per row); a cell holding a relative path (CheXpert's
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``) resolves under ROOT, with its
leading folders dropped when ROOT is already inside them. Official split lists (image names, one per
line) give the splits; an image in no list is left out and counted. Pixel-spacing columns (x, y mm)
become the manifest's ``pixel_spacing`` (row, col); with the original width/height columns they are
rescaled to each stored file's own size (NIH measured them on the original image, its PNGs are 1024x1024).
"""

from __future__ import annotations

import math
import os

from PIL import Image

from medjax.data.layouts import (Entry, Layout, LayoutError, PatientRule, Problems, read_table, require_columns,
                                 require_folder, walk_files)
from medjax.data.manifest import KNOWN_COLUMNS, SPLITS
from medjax.readers.image_data import reason


class _ImageIndex:
    """Every file under ROOT by name and by relative path, from one walk."""

    def __init__(self, root: str):
        self.root = root
        cut = len(os.path.join(root, ""))
        self.by_name: dict[str, str] = {}
        self.ambiguous: dict[str, list[str]] = {}
        self.relative: set[str] = set()
        for path in walk_files(root):
            rel = path[cut:].replace(os.sep, "/")
            self.relative.add(rel)
            name = os.path.basename(path)
            if name in self.by_name:
                self.ambiguous.setdefault(name, [self.by_name[name]]).append(path)
            self.by_name[name] = path

    def find(self, cell: str) -> tuple[str | None, str]:
        """(absolute path or None, why not found) of a table's image cell."""
        cell = cell.replace("\\", "/").strip("/")
        if "/" in cell:  # a relative path: under ROOT as it is, or with its leading folders dropped
            parts = cell.split("/")
            for k in range(len(parts)):
                if "/".join(parts[k:]) in self.relative:
                    return os.path.join(self.root, *parts[k:]), ""
            return None, "not found"
        if cell in self.ambiguous:
            return None, "ambiguous: " + ", ".join(self.ambiguous[cell][:3])
        found = self.by_name.get(cell)
        return found, "" if found else "not found"


def _finding_value(text: str) -> str | None:
    """A CheXpert-style cell as written (1, 0, -1, or blank), None when it is none of them."""
    if not text:
        return ""
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value in (1.0, 0.0, -1.0) else None


def _pixel_spacing(cells: dict, spacing_columns, size_columns, path: str, where: str, line: int,
                   problems: Problems) -> str:
    """The manifest's pixel_spacing cell ("row_mm,col_mm") from the table's x, y spacing columns; with the
    original width, height columns, rescaled to the stored file's own size (read from its header only)."""
    numbers = []
    for column in (*spacing_columns, *size_columns):
        try:
            value = float(cells[column])
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            problems.add("pixel spacings (mm) or original sizes (pixels) that are no positive number; fix the cells "
                         "or drop --spacing-columns / --original-size-columns.", f"{where}: {column}={cells[column]!r}",
                         line)
            return ""
        numbers.append(value)
    x, y = numbers[:2]
    if size_columns:
        try:
            with Image.open(path) as img:  # lazy: the header gives the size, no pixels are decoded
                width, height = img.size
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError for damaged files
            problems.add("images whose size cannot be read for --original-size-columns; re-export or remove them.",
                         f"{where}: {path} ({reason(exc)})", line)
            return ""
        x, y = x * numbers[2] / width, y * numbers[3] / height
    return f"{y:.6g},{x:.6g}"


def _read_split_lists(split_lists: dict[str, str], problems: Problems) -> dict[str, str]:
    """Image name -> split from the official lists; an image in two lists is a problem."""
    where: dict[str, str] = {}
    for split, path in split_lists.items():
        if split not in SPLITS:
            raise LayoutError(f"--split-lists {split}={path}: {split!r} is not one of {', '.join(SPLITS)}; "
                              "write e.g. train=train_val_list.txt test=test_list.txt.")
        if not os.path.isfile(path):
            raise LayoutError(f"--split-lists {split}={path}: the file does not exist; check the path.")
        with open(path, encoding="utf-8-sig") as f:
            for number, text in enumerate(f, 1):
                name = text.strip()
                if not name:
                    continue
                if name in where and where[name] != split:
                    problems.add("images in two split lists; keep each image in one list.",
                                 f"{name}: {where[name]} and {split} ({os.path.basename(path)} line {number})")
                where.setdefault(name, split)
    return where


def _findings_columns(header, finding_columns, findings_after, table) -> tuple[str, ...]:
    if findings_after:
        require_columns(table, header, {"--findings-after": findings_after})
        return tuple(header[header.index(findings_after) + 1:])
    return tuple(finding_columns)


def label_table(root: str, table: str, patients: PatientRule, *, image_column: str, patient_column: str = "",
                labels_column: str = "", separator: str = "|", no_finding: str = "No Finding",
                finding_columns=(), findings_after: str = "", keep_columns=(), spacing_columns=(),
                original_size_columns=(), split_lists: dict[str, str] | None = None) -> Layout:
    """Rows of ``table`` with their images found under ``root``; see the module docstring."""
    root = require_folder(root)
    header, rows = read_table(table)
    name = os.path.basename(table)
    if not image_column:
        raise LayoutError(f"label-table needs --image-column, the column of {name} naming each image "
                          f"(its header: {', '.join(header)}).")
    if labels_column and (finding_columns or findings_after):
        raise LayoutError("--labels-column and --finding-columns/--findings-after describe two kinds of table; "
                          "pass one of them.")
    if not (patient_column or patients.pattern or patients.each_image):
        raise LayoutError(f"label-table needs the patient of each image: --patient-column (a column of {name}), "
                          "--patient-pattern REGEX over the image path, or --no-patient-ids.")
    if spacing_columns and len(spacing_columns) != 2:
        raise LayoutError(f"--spacing-columns names {len(spacing_columns)} column(s); give two, x then y, e.g. "
                          "'OriginalImagePixelSpacing[x,y]' (NIH's two columns).")
    if original_size_columns and (len(original_size_columns) != 2 or not spacing_columns):
        raise LayoutError(f"--original-size-columns names {len(original_size_columns)} column(s)"
                          + ("" if spacing_columns else " without --spacing-columns")
                          + "; give two, width then height, e.g. 'OriginalImage[Width,Height]' (NIH's two columns), "
                            "together with --spacing-columns.")
    findings = _findings_columns(header, finding_columns, findings_after, table)
    require_columns(table, header, {"--image-column": image_column, "--patient-column": patient_column,
                                    "--labels-column": labels_column,
                                    **{f"--finding-columns {c!r}": c for c in findings},
                                    **{f"--keep-columns {c!r}": c for c in keep_columns},
                                    **{f"--spacing-columns {c!r}": c for c in spacing_columns},
                                    **{f"--original-size-columns {c!r}": c for c in original_size_columns}})
    problems = Problems(f"label-table {table}")
    if labels_column:
        vocabulary = sorted({f.strip() for _, cells in rows for f in cells[labels_column].split(separator)
                             if f.strip() and f.strip() != no_finding})
    else:
        vocabulary = list(findings)
    kept = list(keep_columns)
    taken = [c for c in vocabulary if c in KNOWN_COLUMNS or c in kept]
    if taken:
        raise LayoutError(f"finding(s) {', '.join(taken)} would be written under a name medjax reserves or a kept "
                          "column uses; rename them in the table or drop them from --keep-columns.")
    listed = _read_split_lists(split_lists, problems) if split_lists else None
    index = _ImageIndex(root)
    entries, unlisted, seen = [], [], {}
    for line, cells in rows:
        where = f"{name} line {line}"
        cell = cells[image_column]
        path, why = index.find(cell) if cell else (None, "empty cell")
        if path is None:
            problems.add(f"table images not found under ROOT {root} (or found twice); fix ROOT, the table or the "
                         "files.", f"{where}: {cell!r} ({why})", line)
            continue
        if path in seen:
            problems.add("images listed twice in the table; keep one row per image.",
                         f"{where}: {cell!r} (also line {seen[path]})", line)
            continue
        seen[path] = line
        labels = {}
        if labels_column:
            names = {f.strip() for f in cells[labels_column].split(separator) if f.strip()}
            if not names or (no_finding in names and len(names) > 1):
                problems.add(f"finding cells that are empty or mix {no_finding!r} with findings; write the "
                             "findings or the no-finding value alone.", f"{where}: {cells[labels_column]!r}", line)
            labels = {f: "1" if f in names else "0" for f in vocabulary}
        for column in findings:
            value = _finding_value(cells[column])
            if value is None:
                problems.add("finding values outside 1 / 0 / -1 (uncertain) / blank; fix the cells or leave the "
                             "column out of --finding-columns.", f"{where}: {column}={cells[column]!r}", line)
            labels[column] = value or ""
        extras = {c: cells[c] for c in keep_columns}
        if spacing_columns:  # a known manifest column, written by make_manifest after the others
            extras["pixel_spacing"] = _pixel_spacing(cells, spacing_columns, original_size_columns, path, where,
                                                     line, problems)
        split = ""
        if listed is not None:
            split = listed.get(cell) or listed.get(os.path.basename(path), "")
            if not split:
                unlisted.append(cell)
                continue
        rel = path[len(os.path.join(root, "")):].replace(os.sep, "/")
        patient = patients.patient(rel, cells.get(patient_column) if patient_column else None, problems, where)
        entries.append(Entry(path, patient, split, labels=labels, extras=extras))
    if listed is not None:
        spans: dict[str, set] = {}
        for e in entries:
            spans.setdefault(e.patient_id, set()).add(e.split)
        for patient, splits in spans.items():
            if len(splits) > 1:
                problems.add("patients in two split lists (their anatomy would leak into evaluation); move all "
                             "their images into one list.", f"patient {patient!r}: {', '.join(sorted(splits))}")
    problems.raise_if_any()
    notes = []
    if unlisted:
        notes.append(f"{len(unlisted)} image(s) of {name} are in no split list and were left out "
                     f"(e.g. {', '.join(unlisted[:3])}).")
    if listed is not None:
        found = {os.path.basename(e.path) for e in entries}
        absent = [n for n in listed if n not in found and os.path.basename(n) not in found]
        if absent:
            notes.append(f"{len(absent)} name(s) of the split lists are not rows of {name} (e.g. {absent[0]}).")
    if original_size_columns:
        notes.append(f"pixel_spacing (row, col mm) is {', '.join(spacing_columns)} rescaled from the original size "
                     f"{', '.join(original_size_columns)} to each stored file's own size (spacing * original / "
                     "stored, per axis).")
    elif spacing_columns:
        notes.append(f"pixel_spacing (row, col mm) is {', '.join(spacing_columns)} written as given, not rescaled: if "
                     "they describe the original image and the stored files were resized (NIH's PNGs are "
                     "1024x1024), pass --original-size-columns too (NIH: 'OriginalImage[Width,Height]').")
    return Layout(entries, tuple(vocabulary), tuple(kept), notes, not patients.each_image)
