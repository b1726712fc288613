"""The backbone a config describes: ``config.model`` (+ the global crop size) -> a ``VisionTransformer``.

Every job builds its ViT here, whichever objective trained it, so a run of any pretraining
objective opens the same way (``medjax.runs``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from medjax.models.vit import MODELS, VisionTransformer, build_backbone

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def backbone_kwargs(config) -> dict:
    """VisionTransformer fields from ``config.model`` and ``config.crops.global_size`` (explicit sizes
    override the arch's)."""
    m = config.model
    kwargs = dict(
        img_size=config.crops.global_size,
        patch_size=m.patch_size,
        in_chans=m.in_chans,
        num_register_tokens=m.num_register_tokens,
        ffn_layer=m.ffn_layer,
        init_values=m.layerscale if m.layerscale > 0 else None,
        drop_path_rate=m.drop_path_rate,
        drop_path_uniform=m.drop_path_uniform,
        interpolate_antialias=m.interpolate_antialias,
        interpolate_offset=m.interpolate_offset,
        dtype=DTYPES[m.dtype],
        remat=m.remat,
        spatial_dims=m.spatial_dims,
    )
    for key in ("embed_dim", "depth", "num_heads"):
        if m[key] is not None:
            kwargs[key] = m[key]
    return kwargs


def backbone_from_config(config) -> VisionTransformer:
    """The ViT of ``config.model`` at ``config.crops.global_size``; an unknown arch is one sentence."""
    if config.model.arch not in MODELS:
        raise ValueError(f"Unknown config.model.arch {config.model.arch!r}; choose one of {', '.join(MODELS)}.")
    return build_backbone(config.model.arch, **backbone_kwargs(config))


def dummy_input(backbone: VisionTransformer) -> jax.Array:
    """One zero image of the backbone's size, channels and dimensionality (what ``init`` traces)."""
    return jnp.zeros((1,) + (backbone.img_size,) * backbone.spatial_dims + (backbone.in_chans,), jnp.float32)


def dinov2_init(backbone: VisionTransformer, key: jax.Array) -> dict:
    """A DINOv2 run's backbone initialisation from ``key`` (the first of three keys split from it: the
    others initialise the heads): the random-init baseline of every evaluation.

    Op by op, not jitted: XLA's fused truncated-normal draws differ from eager ones in the last bits, and
    the baselines in published tables (probe, in-run evaluation) were drawn eagerly.
    """
    return backbone.init(jax.random.split(key, 3)[0], dummy_input(backbone))["params"]


def mae_from_config(config):
    """The masked autoencoder of ``config.model`` (its encoder has the fields of
    ``backbone_from_config(config)``), ``config.decoder`` and ``config.mae``."""
    from medjax.models.mae import MaskedAutoencoderViT

    backbone = backbone_from_config(config)
    d = config.decoder
    return MaskedAutoencoderViT(
        img_size=backbone.img_size, patch_size=backbone.patch_size, in_chans=backbone.in_chans,
        embed_dim=backbone.embed_dim, depth=backbone.depth, num_heads=backbone.num_heads,
        decoder_embed_dim=d.embed_dim, decoder_depth=d.depth, decoder_num_heads=d.num_heads,
        norm_pix_loss=config.mae.norm_pix_loss, num_register_tokens=backbone.num_register_tokens,
        drop_path_rate=backbone.drop_path_rate, dtype=backbone.dtype, remat=backbone.remat,
        spatial_dims=backbone.spatial_dims)


def mae_encoder_init(config, key: jax.Array) -> dict:
    """An MAE run's encoder initialisation from ``key`` (the official MAE init of the whole model; the
    decoder's part is dropped): the random-init baseline of an MAE run's evaluations."""
    model = mae_from_config(config)
    shape = (1,) + (model.img_size,) * model.spatial_dims + (model.in_chans,)
    init = jax.jit(lambda k: model.init({"params": k, "masking": k}, jnp.zeros(shape, jnp.float32))["params"])
    return init(key)["encoder"]  # jitted: the official init op by op takes tens of seconds
