"""The segmentation (and multi-task) trainer: heads on ViT patch tokens, pretrained vs random init, few labels.

    python -m medjax.main --config=configs/segment.py:demo --workdir=runs/demo_segment \
        --config.segment.checkpoint_dir=runs/demo
    python -m medjax.main --config=configs/multitask.py:demo --workdir=runs/demo_multitask \
        --config.segment.checkpoint_dir=runs/demo
    python -m medjax.main --config=configs/segment.py:demo3d --workdir=runs/demo3d_segment \
        --config.segment.checkpoint_dir=runs/demo3d

A 3D backbone (``configs/dinov2_reg_3d.py`` runs; ``config.segment.spatial_dims=3``) segments whole
volumes: one example per manifest row (``data3d``: one padded input shape per run),
3D heads (the same modules on (D, H, W) token grids), predictions mapped back to each mask
file's own grid before the metrics (``evaluate3d``: volume and patient levels).

For every initialisation (the pretraining run's teacher backbone or official DINOv2
weights, and a random init of the same architecture), every head in
``config.segment.heads``, every label fraction and seed, one model is trained for
``config.segment.steps`` steps and evaluated once on the test split and on val (nothing
is selected on either; val also draws the training curves). A fraction of 1 runs once
(every seed would draw the same patients). A frozen backbone's tokens are computed
once per init and split, unaugmented, and only the head trains on them; a fine-tuned
backbone (decoder with ``backbone_lr_mult > 0``) runs on augmented batches (random
resized crop and flip of image and mask together). With ``classification_weight > 0``
a classification head on concat(CLS, mean patch token) trains jointly (multi-task).
``config.segment.baselines`` adds supervised models trained from scratch on the same subsets
(``unet_baseline``), reported in the same table; every run records its trainable parameters and
its minutes per epoch (training steps only: ``step_clock``).

Outputs in the workdir: results.json (every figure, the rules used, the checkpoint
record), results.md (the table), overlays_<init>_<head>.png and predictions/ (a few
test cases), training_curves.png, few_label.png (several fractions), and the trained
heads (with the backbone when it was fine-tuned) under models/<run>/checkpoints. In 3D the
predictions are NIfTI volumes on the mask files' grids and the overlays show axial slices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medjax import console, runs
from medjax.batching import epoch_batches, map_batched
from medjax.checkpoint import content_hash
from medjax.data.fractions import summarise
from medjax.models.unet import parameter_count
from medjax.models.vit import VisionTransformer
from medjax.segment import data3d, evaluate2d, evaluate3d, model, outcome, report, unet_baseline
from medjax.segment.data import augment, few_label_indices, load_data
from medjax.segment.step_clock import StepClock
from medjax.segment.validate import validate


@dataclasses.dataclass(frozen=True)
class Backbones:
    """The backbone to segment with and the initialisations to compare."""

    module: VisionTransformer
    inits: dict  # init name -> (params, record of where they came from)
    mean: float  # input normalisation of the backbone's training
    std: float
    size: int  # default 2D input side
    run_dir: str  # the pretraining run ("" for official weights)
    run_data: ml_collections.ConfigDict | None  # that run's data section (None for official weights)


def load_backbones(config) -> Backbones:
    """The backbone of config.segment (a pretraining run, or official weights) and a random init of it."""
    s = config.segment
    if s.official_weights:
        from medjax.models import convert  # lazily: only this path needs it

        if not os.path.exists(s.official_weights):
            raise FileNotFoundError(f"config.segment.official_weights={s.official_weights!r} does not exist; give "
                                    "the path of a .pth, .npz or .safetensors file of official DINOv2 weights.")
        size = s.image_size or 224
        if s.official_kind == "mae":  # the encoder of official MAE weights
            from medjax.models.convert_mae import load_official_mae

            mae, mae_params = load_official_mae(s.official_weights, img_size=size, in_chans=1)
            backbone, params = mae.encoder_model(drop_path_rate=s.drop_path_rate), mae_params["encoder"]
        else:
            backbone, params = convert.load_official(s.official_weights, img_size=size, in_chans=1,
                                                     drop_path_rate=s.drop_path_rate)
        inits = {"official": (params, {"path": os.path.abspath(s.official_weights),
                                       "content_hash": content_hash(params)})}

        def random():
            return model.init_fn(backbone)(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 1)))["params"]

        mean, std, run_dir, run_data = convert.GRAY_MEAN, convert.GRAY_STD, "", None
    else:
        run_dir = s.checkpoint_dir
        run = runs.open_run(run_dir, s.step, doing="segmenting with", key="config.segment.checkpoint_dir",
                            drop_path_rate=s.drop_path_rate)
        _check_dims(run.spatial_dims, s.spatial_dims, run_dir)
        backbone = run.backbone
        inits = {"pretrained": (run.params, run.record())}

        def random():  # the pretraining run's own initialisation from this seed
            return run.random_params(config.seed)

        (mean,), (std,) = run.normalisation
        size, run_data = run.config.crops.global_size, run.config.data
    if s.random_baseline:
        params = random()
        inits = {"random_init": (params, {"seed": config.seed, "content_hash": content_hash(params)}), **inits}
    return Backbones(backbone, inits, mean, std, s.image_size or size, run_dir, run_data)


def _check_dims(run_dims: int, config_dims: int, run_dir: str) -> None:
    """A 2D config with a 3D checkpoint, or the reverse: one sentence naming the fix."""
    if run_dims == config_dims:
        return
    fix = ("use the demo3d or smoke3d variant of configs/segment.py (or set config.segment.spatial_dims=3)"
           if run_dims == 3 else "use a 2D variant such as demo or smoke (or the checkpoint of a 3D pretraining "
           "run, configs/dinov2_reg_3d.py)")
    raise ValueError(f"The pretraining run {run_dir} has a {run_dims}D backbone (its config.model.spatial_dims="
                     f"{run_dims}) but config.segment.spatial_dims={config_dims}; {fix}.")


def embed_splits(backbone, params, splits: dict, n_last_blocks: int, batch: int) -> dict:
    """{split: {"patch": (N, (d,) h, w, F), "pooled": (N, 2D)}} of a frozen backbone, as numpy."""
    fn = model.tokens_fn(backbone, n_last_blocks)
    out = {}
    for name, split in splits.items():
        out[name] = map_batched(lambda x: fn(params, x), split.images, batch)
    return out


def _stats(feats: dict | None, patch_dim: int, pooled_dim: int, labels: np.ndarray, num_cls: int) -> dict:
    """Fixed (untrained) inputs of the heads: per-channel standardisation of frozen tokens (the training
    subset's mean and std; identity for a fine-tuned backbone) and the classification class weights
    (n / (classes present * n_c), 0 for a class absent from the subset)."""
    labelled = labels[labels >= 0]  # rows without a class (multi-task) train the segmentation only
    counts = np.bincount(labelled, minlength=max(num_cls, 1))[: max(num_cls, 1)].astype(np.float64)
    present = max(int((counts > 0).sum()), 1)
    weights = np.where(counts > 0, counts.sum() / (present * np.maximum(counts, 1)), 0.0)
    out = {"cls_weights": jnp.asarray(weights, jnp.float32)}
    if feats is None:
        return {**out, "patch_mean": jnp.zeros(patch_dim), "patch_std": jnp.ones(patch_dim),
                "pooled_mean": jnp.zeros(pooled_dim), "pooled_std": jnp.ones(pooled_dim)}
    p = feats["patch"].reshape(-1, patch_dim)
    return {**out, "patch_mean": jnp.asarray(p.mean(0)), "patch_std": jnp.asarray(p.std(0) + 1e-6),
            "pooled_mean": jnp.asarray(feats["pooled"].mean(0)),
            "pooled_std": jnp.asarray(feats["pooled"].std(0) + 1e-6)}


def _init_params(spec, train, backbone_params, seed: int, num_cls: int) -> dict:
    """Head (and classification head) params, classifier biases at the log class prior; plus a copy of the
    backbone when it is fine-tuned (the train step donates its params)."""
    d = spec.backbone.embed_dim
    # Head inits draw from an "rbg" key: XLA on CPU compiles threefry's normal draws for seconds each.
    key_head, key_cls = jax.random.split(jax.random.key(seed, impl="rbg"))
    grid = tuple(n // spec.backbone.patch_size for n in train.images.shape[1:-1])
    dummy_patch = jnp.zeros((1, *grid, spec.n_last_blocks * d))
    params = {"head": model.init_fn(spec.head)(key_head, dummy_patch, jnp.asarray(train.images[:1]))["params"]}
    params["head"]["classifier"]["bias"] = model.log_prior(train.masks, spec.num_classes)
    if spec.cls_head is not None:
        params["cls_head"] = model.init_fn(spec.cls_head)(key_cls, jnp.zeros((1, 2 * d)))["params"]
        params["cls_head"]["classifier"]["bias"] = model.log_prior(train.labels[train.labels >= 0], num_cls)
    if not spec.frozen:
        params["backbone"] = jax.tree.map(jnp.array, backbone_params)
    return params


def _batches(spec, train, train_feats, s, rng: np.random.Generator):
    """Training batches, consecutive runs of per-epoch permutations (one size: one compile). Frozen:
    gathered on the device from the cached tokens; fine-tuned: augmented on the host (slices or volumes)."""
    labels = train.labels.astype(np.int32)  # < 0: no class (left out of the classification loss)
    augment_fn = data3d.augment if train.images.ndim == 5 else augment
    if spec.frozen:
        device = {"images": jnp.asarray(train.images), "masks": jnp.asarray(train.masks, jnp.int32),
                  **{k: jnp.asarray(v) for k, v in train_feats.items()}}
        if spec.cls_head is not None:
            device["labels"] = jnp.asarray(labels)
    for idx in epoch_batches(len(train), s.batch_size, rng):
        if spec.frozen:
            yield {k: v[jnp.asarray(idx)] for k, v in device.items()}
            continue
        x, m = augment_fn(train.images[idx], train.masks[idx], rng, flip_p=s.flip_p, crop_scale=s.crop_scale)
        b = {"images": x, "masks": m.astype(np.int32)}
        if spec.cls_head is not None:
            b["labels"] = labels[idx]
        yield b


def train_one(spec, opt, backbone_params, train, train_feats, val, val_feats, s, seed: int, num_cls: int, say):
    """Trains one model for ``s.steps`` steps; returns (params, stats, history of train loss and val Dice,
    the ``StepClock`` of its training steps)."""
    d = spec.backbone.embed_dim
    stats = _stats(train_feats, spec.n_last_blocks * d, 2 * d, train.labels, num_cls)
    params = _init_params(spec, train, backbone_params, seed, num_cls)
    step_fn, opt_init = model.train_step_fn(spec, opt, tuple(sorted(params)))
    # Committed to the device from the start, as the step's outputs are: jit compiles the step again for
    # a different mix of committed and uncommitted arguments (15 s for a fine-tuned 3D backbone on a CPU).
    device = jax.devices()[0]
    params, stats = jax.device_put((params, stats), device)
    opt_state = jax.device_put(opt_init(params), device)
    key_steps = jax.random.PRNGKey(seed)  # drop path while fine-tuning
    batches = _batches(spec, train, train_feats, s, np.random.default_rng([seed, 0x5E6]))
    history, losses, clock = [], [], StepClock()
    for step in range(s.steps):
        params, opt_state, parts = step_fn(params, opt_state, stats, next(batches), jax.random.fold_in(key_steps, step))
        losses.append(parts["loss"])
        clock.stepped(step, parts["loss"])
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            clock.pause(params)
            loss = float(np.mean(jax.device_get(losses)))
            if not np.isfinite(loss):
                raise ValueError(f"The training loss became {loss} at step {step + 1}; lower config.segment.lr.")
            dice = evaluate2d.input_size_dice(spec, params, stats, val, val_feats, s.eval_batch, spec.num_classes)
            history.append({"step": step + 1, "train_loss": loss, "val_dice": dice})
            say(f"    step {step + 1}/{s.steps}: loss {loss:.4f}, val Dice {dice:.3f}")
            losses = []
            clock.resume()
    return params, stats, history, clock


def run(config, workdir: str) -> dict:
    validate(config)
    s = config.segment
    loaded = load_backbones(config)
    backbone, mean, std, size = loaded.module, loaded.mean, loaded.std, loaded.size
    three_d = s.spatial_dims == 3
    if not three_d and size % backbone.patch_size:
        raise ValueError(f"config.segment.image_size={size} is not a multiple of the patch size "
                         f"{backbone.patch_size}; choose e.g. {size // backbone.patch_size * backbone.patch_size}.")
    if s.n_last_blocks > backbone.depth:
        raise ValueError(f"config.segment.n_last_blocks={s.n_last_blocks} exceeds the backbone's {backbone.depth} "
                         "blocks.")
    if three_d:
        splits, info = data3d.load_volumes(config, workdir, loaded.run_dir, loaded.run_data, patch=backbone.patch_size, mean=mean,
                                        std=std)
        size, mm = info["input_shape"], " x ".join(f"{t:g}" for t in info["target_spacing"])
        where = f"{' x '.join(map(str, size))} voxels (D x H x W) " + (f"at {mm} mm" if mm else "on the files' grids")
    else:
        splits, info = load_data(config, workdir, loaded.run_dir, size=size, mean=mean, std=std)
        where = f"{size} px"
    names = tuple(s.class_names)
    cls_names = info["classification_classes"]
    unit = "volumes" if three_d else "slices"
    console.say(f"segment: {info['task']}; classes {', '.join(names)}; input {where}; " + ", ".join(
        f"{len(sp)} {k} {unit} of {len(set(sp.patients.tolist()))} patients" for k, sp in splits.items()))
    opt = model.OptSpec(s.lr, s.backbone_lr_mult, s.weight_decay, s.warmup_steps, s.steps)
    results = {"task": info["task"], "class_names": list(names), "classification_classes": cls_names,
               "empty_rule": s.empty_rule, "hd95_unit": info["hd95_unit"], "rules": RULES[s.empty_rule],
               "spacing_assumed_for": info["spacing_assumed_for"], "manifest": info["manifest"],
               "spatial_dims": s.spatial_dims, "input_size": size,
               "run_dir": os.path.abspath(loaded.run_dir) if loaded.run_dir else "",
               "config": json.loads(config.to_json_best_effort()), "inits": {}, "baselines": {}, "runs": []}
    for init, (params, record) in loaded.inits.items():
        results["inits"][init] = dict(record)
        feats = None
        for head in s.heads:
            frozen = head == "linear" or s.backbone_lr_mult == 0
            if frozen and feats is None:
                console.say(f"{init}: computing the frozen backbone's tokens of {sum(map(len, splits.values()))} {unit} ...")
                start = time.perf_counter()
                feats = embed_splits(backbone, params, splits, s.n_last_blocks, s.eval_batch)
                # Once per init, shared by its frozen heads (whose minutes per epoch are on these tokens).
                results["inits"][init]["token_minutes"] = (time.perf_counter() - start) / 60
            spec = model.SegSpec(backbone, model.build_head(head, len(names), s.decoder_channels, s.image_skip),
                              model.ClassifierHead(len(cls_names)) if s.classification_weight > 0 else None,
                              s.n_last_blocks, len(names), s.dice_weight, s.ce_weight, s.classification_weight, frozen)
            for fraction in s.label_fractions:
                # The whole training set is the same subset for every seed: one run.
                for seed in (s.fraction_seeds if fraction < 1 else s.fraction_seeds[:1]):
                    r = _one_run(spec, opt, params=params, init=init, head=head, fraction=fraction, seed=seed,
                                 splits=splits, feats=feats, s=s, cls_names=cls_names, workdir=workdir, record=record,
                                 overlays=fraction == max(s.label_fractions) and seed == s.fraction_seeds[0])
                    results["runs"].append(r)
    for name in s.baselines:  # supervised models trained from scratch on the same subsets
        results["baselines"][name] = unet_baseline.describe(s, len(names), splits["train"].images.shape[1:])
        results["runs"] += unet_baseline.run_all(s, splits, workdir, cls_names)
    results["summary"] = _summary(results["runs"], names)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = report.markdown(results)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# Segmentation{' and classification' if cls_names else ''}\n\nTask: {info['task']}. Input "
                f"{where}; {s.steps} steps per ViT head run"
                + (f", {s.unet_steps} per U-Net run (from scratch; settings in results.json)" if s.baselines else "")
                + "; metrics on the test split at each scan's own resolution. "
                f"{RULES[s.empty_rule]}\n\n{table}")
    report.plot_curves(results, os.path.join(workdir, "training_curves.png"))
    if len(s.label_fractions) > 1:
        report.plot_fractions(results, os.path.join(workdir, "few_label.png"))
    console.say(table)
    return results


RULES = {rule: ("Dice per foreground class (background excluded); a prediction where the ground truth is empty "
                "scores 0; ground truth and prediction both empty: "
                + ("left out of the mean (NaN)" if rule == "nan" else "counted as 1.0")
                + ". Per patient = mean over its volumes (2D: a volume's slices stacked); mean ± std over patients "
                "(n). HD95: 95th-percentile symmetric surface distance with the voxel spacing; both empty left out, "
                "one empty = inf (counted, not averaged).") for rule in ("nan", "one")}


def _one_run(spec, opt, *, params, init: str, head: str, fraction: float, seed: int, splits: dict, feats, s,
             cls_names, workdir: str, record: dict, overlays: bool) -> dict:
    start = time.perf_counter()
    classify = spec.cls_head is not None
    three_d = spec.backbone.spatial_dims == 3
    ev, unit = (evaluate3d, "volumes") if three_d else (evaluate2d, "slices")  # the same predict calls
    idx = few_label_indices(splits["train"], fraction, seed, classify)
    train = splits["train"].subset(idx)
    patients = len(set(train.patients.tolist()))
    mode = "frozen" if spec.frozen else "fine-tuned"
    console.say(f"{init} / {head} ({mode} backbone), fraction {fraction:g}, seed {seed}: {patients} patients, "
          f"{len(train)} {unit}")
    train_feats = {k: v[idx] for k, v in feats["train"].items()} if spec.frozen else None
    val_feats = feats["val"] if spec.frozen else None
    trained, stats, history, clock = train_one(spec, opt, params, train, train_feats, splits["val"], val_feats, s,
                                               seed, len(cls_names), say=console.say)

    def predict(split: str):
        return ev.predict(spec, trained, stats, splits[split], feats[split] if spec.frozen else None, s.eval_batch)

    meta = {"init": record, "head": head, "backbone": mode, "fraction": fraction, "seed": seed, "steps": s.steps}
    result = {"init": init, "head": head, "backbone": mode, "fraction": fraction, "seed": seed,
              "train_patients": patients, f"train_{unit}": len(train), "steps": s.steps,
              "trainable_parameters": parameter_count(trained), "history": history}
    result.update(outcome.evaluate_and_save(
        predict, splits, s, three_d=three_d, workdir=workdir, run_name=f"{init}_{head}_f{fraction:g}_s{seed}",
        model_name=f"{init}_{head}", title=f"{init} / {head}", state={"params": trained, "stats": stats}, meta=meta,
        cls_names=cls_names, overlays=overlays))
    result["minutes"] = (time.perf_counter() - start) / 60
    result["minutes_per_epoch"] = clock.minutes_per_epoch(min(s.batch_size, len(train)), len(train))
    outcome.say_result(result, console.say)
    return result


def _summary(runs: list, names) -> list:
    """Mean ± std over the seeds of each (init, head, fraction) of the per-patient test Dice (and accuracy)."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["init"], r["head"], r["fraction"]), []).append(r)
    out = []
    for (init, head, fraction), rs in groups.items():
        g = {"init": init, "head": head, "fraction": fraction, "runs": len(rs), "dice_patient": {}}
        for n in names[1:]:
            g["dice_patient"][n] = summarise([r["test"]["patient"]["classes"][n]["dice_mean"] for r in rs])
            g.setdefault("val_dice_patient", {})[n] = summarise([r["val"]["patient"]["classes"][n]["dice_mean"]
                                                                 for r in rs])
        if rs[0].get("classification"):
            g["accuracy"] = summarise([r["classification"]["accuracy"] for r in rs])
            g["balanced_accuracy"] = summarise([r["classification"]["balanced_accuracy"] for r in rs])
        out.append(g)
    return out
