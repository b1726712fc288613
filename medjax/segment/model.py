"""Segmentation heads on ViT patch tokens, their loss, and the jitted train / predict steps.

Every module works on slices (B, H, W, C) and on volumes (B, D, H, W, C) alike: the number of
spatial dims is read from the input, "bilinear" is trilinear on volumes and a 3x3 conv is 3x3x3.

* ``LinearSegHead``: DINOv2's linear segmentation: a 1x1 classifier on the (standardised)
  patch tokens, logits upsampled bilinearly to the input size. No BatchNorm: with a frozen
  backbone the tokens are standardised once with the training set's per-channel mean and
  standard deviation (what a BatchNorm in eval mode would do, without batch statistics).
* ``DecoderHead``: progressive upsampling: a 1x1 projection of the patch grid, then one
  bilinear x2 upsampling + 3x3 conv + GroupNorm + GELU stage per entry of ``channels`` at
  S/2^n, ..., S/2 (S the input size, per axis; never below the patch grid), and a last
  bilinear x2 to S with a per-pixel (1x1) classifier. Every stage, and the classifier, also
  sees the input image resized to its size: an image skip that gives the decoder the edges
  a 14-pixel patch grid cannot.
* Loss: ``dice_weight`` * soft Dice (per foreground class over the whole batch, so a batch
  of empty slices still has a defined value) + ``ce_weight`` * pixel cross-entropy, plus
  ``classification_weight`` * class-weighted (inverse training frequency) cross-entropy of a
  linear classification head on concat(CLS, mean patch token) when multi-task; a row without a
  class (label < 0, an empty cell) has weight 0 there and trains the segmentation only.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

_DICE_SMOOTH = 1.0
# Plain (untruncated) normal inits: XLA on CPU takes seconds to compile each truncated-normal init.
_LECUN = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
_HE = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class LinearSegHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, patch: jax.Array, image: jax.Array) -> jax.Array:
        logits = nn.Dense(self.num_classes, kernel_init=_LECUN, name="classifier")(patch)
        return jax.image.resize(logits, image.shape[:-1] + (self.num_classes,), "bilinear")


class Conv3x3x3(nn.Module):
    """A 3x3x3 "SAME" convolution of (B, D, H, W, C), computed as the sum over the three depth taps of 2D
    3x3 convolutions of the depth-shifted volume: the same operation and parameters as ``nn.Conv``, five
    times faster forward and backward than XLA's 3D convolution on a CPU."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _HE, (3, 3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        b, d = x.shape[:2]
        padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
        out = 0.0
        for tap in range(3):
            planes = padded[:, tap:tap + d].reshape(b * d, *x.shape[2:])
            out = out + jax.lax.conv_general_dilated(planes, kernel[tap].astype(x.dtype), (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out.reshape(b, d, *out.shape[1:]) + bias


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class DecoderHead(nn.Module):
    num_classes: int
    channels: tuple = (128, 64, 32)
    image_skip: bool = True

    @nn.compact
    def __call__(self, patch: jax.Array, image: jax.Array) -> jax.Array:
        grid, full = patch.shape[1:-1], image.shape[1:-1]
        x = nn.Dense(self.channels[0], kernel_init=_LECUN, name="project")(patch)
        n = len(self.channels)
        for i, ch in enumerate(self.channels):
            scale = 2 ** (n - i)
            x = self._upsample(x, image, tuple(max(g, f // scale) for g, f in zip(grid, full)))
            if len(full) == 3:
                x = Conv3x3x3(ch, name=f"stage{i}_conv")(x)
            else:
                x = nn.Conv(ch, (3, 3), padding="SAME", kernel_init=_HE, name=f"stage{i}_conv")(x)
            x = nn.GroupNorm(num_groups=_groups(ch), name=f"stage{i}_norm")(x)
            x = nn.gelu(x)
        # Full resolution: a per-pixel classifier on the upsampled features and the image itself
        # (a 3x3 conv there would cost more than the rest of the decoder together).
        return nn.Dense(self.num_classes, kernel_init=_LECUN, name="classifier")(self._upsample(x, image, full))

    def _upsample(self, x, image, size):
        x = resize(x, size)
        if self.image_skip:
            x = jnp.concatenate([x, downsample(image, size).astype(x.dtype)], -1)
        return x


def _up2(x: jax.Array, axis: int) -> jax.Array:
    """x2 bilinear along ``axis`` (half-pixel centres, edges clamped): jax.image.resize's values, as slices."""
    n = x.shape[axis]
    first, last = jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis)
    pair = jnp.stack([0.25 * prev + 0.75 * x, 0.75 * x + 0.25 * nxt], axis + 1)
    return pair.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:])


def resize(x: jax.Array, size: tuple) -> jax.Array:
    """Bilinear (trilinear) resize of (B, *spatial, C) to ``size``; exact doublings by slicing (several times
    faster on CPU)."""
    for axis, target in enumerate(size, start=1):
        if target == 2 * x.shape[axis]:
            x = _up2(x, axis)
    if x.shape[1:-1] != tuple(size):
        x = jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear")
    return x


def downsample(image: jax.Array, size: tuple) -> jax.Array:
    """The image at ``size``: a box average for whole-number factors, else an antialiased linear resize."""
    b, spatial, c = image.shape[0], image.shape[1:-1], image.shape[-1]
    if all(n % t == 0 for n, t in zip(spatial, size)):
        blocks = [d for t, n in zip(size, spatial) for d in (t, n // t)]  # (t0, f0, t1, f1, ...)
        return image.reshape(b, *blocks, c).mean(axis=tuple(range(2, 2 * len(size) + 1, 2)))
    return jax.image.resize(image, (b, *size, c), "linear")


class ClassifierHead(nn.Module):
    """The multi-task head: a linear classifier on concat(CLS, mean patch token)."""

    num_classes: int

    @nn.compact
    def __call__(self, pooled: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes, kernel_init=_LECUN, name="classifier")(pooled)


def log_prior(labels, num_classes: int) -> jax.Array:
    """Classifier bias = log class frequency in the training labels, so training starts from the prior
    (a lesion covering 0.2 % of the pixels would otherwise take thousands of Adam steps to reach)."""
    labels = np.asarray(labels)
    freq = np.bincount(labels.ravel(), minlength=num_classes)[:num_classes] / labels.size
    return jnp.asarray(np.log(np.maximum(freq, 1e-4)), jnp.float32)


@dataclasses.dataclass(frozen=True)
class SegSpec:
    """The static part of a model: modules and loss weights (hashable: one compile per spec)."""

    backbone: nn.Module
    head: nn.Module
    cls_head: nn.Module | None
    n_last_blocks: int
    num_classes: int
    dice_weight: float
    ce_weight: float
    classification_weight: float
    frozen: bool  # True: the batch carries precomputed tokens ("patch", "pooled")


def build_head(kind: str, num_classes: int, channels, image_skip: bool) -> nn.Module:
    if kind == "linear":
        return LinearSegHead(num_classes)
    return DecoderHead(num_classes, tuple(channels), bool(image_skip))


def tokens(backbone, params, images, n_last_blocks: int, *, train: bool = False, rng=None) -> dict:
    """``patch``: (B, h, w, n*D) (volumes: (B, d, h, w, n*D)) normed patch tokens of the last n blocks;
    ``pooled``: concat(CLS, mean patch)."""
    rngs = {"drop_path": rng} if train and rng is not None else None
    out = backbone.apply({"params": params}, images, train=train, n_last_blocks=n_last_blocks, rngs=rngs)
    r, p = backbone.num_register_tokens, backbone.patch_size
    grid = tuple(n // p for n in images.shape[1:-1])  # the ViT flattens tokens in (D,) H, W order
    patch = jnp.concatenate([t[:, r + 1:] for t in out["last_blocks_norm"]], axis=-1)
    pooled = jnp.concatenate([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(axis=1)], axis=-1)
    return {"patch": patch.reshape(images.shape[0], *grid, -1), "pooled": pooled}


@functools.lru_cache(maxsize=16)
def init_fn(module: nn.Module):
    """Jitted ``module.init``: one compile, instead of one per operation when initialising eagerly."""
    return jax.jit(module.init)


@functools.lru_cache(maxsize=8)
def tokens_fn(backbone, n_last_blocks: int):
    """Jitted ``tokens`` for a frozen backbone; params are an argument, so every init shares one compile."""
    return jax.jit(lambda params, images: tokens(backbone, params, images, n_last_blocks))


def forward(spec: SegSpec, params, stats, batch, *, train: bool = False, rng=None):
    """(segmentation logits (B, *input spatial shape, C), classification logits (B, K) or None)."""
    if spec.frozen:
        feats = {"patch": batch["patch"], "pooled": batch["pooled"]}
    else:
        feats = tokens(spec.backbone, params["backbone"], batch["images"], spec.n_last_blocks, train=train, rng=rng)
    patch = (feats["patch"] - stats["patch_mean"]) / stats["patch_std"]
    seg = spec.head.apply({"params": params["head"]}, patch, batch["images"])
    cls = None
    if spec.cls_head is not None:
        pooled = (feats["pooled"] - stats["pooled_mean"]) / stats["pooled_std"]
        cls = spec.cls_head.apply({"params": params["cls_head"]}, pooled)
    return seg, cls


def segmentation_loss(logits, masks, num_classes: int, dice_weight: float, ce_weight: float):
    """(dice_weight * (1 - mean soft Dice over foreground classes) + ce_weight * CE, parts)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(masks, num_classes, dtype=jnp.float32)
    ce = -jnp.mean(jnp.sum(onehot * logp, axis=-1))
    prob = jnp.exp(logp)[..., 1:]
    gt = onehot[..., 1:]
    axes = tuple(range(prob.ndim - 1))
    dice = (2.0 * jnp.sum(prob * gt, axes) + _DICE_SMOOTH) / (jnp.sum(prob, axes) + jnp.sum(gt, axes) + _DICE_SMOOTH)
    dice_loss = 1.0 - jnp.mean(dice)
    return dice_weight * dice_loss + ce_weight * ce, {"ce": ce, "dice_loss": dice_loss}


def total_loss(params, stats, batch, rng, spec: SegSpec):
    seg, cls = forward(spec, params, stats, batch, train=True, rng=rng)
    loss, parts = segmentation_loss(seg, batch["masks"], spec.num_classes, spec.dice_weight, spec.ce_weight)
    if cls is not None:
        labels = batch["labels"]
        ce = optax.softmax_cross_entropy_with_integer_labels(cls.astype(jnp.float32), jnp.maximum(labels, 0))
        # inverse class frequency: rare classes count as much; a row without a class (< 0) not at all
        w = jnp.where(labels >= 0, stats["cls_weights"][jnp.maximum(labels, 0)], 0.0)
        cls_ce = jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-6)
        loss = loss + spec.classification_weight * cls_ce
        parts["classification_ce"] = cls_ce
    parts["loss"] = loss
    return loss, parts


def _decays(path) -> bool:
    """Weight decay on kernels and the positional embedding; none on biases, norms, LayerScale and tokens."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    leaf = names[-1]
    return not (leaf in ("bias", "scale", "gamma", "cls_token", "register_tokens", "mask_token")
                or any("norm" in n for n in names))


@dataclasses.dataclass(frozen=True)
class OptSpec:
    lr: float
    backbone_lr_mult: float
    weight_decay: float
    warmup_steps: int
    steps: int


def make_optimizer(opt: OptSpec, params) -> optax.GradientTransformation:
    """AdamW with linear warm-up and cosine decay to 0; the backbone (if trained) at ``lr * backbone_lr_mult``."""
    warmup = min(opt.warmup_steps, max(opt.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, max(opt.steps, warmup + 1), end_value=0.0)

    def mask(tree):  # a function: multi_transform hands each group a tree with the other group masked out
        return jax.tree_util.tree_map_with_path(lambda p, _: _decays(p), tree)

    def adamw(mult):
        return optax.adamw(lambda count: schedule(count) * mult, b1=0.9, b2=0.999, eps=1e-8,
                           weight_decay=opt.weight_decay, mask=mask)

    labels = {k: "backbone" if k == "backbone" else "heads" for k in params}
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.multi_transform({"backbone": adamw(opt.backbone_lr_mult), "heads": adamw(1.0)}, labels))


@functools.lru_cache(maxsize=16)
def train_step_fn(spec: SegSpec, opt: OptSpec, param_keys: tuple):
    """(jitted step (params, opt_state, stats, batch, rng) -> (params, opt_state, parts), optimizer init)."""
    del param_keys  # part of the cache key: the optimizer's labels follow the top-level params

    def init(params):
        return make_optimizer(opt, params).init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, stats, batch, rng):
        grads, parts = jax.grad(total_loss, has_aux=True)(params, stats, batch, rng, spec)
        updates, opt_state = make_optimizer(opt, params).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    return step, init


@functools.lru_cache(maxsize=16)
def predict_fn(spec: SegSpec):
    """Jitted (params, stats, batch) -> (softmax-free seg logits, class probabilities or None)."""

    @jax.jit
    def predict(params, stats, batch):
        seg, cls = forward(spec, params, stats, batch)
        return seg, None if cls is None else jax.nn.softmax(cls.astype(jnp.float32), axis=-1)

    return predict


@functools.lru_cache(maxsize=8)
def upsample_fn(shape: tuple):
    """Jitted bilinear resize of (B, S, S, C) logits to (B, *shape, C), then argmax: labels on the native grid."""

    @jax.jit
    def up(logits):
        out = jax.image.resize(logits, (logits.shape[0], *shape, logits.shape[-1]), "bilinear")
        return jnp.argmax(out, axis=-1).astype(jnp.uint8)

    return up
