"""torch.nn.BatchNorm2d in Flax Linen, for the CNN baselines (NHWC, statistics over all axes but the last).

Flax's own ``nn.BatchNorm`` updates the running variance with the biased batch
variance; torch uses the unbiased one (``n / (n - 1)`` times larger), so converted
weights trained on here would drift from what the reference code does. This
module normalises a training batch with its biased variance and moves the
running statistics with torch's rule and momentum (0.1 = the weight of the new
batch). Params ``scale``/``bias``; running statistics ``mean``/``var`` in the
``batch_stats`` collection (updated only with ``train=True`` and
``mutable=["batch_stats"]``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
    momentum: float = 0.1  # torch's convention: new = (1 - momentum) * old + momentum * batch
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
            n = x.size // c
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x.astype(jnp.float32) - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(x.dtype)
