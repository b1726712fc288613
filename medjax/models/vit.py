"""DINOv2 Vision Transformer (with optional register tokens) in Flax Linen.

Numerically equivalent to the official backbone given converted weights; parameter names mirror
the official state-dict keys so optimizer masks (``norm``, ``bias``, ``gamma``, ``patch_embed``,
``blocks_{i}``) and weight conversion stay one-to-one. Inputs are NHWC, or NDHWC with
``spatial_dims=3`` (cubic patches, tokens in D, H, W order, a cubic positional-embedding grid).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.pos_embed import interpolate_pos_embed, interpolate_pos_embed_3d

Array = jax.Array

MODELS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16),  # MAE's ViT-H
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}


def trunc_normal(std: float, bound: float = 2.0) -> Callable:
    """torch ``trunc_normal_(std=std)``: normal truncated at the *absolute* bounds +-2 (not +-2 std)."""

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -bound / std, bound / std, shape, dtype)

    return init


def torch_default_uniform(fan_in: int) -> Callable:
    """torch's default Conv/Linear init (kaiming_uniform a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    limit = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


def _dense(features: int, dtype: Any, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=trunc_normal(0.02), bias_init=nn.initializers.zeros, name=name)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection (conv, stride = patch, VALID: a remainder is dropped).

    The official code keeps torch's default conv init (its ViT init only touches Linear layers).
    With ``spatial_dims=3`` the patches are cubes and tokens are flattened in (D, H, W) order.
    """

    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32
    spatial_dims: int = 2

    @nn.compact
    def __call__(self, x: Array) -> Array:
        window = (self.patch_size,) * self.spatial_dims
        fan_in = x.shape[-1] * math.prod(window)
        x = nn.Conv(self.embed_dim, window, strides=window, padding="VALID", dtype=self.dtype,
                    param_dtype=jnp.float32, kernel_init=torch_default_uniform(fan_in),
                    bias_init=torch_default_uniform(fan_in), name="proj")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class LayerScale(nn.Module):
    dim: int
    init_values: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (self.dim,), jnp.float32)
        return x * gamma.astype(x.dtype)


def _pick_attention_impl(q: Array) -> Optional[str]:
    """cuDNN fused attention on GPU for half-precision inputs it supports; on CPU plain batched matmuls
    (faster there than XLA's ``dot_product_attention`` lowering: BUILD_NOTES, "MAE step"); XLA elsewhere."""
    head_dim = q.shape[-1]
    backend = jax.default_backend()
    if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "matmul" if backend == "cpu" else "xla"


def _matmul_attention(q: Array, k: Array, v: Array, scale: float) -> Array:
    """softmax(q k^T * scale) v over (B, N, heads, head_dim) inputs, as the reference computes it."""
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # (B, heads, N, head_dim)
    attn = jax.nn.softmax((q @ jnp.swapaxes(k, -1, -2)) * scale, axis=-1)
    return jnp.swapaxes(attn @ v, 1, 2)


def gelu(x: Array) -> Array:
    """The exact GELU as torch's ``nn.GELU()`` computes it, x/2 (1 + erf(x/sqrt(2))); on CPU it is
    cheaper than ``jax.nn.gelu(approximate=False)``'s erfc form (BUILD_NOTES, "The DINOv2 step
    against the official code") and within 1e-6 of it."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1.0 / math.sqrt(2.0))).astype(x.dtype))


class Attention(nn.Module):
    dim: int
    num_heads: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, n, _ = x.shape
        hd = self.dim // self.num_heads
        qkv = _dense(3 * self.dim, self.dtype, "qkv", self.qkv_bias)(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, hd), 2, 0)
        impl = _pick_attention_impl(q)
        if impl == "matmul":
            return _dense(self.dim, self.dtype, "proj")(_matmul_attention(q, k, v, hd**-0.5).reshape(b, n, self.dim))
        try:
            out = jax.nn.dot_product_attention(q, k, v, scale=hd**-0.5, implementation=impl)
        except (NotImplementedError, RuntimeError, ValueError):
            if impl == "xla":
                raise
            out = jax.nn.dot_product_attention(q, k, v, scale=hd**-0.5, implementation="xla")
        return _dense(self.dim, self.dtype, "proj")(out.reshape(b, n, self.dim))


class Mlp(nn.Module):
    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = gelu(_dense(self.hidden, self.dtype, "fc1")(x))
        return _dense(self.dim, self.dtype, "fc2")(x)


class SwiGLUFFN(nn.Module):
    """Fused SwiGLU as the official ``SwiGLUFFNFused``: one w12 projection split in halves."""

    dim: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden = (int(self.hidden * 2 / 3) + 7) // 8 * 8
        x1, x2 = jnp.split(_dense(2 * hidden, self.dtype, "w12")(x), 2, axis=-1)
        return _dense(self.dim, self.dtype, "w3")(nn.silu(x1) * x2)


def drop_path(x: Array, branch: Callable[[Array], Array], rate: float, key: Array,
              subset_above: float = 0.1) -> Array:
    """Residual add with per-sample stochastic depth, as the official block does in training.

    rate > ``subset_above``: a random subset of max(int(B*(1-rate)), 1) samples runs the branch (the
    rest skip it, so the compute is saved) and its residual is scaled by B/subset. Otherwise every
    sample runs the branch and it is zeroed with probability ``rate`` and rescaled by 1/(1-rate).
    The official ``Block`` uses 0.1; its multi-crop training path (``NestedTensorBlock``) uses 0.
    """
    b = x.shape[0]
    if rate > subset_above:
        keep = max(int(b * (1 - rate)), 1)
        # A uniformly random subset, as torch.randperm(b)[:keep]: one sort of random keys (cheaper to
        # compile than jax.random.permutation's rounds of sorting, which add seconds to every step's build).
        idx = jnp.argsort(jax.random.uniform(key, (b,)))[:keep]
        residual = branch(x[idx])
        return x.at[idx].add((residual * (b / keep)).astype(x.dtype))
    keep_prob = 1.0 - rate
    mask = jax.random.bernoulli(key, keep_prob, (b,) + (1,) * (x.ndim - 1))
    return x + branch(x) * (mask.astype(x.dtype) / keep_prob)


class Block(nn.Module):
    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ffn_layer: str = "mlp"
    init_values: Optional[float] = None
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    drop_path_subset_above: float = 0.1  # see ``drop_path``

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        hidden = int(self.dim * self.mlp_ratio)
        norm1, norm2 = _layer_norm(self.dtype, "norm1"), _layer_norm(self.dtype, "norm2")
        attn = Attention(self.dim, self.num_heads, self.qkv_bias, self.dtype, name="attn")
        ffn_cls = {"mlp": Mlp, "swiglu": SwiGLUFFN}[self.ffn_layer]
        mlp = ffn_cls(self.dim, hidden, self.dtype, name="mlp")
        if self.init_values:  # None or 0 means no LayerScale, as official
            ls1 = LayerScale(self.dim, self.init_values, name="ls1")
            ls2 = LayerScale(self.dim, self.init_values, name="ls2")
        else:
            ls1 = ls2 = lambda y: y

        def attn_branch(y):
            return ls1(attn(norm1(y)))

        def ffn_branch(y):
            return ls2(mlp(norm2(y)))

        if train and self.drop_path_rate > 0.0:
            rate, above = self.drop_path_rate, self.drop_path_subset_above
            x = drop_path(x, attn_branch, rate, self.make_rng("drop_path"), above)
            return drop_path(x, ffn_branch, rate, self.make_rng("drop_path"), above)
        x = x + attn_branch(x)
        return x + ffn_branch(x)


class VisionTransformer(nn.Module):
    """DINOv2 ViT. ``__call__`` returns the official ``forward_features`` dict (plus
    ``last_blocks_norm`` when ``n_last_blocks > 0``)."""

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 1
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ffn_layer: str = "mlp"
    init_values: Optional[float] = 1e-5
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    # True: drop path as the official multi-crop pretraining path (NestedTensorBlock): at any rate > 0 a
    # random subset of each batch runs a residual branch. False: the official Block's rule (subset above
    # rate 0.1, a per-sample mask at or below), as its single-tensor forward uses.
    drop_path_batch_subset: bool = False
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    dtype: Any = jnp.float32
    remat: bool = False
    spatial_dims: int = 2  # 2: slices (N, H, W, C); 3: volumes (N, D, H, W, C), cubic patches

    def setup(self):
        if self.ffn_layer not in ("mlp", "swiglu"):
            raise ValueError(f"ffn_layer must be 'mlp' or 'swiglu', got {self.ffn_layer!r}.")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}.")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims={self.spatial_dims} must be 2 (slices) or 3 (volumes).")
        d, grid = self.embed_dim, self.img_size // self.patch_size
        self.patch_embed = PatchEmbed(self.patch_size, d, self.dtype, self.spatial_dims)
        self.cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d), jnp.float32)
        self.pos_embed = self.param("pos_embed", trunc_normal(0.02), (1, 1 + grid**self.spatial_dims, d),
                                    jnp.float32)
        if self.num_register_tokens:
            self.register_tokens = self.param(
                "register_tokens", nn.initializers.normal(1e-6), (1, self.num_register_tokens, d), jnp.float32)
        self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, d), jnp.float32)
        if self.drop_path_uniform:
            rates = [self.drop_path_rate] * self.depth
        else:
            rates = np.linspace(0, self.drop_path_rate, self.depth).tolist()
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        self.blocks = [
            block_cls(d, self.num_heads, self.mlp_ratio, self.qkv_bias, self.ffn_layer, self.init_values,
                      float(rates[i]), self.dtype, 0.0 if self.drop_path_batch_subset else 0.1,
                      name=f"blocks_{i}")
            for i in range(self.depth)
        ]
        self.norm = _layer_norm(self.dtype, "norm")

    def prepare_tokens(self, x: Array, masks: Optional[Array] = None) -> Array:
        """Patch-embed, mask, prepend CLS, add positional embedding, insert registers after CLS."""
        if x.ndim != self.spatial_dims + 2:
            layout = "(N, H, W, C)" if self.spatial_dims == 2 else "(N, D, H, W, C)"
            raise ValueError(f"input of shape {x.shape} does not fit spatial_dims={self.spatial_dims}: "
                             f"pass {layout}.")
        b = x.shape[0]
        tokens = self.patch_embed(x.astype(self.dtype))
        if masks is not None:
            tokens = jnp.where(masks[..., None], self.mask_token[None].astype(tokens.dtype), tokens)
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (b, 1, self.embed_dim))
        tokens = jnp.concatenate([cls, tokens], axis=1)
        grid = tuple(n // self.patch_size for n in x.shape[1:-1])
        interpolate = interpolate_pos_embed if self.spatial_dims == 2 else interpolate_pos_embed_3d
        pos = interpolate(self.pos_embed, grid, antialias=self.interpolate_antialias,
                          offset=self.interpolate_offset)
        tokens = tokens + pos.astype(tokens.dtype)
        if self.num_register_tokens:
            shape = (b, self.num_register_tokens, self.embed_dim)
            reg = jnp.broadcast_to(self.register_tokens.astype(tokens.dtype), shape)
            tokens = jnp.concatenate([tokens[:, :1], reg, tokens[:, 1:]], axis=1)
        return tokens

    def __call__(self, x: Array, masks: Optional[Array] = None, *, train: bool = False,
                 n_last_blocks: int = 0) -> dict:
        if n_last_blocks > self.depth:
            raise ValueError(f"n_last_blocks={n_last_blocks} exceeds depth {self.depth}.")
        tokens = self.prepare_tokens(x, masks)
        taken = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, train)
            if i >= self.depth - n_last_blocks:
                taken.append(tokens)
        x_norm = self.norm(tokens)
        r = self.num_register_tokens
        out = {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": tokens,
            "masks": masks,
        }
        if n_last_blocks:
            # The last block's normed output is x_norm itself; reuse it rather than norm twice.
            out["last_blocks_norm"] = tuple(self.norm(t) for t in taken[:-1]) + (x_norm,)
        return out


def build_backbone(name: str, **overrides) -> VisionTransformer:
    """A ``VisionTransformer`` of a registered size; ``overrides`` set any other field."""
    if name not in MODELS:
        raise ValueError(f"Unknown backbone {name!r}; known sizes: {', '.join(sorted(MODELS))}.")
    return VisionTransformer(**{**MODELS[name], **overrides})
