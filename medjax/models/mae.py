"""Masked autoencoder (MAE, He et al. 2022) with medjax's ViT as the encoder, in Flax Linen.

Numerically the official ``MaskedAutoencoderViT`` given converted weights (see
:mod:`medjax.models.convert_mae`) and the same per-patch noise. The encoder is a plain
:class:`~medjax.models.vit.VisionTransformer` submodule named ``encoder`` (timm blocks: no
LayerScale, LayerNorm eps 1e-6, exact GELU), so ``params["encoder"]`` is a ViT params tree that
linear probing, fine-tuning, segmentation and weight export take as is (:meth:`encoder_model`).
Its DINOv2 ``mask_token`` is unused here.

Positional embeddings are fixed sin-cos tables (:mod:`medjax.models.sincos`) stored as params
(``encoder/pos_embed`` stays trainable for fine-tuning, as the official fine-tune does). The
forward pass wraps both tables in ``stop_gradient``; since AdamW weight decay would still shrink
them, leave the paths in :data:`FROZEN_PARAMS` out of the optimizer (:func:`trainable_mask`).

``model.init`` gives the official initialisation: sin-cos tables, Xavier-uniform Linear kernels
(qkv as one matrix) and patch kernel (viewed as (out, -1)), zero biases, N(0, 0.02) CLS and mask
tokens, unit LayerNorms. The outputs that ``init_with_output`` returns are from the ViT's default
init, before those values are written.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from medjax.models.sincos import sincos_pos_embed
from medjax.models.vit import Block, VisionTransformer
from medjax.objectives.mae import mae_loss, random_masking

Array = jax.Array

# Official architectures (models_mae.py); all use a 512-dim, 8-block, 16-head decoder.
MAE_MODELS = {
    "mae_vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
for _cfg in MAE_MODELS.values():
    _cfg.update(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

# Param paths that are fixed in MAE pretraining (requires_grad=False in the official code).
FROZEN_PARAMS = (("encoder", "pos_embed"), ("decoder_pos_embed",))


def _sincos_init(dim: int, grid: int, spatial_dims: int):
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(sincos_pos_embed(dim, grid, spatial_dims)[None], dtype).reshape(shape)

    return init


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=nn.initializers.zeros, name=name)


class MaskedAutoencoderViT(nn.Module):
    """MAE. ``__call__(imgs, noise=..., mask_ratio=...)`` returns ``loss``, ``pred``, ``mask``, ...

    Inputs are NHWC (or NDHWC with ``spatial_dims=3``: cubic patches and a 3D sin-cos table) at
    exactly ``img_size``. Registers (``num_register_tokens``) follow the CLS token without
    positional embedding, as in DINOv2; the official MAE has none. ``in_chans`` defaults to one
    (gray medical images; the official default is 3).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False
    num_register_tokens: int = 0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False
    spatial_dims: int = 2

    @nn.nowrap
    def encoder_kwargs(self) -> dict:
        """``VisionTransformer`` fields of the encoder (timm blocks, no LayerScale)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, qkv_bias=True, ffn_layer="mlp", init_values=None,
                    drop_path_rate=self.drop_path_rate, num_register_tokens=self.num_register_tokens,
                    dtype=self.dtype, remat=self.remat, spatial_dims=self.spatial_dims)

    @nn.nowrap
    def encoder_model(self, **overrides) -> VisionTransformer:
        """A standalone ViT for ``params["encoder"]`` (probing, fine-tuning); ``overrides`` set fields."""
        return VisionTransformer(**{**self.encoder_kwargs(), **overrides})

    def setup(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={self.spatial_dims} must be 2 (slices) or 3 (volumes).")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}; "
                             f"use a multiple of {self.patch_size}.")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                             f"decoder_num_heads {self.decoder_num_heads}.")
        dd, grid, sd = self.decoder_embed_dim, self.img_size // self.patch_size, self.spatial_dims
        self.encoder = VisionTransformer(**self.encoder_kwargs())
        self.decoder_embed = _dense(dd, self.dtype, "decoder_embed")
        self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, dd), jnp.float32)
        self.decoder_pos_embed = self.param("decoder_pos_embed", _sincos_init(dd, grid, sd),
                                            (1, 1 + grid**sd, dd), jnp.float32)
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        self.decoder_blocks = [
            block_cls(dd, self.decoder_num_heads, self.mlp_ratio, True, "mlp", None, 0.0, self.dtype,
                      name=f"decoder_blocks_{i}")
            for i in range(self.decoder_depth)
        ]
        self.decoder_norm = _layer_norm(self.dtype, "decoder_norm")
        self.decoder_pred = _dense(self.patch_size**sd * self.in_chans, self.dtype, "decoder_pred")

    def _check_images(self, imgs: Array) -> None:
        sd = self.spatial_dims
        if imgs.ndim != sd + 2 or imgs.shape[-1] != self.in_chans:
            layout = "(N, H, W, C)" if sd == 2 else "(N, D, H, W, C)"
            raise ValueError(f"Images of shape {imgs.shape} do not fit spatial_dims={sd}, in_chans={self.in_chans}: "
                             f"pass {layout} with C = {self.in_chans}.")
        sides = imgs.shape[1:-1]
        if any(n % self.patch_size for n in sides):
            raise ValueError(f"Image size {'x'.join(map(str, sides))} is not divisible by patch_size="
                             f"{self.patch_size}; resize or crop to img_size={self.img_size}.")
        if any(n != self.img_size for n in sides):
            raise ValueError(f"Image size {'x'.join(map(str, sides))} differs from img_size={self.img_size}, which "
                             "fixes the sin-cos grid; resize the images or build the model for their size.")

    def forward_encoder(self, imgs: Array, noise: Optional[Array] = None, mask_ratio: float = 0.75,
                        train: bool = False) -> tuple[Array, Array, Array]:
        """Embed, add the fixed position table, keep the visible patches, prepend CLS (+ registers), encode.

        Returns ``(latent (N, 1 + R + len_keep, D), mask (N, L), ids_restore (N, L))``.
        """
        self._check_images(imgs)
        enc = self.encoder
        tokens = enc.patch_embed(imgs.astype(self.dtype))
        pos = jax.lax.stop_gradient(enc.pos_embed).astype(tokens.dtype)
        tokens = tokens + pos[:, 1:]
        n, length = tokens.shape[:2]
        if noise is None:
            noise = jax.random.uniform(self.make_rng("masking"), (n, length))
        tokens, mask, ids_restore, _ = random_masking(tokens, noise, mask_ratio)
        prefix = [jnp.broadcast_to((enc.cls_token + pos[:, :1]).astype(tokens.dtype), (n, 1, self.embed_dim))]
        if self.num_register_tokens:
            shape = (n, self.num_register_tokens, self.embed_dim)
            prefix.append(jnp.broadcast_to(enc.register_tokens.astype(tokens.dtype), shape))
        tokens = jnp.concatenate(prefix + [tokens], axis=1)
        for blk in enc.blocks:
            tokens = blk(tokens, train)
        return enc.norm(tokens), mask, ids_restore

    def forward_decoder(self, latent: Array, ids_restore: Array, train: bool = False) -> Array:
        """Fill removed positions with the mask token, unshuffle, decode; returns (N, L, p**d * C)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        lead = 1 + self.num_register_tokens
        body = x[:, lead:]
        fill = jnp.broadcast_to(self.mask_token.astype(x.dtype), (n, length - body.shape[1], x.shape[-1]))
        body = jnp.take_along_axis(jnp.concatenate([body, fill], axis=1), ids_restore[:, :, None], axis=1)
        pos = jax.lax.stop_gradient(self.decoder_pos_embed).astype(x.dtype)
        cls = x[:, :1] + pos[:, :1]
        x = jnp.concatenate([cls, x[:, 1:lead], body + pos[:, 1:]], axis=1)
        for blk in self.decoder_blocks:
            x = blk(x, train)
        return self.decoder_pred(self.decoder_norm(x))[:, lead:]

    def __call__(self, imgs: Array, *, noise: Optional[Array] = None, mask_ratio: float = 0.75,
                 train: bool = False) -> dict:
        """``noise`` (N, L): per-patch scores, lowest kept (drawn from the ``masking`` rng when None).

        Returns ``loss`` (float32 scalar), ``pred`` (N, L, p**d * C, float32, official patch
        order), ``mask`` (N, L; 1 = removed), ``ids_restore`` and ``latent`` (encoder output).
        """
        latent, mask, ids_restore = self.forward_encoder(imgs, noise, mask_ratio, train)
        pred = self.forward_decoder(latent, ids_restore, train).astype(jnp.float32)
        loss = mae_loss(imgs, pred, mask, self.norm_pix_loss, patch_size=self.patch_size)
        if self.is_initializing():
            self._official_init()
        return {"loss": loss, "pred": pred, "mask": mask, "ids_restore": ids_restore, "latent": latent}

    def _official_init(self) -> None:
        """Overwrite the ViT-default values with the official MAE initialisation (see module doc)."""
        flat = traverse_util.flatten_dict(flax.core.unfreeze(self.variables["params"]))
        kernels = sorted(path for path in flat if path[-1] == "kernel")
        sizes = [math.prod(flat[path].shape) for path in kernels]
        key_uniform, key_cls = jax.random.split(self.make_rng("params"))
        # One draw for all kernels keeps the init graph (and its compile time) small.
        uniform = jax.random.uniform(key_uniform, (sum(sizes),), jnp.float32, -1.0, 1.0)
        updates, start = {}, 0
        for path, size in zip(kernels, sizes, strict=True):  # Dense (in, out); patch conv (*window, C, D) as (out, -1)
            shape = flat[path].shape
            bound = math.sqrt(6.0 / (math.prod(shape[:-1]) + shape[-1]))
            updates[path] = bound * uniform[start : start + size].reshape(shape)
            start += size
        cls = flat[("encoder", "cls_token")]
        updates[("encoder", "cls_token")] = 0.02 * jax.random.normal(key_cls, cls.shape)
        grid = self.img_size // self.patch_size
        updates[("encoder", "pos_embed")] = _sincos_init(self.embed_dim, grid, self.spatial_dims)(
            None, flat[("encoder", "pos_embed")].shape)
        for name, tree in traverse_util.unflatten_dict(updates).items():
            self.put_variable("params", name, tree)  # nested dicts are merged into the existing tree


def build_mae(name: Optional[str] = None, **overrides) -> MaskedAutoencoderViT:
    """An MAE of a registered size (:data:`MAE_MODELS`), or from keyword fields alone (``name=None``)."""
    if name is None:
        return MaskedAutoencoderViT(**overrides)
    if name not in MAE_MODELS:
        raise ValueError(f"Unknown MAE model {name!r}; known: {', '.join(sorted(MAE_MODELS))}.")
    return MaskedAutoencoderViT(**{**MAE_MODELS[name], **overrides})


def trainable_mask(params: Any) -> Any:
    """Pytree of bools like ``params``: False on :data:`FROZEN_PARAMS` (for ``optax.masked`` & co)."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    return traverse_util.unflatten_dict({path: path not in FROZEN_PARAMS for path in flat})
