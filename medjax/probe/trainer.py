"""The linear-probe trainer: DINOv2's 52-head linear evaluation of a pretraining run's teacher backbone.

    python -m medjax.main --config=configs/linear_probe.py:demo --workdir=runs/probe \
        --config.probe.checkpoint_dir=runs/demo

The backbone is frozen, so its features are computed once per backbone (eval
transform: the whole slice resized to the global crop size and normalised as in
pretraining) and the 52 heads of ``linear_heads`` are trained on those arrays;
no image passes through the ViT again during training. ``probe.features =
"augmented"`` trains as the reference does instead, on random-resized crops and
flips of the training slices pushed through the frozen backbone at every step
(a forward pass per step: slower, and closer to the published protocol).

Every head is evaluated on val at fixed intervals and at the end; the head with
the best final val score is the one reported on test, as in the reference. The
same protocol runs on a randomly initialised backbone so that a reader can see
how much of the score pretraining earned. With ``probe.label_fractions`` the
protocol is repeated on 1 %, 10 %, ... of the training patients (whole
patients, stratified by class, one draw per seed) and the test score of each
draw's best-on-val head is reported as mean and spread. Every draw trains for the full run's
number of steps at the full run's batch size (a subset smaller than a batch repeats within it),
as fine-tuning does: with steps and batch shrinking with the subset, a 1 % draw took a few steps
at a tiny scaled lr, its heads stayed at their (seed-identical) initialisation, and every
fraction reported the same near-random head.

Multi-label tasks keep a row when some finding is labelled; the masked entries (blank, or
uncertain under ``config.data.uncertain_labels="ignore"``) count in no head's loss and in no
finding's AUC, and the mean AUC averages the findings that have both classes in val and test
(``findings``).
"""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from medjax import console, cross_validation, metrics, runs
from medjax.batching import map_batched
from medjax.checkpoint import content_hash
from medjax.data.augment import crop_box
from medjax.data.fractions import subset_indices, summarise
from medjax.probe import findings as findings_lib
from medjax.probe import knn
from medjax.probe import linear_heads
from medjax.probe import report as probe_report
from medjax.probe.data import load_splits
from medjax.probe.validate import SELECTIONS, validate

_EVAL_CHUNK = 1024  # rows per evaluate() call: bounds the (52, rows, C) logits in memory


# ---------------------------------------------------------------- features


@functools.lru_cache(maxsize=4)
def _feature_fn(backbone):
    """One jitted feature function per backbone module, with the params as an argument: the
    pretrained and the random-init backbone share one compiled program."""

    @jax.jit
    def one(params, x):
        out = backbone.apply({"params": params}, x, train=False, n_last_blocks=4)
        return linear_heads.probe_features(out["last_blocks_norm"], backbone.num_register_tokens)

    return one


def embed(backbone, params, images: np.ndarray, batch: int) -> dict:
    """``probe_features`` of every image, as numpy: computed once, then only the heads train.

    The last batch is padded to full size so that one compiled shape serves every batch.
    """
    one = _feature_fn(backbone)
    return map_batched(lambda x: one(params, x), images, batch)


def augment(images: np.ndarray, rng: np.random.Generator, mean: float, std: float,
            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """The reference's training transform on eval-transformed slices: a random resized crop back to
    the same size (bicubic) and a horizontal flip with probability 0.5."""
    out = np.empty_like(images)
    size = images.shape[1]
    for i, x in enumerate(images):
        plane = Image.fromarray(x[..., 0] * np.float32(std) + np.float32(mean), mode="F")
        top, left, h, w = crop_box(size, size, scale, ratio, rng)
        y = np.asarray(plane.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h)))
        y = (np.clip(y, 0.0, 1.0) - np.float32(mean)) / np.float32(std)
        out[i, ..., 0] = y[:, ::-1] if rng.random() < 0.5 else y
    return out


# ---------------------------------------------------------------- training and scoring the 52 heads


def all_logits(state, feats: dict) -> np.ndarray:
    """``(52, N, C)`` logits of every head."""
    n = len(feats["patch_mean"])
    return np.concatenate([np.asarray(linear_heads.evaluate(state, {k: v[i:i + _EVAL_CHUNK] for k, v in feats.items()}))
                           for i in range(0, n, _EVAL_CHUNK)], axis=1)


def head_scores(logits: np.ndarray, labels: np.ndarray, multilabel: bool, columns=None) -> dict[str, list[float]]:
    """Every head's score under each selection metric of the task (multi-label: the mean AUC over
    ``columns``, the scored findings; None = every finding with both classes here)."""
    if multilabel:
        return {"mean_auc": [metrics.mean_label_auc(labels, h, columns)[0] for h in logits]}
    preds = logits.argmax(-1)
    return {"accuracy": [metrics.accuracy(labels, p) for p in preds],
            "balanced_accuracy": [metrics.balanced_accuracy(labels, p) for p in preds]}


def best_head(scores: list[float]) -> int:
    """Index of the best head; the first wins ties (the smaller lr, fewer blocks)."""
    s = np.asarray(scores, np.float64)
    if not np.isfinite(s).any():
        raise ValueError("No head has a finite validation score (every label is constant on val?); the val "
                         "split needs both positive and negative examples of some label.")
    return int(np.nanargmax(s))


def train_heads(p, train_batch, n: int, labels: np.ndarray, val_feats: dict, val_labels: np.ndarray,
                num_classes: int, seed: int, multilabel: bool, say=console.say, *, schedule_size: int | None = None,
                columns=None):
    """Trains the 52 heads; returns the state, the val history ``[{step, <metric>: [52]}]`` and the schedule.

    ``train_batch(index, rng) -> features`` gives the features of training rows ``index``
    (gathered from precomputed arrays, or augmented images through the backbone).
    The batch size, the grid's lr scaling and the number of steps follow ``schedule_size`` rows
    (the full training set; None = ``n``), so a few-label subset trains as long as the full run.
    Batches are consecutive slices of per-epoch permutations from ``seed``, all of one size (one
    compile); a subset smaller than the batch fills it with several permutations of itself.
    Multi-label ``labels`` hold 1, 0 and masked (< 0) entries; masked entries weigh 0 in the loss.
    """
    size = schedule_size or n
    batch = min(p.batch_size, size)
    steps_per_epoch = p.epoch_length or math.ceil(size / batch)
    total = p.epochs * steps_per_epoch
    eval_every = p.eval_every or steps_per_epoch
    rng = np.random.default_rng(seed)
    dim = val_feats["patch_mean"].shape[1]
    state = linear_heads.init_state(jax.random.PRNGKey(seed), dim, num_classes, batch)
    order, pos, history = rng.permutation(n), 0, []
    if multilabel:
        targets, weights = linear_heads.multilabel_targets(labels)
        device_labels, device_weights = jnp.asarray(targets), jnp.asarray(weights)
    else:
        device_labels, device_weights = jnp.asarray(labels, jnp.int32), None
    for step in range(total):
        if batch > n:  # a subset smaller than the batch
            idx = np.concatenate([rng.permutation(n) for _ in range(math.ceil(batch / n))])[:batch]
        else:
            if pos + batch > n:
                order, pos = rng.permutation(n), 0
            idx = order[pos:pos + batch]
            pos += batch
        rows = jnp.asarray(idx)
        state, losses = linear_heads.train_step(
            state, train_batch(idx, rng), device_labels[rows], linear_heads.cosine_factor(step, total),
            None if device_weights is None else device_weights[rows], multilabel=multilabel)
        if (step + 1) % eval_every == 0 or step + 1 == total:
            scores = head_scores(all_logits(state, val_feats), val_labels, multilabel, columns)
            history.append({"step": step + 1, **scores})
            say(f"  step {step + 1}/{total}: mean loss {float(jnp.mean(losses)):.4f}, "
                + ", ".join(f"best val {k.replace('_', ' ')} {np.nanmax(v):.3f}" for k, v in scores.items()))
    return state, history, {"batch_size": batch, "steps": total, "steps_per_epoch": steps_per_epoch,
                            "eval_every": eval_every}


def _precomputed(feats: dict):
    device = {k: jnp.asarray(v) for k, v in feats.items()}
    return lambda idx, rng: {k: v[jnp.asarray(idx)] for k, v in device.items()}


def _augmented(backbone, params, images: np.ndarray, mean: float, std: float):
    one = _feature_fn(backbone)
    return lambda idx, rng: one(params, augment(images[idx], rng, mean, std))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_report(logits: np.ndarray, labels: np.ndarray, class_names, multilabel: bool, columns=None) -> dict:
    """The metrics of one head on a split: the classification report, or for multi-label per-finding AUCs
    on the labelled entries with their positives and negatives, and the mean over ``columns`` (the scored
    findings; None = every finding with both classes here)."""
    if multilabel:
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        mean, per_label, excluded = metrics.mean_label_auc(labels, probs, columns)
        pos, neg = findings_lib.counts(labels)
        averaged = range(len(class_names)) if columns is None else columns
        return {"num_samples": int(len(labels)), "mean_auc": mean,
                "mean_auc_over": [class_names[i] for i in averaged if i not in excluded],
                "per_label": [{"name": n, "positives": pos[i], "negatives": neg[i], "auc": float(per_label[i])}
                              for i, n in enumerate(class_names)],
                "auc_excluded_labels": [class_names[i] for i in excluded]}, probs
    probs = softmax(logits)
    return metrics.classification_report(labels, logits.argmax(-1), probs, class_names), probs


def probe_features_of(name, backbone, params, splits: dict, config, say=console.say) -> dict:
    """``{split: features}`` of one backbone (the val and test features of every mode)."""
    say(f"{name}: computing features of {sum(len(s.labels) for s in splits.values())} slices ...")
    return {s: embed(backbone, params, split.images, config.probe.feature_batch)
            for s, split in splits.items()}


def fit_and_select(backbone, params, feats: dict, splits: dict, num_classes: int, multilabel: bool, config,
                   seed: int, train_index=None, say=console.say) -> dict:
    """Trains the heads on (a subset of) train with the full training set's schedule, picks the best on
    val (multi-label: mean AUC over the findings scored in val and test); returns state, index, history."""
    p = config.probe
    columns = findings_lib.scored_columns(splits) if multilabel else None
    train = splits["train"] if train_index is None else splits["train"].subset(train_index)
    if p.features == "augmented":
        batches = _augmented(backbone, params, train.images, config.crops.mean[0], config.crops.std[0])
    else:
        train_feats = feats["train"] if train_index is None else {k: v[train_index] for k, v in feats["train"].items()}
        batches = _precomputed(train_feats)
    state, history, schedule = train_heads(p, batches, len(train.labels), train.labels, feats["val"],
                                           splits["val"].labels, num_classes, seed, multilabel, say,
                                           schedule_size=len(splits["train"].labels), columns=columns)
    return {"state": state, "best": best_head(history[-1][p.selection]), "history": history,
            "schedule": schedule, "train_slices": int(len(train.labels)),
            "train_patients": int(len(set(train.patients.tolist())))}


def probe_backbone(name, backbone, params, splits, class_names, multilabel, config, workdir, say=console.say) -> dict:
    """The whole protocol for one backbone (and its few-label repeats); returns its JSON-ready result."""
    p = config.probe
    feats = probe_features_of(name, backbone, params, splits, config, say)
    fit = fit_and_select(backbone, params, feats, splits, len(class_names), multilabel, config, config.seed, say=say)
    names, best, final = linear_heads.head_names(), fit["best"], fit["history"][-1]
    columns = findings_lib.scored_columns(splits) if multilabel else None
    n_blocks, avgpool = linear_heads.LAYOUTS[best // len(linear_heads.LR_GRID)]
    lr = linear_heads.LR_GRID[best % len(linear_heads.LR_GRID)]
    val_report, _ = test_report(all_logits(fit["state"], feats["val"])[best], splits["val"].labels, class_names,
                                multilabel, columns)
    report, probs = test_report(all_logits(fit["state"], feats["test"])[best], splits["test"].labels,
                                class_names, multilabel, columns)
    if not multilabel:
        metrics.save_confusion_matrix_png(report["confusion_matrix"], class_names,
                                          os.path.join(workdir, f"confusion_{name}.png"),
                                          title=f"{name}: {names[best]} on test ({len(probs)} slices)")
    result = {
        "best_head": names[best],
        "best_head_config": {"n_blocks": n_blocks, "avgpool": avgpool, "lr": lr,
                             "lr_scaled": lr * fit["schedule"]["batch_size"] / 256.0},
        "selection": p.selection,
        "features": p.features,
        "schedule": fit["schedule"],
        "num_slices": {s: int(len(split.labels)) for s, split in splits.items()},
        "val": val_report,
        "test": report,
        "val_per_head": {k: dict(zip(names, v)) for k, v in final.items() if k != "step"},
        "val_history": [{"step": h["step"], **{f"best_{k}": float(np.nanmax(v)) for k, v in h.items()
                                               if k != "step"}} for h in fit["history"]],
        "test_predictions": {"labels": splits["test"].labels.tolist(),
                             "predictions": (probs > 0.5).astype(int).tolist() if multilabel
                             else probs.argmax(-1).tolist(),
                             "probabilities": probs.tolist()},
    }
    if p.knn_k and not multilabel:
        # kNN on the normed CLS token of the last block, as DINOv2's kNN evaluation.
        reports = knn.knn_evaluate(feats["train"]["cls4"][:, -1], splits["train"].labels, feats["test"]["cls4"][:, -1],
                                   splits["test"].labels, len(class_names), ks=tuple(p.knn_k),
                                   class_names=class_names)
        result["knn"] = {str(k): {m: r[m] for m in ("accuracy", "balanced_accuracy", "macro_f1", "k_used")}
                         for k, r in reports.items()}
    if p.label_fractions:
        result["few_labels"] = few_label_curve(name, backbone, params, feats, splits, class_names, multilabel,
                                               config, fit, say)
    return result


def few_label_curve(name, backbone, params, feats, splits, class_names, multilabel, config, full_fit,
                    say=console.say) -> list[dict]:
    """Test score of the best-on-val head for each label fraction and seed (whole patients per draw). A
    multi-label draw without a finding's positives is a warning naming finding and fraction, not an error."""
    p, train = config.probe, splits["train"]
    metric = "mean_auc" if multilabel else p.selection
    columns = findings_lib.scored_columns(splits) if multilabel else None
    curve = []
    for fraction in sorted(p.label_fractions):
        runs, missing = [], {}
        for seed in range(p.fraction_seeds):
            if fraction >= 1.0 and seed == 0:
                fit = full_fit  # the main run is the 100 % run of seed 0
            else:
                index = subset_indices(train.patients, train.labels, fraction, seed)
                if multilabel:
                    for finding in findings_lib.missing_positives(train.labels[index], class_names):
                        missing.setdefault(finding, []).append(seed)
                fit = fit_and_select(backbone, params, feats, splits, len(class_names), multilabel, config,
                                     config.seed + seed, train_index=index, say=console.silent)
            logits = all_logits(fit["state"], feats["test"])[fit["best"]]
            report, _ = test_report(logits, splits["test"].labels, class_names, multilabel, columns)
            runs.append({"seed": seed, "train_patients": fit["train_patients"],
                         "train_slices": fit["train_slices"], "best_head": linear_heads.head_names()[fit["best"]],
                         "test": {k: report[k] for k in ("accuracy", "balanced_accuracy", "macro_auc",
                                                          "macro_f1", "mean_auc") if k in report}})
        entry = {"fraction": fraction, "runs": runs,
                 "test": {k: summarise([r["test"][k] for r in runs]) for k in runs[0]["test"]}}
        if missing:
            entry["missing_positives"] = missing
            console.warn(f"{name}: the {fraction:.0%} subset of the training patients has no positive of "
                         + ", ".join(f"{f} (seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))})"
                                     for f, s in missing.items())
                         + "; those heads see only negatives of them (the test AUC of such a finding is chance "
                         "at best).")
        curve.append(entry)
        say(f"{name}: {fraction:.0%} of the training patients ({runs[0]['train_patients']}): test {metric} "
            f"{entry['test'][metric]['mean']:.3f} +- {entry['test'][metric]['std']:.3f} over {len(runs)} seed(s)")
    return curve


# ---------------------------------------------------------------- entry point


def run_dirs(config) -> list[str]:
    """The runs ``config.probe.checkpoint_dir`` names: one --workdir, or several separated by commas."""
    return [d.strip() for d in config.probe.checkpoint_dir.split(",") if d.strip()]


def backbones_to_probe(config, run_dir: str):
    """The opened run, its config with this probe's data, seed and settings, and
    ``{name: (params, checkpoint record)}`` (random init first)."""
    p = config.probe
    run = runs.open_run(run_dir, p.step, doing="probing", key="config.probe.checkpoint_dir")
    if run.backbone.depth < 4:
        raise ValueError(f"The backbone in {run.path} has {run.backbone.depth} blocks; the linear probe reads "
                         "the last 4 blocks' CLS tokens, so it needs at least 4.")
    # The backbone's own settings (model, crops) with this probe's data section and seed.
    run_config = ml_collections.ConfigDict(run.config.to_dict())
    run_config.data = ml_collections.ConfigDict(config.data.to_dict())
    run_config.seed = config.seed
    run_config.probe = ml_collections.ConfigDict(p.to_dict())
    backbones = {"pretrained": (run.params, run.record())}
    if p.random_baseline:
        random = run.random_params(config.seed)
        backbones = {"random_init": (random, {"seed": config.seed, "content_hash": content_hash(random)}),
                     **backbones}
    return run, run_config, backbones


def run(config, workdir: str) -> dict:
    """Probes each run's pretrained backbone (and a random-init one of each) under one protocol, on one task,
    and writes the results side by side to ``workdir``; with ``probe.cv_folds`` once per fold, then the
    summary over the folds."""
    validate(config)
    if config.probe.cv_folds:
        return cross_validation.run_folds(config, workdir, section="probe", run_job=run,
                                          test_metrics=probe_report.test_metrics, title="Linear probe")
    return probe_runs(config, workdir)


def probe_runs(config, workdir: str) -> dict:
    """The probe of every run in ``config.probe.checkpoint_dir`` on the config's splits (see ``run``)."""
    p = config.probe
    say = console.say
    dirs = run_dirs(config)
    several = len(dirs) > 1
    results = {"run_dir": os.path.abspath(dirs[0]) if not several else [os.path.abspath(d) for d in dirs],
               "config": json.loads(config.to_json_best_effort()), "backbones": {}}
    loaded = {}  # the labelled splits per input size and normalisation (runs that share them share the arrays)
    for run_dir in dirs:
        run, run_config, backbones = backbones_to_probe(config, run_dir)
        key = (run_config.crops.global_size, tuple(run_config.crops.mean), tuple(run_config.crops.std))
        if key not in loaded:
            loaded[key] = load_splits(run_config, workdir, run_dir)
        splits, class_names, task, multilabel = loaded[key]
        if "task" not in results:
            if p.selection not in SELECTIONS[multilabel]:
                kind = "multi-label" if multilabel else "multi-class"
                raise ValueError(f"config.probe.selection={p.selection!r} does not apply to this {kind} task; "
                                 f"choose {' or '.join(SELECTIONS[multilabel])}.")
            say(f"linear probe: {task}; {'labels' if multilabel else 'classes'} {', '.join(class_names)}; "
                + ", ".join(f"{len(s.labels)} {name}" for name, s in splits.items()) + " slices")
            results.update(task=task, multilabel=multilabel, class_names=class_names)
            if multilabel:
                results["findings"] = findings_lib.scored_findings(splits, class_names)
                (console.warn if results["findings"]["left_out"] else say)(
                    "linear probe: AUC " + findings_lib.mean_over(results["findings"], class_names) + ".")
        for name, (params, record) in backbones.items():
            label = name
            if several:  # e.g. "DINOv2 demo" and "DINOv2 demo, random init"
                tag = f"{runs.OBJECTIVES[run.objective].name} {os.path.basename(os.path.normpath(run_dir))}"
                label = tag if name == "pretrained" else f"{tag}, random init"
            results["backbones"][label] = {
                "checkpoint": record, "objective": run.objective,
                **probe_backbone(label, run.backbone, params, splits, class_names, multilabel, run_config, workdir,
                                 say)}
    table = probe_report.write(results, workdir)
    say(table)
    for warning in probe_report.constant_curves(results):
        console.warn(warning)
    return results
