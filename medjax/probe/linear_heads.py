"""The DINOv2 linear probe: 52 linear heads on frozen features, trained together in one jitted step.

DINOv2's linear evaluation does not pick a learning rate or a feature layout in
advance: it trains every combination at once on the same batches and keeps the
head with the best validation accuracy. The grid is 4 feature layouts
(CLS of the last 1 or 4 blocks, with or without the mean patch token) times 13
learning rates = 52 heads.

The reference keeps 52 separate ``nn.Linear`` modules, builds each head's input
again inside each head, and sums their losses before one backward pass. Here
the 13 heads of one layout are stacked into one ``(13, F, C)`` weight so their
logits are a single batched matmul, and the four layouts, whose widths differ
(F = (n + avgpool) * D), are a static Python loop inside one jitted function:
one XLA program, no padding. Padding every layout to the widest (5D) would
spend 20D instead of 12D columns of matmul and optimizer state per head row,
about 67% more work, to save three small kernel launches that XLA fuses anyway.

The loss is the SUM of the 52 head losses; as each head's loss depends only on
its own weights, one gradient of the sum gives every head exactly its own
gradient, and SGD with a per-head learning rate then trains the 52 heads
as 52 independent runs would: weights, biases and momentum buffers within 1e-6 of a float64 reference
of each head after three steps (tests/probe/test_linear_heads.py).

Multi-label tasks (chest X-ray findings) take a per-entry weight: an entry with weight 0 (a finding
left unlabelled, or uncertain under ``config.data.uncertain_labels="ignore"``) adds nothing to any
head's loss or gradient, so a row keeps its labelled findings; ``multilabel_targets`` derives
targets and weights from label rows holding 1, 0 and masked (< 0) entries.

Optimizer, as the reference's ``torch.optim.SGD(momentum=0.9, weight_decay=0)``
with ``CosineAnnealingLR(max_iter, eta_min=0)``: ``buf = 0.9 * buf + grad``,
``param -= lr * buf`` with ``lr = grid_lr * global_batch / 256 * cosine``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
LAYOUTS = ((1, False), (1, True), (4, False), (4, True))  # (n_last_blocks, avgpool), the reference's order
MOMENTUM = 0.9
INIT_STD = 0.01
_HIGHEST = jax.lax.Precision.HIGHEST  # keep float32 matmuls on GPUs that would default to TF32


def layout_key(n_blocks: int, avgpool: bool) -> str:
    return f"blocks{n_blocks}_avgpool{avgpool}"


def head_names(learning_rates: Sequence[float] = LR_GRID) -> list[str]:
    """Names of the heads in the order of every (52, ...) output: layouts as ``LAYOUTS``, then lrs."""
    return [f"{layout_key(n, a)}_lr{lr:g}" for n, a in LAYOUTS for lr in learning_rates]


def scale_learning_rates(learning_rates: Sequence[float], global_batch: int) -> np.ndarray:
    """The reference's linear rule: the grid is given for a global batch of 256."""
    return np.asarray(learning_rates, np.float64) * global_batch / 256.0


def cosine_factor(step: int, total_steps: int) -> float:
    """The lr multiplier of ``CosineAnnealingLR(T_max=total_steps, eta_min=0)`` for optimizer step
    ``step`` (0-based): 1 at step 0, 0 at ``total_steps``, held at 0 beyond (torch's would rise again).

    Computed on the host from the loop's integer step: a jnp version would cost several eager
    dispatches per step, comparable to the fused step itself on small probes.
    """
    t = min(max(int(step), 0), total_steps) / max(int(total_steps), 1)
    return 0.5 * (1.0 + math.cos(math.pi * t))


# ---------------------------------------------------------------- features


def probe_features(last_blocks_norm: Sequence[jax.Array], num_register_tokens: int) -> dict:
    """The pieces every layout's input is built from, computed once per batch.

    ``last_blocks_norm``: outputs of the backbone's last blocks (at least 4),
    each ``(B, 1 + R + N, D)`` after the final norm, oldest first. Returns
    ``cls4`` ``(B, 4, D)``: the CLS tokens of the last 4 blocks in block order,
    and ``patch_mean`` ``(B, D)``: the mean of the LAST block's patch tokens,
    registers excluded (as the reference's ``get_intermediate_layers`` drops
    them before ``create_linear_input`` averages). Both float32.
    """
    blocks = tuple(last_blocks_norm)
    if len(blocks) < 4:
        raise ValueError(f"the linear probe needs the last 4 blocks' outputs; got {len(blocks)} "
                         "(call the backbone with n_last_blocks=4).")
    first_patch = 1 + num_register_tokens
    if blocks[-1].shape[1] <= first_patch:
        raise ValueError(f"tokens of shape {blocks[-1].shape} hold no patch tokens after the CLS token and "
                         f"{num_register_tokens} registers; check num_register_tokens.")
    cls4 = jnp.stack([b[:, 0].astype(jnp.float32) for b in blocks[-4:]], axis=1)
    patch_mean = jnp.mean(blocks[-1][:, first_patch:].astype(jnp.float32), axis=1)
    return {"cls4": cls4, "patch_mean": patch_mean}


def linear_input(features: dict, n_blocks: int, avgpool: bool) -> jax.Array:
    """One layout's ``(B, (n + avgpool) * D)`` input: concat of the last n CLS tokens [+ patch mean]."""
    cls = features["cls4"][:, 4 - n_blocks:]
    x = cls.reshape(cls.shape[0], -1)
    if avgpool:
        x = jnp.concatenate([x, features["patch_mean"]], axis=-1)
    return x


# ---------------------------------------------------------------- state


class ProbeState(flax.struct.PyTreeNode):
    """All 52 heads. ``params``/``momentum``: ``{layout_key: {"w": (L, F, C), "b": (L, C)}}``;
    ``lrs``: the L grid lrs already scaled by global_batch / 256; ``step``: optimizer steps taken."""

    params: dict
    momentum: dict
    lrs: jax.Array
    step: jax.Array


@partial(jax.jit, static_argnames=("dim", "num_classes", "n_lr"))
def _init_params(rng: jax.Array, dim: int, num_classes: int, n_lr: int) -> dict:
    # One draw for all layouts, cut into their widths: every random op is a sizeable program for
    # XLA to compile, and four of them made init slower than training a small probe.
    widths = [(n + int(avgpool)) * dim for n, avgpool in LAYOUTS]
    w_all = INIT_STD * jax.random.normal(rng, (n_lr, sum(widths), num_classes), jnp.float32)
    params, start = {}, 0
    for (n, avgpool), width in zip(LAYOUTS, widths):
        params[layout_key(n, avgpool)] = {"w": w_all[:, start:start + width],
                                          "b": jnp.zeros((n_lr, num_classes), jnp.float32)}
        start += width
    return params


def init_state(rng: jax.Array, dim: int, num_classes: int, global_batch: int,
               learning_rates: Sequence[float] = LR_GRID) -> ProbeState:
    """Weights N(0, 0.01), biases and momentum buffers zero (the reference's head init and torch SGD,
    whose first step ``buf = grad`` equals ``0.9 * 0 + grad``). ``global_batch``: images per
    optimizer step over all devices, for the lr scaling."""
    params = _init_params(rng, dim, num_classes, len(learning_rates))
    return ProbeState(
        params=params,
        momentum=jax.tree.map(jnp.zeros_like, params),
        lrs=jnp.asarray(scale_learning_rates(learning_rates, global_batch), jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )


# ---------------------------------------------------------------- shared math (fused and sequential)


def _logits(p: dict, x: jax.Array) -> jax.Array:
    """``(L, B, C)`` logits of L stacked heads on one input ``(B, F)``."""
    return jnp.einsum("bf,lfc->lbc", x, p["w"], precision=_HIGHEST) + p["b"][:, None, :]


def multilabel_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, weights)`` float32 of multi-label rows of 1, 0 and masked (< 0) entries: a masked entry
    gets target 0 and weight 0."""
    labels = np.asarray(labels)
    return (labels > 0).astype(np.float32), (labels >= 0).astype(np.float32)


def _head_losses(logits: jax.Array, labels: jax.Array, multilabel: bool, weights=None) -> jax.Array:
    """``(L,)`` per-head losses, each a mean over the batch.

    Single-label: softmax cross-entropy on integer labels ``(B,)`` (``nn.CrossEntropyLoss``).
    Multi-label: sigmoid BCE on 0/1 targets ``(B, C)``, each entry times its weight ``(B, C)``
    (None = all ones), summed over labels, then averaged over the batch (B rows, masked entries
    included), so the gradient scale per sample matches the cross-entropy the lr grid was
    tuned for (torch's ``BCEWithLogitsLoss`` default would also divide by C).
    """
    if multilabel:
        per_entry = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)[None])
        if weights is not None:
            per_entry = per_entry * weights.astype(jnp.float32)[None]
        per_sample = per_entry.sum(-1)
    else:
        per_sample = optax.softmax_cross_entropy_with_integer_labels(logits, labels[None])
    return per_sample.mean(-1)


def _sgd_momentum(p: dict, m: dict, g: dict, lrs: jax.Array) -> tuple[dict, dict]:
    """torch SGD, momentum 0.9, no dampening, no weight decay; ``lrs`` (L,) one per stacked head."""
    new_m = jax.tree.map(lambda mi, gi: MOMENTUM * mi + gi, m, g)
    new_p = jax.tree.map(lambda pi, mi: pi - lrs.reshape((-1,) + (1,) * (pi.ndim - 1)) * mi, p, new_m)
    return new_p, new_m


# ---------------------------------------------------------------- the fused 52-head step


@partial(jax.jit, static_argnames=("multilabel",), donate_argnums=0)
def train_step(state: ProbeState, features: dict, labels: jax.Array, lr_scale_step, weights=None,
               *, multilabel: bool = False) -> tuple[ProbeState, jax.Array]:
    """One SGD step of all 52 heads; returns the new state and the ``(52,)`` losses before the step.

    ``features``: ``probe_features`` output; ``labels``: ``(B,)`` ints, or ``(B, C)`` 0/1 with
    ``multilabel=True`` and then ``weights`` ``(B, C)``: each entry's weight in the loss (0 = masked;
    None = all ones); ``lr_scale_step``: the schedule factor for this step,
    ``cosine_factor(step, total_steps)`` for the reference schedule. A traced scalar, so any
    schedule (or a resumed run) needs no recompile. ``state`` is donated.
    """
    inputs = {layout_key(n, a): linear_input(features, n, a) for n, a in LAYOUTS}

    def total_loss(params):
        losses = [_head_losses(_logits(params[k], inputs[k]), labels, multilabel, weights) for k in inputs]
        losses = jnp.concatenate(losses)
        return losses.sum(), losses

    (_, losses), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
    params, momentum = _sgd_momentum(state.params, state.momentum, grads, state.lrs * lr_scale_step)
    return state.replace(params=params, momentum=momentum, step=state.step + 1), losses


@jax.jit
def evaluate(state: ProbeState, features: dict) -> jax.Array:
    """``(52, B, C)`` logits of every head, in ``head_names()`` order."""
    return jnp.concatenate([_logits(state.params[layout_key(n, a)], linear_input(features, n, a))
                            for n, a in LAYOUTS])


# ---------------------------------------------------------------- sequential baseline


@partial(jax.jit, static_argnames=("n_blocks", "avgpool", "multilabel"), donate_argnums=0)
def _single_head_step(head: dict, features: dict, labels: jax.Array, lr_scale_step, weights, *,
                      n_blocks: int, avgpool: bool, multilabel: bool):
    """One head's own step with the fused step's functions on a stack of one: compiled once per
    layout and reused by its 13 learning rates."""
    x = linear_input(features, n_blocks, avgpool)

    def loss(params):
        head_loss = _head_losses(_logits(params, x), labels, multilabel, weights)
        return head_loss.sum(), head_loss

    (_, head_loss), grads = jax.value_and_grad(loss, has_aux=True)(head["params"])
    params, momentum = _sgd_momentum(head["params"], head["momentum"], grads, head["lr"] * lr_scale_step)
    return {"params": params, "momentum": momentum, "lr": head["lr"]}, head_loss


def unstack_heads(state: ProbeState) -> list[dict]:
    """The 52 heads as separate ``{"params", "momentum", "lr"}`` (leading axis 1), in name order."""
    heads = []
    for n, a in LAYOUTS:
        key = layout_key(n, a)
        for i in range(state.lrs.shape[0]):
            take = lambda t: t[i:i + 1]  # noqa: E731
            heads.append({"params": jax.tree.map(take, state.params[key]),
                          "momentum": jax.tree.map(take, state.momentum[key]), "lr": state.lrs[i:i + 1]})
    return heads


def stack_heads(heads: Sequence[dict], step) -> ProbeState:
    """Inverse of ``unstack_heads``."""
    n_lr = len(heads) // len(LAYOUTS)
    params, momentum = {}, {}
    for j, (n, a) in enumerate(LAYOUTS):
        group = heads[j * n_lr:(j + 1) * n_lr]
        params[layout_key(n, a)] = jax.tree.map(lambda *t: jnp.concatenate(t), *[h["params"] for h in group])
        momentum[layout_key(n, a)] = jax.tree.map(lambda *t: jnp.concatenate(t), *[h["momentum"] for h in group])
    lrs = jnp.concatenate([h["lr"] for h in heads[:n_lr]])
    return ProbeState(params=params, momentum=momentum, lrs=lrs, step=jnp.asarray(step, jnp.int32))


def sequential_train_step(heads: list[dict], features: dict, labels: jax.Array, lr_scale_step, weights=None,
                          *, multilabel: bool = False) -> tuple[list[dict], jax.Array]:
    """The same step as ``train_step``, one jitted call per head (52 dispatches per round).

    The baseline the fused step is measured against: identical math and the
    same per-layout input construction, but each head is its own program, as
    with 52 separate modules. Returns the new heads and the ``(52,)`` losses.
    """
    n_lr = len(heads) // len(LAYOUTS)
    new_heads, losses = [], []
    for idx, head in enumerate(heads):
        n, a = LAYOUTS[idx // n_lr]
        head, loss = _single_head_step(head, features, labels, lr_scale_step, weights,
                                       n_blocks=n, avgpool=a, multilabel=multilabel)
        new_heads.append(head)
        losses.append(loss)
    return new_heads, jnp.concatenate(losses)
