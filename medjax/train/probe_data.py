"""What a probe evaluates: a pretraining run's checkpoint and the labelled slices of a manifest.

Shared by the linear probe, kNN and the evaluators that run during pretraining:
``load_run`` reads a run's own config and teacher backbone from a checkpoint,
``load_splits`` turns a manifest (or the demo dataset) into eval-transformed
slices with their labels and patient ids. One label column gives a multi-class
task; several comma-separated columns of 0/1 values give a multi-label task
(one sigmoid output per column, as for chest X-ray findings).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from medjax.checkpoint import host_arrays, tree_fingerprint
from medjax.data.demo import LESION_CLASSES
from medjax.data.manifest import ManifestError, check_labels, load_manifest
from medjax.train.pretrain_config import apply_variant, recipe
from medjax.train.pretrain_data import DEMO_COLUMNS, demo_fingerprint, demo_manifest, is_demo_folder, slice_source
from medjax.train.ssl_model import init_params


# ---------------------------------------------------------------- loading a pretraining run


def checkpoint_steps(run_dir: str) -> list[int]:
    """Sorted steps saved under ``run_dir/checkpoints``; raises one sentence when there are none."""
    root = os.path.join(os.path.abspath(run_dir), "checkpoints")
    steps = sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []
    if not steps:
        raise FileNotFoundError(f"No checkpoints in {root}; point config.probe.checkpoint_dir at the --workdir "
                                "of a pretraining run.")
    return steps


def load_run(run_dir: str, step: int | None = None):
    """(config, teacher backbone params, step) of a pretraining run's checkpoint (latest if None or -1).

    The config is the run's own, read from the checkpoint's ``meta`` item and laid over the
    recipe's defaults, so keys added to the recipe since that run keep their default values.
    """
    steps = checkpoint_steps(run_dir)
    step = steps[-1] if step is None or step < 0 else int(step)
    if step not in steps:
        raise ValueError(f"The run {run_dir} has no checkpoint at step {step}; it has steps "
                         f"{', '.join(map(str, steps))}.")
    path = os.path.join(os.path.abspath(run_dir), "checkpoints", str(step))
    with open(os.path.join(path, "meta", "metadata")) as f:
        saved = json.load(f)["config"]
    config = apply_variant(recipe(registers=saved["model"]["num_register_tokens"]), "demo", "load_run")
    _overlay(config, saved)
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(path, "state"))
    return config, host_arrays(state["teacher"]["backbone"]), step


def _overlay(config: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(config.get(key), ml_collections.ConfigDict):
            _overlay(config[key], value)
        elif key in config:
            with config.ignore_type():
                config[key] = tuple(value) if isinstance(value, list) else value


def check_backbone_shapes(models, params, config, where: str) -> None:
    """A checkpoint whose backbone does not fit the model its own saved config builds: one sentence."""
    expected = jax.eval_shape(lambda: init_params(models, jax.random.PRNGKey(0), config)["backbone"])
    want = {k: v[0] for k, v in tree_fingerprint(expected).items()}
    have = {k: v[0] for k, v in tree_fingerprint(params).items()}
    if want != have:
        differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        k = differ[0]
        raise ValueError(f"The teacher backbone in {where} does not match the model its saved config builds "
                         f"({len(differ)} parameters differ, e.g. {k}: checkpoint {have.get(k)} vs model "
                         f"{want.get(k)}); the checkpoint and its config are from different models.")


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class Split:
    """Eval-transformed slices ``(N, S, S, 1)``, labels ``(N,)`` or ``(N, L)`` 0/1, patient ids ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray
    patients: np.ndarray

    def subset(self, index: np.ndarray) -> "Split":
        return Split(self.images[index], self.labels[index], self.patients[index])


def eval_transform(image: np.ndarray, size: int, mean: float, std: float) -> np.ndarray:
    """The whole slice resized to ``size`` (bicubic), clipped to [0, 1] and normalised as in pretraining."""
    x = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC))
    return ((np.clip(x, 0.0, 1.0) - np.float32(mean)) / np.float32(std)).astype(np.float32)


def split_examples(config, manifest: str, split: str, label_columns, *, demo_rule: bool = False,
                   extra_columns=()) -> Split:
    """The labelled slices of one split (slices without a label are dropped).

    With the demo rule a slice's label is its patient's lesion class when the lesion mask shows
    on that slice, else 0 (none): a slice-level task, so the answer is in the pixels. With
    several label columns a slice is kept when every column is labelled.
    """
    label_columns = (label_columns,) if isinstance(label_columns, str) else tuple(label_columns)
    records = slice_source(config, manifest, split, label_columns=label_columns, extra_columns=extra_columns)
    size, mean, std = config.crops.global_size, config.crops.mean[0], config.crops.std[0]
    xs, ys, pids = [], [], []
    for r in records:
        values = [r["label"]] + [r[f"label_{c}"] for c in label_columns[1:]]
        if demo_rule:
            values = [values[0] if r["mask"].any() else 0]
        if min(values) < 0:
            continue
        xs.append(eval_transform(r["image"], size, mean, std))
        ys.append(values if len(label_columns) > 1 else values[0])
        pids.append(r["patient_id"])
    if not xs:
        raise ValueError(f"The {split} split of {manifest} has no labelled slices; the probe needs labelled "
                         f"train, val and test slices.")
    return Split(np.stack(xs)[..., None], np.asarray(ys, np.int64), np.asarray(pids))


def split_images(config, manifest: str, split: str, label_column: str, *, demo_rule: bool,
                 extra_columns=()) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split; see ``split_examples``."""
    s = split_examples(config, manifest, split, label_column, demo_rule=demo_rule, extra_columns=extra_columns)
    return s.images, s.labels


def load_splits(config, workdir: str, run_dir: str):
    """``({split: Split}, class names, task description, multilabel)`` for the probe's label column(s)."""
    p = config.probe
    demo = not p.manifest
    if demo:
        # Reuse the pretraining run's demo files when they are the same dataset; never rewrite that run's folder.
        run_data = os.path.join(os.path.abspath(run_dir), "demo_data")
        if not config.data.demo_dir and is_demo_folder(run_data, demo_fingerprint(config)):
            config.data.demo_dir = run_data
        manifest = demo_manifest(config, workdir, say=print)
    else:
        manifest = p.manifest
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"config.probe.manifest={manifest!r} does not exist; give the path of a CSV "
                                    "manifest with a label column.")
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
    try:
        loaded = load_manifest(manifest, label_columns=columns, ignore_columns=ignore
                               + tuple(c for c in config.data.extra_columns.split(",") if c and c not in columns))
        if not multilabel:
            check_labels(loaded, columns[0])
    except ManifestError as e:
        raise ValueError(str(e).splitlines()[0]) from None
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



