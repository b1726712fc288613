"""DINOv2's student/teacher forward and total loss (the official ``ssl_meta_arch``), functionally.

Student: backbone on the masked global crops and on the local crops; DINO head
on every CLS token; iBOT head (shared or separate) on the masked patch tokens.
Teacher: backbone on the unmasked global crops, same heads, centred with the EMA
centre (or Sinkhorn-Knopp). Loss = DINO (crossed global + local terms) + iBOT +
KoLeo on the student's global CLS tokens, each with its configured weight.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from medjax.models.backbone import DTYPES, backbone_from_config
from medjax.models.heads import DINOHead
from medjax.models.vit import VisionTransformer
from medjax.objectives import dino, ibot, koleo


@dataclasses.dataclass(frozen=True)
class SSLModels:
    backbone: VisionTransformer  # the student's (with drop path); the teacher runs it with train=False
    dino_head: DINOHead
    ibot_head: DINOHead | None  # None: iBOT shares the DINO head


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static (trace-time) part of the loss: crop counts, weights, centering."""

    n_global: int
    n_local: int
    dino_weight: float
    ibot_weight: float
    koleo_weight: float
    koleo_group_size: int  # images per KoLeo neighbour search within a crop; 0 = the global batch
    centering: str
    student_temp: float
    center_momentum: float

    @property
    def use_ibot(self) -> bool:
        return self.ibot_weight > 0

    @classmethod
    def from_config(cls, config) -> "LossConfig":
        return cls(
            n_global=config.crops.n_global,
            n_local=config.crops.n_local,
            dino_weight=config.loss.dino_weight,
            ibot_weight=config.loss.ibot_weight,
            koleo_weight=config.loss.koleo_weight,
            koleo_group_size=config.train.batch_size_per_device if config.loss.koleo_batch == "device" else 0,
            centering=config.loss.centering,
            student_temp=config.loss.student_temp,
            center_momentum=config.loss.center_momentum,
        )


def build_models(config) -> SSLModels:
    """The config's backbone (``medjax.models.backbone``) and DINOv2's heads."""
    # The official trainer runs the student on the list of crop batches (NestedTensorBlock), whose drop
    # path computes each residual branch on a random subset of the batch at any rate > 0.
    backbone = backbone_from_config(config).clone(drop_path_batch_subset=True)
    h = config.head
    dtype = DTYPES[config.model.dtype]
    head = dict(hidden_dim=h.hidden_dim, bottleneck_dim=h.bottleneck_dim, nlayers=h.nlayers, dtype=dtype)
    dino_head = DINOHead(out_dim=h.n_prototypes, **head)
    separate = config.loss.ibot_weight > 0 and h.ibot_separate_head
    ibot_head = DINOHead(out_dim=h.ibot_n_prototypes, hidden_dim=h.ibot_hidden_dim, bottleneck_dim=h.ibot_bottleneck_dim,
                         nlayers=h.ibot_nlayers, dtype=dtype) if separate else None
    return SSLModels(backbone, dino_head, ibot_head)


def init_params(models: SSLModels, rng, config) -> dict:
    """Student parameters; the teacher starts as a copy (as the official code)."""
    r_backbone, r_dino, r_ibot = jax.random.split(rng, 3)
    size, chans = config.crops.global_size, config.model.in_chans
    dummy = jnp.zeros((1,) + (size,) * config.model.spatial_dims + (chans,), jnp.float32)
    params = {"backbone": models.backbone.init(r_backbone, dummy)["params"]}
    embed = jnp.zeros((1, models.backbone.embed_dim), jnp.float32)
    params["dino_head"] = models.dino_head.init(r_dino, embed)["params"]
    if models.ibot_head is not None:
        params["ibot_head"] = models.ibot_head.init(r_ibot, embed)["params"]
    return params


def _heads(models: SSLModels, params: dict, cls_rows: jax.Array, patch_rows: jax.Array | None):
    """DINO logits of ``cls_rows`` and iBOT logits of ``patch_rows`` (one head call when shared)."""
    if patch_rows is None:
        return models.dino_head.apply({"params": params["dino_head"]}, cls_rows), None
    if models.ibot_head is None:
        both = models.dino_head.apply({"params": params["dino_head"]}, jnp.concatenate([cls_rows, patch_rows]))
        return both[: cls_rows.shape[0]], both[cls_rows.shape[0]:]
    cls_logits = models.dino_head.apply({"params": params["dino_head"]}, cls_rows)
    patch_logits = models.ibot_head.apply({"params": params["ibot_head"]}, patch_rows)
    return cls_logits, patch_logits


def _gather_masked(patch_tokens: jax.Array, mask_indices: jax.Array) -> jax.Array:
    """(n, N, D) patch tokens -> (M, D) rows at the flat masked positions (padding rows included)."""
    return patch_tokens.reshape(-1, patch_tokens.shape[-1])[mask_indices]


def _entropy(probs: jax.Array) -> jax.Array:
    return -jnp.sum(probs * jnp.log(jnp.clip(probs, 1e-30)), axis=-1)


def teacher_targets(models, teacher, batch, centers, teacher_temp, cfg: LossConfig):
    """Teacher probabilities for the global CLS tokens and the masked patches, and new centres."""
    with jax.named_scope("teacher_backbone"):  # the scopes name the parts in profiles (medjax.bench.step_parts)
        out = models.backbone.apply({"params": teacher["backbone"]}, batch["global_crops"], train=False)
        patches = _gather_masked(out["x_norm_patchtokens"], batch["mask_indices"]) if cfg.use_ibot else None
    with jax.named_scope("teacher_heads"):
        cls_logits, patch_logits = _heads(models, teacher, out["x_norm_clstoken"], patches)
    return _targets(cls_logits, patch_logits, batch, centers, teacher_temp, cfg)


@jax.named_scope("teacher_targets")
def _targets(cls_logits, patch_logits, batch, centers, teacher_temp, cfg: LossConfig):
    """Centred (or Sinkhorn-Knopp) teacher probabilities from the teacher's logits, and the new centres."""
    dino_center, ibot_center = centers
    valid = batch["mask_weights"] > 0 if cfg.use_ibot else None
    if cfg.centering == "softmax":
        cls_probs = dino.softmax_center(cls_logits, dino_center, teacher_temp)
        dino_center = dino.update_center(dino_center, cls_logits, cfg.center_momentum)
        patch_probs = None
        if cfg.use_ibot:
            patch_probs = dino.softmax_center(patch_logits, ibot_center, teacher_temp)
            ibot_center = ibot.update_masked_center(ibot_center, patch_logits, valid, cfg.center_momentum)
    else:
        cls_probs = dino.sinkhorn_knopp(cls_logits, teacher_temp)
        patch_probs = dino.sinkhorn_knopp(patch_logits, teacher_temp, valid=valid) if cfg.use_ibot else None
    targets = jax.lax.stop_gradient((cls_probs, patch_probs))
    return targets, (dino_center, ibot_center)


def ssl_loss(student, teacher, batch, centers, teacher_temp, rng, *, models: SSLModels, cfg: LossConfig):
    """Total DINOv2 loss of the student; returns (loss, (metrics, new_centres))."""
    (cls_probs, patch_probs), new_centers = teacher_targets(models, teacher, batch, centers, teacher_temp, cfg)
    r_global, r_local = jax.random.split(rng)
    masks = batch["masks"] if cfg.use_ibot else None
    with jax.named_scope("student_global"):
        s_global = models.backbone.apply(
            {"params": student["backbone"]}, batch["global_crops"], masks, train=True, rngs={"drop_path": r_global}
        )
        patches = _gather_masked(s_global["x_norm_patchtokens"], batch["mask_indices"]) if cfg.use_ibot else None
    cls_rows = [s_global["x_norm_clstoken"]]
    if cfg.n_local:
        with jax.named_scope("student_local"):
            s_local = models.backbone.apply(
                {"params": student["backbone"]}, batch["local_crops"], train=True, rngs={"drop_path": r_local}
            )
        cls_rows.append(s_local["x_norm_clstoken"])
    with jax.named_scope("student_heads"):
        cls_logits, patch_logits = _heads(models, student, jnp.concatenate(cls_rows), patches)
    with jax.named_scope("losses"):
        return _student_loss(cls_logits, patch_logits, s_global["x_norm_clstoken"], cls_probs, patch_probs,
                             new_centers, batch, cfg)


def _student_loss(cls_logits, patch_logits, global_cls, cls_probs, patch_probs, new_centers, batch,
                  cfg: LossConfig):
    """The weighted DINO + iBOT + KoLeo loss of the student's logits against the teacher's targets."""
    n_global_rows = global_cls.shape[0]
    dino_terms = dino.dino_loss(
        cls_logits[:n_global_rows],
        cls_logits[n_global_rows:],
        cls_probs,
        n_global=cfg.n_global,
        n_local=cfg.n_local,
        student_temperature=cfg.student_temp,
    )
    # Every *_loss metric is its weighted contribution: they add up to ``loss``.
    metrics = {
        "dino_global_loss": cfg.dino_weight * dino_terms["global"],
        "dino_local_loss": cfg.dino_weight * dino_terms["local"],
    }
    loss = metrics["dino_global_loss"] + metrics["dino_local_loss"]
    if cfg.use_ibot:
        ibot_value = ibot.ibot_loss(
            patch_logits, patch_probs, batch["mask_weights"], n_global_rows, student_temperature=cfg.student_temp
        )
        metrics["ibot_loss"] = cfg.ibot_weight * ibot_value
        loss = loss + metrics["ibot_loss"]
    if cfg.koleo_weight > 0:
        koleo_value = koleo.koleo_term(global_cls, cfg.n_global, cfg.koleo_group_size)
        metrics["koleo_loss"] = cfg.koleo_weight * koleo_value
        loss = loss + metrics["koleo_loss"]
    metrics["teacher_entropy"] = jnp.mean(_entropy(cls_probs))
    metrics["teacher_batch_entropy"] = _entropy(jnp.mean(cls_probs, axis=0))
    metrics["loss"] = loss
    return loss, (metrics, new_centers)
