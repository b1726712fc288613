"""DINOv2 pretraining: train state, the jitted step, and the loop (log, plot, checkpoint, resume).

Read top to bottom: ``PretrainState`` -> ``make_train_step`` (pure; schedules
are functions of the step, and an input of the compiled step rather than its
constants) -> ``run`` (data, resume, loop). The loop fetches
metrics from the device only at log and checkpoint steps; a non-finite loss
found there stops the run before anything is saved, so the last checkpoint on
disk is always a good one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax import checkpoint, console, optim, reporting, resume_guard, schedule_check, sharding, training_loop
from medjax.models.backbone import dinov2_init
from medjax.pretrain.batches import PretrainData
from medjax.pretrain.collapse import CollapseWatch, collapse_verdict
from medjax.pretrain.loss_model import LossConfig, build_models, init_params, ssl_loss
from medjax.pretrain.validate import validate
from medjax.probe import Evaluator
from medjax.schedules import PretrainSchedules, as_step_input, pretrain_schedules


class PretrainState(flax.struct.PyTreeNode):
    step: jax.Array
    student: dict
    teacher: dict
    opt_state: Any
    dino_center: jax.Array
    ibot_center: jax.Array


def _ema(teacher, student, momentum):
    """The teacher's exponential moving average of the student: momentum * teacher + (1 - momentum) * student."""
    return jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s, teacher, student)


def head_warmup_steps(config) -> int:
    """Steps at the start of a run from ``config.model.init_weights`` during which only the heads train.

    Released DINOv2 weights come without their DINO/iBOT heads; fresh random heads give the backbone
    meaningless targets and gradients, which can wreck pretrained features in the first steps. So the
    backbone stays frozen (no update, no Adam moments) for ``config.model.head_warmup_epochs`` epochs
    while the heads learn, the teacher's heads copying the student's. The schedules run on unchanged.
    """
    if not config.model.init_weights:
        return 0
    return config.model.head_warmup_epochs * config.train.epoch_length


def init_state(models, config, rng, adam: optax.GradientTransformation) -> PretrainState:
    student = init_params(models, rng, config)
    k_ibot = config.head.ibot_n_prototypes if models.ibot_head is not None else config.head.n_prototypes
    return PretrainState(
        step=jnp.zeros((), jnp.int32),
        student=student,
        teacher=jax.tree.map(jnp.copy, student),
        opt_state=adam.init(student),
        dino_center=jnp.zeros((1, config.head.n_prototypes), jnp.float32),
        ibot_center=jnp.zeros((1, k_ibot), jnp.float32),
    )


def init_sharded_state(models, config, rng, adam, mesh) -> tuple[PretrainState, PretrainState]:
    """The initial state created directly in its layout on ``mesh``, and that layout (a pytree of
    NamedShardings): every leaf of ``config.mesh.fsdp_min_size`` elements or more split over the
    ``fsdp`` axis (student, teacher, Adam moments and centres alike), the rest replicated."""

    def init(r):
        return init_state(models, config, r, adam)

    shardings = sharding.param_shardings(jax.eval_shape(init, rng), mesh, config.mesh.fsdp_min_size)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def start_from_official(state: PretrainState, shardings, models, path: str) -> PretrainState:
    """Student and teacher backbones from Meta's DINOv2 weights (continued pretraining on scans).

    The config's model must have the weights' architecture (e.g. ``:vits14`` with 4 registers for
    ``dinov2_vits14_reg4_pretrain.pth``); RGB patch kernels are folded for 1-channel inputs and the
    positional embedding is resized to the global crop size. The heads start from scratch, as the
    released weights have none. Only a fresh run does this: a resumed run restores its checkpoint.
    """
    from medjax.models.convert import load_official

    if not os.path.exists(path):
        raise FileNotFoundError(f"config.model.init_weights={path!r} does not exist; give the path of official "
                                "DINOv2 backbone weights (.pth, .npz or .safetensors).")
    _, backbone = load_official(path, model=models.backbone)
    state = state.replace(student={**state.student, "backbone": backbone},
                          teacher={**state.teacher, "backbone": backbone})
    return jax.device_put(state, shardings)


def jit_train_step(train_step, state_shardings, batch_shardings: dict, mesh):
    """``train_step`` compiled once with explicit layouts: state as ``state_shardings`` (donated),
    batch entries split over the devices, rng, schedules and metrics replicated."""
    replicated = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings, replicated, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def make_train_step(models, config, rules: optim.ParamRules, adam, loss_cfg: LossConfig | None = None):
    """The pure train step ``(state, batch, rng, schedules) -> (state, metrics)``; ``loss_cfg`` defaults to
    the config's. ``schedules`` (``as_step_input(pretrain_schedules(...))``) is an argument so that runs
    differing only in schedule values (learning rate, epochs) compile one program."""
    loss_cfg = loss_cfg or LossConfig.from_config(config)
    loss_fn = functools.partial(ssl_loss, models=models, cfg=loss_cfg)
    clip = config.optim.clip_grad
    n_prototypes = config.head.n_prototypes
    warmup_steps = head_warmup_steps(config)

    def train_step(state: PretrainState, batch: dict, rng: jax.Array, schedules: PretrainSchedules):
        hp = schedules.values(state.step)
        step_rng = jax.random.fold_in(rng, state.step)
        centers = (state.dino_center, state.ibot_center)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (metrics, (dino_center, ibot_center))), grads = grad_fn(
            state.student, state.teacher, batch, centers, hp["teacher_temp"], step_rng
        )
        frozen = state.step < warmup_steps  # head warm-up: the backbone neither moves nor gathers Adam moments
        with jax.named_scope("optimizer"):
            grads, grad_norm = optim.clip_per_module(grads, clip)
            if warmup_steps:
                grads = {**grads, "backbone": jax.tree.map(lambda g: jnp.where(frozen, 0.0, g), grads["backbone"])}
            adam_updates, opt_state = adam.update(grads, state.opt_state)
            student = optim.adamw_step(
                state.student,
                adam_updates,
                rules,
                lr=hp["lr"],
                last_layer_lr=hp["last_layer_lr"],
                weight_decay=hp["weight_decay"],
            )
            if warmup_steps:
                student = {**student, "backbone": jax.tree.map(lambda new, old: jnp.where(frozen, old, new),
                                                               student["backbone"], state.student["backbone"])}
        m = hp["teacher_momentum"]
        # The teacher follows the updated student (official order: optimizer step, then EMA); during the
        # head warm-up its heads are the student's (the fresh heads have no history worth averaging).
        head_m = jnp.where(frozen, 0.0, m)
        with jax.named_scope("teacher_ema"):
            teacher = {part: _ema(state.teacher[part], student[part], m if part == "backbone" else head_m)
                       for part in student}
        finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(student))
        metrics = {
            **metrics,
            **hp,
            "grad_norm": grad_norm,
            "finite": finite.astype(jnp.float32),
            "log_prototypes": jnp.log(jnp.float32(n_prototypes)),
        }
        new_state = PretrainState(
            step=state.step + 1,
            student=student,
            teacher=teacher,
            opt_state=opt_state,
            dino_center=dino_center,
            ibot_center=ibot_center,
        )
        return new_state, metrics

    return train_step


@dataclasses.dataclass
class Trainable:
    """What ``run`` trains and the dry run times: the models, the initial state in its layout on the mesh,
    the compiled step, and its other inputs: the rng it folds the step into and the schedules."""

    models: Any
    state: PretrainState
    step_fn: Any
    step_rng: jax.Array
    schedules: PretrainSchedules

    @property
    def step_inputs(self) -> tuple:
        """What ``step_fn(state, batch, *step_inputs)`` takes after the state and the batch."""
        return self.step_rng, self.schedules


def build(config, mesh, global_batch: int, batch_shardings: dict, *, load_weights: bool = True) -> Trainable:
    """The initial state (from ``config.model.init_weights`` when set and ``load_weights``) and the jitted step."""
    models = build_models(config)
    schedules = as_step_input(pretrain_schedules(config, global_batch))
    adam = optim.make_adam(config.optim.adamw_beta1, config.optim.adamw_beta2)
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state, state_shardings = init_sharded_state(models, config, init_rng, adam, mesh)
    if config.model.init_weights and load_weights:
        state = start_from_official(state, state_shardings, models, config.model.init_weights)
    rules = optim.ParamRules.from_params(
        state.student,
        depth=models.backbone.depth,
        layerwise_decay=config.optim.layerwise_decay,
        patch_embed_lr_mult=config.optim.patch_embed_lr_mult,
    )
    step_fn = jit_train_step(make_train_step(models, config, rules, adam), state_shardings, batch_shardings, mesh)
    return Trainable(models, state, step_fn, step_rng, schedules)


def total_steps_of(config) -> int:
    """The schedule's length: ``config.optim.epochs`` epochs of ``config.train.epoch_length`` steps."""
    return config.optim.epochs * config.train.epoch_length


STEPS_FROM = "config.optim.epochs or config.train.epoch_length"  # the keys that set the number of steps


def run(config, workdir: str) -> dict:
    """Pretrains per ``config`` in ``workdir`` (resuming from its latest checkpoint); returns a summary."""
    validate(config)
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    global_batch = config.train.batch_size_per_device * mesh.size
    total_steps = total_steps_of(config)
    stop_step = total_steps if config.train.stop_at_step < 0 else min(config.train.stop_at_step, total_steps)

    data = PretrainData(config, mesh, workdir, say=console.say)
    for warning in schedule_check.absurd_schedule(total_steps, global_batch, len(data.source), STEPS_FROM):
        console.warn(warning)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
    student = jax.eval_shape(lambda r: init_params(build_models(config), r, config), jax.random.PRNGKey(0))
    meta = resume_guard.run_meta(config, checkpoint.tree_fingerprint(student), global_batch)
    resume_at = training_loop.resumable_step(ckpt, meta, allow_config_change=config.allow_config_change)
    built = build(config, mesh, global_batch, data.shardings)
    models = built.models
    state, start = training_loop.resume(ckpt, resume_at, built.state, data, meta, total_steps)

    warmup = head_warmup_steps(config)
    if warmup > start and is_main:
        console.say(f"Head warm-up: steps {start + 1}-{warmup} train only the new DINO/iBOT heads on the frozen "
                    f"backbone of {config.model.init_weights} (config.model.head_warmup_epochs); then all of it.")
    reporter = reporting.Reporter(
        workdir, total_steps=total_steps, images_per_step=global_batch, is_main=is_main
    )
    evaluator = None
    if config.evals.every or config.evals.final:
        backbone = models.backbone
        evaluator = Evaluator(config, backbone, workdir,
                              random_params=lambda seed: dinov2_init(backbone, jax.random.PRNGKey(seed)))
    watch = CollapseWatch(config.head.n_prototypes, collapse_grace_steps(config, total_steps))
    result = training_loop.run_steps(
        config, workdir, state=state, step_fn=built.step_fn, step_inputs=built.step_inputs, data=data, ckpt=ckpt, meta=meta,
        reporter=reporter, start=start, stop_step=stop_step, evaluator=evaluator,
        backbone_params=lambda s: s.teacher["backbone"], title=_title(config), watch=watch)
    final_table = result.final_table
    summary = {
        "workdir": os.path.abspath(workdir),
        "steps": stop_step,
        "total_steps": total_steps,
        "minutes": result.minutes,
        "final_metrics": result.last,
    }
    if is_main and stop_step > start:
        _print_summary(summary, config, watch)
        if final_table:
            console.say(f"\nWhat pretraining bought (teacher at step {stop_step} vs random init; {workdir}/eval/):\n\n"
                        f"{final_table}")
    return summary


def collapse_grace_steps(config, total_steps: int) -> int:
    """Steps before collapse warnings start: the lr warm-up (at most 10 % of the run), when every run's
    targets are still alike; with an official-weights start, at least the head warm-up."""
    warmup = config.optim.warmup_epochs * config.train.epoch_length
    return max(min(warmup, total_steps // 10), head_warmup_steps(config))


def _title(config) -> str:
    m = config.model
    regs = f", {m.num_register_tokens} registers" if m.num_register_tokens else ""
    return f"medjax pretraining: {m.arch}{regs}, patch {m.patch_size}"


def _print_summary(summary: dict, config, watch: CollapseWatch) -> None:
    last = summary["final_metrics"]
    k = config.head.n_prototypes
    verdict = collapse_verdict(last.get("teacher_entropy", np.nan), last.get("teacher_batch_entropy", np.nan), k)
    console.say(f"\nPretraining finished at step {summary['steps']} of {summary['total_steps']} "
                f"({summary['minutes']:.1f} min in this run).\n"
                f"  final loss {last.get('loss', float('nan')):.4f}"
                f" (dino {last.get('dino_global_loss', 0) + last.get('dino_local_loss', 0):.4f},"
                f" ibot {last.get('ibot_loss', 0):.4f}, koleo {last.get('koleo_loss', 0):.4f})\n"
                f"  teacher entropy {last.get('teacher_entropy', float('nan')):.2f} nats per sample,"
                f" {last.get('teacher_batch_entropy', float('nan')):.2f} for the batch mean"
                f" (uniform = {np.log(k):.2f}, one-hot = 0): {verdict}\n"
                f"  workdir {summary['workdir']}: checkpoints/, tensorboard/, metrics.jsonl, training_overview.png")
    if watch.summary():
        console.warn(watch.summary())
