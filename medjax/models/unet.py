"""A 2D U-Net (Ronneberger et al., 2015): the supervised segmentation baseline, trained from scratch.

It is what pretrained ViT heads have to beat: a convolutional network that sees only the
labelled images, with no pretraining. The layout is the classic one:

* encoder: ``depth`` levels of a double 3x3 conv (each conv + norm + ReLU), channels
  ``width``, 2 ``width``, 4 ``width``, ..., each followed by a 2x2 max-pool;
* bottom: a double conv at ``width * 2**depth`` channels;
* decoder: per level, a 2x2 stride-2 transposed conv that doubles the size and halves the
  channels, concatenation with the encoder's output of that level (the skip), a double conv;
* a 1x1 conv to ``num_classes`` logits.

Differences from the paper, each for a reason:

* convolutions pad ("SAME"), so the output has the input's size and no tiling is needed;
* a GroupNorm (8 groups, or fewer where the channels do not divide) after each conv
  (``norm=True``): the paper has none, BatchNorm is the usual addition, but its running
  statistics need a mutable state and are unreliable at the small batches a CPU trains with;
  ``norm=False`` is the paper's network (its parameter count, 31,030,658 for 1 input channel
  and 2 classes at width 64 and depth 4, is checked in the tests);
* an input whose sides are not multiples of ``2**depth`` (each pool halves them) is padded with
  zeros at the bottom and right up to the next multiple, and the logits are cropped back to the
  input's size: every pixel gets a prediction and the padding's is dropped.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Plain (untruncated) He-normal init: the standard for ReLU convs, and quick for XLA on CPU to compile.
_HE = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class DoubleConv(nn.Module):
    """Two (3x3 conv, norm, ReLU) layers at ``features`` channels."""

    features: int
    norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", kernel_init=_HE, name=f"conv{i}")(x)
            if self.norm:
                x = nn.GroupNorm(num_groups=_groups(self.features), name=f"norm{i}")(x)
            x = nn.relu(x)
        return x


class UpConv2x2(nn.Module):
    """The 2x2 stride-2 transposed convolution ("up-conv"): each input pixel becomes a 2x2 block,
    ``out[2i + a, 2j + b] = x[i, j] @ kernel[1 - a, 1 - b] + bias``, exactly ``nn.ConvTranspose(features, (2, 2),
    strides=(2, 2), padding="VALID")`` with the same parameters. The blocks do not overlap, so it is one matrix
    product and a reshape, 30 times faster to differentiate on a CPU, where XLA's transposed-convolution
    gradient is slow."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _HE, (2, 2, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        b, h, w = x.shape[:3]
        out = jnp.einsum("bhwc,ijcd->bhiwjd", x, kernel[::-1, ::-1].astype(x.dtype))
        return out.reshape(b, 2 * h, 2 * w, self.features) + bias


def _max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max-pool of even-sized (B, H, W, C) as a reshape and max (its gradient is twice as fast on a CPU
    as that of ``nn.max_pool``)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class UNet(nn.Module):
    """(B, H, W, C) images -> (B, H, W, num_classes) logits; any H and W (see module)."""

    num_classes: int
    width: int = 64  # channels of the first level; doubled at every level down
    depth: int = 4  # pooling steps (levels below the first)
    norm: bool = True  # GroupNorm after every 3x3 conv

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, w = x.shape[1:3]
        multiple = 2 ** self.depth
        pad_h, pad_w = -h % multiple, -w % multiple
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        skips = []
        for level in range(self.depth):
            x = DoubleConv(self.width * 2 ** level, self.norm, name=f"down{level}")(x)
            skips.append(x)
            x = _max_pool2(x)
        x = DoubleConv(self.width * 2 ** self.depth, self.norm, name="bottom")(x)
        for level in reversed(range(self.depth)):
            features = self.width * 2 ** level
            x = UpConv2x2(features, name=f"up{level}_transpose")(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = DoubleConv(features, self.norm, name=f"up{level}")(x)
        logits = nn.Conv(self.num_classes, (1, 1), name="classifier")(x)
        return logits[:, :h, :w]


def parameter_count(params) -> int:
    """Number of scalar parameters in a parameter tree."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))
