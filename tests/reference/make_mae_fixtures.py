"""Write the MAE parity fixtures from the official facebookresearch/mae code (never imported by tests).

The official code pins timm 0.3.2, which predates current torch; it is imported with stand-ins
set up below: ``torch._six`` (``container_abcs`` & co, removed from torch), dummy ``torchvision``
and ``PIL`` modules (imported by timm's data package, unused here) and ``np.float`` (removed from
numpy, used by ``util/pos_embed.py``). Setup, in a separate environment:

    git clone https://github.com/facebookresearch/mae ../mae-src   # fixtures made at commit efb2a80
    python -m venv ../torchvenv && ../torchvenv/bin/pip install torch numpy
    ../torchvenv/bin/pip install --no-deps --target ../timm032 timm==0.3.2
    ../torchvenv/bin/python tests/reference/make_mae_fixtures.py --mae-src ../mae-src --timm ../timm032

Writes into tests/fixtures/:

- ``mae_c3.npz`` / ``mae_c1.npz``: tiny official ``MaskedAutoencoderViT``s (3 and 1 channels) with
  ``config`` (JSON), ``sd/<official key>``, the NCHW input ``x_nchw``, the per-patch ``noise`` and
  ``mask_ratio``, the official ``loss`` (with the config's ``norm_pix_loss``), ``loss_other`` (the
  other setting), ``pred``, ``mask``, ``latent``, ``ids_restore`` and ``patches`` (patchified input).
- ``mae_encoder_only.npz``: the encoder keys of ``mae_c3`` only, as in the released
  ``mae_pretrain_vit_*.pth`` files (there under a top-level ``"model"`` key), with its ``latent``.
- ``mae_sincos.npz``: official ``get_2d_sincos_pos_embed`` tables, ``<dim>x<grid>[_cls]``.

Noise: the official ``random_masking`` draws ``torch.rand(N, L)``; the generator replaces
``torch.rand`` during the forward pass with a function returning the fixed noise (checking the
shape), so the official code runs unmodified. The official ``patchify`` hard-codes 3 channels;
for the 1-channel model it is replaced by the same reshape/einsum with the model's channel count.
Weights are randomised at O(1) scale (not the training init) so every path shows in the outputs;
the positional tables keep the official fixed sin-cos values.
"""

import argparse
import collections.abc
import contextlib
import json
import os
import sys
import types

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
DECODER_PREFIXES = ("decoder_", "mask_token")


def _stub_attribute(attr):
    """Any public attribute of the torchvision stand-in exists (and does nothing)."""
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {})  # hashable, callable, subclassable


def import_official(mae_src, timm_dir):
    """Import ``models_mae`` and ``util.pos_embed`` from ``mae_src`` with the stand-ins above."""
    six = types.ModuleType("torch._six")
    six.container_abcs, six.string_classes, six.int_classes = collections.abc, str, int
    sys.modules["torch._six"] = six
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "PIL", "PIL.Image"):
        stub = types.ModuleType(name)
        stub.__path__ = []
        stub.__getattr__ = _stub_attribute
        sys.modules[name] = stub
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, stub)
    sys.modules["PIL"].__version__ = "10.0"  # timm checks the version at import
    np.float = float
    sys.path[:0] = [os.path.abspath(timm_dir), os.path.abspath(mae_src)]
    import models_mae
    from util import pos_embed

    return models_mae, pos_embed


def randomise(model, seed):
    """O(1)-scale random values by role; the sin-cos tables stay as the official fixed ones."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pos_embed"):
                continue
            n = torch.randn(p.shape, generator=g)
            leaf = name.split(".")[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1 + 0.2 * n)
            elif leaf == "bias":
                p.copy_(0.1 * n)
            elif leaf in ("cls_token", "mask_token"):
                p.copy_(n)
            else:  # Linear / conv weights: unit-variance outputs
                p.copy_(n / np.sqrt(np.prod(p.shape[1:])))


@contextlib.contextmanager
def fixed_rand(noise):
    """``torch.rand(N, L, ...)`` returns ``noise`` while active (the official masking draw)."""
    import torch

    original = torch.rand

    def rand(*size, **kwargs):
        assert tuple(size) == tuple(noise.shape), (size, noise.shape)
        return noise.clone()

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = original


def channel_patchify(model, chans):
    """The official patchify with ``chans`` in place of its hard-coded 3."""
    import torch

    def patchify(imgs):
        p = model.patch_embed.patch_size[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], chans, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * chans)

    return patchify


def mae_fixture(models_mae, cfg, *, seed, mask_ratio, batch=2):
    from functools import partial

    import torch

    torch.manual_seed(seed)
    model = models_mae.MaskedAutoencoderViT(**cfg, mlp_ratio=4.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    model.eval()
    randomise(model, seed)
    if cfg["in_chans"] != 3:
        model.patchify = channel_patchify(model, cfg["in_chans"])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, cfg["in_chans"], cfg["img_size"], cfg["img_size"])).astype(np.float32)
    n_patches = (cfg["img_size"] // cfg["patch_size"]) ** 2
    noise = rng.random((batch, n_patches)).astype(np.float32)
    imgs = torch.from_numpy(x)
    with torch.no_grad(), fixed_rand(torch.from_numpy(noise)):
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio)
    with torch.no_grad(), fixed_rand(torch.from_numpy(noise)):
        latent, mask2, ids_restore = model.forward_encoder(imgs, mask_ratio)
        model.norm_pix_loss = not cfg["norm_pix_loss"]
        loss_other = model.forward_loss(imgs, pred, mask)
        model.norm_pix_loss = cfg["norm_pix_loss"]
        patches = model.patchify(imgs)
    assert torch.equal(mask, mask2)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {f"sd/{k}": v for k, v in sd.items()}
    out.update(config=np.array(json.dumps(cfg)), x_nchw=x, noise=noise, mask_ratio=np.array(mask_ratio),
               loss=loss.numpy(), loss_other=loss_other.numpy(), pred=pred.numpy(), mask=mask.numpy(),
               latent=latent.numpy(), ids_restore=ids_restore.numpy(), patches=patches.numpy())
    return out


def save(name, arrays):
    path = os.path.join(FIXTURES, name)
    np.savez(path, **arrays)
    print(f"wrote {name}: {os.path.getsize(path) / 1024:.0f} KiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mae-src", required=True, help="checkout of facebookresearch/mae")
    parser.add_argument("--timm", required=True, help="folder holding timm 0.3.2 (pip install --target)")
    args = parser.parse_args()
    models_mae, pos_embed = import_official(args.mae_src, args.timm)
    os.makedirs(FIXTURES, exist_ok=True)

    tiny = dict(img_size=32, embed_dim=48, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
                decoder_num_heads=4)
    c3 = mae_fixture(models_mae, dict(tiny, patch_size=8, in_chans=3, norm_pix_loss=False), seed=0, mask_ratio=0.75)
    save("mae_c3.npz", c3)
    save("mae_c1.npz", mae_fixture(models_mae, dict(tiny, patch_size=4, in_chans=1, norm_pix_loss=True),
                                   seed=1, mask_ratio=0.6))
    encoder = {k: v for k, v in c3.items() if k.startswith("sd/") and not k[3:].startswith(DECODER_PREFIXES)}
    save("mae_encoder_only.npz", dict(encoder, config=c3["config"], x_nchw=c3["x_nchw"], noise=c3["noise"],
                                      mask_ratio=c3["mask_ratio"], latent=c3["latent"], mask=c3["mask"]))

    tables = {}
    for dim, grid in ((16, 5), (32, 4), (48, 7), (8, 1)):
        for cls in (False, True):
            tables[f"{dim}x{grid}" + ("_cls" if cls else "")] = pos_embed.get_2d_sincos_pos_embed(dim, grid, cls)
    save("mae_sincos.npz", tables)


if __name__ == "__main__":
    main()
