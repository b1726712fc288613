"""The linear-probe trainer: DINOv2's 52-head linear evaluation of a pretraining run's teacher backbone.

    python -m medjax.main --config=configs/linear_probe.py:demo --workdir=runs/probe \
        --config.probe.checkpoint_dir=runs/demo

The backbone is frozen, so its features are computed once per backbone (eval
transform: the whole slice resized to the global crop size and normalised as in
pretraining) and the 52 heads of ``linear_heads`` are trained on those arrays;
no image passes through the ViT again during training. The reference trains on
random-resized crops instead; with a frozen backbone that costs a full forward
pass per step, which on the scan sizes this project targets would dominate the
probe, and precomputed features make every head see exactly the same inputs.

Every head is evaluated on val at fixed intervals and at the end; the head with
the best final val score is the one reported on test, as in the reference. The
same protocol runs on a randomly initialised backbone so that a reader can see
how much of the score pretraining earned.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from medjax import metrics
from medjax.checkpoint import content_hash, tree_fingerprint
from medjax.data.demo import LESION_CLASSES
from medjax.data.manifest import ManifestError, check_labels, load_manifest
from medjax.train import linear_heads as lh
from medjax.train.pretrain_config import apply_variant, recipe
from medjax.train.pretrain_data import DEMO_COLUMNS, demo_manifest, slice_source
from medjax.train.ssl_model import build_models, init_params

SELECTIONS = ("accuracy", "balanced_accuracy")
_EVAL_CHUNK = 1024  # rows per evaluate() call: bounds the (52, rows, C) logits in memory


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
    return config, state["teacher"]["backbone"], step


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


def split_images(config, manifest: str, split: str, label_column: str, *, demo_rule: bool,
                 extra_columns=()):
    """(N, S, S, 1) eval-transformed slices of one split and their labels (unlabelled slices dropped).

    With the demo rule a slice's label is its patient's lesion class when the lesion mask shows
    on that slice, else 0 (none): a slice-level task, so the answer is in the pixels.
    """
    records = slice_source(config, manifest, split, label_columns=(label_column,), extra_columns=extra_columns)
    size = config.crops.global_size
    mean, std = np.float32(config.crops.mean[0]), np.float32(config.crops.std[0])
    xs, ys = [], []
    for r in records:
        label = (r["label"] if r["mask"].any() else 0) if demo_rule else r["label"]
        if label < 0:
            continue
        x = np.asarray(Image.fromarray(r["image"], mode="F").resize((size, size), Image.BICUBIC))
        xs.append((np.clip(x, 0.0, 1.0) - mean) / std)
        ys.append(int(label))
    if not xs:
        raise ValueError(f"The {split} split of {manifest} has no labelled slices; the probe needs labelled "
                         f"train, val and test slices.")
    return np.stack(xs)[..., None].astype(np.float32), np.asarray(ys, np.int64)


def load_splits(config, workdir: str, run_dir: str):
    """{split: (images, labels)}, the class names and a one-line description of the task."""
    p = config.probe
    demo = not p.manifest
    if demo:
        # Reuse the pretraining run's demo files when they are the same dataset; never rewrite that run's folder.
        run_data = os.path.join(os.path.abspath(run_dir), "demo_data")
        if not config.data.demo_dir and _same_demo(config, run_data):
            config.data.demo_dir = run_data
        manifest = demo_manifest(config, workdir, say=print)
    else:
        manifest = p.manifest
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"config.probe.manifest={manifest!r} does not exist; give the path of a CSV "
                                    "manifest with a label column.")
    column = p.label_column or ("lesion" if demo else "")
    if not column:
        raise ValueError("config.probe.label_column is empty; name the manifest column that holds the labels.")
    with open(manifest, newline="") as f:
        header = next(csv.reader(f), [])
    if column not in header:
        raise ValueError(f"config.probe.label_column={column!r} is not a column of {manifest} (it has "
                         f"{', '.join(header)}); name one of its label columns.")
    demo_rule = demo and not p.label_column
    ignore = tuple(c for c in DEMO_COLUMNS if c != column and c in header)
    try:
        loaded = load_manifest(manifest, label_columns=(column,), ignore_columns=ignore
                               + tuple(c for c in config.data.extra_columns.split(",") if c and c != column))
        check_labels(loaded, column)
    except ManifestError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    extra = tuple(c for c in DEMO_COLUMNS if c != column) if demo else ()
    splits = {s: split_images(config, manifest, s, column, demo_rule=demo_rule, extra_columns=extra)
              for s in ("train", "val", "test")}
    if demo_rule:
        names = list(LESION_CLASSES)
        task = "demo lesion class per slice (none unless the lesion shows on the slice)"
    else:
        values = loaded.label_values(column)
        codes = loaded.classes[column]
        names = [str(c) for c in range(max(codes.values()) + 1)]
        for v in values:
            names[codes[v]] = v
        task = f"label column {column!r} of {manifest}"
    seen = set(splits["train"][1].tolist())
    for s in ("val", "test"):
        orphans = sorted(set(splits[s][1].tolist()) - seen)
        if orphans:
            raise ValueError(f"Class(es) {', '.join(names[c] for c in orphans)} occur in {s} slices but in no "
                             "train slice, so no head can learn them; add training patients of those classes.")
    return splits, names, task


def _same_demo(config, folder: str) -> bool:
    stamp = os.path.join(folder, "demo.json")
    d = config.data
    want = {"patients": d.demo_patients, "image_size": d.demo_image_size, "slices": d.demo_slices,
            "seed": config.seed}
    return os.path.exists(stamp) and json.load(open(stamp)) == want


# ---------------------------------------------------------------- features and training


@functools.lru_cache(maxsize=4)
def _feature_fn(backbone):
    """One jitted feature function per backbone module, with the params as an argument: the
    pretrained and the random-init backbone share one compiled program."""

    @jax.jit
    def one(params, x):
        out = backbone.apply({"params": params}, x, train=False, n_last_blocks=4)
        return lh.probe_features(out["last_blocks_norm"], backbone.num_register_tokens)

    return one


def embed(backbone, params, images: np.ndarray, batch: int) -> dict:
    """``probe_features`` of every image, as numpy: computed once, then only the heads train.

    The last batch is padded to full size so that one compiled shape serves every batch.
    """
    one = _feature_fn(backbone)
    parts = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        pad = batch - len(x)
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        parts.append({k: v[:batch - pad] for k, v in jax.device_get(one(params, x)).items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def all_logits(state, feats: dict) -> np.ndarray:
    """``(52, N, C)`` logits of every head."""
    n = len(feats["patch_mean"])
    return np.concatenate([np.asarray(lh.evaluate(state, {k: v[i:i + _EVAL_CHUNK] for k, v in feats.items()}))
                           for i in range(0, n, _EVAL_CHUNK)], axis=1)


def head_scores(logits: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[float]]:
    preds = logits.argmax(-1)
    return ([metrics.accuracy(labels, p) for p in preds], [metrics.balanced_accuracy(labels, p) for p in preds])


def train_heads(p, feats: dict, labels: np.ndarray, val_feats: dict, val_labels: np.ndarray,
                num_classes: int, seed: int, say=print):
    """Trains the 52 heads; returns the state and the val history ``[{step, accuracy, balanced_accuracy}]``.

    Batches are consecutive slices of per-epoch permutations from ``seed``, all of one size (one
    compile); a training set smaller than ``batch_size`` gives batches of the whole set, and the
    grid's lr scaling uses that real batch size.
    """
    n = len(labels)
    batch = min(p.batch_size, n)
    steps_per_epoch = p.epoch_length or math.ceil(n / batch)
    total = p.epochs * steps_per_epoch
    eval_every = p.eval_every or steps_per_epoch
    rng = np.random.default_rng(seed)
    state = lh.init_state(jax.random.PRNGKey(seed), feats["patch_mean"].shape[1], num_classes, batch)
    order, pos, history = rng.permutation(n), 0, []
    device_feats = {k: jnp.asarray(v) for k, v in feats.items()}
    device_labels = jnp.asarray(labels, jnp.int32)
    for step in range(total):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = jnp.asarray(order[pos:pos + batch])
        pos += batch
        state, losses = lh.train_step(state, {k: v[idx] for k, v in device_feats.items()}, device_labels[idx],
                                      lh.cosine_factor(step, total))
        if (step + 1) % eval_every == 0 or step + 1 == total:
            acc, bal = head_scores(all_logits(state, val_feats), val_labels)
            history.append({"step": step + 1, "accuracy": acc, "balanced_accuracy": bal})
            say(f"  step {step + 1}/{total}: mean loss {float(jnp.mean(losses)):.4f}, best val accuracy "
                f"{max(acc):.3f}, best val balanced accuracy {max(bal):.3f}")
    return state, history, {"batch_size": batch, "steps": total, "steps_per_epoch": steps_per_epoch,
                            "eval_every": eval_every}


def probe_backbone(name, models, params, splits, class_names, config, workdir, say=print) -> dict:
    """The whole protocol for one backbone; returns its JSON-ready result."""
    p = config.probe
    say(f"{name}: computing features of {sum(len(v[1]) for v in splits.values())} slices ...")
    feats = {s: embed(models.backbone, params, x, p.feature_batch) for s, (x, _) in splits.items()}
    labels = {s: y for s, (_, y) in splits.items()}
    state, history, schedule = train_heads(p, feats["train"], labels["train"], feats["val"], labels["val"],
                                           len(class_names), config.seed, say)
    names = lh.head_names()
    final = history[-1]
    best = int(np.argmax(final[p.selection]))  # first index wins ties: the smaller lr, fewer blocks
    n_blocks, avgpool = lh.LAYOUTS[best // len(lh.LR_GRID)]
    lr = lh.LR_GRID[best % len(lh.LR_GRID)]
    val_pred = all_logits(state, feats["val"])[best].argmax(-1)
    test_logits = all_logits(state, feats["test"])[best]
    z = test_logits.astype(np.float64) - test_logits.max(-1, keepdims=True)
    test_probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    test_pred = test_logits.argmax(-1)
    test_report = metrics.classification_report(labels["test"], test_pred, test_probs, class_names)
    metrics.save_confusion_matrix_png(test_report["confusion_matrix"], class_names,
                                      os.path.join(workdir, f"confusion_{name}.png"),
                                      title=f"{name}: {names[best]} on test ({len(test_pred)} slices)")
    return {
        "best_head": names[best],
        "best_head_config": {"n_blocks": n_blocks, "avgpool": avgpool, "lr": lr,
                             "lr_scaled": lr * schedule["batch_size"] / 256.0},
        "selection": p.selection,
        "schedule": schedule,
        "num_slices": {s: int(len(y)) for s, y in labels.items()},
        "val": metrics.classification_report(labels["val"], val_pred, class_names=class_names),
        "test": test_report,
        "val_accuracy_per_head": dict(zip(names, final["accuracy"])),
        "val_balanced_accuracy_per_head": dict(zip(names, final["balanced_accuracy"])),
        "val_history": [{"step": h["step"], "best_accuracy": max(h["accuracy"]),
                         "best_balanced_accuracy": max(h["balanced_accuracy"])} for h in history],
        "test_predictions": {"labels": labels["test"].tolist(), "predictions": test_pred.tolist(),
                             "probabilities": test_probs.tolist()},
    }


# ---------------------------------------------------------------- outputs


def markdown_table(results: dict) -> str:
    rows = ["| backbone | checkpoint | best head | blocks | avgpool | lr | val acc | val bal. acc | test acc "
            "| test bal. acc | test macro F1 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["backbones"].items():
        c, v, t = r["best_head_config"], r["val"], r["test"]
        ck = r["checkpoint"]
        where = f"step {ck['step']}" + ("" if ck.get("latest", True) else " (not latest)") \
            if ck.get("step") is not None else f"seed {ck['seed']}"
        rows.append(f"| {name} | {where} | {r['best_head']} | {c['n_blocks']} | {c['avgpool']} | {c['lr']:g} "
                    f"| {v['accuracy']:.3f} | {v['balanced_accuracy']:.3f} | {t['accuracy']:.3f} "
                    f"| {t['balanced_accuracy']:.3f} | {t['macro_f1']:.3f} |")
    return "\n".join(rows) + "\n"


def plot_lr_curves(results: dict, path: str) -> None:
    """Final val accuracy against the learning rate, one line per layout, one panel per backbone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    backbones = results["backbones"]
    fig = Figure(figsize=(5.5 * len(backbones), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(backbones), squeeze=False)[0]
    for ax, (name, r) in zip(axes, backbones.items()):
        for n, a in lh.LAYOUTS:
            key = lh.layout_key(n, a)
            ax.plot(lh.LR_GRID, [r["val_accuracy_per_head"][f"{key}_lr{lr:g}"] for lr in lh.LR_GRID],
                    marker="o", label=f"last {n} CLS" + (" + mean patch" if a else ""))
        ax.set_xscale("log")
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("learning rate (grid value, before batch scaling)")
        ax.set_ylabel("val accuracy")
        ax.set_title(f"{name}: best {r['best_head']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------- entry point


def validate_probe_config(config) -> None:
    """One sentence naming the first bad value."""
    p = config.probe
    if not p.checkpoint_dir:
        raise ValueError("config.probe.checkpoint_dir is empty; set it to the --workdir of a pretraining run "
                         "(the folder that holds checkpoints/).")
    if p.selection not in SELECTIONS:
        raise ValueError(f"config.probe.selection={p.selection!r} is not valid; choose one of {', '.join(SELECTIONS)}.")
    for key in ("epochs", "batch_size", "feature_batch"):
        if p[key] <= 0:
            raise ValueError(f"config.probe.{key}={p[key]!r} must be a positive number.")
    for key in ("epoch_length", "eval_every"):
        if p[key] < 0:
            raise ValueError(f"config.probe.{key}={p[key]!r} must be 0 (once per pass over train) or positive.")


def run(config, workdir: str) -> dict:
    """Probes the pretrained teacher backbone (and a random-init one) and writes the results to ``workdir``."""
    validate_probe_config(config)
    p = config.probe
    run_dir = p.checkpoint_dir
    steps = checkpoint_steps(run_dir)
    run_config, pretrained, step = load_run(run_dir, p.step)
    where = os.path.join(os.path.abspath(run_dir), "checkpoints", str(step))
    latest = step == steps[-1]
    if not latest:
        print(f"WARNING: probing step {step}, which is NOT the latest checkpoint of {run_dir} (latest: {steps[-1]}); "
              "the results describe an earlier backbone than the run's final one.", flush=True)
    # The backbone's own settings (model, crops) with this probe's data section and seed.
    with run_config.unlocked():
        run_config.data = ml_collections.ConfigDict(config.data.to_dict())
        run_config.seed = config.seed
        run_config.probe = ml_collections.ConfigDict(p.to_dict())
    models = build_models(run_config)
    if models.backbone.depth < 4:
        raise ValueError(f"The backbone in {where} has {models.backbone.depth} blocks; the linear probe reads "
                         "the last 4 blocks' CLS tokens, so it needs at least 4.")
    check_backbone_shapes(models, pretrained, run_config, where)
    splits, class_names, task = load_splits(run_config, workdir, run_dir)
    print(f"linear probe: {task}; classes {', '.join(class_names)}; "
          + ", ".join(f"{len(y)} {s}" for s, (_, y) in splits.items()) + " slices", flush=True)

    backbones = {"pretrained": (pretrained, {"path": where, "step": step, "latest": latest,
                                             "latest_step": steps[-1], "content_hash": content_hash(pretrained)})}
    if p.random_baseline:
        random = init_params(models, jax.random.PRNGKey(config.seed), run_config)["backbone"]
        backbones = {"random_init": (random, {"seed": config.seed, "content_hash": content_hash(random)}),
                     **backbones}
    results = {"task": task, "class_names": class_names, "run_dir": os.path.abspath(run_dir),
               "config": json.loads(config.to_json_best_effort()), "backbones": {}}
    for name, (params, record) in backbones.items():
        results["backbones"][name] = {"checkpoint": record,
                                      **probe_backbone(name, models, params, splits, class_names, run_config,
                                                       workdir)}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown_table(results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# Linear probe of {os.path.abspath(run_dir)}\n\nTask: {task}. Best head by final val "
                f"{p.selection} over {len(lh.head_names())} heads, reported on test.\n\n{table}")
    plot_lr_curves(results, os.path.join(workdir, "probe_lr_curves.png"))
    print(table, flush=True)
    return results
