"""DINO / iBOT projection head, equivalent to the official ``DINOHead`` (use_bn=False).

Params: ``mlp_{i}`` are the head's Linear layers in order (official ``mlp.{2*i}``, or plain ``mlp``
when nlayers == 1); ``last_layer/weight_g (out_dim,)`` and ``last_layer/weight_v (bottleneck,
out_dim)`` are torch's weight-norm pair. In the official code weight_g starts at 1 but stays
trainable (requires_grad is never cleared), so it is an ordinary param here; the trainer freezes
everything under ``last_layer`` during the first epoch.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.vit import gelu, torch_default_uniform, trunc_normal


class DINOHead(nn.Module):
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nlayers = max(self.nlayers, 1)
        widths = [self.hidden_dim] * (nlayers - 1) + [self.bottleneck_dim]
        x = x.astype(self.dtype)
        for i, width in enumerate(widths):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=trunc_normal(0.02),
                         bias_init=nn.initializers.zeros, name=f"mlp_{i}")(x)
            if i < nlayers - 1:
                x = gelu(x)  # torch nn.GELU default is the exact erf form
        # torch F.normalize: x / max(||x||, eps); official eps is 1e-6 for float16, else 1e-12.
        eps = 1e-6 if x.dtype == jnp.float16 else 1e-12
        norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
        x = (x.astype(jnp.float32) / jnp.maximum(norm, eps)).astype(self.dtype)
        return WeightNormLinear(self.out_dim, self.dtype, name="last_layer")(x)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with torch ``weight_norm`` (dim=0): W[:, j] = g[j] * v[:, j] / ||v[:, j]||.

    The official last layer keeps torch's default Linear init for v (it is created after the
    head's trunc-normal init runs) and fills g with ones.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        v = self.param("weight_v", torch_default_uniform(fan_in), (fan_in, self.features), jnp.float32)
        g = self.param("weight_g", nn.initializers.ones, (self.features,), jnp.float32)
        w = v * (g / jnp.sqrt(jnp.sum(jnp.square(v), axis=0)))
        return jnp.dot(x, w.astype(self.dtype))
