"""Official DINOv2 state-dict keys -> medjax param trees (numpy in, numpy out).

Torch Linear weights are (out, in) and Flax Dense kernels (in, out); conv kernels go from
(D, C, p, p) to (p, p, C, D); LayerNorm weight becomes ``scale``. The returned trees are the
contents of the ``"params"`` collection: use ``model.apply({"params": tree}, ...)``.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

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
