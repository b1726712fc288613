"""What the probe evaluates on: the labelled train / val / test slices of ``config.probe``'s manifest
(or of the demo dataset, reusing a pretraining run's files when they are the same dataset), its splits
from the split column or from the fold column through ``config.data.folds``."""

from __future__ import annotations

import csv

from medjax.data.demo import LESION_CLASSES
from medjax.data.labelled import (check_multilabel_cells, check_uncertain_columns, is_binary, split_examples,
                                  uncertain_policy)
from medjax.data.job_manifest import manifest_path, open_manifest
from medjax.data.manifest import check_labels
from medjax.data.sources import DEMO_COLUMNS, demo_manifest, use_run_demo_data
from medjax import console


def load_splits(config, workdir: str, run_dir: str):
    """``({split: Split}, class names, task description, multilabel)`` for the probe's label column(s).

    Several columns make a multi-label task: each cell 1, 0, -1 (uncertain, read by
    ``config.data.uncertain_labels``) or blank (not labelled); every finding needs a positive train slice.
    """
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
    policy = uncertain_policy(config)
    if multilabel:
        check_multilabel_cells(loaded, columns)
    else:
        check_labels(loaded, columns[0])
    check_uncertain_columns(loaded, columns, policy)
    extra = tuple(c for c in DEMO_COLUMNS if c not in columns) if demo else ()
    splits = {s: split_examples(config, manifest, s, columns, demo_rule=demo_rule, extra_columns=extra)
              for s in ("train", "val", "test")}
    if demo_rule:
        names = list(LESION_CLASSES)
        task = "demo lesion class per slice (none unless the lesion shows on the slice)"
    elif multilabel:
        names = list(columns)
        task = f"multi-label findings {', '.join(columns)} of {manifest}"
    elif policy != "ignore" and is_binary(loaded, columns[0]):
        names = ["0", "1"]  # an uncertain -1 read as 0 or 1 may give the class a column's cells lack
        task = f"label column {columns[0]!r} of {manifest}"
    else:
        codes = loaded.classes[columns[0]]
        names = [str(c) for c in range(max(codes.values()) + 1)]
        for v in loaded.label_values(columns[0]):
            names[codes[v]] = v
        task = f"label column {columns[0]!r} of {manifest}"
    if multilabel:
        unlearnable = [c for c, n in zip(columns, (splits["train"].labels == 1).sum(0)) if n == 0]
        if unlearnable:
            raise ValueError(f"Finding column(s) {', '.join(map(repr, unlearnable))} of {manifest} have no positive "
                             f"(1) train slice (uncertain labels read with config.data.uncertain_labels={policy!r}), "
                             "so no head can learn them; add training patients with those findings or leave the "
                             "columns out of config.probe.label_column.")
    else:
        seen = set(splits["train"].labels.tolist())
        for s in ("val", "test"):
            orphans = sorted(set(splits[s].labels.tolist()) - seen)
            if orphans:
                raise ValueError(f"Class(es) {', '.join(names[c] for c in orphans)} occur in {s} slices but in "
                                 "no train slice, so no head can learn them; add training patients of those "
                                 "classes.")
    return splits, names, task, multilabel



