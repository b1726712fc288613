"""Official DINOv2 weights <-> medjax param trees (numpy in, numpy out).

Torch Linear weights are (out, in) and Flax Dense kernels (in, out); conv kernels go from
(D, C, p, p) to (p, p, C, D); LayerNorm weight becomes ``scale``; ``blocks.{i}`` becomes
``blocks_{i}``. The returned trees are the contents of the ``"params"`` collection: use
``model.apply({"params": tree}, ...)``.

:func:`load_official` is the entry point for Meta's checkpoints (hub ``.pth`` files, ``.npz``,
``.safetensors``, training checkpoints): it builds the matching :class:`VisionTransformer` from the
weights, optionally resizes the positional embedding and folds the RGB patch kernel into one
grayscale channel. :func:`export_state_dict` / :func:`save_official` go the other way. The model's
outputs carry the official ``forward_features`` names (``x_norm_clstoken``, ``x_norm_regtokens``,
``x_norm_patchtokens``, ``x_prenorm``, ``masks``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from medjax.models import official_io
from medjax.models.pos_embed import interpolate_pos_embed
from medjax.models.vit import VisionTransformer

# Official weights expect RGB normalised with ImageNet statistics; medjax normalises one gray
# channel with their channel means (configs/dinov2_reg.py: c.crops.mean / c.crops.std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = 0.449
GRAY_STD = 0.226

_BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.w12", "mlp.w3")


class _Keys:
    """Reads keys from a state dict and remembers which were used, to report leftovers."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], what: str):
        self.sd, self.what, self.used = state_dict, what, set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def get(self, key: str) -> np.ndarray:
        if key not in self.sd:
            raise ValueError(f"{self.what} state dict has no key {key!r}; is it an official DINOv2 checkpoint?")
        self.used.add(key)
        return np.asarray(self.sd[key], dtype=np.float32)

    def linear(self, prefix: str) -> dict:
        out = {"kernel": self.get(prefix + ".weight").T.copy()}
        if self.has(prefix + ".bias"):
            out["bias"] = self.get(prefix + ".bias")
        return out

    def layer_norm(self, prefix: str) -> dict:
        return {"scale": self.get(prefix + ".weight"), "bias": self.get(prefix + ".bias")}

    def check_all_used(self) -> None:
        left = sorted(set(self.sd) - self.used)
        if left:
            shown = ", ".join(left[:8]) + (" ..." if len(left) > 8 else "")
            raise ValueError(f"{self.what} state dict has {len(left)} unexpected keys ({shown}); "
                             "check depth and that the prefixes were stripped.")


def backbone_params_from_state_dict(state_dict: Mapping[str, np.ndarray], *, depth: int) -> dict:
    """Convert an official ``DinoVisionTransformer`` state dict (unchunked ``blocks.{i}`` keys).

    Registers, LayerScale and the SwiGLU FFN are detected from the keys; build the model with
    matching ``num_register_tokens``, ``init_values`` (non-None) and ``ffn_layer``.
    """
    k = _Keys(state_dict, "Backbone")
    kernel = k.get("patch_embed.proj.weight")
    params = {
        "patch_embed": {"proj": {"kernel": np.transpose(kernel, (2, 3, 1, 0)).copy(),
                                 "bias": k.get("patch_embed.proj.bias")}},
        "cls_token": k.get("cls_token"),
        "pos_embed": k.get("pos_embed"),
        "mask_token": k.get("mask_token").reshape(1, -1),
    }
    if k.has("register_tokens"):
        params["register_tokens"] = k.get("register_tokens")
    for i in range(depth):
        pre = f"blocks.{i}."
        blk = {"norm1": k.layer_norm(pre + "norm1"), "norm2": k.layer_norm(pre + "norm2"),
               "attn": {}, "mlp": {}}
        for name in _BLOCK_LINEARS:
            if k.has(pre + name + ".weight"):
                module, leaf = name.split(".")
                blk[module][leaf] = k.linear(pre + name)
        for ls in ("ls1", "ls2"):
            if k.has(pre + ls + ".gamma"):
                blk[ls] = {"gamma": k.get(pre + ls + ".gamma")}
        params[f"blocks_{i}"] = blk
    params["norm"] = k.layer_norm("norm")
    k.check_all_used()
    return params


def head_params_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
    """Convert an official ``DINOHead`` state dict (use_bn=False); nlayers is read from the keys.

    ``mlp.{2*i}`` (or ``mlp`` for a one-layer head) -> ``mlp_{i}``; the weight-norm pair is taken
    from ``last_layer.weight_g/weight_v`` or the newer ``parametrizations.weight.original0/1``.
    """
    k = _Keys(state_dict, "Head")
    params = {}
    if k.has("mlp.weight"):
        params["mlp_0"] = k.linear("mlp")
    else:
        idx = sorted({int(m.group(1)) for key in state_dict if (m := re.match(r"mlp\.(\d+)\.weight$", key))})
        if not idx:
            raise ValueError("Head state dict has no mlp.* weights; is it an official DINOHead?")
        for i, j in enumerate(idx):
            params[f"mlp_{i}"] = k.linear(f"mlp.{j}")
    if k.has("last_layer.weight_g"):
        g, v = k.get("last_layer.weight_g"), k.get("last_layer.weight_v")
    else:
        g = k.get("last_layer.parametrizations.weight.original0")
        v = k.get("last_layer.parametrizations.weight.original1")
    params["last_layer"] = {"weight_g": g.reshape(-1), "weight_v": v.T.copy()}
    k.check_all_used()
    return params


# --- Generic mapping between medjax param paths and official keys --------------------------------

_TO_OFFICIAL = {2: (1, 0), 4: (3, 2, 0, 1)}  # Dense kernel (in, out); conv kernel (p, p, C, D)
_FROM_OFFICIAL = {2: (1, 0), 4: (2, 3, 1, 0)}


def official_key(path: Sequence[str]) -> str:
    """Official state-dict key of a medjax param path, e.g. ``("blocks_3", "ls1", "gamma")``."""
    parts = list(path)
    if parts[0].startswith("blocks_"):
        parts[0] = "blocks." + parts[0][len("blocks_"):]
    if parts[-1] in ("kernel", "scale"):
        parts[-1] = "weight"
    return ".".join(parts)


def _official_shape(path: Sequence[str], shape: Sequence[int]) -> tuple:
    if path[-1] == "kernel":
        return tuple(shape[i] for i in _TO_OFFICIAL[len(shape)])
    return tuple(shape)


def _key_order(key: str) -> tuple:
    """Official order: tokens, patch embedding, blocks by index, final norm."""
    m = re.match(r"blocks\.(\d+)\.", key)
    if m:
        return (2, int(m.group(1)), key)
    return (3 if key.startswith("norm.") else 0 if "token" in key or key == "pos_embed" else 1, 0, key)


def _shown(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys, key=_key_order)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def abstract_params(model: VisionTransformer) -> dict:
    """Shapes of ``model``'s params (no compute), flattened to path tuples."""
    x = jax.ShapeDtypeStruct((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
    tree = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    return traverse_util.flatten_dict(tree)


def params_from_official(state_dict: Mapping[str, Any], model: VisionTransformer) -> dict:
    """medjax params for ``model`` from a plain official backbone state dict, checking every key and shape."""
    expected = {official_key(path): (path, leaf.shape) for path, leaf in abstract_params(model).items()}
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"The weights lack {len(missing)} keys the model needs ({_shown(missing)}); "
                         "they are not an official DINOv2 backbone of this configuration.")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise ValueError(f"The weights have {len(unexpected)} keys the model does not use ({_shown(unexpected)}); "
                         "check the model configuration (depth, registers, LayerScale, FFN type).")
    flat = {}
    for key in sorted(expected, key=_key_order):
        path, shape = expected[key]
        arr = official_io.to_numpy(state_dict[key])
        want = _official_shape(path, shape)
        if arr.shape != want:
            raise ValueError(f"Weight {key!r} has shape {arr.shape} but the model configuration expects {want}.")
        if path[-1] == "kernel":
            arr = arr.transpose(_FROM_OFFICIAL[arr.ndim])
        flat[path] = np.ascontiguousarray(arr)
    return traverse_util.unflatten_dict(flat)


def export_state_dict(params: Mapping[str, Any], *, model: Optional[VisionTransformer] = None) -> dict:
    """Official backbone state dict (numpy float32, official key layout and order) from medjax params.

    ``params`` is the ``"params"`` collection (or ``{"params": ...}``). With ``model``, the param
    shapes are checked against it first. The result loads into the official
    ``DinoVisionTransformer`` (``block_chunks=0``) with ``load_state_dict(strict=True)``.
    """
    if set(params) == {"params"}:
        params = params["params"]
    flat = traverse_util.flatten_dict(dict(params))
    if model is not None:
        want = abstract_params(model)
        diff = sorted(official_key(p) for p in set(want) ^ set(flat))
        if diff:
            raise ValueError(f"The params and the model differ in {len(diff)} entries ({_shown(diff)}).")
        for path, leaf in want.items():
            if tuple(flat[path].shape) != tuple(leaf.shape):
                raise ValueError(f"Param {official_key(path)!r} has shape {tuple(flat[path].shape)} "
                                 f"but the model expects {tuple(leaf.shape)}.")
    out = {}
    for path, value in flat.items():
        arr = np.asarray(value, dtype=np.float32)
        if path[-1] == "kernel":
            arr = arr.transpose(_TO_OFFICIAL[arr.ndim])
        out[official_key(path)] = np.ascontiguousarray(arr)
    return {k: out[k] for k in sorted(out, key=_key_order)}


def save_official(path: str, params: Mapping[str, Any], *, model: Optional[VisionTransformer] = None) -> None:
    """Write :func:`export_state_dict` to ``.npz``, ``.safetensors`` or (with torch) ``.pth``."""
    official_io.write_weights(path, export_state_dict(params, model=model))


# --- Building a model from official weights -------------------------------------------------------


def _ffn_hidden(dim: int, mlp_ratio: float, ffn_layer: str) -> int:
    hidden = int(dim * mlp_ratio)
    return (int(hidden * 2 / 3) + 7) // 8 * 8 if ffn_layer == "swiglu" else hidden


def _mlp_ratio(dim: int, hidden: int, ffn_layer: str) -> float:
    """An mlp_ratio for which the model builds an FFN of width ``hidden`` (4.0 when that works)."""
    base = hidden * 1.5 / dim if ffn_layer == "swiglu" else hidden / dim
    for ratio in (4.0, base, float(np.nextafter(base, np.inf))):
        if _ffn_hidden(dim, ratio, ffn_layer) == hidden:
            return ratio
    raise ValueError(f"No mlp_ratio gives a {ffn_layer} FFN of width {hidden} at embed_dim {dim}.")


def infer_config(state_dict: Mapping[str, Any]) -> dict:
    """``VisionTransformer`` fields read from the shapes and key names of an official backbone.

    The number of heads is not stored in the weights: it is left out (DINOv2 uses 64-dim heads).
    Interpolation follows the official hub models: antialiased with offset 0 for register models,
    plain bicubic with offset 0.1 otherwise.
    """
    for key in ("patch_embed.proj.weight", "pos_embed", "cls_token"):
        if key not in state_dict:
            raise ValueError(f"The weights have no {key!r}; they are not a DINOv2 backbone "
                             f"(first keys: {', '.join(list(state_dict)[:4])}).")
    dim, chans, ph, pw = state_dict["patch_embed.proj.weight"].shape
    if ph != pw:
        raise ValueError(f"The patch-embedding kernel is {ph}x{pw}; only square patches are supported.")
    n_pos = state_dict["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed holds {n_pos} patch positions, not a square grid.")
    blocks = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"The weights' block indices are {blocks[:6]}..., not 0..depth-1.")
    b0 = "blocks.0."
    ffn = "swiglu" if b0 + "mlp.w12.weight" in state_dict else "mlp"
    if ffn == "swiglu":
        hidden = state_dict[b0 + "mlp.w12.weight"].shape[0] // 2
    elif b0 + "mlp.fc1.weight" in state_dict:
        hidden = state_dict[b0 + "mlp.fc1.weight"].shape[0]
    else:
        raise ValueError(f"The weights have neither {b0}mlp.fc1.weight nor {b0}mlp.w12.weight.")
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    return dict(
        img_size=grid * ph, patch_size=ph, in_chans=chans, embed_dim=dim, depth=len(blocks),
        mlp_ratio=_mlp_ratio(dim, hidden, ffn), qkv_bias=b0 + "attn.qkv.bias" in state_dict, ffn_layer=ffn,
        init_values=1.0 if b0 + "ls1.gamma" in state_dict else None, num_register_tokens=registers,
        interpolate_antialias=registers > 0, interpolate_offset=0.0 if registers else 0.1,
    )


def fold_rgb_patch_embed(weight: np.ndarray, bias: np.ndarray, *, gray_mean: float = GRAY_MEAN,
                         gray_std: float = GRAY_STD, rgb_mean: Sequence[float] = IMAGENET_MEAN,
                         rgb_std: Sequence[float] = IMAGENET_STD) -> tuple[np.ndarray, np.ndarray]:
    """One-channel patch embedding equal to the RGB one on a replicated gray image.

    The RGB model sees x_c = (g - m_c) / s_c for a gray image g; the folded one sees
    x = (g - gray_mean) / gray_std, i.e. g = gray_std * x + gray_mean. Substituting,
    sum_c W_c * x_c = sum_c W_c * (gray_std / s_c) * x + sum_c W_c * (gray_mean - m_c) / s_c, and the
    second term is a constant image under each kernel (VALID patches), so it adds sum(W_c) times that
    constant to the bias. ``weight`` is official (D, 3, p, p); returns ((D, 1, p, p), (D,)).
    """
    w = np.asarray(weight, np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"Folding needs a 3-channel patch kernel (D, 3, p, p), got {w.shape}.")
    mean, std = np.asarray(rgb_mean, np.float64), np.asarray(rgb_std, np.float64)
    kernel = np.einsum("dcij,c->dij", w, gray_std / std)[:, None]
    shift = np.einsum("dcij,c->d", w, (gray_mean - mean) / std)
    return kernel.astype(np.float32), (np.asarray(bias, np.float64) + shift).astype(np.float32)


def resize_pos_embed(pos_embed: np.ndarray, grid: int, *, antialias: bool, offset: float) -> np.ndarray:
    """The official pos_embed resampled to a ``grid`` x ``grid`` patch grid, as the model would at run time."""
    out = interpolate_pos_embed(jnp.asarray(pos_embed, jnp.float32), (grid, grid), antialias=antialias, offset=offset)
    return np.asarray(out, np.float32)


def load_official(source: Any, *, model: Optional[VisionTransformer] = None, img_size: Optional[int] = None,
                  in_chans: Optional[int] = None, num_heads: Optional[int] = None, which: str = "teacher",
                  gray_mean: float = GRAY_MEAN, gray_std: float = GRAY_STD,
                  rgb_mean: Sequence[float] = IMAGENET_MEAN, rgb_std: Sequence[float] = IMAGENET_STD,
                  **overrides) -> tuple[VisionTransformer, dict]:
    """``(model, params)`` from official DINOv2 weights; run ``model.apply({"params": params}, x)``.

    ``source``: a state dict (numpy arrays or torch tensors), or a ``.pth``/``.pt`` (needs torch),
    ``.npz`` or ``.safetensors`` file; training checkpoints give the ``which`` backbone (block
    chunks and prefixes removed, heads ignored: see :func:`load_official_head`).

    The model is configured from the weights (:func:`infer_config`; ``num_heads`` defaults to
    embed_dim / 64 as in DINOv2); ``overrides`` set any other ``VisionTransformer`` field (dtype,
    drop_path_rate, remat, ...) and are checked against the weights' shapes. Alternatively pass a
    built ``model`` to load into. Then:

    - ``img_size``: the positional embedding (37x37 grid for the 518 px hub models) is resampled
      once to this resolution's grid with the model's own interpolation, so the model at
      ``img_size`` gives exactly the official model's output at that size; other sizes are still
      interpolated at run time (from the stored grid).
    - ``in_chans=1`` with RGB weights: the patch kernel is folded (:func:`fold_rgb_patch_embed`) so the
      model on gray images normalised with ``gray_mean``/``gray_std`` equals the RGB model on the
      replicated image normalised with ``rgb_mean``/``rgb_std`` (ImageNet statistics).
    """
    state_dict = official_io.select_part(official_io.read_weights(source), "backbone", which)
    if model is not None:
        if img_size is not None or in_chans is not None or num_heads is not None or overrides:
            raise ValueError("Pass either model= or img_size/in_chans/num_heads/overrides, not both.")
    else:
        cfg = infer_config(state_dict)
        if num_heads is None:
            if cfg["embed_dim"] % 64:
                raise ValueError(f"embed_dim {cfg['embed_dim']} is not a multiple of DINOv2's 64-dim heads; "
                                 "pass num_heads.")
            num_heads = cfg["embed_dim"] // 64
        cfg.update(num_heads=num_heads, **overrides)
        if img_size is not None:
            cfg["img_size"] = img_size
        if in_chans is not None:
            cfg["in_chans"] = in_chans
        fields = {f.name for f in dataclasses.fields(VisionTransformer)}
        unknown = sorted(set(cfg) - fields)
        if unknown:
            raise ValueError(f"Unknown VisionTransformer field(s) {', '.join(unknown)}.")
        model = VisionTransformer(**cfg)
    state_dict = dict(state_dict)
    kernel = state_dict.get("patch_embed.proj.weight")
    if model.in_chans == 1 and kernel is not None and kernel.shape[1] == 3:
        state_dict["patch_embed.proj.weight"], state_dict["patch_embed.proj.bias"] = fold_rgb_patch_embed(
            official_io.to_numpy(kernel), official_io.to_numpy(state_dict["patch_embed.proj.bias"]),
            gray_mean=gray_mean, gray_std=gray_std, rgb_mean=rgb_mean, rgb_std=rgb_std)
    pos = state_dict.get("pos_embed")
    grid = model.img_size // model.patch_size
    if pos is not None and pos.shape[1] != 1 + grid * grid and model.embed_dim == pos.shape[-1]:
        state_dict["pos_embed"] = resize_pos_embed(official_io.to_numpy(pos), grid,
                                                   antialias=model.interpolate_antialias,
                                                   offset=model.interpolate_offset)
    return model, params_from_official(state_dict, model)


def load_official_head(source: Any, *, which: str = "teacher", head: str = "dino_head") -> dict:
    """Params of a training checkpoint's DINO (or iBOT: ``head="ibot_head"``) head, for ``DINOHead``."""
    sd = official_io.select_part(official_io.read_weights(source), head, which)
    return head_params_from_state_dict({k: official_io.to_numpy(v) for k, v in sd.items()})
