"""DINO self-distillation objective on CLS tokens, as DINOv2 trains it.

The teacher's head logits become targets either by centring and sharpening
(`softmax_center`, with the centre kept as an EMA by `update_center`) or by
Sinkhorn-Knopp (`sinkhorn_knopp`). The student is trained with a
cross-entropy against those targets; `dino_loss` combines global and local
crops with the same normalisation as the reference training step, so that
`global + local` is the reference's DINO contribution to the total loss.

Every function is pure and jit-able. Arithmetic is float32 whatever the input
dtype, because the trainer may run the networks in bfloat16. Teacher targets
carry no gradient (the reference computes them under `no_grad`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _safe_div(num, den):
    """num / den, with 0 where den is 0 (padding columns, underflowed prototypes) instead of NaN."""
    return num / jnp.where(den > 0, den, 1.0)


def softmax_center(teacher_logits, center, temperature):
    """Teacher probabilities softmax((t - center) / T) over prototypes.

    Subtracting the running centre stops one prototype from taking over; a low
    teacher temperature sharpens the targets.
    """
    t = _f32(teacher_logits)
    probs = jax.nn.softmax((t - _f32(center)) / temperature, axis=-1)
    return jax.lax.stop_gradient(probs)


def update_center(center, teacher_logits, momentum=0.9):
    """EMA of the batch-mean teacher logits: momentum * center + (1 - momentum) * mean.

    `teacher_logits` is the global batch (all global crops of all images), so
    the mean is the reference's all-reduced sum divided by the global count.
    The shape of `center` ((K,) or (1, K)) is kept. As in the reference, a
    step's targets use the centre from before this update, and the centres are
    only updated in "centering" mode (not with Sinkhorn-Knopp).
    """
    batch_mean = jnp.mean(_f32(teacher_logits), axis=0)
    new = _f32(center) * momentum + batch_mean * (1.0 - momentum)
    return jax.lax.stop_gradient(new)


def sinkhorn_knopp(teacher_logits, temperature, n_iterations=3, valid=None):
    """Teacher assignments by Sinkhorn-Knopp: (B, K) rows that sum to 1.

    Same sequence of normalisations as the reference: make the whole matrix
    sum to 1, then `n_iterations` times give each prototype total mass 1/K and
    each sample mass 1/B, and finally multiply by B. The input is the global
    batch; under jit with sharded inputs XLA inserts the cross-device sums.

    Unlike the reference, exp is taken after subtracting the global maximum of
    logits / T. A global constant cancels exactly in the first normalisation,
    so the result is unchanged, but logits far above ~3.5 at T = 0.04 no
    longer overflow float32. (A per-row maximum would change the result.)

    `valid` (B,) bool marks real rows of a fixed-size buffer (iBOT's masked
    patches); padding rows get all-zero output and do not count in B, like the
    reference's `sinkhorn_knopp_teacher` of iBOTPatchLoss, which only sees the
    real masked patches and uses their number as B.
    """
    x = _f32(teacher_logits) / temperature
    if valid is None:
        valid = jnp.ones(x.shape[:1], dtype=bool)
    valid = jnp.asarray(valid).astype(bool)
    n_samples = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)  # all-padding buffer -> zeros, not NaN
    n_prototypes = x.shape[-1]

    x = jnp.where(valid[:, None], x, -jnp.inf)
    shift = jnp.max(x)
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    q = jnp.exp(x - shift)  # padding rows are exactly 0

    def iteration(_, q):
        q = _safe_div(q, jnp.sum(q, axis=0, keepdims=True))  # each prototype gets mass 1/K
        q = q / n_prototypes
        q = _safe_div(q, jnp.sum(q, axis=1, keepdims=True))  # each sample gets mass 1/B
        return q / n_samples

    q = _safe_div(q, jnp.sum(q))
    q = jax.lax.fori_loop(0, n_iterations, iteration, q)
    q = q * n_samples
    return jax.lax.stop_gradient(q)


def cross_entropy(student_logits, teacher_probs, student_temperature=0.1):
    """Per-row cross-entropy -sum(t * log_softmax(s / T_s)), shape (N,)."""
    log_p = jax.nn.log_softmax(_f32(student_logits) / student_temperature, axis=-1)
    return -jnp.sum(_f32(teacher_probs) * log_p, axis=-1)


def dino_loss(
    student_global_logits,
    student_local_logits,
    teacher_probs,
    *,
    n_global,
    n_local,
    student_temperature=0.1,
):
    """DINO loss terms as the reference training step adds them to the total.

    All inputs are crop-major: rows [crop 0 of the B images, crop 1 of the B
    images, ...]. `teacher_probs` (n_global * B, K) are the teacher targets of
    the global crops in their natural order (crop 0 first); this function does
    the reference's crossing itself (student crop 0 against teacher crop 1 and
    vice versa). Local crops are scored against every teacher global crop.

    With n_global_terms = (n_global - 1) * n_global and
    n_local_terms = max(n_local * n_global, 1) (1 even with no local crops),
    each (student crop, teacher crop) pair contributes its batch-mean
    cross-entropy divided by n_global_terms + n_local_terms. For two global
    crops this is the reference's global term (mean over 2B rows times
    loss_scales = 2) and its local term exactly. The reference only allows
    n_global = 2; larger values use all ordered pairs of distinct crops.

    Returns dict(global=scalar, local=scalar); multiply by the DINO loss
    weight outside.
    """
    sg = _f32(student_global_logits)
    sl = _f32(student_local_logits)
    t = _f32(teacher_probs)
    if n_global < 1 or n_local < 0:
        raise ValueError(f"dino_loss needs n_global >= 1 and n_local >= 0; got n_global={n_global}, n_local={n_local}.")
    if sg.shape != t.shape or sg.ndim != 2 or sg.shape[0] % n_global:
        raise ValueError(
            f"dino_loss expects student and teacher global logits of the same shape (n_global*B, K) with "
            f"n_global={n_global}; got {sg.shape} and {t.shape}."
        )
    batch, n_proto = sg.shape[0] // n_global, sg.shape[1]
    if sl.shape[0] != n_local * batch or (n_local and sl.shape[1] != n_proto):
        raise ValueError(
            f"dino_loss expects local logits of shape ({n_local}*{batch}, {n_proto}) for n_local={n_local}; "
            f"got {sl.shape}."
        )

    n_terms = (n_global - 1) * n_global + max(n_local * n_global, 1)
    teacher = t.reshape(n_global, batch, n_proto)
    log_p = jax.nn.log_softmax(sg / student_temperature, axis=-1).reshape(n_global, batch, n_proto)

    global_sum = jnp.float32(0.0)
    for i in range(n_global):
        for j in range(n_global):
            if i != j:
                global_sum = global_sum - jnp.sum(teacher[j] * log_p[i]) / batch
    global_term = global_sum / n_terms

    if n_local == 0:
        local_term = jnp.float32(0.0)
    else:
        log_p_local = jax.nn.log_softmax(sl / student_temperature, axis=-1).reshape(n_local, batch, n_proto)
        teacher_sum = jnp.sum(teacher, axis=0)  # every local crop meets every teacher crop
        local_term = -jnp.sum(log_p_local * teacher_sum[None]) / batch / n_terms
    return {"global": global_term, "local": local_term}
