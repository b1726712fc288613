"""Backbone + one linear head per target, and the jitted fine-tuning step.

Each head reads the concatenation of the last block's normed CLS token and the
mean of its normed patch tokens (registers excluded): the CLS token alone is
what DINOv2 distils, the patch mean carries local findings (a small lesion)
that the CLS token may average away; the pair is the reference linear
evaluation's one-block, average-pooled input.

Parameters live in flat dicts keyed by their '/'-joined path
(``backbone/blocks_3/attn/qkv/kernel``, ``heads/lesion/kernel``). The frozen
ones (the patch and positional embeddings, the CLS and register tokens and the
first ``freeze_blocks`` blocks, plus the mask token, which classification never
uses) are kept out of the differentiated and optimised tree altogether: they are
an input of the step and come back as the very same arrays, so they are
bit-identical after training, have no optimizer state, and no gradient is
propagated into them.

The update is DINOv2's AdamW with layer-wise lr decay (``optim.ParamRules``:
``decay ** (depth + 1 - layer)``, heads and the final norm at 1, no weight decay
on biases, norms, LayerScale and tokens), after clipping the global gradient norm.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medjax.models.vit import VisionTransformer, trunc_normal
from medjax import optim

_EMBEDDINGS = ("patch_embed", "pos_embed", "cls_token", "register_tokens")
_NEVER_TRAINED = ("backbone/mask_token",)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "items"):
            out.update(flatten(dict(value), name + "/"))
        else:
            out[name] = value
    return out


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def is_frozen(name: str, freeze_blocks: int) -> bool:
    """Whether the parameter ``name`` stays fixed when the first ``freeze_blocks`` blocks are frozen."""
    if name in _NEVER_TRAINED:
        return True
    if freeze_blocks <= 0 or not name.startswith("backbone/"):
        return False
    if any(f"backbone/{k}" in name for k in _EMBEDDINGS):
        return True
    block = re.match(r"backbone/blocks_(\d+)/", name)
    return block is not None and int(block.group(1)) < freeze_blocks


def features(out: dict) -> jax.Array:
    """[CLS, mean patch token] of the last block, normed, as float32 (B, 2D)."""
    cls = out["x_norm_clstoken"].astype(jnp.float32)
    patch = out["x_norm_patchtokens"].astype(jnp.float32).mean(axis=1)
    return jnp.concatenate([cls, patch], axis=-1)


def init_heads(rng, dim: int, num_classes: dict) -> dict:
    """A linear head per target on 2 * dim features: weights N(0, 0.01) truncated, zero bias."""
    keys = jax.random.split(rng, len(num_classes))
    return {t: {"kernel": trunc_normal(0.01)(k, (2 * dim, c)), "bias": jnp.zeros((c,), jnp.float32)}
            for k, (t, c) in zip(keys, num_classes.items())}


def class_weights(labels: np.ndarray, num_classes: int, balanced: bool) -> np.ndarray:
    """Per-class loss weights: inverse training frequency scaled to mean 1 over the classes present
    (absent classes get 0), or all ones."""
    y = labels[labels >= 0]
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    if not balanced:
        return np.ones(num_classes, np.float32)
    w = np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)
    present = counts > 0
    if present.any():
        w = w / w[present].mean()
    return w.astype(np.float32)


def weighted_ce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Class-weighted cross-entropy averaged over the labelled rows (label -1 rows ignored), as torch's
    ``CrossEntropyLoss(weight=..., ignore_index=-1)``: sum(w_y * ce) / sum(w_y)."""
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    w = jnp.where(valid, weights[safe], 0.0)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


@dataclasses.dataclass(frozen=True)
class FineTuner:
    """The static part of fine-tuning: model, targets, what is frozen, the optimiser's rules."""

    backbone: VisionTransformer
    num_classes: tuple  # ((target, classes), ...) in target order
    freeze_blocks: int = 0
    layerwise_decay: float = 0.75
    patch_embed_lr_mult: float = 1.0
    clip_grad: float = 3.0
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999

    def __post_init__(self):
        if not 0 <= self.freeze_blocks <= self.backbone.depth:
            raise ValueError(f"config.finetune.freeze_blocks={self.freeze_blocks} must lie in [0, "
                             f"{self.backbone.depth}] (the backbone has {self.backbone.depth} blocks).")

    @property
    def targets(self) -> tuple:
        return tuple(t for t, _ in self.num_classes)

    def init_params(self, rng, backbone_params: dict) -> dict:
        """{"backbone": ..., "heads": {target: ...}} with fresh heads."""
        heads = init_heads(rng, self.backbone.embed_dim, dict(self.num_classes))
        return {"backbone": backbone_params, "heads": heads}

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) flat dicts."""
        flat = flatten(params)
        frozen = {k: v for k, v in flat.items() if is_frozen(k, self.freeze_blocks)}
        return {k: v for k, v in flat.items() if k not in frozen}, frozen

    @staticmethod
    def merge(trainable: dict, frozen: dict) -> dict:
        return unflatten({**trainable, **frozen})

    def rules(self, trainable: dict) -> optim.ParamRules:
        return optim.ParamRules.from_params(trainable, depth=self.backbone.depth,
                                            layerwise_decay=self.layerwise_decay,
                                            patch_embed_lr_mult=self.patch_embed_lr_mult)

    def init_opt(self, trainable: dict):
        return optim.make_adam(self.adamw_beta1, self.adamw_beta2).init(trainable)

    def logits(self, params: dict, x, *, train: bool = False, rng=None) -> dict:
        rngs = {"drop_path": rng} if train else None
        out = self.backbone.apply({"params": params["backbone"]}, x, train=train, rngs=rngs)
        f = features(out)
        return {t: f @ h["kernel"] + h["bias"] for t, h in params["heads"].items()}

    def loss(self, trainable, frozen, x, labels, weights, rng):
        """Sum over targets of each head's class-weighted CE on its own labelled rows."""
        logits = self.logits(self.merge(trainable, frozen), x, train=True, rng=rng)
        per_target = jnp.stack([weighted_ce(logits[t], labels[:, i], weights[t])
                                for i, t in enumerate(self.targets)])
        return jnp.sum(per_target), per_target

    def step_fn(self):
        """The jitted step ``(trainable, opt_state, frozen, x, labels, weights, lr, wd, rng) ->
        (trainable, opt_state, metrics)``; ``weights`` = {target: (classes,)}."""
        adam = optim.make_adam(self.adamw_beta1, self.adamw_beta2)

        def step(trainable, opt_state, frozen, x, labels, weights, lr, wd, rng):
            (loss, per_target), grads = jax.value_and_grad(self.loss, has_aux=True)(
                trainable, frozen, x, labels, weights, rng)
            norm = optax.global_norm(grads)
            if self.clip_grad > 0:
                scale = jnp.minimum(1.0, self.clip_grad / (norm + 1e-6))
                grads = jax.tree.map(lambda g: g * scale, grads)
            updates, opt_state = adam.update(grads, opt_state)
            trainable = optim.adamw_step(trainable, updates, self.rules(trainable), lr=lr, last_layer_lr=lr,
                                         weight_decay=wd)
            return trainable, opt_state, {"loss": loss, "target_losses": per_target, "grad_norm": norm}

        return jax.jit(step, donate_argnums=(0, 1))

    def eval_fn(self):
        """Jitted ``(trainable, frozen, x) -> {target: logits}`` (no drop path)."""
        return jax.jit(lambda trainable, frozen, x: self.logits(self.merge(trainable, frozen), x))
