"""The supervised CNN baselines by name, at the published size or scaled down (``width`` / ``depth`` multipliers).

``build_cnn("resnet50")`` is torchvision's ``resnet50()`` and ``build_cnn("densenet121")``
its ``densenet121()`` (25,557,032 and 7,978,856 parameters at 1000 classes and 3
channels). ``width`` multiplies the channel counts (ResNet's 64 base planes,
DenseNet's growth rate 32 and its 64 stem features), ``depth`` the blocks per stage
(ResNet) or layers per dense block (DenseNet), each rounded and at least 1: the
same code at a size a test trains in seconds. Converted weights need both at 1.

``torch_init`` draws torchvision's initialisation with numpy on the host: the jitted
Flax ``init`` of a CNN spends seconds compiling one random draw per parameter on a
CPU, for a start a fine-tuning run needs once per seed.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.models.densenet import DenseNet
from medjax.models.resnet import ResNet

RESNET50_STAGES = (3, 4, 6, 3)
DENSENET121_BLOCKS = (6, 12, 24, 16)
CNNS = ("resnet50", "densenet121")


def _scaled(n: int, mult: float) -> int:
    return max(1, int(round(n * mult)))


def build_cnn(name: str, *, num_classes: int = 1000, in_chans: int = 3, width: float = 1.0,
              depth: float = 1.0) -> nn.Module:
    if name == "resnet50":
        return ResNet(tuple(_scaled(n, depth) for n in RESNET50_STAGES), _scaled(64, width), num_classes, in_chans)
    if name == "densenet121":
        growth = _scaled(32, width)
        return DenseNet(growth, tuple(_scaled(n, depth) for n in DENSENET121_BLOCKS), 2 * growth, 4, num_classes,
                        in_chans)
    raise ValueError(f"Unknown CNN {name!r}; choose one of {', '.join(CNNS)}.")


def torch_init(model: nn.Module, seed: int, size: int = 64) -> dict:
    """``{"params", "batch_stats"}`` of ``model`` drawn as torchvision initialises it: conv kernels
    N(0, 2 / fan) with fan = out * kh * kw (ResNet) or in * kh * kw (DenseNet), BatchNorm scale 1 and bias
    0, running mean 0 and variance 1, classifier weights U(+-1/sqrt(in)) and bias U(+-1/sqrt(in)) (ResNet)
    or 0 (DenseNet). Shapes from ``jax.eval_shape`` at ``size`` px; values from numpy (nothing compiled)."""
    x = jax.ShapeDtypeStruct((1, size, size, model.in_chans), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rng = np.random.default_rng([seed, 0xC4])
    fan_out = isinstance(model, ResNet)
    out = {}
    for collection in ("params", "batch_stats"):
        flat = {}
        for path, leaf in traverse_util.flatten_dict(shapes[collection]).items():
            shape, name = tuple(leaf.shape), path[-1]
            if name == "kernel" and len(shape) == 4:
                kh, kw, cin, cout = shape
                value = rng.normal(0.0, math.sqrt(2.0 / ((cout if fan_out else cin) * kh * kw)), shape)
            elif name == "kernel":
                value = rng.uniform(-1.0, 1.0, shape) / math.sqrt(shape[0])
            elif name == "bias" and path[-2] in ("fc", "classifier"):
                fan_in = shapes["params"][path[-2]]["kernel"].shape[0]
                value = rng.uniform(-1.0, 1.0, shape) / math.sqrt(fan_in) if fan_out else np.zeros(shape)
            elif name in ("scale", "var"):
                value = np.ones(shape)
            else:  # BatchNorm bias, running mean
                value = np.zeros(shape)
            flat[path] = value.astype(np.float32)
        out[collection] = traverse_util.unflatten_dict(flat)
    return out
