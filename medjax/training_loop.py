"""The loop every pretraining trainer runs (DINOv2, MAE): resume, steps, log windows, checkpoints, in-run
evaluations and plots.

Metrics leave the device only at log steps (``reporting.mean_metrics``, which stops the run on a non-finite
loss before anything is saved, so the last checkpoint on disk is always a good one); a checkpoint holds the
train state and the Grain iterator, so a rerun in the same workdir resumes exactly.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax

from medjax import checkpoint, console, reporting, resume_guard


def resumable_step(ckpt: checkpoint.Checkpointer, meta: dict, *, allow_config_change: bool) -> int | None:
    """The step of the workdir's latest checkpoint (None for a fresh workdir), checked against this run's
    ``meta`` before anything is built: a checkpoint of another job or model is refused; so is one whose run
    had other training settings (``resume_guard``) unless ``allow_config_change``, which warns instead."""
    start = ckpt.latest_step()
    if start is None:
        return None
    saved, where = ckpt.saved_meta(start), checkpoint.step_dir(os.path.dirname(ckpt.directory), start)
    checkpoint.check_compatible(saved, meta, where)
    resume_guard.check(saved, meta, where, allow=allow_config_change)
    return start


def resume(ckpt: checkpoint.Checkpointer, start: int | None, state, data, meta: dict, total_steps: int):
    """``(state, first step)``: the checkpoint at ``start`` (from ``resumable_step``) restored, state and data
    iterator, or the fresh state at step 0."""
    if start is None:
        return state, 0
    state, _ = ckpt.restore(start, state, data.iterator, meta)
    console.say(f"Resumed from step {start} of {total_steps} ({ckpt.directory}).")
    return state, start


@dataclasses.dataclass
class LoopResult:
    state: Any
    last: dict  # the last log window's metrics
    final_table: str  # the final evaluation's table ("" without one)
    minutes: float


def run_steps(config, workdir: str, *, state, step_fn, step_inputs: tuple, data, ckpt, meta: dict, reporter, start: int,
              stop_step: int, evaluator, backbone_params: Callable, title: str,
              on_plot: Callable | None = None, watch=None) -> LoopResult:
    """Steps ``start`` .. ``stop_step`` of ``config.train``'s schedule; closes the checkpointer, the reporter
    and the data when it ends. ``step_fn(state, batch, *step_inputs)`` is one step; ``backbone_params(state)``
    is what the evaluator scores; ``on_plot(state, step)`` draws a trainer's own pictures beside the training
    overview (process 0); ``watch.check(step, row)`` (e.g. ``pretrain.collapse.CollapseWatch``) may add scalars
    to each logged row and a note to its progress line."""
    is_main = jax.process_index() == 0
    overview = os.path.join(workdir, "training_overview.png")
    t_start, pending, last, final_table = time.perf_counter(), [], {}, ""
    try:
        for step in range(start, stop_step):
            state, metrics = step_fn(state, data.next_batch(), *step_inputs)
            pending.append((step, metrics))
            done = step + 1
            is_ckpt = done % config.train.checkpoint_every == 0 or done == stop_step
            if done % config.train.log_every == 0 or is_ckpt or done == start + 1:
                row = reporting.mean_metrics(pending)
                note = watch.check(done, row) if watch is not None else ""
                last = reporter.write(done, row)
                pending = []
                reporter.progress(done, last, note)
                if done == start + 1:
                    reporter.start(done)  # throughput excludes compilation
            if is_ckpt:
                ckpt.save(done, state, data.iterator, meta)
            if evaluator is not None and done == stop_step and config.evals.final:
                scores, final_table = evaluator.final(backbone_params(state), done,
                                                      checkpoint.step_dir(workdir, done), config.seed)
                reporter.write(done, scores)
            elif evaluator is not None and config.evals.every and done % config.evals.every == 0:
                reporter.write(done, evaluator(backbone_params(state), done))
            if is_main and (done % config.train.plot_every == 0 or done == stop_step):
                reporter.flush()
                reporting.plot_training_overview(reporter.jsonl_path, overview, title=title)
                if on_plot is not None:
                    on_plot(state, done)
    finally:
        ckpt.close()
        reporter.close()
        data.close()
    return LoopResult(state, last, final_table, (time.perf_counter() - t_start) / 60)
