"""Write the ResNet / DenseNet parity fixtures from torchvision and timm 0.3.2.

Needs a Python with torch, torchvision's model files and timm 0.3.2 (only its pure-Python
model code is used). torchvision's package __init__ loads its compiled operators, which
fail when its build does not match torch; this script imports ``torchvision.models.resnet``
and ``torchvision.models.densenet`` without running that __init__. timm 0.3.2 imports
``torch._six``, gone from torch 2.x: a stand-in module with the three names it reads is
installed first.

    pip install torch torchvision pillow          # and timm==0.3.2 (or its folder on PYTHONPATH)
    python tests/reference/make_cnn_fixtures.py

Writes into tests/fixtures/:

* cnn_resnet_tv.npz, cnn_densenet_tv.npz: torchvision's own classes at a reduced size (a
  ResNet subclass scaling the planes of ``_make_layer``; DenseNet's constructor arguments),
  O(1) random weights and BatchNorm running statistics; ``sd/<key>``, the NCHW input ``x``
  (odd side 61: every floor of the strided convs and pools shows), eval-mode ``logits`` and
  ``pooled`` (the classifier's input), and one train-mode forward: ``train_logits`` and the
  updated running statistics ``train_sd/<key>``;
* cnn_resnet_timm.npz, cnn_densenet_timm.npz: the same from timm's classes (timm's ResNet
  fixes its stage widths in ``make_blocks``, which is wrapped to scale them);
* cnn_layouts.npz: ``layouts`` (JSON): key -> shape of the full-size torchvision and timm
  resnet50 / densenet121 state dicts, and their parameter counts.
"""

import collections.abc
import importlib.util
import json
import os
import sys
import types

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
SIDE = 61


def import_reference():
    """(torchvision resnet module, torchvision densenet module, timm) without their compiled parts."""
    root = os.path.dirname(importlib.util.find_spec("torchvision").origin)
    for name, path in (("torchvision", root), ("torchvision.models", os.path.join(root, "models"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    six = types.ModuleType("torch._six")
    six.container_abcs, six.string_classes, six.int_classes = collections.abc, (str,), int
    sys.modules["torch._six"] = six
    import timm
    import torchvision.models.densenet as tv_densenet
    import torchvision.models.resnet as tv_resnet

    return tv_resnet, tv_densenet, timm


def randomise(model, seed):
    """O(1)-scale weights and non-trivial running statistics, so every path shows in the outputs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            n = torch.randn(t.shape, generator=g) if t.is_floating_point() else None
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_mean":
                t.copy_(0.1 * n)
            elif leaf == "running_var":
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif leaf == "num_batches_tracked":
                t.fill_(7)
            elif t.ndim == 1 and leaf == "weight":  # BatchNorm scale
                t.copy_(1.0 + 0.2 * n)
            elif leaf == "bias":
                t.copy_(0.1 * n)
            else:  # conv / linear weights: unit-variance outputs
                t.copy_(n / np.sqrt(np.prod(t.shape[1:])))


def outputs(model, head, x):
    """(logits, classifier input) of one forward."""
    import torch

    seen = {}

    def keep_input(module, inputs, output):  # returns None: a hook's return value would replace the output
        seen["pooled"] = inputs[0].detach().clone()

    hook = head.register_forward_hook(keep_input)
    logits = model(torch.from_numpy(x)).detach()
    hook.remove()
    return logits.numpy(), seen["pooled"].numpy()


def write_fixture(name, model, head, config, seed):
    import copy

    import torch

    randomise(model, seed)
    x = np.random.default_rng(seed).normal(size=(2, 3, SIDE, SIDE)).astype(np.float32)
    out = {f"sd/{k}": v.numpy().copy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits, pooled = outputs(model.eval(), head, x)
        trained = copy.deepcopy(model).train()
        train_logits = trained(torch.from_numpy(x)).numpy()
    out.update({f"train_sd/{k}": v.numpy().copy() for k, v in trained.state_dict().items() if "running" in k})
    out.update(config=json.dumps(config), x=x, logits=logits, pooled=pooled, train_logits=train_logits)
    path = os.path.join(FIXTURES, name)
    np.savez_compressed(path, **out)
    print(f"{path}: {os.path.getsize(path) / 1e3:.0f} kB, |logits| max {np.abs(logits).max():.2f}")


def torchvision_resnet(tv_resnet, stages, width, num_classes):
    """torchvision's ResNet with planes scaled by width / 64 (its stem and classifier rebuilt to match)."""
    import torch.nn as nn

    class ScaledResNet(tv_resnet.ResNet):
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # the first stage: the stem feeds it `width` channels
                self.inplanes = width
            return super()._make_layer(block, planes * width // 64, blocks, stride, dilate)

    model = ScaledResNet(tv_resnet.Bottleneck, list(stages), num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.fc = nn.Linear(width * 8 * tv_resnet.Bottleneck.expansion, num_classes)
    return model


def timm_resnet(timm, stages, width, num_classes):
    import torch.nn as nn

    module = sys.modules["timm.models.resnet"]
    original = module.make_blocks

    def scaled(block_fn, channels, block_repeats, inplanes, **kwargs):
        return original(block_fn, [c * width // 64 for c in channels], block_repeats, width, **kwargs)

    module.make_blocks = scaled
    try:
        model = module.ResNet(module.Bottleneck, list(stages), num_classes=num_classes)
    finally:
        module.make_blocks = original
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.num_features = width * 8 * module.Bottleneck.expansion
    model.reset_classifier(num_classes)
    return model


def main():
    import torch

    torch.manual_seed(0)
    tv_resnet, tv_densenet, timm = import_reference()
    stages, width, classes = (2, 1, 1, 1), 8, 5
    resnet_cfg = {"stage_sizes": list(stages), "width": width, "num_classes": classes}
    model = torchvision_resnet(tv_resnet, stages, width, classes)
    write_fixture("cnn_resnet_tv.npz", model, model.fc, resnet_cfg, seed=1)
    model = timm_resnet(timm, stages, width, classes)
    write_fixture("cnn_resnet_timm.npz", model, model.fc, resnet_cfg, seed=2)
    dense_cfg = {"growth_rate": 8, "block_config": [2, 2, 2, 2], "num_init_features": 16, "bn_size": 4,
                 "num_classes": classes}
    model = tv_densenet.DenseNet(**{**dense_cfg, "block_config": tuple(dense_cfg["block_config"])})
    write_fixture("cnn_densenet_tv.npz", model, model.classifier, dense_cfg, seed=3)
    timm_dense = sys.modules["timm.models.densenet"].DenseNet
    model = timm_dense(growth_rate=8, block_config=(2, 2, 2, 2), bn_size=4, num_classes=classes)
    # timm's stem is 2 * growth_rate wide: 16, as in the torchvision fixture.
    write_fixture("cnn_densenet_timm.npz", model, model.classifier, dense_cfg, seed=4)

    layouts = {}
    for name, model in (("torchvision/resnet50", tv_resnet.resnet50()),
                        ("torchvision/densenet121", tv_densenet.densenet121()),
                        ("timm/resnet50", timm.create_model("resnet50")),
                        ("timm/densenet121", timm.create_model("densenet121"))):
        layouts[name] = {"keys": {k: list(v.shape) for k, v in model.state_dict().items()},
                         "parameters": sum(p.numel() for p in model.parameters())}
    path = os.path.join(FIXTURES, "cnn_layouts.npz")
    np.savez_compressed(path, layouts=json.dumps(layouts))
    print(path, {k: v["parameters"] for k, v in layouts.items()})


if __name__ == "__main__":
    main()
