"""DINOv2's AdamW: per-parameter lr / weight-decay multipliers, per-module clipping.

The official code builds torch param groups; here the same rules are pytrees of
multipliers computed once from parameter paths:

* layer-wise lr decay: ``decay ** (depth + 1 - layer_id)`` with layer 0 for the
  patch embedding, positional embedding and tokens, ``i + 1`` for block ``i``,
  and ``depth + 1`` (multiplier 1) for the final norm and the heads;
* the patch embedding's lr is further multiplied by ``patch_embed_lr_mult``;
* no weight decay on biases, norms and LayerScale (official) and on the CLS,
  register and mask tokens (medjax; the official code decays the tokens);
* parameters under ``last_layer`` follow the last-layer lr schedule (zero
  while frozen);
* gradients are clipped to ``clip_grad`` per top-level module (backbone, DINO
  head, iBOT head), like the official per-module ``clip_grad_norm_``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax

_LAYER0 = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
_NO_DECAY_TOKENS = ("cls_token", "register_tokens", "mask_token")


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def lr_multiplier(name: str, depth: int, layerwise_decay: float, patch_embed_lr_mult: float) -> float:
    """Multiplier of the base lr for the parameter called ``name`` (a '/'-joined path)."""
    layer_id = depth + 1
    if name.startswith("backbone/"):
        if any(k in name for k in _LAYER0):
            layer_id = 0
        else:
            block = re.search(r"blocks_(\d+)/", name)
            if block:
                layer_id = int(block.group(1)) + 1
    mult = layerwise_decay ** (depth + 1 - layer_id)
    if "patch_embed" in name:
        mult *= patch_embed_lr_mult
    return mult


def weight_decay_multiplier(name: str) -> float:
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "bias" or "norm" in name or leaf == "gamma" or leaf in _NO_DECAY_TOKENS:
        return 0.0
    return 1.0


@dataclasses.dataclass(frozen=True)
class ParamRules:
    """Pytrees (same structure as the params) of static per-parameter factors."""

    lr_mult: object
    wd_mult: object
    is_last_layer: object

    @classmethod
    def from_params(cls, params, *, depth, layerwise_decay, patch_embed_lr_mult) -> "ParamRules":
        def each(fn):
            return jax.tree_util.tree_map_with_path(lambda p, _: fn(_path_name(p)), params)

        return cls(
            lr_mult=each(lambda n: lr_multiplier(n, depth, layerwise_decay, patch_embed_lr_mult)),
            wd_mult=each(weight_decay_multiplier),
            is_last_layer=each(lambda n: "last_layer" in n),
        )


def make_adam(beta1: float, beta2: float) -> optax.GradientTransformation:
    # torch.optim.AdamW defaults: eps 1e-8 added outside the square root.
    return optax.scale_by_adam(b1=beta1, b2=beta2, eps=1e-8)


def clip_per_module(grads: dict, max_norm: float):
    """Clips each top-level module's gradient to ``max_norm`` (global norm within the module)."""
    if max_norm <= 0:
        return grads, optax.global_norm(grads)
    clipped = {}
    for key, g in grads.items():
        norm = optax.global_norm(g)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))  # torch adds 1e-6 too
        clipped[key] = jax.tree.map(lambda x: x * scale, g)
    return clipped, optax.global_norm(grads)


def adamw_step(params, adam_updates, rules: ParamRules, *, lr, last_layer_lr, weight_decay):
    """p <- p - lr_p * (adam_p + wd * wd_mult_p * p), as torch AdamW with param groups."""

    def update(p, u, lr_m, wd_m, last):
        step_lr = (last_layer_lr if last else lr) * lr_m
        return p - step_lr * (u + weight_decay * wd_m * p)

    return jax.tree.map(update, params, adam_updates, rules.lr_mult, rules.wd_mult, rules.is_last_layer)
