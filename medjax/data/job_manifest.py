"""A manifest as every job opens it: its path checked, ``config.data.folds`` and ``config.data.extra_columns``
applied, and every message naming the config keys a user sets.

Pretraining, the linear probe, fine-tuning and segmentation all load their manifest through ``open_manifest``
(and check the path their config names with ``manifest_path``), so a folder given for a manifest, a fold
column without ``config.data.folds`` or a broken CSV reads the same in every job, whole: the CSV lines of
every failed check included.
"""

from __future__ import annotations

from medjax.data.manifest import Manifest, OptionNames, check_manifest_path, load_manifest, parse_folds

FOLDS_KEY = "config.data.folds"
EXTRA_KEY = "config.data.extra_columns"


def data_folds(config) -> dict[str, tuple[int, ...]] | None:
    """``config.data.folds`` parsed (``{split: folds}``), or None when it is empty; a mistake is one
    sentence naming the key. Every job's validator calls this, before any data is read."""
    return parse_folds(config.data.folds, FOLDS_KEY)


def manifest_path(path: str, key: str, need: str = "") -> str:
    """``path`` when it is a manifest file; a missing path or a folder is one sentence naming ``key``
    (e.g. ``config.probe.manifest``) and the fix."""
    return check_manifest_path(path, key, need)


def extra_columns(config, label_columns=(), extra=()) -> tuple[str, ...]:
    """The columns to accept and leave out of the data: ``config.data.extra_columns`` plus ``extra``
    (the demo manifest's), less the label columns."""
    named = tuple(c.strip() for c in config.data.extra_columns.split(",") if c.strip()) + tuple(extra)
    return tuple(dict.fromkeys(c for c in named if c not in label_columns))


def open_manifest(config, path: str, *, label_columns=(), label_key: str = "", extra=(),
                  masks: bool = True, require_split: bool = True) -> Manifest:
    """The validated manifest at ``path`` with ``config.data.folds`` mapping a fold column to splits;
    ``label_key`` is the config key that names ``label_columns`` (for the messages; "" for a job without
    labels)."""
    label_columns = tuple(label_columns)
    names = OptionNames(labels=label_key, extra=EXTRA_KEY, folds=FOLDS_KEY)
    return load_manifest(path, label_columns=label_columns, folds=data_folds(config),
                         ignore_columns=extra_columns(config, label_columns, extra), masks=masks, names=names,
                         require_split=require_split)
