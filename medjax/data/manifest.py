"""The CSV manifest: which files belong to which patient, split and label, checked before training.

One row per image (a DICOM series folder, a DICOM file, a NIfTI file, a PNG/JPEG):

  patient_id, path, split | fold, [label columns...], [mask_path], [series_uid]

Relative paths resolve against the CSV's folder, so a dataset folder can move as
a whole. `split` is train/val/test; instead, an integer `fold` column with a
mapping from `fold_splits` gives cross-validation splits from one CSV.

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
import os
from collections.abc import Iterable, Mapping, Sequence

SPLITS = ("train", "val", "test")
KNOWN_COLUMNS = ("patient_id", "path", "split", "fold", "mask_path", "series_uid")
_SHOWN = 5  # offending rows listed per problem
_SHOWN_MISSING = 50  # missing files: list (nearly) all, they are what the user must fix


class ManifestError(ValueError):
    """A manifest problem; `problems` maps each failed check to the CSV line numbers involved."""

    def __init__(self, message: str, problems: Mapping[str, Sequence[int]] | None = None):
        super().__init__(message)
        self.problems = dict(problems or {})


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One validated CSV row. `line` is its line number in the CSV (the header is line 1).

    `labels` holds (column, raw text) pairs and `codes` (column, integer class)
    pairs, -1 for an empty cell; tuples keep the row hashable and picklable.
    """

    line: int
    patient_id: str
    path: str
    split: str = ""
    fold: int | None = None
    mask_path: str | None = None
    series_uid: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    codes: tuple[tuple[str, int], ...] = ()

    def label(self, column: str) -> int:
        """Integer class of this row in `column` (-1 when the cell is empty)."""
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


def _check_header(csv_path, header, label_columns, ignore_columns, require_split, folds):
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
                                f"{', '.join(header)}); fix label_columns or the CSV header.")
        if col in KNOWN_COLUMNS:
            raise ManifestError(f"label column {col!r} is one of the manifest's own columns; rename it.")
    unknown = [h for h in header if h not in KNOWN_COLUMNS and h not in label_columns and h not in ignore_columns]
    if unknown:
        raise ManifestError(f"{name} line 1 has unknown column(s) {', '.join(map(repr, unknown))}; known columns "
                            f"are {', '.join(KNOWN_COLUMNS)}, plus the ones you pass in label_columns "
                            f"(or ignore_columns to keep a column out of the data); rename, remove or name them.")
    missing = [c for c in ("patient_id", "path") if c not in header]
    if missing:
        raise ManifestError(f"{name} line 1 lacks the required column(s) {', '.join(missing)}; add them.")
    if folds is not None and "fold" not in header:
        raise ManifestError(f"folds were given but {name} has no 'fold' column; add one or drop folds=.")
    if folds is not None and "split" in header:
        raise ManifestError(f"{name} has a 'split' column and folds were given too; use one or the other.")
    if require_split and "split" not in header and folds is None:
        hint = " (it has 'fold': pass folds=fold_splits(...))" if "fold" in header else ""
        raise ManifestError(f"{name} has no 'split' column{hint}; add split (train/val/test), or a fold column "
                            "with folds=..., or pass require_split=False for unsplit data.")


def _encode(values: Iterable[str]) -> dict[str, int]:
    """Class codes of a label column: integer-valued columns keep their integers (class 2 stays 2
    when class 1 is absent from this CSV); named classes are numbered in sorted order."""
    distinct = sorted({v for v in values if v})
    if all(v.lstrip("-").isdigit() for v in distinct):
        return {v: int(v) for v in distinct}
    return {v: i for i, v in enumerate(distinct)}


def _split_and_fold(cell: dict, folds, require_split: bool) -> tuple[str, int | None, str | None]:
    """(split, fold, problem) of one row: the split column, or the fold column mapped through `folds`."""
    text = cell.get("fold", "")
    fold = int(text) if text.lstrip("-").isdigit() else None
    if folds is not None:
        if fold not in folds:
            return "", fold, f"fold {text!r} is not one of {sorted(folds)}"
        return folds[fold], fold, None
    split = cell.get("split", "").lower()
    if split not in SPLITS and (split or require_split):
        return split, fold, f"split {cell.get('split', '')!r}"
    return split, fold, None


def load_manifest(csv_path: str, *, label_columns: Sequence[str] = (), require_split: bool = True,
                  folds: Mapping[int, str] | None = None, ignore_columns: Sequence[str] = (),
                  check_files: bool = True, masks: bool = True) -> Manifest:
    """Read and validate a manifest CSV; raise one `ManifestError` listing every problem found.

    `folds` maps the `fold` column to splits (see `fold_splits`). With
    `require_split=False` rows may have no split (pretraining on unlabeled data);
    a patient still may not span two named splits. `check_files=False` skips the
    existence check (for a manifest prepared on another machine). `masks=False`
    leaves the mask_path column out: its cells are neither checked nor kept (for
    jobs that read images only, such as pretraining).
    """
    csv_path = os.path.abspath(os.path.expanduser(csv_path))
    if not os.path.isfile(csv_path):
        raise ManifestError(f"manifest {csv_path} does not exist; check the path.")
    label_columns, name = tuple(label_columns), os.path.basename(csv_path)
    header, raw_rows = _read_csv(csv_path)
    _check_header(csv_path, header, label_columns, tuple(ignore_columns), require_split, folds)
    if not raw_rows:
        raise ManifestError(f"{name} has a header but no rows; add one row per image.")
    root = os.path.dirname(csv_path)

    def resolve(p: str) -> str:
        return os.path.normpath(os.path.join(root, os.path.expanduser(p)))

    issues: dict[str, list[tuple[int, str]]] = {k: [] for k in ("cells", "empty", "split", "missing")}
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
        parsed.append(dict(line=line, patient_id=cell["patient_id"], path=paths["path"], split=split, fold=fold,
                           mask_path=paths["mask_path"], series_uid=cell.get("series_uid") or None,
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
    report("split", issues["split"], f"{len(issues['split'])} row(s) of {name} have an unknown split; use one of "
           f"{', '.join(SPLITS)}" + (" (or a fold in folds=)" if folds is not None else "") + ".")
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
            raise ManifestError(f"label column {c!r} of {name} has negative values; use non-negative integers or "
                                f"class names, and leave a cell empty for an unlabeled row.\n{_listing(bad)}",
                                {"negative_label": [line for line, _ in bad]})
    rows = [ManifestRow(**r, codes=tuple((c, classes[c].get(t, -1)) for c, t in r["labels"])) for r in parsed]
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
        if text and r.split in counts:
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
