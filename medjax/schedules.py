"""Training schedules, evaluated from the step number inside the jitted step.

The official DINOv2 code precomputes numpy arrays with its ``CosineScheduler``
(freeze phase of zeros, linear warm-up, half-cosine from ``base`` to ``final``,
and ``final`` after the last iteration). ``CosineSchedule`` computes the same
value in closed form with jnp so the train step needs no host lookups and no
large constants.

The schedules are pytrees whose numbers are leaves, so a jitted step takes them
as an argument rather than baking them in as constants: runs that differ only
in schedule values (a learning-rate sweep, a longer run, a resumed run with a
new ``base_lr``) share one compiled program, and JAX's compilation cache serves
it to all of them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def _numbers_are_leaves(cls):
    """Registers a frozen schedule dataclass as a pytree whose fields are all leaves. Rebuilding one from
    (possibly traced) leaves skips ``__init__``: its checks ran when the schedule was built from numbers."""
    names = tuple(f.name for f in dataclasses.fields(cls))

    def unflatten(_, leaves):
        schedule = object.__new__(cls)
        for name, value in zip(names, leaves):
            object.__setattr__(schedule, name, value)
        return schedule

    jax.tree_util.register_pytree_node(cls, lambda s: ([getattr(s, n) for n in names], None), unflatten)
    return cls


def as_step_input(schedules):
    """``schedules`` with every number an array (float32, int32): what a jitted step takes as its argument."""
    return jax.tree.map(jnp.asarray, schedules)


@_numbers_are_leaves
@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """Linear warm-up from ``start_warmup`` to ``base``, then half-cosine ``base`` -> ``final``."""

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0
    start_warmup: float = 0.0

    def __post_init__(self):
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"Schedule warm-up ({self.warmup_steps} steps) is longer than the whole schedule "
                f"({self.total_steps} steps); shorten the warm-up or train longer."
            )

    def __call__(self, step):
        """Value at ``step`` (int or traced int array); float32. The fields may be numbers or arrays."""
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.asarray(self.warmup_steps, jnp.float32)
        cosine_len = jnp.asarray(self.total_steps, jnp.float32) - warm
        # np.linspace(start, base, warm) reaches ``base`` on its last warm-up step.
        warm_value = self.start_warmup + (self.base - self.start_warmup) * step / jnp.maximum(warm - 1.0, 1.0)
        t = (step - warm) / jnp.maximum(cosine_len, 1.0)
        cos_value = self.final + 0.5 * (self.base - self.final) * (1.0 + jnp.cos(jnp.pi * t))
        value = jnp.where(step < warm, warm_value, cos_value)
        return jnp.where(step >= self.total_steps, self.final, value).astype(jnp.float32)

    def as_array(self) -> np.ndarray:
        """Every step's value, for plots and for checks against the reference arrays."""
        return np.asarray(self(np.arange(self.total_steps)))


@dataclasses.dataclass(frozen=True)
class HalfCycleCosine:
    """MAE's learning rate (``util/lr_sched.py``), set per iteration from the fractional epoch: linear from 0
    at step 0 to ``base`` at ``warmup_steps``, then a half cosine to ``final`` at ``total_steps``."""

    base: float
    final: float
    total_steps: int
    warmup_steps: int = 0

    def __post_init__(self):
        if self.warmup_steps > self.total_steps:
            raise ValueError(f"Schedule warm-up ({self.warmup_steps} steps) is longer than the whole schedule "
                             f"({self.total_steps} steps); shorten the warm-up or train longer.")

    def __call__(self, step):
        step = jnp.asarray(step, jnp.float32)
        warm = float(self.warmup_steps)
        warm_value = self.base * step / max(warm, 1.0)
        t = (step - warm) / max(float(self.total_steps - self.warmup_steps), 1.0)
        cos_value = self.final + (self.base - self.final) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        return jnp.where(step < warm, warm_value, cos_value).astype(jnp.float32)


@_numbers_are_leaves
@dataclasses.dataclass(frozen=True)
class PretrainSchedules:
    """All schedules of a DINOv2 run, built from the config's epochs and epoch length."""

    lr: CosineSchedule
    freeze_last_layer_steps: int
    weight_decay: CosineSchedule
    teacher_momentum: CosineSchedule
    teacher_temp: CosineSchedule

    def last_layer_lr(self, step):
        # The official code zeroes the first steps of a copy of the lr schedule.
        return jnp.where(jnp.asarray(step) < self.freeze_last_layer_steps, 0.0, self.lr(step))

    def values(self, step) -> dict:
        return {
            "lr": self.lr(step),
            "last_layer_lr": self.last_layer_lr(step),
            "weight_decay": self.weight_decay(step),
            "teacher_momentum": self.teacher_momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }


def scaled_lr(base_lr: float, global_batch: int, rule: str = "sqrt_wrt_1024") -> float:
    """The official learning-rate scaling with the global batch size."""
    if rule == "sqrt_wrt_1024":
        return base_lr * float(np.sqrt(global_batch / 1024.0))
    if rule == "linear_wrt_256":
        return base_lr * global_batch / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(
        f"Unknown config.optim.scaling_rule {rule!r}; use 'sqrt_wrt_1024', 'linear_wrt_256' or 'none'."
    )


def pretrain_schedules(config, global_batch: int) -> PretrainSchedules:
    """Builds the DINOv2 schedules (ssl_default_config.yaml semantics) from a pretrain config."""
    epoch = config.train.epoch_length
    total = config.optim.epochs * epoch
    optim, teacher = config.optim, config.teacher
    lr = scaled_lr(optim.base_lr, global_batch, optim.scaling_rule)
    temp_warmup = teacher.warmup_teacher_temp_epochs * epoch
    return PretrainSchedules(
        lr=CosineSchedule(lr, optim.min_lr, total, warmup_steps=optim.warmup_epochs * epoch),
        freeze_last_layer_steps=optim.freeze_last_layer_epochs * epoch,
        weight_decay=CosineSchedule(optim.weight_decay, optim.weight_decay_end, total),
        teacher_momentum=CosineSchedule(teacher.momentum_teacher, teacher.final_momentum_teacher, total),
        # As the official code: the schedule ends with its warm-up and stays at teacher_temp.
        teacher_temp=CosineSchedule(
            teacher.teacher_temp,
            teacher.teacher_temp,
            temp_warmup,
            warmup_steps=temp_warmup,
            start_warmup=teacher.warmup_teacher_temp,
        ),
    )
