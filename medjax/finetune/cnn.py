"""Supervised CNN baselines beside the ViT: ResNet-50 and DenseNet-121 (``config.finetune.baselines``).

Chest X-ray papers compare self-supervised ViTs with these supervised standards. Each
CNN is trained on the same splits, label fractions, seeds, steps, batches and
augmentations (crop, flip, Mixup / CutMix, label smoothing, class weights) as the
ViT, from scratch or from torchvision / timm weights converted by
``medjax.models.convert_cnn`` (``config.finetune.resnet50_weights`` /
``densenet121_weights``; RGB weights folded to the one gray channel). The head is one
linear layer per target on the globally pooled features (the weights' ImageNet
classifier is dropped). BatchNorm normalises with batch statistics in training and
updates its running statistics (torch's momentum 0.1 and unbiased variance), which
evaluation then uses.

The optimiser (``config.finetune.cnn_optimizer``) is SGD with momentum 0.9 (torch's
``SGD``: weight decay added to the gradient, no dampening, no Nesterov), the
torchvision reference recipe's choice for these networks, or AdamW (decoupled decay,
the ViT's betas); lr = ``cnn_base_lr * batch_size / 256`` on the ViT's warm-up + cosine
schedule, weight decay ``cnn_weight_decay`` on conv and linear kernels only (not on
BatchNorm or biases), gradients clipped to ``clip_grad`` as for the ViT.

The tuner keeps the fine-tuning trainer's interface (``split`` / ``merge`` / ``init_opt``
/ ``step_fn`` / ``eval_fn``): the flat "trainable" dict holds the params and, under
``batch_stats/``, the running statistics, which the step replaces by the forward's
updated ones rather than by a gradient step; nothing is frozen.
"""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from medjax import optim
from medjax.checkpoint import content_hash
from medjax.finetune.model import flatten, init_heads, mix_batch, targets_loss, unflatten
from medjax.models.cnns import CNNS, build_cnn, torch_init
from medjax.models.convert_cnn import describe, load_cnn

OPTIMIZERS = ("sgd", "adamw")
SGD_MOMENTUM = 0.9
_STATS = "batch_stats/"


@dataclasses.dataclass(frozen=True)
class CNNTuner:
    """A CNN backbone (``num_classes=0``) + one linear head per target, and its training step."""

    backbone: nn.Module
    num_classes: tuple  # ((target, classes), ...) in target order
    optimizer: str = "sgd"  # sgd | adamw
    clip_grad: float = 3.0
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0

    @property
    def targets(self) -> tuple:
        return tuple(t for t, _ in self.num_classes)

    def init_params(self, rng, variables: dict) -> dict:
        """{"backbone": params, "heads": {target: ...}, "batch_stats": running statistics}."""
        return {"backbone": variables["params"], "batch_stats": variables["batch_stats"],
                "heads": init_heads(rng, self.backbone.num_features, dict(self.num_classes))}

    @staticmethod
    def split(params: dict) -> tuple[dict, dict]:
        """(everything, nothing frozen) as flat dicts."""
        return flatten(params), {}

    @staticmethod
    def merge(trainable: dict, frozen: dict) -> dict:
        return unflatten({**trainable, **frozen})

    @staticmethod
    def count_trainable(trainable: dict) -> int:
        """Parameters the optimiser updates (the running statistics are not parameters)."""
        return int(sum(v.size for k, v in trainable.items() if not k.startswith(_STATS)))

    @staticmethod
    def _params(trainable: dict) -> dict:
        return {k: v for k, v in trainable.items() if not k.startswith(_STATS)}

    def init_opt(self, trainable: dict):
        params = self._params(trainable)
        if self.optimizer == "sgd":
            return jax.tree.map(jnp.zeros_like, params)  # the momentum buffer
        return optim.make_adam(self.adamw_beta1, self.adamw_beta2).init(params)

    def logits(self, trainable: dict, x, *, train: bool):
        """({target: logits}, updated running statistics (flat) or None)."""
        tree = unflatten(trainable)
        variables = {"params": tree["backbone"], "batch_stats": tree["batch_stats"]}
        if train:
            out, state = self.backbone.apply(variables, x, train=True, mutable=["batch_stats"])
            stats = flatten({"batch_stats": state["batch_stats"]})
        else:
            out, stats = self.backbone.apply(variables, x, train=False), None
        f = out["pooled"]
        return {t: f @ h["kernel"] + h["bias"] for t, h in tree["heads"].items()}, stats

    def loss(self, params, stats, x, labels, weights, rng):
        """Sum over targets of each head's (smoothed, mixed) class-weighted CE, as the ViT's; aux: per target
        losses and the updated running statistics."""
        mixing = self.mixup > 0 or self.cutmix > 0
        lam = 1.0
        if mixing:
            x, lam = mix_batch(x, jax.random.fold_in(rng, 1), self.mixup, self.cutmix)
        logits, new_stats = self.logits({**params, **stats}, x, train=True)
        per_target = targets_loss(logits, labels, weights, self.num_classes, self.label_smoothing, mixing, lam)
        return jnp.sum(per_target), (per_target, new_stats)

    def step_fn(self):
        """The jitted step ``(trainable, opt_state, frozen, x, labels, weights, lr, wd, rng) -> (trainable,
        opt_state, metrics)`` of the fine-tuning trainer."""
        adam = optim.make_adam(self.adamw_beta1, self.adamw_beta2)

        def step(trainable, opt_state, frozen, x, labels, weights, lr, wd, rng):
            params = self._params(trainable)
            stats = {k: v for k, v in trainable.items() if k.startswith(_STATS)}
            (loss, (per_target, new_stats)), grads = jax.value_and_grad(self.loss, has_aux=True)(
                params, stats, x, labels, weights, rng)
            norm = optax.global_norm(grads)
            if self.clip_grad > 0:
                scale = jnp.minimum(1.0, self.clip_grad / (norm + 1e-6))
                grads = jax.tree.map(lambda g: g * scale, grads)
            decay = {k: wd if k.endswith("/kernel") else 0.0 for k in params}  # kernels only
            if self.optimizer == "sgd":
                opt_state = {k: SGD_MOMENTUM * opt_state[k] + grads[k] + decay[k] * params[k] for k in params}
                params = {k: params[k] - lr * opt_state[k] for k in params}
            else:
                updates, opt_state = adam.update(grads, opt_state)
                params = {k: params[k] - lr * (updates[k] + decay[k] * params[k]) for k in params}
            return {**params, **new_stats}, opt_state, {"loss": loss, "target_losses": per_target, "grad_norm": norm}

        return jax.jit(step, donate_argnums=(0, 1))

    def eval_fn(self):
        """Jitted ``(trainable, frozen, x) -> {target: logits}`` with the running statistics."""
        return jax.jit(lambda trainable, frozen, x: self.logits(trainable, x, train=False)[0])


def weights_key(name: str) -> str:
    return f"config.finetune.{name}_weights"


def check_config(f, spatial_dims: int) -> None:
    """One sentence naming the first bad CNN setting."""
    names = [b for b in f.baselines if b in CNNS]
    if names and spatial_dims != 2:
        raise ValueError(f"config.finetune.baselines holds {names[0]!r}, a 2D CNN, but config.model.spatial_dims="
                         f"{spatial_dims} fine-tunes on volumes; leave the CNN baselines out of 3D runs.")
    if f.cnn_optimizer not in OPTIMIZERS:
        raise ValueError(f"config.finetune.cnn_optimizer={f.cnn_optimizer!r} is not valid; choose sgd (momentum "
                         "0.9) or adamw.")
    for key in ("cnn_width", "cnn_depth", "cnn_base_lr"):
        if not f[key] > 0:
            raise ValueError(f"config.finetune.{key}={f[key]!r} must be a positive number.")
    if f.cnn_weight_decay < 0:
        raise ValueError(f"config.finetune.cnn_weight_decay={f.cnn_weight_decay!r} must be 0 or positive.")
    for name in CNNS:
        path = f[f"{name}_weights"]
        if path and name not in f.baselines:
            raise ValueError(f"{weights_key(name)} is set but config.finetune.baselines does not hold {name!r}; add "
                             f"it to the baselines or clear the weights path.")
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{weights_key(name)}={path!r} does not exist; give torchvision or timm {name} "
                                    "weights (.pth, .safetensors or .npz), or '' to train from scratch.")


@dataclasses.dataclass(frozen=True)
class CNNStart:
    """A CNN baseline's model and starting point (``variables`` None: torchvision's init drawn per run)."""

    name: str
    backbone: nn.Module
    variables: dict | None
    record: dict

    def variables_for(self, seed: int, size: int) -> dict:
        return self.variables if self.variables is not None else torch_init(self.backbone, seed, size)


def _densenet_last_side(side: int) -> int:
    """The side of DenseNet's last feature map: stem conv and pool (stride 2 each), then three 2x2 average pools."""
    side = (side - 1) // 2 + 1
    side = (side - 1) // 2 + 1
    for _ in range(3):
        side //= 2
    return side


def cnn_start(f, name: str, seed: int, size: int) -> CNNStart:
    """The ``name`` baseline of config ``f`` (config.finetune) for ``size`` px inputs: converted weights or
    random (torch's init)."""
    if name == "densenet121" and _densenet_last_side(size) < 1:
        raise ValueError(f"The fine-tuning input is {size} px, too small for the densenet121 baseline (its last "
                         "dense block would get no pixel); set config.finetune.image_size to 32 or more, or leave "
                         "densenet121 out of config.finetune.baselines.")
    path = f[f"{name}_weights"]
    if not path:
        backbone = build_cnn(name, num_classes=0, in_chans=1, width=f.cnn_width, depth=f.cnn_depth)
        return CNNStart(name, backbone, None, {"kind": "random", "seed": seed, "architecture": describe(backbone)})
    try:
        backbone, variables = load_cnn(path, name, num_classes=0, in_chans=1, width=f.cnn_width, depth=f.cnn_depth)
    except ValueError as e:
        raise ValueError(f"{str(e).rstrip('.')}; {weights_key(name)} needs torchvision or timm {name} weights of "
                         "the size config.finetune.cnn_width and cnn_depth build (1 and 1: the published one), or "
                         "'' to train from scratch.") from None
    record = {"kind": "official", "path": os.path.abspath(path), "content_hash": content_hash(variables),
              "architecture": describe(backbone)}
    return CNNStart(name, backbone, variables, record)


def cnn_tuner(f, backbone, num_classes: tuple) -> CNNTuner:
    return CNNTuner(backbone, num_classes, f.cnn_optimizer, f.clip_grad, f.adamw_beta1, f.adamw_beta2,
                    label_smoothing=f.label_smoothing, mixup=f.mixup, cutmix=f.cutmix)
