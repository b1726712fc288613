"""The linear probe's config check, and the pretraining configs' ``evals`` section (the same probe run
inside a pretraining run): one sentence naming the first bad value."""

from __future__ import annotations

from medjax.cross_validation import check_cv_folds
from medjax.data.fractions import validate_fractions
from medjax.data.job_manifest import data_folds
from medjax.data.labelled import uncertain_policy
from medjax.data.sources import index_options

SELECTIONS = {False: ("accuracy", "balanced_accuracy"), True: ("mean_auc",)}  # by multilabel
FEATURE_MODES = ("precomputed", "augmented")


def validate(config) -> None:
    """One sentence naming the first bad value."""
    index_options(config)  # config.data's volume_index, mask_resample, mask_values
    data_folds(config)
    uncertain_policy(config)
    p = config.probe
    check_cv_folds(p.cv_folds, "config.probe.cv_folds")
    if not p.checkpoint_dir:
        raise ValueError("config.probe.checkpoint_dir is empty; set it to the --workdir of a pretraining run "
                         "(the folder that holds checkpoints/).")
    allowed = SELECTIONS[False] + SELECTIONS[True]
    if p.selection not in allowed:
        raise ValueError(f"config.probe.selection={p.selection!r} is not valid; choose one of {', '.join(allowed)}.")
    if p.features not in FEATURE_MODES:
        raise ValueError(f"config.probe.features={p.features!r} is not valid; choose one of "
                         f"{', '.join(FEATURE_MODES)}.")
    for key in ("epochs", "batch_size", "feature_batch", "fraction_seeds"):
        if p[key] <= 0:
            raise ValueError(f"config.probe.{key}={p[key]!r} must be a positive number.")
    for key in ("epoch_length", "eval_every"):
        if p[key] < 0:
            raise ValueError(f"config.probe.{key}={p[key]!r} must be 0 (once per pass over train) or positive.")
    validate_fractions(p.label_fractions, "config.probe.label_fractions")


def validate_evals(c) -> None:
    """The ``evals`` section of a pretraining config (the in-run evaluator: ``medjax.probe.evaluator``)."""
    e = c.evals
    uncertain_policy(c)  # config.data.uncertain_labels: how the evaluations read uncertain labels
    if e.every < 0:
        raise ValueError(f"config.evals.every={e.every} must be 0 (no evaluations during the run) or positive.")
    if (e.every or e.final) and not (e.knn or e.linear_probe):
        raise ValueError("config.evals asks for evaluations but both config.evals.knn and "
                         "config.evals.linear_probe are False; enable one or set config.evals.every=0.")
    if (e.every or e.final) and c.model.depth is not None and c.model.depth < 4 and e.linear_probe:
        raise ValueError(f"config.model.depth={c.model.depth}: the linear probe reads the last 4 blocks, so "
                         "evaluations need a backbone of at least 4 blocks (or config.evals.linear_probe=False).")
    if c.model.spatial_dims == 3 and (c.evals.every or c.evals.final):
        raise ValueError("The kNN and linear-probe evaluations read 2D slices, so they cannot run during 3D "
                         "pretraining (config.model.spatial_dims=3); set config.evals.every=0 and "
                         "config.evals.final=False.")
