"""The official facebookresearch/mae pretraining step on this machine, at medjax's ``configs/mae.py:bench`` shapes.

A side-by-side reference for medjax's MAE step time. It times the official PyTorch code, unmodified:
``MaskedAutoencoderViT`` from the repository's ``models_mae.py`` (its ``patchify`` generalised from a
hard-coded 3 channels to the images' 1, the same ops; with timm 0.3.2's ``PatchEmbed`` and
``Block``, the version the repository pins), ``timm.optim.optim_factory.add_weight_decay`` for the
parameter groups, ``torch.optim.AdamW(..., betas=(0.9, 0.95))`` and ``util/lr_sched.adjust_learning_rate``,
exactly as ``main_pretrain.py`` / ``engine_pretrain.py`` build them.

Run from the repository root with any Python that has torch (torch is not a dependency of medjax, and this
file imports neither jax nor medjax; ``medjax/__init__.py`` and ``medjax/bench/__init__.py`` are empty)::

    python -m medjax.bench.mae_official --mae-src ../mae-src --timm ../timm032 [--steps 10] [--threads 2]
    # or, equivalently: python medjax/bench/mae_official.py --mae-src ... --timm ...

where ``--mae-src`` is a checkout of https://github.com/facebookresearch/mae and ``--timm`` a folder holding
timm 0.3.2 (``pip install --no-deps --target ../timm032 timm==0.3.2``). When torch, the MAE source or timm
is missing it prints one line saying what and how to get it, and exits 0 (a skip). The test suite does not
import this file.

Shapes (``configs/mae.py:bench``): 224 px grayscale images (in_chans=1), patch 16, encoder ViT-Tiny
(192 wide, 12 blocks, 3 heads; ``--model-size base``: ViT-B/16, 768/12/12), decoder 512 wide x 8 blocks x
16 heads, mlp_ratio 4, LayerNorm eps 1e-6, norm_pix_loss, mask ratio 0.75, batch 16, float32.

One timed step (the official ``train_one_epoch`` body, data loading excluded on purpose: random images are
made once, before timing)::

    lr_sched.adjust_learning_rate(optimizer, step / epoch_length + epoch, args)
    loss, _, _ = model(imgs, mask_ratio=0.75)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

Not timed (the official loop has them, but they are no math on the model): on a CPU,
``torch.cuda.amp.autocast`` and the ``GradScaler`` of ``NativeScalerWithGradNormCount`` are disabled no-ops
(float32 throughout); that scaler's ``get_grad_norm_`` (a logged norm of all gradients, not used for
clipping), ``loss.item()`` and the metric logging are left out.

Shims for running 2020-era timm 0.3.2 and the MAE code on a current torch/numpy, applied here before the
imports (none changes any computation):
  * ``torch._six`` (removed from torch) is given as a module with ``container_abcs = collections.abc``,
    ``string_classes = str`` and ``int_classes = int``;
  * ``torchvision`` and ``PIL`` (imported by timm's data pipeline, unused here) get stand-in modules when
    they are not installed;
  * ``np.float = float`` for ``util/pos_embed.py`` (``np.float`` was removed in numpy 1.24).
"""

from __future__ import annotations

import argparse
import collections.abc
import importlib.util
import math
import os
import sys
import time
import types

BLR = 1.5e-4  # configs/mae.py: optim.base_lr; lr = blr * batch / 256 as main_pretrain.py
WEIGHT_DECAY = 0.05
EPOCHS = WARMUP_EPOCHS = 1  # configs/mae.py:bench (epochs=1, warmup_epochs=1, epoch_length=50)
EPOCH_LENGTH = 50
SIZES = {"tiny": (192, 12, 3), "base": (768, 12, 12)}  # encoder embed_dim, depth, num_heads


def _skip(message: str) -> None:
    print(f"SKIP mae_official: {message}")
    sys.exit(0)


class _Stub:
    """Anything: callable, any attribute, usable as a base class. Stands in for unused imports."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub()


def _stub_getattr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Stub


def _stub_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []  # a package, so submodule imports resolve through sys.modules
    module.__getattr__ = _stub_getattr
    for key, value in attrs.items():
        setattr(module, key, value)
    sys.modules[name] = module
    if "." in name:
        parent, child = name.rsplit(".", 1)
        setattr(sys.modules[parent], child, module)
    return module


def _install_shims() -> None:
    import numpy as np
    import torch

    if importlib.util.find_spec("torch._six") is None:
        six = types.ModuleType("torch._six")
        six.container_abcs = collections.abc
        six.string_classes = str
        six.int_classes = int
        sys.modules["torch._six"] = six
        torch._six = six
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            _stub_module(name)
    if importlib.util.find_spec("PIL") is None:
        _stub_module("PIL", __version__="0.0")
        for name in ("Image", "ImageOps", "ImageEnhance", "ImageChops"):
            _stub_module(f"PIL.{name}")
    if not hasattr(np, "float"):
        np.float = float


def _check_inputs(args) -> None:
    if importlib.util.find_spec("torch") is None:
        _skip("torch is not installed; get it with `pip install torch==2.13.0 numpy` (a CPU build will do).")
    if importlib.util.find_spec("numpy") is None:
        _skip("numpy is not installed; get it with `pip install numpy`.")
    needed = ("models_mae.py", "util/pos_embed.py", "util/lr_sched.py")
    missing = [p for p in needed if not (args.mae_src and os.path.isfile(os.path.join(args.mae_src, p)))]
    if missing:
        _skip(f"the official MAE source is missing ({', '.join(missing)} under --mae-src={args.mae_src!r}); get it "
              "with `git clone https://github.com/facebookresearch/mae ../mae-src` and pass --mae-src ../mae-src.")
    version_file = os.path.join(args.timm or "", "timm", "version.py")
    version = open(version_file).read() if args.timm and os.path.isfile(version_file) else ""
    if "0.3.2" not in version:
        _skip(f"timm 0.3.2 is missing (no timm/version.py saying 0.3.2 under --timm={args.timm!r}); get it with "
              "`pip install --no-deps --target ../timm032 timm==0.3.2` and pass --timm ../timm032.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mae-src", default=None, help="a checkout of github.com/facebookresearch/mae")
    parser.add_argument("--timm", default=None, help="a folder holding timm 0.3.2 (pip install --target)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model-size", choices=sorted(SIZES), default="tiny", help="encoder: ViT-Tiny or ViT-B /16")
    args = parser.parse_args(argv)
    _check_inputs(args)

    _install_shims()
    # The official code imports `util.*` and `timm.*` as top-level packages: put both folders first.
    sys.path[:0] = [os.path.abspath(args.mae_src), os.path.abspath(args.timm)]
    for name in [m for m in sys.modules if m in ("util", "timm") or m.startswith(("util.", "timm."))]:
        del sys.modules[name]  # never mix with another `util`/`timm` already imported

    from functools import partial

    import torch
    import torch.nn as nn
    import timm
    import timm.optim.optim_factory as optim_factory
    import models_mae
    import util.lr_sched as lr_sched

    assert timm.__version__ == "0.3.2", timm.__version__
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    class MaskedAutoencoderViT(models_mae.MaskedAutoencoderViT):
        """The official model; only ``patchify`` takes its channel count from the images (the official
        one hard-codes 3 and so fails on in_chans=1). Same reshape / einsum / reshape, C = 1 here."""

        def patchify(self, imgs):
            p = self.patch_embed.patch_size[0]
            assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
            n, c, h = imgs.shape[0], imgs.shape[1], imgs.shape[2] // p
            x = imgs.reshape(shape=(n, c, h, p, h, p))
            x = torch.einsum("nchpwq->nhwpqc", x)
            return x.reshape(shape=(n, h * h, p**2 * c))

    embed_dim, depth, num_heads = SIZES[args.model_size]
    model = MaskedAutoencoderViT(
        img_size=224, patch_size=16, in_chans=1, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True)
    model.train(True)

    # main_pretrain.py: lr from the base lr, param groups by timm's rule, AdamW with betas (0.9, 0.95).
    sched = types.SimpleNamespace(lr=BLR * args.batch / 256, min_lr=0.0, warmup_epochs=WARMUP_EPOCHS, epochs=EPOCHS)
    param_groups = optim_factory.add_weight_decay(model, WEIGHT_DECAY)
    optimizer = torch.optim.AdamW(param_groups, lr=sched.lr, betas=(0.9, 0.95))
    optimizer.zero_grad()

    imgs = torch.randn(args.batch, 1, 224, 224, dtype=torch.float32)

    def step(i: int) -> torch.Tensor:
        # engine_pretrain.py: data_iter_step / len(data_loader) + epoch; the bench run's one epoch is all
        # warm-up (epochs = warmup_epochs = 1), so the step counter wraps there rather than leave it.
        lr_sched.adjust_learning_rate(optimizer, (i % EPOCH_LENGTH) / EPOCH_LENGTH, sched)
        loss, _, _ = model(imgs, mask_ratio=0.75)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    for i in range(args.warmup):
        loss = step(i)
    if args.warmup and not math.isfinite(loss.item()):
        raise SystemExit(f"non-finite loss {loss.item()}")
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    seconds = (time.perf_counter() - start) / max(args.steps, 1)

    print("impl=official_mae_pytorch")
    print(f"torch={torch.__version__}")
    print(f"threads={torch.get_num_threads()}")
    print(f"batch={args.batch}")
    if args.model_size != "tiny":
        print(f"model_size={args.model_size}")
    print(f"sec_per_step={seconds:.4g}")
    print(f"images_per_sec={args.batch / seconds:.4g}")


if __name__ == "__main__":
    main()
