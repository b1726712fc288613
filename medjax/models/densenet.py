"""DenseNet-121 as torchvision builds it (DenseNet-BC), in Flax Linen, NHWC.

``features``: a 7x7 stride-2 conv (``conv0``), BatchNorm and ReLU, a 3x3 stride-2
max pool, then four dense blocks (6, 12, 24, 16 layers) with a transition after
each but the last. A dense layer is BN-ReLU-1x1 conv to ``bn_size * growth_rate``
channels, BN-ReLU-3x3 conv to ``growth_rate``, its output concatenated to its
input; a transition is BN-ReLU-1x1 conv to half the channels (compression 0.5)
and a 2x2 average pool; ``norm5`` closes the features. Then ReLU, global average
pooling and, with ``num_classes > 0``, the linear ``classifier``. The module tree
mirrors torch's keys (``features/denseblock2/denselayer3/conv1/kernel`` is
``features.denseblock2.denselayer3.conv1.weight``), so converted torchvision / timm
weights give the reference outputs (medjax.models.convert_cnn).

``growth_rate``, ``block_config`` and ``num_init_features`` make smaller variants
of the same code for tests.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from medjax.models.batch_norm import BatchNorm
from medjax.models.resnet import conv, linear_init, max_pool_3x3_s2

# torchvision's DenseNet init: kaiming normal with fan_in (unlike ResNet's fan_out), zero classifier bias.
dense_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class DenseLayer(nn.Module):
    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.relu(BatchNorm(name="norm1")(x, train))
        y = conv(self.bn_size * self.growth_rate, 1, name="conv1", init=dense_conv_init)(y)
        y = nn.relu(BatchNorm(name="norm2")(y, train))
        y = conv(self.growth_rate, 3, name="conv2", init=dense_conv_init)(y)
        return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x, train: bool):
        for j in range(self.num_layers):
            x = DenseLayer(self.growth_rate, self.bn_size, name=f"denselayer{j + 1}")(x, train)
        return x


class Transition(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(BatchNorm(name="norm")(x, train))
        x = conv(self.features, 1, name="conv", init=dense_conv_init)(x)
        return nn.avg_pool(x, (2, 2), (2, 2))  # VALID: torch's AvgPool2d(2, 2) floors odd sides too


class DenseFeatures(nn.Module):
    growth_rate: int
    block_config: tuple
    num_init_features: int
    bn_size: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv(self.num_init_features, 7, 2, name="conv0", init=dense_conv_init)(x)
        x = max_pool_3x3_s2(nn.relu(BatchNorm(name="norm0")(x, train)))
        channels = self.num_init_features
        for i, layers in enumerate(self.block_config):
            x = DenseBlock(layers, self.growth_rate, self.bn_size, name=f"denseblock{i + 1}")(x, train)
            channels += layers * self.growth_rate
            if i + 1 < len(self.block_config):
                channels //= 2
                x = Transition(channels, name=f"transition{i + 1}")(x, train)
        return BatchNorm(name="norm5")(x, train)


class DenseNet(nn.Module):
    """``{"pooled": (B, num_features), "logits": (B, num_classes)}``; logits only with ``num_classes``."""

    growth_rate: int = 32
    block_config: tuple = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    num_classes: int = 1000  # 0: no classifier, pooled features only
    in_chans: int = 3

    @property
    def num_features(self) -> int:
        channels = self.num_init_features
        for i, layers in enumerate(self.block_config):
            channels += layers * self.growth_rate
            if i + 1 < len(self.block_config):
                channels //= 2
        return channels

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = DenseFeatures(self.growth_rate, tuple(self.block_config), self.num_init_features, self.bn_size,
                          name="features")(x, train)
        pooled = jnp.mean(nn.relu(x).astype(jnp.float32), axis=(1, 2))
        out = {"pooled": pooled}
        if self.num_classes:
            out["logits"] = nn.Dense(self.num_classes, kernel_init=linear_init, bias_init=nn.initializers.zeros,
                                     name="classifier")(pooled)
        return out
