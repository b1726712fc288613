"""ResNet-50 as torchvision builds it (v1.5: the stride of a bottleneck sits on its 3x3 conv), in Flax Linen, NHWC.

The stem is a 7x7 stride-2 conv, BatchNorm, ReLU and a 3x3 stride-2 max pool; four
stages of bottleneck blocks (1x1 -> 3x3 -> 1x1, expansion 4) follow, the first
block of each stage downsampling the shortcut by a 1x1 conv and BatchNorm
(``downsample_0`` / ``downsample_1``, torch's ``downsample.0`` / ``.1``); then global
average pooling and, with ``num_classes > 0``, a linear classifier ``fc``. Every
padding is the explicit symmetric one of the torch layers (Flax's ``SAME`` pads a
stride-2 conv asymmetrically), so converted torchvision / timm weights give the
reference outputs (medjax.models.convert_cnn). Module names follow the torch keys
with ``.i`` written ``_i``: ``layer3_2/conv2/kernel`` is ``layer3.2.conv2.weight``.

``stage_sizes`` and ``width`` (channels of the stem and of the first stage's
bottleneck; 64 in ResNet-50) make smaller variants of the same code for tests.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from medjax.models.batch_norm import BatchNorm

# torchvision's init: kaiming normal (fan_out, ReLU gain) for convs; U(+-1/sqrt(fan_in)) for the classifier.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
EXPANSION = 4


def conv(features: int, kernel: int, stride: int = 1, name: str | None = None, init=conv_init) -> nn.Conv:
    """A bias-free conv with torch's symmetric padding ``kernel // 2``."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
                   kernel_init=init, name=name)


def max_pool_3x3_s2(x):
    """torch's MaxPool2d(3, stride=2, padding=1): the padding never wins the max."""
    return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.relu(BatchNorm(name="bn1")(conv(self.planes, 1, name="conv1")(x), train))
        y = nn.relu(BatchNorm(name="bn2")(conv(self.planes, 3, self.stride, name="conv2")(y), train))
        y = BatchNorm(name="bn3")(conv(self.planes * EXPANSION, 1, name="conv3")(y), train)
        shortcut = x
        if self.downsample:
            shortcut = conv(self.planes * EXPANSION, 1, self.stride, name="downsample_0")(x)
            shortcut = BatchNorm(name="downsample_1")(shortcut, train)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """``{"pooled": (B, 8 * width * 4) features, "logits": (B, num_classes)}``; logits only with ``num_classes``."""

    stage_sizes: tuple = (3, 4, 6, 3)
    width: int = 64
    num_classes: int = 1000  # 0: no classifier, pooled features only
    in_chans: int = 3

    @property
    def num_features(self) -> int:
        return self.width * 8 * EXPANSION

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv(self.width, 7, 2, name="conv1")(x)
        x = max_pool_3x3_s2(nn.relu(BatchNorm(name="bn1")(x, train)))
        inplanes = self.width
        for stage, blocks in enumerate(self.stage_sizes):
            planes = self.width * 2 ** stage
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                down = b == 0 and (stride != 1 or inplanes != planes * EXPANSION)
                x = Bottleneck(planes, stride, down, name=f"layer{stage + 1}_{b}")(x, train)
                inplanes = planes * EXPANSION
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out = {"pooled": pooled}
        if self.num_classes:
            out["logits"] = nn.Dense(self.num_classes, kernel_init=linear_init,
                                     bias_init=functools.partial(_fan_in_uniform_bias, fan_in=pooled.shape[-1]),
                                     name="fc")(pooled)
        return out


def _fan_in_uniform_bias(key, shape, dtype=jnp.float32, *, fan_in: int):
    """torch Linear's bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)
