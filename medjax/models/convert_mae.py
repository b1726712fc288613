"""Official MAE weights (facebookresearch/mae) -> medjax :class:`MaskedAutoencoderViT` params.

Two kinds of files load: full ``MaskedAutoencoderViT`` state dicts (encoder and decoder, e.g.
``mae_visualize_vit_large.pth`` or a training ``checkpoint-*.pth``) and the released encoder-only
``mae_pretrain_vit_*.pth`` (keys under ``"model"``). Encoder keys map onto the ViT exactly as the
DINOv2 converter does (:func:`medjax.models.convert.official_key`); decoder keys keep their names
with ``decoder_blocks.{i}`` -> ``decoder_blocks_{i}``. The encoder's DINOv2 ``mask_token`` has no
official counterpart (the official ``mask_token`` is the decoder's) and is set to zeros.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.models import official_io
from medjax.models.convert import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, fold_rgb_patch_embed, official_key
from medjax.models.mae import MaskedAutoencoderViT
from medjax.models.sincos import sincos_pos_embed

_DECODER = ("decoder_", "mask_token")
_TO_OFFICIAL = {2: (1, 0), 4: (3, 2, 0, 1), 5: (4, 3, 0, 1, 2)}  # kernel -> torch weight
_FROM_OFFICIAL = {2: (1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}
_HEADS = {768: 12, 1024: 16, 1280: 16}  # official encoders; otherwise 64-dim heads


def is_decoder_key(key: str) -> bool:
    return key.startswith(_DECODER)


def mae_official_key(path: Sequence[str]) -> Optional[str]:
    """Official key of a medjax MAE param path; None for the encoder's unused DINOv2 mask token."""
    if path[0] == "encoder":
        return None if tuple(path[1:]) == ("mask_token",) else official_key(path[1:])
    m = re.fullmatch(r"decoder_blocks_(\d+)", path[0])
    parts = [f"decoder_blocks.{m.group(1)}" if m else path[0]] + list(path[1:])
    if len(parts) > 1 and parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_official(path: Sequence[str], value: np.ndarray) -> np.ndarray:
    return value.transpose(_TO_OFFICIAL[value.ndim]) if path[-1] == "kernel" else value


def _blocks(state_dict: Mapping[str, Any], prefix: str) -> int:
    idx = sorted({int(m.group(1)) for k in state_dict if (m := re.match(prefix + r"\.(\d+)\.", k))})
    if idx != list(range(len(idx))):
        raise ValueError(f"The weights' {prefix} indices are {idx[:6]}..., not 0..n-1.")
    return len(idx)


def infer_mae_config(state_dict: Mapping[str, Any]) -> dict:
    """``MaskedAutoencoderViT`` fields read from the weights' shapes (heads are not stored: left out)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.mlp.fc1.weight"):
        if key not in state_dict:
            raise ValueError(f"The weights have no {key!r}; they are not an MAE encoder "
                             f"(first keys: {', '.join(list(state_dict)[:4])}).")
    kernel = state_dict["patch_embed.proj.weight"]
    dim, chans, window = kernel.shape[0], kernel.shape[1], tuple(kernel.shape[2:])
    sd = len(window)
    if sd not in (2, 3) or len(set(window)) != 1:
        raise ValueError(f"The patch kernel is {'x'.join(map(str, window))}; only square or cubic patches load.")
    n_pos = state_dict["pos_embed"].shape[1] - 1
    grid = round(n_pos ** (1.0 / sd))
    if grid**sd != n_pos:
        raise ValueError(f"pos_embed holds {n_pos} patch positions, not a {'square' if sd == 2 else 'cubic'} grid.")
    cfg = dict(img_size=grid * window[0], patch_size=window[0], in_chans=chans, embed_dim=dim,
               depth=_blocks(state_dict, "blocks"), mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / dim,
               spatial_dims=sd)
    if "register_tokens" in state_dict:
        cfg["num_register_tokens"] = state_dict["register_tokens"].shape[1]
    if "decoder_embed.weight" in state_dict:
        cfg.update(decoder_embed_dim=state_dict["decoder_embed.weight"].shape[0],
                   decoder_depth=_blocks(state_dict, "decoder_blocks"))
    return cfg


def _default_heads(dim: int, per_head: int, arg: str) -> int:
    if dim % per_head:
        raise ValueError(f"Width {dim} is not a multiple of {per_head}; pass {arg}= (heads are not in the weights).")
    return dim // per_head


def fold_rgb_decoder_pred(weight: np.ndarray, bias: np.ndarray, *, norm_pix_loss: bool, gray_mean: float = GRAY_MEAN,
                          gray_std: float = GRAY_STD, rgb_mean: Sequence[float] = IMAGENET_MEAN,
                          rgb_std: Sequence[float] = IMAGENET_STD) -> tuple[np.ndarray, np.ndarray]:
    """One-channel ``decoder_pred`` from an RGB one: the channel mean of the predictions, each mapped
    to the gray normalisation (exact on replicated gray images when the decoder predicts pixels).

    A predicted ``x_c = (g - m_c) / s_c`` is ``(s_c x_c + m_c - gray_mean) / gray_std`` in gray
    units. With ``norm_pix_loss`` targets are per-patch standardised, so the plain mean is used.
    ``weight`` is official (p*p*3, Dd) in (p, q, c) order; returns ((p*p, Dd), (p*p,)).
    """
    w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    w, b = w.reshape(-1, 3, w.shape[-1]), b.reshape(-1, 3)
    if norm_pix_loss:
        scale, shift = np.full(3, 1 / 3), np.zeros(3)
    else:
        std, mean = np.asarray(rgb_std, np.float64), np.asarray(rgb_mean, np.float64)
        scale, shift = std / (3 * gray_std), (mean - gray_mean) / (3 * gray_std)
    w_gray = np.einsum("kcd,c->kd", w, scale)
    b_gray = b @ scale + shift.sum()
    return w_gray.astype(np.float32), b_gray.astype(np.float32)


def _shape_error(key: str, got: tuple, want: tuple, fix: str) -> ValueError:
    return ValueError(f"Weight {key!r} has shape {got} but the MAE configuration expects {want}; {fix}.")


def load_official_mae(source: Any, *, model: Optional[MaskedAutoencoderViT] = None, img_size: Optional[int] = None,
                      in_chans: Optional[int] = None, num_heads: Optional[int] = None,
                      decoder_num_heads: Optional[int] = None, norm_pix_loss: bool = False, seed: int = 0,
                      gray_mean: float = GRAY_MEAN, gray_std: float = GRAY_STD,
                      rgb_mean: Sequence[float] = IMAGENET_MEAN, rgb_std: Sequence[float] = IMAGENET_STD,
                      **overrides) -> tuple[MaskedAutoencoderViT, dict]:
    """``(model, params)`` from official MAE weights; ``model.apply({"params": params}, x, noise=...)``.

    ``source``: a state dict (numpy arrays or torch tensors, optionally under ``"model"``), or a
    ``.pth``/``.pt`` (needs torch), ``.npz`` or ``.safetensors`` file. The configuration is read
    from the weights; ``num_heads`` defaults to 12/16/16 for the official base/large/huge widths
    (64-dim heads otherwise), ``decoder_num_heads`` to 32-dim heads (16 for the official 512).
    ``norm_pix_loss`` is not stored in the weights: pass the one they were trained with (the
    released pretraining used True). ``overrides`` set other fields (dtype, drop_path_rate, the
    decoder size of an encoder-only file, ...), or pass a built ``model`` instead.

    - Encoder-only weights: the decoder starts from a fresh official initialisation (``seed``) and
      a ``UserWarning`` says so.
    - ``img_size`` other than the weights': both positional tables are *regenerated* as sin-cos at
      the new grid, not interpolated; they are fixed sin-cos tables in the official model, so this
      is what the official model built at that size holds.
    - ``in_chans=1`` with RGB weights: the patch kernel is folded as for DINOv2
      (:func:`medjax.models.convert.fold_rgb_patch_embed`) and ``decoder_pred`` averaged over the
      channels in gray units (:func:`fold_rgb_decoder_pred`).

    Weights that disagree with the configuration raise a ValueError naming the key and shapes.
    """
    state_dict = official_io.select_part(official_io.read_weights(source), "backbone")
    state_dict = {k: official_io.to_numpy(v) for k, v in state_dict.items()}
    encoder_only = not any(is_decoder_key(k) for k in state_dict)
    if model is not None:
        given = [n for n, v in dict(img_size=img_size, in_chans=in_chans, num_heads=num_heads,
                                    decoder_num_heads=decoder_num_heads, **overrides).items() if v is not None]
        if given:
            raise ValueError(f"Pass either model= or {', '.join(given)}, not both.")
        fix = "build the model to match the weights, or pass model=None to read the configuration from them"
    else:
        cfg = infer_mae_config(state_dict)
        cfg["num_heads"] = num_heads or _HEADS.get(cfg["embed_dim"]) or _default_heads(
            cfg["embed_dim"], 64, "num_heads")
        cfg.update(norm_pix_loss=norm_pix_loss, **overrides)
        if "decoder_embed_dim" in cfg or decoder_num_heads:
            dd = cfg.get("decoder_embed_dim", 512)
            cfg["decoder_num_heads"] = decoder_num_heads or _default_heads(dd, 32, "decoder_num_heads")
        cfg.update({k: v for k, v in dict(img_size=img_size, in_chans=in_chans).items() if v is not None})
        unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(MaskedAutoencoderViT)})
        if unknown:
            raise ValueError(f"Unknown MaskedAutoencoderViT field(s) {', '.join(unknown)}.")
        model = MaskedAutoencoderViT(**cfg)
        changed = sorted(set(overrides) | {k for k, v in dict(in_chans=in_chans).items() if v is not None})
        fix = (f"drop or correct {', '.join(changed)} (the rest is read from the weights)" if changed
               else "the weights are inconsistent with each other")

    # Adapt the weights to the model: RGB -> gray fold, sin-cos tables at the model's grid.
    kernel = state_dict.get("patch_embed.proj.weight")
    if model.in_chans == 1 and kernel is not None and kernel.ndim == 4 and kernel.shape[1] == 3:
        state_dict["patch_embed.proj.weight"], state_dict["patch_embed.proj.bias"] = fold_rgb_patch_embed(
            kernel, state_dict["patch_embed.proj.bias"], gray_mean=gray_mean, gray_std=gray_std,
            rgb_mean=rgb_mean, rgb_std=rgb_std)
        if "decoder_pred.weight" in state_dict:
            state_dict["decoder_pred.weight"], state_dict["decoder_pred.bias"] = fold_rgb_decoder_pred(
                state_dict["decoder_pred.weight"], state_dict["decoder_pred.bias"], norm_pix_loss=model.norm_pix_loss,
                gray_mean=gray_mean, gray_std=gray_std, rgb_mean=rgb_mean, rgb_std=rgb_std)
    grid, sd = model.img_size // model.patch_size, model.spatial_dims
    for key, dim in (("pos_embed", model.embed_dim), ("decoder_pos_embed", model.decoder_embed_dim)):
        table = state_dict.get(key)
        if table is not None and table.shape[-1] == dim and table.shape[1] != 1 + grid**sd:
            state_dict[key] = sincos_pos_embed(dim, grid, sd)[None].astype(np.float32)

    x = jax.ShapeDtypeStruct((1,) + (model.img_size,) * sd + (model.in_chans,), jnp.float32)
    key = jax.random.PRNGKey(seed)
    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, key, x)["params"])
    expected = {mae_official_key(p): p for p in shapes if mae_official_key(p) is not None}
    wanted = [k for k in expected if not (encoder_only and is_decoder_key(k))]
    missing = [k for k in wanted if k not in state_dict]
    wanted = [k for k in state_dict if k in wanted]  # the weights' (official) order, for the first error
    unexpected = sorted(k for k in state_dict if k not in expected)
    if missing or unexpected:
        what = (f"lack {len(missing)} keys the model needs ({', '.join(missing[:5])})" if missing
                else f"have {len(unexpected)} keys the model does not use ({', '.join(unexpected[:5])})")
        raise ValueError(f"The weights {what}; check depth, registers and that they are an official MAE model.")
    flat = {}
    for name in wanted:
        path = expected[name]
        want = tuple(_to_official(path, np.empty(shapes[path].shape, np.float32)).shape)
        arr = state_dict[name]
        if arr.shape != want:
            raise _shape_error(name, arr.shape, want, fix)
        flat[path] = np.ascontiguousarray(arr.transpose(_FROM_OFFICIAL[arr.ndim]) if path[-1] == "kernel" else arr)
    if encoder_only:
        warnings.warn("The weights hold only the MAE encoder (as the released mae_pretrain_vit_*.pth); the decoder "
                      f"starts from a fresh official initialisation (seed={seed}).", UserWarning, stacklevel=2)
        fresh = traverse_util.flatten_dict(jax.jit(model.init)(key, jnp.zeros(x.shape, x.dtype))["params"])
        flat.update({p: np.asarray(v) for p, v in fresh.items() if p[0] != "encoder"})
    flat[("encoder", "mask_token")] = np.zeros(shapes[("encoder", "mask_token")].shape, np.float32)
    return model, traverse_util.unflatten_dict(flat)


def export_mae_state_dict(params: Mapping[str, Any]) -> dict:
    """Official-layout state dict (numpy float32) of medjax MAE params; loads back with :func:`load_official_mae`."""
    if set(params) == {"params"}:
        params = params["params"]
    out = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        key = mae_official_key(path)
        if key is not None:
            out[key] = np.ascontiguousarray(_to_official(path, np.asarray(value, np.float32)))
    return out
