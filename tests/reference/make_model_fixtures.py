"""Write the backbone/head parity fixtures from the official DINOv2 code.

Needs a Python with torch and the PyPI package ``dinov2==0.0.1.dev2`` (an early copy without
register tokens), plus a checkout of https://github.com/facebookresearch/dinov2 at commit
b8931f7 for the register-token fixtures (imported from that folder in a child process):

    git clone https://github.com/facebookresearch/dinov2 ../dinov2-src
    git -C ../dinov2-src checkout b8931f7
    python tests/reference/make_model_fixtures.py --dinov2-src ../dinov2-src

Writes into tests/fixtures/: vit_mlp_c3.npz, vit_swiglu_c1.npz, vit_chunked_c3.npz (block
chunks), vit_pos_interp_plain.npz, dino_head.npz (pip code) and vit_reg4_c1.npz,
vit_pos_interp_aa.npz (register code). Each model file holds ``config`` (JSON), ``sd/<official
key>``, the NCHW input, masks and official outputs. Weights are randomised at O(1) scale (not the
training init) so every path shows up in the outputs.
"""

import argparse
import json
import os
import subprocess
import sys
from functools import partial

import numpy as np

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")


def randomise(module, seed):
    """Replace every parameter with O(1)-scale random values chosen by its role."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            n = lambda: torch.randn(p.shape, generator=g)  # noqa: E731
            leaf = name.split(".")[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1 + 0.2 * n())
            elif leaf == "bias":
                p.copy_(0.1 * n())
            elif leaf == "gamma":
                p.copy_(0.3 + 0.7 * torch.rand(p.shape, generator=g))
            elif leaf in ("cls_token", "register_tokens", "mask_token"):
                p.copy_(n())
            elif leaf == "pos_embed":
                p.copy_(0.5 * n())
            elif leaf == "weight_g":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:  # Linear / conv weights (and weight_v): unit-variance outputs
                p.copy_(n() / np.sqrt(np.prod(p.shape[1:])))


def state_dict_arrays(module):
    return {f"sd/{k}": v.detach().numpy().astype(np.float32) for k, v in module.state_dict().items()}


def backbone_fixture(vits, cfg, *, seed, hw, n_last, batch=2, block_chunks=0):
    """Official forward_features (with masks) and get_intermediate_layers (no masks) on one input.

    With ``block_chunks`` > 0 the state dict has chunked keys (``blocks.{chunk}.{i}.*``)."""
    import torch

    from dinov2.layers import MemEffAttention, NestedTensorBlock

    torch.manual_seed(seed)
    model = vits.DinoVisionTransformer(
        **cfg, block_chunks=block_chunks, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention)).eval()
    randomise(model, seed)
    rng = np.random.default_rng(seed)
    p, c = cfg["patch_size"], cfg["in_chans"]
    x = rng.normal(size=(batch, c, *hw)).astype(np.float32)
    n_patches = (hw[0] // p) * (hw[1] // p)
    masks = rng.random((batch, n_patches)) < 0.4
    masks[0, :2] = [True, False]
    out = state_dict_arrays(model)
    with torch.no_grad():
        ff = model.forward_features(torch.from_numpy(x), masks=torch.from_numpy(masks))
        inter = model.get_intermediate_layers(torch.from_numpy(x), n=n_last, return_class_token=True, norm=True)
    for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        out[f"out/{k}"] = ff[k].numpy()
    if "x_norm_regtokens" in ff:
        out["out/x_norm_regtokens"] = ff["x_norm_regtokens"].numpy()
    for i, (patch, cls) in enumerate(inter):
        out[f"inter/{i}/patch"] = patch.numpy()
        out[f"inter/{i}/cls"] = cls.numpy()
    out.update({"config": np.array(json.dumps(cfg)), "x_nchw": x, "masks": masks, "n_last": np.array(n_last)})
    if block_chunks:
        out["block_chunks"] = np.array(block_chunks)
    return out


def interp_fixture(vits, cfg, *, seed, grid, targets):
    """pos_embed resampled to each target grid by the official model's interpolate_pos_encoding."""
    import torch

    model = vits.DinoVisionTransformer(**cfg, block_chunks=0).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=g))
    p, d = cfg["patch_size"], cfg["embed_dim"]
    out = {"config": np.array(json.dumps(cfg)), "pos_embed": model.pos_embed.detach().numpy(),
           "targets": np.array(targets)}
    assert model.pos_embed.shape[1] == 1 + grid * grid
    with torch.no_grad():
        for gh, gw in targets:
            dummy = torch.zeros(1, 1 + gh * gw, d)
            out[f"model/{gh}x{gw}"] = model.interpolate_pos_encoding(dummy, gh * p, gw * p).numpy()
    return out, model.pos_embed.detach()


def torch_resize(patch_pos, grid, gh, gw, **kwargs):
    import torch.nn.functional as F

    d = patch_pos.shape[-1]
    img = patch_pos[0, 1:].reshape(1, grid, grid, d).permute(0, 3, 1, 2)
    return F.interpolate(img, mode="bicubic", **kwargs).permute(0, 2, 3, 1).reshape(1, -1, d).numpy()


def save(name, arrays):
    path = os.path.join(FIXTURES, name)
    np.savez(path, **arrays)
    print(f"wrote {name}: {os.path.getsize(path) / 1024:.0f} KiB")


def pip_part():
    import torch

    from dinov2.layers import DINOHead
    from dinov2.models import vision_transformer as vits

    base = dict(embed_dim=48, num_heads=3, mlp_ratio=4.0, qkv_bias=True)
    cfg = dict(base, img_size=42, patch_size=14, in_chans=3, depth=3, init_values=1e-5, ffn_layer="mlp")
    save("vit_mlp_c3.npz", backbone_fixture(vits, cfg, seed=0, hw=(56, 42), n_last=2))
    cfg = dict(base, img_size=28, patch_size=7, in_chans=1, depth=2, init_values=None, ffn_layer="swiglu")
    save("vit_swiglu_c1.npz", backbone_fixture(vits, cfg, seed=1, hw=(28, 28), n_last=2))
    # Chunked blocks, run at twice the built size (pos_embed grid 2x2 -> 4x4): official-weight loading.
    cfg = dict(base, embed_dim=16, num_heads=2, img_size=28, patch_size=14, in_chans=3, depth=4, init_values=1e-5,
               ffn_layer="mlp")
    save("vit_chunked_c3.npz", backbone_fixture(vits, cfg, seed=6, hw=(56, 56), n_last=1, block_chunks=2))

    grid, targets = 7, [(7, 7), (10, 6), (4, 4), (2, 9), (16, 16), (1, 1)]
    cfg = dict(img_size=grid * 14, patch_size=14, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    out, pos = interp_fixture(vits, cfg, seed=2, grid=grid, targets=targets)
    for gh, gw in targets:  # the other torch flavour: plain bicubic from an explicit size
        out[f"plain_size/{gh}x{gw}"] = torch_resize(pos, grid, gh, gw, size=(gh, gw))
    save("vit_pos_interp_plain.npz", out)

    heads = {}
    for tag, kw in {"h3": dict(in_dim=48, out_dim=100, hidden_dim=64, bottleneck_dim=32, nlayers=3),
                    "h1": dict(in_dim=48, out_dim=40, bottleneck_dim=16, nlayers=1)}.items():
        torch.manual_seed(3)
        head = DINOHead(**kw).eval()
        randomise(head, 3)
        x = np.random.default_rng(3).normal(size=(5, kw["in_dim"])).astype(np.float32)
        with torch.no_grad():
            y = head(torch.from_numpy(x)).numpy()
        heads.update({f"{tag}/{k}": v for k, v in state_dict_arrays(head).items()})
        heads.update({f"{tag}/config": np.array(json.dumps(kw)), f"{tag}/x": x, f"{tag}/out": y})
    save("dino_head.npz", heads)


def register_part():
    from dinov2.models import vision_transformer as vits

    assert "num_register_tokens" in vits.DinoVisionTransformer.__init__.__code__.co_varnames, \
        "--dinov2-src does not point at the register version of dinov2"
    reg = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    cfg = dict(reg, img_size=42, patch_size=14, in_chans=1, embed_dim=48, depth=2, num_heads=3,
               mlp_ratio=4.0, qkv_bias=True, init_values=1e-5, ffn_layer="mlp")
    save("vit_reg4_c1.npz", backbone_fixture(vits, cfg, seed=4, hw=(56, 28), n_last=2))

    grid, targets = 7, [(7, 7), (10, 6), (4, 4), (2, 9), (16, 16), (1, 1)]
    cfg = dict(reg, img_size=grid * 14, patch_size=14, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    out, pos = interp_fixture(vits, cfg, seed=5, grid=grid, targets=targets)
    for gh, gw in targets:  # antialias with a scale factor (offset 0.1), the remaining combination
        scale = ((gh + 0.1) / grid, (gw + 0.1) / grid)
        out[f"aa_scale/{gh}x{gw}"] = torch_resize(pos, grid, gh, gw, scale_factor=scale, antialias=True)
    save("vit_pos_interp_aa.npz", out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dinov2-src", required=True, help="checkout of facebookresearch/dinov2 at b8931f7")
    parser.add_argument("--part", choices=["all", "pip", "register"], default="all")
    args = parser.parse_args()
    os.makedirs(FIXTURES, exist_ok=True)
    if args.part == "register":
        sys.path.insert(0, os.path.abspath(args.dinov2_src))
        register_part()
        return
    pip_part()
    if args.part == "all":
        cmd = [sys.executable, os.path.abspath(__file__), "--part", "register", "--dinov2-src", args.dinov2_src]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
