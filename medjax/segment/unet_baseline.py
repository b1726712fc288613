"""The supervised baseline beside the ViT heads: a U-Net trained from scratch on the same labelled slices.

``config.segment.baselines = ("unet",)`` adds, for every label fraction and seed of the
ViT heads, one U-Net (``medjax.models.unet``: ``unet_width`` channels at the first of
``unet_depth`` + 1 levels) trained on exactly the same training subset (the same patients,
drawn by ``few_label_indices`` with the same seed and strata), evaluated on the same val and
test slices with the same metrics, and reported in the same table as init ``scratch``,
head ``unet``.

Its own optimisation (a network trained from nothing needs more steps and another learning
rate than a head on fixed tokens): AdamW (b1 0.9, b2 0.999, weight decay ``unet_weight_decay``
on conv kernels, none on biases and norms), gradient norm clipped at 1, learning rate
``unet_lr`` after ``unet_warmup_steps`` of linear warm-up, cosine decay to 0 over
``unet_steps`` steps of ``batch_size`` slices. The loss and the augmentation are the ViT heads'
(``dice_weight`` soft Dice + ``ce_weight`` cross-entropy; random resized crop ``crop_scale``
and left-right flip ``flip_p`` of image and mask together), and the classifier's biases start
at the log class frequencies, as the heads' do. The input is the heads' input: each slice
resized to the model input size and normalised with the backbone's mean and std.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import console
from medjax.batching import epoch_batches
from medjax.models.unet import UNet, parameter_count
from medjax.segment import evaluate2d, model, outcome
from medjax.segment.data import augment, few_label_indices
from medjax.segment.step_clock import StepClock

BASELINES = ("unet",)
INIT, HEAD, BACKBONE = "scratch", "unet", "none"  # how its runs appear in the results


def build(s, num_classes: int) -> UNet:
    return UNet(num_classes, width=s.unet_width, depth=s.unet_depth)


def optimisation(s) -> model.OptSpec:
    return model.OptSpec(s.unet_lr, 0.0, s.unet_weight_decay, s.unet_warmup_steps, s.unet_steps)


def describe(s, num_classes: int, input_shape) -> dict:
    """The baseline's architecture, size and training settings, for results.json."""
    net = build(s, num_classes)
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, *input_shape), jnp.float32))
    return {"model": "U-Net (Ronneberger et al. 2015) with GroupNorm, trained from scratch", "width": s.unet_width,
            "depth": s.unet_depth, "parameters": parameter_count(shapes),
            "optimiser": "AdamW, gradient norm clipped at 1, linear warm-up then cosine decay to 0",
            "lr": s.unet_lr, "weight_decay": s.unet_weight_decay, "warmup_steps": s.unet_warmup_steps,
            "steps": s.unet_steps, "batch_size": s.batch_size, "flip_p": s.flip_p, "crop_scale": list(s.crop_scale)}


def _loss(params, batch, net, num_classes: int, dice_weight: float, ce_weight: float):
    logits = net.apply({"params": params["unet"]}, batch["images"])
    loss, parts = model.segmentation_loss(logits, batch["masks"], num_classes, dice_weight, ce_weight)
    return loss, {**parts, "loss": loss}


@functools.lru_cache(maxsize=8)
def train_step_fn(net: UNet, opt: model.OptSpec, dice_weight: float, ce_weight: float):
    """(jitted step (params, opt_state, batch) -> (params, opt_state, parts), optimizer init)."""
    def init(params):
        return model.make_optimizer(opt, params).init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        grads, parts = jax.grad(_loss, has_aux=True)(params, batch, net, net.num_classes, dice_weight, ce_weight)
        updates, opt_state = model.make_optimizer(opt, params).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    return step, init


@functools.lru_cache(maxsize=8)
def predict_fn(net: UNet):
    """Jitted (params, inputs) -> (logits at the input size, None): ``evaluate2d.predict_with``'s ``fn``."""
    return jax.jit(lambda params, inputs: (net.apply({"params": params["unet"]}, inputs["images"]), None))


def _batches(train, s, rng: np.random.Generator):
    """Augmented training batches, consecutive runs of per-epoch permutations (one size: one compile)."""
    for idx in epoch_batches(len(train), s.batch_size, rng):
        x, m = augment(train.images[idx], train.masks[idx], rng, flip_p=s.flip_p, crop_scale=s.crop_scale)
        yield {"images": x, "masks": m.astype(np.int32)}


def train_one(net: UNet, train, val, s, seed: int, say=console.say):
    """Trains one U-Net for ``s.unet_steps`` steps; returns (params, history, ``StepClock``)."""
    # An "rbg" key: XLA on CPU compiles threefry's normal draws for seconds each.
    params = {"unet": model.init_fn(net)(jax.random.key(seed, impl="rbg"), jnp.asarray(train.images[:1]))["params"]}
    params["unet"]["classifier"]["bias"] = model.log_prior(train.masks, net.num_classes)
    step_fn, opt_init = train_step_fn(net, optimisation(s), float(s.dice_weight), float(s.ce_weight))
    device = jax.devices()[0]  # committed from the start, as the step's outputs are (one compile)
    params = jax.device_put(params, device)
    opt_state = jax.device_put(opt_init(params), device)
    predict = predict_fn(net)
    batches = _batches(train, s, np.random.default_rng([seed, 0x0E7]))
    history, losses, clock = [], [], StepClock()
    for step in range(s.unet_steps):
        params, opt_state, parts = step_fn(params, opt_state, next(batches))
        losses.append(parts["loss"])
        clock.stepped(step, parts["loss"])
        if (step + 1) % s.eval_every == 0 or step + 1 == s.unet_steps:
            clock.pause(params)
            loss = float(np.mean(jax.device_get(losses)))
            if not np.isfinite(loss):
                raise ValueError(f"The U-Net's training loss became {loss} at step {step + 1}; lower "
                                 "config.segment.unet_lr.")
            dice = evaluate2d.input_size_dice_with(lambda part: predict(params, part), val, None, s.eval_batch,
                                                   net.num_classes)
            history.append({"step": step + 1, "train_loss": loss, "val_dice": dice})
            say(f"    step {step + 1}/{s.unet_steps}: loss {loss:.4f}, val Dice {dice:.3f}")
            losses = []
            clock.resume()
    return params, history, clock


def run_all(s, splits: dict, workdir: str, cls_names, say=console.say) -> list[dict]:
    """One U-Net per label fraction and seed (a fraction of 1 once), on the ViT heads' training subsets."""
    net = build(s, len(s.class_names))
    classify = s.classification_weight > 0  # the heads' strata, so that the subsets are the same
    runs = []
    for fraction in s.label_fractions:
        for seed in (s.fraction_seeds if fraction < 1 else s.fraction_seeds[:1]):
            start = time.perf_counter()
            idx = few_label_indices(splits["train"], fraction, seed, classify)
            train = splits["train"].subset(idx)
            patients = len(set(train.patients.tolist()))
            say(f"{INIT} / {HEAD} (supervised baseline), fraction {fraction:g}, seed {seed}: {patients} patients, "
                f"{len(train)} slices")
            params, history, clock = train_one(net, train, splits["val"], s, seed, say)
            predict = predict_fn(net)

            def predict_split(name: str, params=params):
                return evaluate2d.predict_with(lambda part: predict(params, part), splits[name], None, s.eval_batch)

            meta = {"init": {"from": "scratch", "seed": seed}, "head": HEAD, "backbone": BACKBONE,
                    "fraction": fraction, "seed": seed, "steps": s.unet_steps}
            result = {"init": INIT, "head": HEAD, "backbone": BACKBONE, "fraction": fraction, "seed": seed,
                      "train_patients": patients, "train_slices": len(train), "steps": s.unet_steps,
                      "trainable_parameters": parameter_count(params), "history": history}
            result.update(outcome.evaluate_and_save(
                predict_split, splits, s, three_d=False, workdir=workdir, run_name=f"{INIT}_{HEAD}_f{fraction:g}_s{seed}",
                model_name=f"{INIT}_{HEAD}", title="U-Net from scratch", state={"params": params}, meta=meta,
                cls_names=cls_names, overlays=fraction == max(s.label_fractions) and seed == s.fraction_seeds[0]))
            result["minutes"] = (time.perf_counter() - start) / 60
            result["minutes_per_epoch"] = clock.minutes_per_epoch(min(s.batch_size, len(train)), len(train))
            runs.append(result)
            outcome.say_result(result, say)
    return runs
