"""Turns a public dataset's layout into a medjax manifest CSV, checked, with the flags that use it.

    python -m medjax.data.make_manifest LAYOUT ROOT --out manifest.csv [options]

Layouts (``medjax.data.layouts``, ``label_table``, ``dicom_layouts``):

  class-folders        ROOT/[Training|Testing|train|val|test/]<class>/<image>; label column ``label``
  image-mask-folders   ROOT/<class>/images/* + ROOT/<class>/masks/* (or ROOT/images + ROOT/masks), by stem
  label-table          --table Data_Entry_2017.csv --image-column 'Image Index' --patient-column 'Patient ID'
                       --labels-column 'Finding Labels' [--separator '|'] [--no-finding 'No Finding']
                       [--split-lists train=train_val_list.txt test=test_list.txt]
                       [--spacing-columns 'OriginalImagePixelSpacing[x,y]'] [--keep-columns 'Patient Age']
                       [--original-size-columns 'OriginalImage[Width,Height]'] (spacing -> pixel_spacing,
                       rescaled to each file's own size)
                       or CheXpert: --table train.csv --image-column Path --patient-pattern 'patient(\\d+)'
                       --findings-after AP/PA (or --finding-columns A,B,C) [--keep-columns Frontal/Lateral]
  fold-table           --table folds.csv --column PatientID=patient_id [--fold-column fold] [--test-fold 0]
                       [--val-fold 1] [--label-columns A,B]
  dicom-tree           [--label-from series_description | --label-map map.csv]
  rle-table            --table train-rle.csv [--mask-dir DIR]; DICOMs found under ROOT by SOPInstanceUID

Patients: class and image-mask folders carry no patient ids, so one of ``--patient-pattern REGEX``
(its first group, searched in the path under ROOT, is the patient) or ``--no-patient-ids`` (each
image its own patient; a warning says leakage cannot be checked) is required there.

Splits: what the layout does not provide is carved BY PATIENT from the patients without one (or
from the training patients when only val or test is missing): ``--val-fraction`` (0.1) and
``--test-fraction`` (0.1) of them, stratified by class when there is one label column, the same
for the same ``--seed``. Paths are written relative to the output CSV's folder; the written file
is read back with ``load_manifest`` before the summary is printed. Any problem of the input is
listed with its file or CSV line, all at once, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import math
import os
import shlex
import sys

import numpy as np

from medjax import console
from medjax.data.dicom_layouts import LABEL_SOURCES, dicom_tree, rle_table
from medjax.data.label_table import label_table
from medjax.data.layouts import Layout, LayoutError, PatientRule, class_folders, fold_table, image_mask_folders
from medjax.data.manifest import KNOWN_COLUMNS, SPLITS, ManifestError, load_manifest

LAYOUTS = ("class-folders", "image-mask-folders", "label-table", "fold-table", "dicom-tree", "rle-table")
# Options each layout reads besides the common ones; any other option given is refused by name.
_OPTIONS = {
    "class-folders": (),
    "image-mask-folders": (),
    "label-table": ("table", "image_column", "patient_column", "labels_column", "separator", "no_finding",
                    "finding_columns", "findings_after", "keep_columns", "spacing_columns", "original_size_columns",
                    "split_lists"),
    "fold-table": ("table", "fold_column", "column", "label_columns", "test_fold", "val_fold"),
    "dicom-tree": ("label_from", "label_map"),
    "rle-table": ("table", "mask_dir", "image_column", "rle_column", "label_name"),
}


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip()) if text else ()


def _split_lists(items) -> dict[str, str] | None:
    if not items:
        return None
    lists = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep or not path:
            raise LayoutError(f"--split-lists {item!r} is not SPLIT=FILE; write e.g. train=train_val_list.txt.")
        lists[split.strip()] = path.strip()
    return lists


def build_layout(args) -> Layout:
    """The layout ``args.layout`` read from ``args.root`` with its options."""
    patients = PatientRule(args.patient_pattern, args.no_patient_ids)
    if args.layout in ("label-table", "fold-table", "rle-table") and not args.table:
        raise LayoutError(f"{args.layout} needs --table, the dataset's CSV.")
    if args.layout == "class-folders":
        return class_folders(args.root, patients)
    if args.layout == "image-mask-folders":
        return image_mask_folders(args.root, patients)
    if args.layout == "label-table":
        return label_table(args.root, args.table, patients, image_column=args.image_column or "",
                           patient_column=args.patient_column, labels_column=args.labels_column,
                           separator=args.separator, no_finding=args.no_finding,
                           finding_columns=_columns(args.finding_columns), findings_after=args.findings_after,
                           keep_columns=_columns(args.keep_columns), spacing_columns=_columns(args.spacing_columns),
                           original_size_columns=_columns(args.original_size_columns),
                           split_lists=_split_lists(args.split_lists))
    if args.layout == "fold-table":
        return fold_table(args.root, args.table, patients, fold_column=args.fold_column, renames=args.column,
                          label_columns=_columns(args.label_columns), test_fold=args.test_fold,
                          val_fold=args.val_fold)
    if args.layout == "dicom-tree":
        return dicom_tree(args.root, patients, label_from=args.label_from, label_map=args.label_map)
    mask_dir = args.mask_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "masks")
    return rle_table(args.root, args.table, patients, mask_dir=os.path.abspath(mask_dir),
                     image_column=args.image_column or "ImageId", rle_column=args.rle_column,
                     label_name=args.label_name)


def _allocate(sizes: dict[str, int], fraction: float, cap: dict[str, int]) -> dict[str, int]:
    """Patients per stratum for ``fraction`` of all: floors, then the largest remainders, within ``cap``."""
    exact = {k: fraction * n for k, n in sizes.items()}
    counts = {k: min(math.floor(v), cap[k]) for k, v in exact.items()}
    rest = round(fraction * sum(sizes.values())) - sum(counts.values())
    for k in sorted(sizes, key=lambda k: (counts[k] - exact[k], k)):
        if rest <= 0:
            break
        if counts[k] < cap[k]:
            counts[k], rest = counts[k] + 1, rest - 1
    return counts


def carve_splits(layout: Layout, *, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Give the splits the layout lacks, by patient (stratified by class with one label column); returns notes."""
    for name, fraction in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise LayoutError(f"{name} {fraction} is not a fraction in [0, 1); give e.g. 0.1.")
    if val_fraction + test_fraction >= 1:
        raise LayoutError(f"--val-fraction {val_fraction} + --test-fraction {test_fraction} leave no training "
                          "patients; make them smaller.")
    if all(e.fold is not None and not e.split for e in layout.entries):
        return []  # folds only: the jobs map them to splits (config.data.folds) or rotate them (cv_folds)
    present = {e.split for e in layout.entries}
    pool_split = "" if present == {""} else "train"
    wanted = {s: f for s, f in (("test", test_fraction), ("val", val_fraction)) if s not in present and f > 0}
    if not wanted and pool_split:
        return []  # every split came with the data (or was asked to stay empty)
    pool = [e for e in layout.entries if e.split == pool_split]
    column = layout.label_columns[0] if len(layout.label_columns) == 1 else None
    votes: dict[str, collections.Counter] = {}
    for e in pool:
        votes.setdefault(e.patient_id, collections.Counter())[e.labels.get(column, "") if column else ""] += 1
    strata: dict[str, list[str]] = {}
    for patient in sorted(votes):
        label = min(votes[patient].items(), key=lambda kv: (-kv[1], kv[0]))[0]
        strata.setdefault(label, []).append(patient)
    rng = np.random.default_rng(seed)
    for key in sorted(strata):
        rng.shuffle(strata[key])
    sizes = {k: len(v) for k, v in strata.items()}
    assigned, taken = {}, {k: 0 for k in strata}
    for split, fraction in wanted.items():
        counts = _allocate(sizes, fraction, {k: sizes[k] - taken[k] for k in strata})
        for key, n in counts.items():
            for patient in strata[key][taken[key]:taken[key] + n]:
                assigned[patient] = split
            taken[key] += n
    for e in pool:
        e.split = assigned.get(e.patient_id, "train")
    notes = [f"{split} carved from {len(votes)} {'training ' if pool_split else ''}patients: "
             f"{sum(1 for s in assigned.values() if s == split)} patients ({fraction:g})"
             + (f", stratified by {column}" if column else "") for split, fraction in wanted.items()]
    return notes


def write_manifest(layout: Layout, out: str) -> list[str]:
    """Write the rows to ``out`` (paths relative to its folder); returns the header."""
    out = os.path.abspath(out)
    folder = os.path.dirname(out)
    os.makedirs(folder, exist_ok=True)
    entries = layout.entries
    if not entries:
        raise LayoutError("the layout gave no rows; check ROOT and the options.")
    own = ["patient_id", "path"] + (["split"] if any(e.split for e in entries) else []) \
        + (["fold"] if any(e.fold is not None for e in entries) else [])
    tail = (["mask_path"] if any(e.mask_path for e in entries) else []) \
        + (["series_uid"] if any(e.series_uid for e in entries) else []) \
        + (["pixel_spacing"] if any(e.extras.get("pixel_spacing") for e in entries) else [])
    header = own + list(layout.label_columns) + tail + list(layout.extra_columns)
    clash = sorted({c for c in layout.label_columns + layout.extra_columns if c in KNOWN_COLUMNS}
                   | {c for c in header if header.count(c) > 1})
    if clash:
        raise LayoutError(f"column name(s) {', '.join(clash)} would be written twice or clash with medjax's own "
                          "columns; rename them in the input.")

    def rel(path):
        return os.path.relpath(path, folder) if path else ""

    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for e in entries:
            cells = {"patient_id": e.patient_id, "path": rel(e.path), "split": e.split,
                     "fold": "" if e.fold is None else str(e.fold), "mask_path": rel(e.mask_path),
                     "series_uid": e.series_uid or "", **e.labels, **e.extras}
            writer.writerow([cells.get(c, "") for c in header])
    return header


def label_split(layout: Layout) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(label columns, those of them holding -1 = uncertain, which load as labels with uncertain cells)."""
    uncertain = tuple(c for c in layout.label_columns if any(e.labels.get(c) == "-1" for e in layout.entries))
    return tuple(layout.label_columns), uncertain


def check_written(layout: Layout, out: str):
    """Read the written CSV back as every job will (raises ManifestError)."""
    folds = sorted({e.fold for e in layout.entries if e.fold is not None})
    fold_only = bool(folds) and not any(e.split for e in layout.entries)
    return load_manifest(out, label_columns=layout.label_columns, ignore_columns=layout.extra_columns,
                         require_split=not fold_only)


def summary_table(layout: Layout) -> str:
    """Rows, patients and classes per split as a small text table."""
    splits = [s for s in SPLITS if any(e.split == s for e in layout.entries)] or [""]
    lines = [("", [s or "(none)" for s in splits] + ["all"])]
    by = {s: [e for e in layout.entries if e.split == s] for s in splits}
    groups = list(by.values()) + [layout.entries]
    lines.append(("rows", [str(len(g)) for g in groups]))
    lines.append(("patients", [str(len({e.patient_id for e in g})) for g in groups]))
    columns = layout.label_columns
    for c in columns:
        values = sorted({e.labels.get(c, "") for e in layout.entries} - {""})
        if len(columns) > 1 and set(values) <= {"0", "1", "-1"}:
            values = [v for v in ("1", "-1") if v in values]  # positives (and uncertain) of a finding
        for v in values:
            lines.append((f"{c}={v}", [str(sum(1 for e in g if e.labels.get(c) == v)) for g in groups]))
    width = max(len(name) for name, _ in lines)
    cells = [max(len(row[i]) for _, row in lines) for i in range(len(groups))]
    return "\n".join(f"  {name:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(row, cells))
                     for name, row in lines)


def usage_flags(layout: Layout, out: str) -> list[str]:
    """The command lines and config flags that use the written manifest."""
    labels, uncertain = label_split(layout)
    others = tuple(c for c in layout.label_columns + layout.extra_columns)
    q = shlex.quote
    extra = [q(f"--config.data.extra_columns={','.join(others)}")] if others else []
    folds = sorted({e.fold for e in layout.entries if e.fold is not None})
    fold_only = bool(folds) and not any(e.split for e in layout.entries)
    if fold_only:
        mapping = {"test": folds[:1], "val": folds[1:2]} if len(folds) > 2 else {"test": folds[:1]}
        extra.append(q(f"--config.data.folds={json.dumps(mapping)}"))
    check = ["python -m medjax.data.check", q(out)]
    if labels:
        check.append(f"--label-columns {q(','.join(labels))}")
    if layout.extra_columns:
        check.append(f"--ignore-columns {q(','.join(layout.extra_columns))}")
    lines = [f"  check the images:  {' '.join(check)}",
             f"  pretraining:       {' '.join([q(f'--config.data.manifest={out}')] + extra)}"]
    def flags(*items):
        return " ".join([q(i) for i in items] + extra)

    if labels:
        targets = "(" + ",".join(f'"{c}"' for c in labels) + ("," if len(labels) == 1 else "") + ")"
        multi = "  (several 0/1 columns: a multi-label probe)" if len(labels) > 1 else ""
        lines.append("  linear probe:      " + flags(f"--config.probe.manifest={out}",
                                                     f"--config.probe.label_column={','.join(labels)}") + multi)
        lines.append("  fine-tuning:       " + flags(f"--config.finetune.manifest={out}",
                                                     f"--config.finetune.targets={targets}"))
        if fold_only and folds == list(range(len(folds))) and len(folds) >= 3:
            lines.append(f"  cross-validation:  the probe or fine-tuning lines without --config.data.folds, with "
                         f"--config.probe.cv_folds={len(folds)} or --config.finetune.cv_folds={len(folds)}")
    if any(e.mask_path for e in layout.entries):
        name = labels[0] if len(labels) == 1 and layout.label_columns != ("label",) else "foreground"
        lines.append("  segmentation:      " + flags(f"--config.segment.manifest={out}",
                                                     f'--config.segment.class_names=("background","{name}")')
                     + ("" if any(e.extras.get("pixel_spacing") for e in layout.entries) else
                        "  (PNG pixels count as 1 mm unless --config.segment.assumed_spacing_mm='(row,col)')"))
    if uncertain:
        lines.append(f"  columns holding -1 (uncertain), kept as they are and read as unlabelled there: "
                     f"{', '.join(uncertain)}; map -1 to 0 or 1 "
                     "(or leave the column out) where a job needs 0/1 labels.")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medjax.data.make_manifest", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("layout", choices=LAYOUTS)
    p.add_argument("root", help="the dataset's top folder")
    p.add_argument("--out", default="manifest.csv", help="manifest CSV to write (default manifest.csv)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="patients carved for val where none is given")
    p.add_argument("--test-fraction", type=float, default=0.1, help="patients carved for test where none is given")
    p.add_argument("--seed", type=int, default=0, help="seed of the carving")
    p.add_argument("--patient-pattern", default="", help="regex over the path under ROOT; group 1 = patient")
    p.add_argument("--no-patient-ids", action="store_true", help="each image its own patient (leakage unchecked)")
    p.add_argument("--table", default="", help="the dataset's CSV (label-table, fold-table, rle-table)")
    p.add_argument("--image-column", default=None, help="table column naming the image (rle-table: ImageId)")
    p.add_argument("--patient-column", default="", help="table column of the patient id")
    p.add_argument("--labels-column", default="", help="table column of findings joined by --separator")
    p.add_argument("--separator", default="|", help="separator of the findings in --labels-column")
    p.add_argument("--no-finding", default="No Finding", help="the findings value meaning none (all zeros)")
    p.add_argument("--finding-columns", default="", help="comma-separated 1/0/-1/blank finding columns")
    p.add_argument("--findings-after", default="", help="every column after this one is a finding column")
    p.add_argument("--keep-columns", default="", help="comma-separated table columns copied as extra columns")
    p.add_argument("--spacing-columns", default="", help="x,y pixel-spacing columns (mm) -> pixel_spacing (row,col)")
    p.add_argument("--original-size-columns", default="",
                   help="width,height columns of the image the spacing was measured on: rescaled to each file's size")
    p.add_argument("--split-lists", nargs="+", metavar="SPLIT=FILE", help="official lists of image names")
    p.add_argument("--fold-column", default="fold", help="the table's fold column (written as fold)")
    p.add_argument("--column", action="append", metavar="OLD=NEW", help="rename a table column (repeatable)")
    p.add_argument("--label-columns", default="", help="comma-separated label columns of a fold-table")
    p.add_argument("--test-fold", type=int, default=None,
                   help="fold written as split test (default: folds only, mapped by config.data.folds)")
    p.add_argument("--val-fold", type=int, default=None, help="fold written as split val (default: carved)")
    p.add_argument("--label-from", default="", choices=("",) + LABEL_SOURCES, help="dicom-tree label column source")
    p.add_argument("--label-map", default="", help="CSV pattern,label mapping series descriptions to labels")
    p.add_argument("--mask-dir", default="", help="where rle-table writes mask PNGs (default OUT's folder/masks)")
    p.add_argument("--rle-column", default="EncodedPixels", help="rle-table column of the run-length encoding")
    p.add_argument("--label-name", default="pneumothorax", help="rle-table label column: 1 when the mask is not empty")
    return p


def _refuse_foreign_options(args, parser) -> None:
    common = {"layout", "root", "out", "val_fraction", "test_fraction", "seed", "patient_pattern", "no_patient_ids"}
    given = [a for a in vars(args) if a not in common and getattr(args, a) != parser.get_default(a)]
    foreign = [a for a in given if a not in _OPTIONS[args.layout]]
    if foreign:
        names = ", ".join("--" + a.replace("_", "-") for a in foreign)
        raise LayoutError(f"{names} do(es) not apply to the {args.layout} layout; leave them out.")


def make_manifest(args, parser=None):
    """Read the layout, carve splits, write and re-check the CSV; returns (layout, notes, manifest)."""
    _refuse_foreign_options(args, parser or build_parser())
    layout = build_layout(args)
    notes = carve_splits(layout, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    write_manifest(layout, args.out)
    return layout, notes + layout.notes, check_written(layout, args.out)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        layout, notes, manifest = make_manifest(args, parser)
    except ManifestError as e:
        print(f"medjax.data.make_manifest: error: {e}", file=sys.stderr)
        return 1
    out = args.out
    console.say(f"wrote {out}: {len(manifest)} rows, {len(manifest.patients())} patients ({args.layout})")
    console.say(summary_table(layout))
    if not layout.patients_known:
        console.warn("--no-patient-ids: each image is its own patient, so images of one patient may sit in two "
                     "splits and leakage cannot be checked; use --patient-pattern when the paths name patients.")
    folds = collections.Counter((e.fold, e.split) for e in layout.entries if e.fold is not None)
    if folds:
        console.say("folds: " + ", ".join(f"{f} ({n} rows{', ' + s if s else ''})"
                                          for (f, s), n in sorted(folds.items())))
    for note in notes:
        console.say(f"note: {note}")
    console.say("use it:")
    for line in usage_flags(layout, out):
        console.say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
