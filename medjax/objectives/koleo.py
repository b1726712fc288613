"""KoLeo regulariser (Kozachenko-Leonenko entropy estimate), as DINOv2 uses it.

It spreads the student's CLS features over the sphere by penalising
-log(distance to the nearest other sample). The value matches the reference
KoLeoLoss. The reference computes it on each GPU's own images, with no
all-gather, so a sample's nearest neighbour is searched among that GPU's batch
only; ``koleo_term`` does the same over groups of ``group_size`` images (one
device's share of the global batch), or over the whole global batch. Two of the
reference's failure modes are removed:

* a batch of one sample has no neighbour (the reference silently pairs the
  sample with itself and returns a meaningless ~18): here that is a clear
  error at trace time, since shapes are static;
* duplicated samples (identical images, a collapsed network) give the
  reference huge or NaN gradients through 1 / distance. Here a pair whose
  normalised features are closer than float32 can resolve counts as an exact
  copy: the reference's value for a zero difference, and no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Unit vectors that differ only by float32 rounding (e.g. x and 3x after
# normalisation, or x and x under a different XLA fusion) are < 2e-7 apart;
# pairs closer than this are treated as the same point.
_SAME_POINT_DISTANCE = 1e-6


def _safe_norm(v, axis=-1, keepdims=False):
    """Euclidean norm whose gradient is 0 (not NaN) at a zero vector."""
    sq = jnp.sum(v * v, axis=axis, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def koleo_loss(x, eps=1e-8):
    """KoLeo loss of a (B, D) batch of features, B >= 2.

    L2-normalise each row (norm clamped at eps), find each row's nearest other
    row by inner product, take the distance ||x_i - x_nn(i) + eps|| (torch's
    PairwiseDistance adds eps to the difference) and return
    mean(-log(distance + eps)). The reference sets the diagonal of the
    inner-product matrix to -1, which lets a sample be its own neighbour when
    all others are exactly opposite; here the diagonal is excluded outright.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"KoLeo expects features of shape (batch, dim); got shape {x.shape}.")
    if x.shape[0] < 2:
        raise ValueError(
            f"KoLeo needs at least 2 samples per global crop on each step; got batch size {x.shape[0]} "
            "— increase the batch size or set config.loss.koleo_weight=0."
        )
    n = x.shape[0]
    x = x / jnp.maximum(_safe_norm(x, keepdims=True), eps)

    dots = jnp.matmul(jax.lax.stop_gradient(x), jax.lax.stop_gradient(x).T, precision=jax.lax.Precision.HIGHEST)
    dots = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, dots)
    neighbour = jnp.argmax(dots, axis=1)

    diff = x - x[neighbour]
    same = _safe_norm(jax.lax.stop_gradient(diff)) < _SAME_POINT_DISTANCE
    diff = jnp.where(same[:, None], 0.0, diff)
    distance = _safe_norm(diff + eps)
    return jnp.mean(-jnp.log(distance + eps))


def koleo_term(cls_tokens, n_crops: int, group_size: int = 0):
    """The KoLeo term of a step: summed over the global crops, each averaged over groups of images.

    ``cls_tokens`` is ``(n_crops * B, D)``, crop-major (rows ``c * B + b``). Within each crop, images
    ``[g * group_size, (g + 1) * group_size)`` form group ``g`` (one device's images, as a GPU of the
    reference sees them) and the crop's term is the mean of the groups' KoLeo losses (what the
    reference's gradient all-reduce averages). ``group_size=0`` (or ``>= B``) takes the whole batch.
    """
    crops = jnp.split(jnp.asarray(cls_tokens, jnp.float32), n_crops)
    images = crops[0].shape[0]
    if not group_size or group_size >= images:
        return sum(koleo_loss(c) for c in crops)
    if images % group_size:
        raise ValueError(f"KoLeo groups of {group_size} images do not divide the batch of {images} images per crop.")
    per_group = jax.vmap(koleo_loss)
    return sum(jnp.mean(per_group(c.reshape(images // group_size, group_size, c.shape[-1]))) for c in crops)
