"""The fine-tuning job's config check: one sentence naming the first bad value."""

from __future__ import annotations

from medjax.cross_validation import check_cv_folds
from medjax.data import fractions
from medjax.data.job_manifest import data_folds
from medjax.data.labelled import uncertain_policy
from medjax.data.sources import index_options
from medjax.finetune.cnn import check_config as check_cnn_config

INITS = ("checkpoint", "official", "random")
OFFICIAL_KINDS = ("dinov2", "mae")
POOLINGS = ("cls_patch", "avg")
BASELINES = ("random", "resnet50", "densenet121")
KEEP = ("best_val", "last")


def validate(config) -> None:
    """One sentence naming the first bad value."""
    index_options(config)  # config.data's volume_index, mask_resample, mask_values
    data_folds(config)
    uncertain_policy(config)  # config.data.uncertain_labels
    f = config.finetune
    check_cv_folds(f.cv_folds, "config.finetune.cv_folds")
    if f.init not in INITS:
        raise ValueError(f"config.finetune.init={f.init!r} is not valid; choose one of {', '.join(INITS)}.")
    if f.official_kind not in OFFICIAL_KINDS:
        raise ValueError(f"config.finetune.official_kind={f.official_kind!r} is not valid; choose one of "
                         f"{', '.join(OFFICIAL_KINDS)}.")
    if f.pooling not in POOLINGS:
        raise ValueError(f"config.finetune.pooling={f.pooling!r} is not valid; choose cls_patch (DINOv2's CLS + mean "
                         "patch token) or avg (MAE's global pool + fc_norm).")
    if not 0.0 <= f.label_smoothing < 1.0:
        raise ValueError(f"config.finetune.label_smoothing={f.label_smoothing!r} must lie in [0, 1).")
    for key in ("mixup", "cutmix"):
        if f[key] < 0:
            raise ValueError(f"config.finetune.{key}={f[key]!r} is a Beta alpha: 0 (off) or positive.")
    if f.keep not in KEEP:
        raise ValueError(f"config.finetune.keep={f.keep!r} is not valid; choose one of {', '.join(KEEP)}.")
    unknown = [b for b in f.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"config.finetune.baselines holds {unknown[0]!r}; the known baselines are "
                         f"{', '.join(BASELINES)} (or none: '()').")
    check_cnn_config(f, config.model.spatial_dims)
    fractions.validate_fractions(f.label_fractions, "config.finetune.label_fractions")
    if not f.label_fractions or not f.fraction_seeds:
        raise ValueError("config.finetune.label_fractions and config.finetune.fraction_seeds need at least one "
                         "value each, e.g. (1.0,) and (0,).")
    for key in ("epochs", "batch_size", "eval_batch", "base_lr"):
        if f[key] <= 0:
            raise ValueError(f"config.finetune.{key}={f[key]!r} must be a positive number.")
    for key in ("eval_every", "warmup_epochs", "weight_decay", "min_lr", "clip_grad", "image_size",
                "drop_path_rate"):
        if f[key] < 0:
            raise ValueError(f"config.finetune.{key}={f[key]!r} must be 0 or positive.")
    if f.warmup_epochs > f.epochs:
        raise ValueError(f"config.finetune.warmup_epochs={f.warmup_epochs} is longer than config.finetune.epochs="
                         f"{f.epochs}; shorten the warm-up.")
    if not 0 < f.layerwise_decay <= 1:
        raise ValueError(f"config.finetune.layerwise_decay={f.layerwise_decay} must lie in (0, 1] (1 = no decay).")
    if config.model.spatial_dims not in (2, 3):
        raise ValueError(f"config.model.spatial_dims={config.model.spatial_dims!r} must be 2 (slices) or 3 "
                         "(volumes).")
    if config.model.spatial_dims == 3 and f.init == "official":
        raise ValueError("config.finetune.init=official loads 2D DINOv2 weights, but config.model.spatial_dims=3 "
                         "asks for a 3D backbone; use init=checkpoint with a 3D pretraining run, or init=random.")
