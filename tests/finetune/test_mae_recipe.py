"""The MAE fine-tuning recipe's parts: soft targets (label smoothing) that reduce to the class-weighted
cross-entropy, Mixup and CutMix whose lambda is the mixed fraction, the global-pool head with its own norm,
and the ``:mae`` variant of configs/finetune.py."""

import jax
import jax.numpy as jnp
import numpy as np

from medjax.finetune.model import FineTuner, mix_batch, mixed_loss, soft_targets, weighted_ce
from medjax.finetune.validate import validate
from medjax.models.vit import VisionTransformer
from tests.helpers import load_config

LOGITS = jax.random.normal(jax.random.PRNGKey(0), (6, 3)) * 2
LABELS = jnp.array([0, 2, 1, -1, 2, 0])
WEIGHTS = jnp.array([0.5, 2.0, 1.0])


def test_soft_targets_without_smoothing_are_the_weighted_ce():
    targets, rows = soft_targets(LABELS, 3, WEIGHTS, 0.0)
    np.testing.assert_allclose(mixed_loss(LOGITS, targets, rows, 1.0), weighted_ce(LOGITS, LABELS, WEIGHTS),
                               rtol=1e-6)
    assert rows[3] == 0 and not targets[3].any()  # an unlabelled row counts for nothing


def test_label_smoothing_mixes_in_the_uniform_cross_entropy():
    eps = 0.1
    targets, rows = soft_targets(LABELS, 3, jnp.ones(3), eps)
    logp = np.asarray(jax.nn.log_softmax(LOGITS))
    keep = np.asarray(LABELS) >= 0
    y = np.asarray(LABELS)[keep]
    want = np.mean((1 - eps) * -logp[keep, y] + eps * -logp[keep].mean(-1))
    np.testing.assert_allclose(mixed_loss(LOGITS, targets, rows, 1.0), want, rtol=1e-6)


def test_mixup_and_cutmix_mix_by_lambda():
    mix = jax.jit(mix_batch, static_argnames=("mixup", "cutmix"))  # one compile instead of op by op
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 1))
    mixed, lam = mix(x, jax.random.PRNGKey(2), mixup=0.8, cutmix=0.0)
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-6)
    for seed in range(5):
        cut, lam = mix(x, jax.random.PRNGKey(seed), mixup=0.0, cutmix=1.0)
        kept = np.mean(np.asarray(cut == x)[..., 0], axis=(1, 2))
        np.testing.assert_allclose(kept, float(lam), atol=1e-6)  # lambda = the area left from each image
    vol = jnp.arange(2 * 8 * 8 * 8, dtype=jnp.float32).reshape(2, 8, 8, 8, 1)
    cut, lam = mix(vol, jax.random.PRNGKey(3), mixup=0.0, cutmix=1.0)  # a box of a volume
    np.testing.assert_allclose(np.mean(np.asarray(cut == vol)[0]), float(lam), atol=1e-6)


def test_global_pool_head_trains_its_own_norm():
    backbone = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, init_values=None)
    tuner = FineTuner(backbone, (("a", 3),), pooling="avg", label_smoothing=0.1, mixup=0.8, cutmix=1.0)
    bparams = backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))["params"]
    params = tuner.init_params(jax.random.PRNGKey(1), bparams)
    assert params["heads"]["a"]["kernel"].shape == (16, 3) and float(jnp.std(params["heads"]["a"]["kernel"])) < 1e-4
    trainable, frozen = tuner.split(params)
    step = tuner.step_fn()
    scale_before = np.asarray(trainable["fc_norm/scale"])  # the step donates its inputs
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 1))
    new, _, m = step(dict(trainable), tuner.init_opt(trainable), frozen, x, jnp.array([[0], [1], [2], [1]]),
                     {"a": jnp.ones(3)}, 1e-2, 0.05, jax.random.PRNGKey(3))
    assert np.isfinite(float(m["loss"]))
    assert not np.allclose(new["fc_norm/scale"], scale_before)


def test_the_mae_variant_is_the_official_recipe():
    c = load_config("finetune", "mae")
    validate(c)
    f = c.finetune
    assert (f.pooling, f.layerwise_decay, f.drop_path_rate, f.label_smoothing, f.mixup, f.cutmix) == (
        "avg", 0.65, 0.1, 0.1, 0.8, 1.0)
    assert (f.base_lr, f.epochs, f.warmup_epochs, f.weight_decay, f.clip_grad) == (5e-4, 100, 5, 0.05, 0.0)
