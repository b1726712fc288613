"""Backbone + one linear head per target, and the jitted fine-tuning step.

``pooling="cls_patch"`` (the default): each head reads the concatenation of the last
block's normed CLS token and the mean of its normed patch tokens (registers excluded):
the CLS token alone is what DINOv2 distils, the patch mean carries local findings (a
small lesion) that the CLS token may average away; the pair is the reference linear
evaluation's one-block, average-pooled input. ``pooling="avg"`` is the official MAE
fine-tuning head: the mean of the last block's patch tokens before the final norm,
then a LayerNorm of its own (``fc_norm``), then the linear head (weights N(0, 2e-5)).

The loss is cross-entropy against soft targets: one-hot labels smoothed by
``label_smoothing``, mixed by Mixup / CutMix when their alphas are positive (as timm's
``Mixup``: one of the two per batch, the batch paired with its reverse, lambda from
Beta(alpha, alpha), a CutMix box's lambda corrected to its clipped area), and each row
weighted by its classes' weights (class balance; 0 for an unlabelled row). Without
smoothing and mixing it is exactly the class-weighted cross-entropy.

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


POOLINGS = ("cls_patch", "avg")


def features(out: dict) -> jax.Array:
    """[CLS, mean patch token] of the last block, normed, as float32 (B, 2D)."""
    cls = out["x_norm_clstoken"].astype(jnp.float32)
    patch = out["x_norm_patchtokens"].astype(jnp.float32).mean(axis=1)
    return jnp.concatenate([cls, patch], axis=-1)


def avg_features(out: dict, fc_norm: dict, num_register_tokens: int) -> jax.Array:
    """MAE's global pool: LayerNorm (eps 1e-6, ``fc_norm``) of the mean pre-norm patch token (B, D)."""
    x = out["x_prenorm"][:, 1 + num_register_tokens:].astype(jnp.float32).mean(axis=1)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * fc_norm["scale"] + fc_norm["bias"]


def init_heads(rng, dim: int, num_classes: dict, std: float = 0.01) -> dict:
    """A linear head per target on ``dim`` features: weights N(0, std) truncated, zero bias."""
    keys = jax.random.split(rng, len(num_classes))
    return {t: {"kernel": trunc_normal(std)(k, (dim, c)), "bias": jnp.zeros((c,), jnp.float32)}
            for k, (t, c) in zip(keys, num_classes.items())}


def soft_targets(labels: jax.Array, num_classes: int, weights: jax.Array, smoothing: float):
    """``(targets (B, C), row weights (B,))``: smoothed one-hot rows (zero for label -1) and w_y (0 for -1)."""
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    one_hot = jax.nn.one_hot(safe, num_classes) * (1.0 - smoothing) + smoothing / num_classes
    return jnp.where(valid[:, None], one_hot, 0.0), jnp.where(valid, weights[safe], 0.0)


def mix_batch(x: jax.Array, rng, mixup: float, cutmix: float):
    """``(mixed x, lam)``: Mixup (x * lam + reversed x * (1 - lam)) or CutMix (a box of the reversed batch
    pasted in, lam = the kept fraction of the area or volume), chosen with probability 1/2 when both alphas
    are positive. The targets are mixed with the same lam by ``mixed_loss``."""
    r_choice, r_lam, r_box = jax.random.split(rng, 3)
    use_cutmix = (jax.random.uniform(r_choice) < 0.5) if mixup > 0 and cutmix > 0 else cutmix > 0
    alpha = jnp.where(use_cutmix, cutmix if cutmix > 0 else 1.0, mixup if mixup > 0 else 1.0)
    lam = jax.random.beta(r_lam, alpha, alpha)
    flipped = x[::-1]
    sides = x.shape[1:-1]
    cut = (1.0 - lam) ** (1.0 / len(sides))  # box side as a fraction of each image side
    inside = jnp.ones(x.shape[:-1], bool)[0]
    lo_hi = []
    for axis, (n, r) in enumerate(zip(sides, jax.random.split(r_box, len(sides)))):
        centre = jax.random.randint(r, (), 0, n)
        half = jnp.floor(n * cut / 2).astype(jnp.int32)
        lo, hi = jnp.clip(centre - half, 0, n), jnp.clip(centre + half, 0, n)
        idx = jax.lax.broadcasted_iota(jnp.int32, sides, axis)
        inside = inside & (idx >= lo) & (idx < hi)
        lo_hi.append(hi - lo)
    box_lam = 1.0 - jnp.prod(jnp.stack(lo_hi)).astype(jnp.float32) / float(np.prod(sides))
    cut_x = jnp.where(inside[None, ..., None], flipped, x)
    mixed = jnp.where(use_cutmix, cut_x, lam * x + (1.0 - lam) * flipped)
    return mixed, jnp.where(use_cutmix, box_lam, lam)


def mixed_loss(logits: jax.Array, targets: jax.Array, row_weights: jax.Array, lam) -> jax.Array:
    """Weighted soft-target cross-entropy of a batch mixed with its reverse by ``lam``."""
    t = lam * targets + (1.0 - lam) * targets[::-1]
    w = lam * row_weights + (1.0 - lam) * row_weights[::-1]
    t = t / jnp.maximum(t.sum(-1, keepdims=True), 1e-12)
    ce = -jnp.sum(t * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
    return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)


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


def targets_loss(logits: dict, labels: jax.Array, weights: dict, num_classes, label_smoothing: float, mixing: bool,
                 lam) -> jax.Array:
    """Each target head's class-weighted CE on its own labelled rows (smoothed and mixed when asked), stacked."""
    per_target = []
    for i, (t, c) in enumerate(num_classes):
        if not mixing and label_smoothing == 0:
            per_target.append(weighted_ce(logits[t], labels[:, i], weights[t]))
            continue
        targets, rows = soft_targets(labels[:, i], c, weights[t], label_smoothing)
        per_target.append(mixed_loss(logits[t], targets, rows, lam))
    return jnp.stack(per_target)

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
    pooling: str = "cls_patch"  # cls_patch | avg (MAE's global pool + fc_norm)
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta alpha of Mixup; 0 = off
    cutmix: float = 0.0  # Beta alpha of CutMix; 0 = off

    def __post_init__(self):
        if not 0 <= self.freeze_blocks <= self.backbone.depth:
            raise ValueError(f"config.finetune.freeze_blocks={self.freeze_blocks} must lie in [0, "
                             f"{self.backbone.depth}] (the backbone has {self.backbone.depth} blocks).")

    @property
    def targets(self) -> tuple:
        return tuple(t for t, _ in self.num_classes)

    def init_params(self, rng, backbone_params: dict) -> dict:
        """{"backbone": ..., "heads": {target: ...}} with fresh heads (and ``fc_norm`` for avg pooling)."""
        d = self.backbone.embed_dim
        if self.pooling == "avg":  # the official MAE head: fc_norm, then a linear layer of N(0, 2e-5) weights
            return {"backbone": backbone_params, "heads": init_heads(rng, d, dict(self.num_classes), std=2e-5),
                    "fc_norm": {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}}
        return {"backbone": backbone_params, "heads": init_heads(rng, 2 * d, dict(self.num_classes))}

    def split(self, params: dict) -> tuple[dict, dict]:
        """(trainable, frozen) flat dicts."""
        flat = flatten(params)
        frozen = {k: v for k, v in flat.items() if is_frozen(k, self.freeze_blocks)}
        return {k: v for k, v in flat.items() if k not in frozen}, frozen

    @staticmethod
    def merge(trainable: dict, frozen: dict) -> dict:
        return unflatten({**trainable, **frozen})

    @staticmethod
    def count_trainable(trainable: dict) -> int:
        """Parameters the optimiser updates (backbone and heads; the frozen ones are not in ``trainable``)."""
        return int(sum(v.size for v in trainable.values()))

    def rules(self, trainable: dict) -> optim.ParamRules:
        return optim.ParamRules.from_params(trainable, depth=self.backbone.depth,
                                            layerwise_decay=self.layerwise_decay,
                                            patch_embed_lr_mult=self.patch_embed_lr_mult)

    def init_opt(self, trainable: dict):
        return optim.make_adam(self.adamw_beta1, self.adamw_beta2).init(trainable)

    def logits(self, params: dict, x, *, train: bool = False, rng=None) -> dict:
        rngs = {"drop_path": rng} if train else None
        out = self.backbone.apply({"params": params["backbone"]}, x, train=train, rngs=rngs)
        if self.pooling == "avg":
            f = avg_features(out, params["fc_norm"], self.backbone.num_register_tokens)
        else:
            f = features(out)
        return {t: f @ h["kernel"] + h["bias"] for t, h in params["heads"].items()}

    def loss(self, trainable, frozen, x, labels, weights, rng):
        """Sum over targets of each head's (smoothed, mixed) class-weighted CE on its own labelled rows."""
        mixing = self.mixup > 0 or self.cutmix > 0
        lam = 1.0
        if mixing:
            x, lam = mix_batch(x, jax.random.fold_in(rng, 1), self.mixup, self.cutmix)
        logits = self.logits(self.merge(trainable, frozen), x, train=True, rng=rng)
        per_target = targets_loss(logits, labels, weights, self.num_classes, self.label_smoothing, mixing, lam)
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
