"""The CSV manifest: which files belong to which patient, split and label, checked before training.

One row per image (a DICOM series folder, a DICOM file, a NIfTI file, a PNG/JPEG):

  patient_id, path, split | fold, [label columns...], [mask_path], [series_uid], [pixel_spacing]

`pixel_spacing` ("row_mm,col_mm") gives the pixel size of a 2D image whose file carries
none (PNG/JPEG); a file's own spacing is never overridden (see `slices.given_spacing`).

Relative paths resolve against the CSV's folder, so a dataset folder can move as
a whole. `split` is train/val/test; instead, an integer `fold` column with a
mapping of folds to splits gives cross-validation splits from one CSV: either
every fold's split (`fold_splits`), or the folds of some splits with the others
in train (`parse_folds` reads that form from JSON, e.g. {"test": [0], "val": [1]}).

Label codes: a named-class column is numbered in sorted order, an integer column
keeps its integers. An empty cell is `UNLABELLED` (-1). A `-1` in an integer
column is CheXpert's "uncertain" and gets its own code, `UNCERTAIN` (-2), so code
that reads uncertain labels can tell them from blank ones, while every reader that
keeps codes >= 0 treats both as unlabelled; "-1" is not a class of the column
(`Manifest.classes` and `label_values` leave it out). Other negative values are
refused.

Everything a user can get wrong in a CSV is found here, before any volume is
read or any step is run, and reported all at once (not one problem per run):
unknown or missing columns, empty patient ids, unknown splits, duplicate rows,
missing files (every one of them), and a patient in two splits, which would
leak that patient's anatomy from train into test and inflate every metric.
Each problem names the CSV line numbers and the fix in one sentence.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence

SPLITS = ("train", "val", "test")
UNLABELLED = -1  # code of an empty label cell
UNCERTAIN = -2  # code of a -1 cell in an integer label column ("uncertain", as in CheXpert)
FOLDS_EXAMPLE = '{"test": [0], "val": [1]}'  # the JSON form of a fold mapping (folds not named -> train)
MAKE_MANIFEST = "python -m medjax.data.make_manifest LAYOUT {folder} --out manifest.csv"  # writes a manifest
KNOWN_COLUMNS = ("patient_id", "path", "split", "fold", "mask_path", "series_uid", "pixel_spacing")
PIXEL_SPACING_EXAMPLE = "0.143,0.143"  # a pixel_spacing cell: row then column spacing of a 2D image, mm
_SHOWN = 5  # offending rows listed per problem
_SHOWN_MISSING = 50  # missing files: list (nearly) all, they are what the user must fix


class ManifestError(ValueError):
    """A manifest problem; `problems` maps each failed check to the CSV line numbers involved."""

    def __init__(self, message: str, problems: Mapping[str, Sequence[int]] | None = None):
        super().__init__(message)
        self.problems = dict(problems or {})


@dataclasses.dataclass(frozen=True)
class OptionNames:
    """What messages call `load_manifest`'s options. A job passes its config keys (a user then reads
    `config.probe.label_column`, not a Python argument); the defaults are neutral. An empty `labels`:
    the caller has no label setting (pretraining), so messages do not point at one."""

    labels: str = "the label-column option"
    extra: str = "the extra-columns option"
    folds: str = "the fold mapping"


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One validated CSV row. `line` is its line number in the CSV (the header is line 1).

    `labels` holds (column, raw text) pairs and `codes` (column, integer class)
    pairs, `UNLABELLED` for an empty cell and `UNCERTAIN` for an uncertain one;
    tuples keep the row hashable and picklable.
    """

    line: int
    patient_id: str
    path: str
    split: str = ""
    fold: int | None = None
    mask_path: str | None = None
    series_uid: str | None = None
    pixel_spacing: tuple[float, float] | None = None  # (row, col) mm of a 2D image whose file carries none
    labels: tuple[tuple[str, str], ...] = ()
    codes: tuple[tuple[str, int], ...] = ()

    def label(self, column: str) -> int:
        """Integer class of this row in `column` (< 0: `UNLABELLED` or `UNCERTAIN`)."""
        for name, code in self.codes:
            if name == column:
                return code
        known = ", ".join(name for name, _ in self.codes) or "none"
        raise KeyError(f"label column {column!r} was not loaded for line {self.line} (loaded: {known}); "
                       f"pass it in load_manifest(label_columns=...).")


class Manifest(Sequence):
    """The validated rows of a CSV (a read-only sequence of `ManifestRow`) plus per-column class codes."""

    def __init__(self, rows: Iterable[ManifestRow], csv_path: str, classes: Mapping[str, Mapping[str, int]]):
        self.rows = tuple(rows)
        self.csv_path = csv_path
        self.classes = {col: dict(codes) for col, codes in classes.items()}  # column -> {text: code}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]

    def __repr__(self) -> str:
        return f"Manifest({self.csv_path!r}, {len(self.rows)} rows, {len(self.patients())} patients)"

    def split(self, name: str) -> "Manifest":
        """The rows of one split, as a Manifest with the same class codes."""
        if name not in SPLITS:
            raise ValueError(f"split={name!r} is not one of {', '.join(SPLITS)}.")
        return Manifest((r for r in self.rows if r.split == name), self.csv_path, self.classes)

    def patients(self) -> tuple[str, ...]:
        """Distinct patient ids, in order of first appearance."""
        return tuple(dict.fromkeys(r.patient_id for r in self.rows))

    def label_values(self, column: str) -> tuple[str, ...]:
        """Distinct non-empty values of a label column, ordered by their integer code."""
        if column not in self.classes:
            raise KeyError(f"label column {column!r} was not loaded (loaded: {', '.join(self.classes) or 'none'}).")
        return tuple(sorted(self.classes[column], key=self.classes[column].get))


def fold_splits(n_folds: int, test_fold: int, val_fold: int | None = None) -> dict[int, str]:
    """Map folds 0..n_folds-1 to splits: `test_fold` -> test, `val_fold` -> val, the rest -> train."""
    if n_folds < 2:
        raise ValueError(f"n_folds={n_folds} must be at least 2 (one fold for test, the rest for training).")
    for name, fold in (("test_fold", test_fold), ("val_fold", val_fold)):
        if fold is not None and not 0 <= fold < n_folds:
            raise ValueError(f"{name}={fold} is not a fold of 0..{n_folds - 1}.")
    if val_fold == test_fold:
        raise ValueError(f"val_fold and test_fold are both {test_fold}; pick two different folds.")
    return {f: "test" if f == test_fold else "val" if f == val_fold else "train" for f in range(n_folds)}


def _listing(lines: Sequence[str], limit: int = _SHOWN) -> str:
    shown = [f"  {text}" for text in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... and {len(lines) - limit} more")
    return "\n".join(shown)


def _read_csv(csv_path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) of every non-blank row; line numbers count quoted newlines."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        rows, start = [], reader.line_num + 1
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((start, [c.strip() for c in cells]))
            start = reader.line_num + 1
    return header, rows


def parse_folds(text: str, key: str = "the fold mapping") -> dict[str, tuple[int, ...]] | None:
    """``{split: folds}`` from JSON such as ``{"test": [0], "val": [1]}`` (folds not named are train), or
    None for an empty text; a mistake ends in one sentence naming ``key``."""
    if not text.strip():
        return None
    fix = f"give a JSON object from split to folds, e.g. '{FOLDS_EXAMPLE}' (folds not named are train)"
    try:
        named = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{key} is not valid JSON ({e.msg}): {text!r}; {fix}.") from None
    if not isinstance(named, dict) or not named:
        raise ValueError(f"{key}={text!r} is not a JSON object naming at least one split; {fix}.")
    unknown = [k for k in named if k not in SPLITS]
    if unknown:
        raise ValueError(f"{key} names unknown split(s) {', '.join(map(repr, unknown))}; use "
                         f"{', '.join(SPLITS)}, e.g. '{FOLDS_EXAMPLE}'.")
    out, owner = {}, {}
    for split, folds in named.items():
        folds = [folds] if isinstance(folds, int) and not isinstance(folds, bool) else folds
        if not isinstance(folds, list) or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0
                                                  for f in folds):
            raise ValueError(f"{key} gives {split} {json.dumps(named[split])}; list the split's folds as "
                             f"non-negative integers, e.g. '{FOLDS_EXAMPLE}'.")
        for f in folds:
            if owner.setdefault(f, split) != split:
                raise ValueError(f"{key} puts fold {f} in both {owner[f]} and {split}; give each fold one split.")
        out[split] = tuple(dict.fromkeys(folds))
    return out


def check_manifest_path(path: str, key: str | None = None, need: str = "") -> str:
    """``path`` when it is a file; else one sentence naming ``key`` (a config key; None: "manifest")
    and the fix, ``need`` saying what the manifest must hold (e.g. " with a label column")."""
    name = f"{key}={path!r}" if key else f"manifest {path}"
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        inside = os.path.join(path, "manifest.csv")
        hint = f" (such as {inside}, which exists)" if os.path.isfile(os.path.join(full, "manifest.csv")) else ""
        raise ManifestError(f"{name} is a folder, not a manifest; give the CSV manifest file{hint}{need}, or "
                            f"write one for a folder of a public dataset layout with "
                            f"`{MAKE_MANIFEST.format(folder=path)}` (its --help lists the layouts).")
    if not os.path.isfile(full):
        raise ManifestError(f"{name} does not exist; give the path of a CSV manifest{need}.")
    return path


def manifest_folds(csv_path: str) -> tuple[int, ...] | None:
    """The distinct whole-number folds of a manifest's fold column (cells that are no whole number are
    left to `load_manifest` to report), or None when it has no fold column."""
    header, rows = _read_csv(csv_path)
    if "fold" not in header:
        return None
    at = header.index("fold")
    return tuple(sorted({int(c[at]) for _, c in rows if len(c) > at and c[at].isdigit()}))


def _check_header(csv_path, header, label_columns, ignore_columns, require_split, folds, names):
    """Column problems make every row unreadable, so they are raised at once, before any row check."""
    name = os.path.basename(csv_path)
    if not header:
        raise ManifestError(f"{csv_path} is empty; it needs a header line (patient_id,path,split,...) and rows.")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ManifestError(f"{name} line 1 names column(s) {', '.join(dupes)} twice; keep one of each.")
    for col in label_columns:
        if col not in header:
            raise ManifestError(f"label column {col!r} is not in the header of {name} (line 1 has: "
                                f"{', '.join(header)}); fix {names.labels or 'the label columns'} or the CSV header.")
        if col in KNOWN_COLUMNS:
            raise ManifestError(f"label column {col!r} is one of the manifest's own columns; rename it.")
    unknown = [h for h in header if h not in KNOWN_COLUMNS and h not in label_columns and h not in ignore_columns]
    if unknown:
        raise ManifestError(f"{name} line 1 has unknown column(s) {', '.join(map(repr, unknown))}; known columns "
                            f"are {', '.join(KNOWN_COLUMNS)}; "
                            + (f"name label columns in {names.labels} and " if names.labels else "name ")
                            + f"columns to accept but leave out of the data in {names.extra}, or rename or remove "
                            "them.")
    missing = [c for c in ("patient_id", "path") if c not in header]
    if missing:
        raise ManifestError(f"{name} line 1 lacks the required column(s) {', '.join(missing)}; add them.")
    if folds is not None and "fold" not in header:
        raise ManifestError(f"{names.folds} is set but {name} has no 'fold' column; add one (a whole number per "
                            f"row, all rows of a patient in one fold) or leave {names.folds} empty.")
    if folds is not None and "split" in header:
        raise ManifestError(f"{name} has a 'split' column and {names.folds} is set too; use one of them: remove "
                            f"the split column, or leave {names.folds} empty to use it.")
    if require_split and "split" not in header and folds is None:
        if "fold" in header:
            raise ManifestError(f"{name} has a 'fold' column but no 'split' column; set {names.folds} to say which "
                                f"folds are test and val, e.g. '{FOLDS_EXAMPLE}' (the other folds train).")
        raise ManifestError(f"{name} has no 'split' column; add one (train, val or test per row), or a 'fold' "
                            f"column with {names.folds}.")


def _full_fold_mapping(folds, present: Sequence[int], name: str, names: OptionNames) -> dict[int, str]:
    """Every fold's split: ``folds`` as it is, or its ``{split: folds}`` form with the manifest's other
    folds in train (a named fold the manifest lacks is refused: a typo would silently empty a split)."""
    if all(isinstance(k, int) for k in folds):
        return dict(folds)
    named = {f: split for split, fs in folds.items() for f in fs}
    absent = sorted(set(named) - set(present))
    if absent:
        raise ManifestError(f"{names.folds} names fold(s) {', '.join(map(str, absent))} that the fold column of "
                            f"{name} does not hold (it holds {', '.join(map(str, present)) or 'none'}); name "
                            "folds of the manifest.")
    return {f: named.get(f, "train") for f in present}


def _encode(values: Iterable[str]) -> dict[str, int]:
    """Class codes of a label column: integer-valued columns keep their integers (class 2 stays 2
    when class 1 is absent from this CSV), and their -1 is uncertain, no class; named classes are
    numbered in sorted order."""
    distinct = sorted({v for v in values if v})
    if all(v.lstrip("-").isdigit() for v in distinct):
        return {v: int(v) for v in distinct if v != "-1"}
    return {v: i for i, v in enumerate(distinct)}


def _code(classes: Mapping[str, int], text: str) -> int:
    if not text:
        return UNLABELLED
    return UNCERTAIN if text == "-1" and text not in classes else classes[text]


def parse_pixel_spacing(text: str) -> tuple[float, float] | None:
    """(row mm, col mm) of a pixel_spacing cell such as "0.143,0.143"; None unless two positive numbers."""
    parts = text.split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        return None
    return values if len(values) == 2 and all(0 < v < float("inf") for v in values) else None


def _split_and_fold(cell: dict, folds, require_split: bool) -> tuple[str, int | None, str | None]:
    """(split, fold, problem) of one row: the split column, or the fold column mapped through `folds`."""
    text = cell.get("fold", "")
    fold = int(text) if text.isdigit() else None
    if folds is not None:
        if fold is None:
            return "", None, f"fold {text!r} is not a whole number"
        if fold not in folds:
            return "", fold, f"fold {text!r} is not one of {sorted(folds)}"
        return folds[fold], fold, None
    split = cell.get("split", "").lower()
    if split not in SPLITS and (split or require_split):
        return split, fold, f"split {cell.get('split', '')!r}"
    return split, fold, None


def load_manifest(csv_path: str, *, label_columns: Sequence[str] = (), require_split: bool = True,
                  folds: Mapping[int, str] | Mapping[str, Sequence[int]] | None = None,
                  ignore_columns: Sequence[str] = (), check_files: bool = True, masks: bool = True,
                  names: OptionNames = OptionNames()) -> Manifest:
    """Read and validate a manifest CSV; raise one `ManifestError` listing every problem found.

    `folds` maps the `fold` column to splits: every fold's split (`fold_splits`), or
    ``{split: folds}`` with the manifest's other folds in train (`parse_folds`). With
    `require_split=False` rows may have no split (pretraining on unlabeled data);
    a patient still may not span two named splits. `check_files=False` skips the
    existence check (for a manifest prepared on another machine). `masks=False`
    leaves the mask_path column out: its cells are neither checked nor kept (for
    jobs that read images only, such as pretraining). `names` says what messages
    call the options (a job's config keys).
    """
    csv_path = os.path.abspath(os.path.expanduser(check_manifest_path(csv_path)))
    label_columns, name = tuple(label_columns), os.path.basename(csv_path)
    header, raw_rows = _read_csv(csv_path)
    _check_header(csv_path, header, label_columns, tuple(ignore_columns), require_split, folds, names)
    if not raw_rows:
        raise ManifestError(f"{name} has a header but no rows; add one row per image.")
    if folds is not None:
        at = header.index("fold")
        present = sorted({int(c[at]) for _, c in raw_rows if len(c) == len(header) and c[at].isdigit()})
        folds = _full_fold_mapping(folds, present, name, names)
    root = os.path.dirname(csv_path)

    def resolve(p: str) -> str:
        return os.path.normpath(os.path.join(root, os.path.expanduser(p)))

    issues: dict[str, list[tuple[int, str]]] = {k: [] for k in ("cells", "empty", "split", "pixel_spacing",
                                                                "missing")}
    parsed, n_paths = [], 0
    for line, cells in raw_rows:
        if len(cells) != len(header):
            issues["cells"].append((line, f"line {line}: {len(cells)} cells for {len(header)} columns"))
            continue
        cell = dict(zip(header, cells))
        paths = {k: resolve(cell[k]) if cell.get(k) and (masks or k == "path") else None
                 for k in ("path", "mask_path")}
        for key, p in paths.items():
            n_paths += p is not None
            if check_files and p and not os.path.exists(p):
                issues["missing"].append((line, f"line {line}: {key} {p}"))
        if not cell["patient_id"] or not cell["path"]:
            what = " and ".join(c for c in ("patient_id", "path") if not cell[c])
            issues["empty"].append((line, f"line {line}: empty {what}"))
            continue
        split, fold, problem = _split_and_fold(cell, folds, require_split)
        if problem:
            issues["split"].append((line, f"line {line}: {problem}"))
            continue
        spacing = parse_pixel_spacing(cell["pixel_spacing"]) if cell.get("pixel_spacing") else None
        if cell.get("pixel_spacing") and spacing is None:
            issues["pixel_spacing"].append((line, f"line {line}: pixel_spacing {cell['pixel_spacing']!r}"))
            continue
        parsed.append(dict(line=line, patient_id=cell["patient_id"], path=paths["path"], split=split, fold=fold,
                           mask_path=paths["mask_path"], series_uid=cell.get("series_uid") or None, pixel_spacing=spacing,
                           labels=tuple((c, cell[c]) for c in label_columns)))

    seen: dict[tuple, int] = {}
    dupes, patient_splits = [], {}
    for r in parsed:
        key = (r["path"], r["series_uid"])
        if key in seen:
            dupes.append((r["line"], f"line {r['line']} repeats line {seen[key]}: {r['path']}"))
        seen.setdefault(key, r["line"])
        if r["split"]:
            patient_splits.setdefault(r["patient_id"], {}).setdefault(r["split"], []).append(r["line"])
    leaks = [(p, s) for p, s in patient_splits.items() if len(s) > 1]

    messages, problems = [], {}
    def report(check, entries, summary, limit=_SHOWN, lines=None):
        if entries:
            problems[check] = sorted(lines or {line for line, _ in entries})
            messages.append(f"{summary}\n{_listing([text for _, text in entries], limit)}")

    report("cells", issues["cells"], f"{len(issues['cells'])} row(s) of {name} have the wrong number of cells; "
           "quote cells that contain commas or fix the row.")
    report("empty", issues["empty"], f"{len(issues['empty'])} row(s) of {name} have an empty patient_id or path; "
           "fill them in or remove the rows.")
    report("split", issues["split"], f"{len(issues['split'])} row(s) of {name} have " + (
        f"a fold that {names.folds} does not place; give every row a whole-number fold of the mapping."
        if folds is not None else f"an unknown split; use one of {', '.join(SPLITS)}."))
    report("pixel_spacing", issues["pixel_spacing"], f"{len(issues['pixel_spacing'])} row(s) of {name} have a "
           "pixel_spacing that is not two positive numbers (row then column spacing in mm, e.g. "
           f"'{PIXEL_SPACING_EXAMPLE}'); fix the cells or leave them empty.")
    report("duplicate", dupes, f"{len(dupes)} row(s) of {name} repeat an image listed earlier (same path and "
           "series_uid), which would count it twice; remove the repeats.")
    report("patient_in_two_splits",
           [(min(min(v) for v in s.values()), f"patient {p!r}: " + ", ".join(
               f"{k} (line{'s' if len(v) > 1 else ''} {', '.join(map(str, v))})" for k, v in s.items()))
            for p, s in leaks],
           f"{len(leaks)} patient(s) of {name} appear in more than one split, which leaks a patient's anatomy "
           "from training into evaluation; put all rows of a patient in one split (or fold).",
           lines={line for _, s in leaks for v in s.values() for line in v})
    n_missing = len(issues["missing"])
    hint = (f" none of them exist, so check that paths are relative to {root} or absolute;"
            if n_missing == n_paths > 1 else "")
    report("missing", issues["missing"], f"{n_missing} file(s) named in {name} do not exist;{hint} fix the paths "
           f"(relative paths resolve against {root}) or remove the rows.", _SHOWN_MISSING)
    if messages:
        lead = f"{name} failed {len(messages)} check(s); fix them before training:\n" if len(messages) > 1 else ""
        raise ManifestError(lead + "\n".join(messages), problems)

    classes = {c: _encode(r["labels"][i][1] for r in parsed) for i, c in enumerate(label_columns)}
    for i, c in enumerate(label_columns):
        bad = [(r["line"], f"line {r['line']}: {r['labels'][i][1]}") for r in parsed
               if classes[c].get(r["labels"][i][1], 0) < 0]
        if bad:
            raise ManifestError(f"label column {c!r} of {name} has negative values other than -1 (uncertain); use "
                                "non-negative integers or class names, -1 for an uncertain label, and leave a cell "
                                f"empty for an unlabeled row.\n{_listing(bad)}",
                                {"negative_label": [line for line, _ in bad]})
    rows = [ManifestRow(**r, codes=tuple((c, _code(classes[c], t)) for c, t in r["labels"])) for r in parsed]
    return Manifest(rows, csv_path, classes)


def check_labels(manifest: Manifest, column: str) -> dict[str, dict[str, int]]:
    """Rows per split and class of a label column; raise if a class never appears in train.

    A class seen only in val or test cannot be learned, and an evaluation
    that contains it measures nothing the model could do; this is refused
    rather than left to show up as a puzzling zero in a per-class metric.
    """
    counts = {s: {} for s in SPLITS}
    lines: dict[tuple[str, str], list[int]] = {}
    manifest.label_values(column)  # a KeyError naming the loaded columns when `column` is not one
    for r in manifest:
        text = dict(r.labels)[column]
        if r.label(column) >= 0 and r.split in counts:
            counts[r.split][text] = counts[r.split].get(text, 0) + 1
            lines.setdefault((r.split, text), []).append(r.line)
    orphans = [(s, c) for s in ("val", "test") for c in counts[s] if c not in counts["train"]]
    if orphans:
        name = os.path.basename(manifest.csv_path)
        entries = [f"class {c!r} in {s}: line(s) {', '.join(map(str, lines[s, c][:_SHOWN]))}" for s, c in orphans]
        raise ManifestError(f"{len(orphans)} class(es) of label column {column!r} in {name} appear in val/test but "
                            f"never in train, so no model can learn them; move some of their patients to train "
                            f"or drop the class.\n{_listing(entries)}",
                            {"class_not_in_train": sorted(l for s, c in orphans for l in lines[s, c])})
    return counts
