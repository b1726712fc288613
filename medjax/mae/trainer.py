"""MAE pretraining: train state, the jitted step, and the loop (log, plot, reconstructions, checkpoint, resume).

Read top to bottom: ``MAEState`` -> ``make_optimizer`` (the official AdamW: betas (0.9, 0.95), weight
decay on matrices only, the sin-cos tables frozen) -> ``make_train_step`` (pure; the lr is a function
of the step, the masking noise and drop path come from the step's rng) -> ``run``. The loop is the
DINOv2 trainer's: metrics leave the device only at log steps, a non-finite loss stops the run before
anything is saved, checkpoints hold the state and the Grain iterator, a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from medjax import checkpoint, console, reporting, resume_guard, schedule_check, sharding, training_loop
from medjax.mae.batches import MAEData
from medjax.mae.reconstructions import Reconstructions
from medjax.mae.validate import validate, visible_patches
from medjax.models.backbone import backbone_from_config, mae_encoder_init, mae_from_config
from medjax.models.mae import FROZEN_PARAMS
from medjax.probe import Evaluator
from medjax.schedules import HalfCycleCosine


class MAEState(flax.struct.PyTreeNode):
    step: jax.Array
    params: dict  # {"encoder": a ViT params tree, decoder params ...}
    opt_state: Any


def _labels(params, rule) -> Any:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: rule(path, leaf) for path, leaf in flat.items()})


def make_optimizer(config, lr: HalfCycleCosine) -> optax.GradientTransformation:
    """AdamW as the official MAE: no weight decay on 1-D params (biases, norms), the positional tables
    (``FROZEN_PARAMS``) not updated at all, optional global-norm clipping (off in the recipe)."""
    o = config.optim
    adamw = optax.adamw(lr, b1=o.adamw_beta1, b2=o.adamw_beta2, eps=1e-8, weight_decay=o.weight_decay,
                        mask=lambda params: jax.tree.map(lambda leaf: leaf.ndim > 1, params))
    if o.clip_grad > 0:
        adamw = optax.chain(optax.clip_by_global_norm(o.clip_grad), adamw)
    return optax.multi_transform(
        {"train": adamw, "frozen": optax.set_to_zero()},
        lambda params: _labels(params, lambda path, leaf: "frozen" if path in FROZEN_PARAMS else "train"))


def init_params(model, config, rng) -> dict:
    shape = (1,) + (model.img_size,) * model.spatial_dims + (model.in_chans,)
    return model.init({"params": rng, "masking": rng}, jnp.zeros(shape, jnp.float32),
                      mask_ratio=config.mae.mask_ratio)["params"]


def init_state(model, config, rng, tx) -> MAEState:
    params = init_params(model, config, rng)
    return MAEState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_sharded_state(model, config, rng, tx, mesh) -> tuple[MAEState, Any]:
    """The initial state created in its layout on ``mesh`` (large leaves split over ``fsdp``)."""

    def init(r):
        return init_state(model, config, r, tx)

    shardings = sharding.param_shardings(jax.eval_shape(init, rng), mesh, config.mesh.fsdp_min_size)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def start_from_official(state: MAEState, shardings, model, path: str) -> MAEState:
    """Encoder and decoder from official MAE weights (continued pretraining, e.g. from ImageNet MAE);
    an encoder-only file leaves the decoder at its fresh initialisation (the loader says so)."""
    from medjax.models.convert_mae import load_official_mae

    if not os.path.exists(path):
        raise FileNotFoundError(f"config.model.init_weights={path!r} does not exist; give the path of official MAE "
                                "weights (.pth, .npz or .safetensors).")
    _, loaded = load_official_mae(path, model=model)
    return jax.device_put(state.replace(params={**state.params, **loaded}), shardings)


def jit_train_step(train_step, state_shardings, batch_shardings: dict, mesh):
    replicated = sharding.replicated(mesh)
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_train_step(model, config, tx, lr: HalfCycleCosine):
    """The pure train step ``(state, batch, rng) -> (state, metrics)``."""
    ratio = config.mae.mask_ratio

    def loss_fn(params, images, rng):
        r_mask, r_drop = jax.random.split(rng)
        out = model.apply({"params": params}, images, mask_ratio=ratio, train=True,
                          rngs={"masking": r_mask, "drop_path": r_drop})
        return out["loss"]

    def train_step(state: MAEState, batch: dict, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch["images"], step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(params))
        metrics = {"loss": loss, "lr": lr(state.step), "grad_norm": optax.global_norm(grads),
                   "finite": finite.astype(jnp.float32)}
        return MAEState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


@dataclasses.dataclass
class Trainable:
    """What ``run`` trains and the dry run times: the model, its lr schedule, the initial state in its
    layout on the mesh, the compiled step and the rng it folds the step into."""

    model: Any
    lr: HalfCycleCosine
    state: MAEState
    step_fn: Any
    step_rng: jax.Array

    @property
    def step_inputs(self) -> tuple:
        """What ``step_fn(state, batch, *step_inputs)`` takes after the state and the batch."""
        return (self.step_rng,)


def build(config, mesh, global_batch: int, epoch_length: int, batch_shardings: dict, *,
          load_weights: bool = True) -> Trainable:
    """The initial state (from ``config.model.init_weights`` when set and ``load_weights``) and the jitted step."""
    model = mae_from_config(config)
    total_steps = config.optim.epochs * epoch_length
    lr = HalfCycleCosine(config.optim.base_lr * global_batch / 256.0, config.optim.min_lr,
                         total_steps, config.optim.warmup_epochs * epoch_length)
    tx = make_optimizer(config, lr)
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state, state_shardings = init_sharded_state(model, config, init_rng, tx, mesh)
    if config.model.init_weights and load_weights:
        state = start_from_official(state, state_shardings, model, config.model.init_weights)
    step_fn = jit_train_step(make_train_step(model, config, tx, lr), state_shardings, batch_shardings, mesh)
    return Trainable(model, lr, state, step_fn, step_rng)


def steps_from(config) -> str:
    """The keys that set the number of steps (one epoch is one pass over the data unless epoch_length is set)."""
    return "config.optim.epochs or config.train.epoch_length" if config.train.epoch_length else "config.optim.epochs"


def run(config, workdir: str) -> dict:
    """Pretrains an MAE per ``config`` in ``workdir`` (resuming from its latest checkpoint); returns a summary."""
    validate(config)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    global_batch = config.train.batch_size_per_device * mesh.size
    data = MAEData(config, mesh, workdir, say=console.say)
    epoch_length = config.train.epoch_length or data.epoch_length
    total_steps = config.optim.epochs * epoch_length
    stop_step = total_steps if config.train.stop_at_step < 0 else min(config.train.stop_at_step, total_steps)
    for warning in schedule_check.absurd_schedule(total_steps, global_batch, len(data.source), steps_from(config)):
        console.warn(warning)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
    params = jax.eval_shape(lambda r: init_params(mae_from_config(config), config, r), jax.random.PRNGKey(0))
    meta = resume_guard.run_meta(config, checkpoint.tree_fingerprint(params), global_batch)
    resume_at = training_loop.resumable_step(ckpt, meta, allow_config_change=config.allow_config_change)
    built = build(config, mesh, global_batch, epoch_length, data.shardings)
    model, lr, step_fn = built.model, built.lr, built.step_fn
    state, start = training_loop.resume(ckpt, resume_at, built.state, data, meta, total_steps)
    console.say(f"MAE: {model.depth}-block encoder of width {model.embed_dim} sees {visible_patches(config)} of "
                f"{(model.img_size // model.patch_size) ** model.spatial_dims} patches; {epoch_length} steps per "
                f"epoch of {global_batch} images, {total_steps} steps, peak lr {lr.base:.3g}.")

    reporter = reporting.Reporter(workdir, total_steps=total_steps, images_per_step=global_batch, is_main=is_main)
    evaluator = None
    if config.evals.every or config.evals.final:
        evaluator = Evaluator(config, backbone_from_config(config), workdir,
                              random_params=lambda seed: mae_encoder_init(config, jax.random.PRNGKey(seed)))
    pictures = Reconstructions(config, model, workdir) if is_main and config.train.reconstructions else None
    on_plot = (lambda s, step: pictures.draw(checkpoint.host_arrays(s.params), step)) if pictures else None
    result = training_loop.run_steps(
        config, workdir, state=state, step_fn=step_fn, step_inputs=built.step_inputs, data=data, ckpt=ckpt, meta=meta,
        reporter=reporter, start=start, stop_step=stop_step, evaluator=evaluator,
        backbone_params=lambda s: s.params["encoder"], title=_title(config), on_plot=on_plot)
    last, final_table = result.last, result.final_table
    summary = {"workdir": os.path.abspath(workdir), "steps": stop_step, "total_steps": total_steps,
               "minutes": result.minutes, "final_metrics": last}
    if stop_step > start:
        console.say(f"\nMAE pretraining finished at step {stop_step} of {total_steps} ({summary['minutes']:.1f} min "
                    f"in this run); final loss {last.get('loss', float('nan')):.4f}.\n  workdir {summary['workdir']}: "
                    "checkpoints/, tensorboard/, metrics.jsonl, training_overview.png, reconstructions.png")
        if final_table:
            console.say(f"\nWhat pretraining bought (MAE encoder at step {stop_step} vs random init; "
                        f"{workdir}/eval/):\n\n{final_table}")
    return summary


def _title(config) -> str:
    m = config.model
    return f"medjax MAE pretraining: {m.arch}, patch {m.patch_size}, mask {config.mae.mask_ratio:g}"
