"""torchvision / timm ResNet-50 and DenseNet-121 state dicts -> medjax CNN variables (``params`` + ``batch_stats``).

Key names: timm 0.3.2's ``resnet50`` and ``densenet121`` use exactly torchvision's
keys (the same module trees), so one mapping serves both; the old torchvision
DenseNet files (``denselayer1.norm.1.weight``, before the dots were removed) are
renamed the way torchvision and timm rename them when loading. Training
checkpoints wrapping the state dict in ``state_dict`` or ``model`` and ``module.``
prefixes (DataParallel) are unwrapped; ``num_batches_tracked`` counters are
dropped (nothing reads them in eval mode or with a fixed momentum).

Mapping: a Flax module ``layer1_0`` is torch's ``layer1.0``; ``kernel`` / ``scale``
become ``weight``, the running statistics ``mean`` / ``var`` are ``running_mean`` /
``running_var``; conv kernels go from (O, I, kh, kw) to (kh, kw, I, O) and the
classifier's from (out, in) to (in, out). A model built without a classifier
(``num_classes=0``, the fine-tuning backbones) leaves the weights' ``fc`` /
``classifier`` out. Every other difference (a missing, unexpected or mis-shaped
key) is refused in one sentence naming the file and the first offending keys.

Gray input: a 1-channel model takes RGB weights with the first conv folded as the
ViT patch embedding is (``convert.fold_rgb_patch_embed``): the kernel summed over
RGB, each channel scaled by gray_std / std_c, and the constant the mean shift adds
under the kernel moved into the following BatchNorm's running mean (the conv has
no bias). The folded model on a gray image equals the RGB model on the replicated
image away from the image border (within the first conv's 3-pixel padding the
RGB model pads each channel's own zero, so the two differ there).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from flax import traverse_util

from medjax.models import official_io
from medjax.models.cnns import build_cnn
from medjax.models.convert import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, fold_rgb_patch_embed
from medjax.models.densenet import DenseNet
from medjax.models.resnet import ResNet

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}
_LEAF_ORDER = ("kernel", "scale", "bias", "mean", "var")  # a torch module's order: weight, bias, running stats
_LEGACY_DENSE = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|"
                           r"running_var))$")
# The first conv and the BatchNorm after it (where a folded RGB kernel's constant goes), and the classifier.
_STEM = {ResNet: ("conv1", "bn1", "fc"), DenseNet: ("features.conv0", "features.norm0", "classifier")}


def torch_key(collection: str, path: Sequence[str]) -> str:
    """The torch state-dict key of a Flax variable, e.g. ``("layer1_0", "downsample_1", "var")`` ->
    ``layer1.0.downsample.1.running_var``."""
    parts = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
    return ".".join(parts + [_LEAF_TO_TORCH[path[-1]]])


def _torch_shape(shape: tuple) -> tuple:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    if arr.ndim == 2:
        return arr.T
    return arr


def expected_layout(model) -> dict:
    """``{torch key: (collection, Flax path, torch shape)}`` of ``model``'s variables in the torch state dict's
    order (modules as they are called, then weight, bias, running mean, running variance); shapes only
    (``jax.eval_shape``: nothing is allocated)."""
    calls = []

    def record(next_fn, args, kwargs, context):
        if context.method_name == "__call__" and context.module.path not in calls:
            calls.append(context.module.path)
        return next_fn(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, 64, 64, model.in_chans), jnp.float32)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    rank = {path: i for i, path in enumerate(calls)}
    leaves = []
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(variables[collection]).items():
            leaves.append(((rank[path[:-1]], _LEAF_ORDER.index(path[-1])), collection, path, leaf.shape))
    return {torch_key(c, path): (c, path, _torch_shape(tuple(shape))) for _, c, path, shape in sorted(leaves)}


def describe(model) -> str:
    if isinstance(model, ResNet):
        name = "ResNet-50" if (model.stage_sizes, model.width) == ((3, 4, 6, 3), 64) else "ResNet"
        return f"{name} (blocks {tuple(model.stage_sizes)}, width {model.width}, {model.in_chans} input channel(s))"
    name = "DenseNet-121" if (model.block_config, model.growth_rate) == ((6, 12, 24, 16), 32) else "DenseNet"
    return (f"{name} (layers {tuple(model.block_config)}, growth {model.growth_rate}, {model.in_chans} input "
            "channel(s))")


def plain_state_dict(obj: Any) -> dict:
    """The flat state dict inside a checkpoint: unwrapped, ``module.`` removed, legacy DenseNet keys renamed,
    ``num_batches_tracked`` dropped."""
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"The weights are a {type(obj).__name__}, not a state dict (a mapping of key to array).")
    out = {}
    for key, value in obj.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.endswith("num_batches_tracked"):
            continue
        legacy = _LEGACY_DENSE.match(key)
        out[legacy.group(1) + legacy.group(2) if legacy else key] = value
    return out


def _shown(keys: Sequence[str], n: int = 3) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


def _fold_gray(sd: dict, stem_conv: str, stem_norm: str, gray_mean, gray_std, rgb_mean, rgb_std) -> None:
    """In place: the 3-channel first conv folded to 1 channel, its constant moved into the BN's running mean."""
    weight = official_io.to_numpy(sd[f"{stem_conv}.weight"])
    kernel, shift = fold_rgb_patch_embed(weight, np.zeros(weight.shape[0], np.float32), gray_mean=gray_mean,
                                         gray_std=gray_std, rgb_mean=rgb_mean, rgb_std=rgb_std)
    sd[f"{stem_conv}.weight"] = kernel
    # BN(y + shift) with running mean m equals BN(y) with running mean m - shift.
    sd[f"{stem_norm}.running_mean"] = official_io.to_numpy(sd[f"{stem_norm}.running_mean"]) - shift


def variables_from_state_dict(state_dict: Any, model, *, source: str = "The state dict",
                              gray_mean: float = GRAY_MEAN, gray_std: float = GRAY_STD,
                              rgb_mean: Sequence[float] = IMAGENET_MEAN,
                              rgb_std: Sequence[float] = IMAGENET_STD) -> dict:
    """``{"params": ..., "batch_stats": ...}`` for ``model`` (a medjax ResNet or DenseNet) from a torchvision
    or timm state dict; ``source`` names it in the refusal."""
    sd = plain_state_dict(state_dict)
    stem_conv, stem_norm, classifier = _STEM[type(model)]
    if not model.num_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith(classifier + ".")}
    stored = {k: tuple(v.shape) for k, v in sd.items()}  # as in the file (before folding), for the refusal
    first = sd.get(f"{stem_conv}.weight")
    folded = (model.in_chans == 1 and first is not None and len(first.shape) == 4 and first.shape[1] == 3
              and f"{stem_norm}.running_mean" in sd)
    if folded:
        _fold_gray(sd, stem_conv, stem_norm, gray_mean, gray_std, rgb_mean, rgb_std)
    expected = expected_layout(model)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k][2]]
    if missing or unexpected or misshaped:
        problems = []
        if misshaped:
            k = misshaped[0]
            want = expected[k][2]
            if folded and k == f"{stem_conv}.weight":  # name the RGB shape the file should hold
                want = f"{(want[0], 3) + want[2:]} (RGB, folded to the model's gray channel)"
            problems.append(f"{k!r} has shape {stored[k]} where {want} is expected"
                            + (f" ({len(misshaped) - 1} more mis-shaped)" if len(misshaped) > 1 else ""))
        if missing:
            problems.append(f"{len(missing)} expected key(s) are missing ({_shown(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} key(s) are not in the model ({_shown(unexpected)})")
        raise ValueError(f"{source} does not match a torchvision/timm {describe(model)}: "
                         + "; ".join(problems) + ".")
    tree = {"params": {}, "batch_stats": {}}
    for key, (collection, path, _) in expected.items():
        tree[collection][path] = np.ascontiguousarray(_from_torch(official_io.to_numpy(sd[key])))
    return {c: traverse_util.unflatten_dict(flat) for c, flat in tree.items()}


def load_cnn(source: Any, name: str, *, num_classes: int = 0, in_chans: int = 1, width: float = 1.0,
             depth: float = 1.0, **fold) -> tuple:
    """``(model, variables)``: the ``name`` CNN (``resnet50`` | ``densenet121``; ``width`` / ``depth`` as in
    ``cnns.build_cnn``, 1 = published) with the weights of ``source`` (a state dict, or a ``.pth``/``.pt``
    (needs torch), ``.safetensors`` or ``.npz`` file).

    ``num_classes=0`` drops the weights' classifier; ``in_chans=1`` folds RGB weights for gray images
    normalised with ``gray_mean``/``gray_std`` (``fold`` may override those and the RGB statistics).
    """
    model = build_cnn(name, num_classes=num_classes, in_chans=in_chans, width=width, depth=depth)
    what = "The state dict" if isinstance(source, Mapping) else str(source)
    return model, variables_from_state_dict(official_io.read_weights(source), model, source=what, **fold)


def export_state_dict(variables: Mapping[str, Any], model) -> dict:
    """The torch state dict (numpy float32, torch key order) of ``model``'s ``variables``: loads into the
    torchvision / timm model of the same configuration (``num_batches_tracked`` aside)."""
    flat = {c: traverse_util.flatten_dict(dict(variables[c])) for c in ("params", "batch_stats")}
    out = {}
    for key, (collection, path, shape) in expected_layout(model).items():
        arr = np.asarray(flat[collection][path], np.float32)
        arr = arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr.T if arr.ndim == 2 else arr
        out[key] = np.ascontiguousarray(arr)
    return out
