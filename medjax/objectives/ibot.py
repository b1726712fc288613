"""iBOT masked-patch objective, as DINOv2 trains it.

The student sees global crops with some patches replaced by the mask token and
must predict, for each masked patch, the teacher's distribution over
prototypes for the same patch of the unmasked crop. Masked patches of the
global batch are gathered into a fixed-size buffer of M rows (static shape,
so one compiled step serves every batch); rows past the real masked patches
are padding with weight 0.

Teacher targets for the buffer come from `medjax.objectives.dino`:
`softmax_center` with the iBOT centre, or `sinkhorn_knopp(..., valid=...)`.
Arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def ibot_loss(student_patch_logits, teacher_patch_probs, mask_weights, n_images, student_temperature=0.1):
    """iBOT loss as the reference adds it to the total (before the iBOT loss weight).

    student_patch_logits, teacher_patch_probs: (M, K) masked-patch buffer.
    mask_weights: (M,) 1 / (masked patches of that row's image) for real rows,
    0 for padding, so each masked image weighs the same whatever its mask size.
    n_images: number of global-crop images in the batch, masked or not.

    Value = -sum_m w_m * sum_k t_mk * log_softmax(s_m / T_s)_k / n_images,
    which is iBOTPatchLoss.forward_masked. The reference training step then
    multiplies by loss_scales = 2 and ibot_loss_scale = 1 / n_global_crops =
    1/2 (ssl_meta_arch.py, commit b8931f7, lines 154, 291 and 324-334), a
    factor of exactly 1, so no further scaling is applied here. Padding rows
    are ignored even if their teacher rows hold garbage (NaN included).
    """
    w = _f32(mask_weights)
    real = w != 0
    t = jnp.where(real[:, None], _f32(teacher_patch_probs), 0.0)
    log_p = jax.nn.log_softmax(_f32(student_patch_logits) / student_temperature, axis=-1)
    per_patch = jnp.where(real, jnp.sum(t * log_p, axis=-1), 0.0)
    return -jnp.sum(w * per_patch) / n_images


def update_masked_center(center, teacher_patch_logits, valid, momentum=0.9):
    """EMA of the mean teacher logits over the real masked patches (padding excluded).

    The reference averages the masked patches on each process and then
    averages those means over processes; here the input is the global buffer,
    so the mean is over all masked patches of the global batch (identical on
    one process). If no patch is masked the centre is left unchanged (the
    reference would produce NaN).
    """
    valid = jnp.asarray(valid).astype(bool)
    x = jnp.where(valid[:, None], _f32(teacher_patch_logits), 0.0)
    count = jnp.sum(valid).astype(jnp.float32)
    mean = jnp.sum(x, axis=0) / jnp.maximum(count, 1.0)
    c = _f32(center)
    new = c * momentum + mean * (1.0 - momentum)
    return jax.lax.stop_gradient(jnp.where(count > 0, new, c))
