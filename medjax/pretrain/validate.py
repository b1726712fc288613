"""The DINOv2 pretraining job's config check: one sentence naming the first bad value and what would be valid."""

from __future__ import annotations

from medjax import sharding
from medjax.data.job_manifest import data_folds
from medjax.data.sources import check_slice_cache, index_options
from medjax.distributed import check_distributed_config
from medjax.probe import validate_evals

_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.ffn_layer": ("mlp", "swiglu"),
    "loss.centering": ("softmax", "sinkhorn_knopp"),
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_256", "none"),
}
_POSITIVE = (
    "model.patch_size", "model.in_chans", "head.n_prototypes", "head.hidden_dim", "head.bottleneck_dim",
    "head.nlayers", "crops.global_size", "crops.local_size", "train.batch_size_per_device",
    "train.epoch_length", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.plot_every", "optim.epochs",
)
_FRACTIONS = (
    "loss.mask_probability", "loss.mask_ratio_min", "loss.mask_ratio_max", "loss.center_momentum",
    "teacher.momentum_teacher", "teacher.final_momentum_teacher",
)


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def validate(c) -> None:
    """Raises ValueError with one sentence naming the first bad value and what would be valid."""
    validate_evals(c)
    for key, allowed in _CHOICES.items():
        if _get(c, key) not in allowed:
            raise ValueError(f"config.{key}={_get(c, key)!r} is not valid; choose one of {', '.join(allowed)}.")
    for key in _POSITIVE:
        if _get(c, key) <= 0:
            raise ValueError(f"config.{key}={_get(c, key)!r} must be a positive number.")
    for key in _FRACTIONS:
        if not 0.0 <= _get(c, key) <= 1.0:
            raise ValueError(f"config.{key}={_get(c, key)!r} must lie in [0, 1].")
    if c.crops.n_global != 2:
        raise ValueError(
            f"config.crops.n_global={c.crops.n_global}; DINOv2 crosses exactly 2 global crops, so it must be 2."
        )
    if c.crops.n_local < 0:
        raise ValueError(f"config.crops.n_local={c.crops.n_local} must be 0 or more.")
    for kind in ("global", "local"):
        if _get(c, f"crops.{kind}_size") < c.model.patch_size:
            raise ValueError(
                f"config.crops.{kind}_size={_get(c, f'crops.{kind}_size')} is smaller than one patch "
                f"(config.model.patch_size={c.model.patch_size})."
            )
    if c.loss.mask_ratio_min > c.loss.mask_ratio_max:
        raise ValueError("config.loss.mask_ratio_min is larger than config.loss.mask_ratio_max.")
    if c.loss.ibot_weight > 0 and c.loss.mask_probability <= 0:
        raise ValueError(
            "config.loss.ibot_weight > 0 needs masked images: set config.loss.mask_probability > 0 "
            "(0.5 is the official value) or config.loss.ibot_weight=0."
        )
    if c.model.head_warmup_epochs < 0 or (c.model.init_weights and c.model.head_warmup_epochs >= c.optim.epochs):
        raise ValueError(f"config.model.head_warmup_epochs={c.model.head_warmup_epochs} must be 0 or more and "
                         f"(with config.model.init_weights) fewer than config.optim.epochs={c.optim.epochs}.")
    if c.loss.koleo_batch not in ("device", "global"):
        raise ValueError(f"config.loss.koleo_batch={c.loss.koleo_batch!r} must be 'device' (each device's images, "
                         "as the reference computes KoLeo per GPU) or 'global' (the whole batch).")
    if c.loss.koleo_weight > 0 and c.train.batch_size_per_device < 2:
        raise ValueError(
            "KoLeo needs at least 2 images per device and step: raise config.train.batch_size_per_device "
            "or set config.loss.koleo_weight=0."
        )
    for key in ("embed_dim", "depth", "num_heads"):
        if c.model[key] is not None and c.model[key] <= 0:
            raise ValueError(f"config.model.{key}={c.model[key]} must be a positive number.")
    if c.model.spatial_dims not in (2, 3):
        raise ValueError(f"config.model.spatial_dims={c.model.spatial_dims!r} must be 2 (slices) or 3 (volumes).")
    check_slice_cache(c)
    index_options(c)  # config.data's volume_index, mask_resample, mask_values
    data_folds(c)  # config.data.folds
    sharding.check_mesh_config(c.mesh)
    check_distributed_config(c.distributed)
    if c.model.embed_dim is not None and c.model.num_heads is not None and c.model.embed_dim % c.model.num_heads:
        raise ValueError(
            f"config.model.embed_dim={c.model.embed_dim} is not divisible by config.model.num_heads={c.model.num_heads}."
        )
