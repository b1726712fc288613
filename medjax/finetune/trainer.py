"""The fine-tuning trainer: a backbone plus one linear head per target column, trained end to end.

    python -m medjax.main --config=configs/finetune.py:demo --workdir=runs/demo_finetune \
        --config.finetune.checkpoint_dir=runs/demo

The backbone starts from a medjax pretraining run's teacher (``init=checkpoint``),
official DINOv2 weights (``init=official``) or random weights (``init=random``).
``baselines`` adds models trained with the same budget, so a reader sees what the
pretraining bought: ``random`` (the same ViT from random weights, every block
trained: with ``freeze_blocks`` > 0 the table shows the frozen ViT's speed-up over
this full training), ``resnet50`` and ``densenet121`` (the supervised CNN standards,
medjax.finetune.cnn). Every init
is trained on each few-label fraction of the training patients (sampled per
patient, stratified by the first target's class, one draw per seed) for the same
number of steps: ``epochs`` passes over the full training split, so a 10 % subset
is seen ten times as often. Val is evaluated every ``eval_every`` steps; with
``keep="best_val"`` the parameters with the best mean val balanced accuracy over
the targets are the ones tested. Results: ``results.json``, ``results.md``,
confusion matrices, training curves, the few-label curve, and an orbax
checkpoint of the main init's model (largest fraction, first seed). With
``cv_folds`` all of this runs once per fold of the manifest's fold column
(``medjax.cross_validation``).

A 3D backbone (a pretraining run with ``config.model.spatial_dims=3``, or
``init=random`` with it) is fine-tuned on whole volumes: one example per
manifest row, read as in that run (its ``target_spacing`` and normalisation),
with ``SingleView3D`` (cubes of ``image_size`` voxels); counts in the
results are then of volumes (``num_volumes``, ``train_volumes``), not slices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import console, cross_validation, metrics, runs
from medjax.batching import map_batched
from medjax.checkpoint import (Checkpointer, checkpoints_dir, content_hash, dumps_config, host_arrays, saved_steps,
                               step_dir, tree_fingerprint)
from medjax.data import fractions
from medjax.data.views import SingleView
from medjax.data.views3d import SingleView3D
from medjax.finetune import cnn, report
from medjax.finetune.data import load_splits
from medjax.finetune.model import FineTuner, class_weights, flatten, is_frozen
from medjax.finetune.validate import validate
from medjax.models.backbone import backbone_from_config
from medjax.models.convert import GRAY_MEAN, GRAY_STD
from medjax.models.vit import VisionTransformer
from medjax.schedules import CosineSchedule
INIT_NAMES = {"checkpoint": "pretrained", "official": "official", "random": "random_init"}
RANDOM_SIZE = {2: 224, 3: 96}  # init=random's input side when image_size=0 (the recipes' global crops)
TRANSFORMS = {2: SingleView, 3: SingleView3D}
UNITS = {2: "slices", 3: "volumes"}


# ---------------------------------------------------------------- the starting backbone


@dataclasses.dataclass(frozen=True)
class Init:
    """The backbone fine-tuning starts from (``config.finetune.init``)."""

    backbone: VisionTransformer
    params: dict | None  # None: random weights drawn per run
    record: dict  # where the weights came from (results.json)
    mean: tuple  # input normalisation per channel
    std: tuple
    size: int  # input side (a cube's in 3D)
    run_dir: str | None  # the pretraining run (init=checkpoint), else None
    run_config: ml_collections.ConfigDict | None  # that run's saved config


def load_init(config) -> Init:
    """The starting backbone of ``config.finetune.init``: a pretraining run's, official weights, or random."""
    f = config.finetune
    if f.init == "checkpoint":
        if not f.checkpoint_dir:
            raise ValueError("config.finetune.checkpoint_dir is empty; set it to the --workdir of a pretraining run "
                             "(the folder that holds checkpoints/), or choose config.finetune.init=official or "
                             "random.")
        run = runs.open_run(f.checkpoint_dir, f.step, doing="fine-tuning from", key="config.finetune.checkpoint_dir")
        if config.model.spatial_dims == 3 and run.spatial_dims != 3:
            raise ValueError(f"config.model.spatial_dims=3 asks for 3D fine-tuning, but {f.checkpoint_dir} holds a "
                             "2D model; use a 2D variant of configs/finetune.py (e.g. :demo) or a 3D run's "
                             "checkpoint_dir.")
        record = {"kind": "checkpoint", **run.record()}
        mean, std = run.normalisation
        return Init(run.backbone, run.params, record, mean, std, f.image_size or run.config.crops.global_size,
                    f.checkpoint_dir, run.config)
    if f.init == "official":
        if not f.official_weights:
            raise ValueError("config.finetune.official_weights is empty; give the path of official DINOv2 or MAE "
                             "weights (.pth, .npz or .safetensors).")
        if not os.path.exists(f.official_weights):
            raise FileNotFoundError(f"config.finetune.official_weights={f.official_weights!r} does not exist.")
        from medjax.models import convert  # weights I/O only when asked for

        size = f.image_size or 224
        if f.official_kind == "mae":  # the encoder of official MAE weights (full or encoder-only files)
            from medjax.models.convert_mae import load_official_mae

            # Heads are not in the weights: the official widths imply them, config.model.num_heads sets others.
            mae, mae_params = load_official_mae(f.official_weights, img_size=size, in_chans=1,
                                                num_heads=config.model.num_heads)
            backbone, params = mae.encoder_model(), mae_params["encoder"]
        else:
            backbone, params = convert.load_official(f.official_weights, img_size=size, in_chans=1)
        record = {"kind": "official", "path": os.path.abspath(f.official_weights),
                  "content_hash": content_hash(params)}
        return Init(backbone, params, record, (convert.GRAY_MEAN,), (convert.GRAY_STD,), size, None, None)
    size = f.image_size or RANDOM_SIZE[config.model.spatial_dims]
    cfg = ml_collections.ConfigDict({"model": config.model.to_dict(), "crops": {"global_size": size}})
    return Init(backbone_from_config(cfg), None, {"kind": "random", "seed": config.seed}, (0.449,), (0.226,), size,
                None, None)


def plain_arrays(tree):
    """Host arrays placed on the default device: arrays keeping another layout (a pretraining mesh's)
    would give the step a second compiled program."""
    return jax.tree.map(jnp.asarray, host_arrays(tree))


@functools.lru_cache(maxsize=4)
def _init_fn(backbone):
    shape = (1,) + (backbone.img_size,) * backbone.spatial_dims + (backbone.in_chans,)
    return jax.jit(lambda key: backbone.init(key, jnp.zeros(shape, jnp.float32))["params"])


def random_backbone(backbone, key):
    """Fresh backbone params (one compiled initialiser per backbone: op by op it takes seconds)."""
    return _init_fn(backbone)(key)


def frozen_names(backbone, freeze_blocks: int) -> list[str]:
    """The backbone parameters that stay fixed (the mask token, unused by classification, always)."""
    shapes = jax.eval_shape(lambda: random_backbone(backbone, jax.random.PRNGKey(0)))
    return sorted(k for k in flatten({"backbone": shapes}) if is_frozen(k, freeze_blocks))


# ---------------------------------------------------------------- training one model


def predict(eval_fn, trainable, frozen, images: np.ndarray, batch: int) -> dict:
    """{target: (N, C) float64 logits}; the last batch is padded so one compiled shape serves all."""
    logits = map_batched(lambda x: eval_fn(trainable, frozen, x), images, batch)
    return {t: v.astype(np.float64) for t, v in logits.items()}


def _val_scores(tuner, logits: dict, labels: np.ndarray) -> dict:
    out = {}
    for i, t in enumerate(tuner.targets):
        keep = labels[:, i] >= 0
        pred = logits[t][keep].argmax(-1)
        out[t] = {"accuracy": metrics.accuracy(labels[keep, i], pred),
                  "balanced_accuracy": metrics.balanced_accuracy(labels[keep, i], pred)}
    return out


def train_one(tuner: FineTuner, params: dict, images, labels: np.ndarray, val_images: np.ndarray,
              val_labels: np.ndarray, *, transforms: SingleView, lr: np.ndarray, weight_decay: float,
              batch_size: int, eval_every: int, keep: str, seed: int, balanced: bool, eval_batch: int,
              fns=None, say=console.say, tag: str = "") -> dict:
    """Fine-tunes ``params`` on (images, labels); returns the kept params, the history and the timing.

    ``lr`` holds every step's learning rate (its length is the number of steps); batches are
    consecutive slices of per-pass permutations from ``seed`` (wrapping, so a set smaller than a
    batch repeats within it) and the train transform draws from the same generator.
    """
    step_fn, eval_fn = fns or (tuner.step_fn(), tuner.eval_fn())
    total = len(lr)
    n = len(images)
    weights = {t: jnp.asarray(class_weights(labels[:, i], c, balanced)) for i, (t, c) in enumerate(tuner.num_classes)}
    trainable, frozen = tuner.split(params)
    trainable = jax.tree.map(jnp.array, trainable)  # own copies: the step donates them
    opt_state = tuner.init_opt(trainable)
    rng = np.random.default_rng([seed, 0xF17E])
    key = jax.random.PRNGKey(seed)
    order, pos = rng.permutation(n), 0
    history, pending, best, best_params = [], [], -1.0, None
    timing = {"compile_s": 0.0, "train_s": 0.0, "timed_steps": 0}
    tick = time.perf_counter()
    for step in range(total):
        idx = []
        while len(idx) < batch_size:
            if pos == n:
                order, pos = rng.permutation(n), 0
            take = min(batch_size - len(idx), n - pos)
            idx.extend(order[pos:pos + take].tolist())
            pos += take
        x = transforms.train_batch([images[i] for i in idx], rng)
        trainable, opt_state, m = step_fn(trainable, opt_state, frozen, x, jnp.asarray(labels[idx], jnp.int32),
                                          weights, lr[step], weight_decay, jax.random.fold_in(key, step))
        pending.append(m)
        if step == 0:
            jax.block_until_ready(m["loss"])
            timing["compile_s"] = time.perf_counter() - tick
            tick = time.perf_counter()
        if (step + 1) % eval_every == 0 or step + 1 == total:
            fetched = jax.device_get(pending)
            pending = []
            if step > 0:
                timing["train_s"] += time.perf_counter() - tick
                timing["timed_steps"] = step
            scores = _val_scores(tuner, predict(eval_fn, trainable, frozen, val_images, eval_batch), val_labels)
            mean_bal = float(np.mean([s["balanced_accuracy"] for s in scores.values()]))
            entry = {"step": step + 1, "train_loss": float(np.mean([f["loss"] for f in fetched])),
                     "train_target_losses": np.mean([f["target_losses"] for f in fetched], axis=0).tolist(),
                     "grad_norm": float(fetched[-1]["grad_norm"]), "lr": float(lr[step]), "val": scores,
                     "val_mean_balanced_accuracy": mean_bal}
            history.append(entry)
            if mean_bal > best:
                best, best_step = mean_bal, step + 1
                if keep == "best_val":
                    best_params = jax.device_get(trainable)
            per_step = timing["train_s"] / max(timing["timed_steps"], 1)
            say(f"  {tag}step {step + 1}/{total}: loss {entry['train_loss']:.4f}, val balanced accuracy "
                + ", ".join(f"{t} {s['balanced_accuracy']:.3f}" for t, s in scores.items())
                + (f", {per_step:.2f} s/step, ETA {(total - step - 1) * per_step / 60:.1f} min" if step else ""))
            tick = time.perf_counter()
    kept = best_params if keep == "best_val" else jax.device_get(trainable)
    sec_per_step = timing["train_s"] / max(timing["timed_steps"], 1)
    return {"trainable": kept, "frozen": frozen, "history": history, "best_step": best_step,
            "kept_step": best_step if keep == "best_val" else total,
            "timing": {**timing, "sec_per_step": sec_per_step,
                       "minutes_per_epoch": sec_per_step * math.ceil(n / batch_size) / 60.0}}


def evaluate(tuner, eval_fn, trainable, frozen, images, labels, targets, batch) -> tuple[dict, dict]:
    """({target: classification_report}, {target: saved predictions}) on the rows labelled for each target."""
    logits = predict(eval_fn, trainable, frozen, images, batch)
    reports, saved = {}, {}
    for i, target in enumerate(targets):
        keep = labels[:, i] >= 0
        z = logits[target.name][keep]
        z = z - z.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        pred = probs.argmax(-1)
        reports[target.name] = metrics.classification_report(labels[keep, i], pred, probs, list(target.class_names))
        saved[target.name] = {"labels": labels[keep, i].tolist(), "predictions": pred.tolist(),
                              "probabilities": probs.tolist()}
    return reports, saved


def fit_subset(tuner, fns, params, splits, eval_x, targets, transforms, lr, f, *, fraction, seed, tag,
               unit="slices", weight_decay=None):
    """Fine-tunes ``params`` on the ``fraction`` subset of the training patients drawn with ``seed``;
    returns train_one's output and the run's JSON record (sizes, timing, history, val and test).
    ``weight_decay`` None: ``f.weight_decay``."""
    train = splits["train"]
    # Several 0/1 findings: patients stratified by their rarest finding; otherwise by the first target's class.
    findings = len(targets) > 1 and all(len(t.class_names) == 2 for t in targets)
    idx = fractions.subset_indices(train.patient_ids, train.labels if findings else train.labels[:, 0], fraction, seed)
    labels = train.labels[idx]
    for i, t in enumerate(targets):
        missing = sorted(set(range(len(t.class_names))) - set(labels[:, i].tolist()))
        if missing:
            console.say(f"  note: the {fraction:g} subset (seed {seed}) has no training {unit[:-1]} of "
                  f"{', '.join(t.class_names[c] for c in missing)} for {t.name}.")
    patients = len({train.patient_ids[i] for i in idx})
    console.say(f"{tag}{patients} patients, {len(idx)} {unit}, {len(lr)} steps")
    steps_per_epoch = math.ceil(len(train.images) / f.batch_size)
    out = train_one(tuner, params, [train.images[i] for i in idx], labels, eval_x["val"], splits["val"].labels,
                    transforms=transforms, lr=lr,
                    weight_decay=f.weight_decay if weight_decay is None else weight_decay, batch_size=f.batch_size,
                    eval_every=f.eval_every or steps_per_epoch, keep=f.keep, seed=seed, balanced=f.class_weighted,
                    eval_batch=f.eval_batch, fns=fns, tag=tag)
    val, _ = evaluate(tuner, fns[1], out["trainable"], out["frozen"], eval_x["val"], splits["val"].labels, targets,
                      f.eval_batch)
    test, predictions = evaluate(tuner, fns[1], out["trainable"], out["frozen"], eval_x["test"],
                                 splits["test"].labels, targets, f.eval_batch)
    return out, {"train_patients": patients, f"train_{unit}": len(idx), "best_step": out["best_step"],
                 "trainable_parameters": tuner.count_trainable(out["trainable"]),
                 "kept_step": out["kept_step"], "timing": out["timing"], "history": out["history"], "val": val,
                 "test": test, "test_predictions": predictions}


# ---------------------------------------------------------------- entry point


def _check_3d(config) -> None:
    """Refuses the data options that only mean something for slices, once the backbone is known to be 3D."""
    if config.data.cache_dir:
        raise ValueError("config.data.cache_dir caches 2D slices, but the backbone is 3D and reads whole volumes; "
                         "set --config.data.cache_dir=''.")
    if config.data.slice_axis != "axial":
        raise ValueError(f"config.data.slice_axis={config.data.slice_axis!r} picks 2D slices, but the backbone is "
                         "3D and reads whole volumes; leave it at 'axial'.")


def run(config, workdir: str) -> dict:
    """Fine-tunes every init on every label fraction and seed; writes the results to ``workdir``; with
    ``finetune.cv_folds`` once per fold, then the summary over the folds."""
    validate(config)
    if config.finetune.cv_folds:
        return cross_validation.run_folds(config, workdir, section="finetune", run_job=run,
                                          test_metrics=report.test_metrics, title="Fine-tuning")
    return fine_tune(config, workdir)


def fine_tune(config, workdir: str) -> dict:
    """Fine-tuning on the config's splits (see ``run``)."""
    f = config.finetune
    if saved_steps(workdir):
        raise ValueError(f"{checkpoints_dir(workdir)} already holds a fine-tuned model; choose a fresh --workdir.")
    init = load_init(config)
    backbone, init_params, mean, std, size = init.backbone, init.params, init.mean, init.std, init.size
    dims = backbone.spatial_dims
    if dims == 3:
        _check_3d(config)
    backbone = backbone.clone(drop_path_rate=f.drop_path_rate, drop_path_uniform=False)
    init_params = None if init_params is None else plain_arrays(init_params)
    if not 0 <= f.freeze_blocks <= backbone.depth:
        raise ValueError(f"config.finetune.freeze_blocks={f.freeze_blocks} must lie in [0, {backbone.depth}] (the "
                         f"backbone has {backbone.depth} blocks).")
    try:
        transforms = TRANSFORMS[dims](size, mean, std, tuple(f.train_scale), tuple(f.train_ratio), f.flip_p,
                                      backbone.in_chans)
    except ValueError as e:
        raise ValueError(f"The train transform (config.finetune.train_scale, train_ratio, flip_p) is not valid: "
                         f"{e}") from None
    # A copy: loading may point data.demo_dir at the pretraining run's demo files.
    data_config = ml_collections.ConfigDict({"data": config.data.to_dict(), "seed": config.seed,
                                             "finetune": f.to_dict()})
    if dims == 3 and init.run_config is not None:  # the volumes as the backbone saw them in pretraining
        data_config.data.target_spacing = tuple(init.run_config.data.target_spacing)
        data_config.data.normalisation = init.run_config.data.normalisation
    splits, targets = load_splits(data_config, workdir, init.run_dir, volumes=dims == 3)
    unit = UNITS[dims]
    tuner = FineTuner(backbone, tuple((t.name, len(t.class_names)) for t in targets), f.freeze_blocks,
                      f.layerwise_decay, f.patch_embed_lr_mult, f.clip_grad, f.adamw_beta1, f.adamw_beta2,
                      pooling=f.pooling, label_smoothing=f.label_smoothing, mixup=f.mixup, cutmix=f.cutmix)
    eval_x = {s: transforms.eval_batch(splits[s].images) for s in ("val", "test")}
    console.say("fine-tuning: " + "; ".join(f"{t.name} ({t.description}): {', '.join(t.class_names)}" for t in targets)
          + "; " + ", ".join(f"{len(splits[s].labels)} {s}" for s in splits) + f" {unit}")

    steps_per_epoch = math.ceil(len(splits["train"].images) / f.batch_size)
    total = f.epochs * steps_per_epoch
    lr = CosineSchedule(f.base_lr * f.batch_size / 256.0, f.min_lr, total,
                        warmup_steps=f.warmup_epochs * steps_per_epoch).as_array()
    main = INIT_NAMES[f.init]
    contenders = _contenders(config, init, backbone, init_params, tuner, transforms, eval_x, splits, lr,
                             total, steps_per_epoch)
    results = {"targets": {t.name: {"class_names": list(t.class_names), "description": t.description}
                           for t in targets},
               "config": dumps_config(config), "inits": {}, "runs": [],
               "schedule": {"steps": total, "steps_per_full_epoch": steps_per_epoch, "batch_size": f.batch_size,
                            "peak_lr": float(lr.max()), "eval_every": f.eval_every or steps_per_epoch},
               "unit": unit, f"num_{unit}": {s: len(v.labels) for s, v in splits.items()},
               "keep": "the last step" if f.keep == "last" else "the evaluation of best mean val balanced accuracy",
               "frozen_parameters": frozen_names(backbone, f.freeze_blocks)}
    saved_model = None
    for name, c in contenders.items():
        results["inits"][name] = c.record
        for fraction in sorted(f.label_fractions):
            for seed in f.fraction_seeds:
                key = jax.random.fold_in(jax.random.PRNGKey(config.seed), seed)
                out, run = fit_subset(c.tuner, c.fns, c.start(key), splits, c.eval_x, targets, c.transforms, c.lr,
                                      f, fraction=fraction, seed=seed, unit=unit, weight_decay=c.weight_decay,
                                      tag=f"{name} fraction {fraction:g} seed {seed}: ")
                results["runs"].append({"init": name, "fraction": fraction, "seed": seed, **run})
                if name == main and saved_model is None and fraction == max(f.label_fractions):
                    saved_model = (out, fraction, seed)
    results["summary"] = report.summarise_runs(results["runs"], [t.name for t in targets], unit)
    _save_model(workdir, tuner, saved_model, results, config, main, total)
    report.write_outputs(results, workdir, targets)
    return results


@dataclasses.dataclass(frozen=True)
class Contender:
    """One model of the comparison: its tuner and compiled (step, eval), its start (jax key -> params), its
    inputs and its lr schedule and weight decay."""

    tuner: object
    fns: tuple
    start: object
    record: dict
    transforms: object
    eval_x: dict
    lr: np.ndarray
    weight_decay: float


def _contenders(config, init, backbone, init_params, tuner, transforms, eval_x, splits, lr, total,
                steps_per_epoch) -> dict:
    """{name: Contender}: the random-init ViT baseline (every block trained), the init under test, the CNNs."""
    f = config.finetune

    def vit(params0, t):
        return lambda key: t.init_params(jax.random.fold_in(key, 1), params0 if params0 is not None
                                         else random_backbone(backbone, key))

    fns = (tuner.step_fn(), tuner.eval_fn())  # one compile serves every fraction and seed
    out = {}
    if "random" in f.baselines and f.init != "random":
        full = dataclasses.replace(tuner, freeze_blocks=0)
        full_fns = fns if full == tuner else (full.step_fn(), full.eval_fn())
        out["random_init"] = Contender(full, full_fns, vit(None, full),
                                       {"kind": "random", "seed": config.seed, "frozen_blocks": 0}, transforms,
                                       eval_x, lr, f.weight_decay)
    out[INIT_NAMES[f.init]] = Contender(tuner, fns, vit(init_params, tuner),
                                        {**init.record, "frozen_blocks": f.freeze_blocks}, transforms, eval_x, lr,
                                        f.weight_decay)
    names = [b for b in f.baselines if b in cnn.CNNS]
    if names:  # gray input normalised as the converted weights expect (and the random ViT is)
        t = TRANSFORMS[2](transforms.size, (GRAY_MEAN,), (GRAY_STD,), transforms.scale, transforms.ratio,
                          transforms.flip_p, 1)
        x = eval_x if t == transforms else {s: t.eval_batch(splits[s].images) for s in ("val", "test")}
        cnn_lr = CosineSchedule(f.cnn_base_lr * f.batch_size / 256.0, f.min_lr, total,
                                warmup_steps=f.warmup_epochs * steps_per_epoch).as_array()
    for name in names:
        start = cnn.cnn_start(f, name, config.seed, transforms.size)
        ct = cnn.cnn_tuner(f, start.backbone, tuner.num_classes)
        begin = functools.partial(lambda st, tu, key: tu.init_params(  # numpy init seeded by the run's key
            jax.random.fold_in(key, 1), st.variables_for(int.from_bytes(np.asarray(key).tobytes(), "little"),
                                                         transforms.size)), start, ct)
        out[name] = Contender(ct, (ct.step_fn(), ct.eval_fn()), begin, start.record, t, x, cnn_lr,
                              f.cnn_weight_decay)
    return out


def _save_model(workdir, tuner, saved, results, config, main, total) -> None:
    out, fraction, seed = saved
    params = tuner.merge(out["trainable"], jax.device_get(out["frozen"]))
    meta = {"config": dumps_config(config), "fingerprint": tree_fingerprint(params),
            "targets": {t: r["class_names"] for t, r in results["targets"].items()},
            "init": main, "init_record": results["inits"][main], "fraction": fraction, "seed": seed,
            "kept_step": out["kept_step"], "content_hash": content_hash(params)}
    ckpt = Checkpointer(workdir, max_to_keep=1, async_save=False)
    ckpt.save(total, params, None, meta)
    ckpt.close()
    results["checkpoint"] = {"path": step_dir(workdir, total), **{k: meta[k] for k in (
        "init", "fraction", "seed", "kept_step", "content_hash")}}
