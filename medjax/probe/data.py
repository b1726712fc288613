"""What the probe evaluates on: the labelled train / val / test slices of ``config.probe``'s manifest
(or of the demo dataset, reusing a pretraining run's files when they are the same dataset), its splits
from the split column or from the fold column through ``config.data.folds``."""

from __future__ import annotations

import csv

from medjax.data.demo import LESION_CLASSES
from medjax.data.labelled import split_examples
from medjax.data.job_manifest import manifest_path, open_manifest
from medjax.data.manifest import check_labels
from medjax.data.sources import DEMO_COLUMNS, demo_manifest, use_run_demo_data
from medjax import console


def load_splits(config, workdir: str, run_dir: str):
    """``({split: Split}, class names, task description, multilabel)`` for the probe's label column(s)."""
    p = config.probe
    demo = not p.manifest
    if demo:
        use_run_demo_data(config, run_dir)
        manifest = demo_manifest(config, workdir, say=console.say)
    else:
        manifest = manifest_path(p.manifest, "config.probe.manifest", " with a label column")
    columns = tuple(c.strip() for c in (p.label_column or ("lesion" if demo else "")).split(",") if c.strip())
    if not columns:
        raise ValueError("config.probe.label_column is empty; name the manifest column that holds the labels "
                         "(or several comma-separated 0/1 columns for a multi-label task).")
    with open(manifest, newline="") as f:
        header = next(csv.reader(f), [])
    for column in columns:
        if column not in header:
            raise ValueError(f"config.probe.label_column={column!r} is not a column of {manifest} (it has "
                             f"{', '.join(header)}); name one of its label columns.")
    multilabel = len(columns) > 1
    demo_rule = demo and not p.label_column
    ignore = tuple(c for c in DEMO_COLUMNS if c not in columns and c in header)
    loaded = open_manifest(config, manifest, label_columns=columns, label_key="config.probe.label_column",
                           extra=ignore, masks=demo_rule)
    if not multilabel:
        check_labels(loaded, columns[0])
    if multilabel:
        for column in columns:
            values = set(loaded.label_values(column))
            if not values <= {"0", "1"}:
                raise ValueError(f"Label column {column!r} of {manifest} holds {', '.join(sorted(values))}; a "
                                 "multi-label probe needs 0/1 columns (one per finding).")
    extra = tuple(c for c in DEMO_COLUMNS if c not in columns) if demo else ()
    splits = {s: split_examples(config, manifest, s, columns, demo_rule=demo_rule, extra_columns=extra)
              for s in ("train", "val", "test")}
    if demo_rule:
        names = list(LESION_CLASSES)
        task = "demo lesion class per slice (none unless the lesion shows on the slice)"
    elif multilabel:
        names = list(columns)
        task = f"multi-label findings {', '.join(columns)} of {manifest}"
    else:
        codes = loaded.classes[columns[0]]
        names = [str(c) for c in range(max(codes.values()) + 1)]
        for v in loaded.label_values(columns[0]):
            names[codes[v]] = v
        task = f"label column {columns[0]!r} of {manifest}"
    if multilabel:
        for s in ("train", "val"):
            if splits[s].labels.sum() == 0:
                raise ValueError(f"No {s} slice is positive for any of {', '.join(columns)}; a multi-label probe "
                                 "needs positive examples to train and select on.")
    else:
        seen = set(splits["train"].labels.tolist())
        for s in ("val", "test"):
            orphans = sorted(set(splits[s].labels.tolist()) - seen)
            if orphans:
                raise ValueError(f"Class(es) {', '.join(names[c] for c in orphans)} occur in {s} slices but in "
                                 "no train slice, so no head can learn them; add training patients of those "
                                 "classes.")
    return splits, names, task, multilabel



