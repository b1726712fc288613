"""Public datasets' folder and table layouts -> manifest rows (see ``medjax.data.make_manifest``).

Each layout function reads one way a dataset ships and returns a :class:`Layout`: one
:class:`Entry` per image (absolute paths, patient, official split or fold, labels) and
the names of its label and extra columns. It never writes anything. Every problem in
the input (an image without its mask, an empty class folder, a non-integer fold, ...)
is collected in :class:`Problems` and raised as one :class:`LayoutError` listing all
of them, so a user fixes the dataset in one pass rather than one error per run.

Here: ``class-folders``, ``image-mask-folders``, ``fold-table`` and the parts every
layout shares (patients, the one directory walk, the table reader). ``label-table``
lives in ``label_table``, the DICOM layouts in ``dicom_layouts``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re

import numpy as np

from medjax.data.manifest import ManifestError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz")  # what medjax.readers reads by name
# Split folder names of public datasets (matched case-insensitively) -> the manifest's split.
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
_LISTED = 50  # entries shown per kind of problem


class LayoutError(ManifestError):
    """Every problem a layout found in its input; ``problems`` maps each kind to the CSV lines involved."""


class Problems:
    """Collects a layout's input problems by kind, to raise them all at once."""

    def __init__(self, subject: str):
        self.subject = subject
        self.kinds: dict[str, list[str]] = {}
        self.lines: dict[str, list[int]] = {}

    def add(self, kind: str, entry: str, line: int | None = None) -> None:
        """``kind``: one sentence saying what is wrong and the fix; ``entry``: the file or CSV line."""
        self.kinds.setdefault(kind, []).append(entry)
        self.lines.setdefault(kind, [])
        if line is not None:
            self.lines[kind].append(line)

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def raise_if_any(self) -> None:
        if not self.kinds:
            return
        total = sum(len(v) for v in self.kinds.values())
        parts = [f"{self.subject}: {total} problem(s) of {len(self.kinds)} kind(s); fix them and run again:"]
        for kind, entries in self.kinds.items():
            parts.append(f"{len(entries)} x {kind}")
            parts += [f"  {e}" for e in entries[:_LISTED]]
            if len(entries) > _LISTED:
                parts.append(f"  ... and {len(entries) - _LISTED} more")
        raise LayoutError("\n".join(parts), self.lines)


@dataclasses.dataclass
class Entry:
    """One manifest row before writing: absolute paths, its patient, split or fold, labels, extras."""

    path: str
    patient_id: str
    split: str = ""
    fold: int | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # label column -> cell text
    extras: dict[str, str] = dataclasses.field(default_factory=dict)  # other kept columns -> cell text
    mask_path: str | None = None
    series_uid: str | None = None


@dataclasses.dataclass
class Layout:
    """What a layout found: its rows, which columns are labels, which are kept besides, and remarks."""

    entries: list[Entry]
    label_columns: tuple[str, ...] = ()
    extra_columns: tuple[str, ...] = ()
    notes: list[str] = dataclasses.field(default_factory=list)  # printed as warnings after writing
    patients_known: bool = True  # False: each image is its own patient, leakage cannot be checked


@dataclasses.dataclass(frozen=True)
class PatientRule:
    """Where patient ids come from: ``pattern`` (a regex over the path under ROOT whose first group is
    the patient), ``each_image`` (every image its own patient), else what the layout knows."""

    pattern: str = ""
    each_image: bool = False

    def __post_init__(self):
        if self.pattern and self.each_image:
            raise LayoutError("--patient-pattern and --no-patient-ids contradict each other; pass one of them.")
        if self.pattern:
            try:
                groups = re.compile(self.pattern).groups
            except re.error as exc:
                raise LayoutError(f"--patient-pattern {self.pattern!r} is not a valid regular expression "
                                  f"({exc}); fix it.") from None
            if groups < 1:
                raise LayoutError(f"--patient-pattern {self.pattern!r} has no group; put the patient part in "
                                  "parentheses, e.g. 'patient(\\d+)'.")

    def require(self, layout: str) -> None:
        """Folder layouts carry no patient ids: the user must say how to get them."""
        if not (self.pattern or self.each_image):
            raise LayoutError(f"{layout} folders do not say which images belong to one patient; pass "
                              "--patient-pattern REGEX (its first group, searched in each image's path, is the "
                              "patient) or --no-patient-ids (each image its own patient; leakage unchecked).")

    def patient(self, relpath: str, known: str | None, problems: Problems, where: str) -> str:
        """The patient of the image at ``relpath`` (under ROOT); ``known``: the layout's own id, if any."""
        if self.each_image:
            return relpath
        if self.pattern:
            found = re.search(self.pattern, relpath)
            if found and found.group(1):
                return found.group(1)
            problems.add(f"paths that --patient-pattern {self.pattern!r} does not match; fix the pattern.", where)
            return ""
        if not known:
            problems.add("rows without a patient id; fill them in or pass --patient-pattern / --no-patient-ids.",
                         where)
            return ""
        return known


def relative(path: str, root: str) -> str:
    """``path`` under ``root`` with '/' separators (what patient patterns are matched against)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def image_stem(name: str) -> str | None:
    """File name without its image suffix, or None for a file that is not an image."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def walk_files(root: str) -> list[str]:
    """Every non-hidden file under ``root`` (absolute paths, sorted): one walk, scandir-fast."""
    found, stack = [], [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for item in it:
                if item.name.startswith("."):
                    continue
                if item.is_dir(follow_symlinks=True):
                    stack.append(item.path)
                else:
                    found.append(item.path)
    return sorted(found)


def subfolders(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def require_folder(root: str) -> str:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise LayoutError(f"ROOT {root} is not a folder; give the dataset's top folder.")
    return root


def read_table(path: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (names stripped: SIIM's ' EncodedPixels' is 'EncodedPixels') and (CSV line, cells) rows."""
    if not os.path.isfile(path):
        raise LayoutError(f"--table {path} does not exist; give the dataset's CSV.")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        rows, start, bad = [], reader.line_num + 1, []
        for cells in reader:
            if any(c.strip() for c in cells):
                if len(cells) != len(header):
                    bad.append(f"{os.path.basename(path)} line {start}: {len(cells)} cells for {len(header)} columns")
                rows.append((start, dict(zip(header, (c.strip() for c in cells)))))
            start = reader.line_num + 1
    if not header:
        raise LayoutError(f"--table {path} is empty; it needs a header line and rows.")
    if bad:
        problems = Problems(path)
        for b in bad:
            problems.add("rows with the wrong number of cells; quote cells that contain commas.", b)
        problems.raise_if_any()
    return header, rows


def require_columns(path: str, header: list[str], wanted: dict[str, str]) -> None:
    """``wanted``: option -> column; one sentence naming every absent column and the header."""
    absent = [f"{option} {column!r}" for option, column in wanted.items() if column and column not in header]
    if absent:
        raise LayoutError(f"{os.path.basename(path)} has no column {', '.join(absent)} (its header: "
                          f"{', '.join(header)}); fix the option(s).")


def class_folders(root: str, patients: PatientRule) -> Layout:
    """``ROOT/[split/]class/image``: label ``label`` = the class folder; split folders map to splits."""
    root = require_folder(root)
    patients.require("class-folders")
    problems, entries, notes, skipped = Problems(f"class-folders {root}"), [], [], []
    tops = subfolders(root)
    is_split = [t.lower() in SPLIT_FOLDERS for t in tops]
    if any(is_split) and not all(is_split):
        for top, flag in zip(tops, is_split):
            if not flag:
                problems.add("folders beside split folders that are no split (train/val/test, Training/Testing, "
                             "valid, validation); move or remove them.", os.path.join(root, top))
    groups = [(SPLIT_FOLDERS[t.lower()], os.path.join(root, t)) for t, f in zip(tops, is_split) if f] \
        if any(is_split) else [("", root)]
    if not tops:
        problems.add("a ROOT without class folders; give the folder that holds one folder per class.", root)
    for split, folder in groups:
        classes = subfolders(folder)
        if split and not classes:
            problems.add("split folders without class folders; put the images in one folder per class.", folder)
        for name in classes:
            images = []
            for path in walk_files(os.path.join(folder, name)):
                (images if image_stem(os.path.basename(path)) is not None else skipped).append(path)
            if not images:
                problems.add("empty class folders (no .png/.jpg/.dcm/.nii image); add images or remove them.",
                             os.path.join(folder, name))
            for path in images:
                rel = relative(path, root)
                entries.append(Entry(path, patients.patient(rel, None, problems, path), split,
                                     labels={"label": name}))
    problems.raise_if_any()
    if skipped:
        notes.append(f"{len(skipped)} file(s) in class folders are no image and were left out (e.g. {skipped[0]}).")
    return Layout(entries, ("label",), (), notes, not patients.each_image)


def _pairs(folder: str, problems: Problems) -> tuple[list[tuple[str, str]], list[str], int]:
    """(image, mask) pairs by file stem in folder/images and folder/masks, files that are no image, and how
    many image files there were; unpaired files are problems."""
    found, skipped = {}, []
    for part in ("images", "masks"):
        names = {n.lower(): n for n in os.listdir(folder)}
        sub = os.path.join(folder, names.get(part, part))
        stems: dict[str, str] = {}
        for path in walk_files(sub) if os.path.isdir(sub) else []:
            stem = image_stem(os.path.basename(path))
            if stem is None:
                skipped.append(path)
            elif stem in stems:
                problems.add(f"{part} sharing a file stem (pairs are made by stem); rename or remove one.",
                             f"{stems[stem]} and {path}")
            else:
                stems[stem] = path
        found[part] = stems
    images, masks = found["images"], found["masks"]
    for stem in sorted(set(images) - set(masks)):
        problems.add("images without a mask (masks/<same stem>.*); add the mask or remove the image.", images[stem])
    for stem in sorted(set(masks) - set(images)):
        problems.add("masks without an image (images/<same stem>.*); add the image or remove the mask.", masks[stem])
    return [(images[s], masks[s]) for s in sorted(set(images) & set(masks))], skipped, len(images) + len(masks)


def _mask_notes(pairs: list[tuple[str, str]], sampled_values: int = 20) -> list[str]:
    """What the jobs' mask options must say about raster masks: another size than the image (headers of
    the first 2,000 pairs) or stored values other than labels (pixels of the first few masks)."""
    from PIL import Image

    raster = [(i, m) for i, m in pairs[:2000] if i.lower().endswith((".png", ".jpg", ".jpeg"))
              and m.lower().endswith((".png", ".jpg", ".jpeg"))]
    other, values, notes = [], set(), []
    for k, (image, mask) in enumerate(raster):
        try:
            with Image.open(image) as a, Image.open(mask) as b:
                if a.size != b.size:
                    other.append((mask, b.size, a.size))
                if k < sampled_values:
                    values |= set(np.unique(np.asarray(b)).tolist())
        except OSError:
            continue  # unreadable files are named when the manifest is checked (medjax.data.check)
    if other:
        path, (mw, mh), (iw, ih) = other[0]
        notes.append(f"{len(other)} of {len(raster)} masks checked have another size than their image (e.g. {path}: "
                     f"{mw}x{mh} vs {iw}x{ih}); train with --config.data.mask_resample=True or resample them.")
    stored = sorted(v for v in values if isinstance(v, int) and v > 0)
    if stored and stored[-1] > 1:
        mapping = ", ".join(f'"{v}": {n}' for n, v in enumerate(stored, 1))
        shown = min(len(raster), sampled_values)
        notes.append(f"masks store the values {', '.join(map(str, sorted(values)))} (first {shown} masks); map them "
                     f"to labels with --config.data.mask_values='{{{mapping}}}'.")
    return notes


def image_mask_folders(root: str, patients: PatientRule) -> Layout:
    """``ROOT/class/images/*`` + ``ROOT/class/masks/*`` (or ROOT/images + ROOT/masks), paired by stem."""
    root = require_folder(root)
    patients.require("image-mask-folders")
    problems, entries, notes = Problems(f"image-mask-folders {root}"), [], []
    tops = subfolders(root)
    flat = {"images", "masks"} <= {t.lower() for t in tops}
    classes = [("", root)] if flat else [(t, os.path.join(root, t)) for t in tops]
    if not classes:
        problems.add("a ROOT with neither images/ + masks/ nor class folders holding them; give the dataset folder.",
                     root)
    skipped, paired = [], []
    for name, folder in classes:
        if not flat and not {"images", "masks"} <= {s.lower() for s in subfolders(folder)}:
            problems.add("class folders without both images/ and masks/ subfolders; add them or move the folder "
                         "out of ROOT.", folder)
            continue
        pairs, extra, n_files = _pairs(folder, problems)
        skipped += extra
        if not n_files:
            problems.add("empty class folders (no image with its mask); add them or remove the folder.", folder)
        for image, mask in pairs:
            rel = relative(image, root)
            entries.append(Entry(image, patients.patient(rel, None, problems, image),
                                 labels={"label": name} if name else {}, mask_path=mask))
        paired += pairs
    problems.raise_if_any()
    if skipped:
        notes.append(f"{len(skipped)} file(s) in images/ or masks/ are no image and were left out "
                     f"(e.g. {skipped[0]}).")
    notes += _mask_notes(paired)
    return Layout(entries, ("label",) if not flat else (), (), notes, not patients.each_image)


def _parse_renames(renames) -> dict[str, str]:
    mapping = {}
    for item in renames or ():
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise LayoutError(f"--column {item!r} is not OLD=NEW; write e.g. --column PatientID=patient_id.")
        mapping[old.strip()] = new.strip()
    return mapping


def fold_table(root: str, table: str, patients: PatientRule, *, fold_column: str = "fold", renames=(),
               label_columns=(), test_fold: int | None = None, val_fold: int | None = None) -> Layout:
    """A table with one row per image and an integer fold; paths resolve against ROOT (or are absolute).

    Columns are renamed by ``renames`` ("OLD=NEW"); ``fold_column`` names the table's fold column
    (written as ``fold``). Without ``test_fold`` only the fold is written: the jobs map folds to splits
    with ``config.data.folds`` or rotate them with ``cv_folds``. With it, a ``split`` is written too:
    ``test_fold`` becomes test, ``val_fold`` val (None: val is carved from the training folds later).
    """
    root = require_folder(root)
    header, rows = read_table(table)
    mapping = _parse_renames(renames)
    require_columns(table, header, {"--fold-column": fold_column, **{f"--column {k}=": k for k in mapping}})
    named = [mapping.get(h, h) for h in header]
    if "path" not in named:
        raise LayoutError(f"{os.path.basename(table)} has no 'path' column (its header: {', '.join(header)}); "
                          "rename the image column with --column NAME=path.")
    if "patient_id" not in named and not (patients.pattern or patients.each_image):
        raise LayoutError(f"{os.path.basename(table)} has no 'patient_id' column (its header: {', '.join(header)}); "
                          "rename it with --column NAME=patient_id, or pass --patient-pattern / --no-patient-ids.")
    own = {"path", "patient_id", "mask_path", "series_uid"}
    dropped = {fold_column} | {h for h, n in zip(header, named) if n in ("split", "fold") and h != fold_column}
    kept = [n for h, n in zip(header, named) if n not in own and h not in dropped]
    unknown = [c for c in label_columns if c not in kept]
    if unknown:
        raise LayoutError(f"--label-columns names {', '.join(unknown)}, not columns of {os.path.basename(table)} "
                          f"after renaming (label candidates: {', '.join(kept) or 'none'}); fix the option.")
    problems, entries, name = Problems(f"fold-table {table}"), [], os.path.basename(table)
    folds = set()
    for line, cells in rows:
        cell = {mapping.get(k, k): v for k, v in cells.items() if k not in dropped}
        text = cells.get(fold_column, "")
        if not text.isdigit():
            problems.add(f"folds in column {fold_column!r} that are no non-negative integer; use 0, 1, 2, ...",
                         f"{name} line {line}: {text!r}", line)
            continue
        fold = int(text)
        folds.add(fold)
        path = os.path.normpath(os.path.join(root, os.path.expanduser(cell["path"]))) if cell["path"] else ""
        if not path or not os.path.exists(path):
            problems.add(f"paths that do not exist under ROOT {root}; fix the table or ROOT.",
                         f"{name} line {line}: {cell['path']!r}", line)
            continue
        mask = cell.get("mask_path")
        mask = os.path.normpath(os.path.join(root, mask)) if mask else None
        if mask and not os.path.exists(mask):
            problems.add(f"mask paths that do not exist under ROOT {root}; fix the table or ROOT.",
                         f"{name} line {line}: {cell['mask_path']!r}", line)
        split = ("" if test_fold is None else
                 "test" if fold == test_fold else "val" if fold == val_fold else "train")
        entries.append(Entry(path, patients.patient(relative(path, root), cell.get("patient_id"), problems,
                                                    f"{name} line {line}"),
                             split, fold, {c: cell[c] for c in label_columns},
                             {c: cell[c] for c in kept if c not in label_columns}, mask,
                             cell.get("series_uid") or None))
    if val_fold is not None and test_fold is None:
        problems.add("--val-fold without --test-fold; give both, or neither and map folds with config.data.folds.",
                     f"--val-fold {val_fold}")
    for option, fold in (("--test-fold", test_fold), ("--val-fold", val_fold)):
        if fold is not None and folds and fold not in folds:
            problems.add(f"{option} values that are no fold of the table; choose one of the folds.",
                         f"{option} {fold} (folds: {', '.join(map(str, sorted(folds)))})")
    patient_folds: dict[str, set] = {}
    for e in entries:
        patient_folds.setdefault(e.patient_id, set()).add(e.fold)
    for patient, in_folds in patient_folds.items():
        if len(in_folds) > 1 and patient:
            problems.add("patients in more than one fold (their anatomy would leak between folds); give all rows "
                         "of a patient one fold.", f"patient {patient!r}: folds {sorted(in_folds)}")
    problems.raise_if_any()
    extras = tuple(c for c in kept if c not in label_columns)
    return Layout(entries, tuple(label_columns), extras, [], not patients.each_image)
