"""``python -m medjax.main --config=... --dry_run``: what a run would do, before it does it.

Prints the resolved config (every key, its value and its meaning from the config files, overrides
marked), the data the run would read (rows, patients and classes per split, training images: the index is
built, and the demo dataset written as the run writes it), the schedule (steps, images per epoch, passes
over the data; an absurd one is said, naming its keys), whether a checkpoint in the workdir would be
resumed or refused, and an ETA on this machine. For the pretraining jobs the ETA comes from the job's own
train step, compiled and timed for a few steps on one real batch (compile time excluded; in-run
evaluations, checkpoint writes and data stalls are not in it). The evaluation jobs run many small fits
whose cost is mostly feature extraction and evaluation; no single step stands for them, so their ETA is
not estimated. Nothing is trained and no checkpoint is written.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
import time

import jax

from medjax import checkpoint, config_docs, console, resume_guard, schedule_check, sharding
from medjax.data import sources
from medjax.data.job_manifest import open_manifest

TIMED_STEPS = 2  # steps timed after the compile and one warm-up step
SECTIONS = {"linear_probe": "probe", "finetune": "finetune", "segment": "segment"}  # an evaluation job's own keys
VALIDATORS = {"pretrain": "medjax.pretrain.validate", "mae": "medjax.mae.validate",
              "linear_probe": "medjax.probe.validate", "finetune": "medjax.finetune.validate",
              "segment": "medjax.segment.validate"}  # each with validate(config), as the job's run() calls it


def _show(value) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def describe_config(config, config_flag: str, say=console.say) -> list[config_docs.KeyDoc]:
    """One line per key: value, meaning, and the file's value when an override changed it."""
    path, variant = config_docs.split_config_flag(config_flag)
    docs = config_docs.config_docs(path, variant)
    flat = {d.key: d for d in docs}
    say(f"Config {config_flag} (config.mode={config.mode!r}), {len(docs)} keys:")
    for key, value in config_docs.flat_keys(config.to_dict()).items():
        doc = flat.get(key)
        meaning = (doc.meaning if doc and doc.meaning else config_docs.NO_MEANING)
        changed = doc is not None and _show(doc.default) != _show(value)
        note = f"  [overridden; the file gives {_show(doc.default)}]" if changed else ""
        say(f"  {key} = {_show(value)}  # {meaning}{note}")
    return docs


# ---------------------------------------------------------------- data


def _job_data(config, workdir: str) -> tuple[str, tuple, tuple, bool]:
    """``(manifest path, label columns, extra columns, volumes)`` the job reads; the demo dataset is written
    (or reused) as the job writes it."""
    mode = config.mode
    if mode in ("pretrain", "mae"):
        manifest, extra = sources.training_manifest(config, workdir, console.say)
        labels = ()
        return manifest, labels, extra, config.model.spatial_dims == 3
    key = SECTIONS[mode]
    section = config[key]
    run_dir = section.checkpoint_dir.split(",")[0].strip() if section.checkpoint_dir else ""
    if mode == "linear_probe":
        labels = tuple(c.strip() for c in section.label_column.split(",") if c.strip())
    elif mode == "finetune":
        labels = tuple(section.targets)
    else:
        labels = (section.label_column,) if section.label_column else ()
    volumes = (mode == "finetune" and config.model.spatial_dims == 3) or \
        (mode == "segment" and config.segment.spatial_dims == 3)
    if section.manifest:
        if not os.path.exists(section.manifest):
            raise FileNotFoundError(f"config.{key}.manifest={section.manifest!r} does not exist; give the path of a "
                                    "CSV manifest.")
        return section.manifest, labels, (), volumes
    if run_dir:
        sources.use_run_demo_data(config, run_dir)
    return sources.demo_manifest(config, workdir, console.say), labels or ("lesion",), sources.DEMO_COLUMNS, volumes


def describe_data(config, workdir: str, say=console.say) -> int:
    """Rows / patients / classes per split and the training images; returns the training images (-1 for the
    pretraining jobs, whose loader counts them)."""
    manifest_path, labels, extra, volumes = _job_data(config, workdir)
    manifest = open_manifest(config, manifest_path, label_columns=labels, extra=extra, masks=False,
                             require_split=False)
    say(f"Data: {manifest_path} ({len(manifest)} rows, {len(manifest.patients())} patients)")
    for split in ("train", "val", "test"):
        rows = manifest.split(split)
        classes = "; ".join(
            f"{col}: {len({r.label(col) for r in rows if r.label(col) >= 0})} of {len(manifest.label_values(col))} "
            f"classes" for col in labels)
        say(f"  {split}: {len(rows)} rows, {len(rows.patients())} patients" + (f", {classes}" if classes else ""))
    if config.mode in ("pretrain", "mae"):
        return -1  # counted by the job's own data loader (_pretraining_schedule)
    if volumes:
        n = len(manifest.split("train"))
    else:
        n = len(sources.slice_source(config, manifest_path, "train", label_columns=labels, extra_columns=extra,
                                     masks=False))
    say(f"  training images: {n} {'volumes' if volumes else 'slices'}")
    return n


# ---------------------------------------------------------------- schedule and time


def _time_steps(step_fn, state, batch, inputs: tuple) -> tuple[float, float]:
    """``(compile seconds, seconds per step)`` of a jitted train step on one real batch."""
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, *inputs).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch, *inputs)  # warm-up: first execution allocates
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(TIMED_STEPS):
        state, metrics = compiled(state, batch, *inputs)
    jax.block_until_ready((state, metrics))
    return compile_s, (time.perf_counter() - t0) / TIMED_STEPS


def _pretraining_schedule(config, workdir: str, say) -> dict:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    global_batch = config.train.batch_size_per_device * mesh.size
    if config.mode == "pretrain":
        from medjax.pretrain import trainer
        from medjax.pretrain.batches import PretrainData

        data = PretrainData(config, mesh, workdir)
        total, epoch_length, steps_from = trainer.total_steps_of(config), config.train.epoch_length, trainer.STEPS_FROM
        build = lambda: trainer.build(config, mesh, global_batch, data.shardings, load_weights=False)  # noqa: E731
    else:
        from medjax.mae import trainer
        from medjax.mae.batches import MAEData

        data = MAEData(config, mesh, workdir)
        epoch_length = config.train.epoch_length or data.epoch_length
        total, steps_from = config.optim.epochs * epoch_length, trainer.steps_from(config)
        build = lambda: trainer.build(config, mesh, global_batch, epoch_length, data.shardings,  # noqa: E731
                                      load_weights=False)
    n_images = len(data.source)
    say(f"  training images: {n_images} {'volumes' if config.model.spatial_dims == 3 else 'slices'}\n")
    stop = total if config.train.stop_at_step < 0 else min(config.train.stop_at_step, total)
    say(f"Schedule: {total:,} steps of {global_batch} images ({config.train.batch_size_per_device} per device x "
        f"{mesh.size} devices); an epoch is {epoch_length} steps = {epoch_length * global_batch:,} images; the "
        f"schedule is {schedule_check.passes(total, global_batch, n_images):,.1f} passes over the {n_images:,} "
        f"training images" + (f"; this run stops at step {stop:,}" if stop < total else "") + ".")
    for warning in schedule_check.absurd_schedule(total, global_batch, n_images, steps_from):
        console.warn(warning)
    try:
        built = build()
        batch = data.next_batch()
        compile_s, per_step = _time_steps(built.step_fn, built.state, batch, built.step_inputs)
    finally:
        data.close()
    return {"stop": stop, "compile_s": compile_s, "per_step": per_step, "global_batch": global_batch,
            "train_images": n_images, "total_steps": total}


def _evaluation_schedule(config, n_images: int, say) -> None:
    mode = config.mode
    if mode == "linear_probe":
        p = config.probe
        per_epoch = p.epoch_length or math.ceil(n_images / p.batch_size)
        total, batch = p.epochs * per_epoch, p.batch_size
        fits = 1 + sum(1 for f in p.label_fractions if f < 1) * p.fraction_seeds
        what = f"{fits} fits of the 52 heads per backbone (label fractions x seeds)"
    elif mode == "finetune":
        f = config.finetune
        per_epoch = math.ceil(n_images / f.batch_size)
        total, batch = f.epochs * per_epoch, f.batch_size
        runs = len(f.label_fractions) * len(f.fraction_seeds) * (1 + len(f.baselines))
        what = f"{runs} training runs (label fractions x seeds x inits)"
    else:
        s = config.segment
        per_epoch = math.ceil(n_images / s.batch_size)
        total, batch = s.steps, s.batch_size
        runs = len(s.heads) * len(s.label_fractions) * len(s.fraction_seeds) * (1 + bool(s.random_baseline))
        what = f"{runs} training runs (heads x label fractions x seeds x inits)"
    say(f"Schedule: {total:,} steps of {batch} images per run, {what}; a pass over the {n_images:,} training "
        f"images is {per_epoch} steps, so each run makes {total * batch / max(n_images, 1):,.1f} passes.")
    say("ETA: not estimated for this job: its time goes to feature extraction, evaluations and many short fits, "
        "which no single timed step stands for.")


# ---------------------------------------------------------------- resume


def describe_resume(config, workdir: str, global_batch: int | None, say) -> int:
    """The step a run in ``workdir`` would resume from (0: a fresh run), and whether it would be refused."""
    steps = checkpoint.saved_steps(workdir)
    if not steps:
        say(f"Resume: no checkpoint in {checkpoint.checkpoints_dir(workdir)}; the run starts at step 0.")
        return 0
    where = checkpoint.step_dir(workdir, steps[-1])
    with open(os.path.join(where, "meta", "metadata")) as f:
        saved = json.load(f)
    current = {"config": checkpoint.dumps_config(config)}
    if config.mode in ("pretrain", "mae"):
        current = resume_guard.run_meta(config, saved.get("fingerprint", {}), global_batch)
    found = resume_guard.changes(saved, current)
    if not found:
        say(f"Resume: from step {steps[-1]} ({where}); its training settings match.")
    elif config.allow_config_change:
        console.warn(f"Resume from step {steps[-1]} would continue under a changed config "
                     f"(config.allow_config_change=True): {' '.join(found)}")
    else:
        console.warn(f"Resume from step {steps[-1]} would be REFUSED: {' '.join(found)} Rerun with the config it "
                     "was trained with, start in a fresh --workdir, or pass --config.allow_config_change=True.")
    return steps[-1]


# ---------------------------------------------------------------- the dry run


def run(config, config_flag: str, workdir: str | None, say=console.say) -> dict:
    """Prints what ``config`` would do in ``workdir`` (a temporary folder when None); returns the figures."""
    temporary = workdir is None
    if temporary:
        workdir = tempfile.mkdtemp(prefix="medjax_dry_run_")
        say(f"No --workdir: the dry run reads and writes (demo data) in {workdir}, removed at the end.")
    try:
        describe_config(config, config_flag, say)
        say("")
        importlib.import_module(VALIDATORS[config.mode]).validate(config)
        n_images = describe_data(config, workdir, say)
        out = {"train_images": n_images}
        if config.mode in ("pretrain", "mae"):
            timing = _pretraining_schedule(config, workdir, say)
            start = describe_resume(config, workdir, timing["global_batch"], say) if not temporary else 0
            remaining = max(timing["stop"] - start, 0)
            eta = remaining * timing["per_step"]
            say(f"ETA on this machine ({jax.device_count()} x {jax.devices()[0].device_kind}): {remaining:,} steps x "
                f"{timing['per_step']:.3g} s = {_duration(eta)} (step timed over {TIMED_STEPS} steps after a "
                f"{timing['compile_s']:.1f} s compile; evaluations, checkpoints and data stalls not included).")
            out.update(timing, eta_s=eta, start=start)
        else:
            say("")
            _evaluation_schedule(config, n_images, say)
        say("Dry run: nothing was trained and no checkpoint was written.")
        return out
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.1f} h"
