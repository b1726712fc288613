"""The MAE pretraining job's config check: one sentence naming the first bad value and what would be valid."""

from __future__ import annotations

from medjax import sharding
from medjax.data.job_manifest import data_folds
from medjax.data.sources import check_slice_cache, index_options
from medjax.distributed import check_distributed_config
from medjax.models.vit import MODELS
from medjax.probe import validate_evals

_POSITIVE = ("model.patch_size", "model.in_chans", "decoder.embed_dim", "decoder.depth", "decoder.num_heads",
             "crops.global_size", "train.batch_size_per_device", "train.log_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.plot_every", "optim.epochs", "optim.base_lr")
_NON_NEGATIVE = ("optim.warmup_epochs", "optim.min_lr", "optim.weight_decay", "optim.clip_grad",
                 "train.epoch_length", "train.reconstructions", "model.drop_path_rate")


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def visible_patches(config) -> int:
    """Patches the encoder sees per image: ``int(L * (1 - mask_ratio))``, as the official masking."""
    grid = config.crops.global_size // config.model.patch_size
    return int(grid**config.model.spatial_dims * (1 - config.mae.mask_ratio))


def validate(c) -> None:
    """Raises ValueError with one sentence naming the first bad value."""
    validate_evals(c)
    if c.model.arch not in MODELS:
        raise ValueError(f"Unknown config.model.arch {c.model.arch!r}; choose one of {', '.join(MODELS)}.")
    for key in _POSITIVE:
        if _get(c, key) <= 0:
            raise ValueError(f"config.{key}={_get(c, key)!r} must be a positive number.")
    for key in _NON_NEGATIVE:
        if _get(c, key) < 0:
            raise ValueError(f"config.{key}={_get(c, key)!r} must be 0 or more.")
    if c.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.dtype={c.model.dtype!r} is not valid; choose float32 or bfloat16.")
    if c.model.spatial_dims not in (2, 3):
        raise ValueError(f"config.model.spatial_dims={c.model.spatial_dims!r} must be 2 (slices) or 3 (volumes).")
    if c.model.layerscale or c.model.ffn_layer != "mlp":
        raise ValueError("The MAE encoder uses plain transformer blocks: set config.model.layerscale=0 and "
                         "config.model.ffn_layer='mlp'.")
    ratio = c.mae.mask_ratio
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"config.mae.mask_ratio={ratio!r} must lie strictly between 0 and 1 (0.75 is the "
                         "official value).")
    size, patch = c.crops.global_size, c.model.patch_size
    if size % patch:
        raise ValueError(f"config.crops.global_size={size} is not divisible by config.model.patch_size={patch}; "
                         f"choose a multiple such as {max(1, size // patch) * patch}.")
    if visible_patches(c) < 1:
        patches = (size // patch) ** c.model.spatial_dims
        raise ValueError(f"config.mae.mask_ratio={ratio} leaves no visible patch of the {patches} per image; "
                         f"lower it below {1 - 1 / patches:.3g} or use smaller patches.")
    if c.decoder.embed_dim % c.decoder.num_heads:
        raise ValueError(f"config.decoder.embed_dim={c.decoder.embed_dim} is not divisible by "
                         f"config.decoder.num_heads={c.decoder.num_heads}.")
    if c.model.spatial_dims == 3 and c.decoder.embed_dim % 6:
        raise ValueError(f"config.decoder.embed_dim={c.decoder.embed_dim}: a 3D sin-cos table needs a multiple "
                         "of 6.")
    embed = c.model.embed_dim if c.model.embed_dim is not None else MODELS[c.model.arch]["embed_dim"]
    if embed % (6 if c.model.spatial_dims == 3 else 4):
        raise ValueError(f"The encoder width {embed} does not fit a {c.model.spatial_dims}D sin-cos table; use a "
                         f"multiple of {6 if c.model.spatial_dims == 3 else 4}.")
    if len(c.crops.scale) != 2 or not 0.0 < c.crops.scale[0] <= c.crops.scale[1] <= 1.0:
        raise ValueError(f"config.crops.scale={tuple(c.crops.scale)} must be (low, high) with 0 < low <= high <= 1.")
    if c.optim.warmup_epochs > c.optim.epochs:
        raise ValueError(f"config.optim.warmup_epochs={c.optim.warmup_epochs} is longer than config.optim.epochs="
                         f"{c.optim.epochs}; shorten the warm-up.")
    check_slice_cache(c)
    index_options(c)  # config.data's volume_index, mask_resample, mask_values
    data_folds(c)  # config.data.folds
    sharding.check_mesh_config(c.mesh)
    check_distributed_config(c.distributed)
