"""Fine-tuning on synthetic slices, in process: freezing, the two-target heads, the loss, the schedule.

A 3-block backbone on 28 px inputs; target ``bright`` is whether a slice is bright, ``striped``
whether it carries vertical stripes (drawn independently), and each target is labelled on its
own half of the rows only (-1 elsewhere).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.data.views import SingleView
from medjax.models.vit import build_backbone
from medjax.finetune import trainer as finetune
from medjax.finetune.model import FineTuner, class_weights, flatten, is_frozen, weighted_ce

N = 48


def _backbone():
    return build_backbone("vit_tiny", img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=2,
                          num_register_tokens=2, init_values=0.1, drop_path_rate=0.0)


def _init(seed):
    return finetune.random_backbone(_backbone(), jax.random.PRNGKey(seed))  # jitted once per backbone


def _data(seed=0):
    rng = np.random.default_rng(seed)
    bright, striped = rng.integers(0, 2, N), rng.integers(0, 2, N)
    images = rng.uniform(0.0, 0.1, (N, 32, 32)).astype(np.float32) + 0.25 + 0.4 * bright[:, None, None]
    stripes = np.where((np.arange(32) // 4) % 2, 0.15, -0.15).astype(np.float32)
    images += striped[:, None, None] * stripes[None, None, :]
    labels = np.stack([bright, striped], 1)
    labels[N // 2:, 0] = -1  # "bright" is labelled on the first half of the rows only
    labels[:N // 2, 1] = -1  # "striped" on the second half
    return list(images), labels, bright, striped


def _train(tuner, steps=40, freeze_seed=0, lr=3e-3, **kw):
    images, labels, _, _ = _data()
    t = SingleView(28, scale=(0.6, 1.0), flip_p=0.0)
    params = tuner.init_params(jax.random.PRNGKey(1), _init(freeze_seed))
    val_x = t.eval_batch(images)
    out = finetune.train_one(tuner, params, images, labels, val_x, labels, transforms=t,
                             lr=np.full(steps, lr, np.float32), weight_decay=0.05, batch_size=16,
                             eval_every=steps, keep="last", seed=0, balanced=True, eval_batch=N,
                             say=lambda *_: None, **kw)
    return params, out


@pytest.fixture(scope="module")
def tuner_and_fns():
    """Blocks 0-1 and the embeddings frozen; one compiled step shared by the tests."""
    tuner = FineTuner(_backbone(), (("bright", 2), ("striped", 2)), freeze_blocks=2)
    return tuner, (tuner.step_fn(), tuner.eval_fn())


def test_frozen_blocks_are_bit_identical_after_training(tuner_and_fns):
    tuner, fns = tuner_and_fns
    params, out = _train(tuner, steps=6, fns=fns)
    before = {k: np.asarray(v) for k, v in flatten(params).items()}
    after = {k: np.asarray(v) for k, v in {**out["trainable"], **out["frozen"]}.items()}
    assert set(before) == set(after)
    frozen = [k for k in before if is_frozen(k, 2)]
    assert {k.split("/")[1] for k in frozen} == {"patch_embed", "pos_embed", "cls_token", "register_tokens",
                                                 "mask_token", "blocks_0", "blocks_1"}
    for k in frozen:
        assert after[k].tobytes() == before[k].tobytes(), k
    changed = [k for k in before if k not in frozen and not np.array_equal(after[k], before[k])]
    trained = [k for k in before if k not in frozen]
    assert any("blocks_2/" in k for k in changed) and "backbone/norm/scale" in changed
    assert len(changed) == len(trained)  # everything else moved


def test_full_fine_tuning_trains_the_embeddings_too():
    tuner = FineTuner(_backbone(), (("bright", 2), ("striped", 2)), freeze_blocks=0)
    trainable, frozen = tuner.split(tuner.init_params(jax.random.PRNGKey(0), _init(0)))
    assert list(frozen) == ["backbone/mask_token"]  # unused by classification
    assert "backbone/patch_embed/proj/kernel" in trainable and "backbone/blocks_0/attn/qkv/kernel" in trainable
    with pytest.raises(ValueError, match="freeze_blocks=4 must lie in"):
        FineTuner(_backbone(), (("bright", 2),), freeze_blocks=4)


def test_each_head_learns_its_own_target_from_its_own_rows(tuner_and_fns):
    tuner, fns = tuner_and_fns
    _, out = _train(tuner, steps=60, fns=fns)
    images, _, bright, striped = _data(seed=1)  # fresh slices, fully labelled
    x = SingleView(28).eval_batch(images)
    logits = finetune.predict(fns[1], out["trainable"], out["frozen"], x, N)
    acc_bright = np.mean(logits["bright"].argmax(-1) == bright)
    acc_striped = np.mean(logits["striped"].argmax(-1) == striped)
    assert acc_bright > 0.9 and acc_striped > 0.9, (acc_bright, acc_striped)
    # and not each other's: a head's predictions say nothing about the other target
    assert abs(np.mean(logits["bright"].argmax(-1) == striped) - 0.5) < 0.3


def test_a_head_gets_no_gradient_from_rows_not_labelled_for_it(tuner_and_fns):
    tuner, (step, eval_fn) = tuner_and_fns
    params = tuner.init_params(jax.random.PRNGKey(0), _init(0))
    images, labels, _, _ = _data()
    x = SingleView(28).eval_batch(images)
    w = {t: jnp.ones(2) for t in ("bright", "striped")}
    # Per target, the loss is the weighted CE over its own labelled rows: noise in the other rows
    # changes nothing.
    trainable, frozen = tuner.split(params)
    noisy = x.copy()
    noisy[N // 2:] = np.random.default_rng(0).normal(size=noisy[N // 2:].shape)  # rows unlabelled for "bright"
    clean_logits, noisy_logits = eval_fn(trainable, frozen, x), eval_fn(trainable, frozen, noisy)
    y = jnp.asarray(labels[:, 0])
    assert float(weighted_ce(clean_logits["bright"], y, w["bright"])) == float(
        weighted_ce(noisy_logits["bright"], y, w["bright"]))
    # One optimiser step on rows labelled for "bright" only (no weight decay): the "striped" head
    # gets a zero gradient, so Adam leaves it exactly where it was.
    trainable, frozen = tuner.split(params)
    before = {k: np.asarray(v) for k, v in trainable.items()}
    after, _, m = step(jax.tree.map(jnp.array, trainable), tuner.init_opt(trainable), frozen, x[:16],
                       jnp.asarray(labels[:16]), w, np.float32(1e-2), 0.0, jax.random.PRNGKey(0))
    assert np.isfinite(float(m["loss"])) and float(m["target_losses"][1]) == 0.0
    for k in ("heads/striped/kernel", "heads/striped/bias"):
        np.testing.assert_array_equal(np.asarray(after[k]), before[k])
    assert not np.array_equal(np.asarray(after["heads/bright/kernel"]), before["heads/bright/kernel"])


def test_class_weighted_cross_entropy_is_the_weighted_mean():
    labels = np.array([0, 0, 0, 1, -1, 2, 0, 1])
    w = class_weights(labels, 4, balanced=True)
    counts = np.array([4, 2, 1, 0])
    raw = np.where(counts > 0, 1 / np.maximum(counts, 1), 0)
    np.testing.assert_allclose(w, raw / raw[:3].mean(), rtol=1e-6)
    assert w[3] == 0 and np.all(class_weights(labels, 4, balanced=False) == 1)
    logits = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    keep = labels >= 0
    wy = w[labels[keep]]
    want = -(wy * logp[keep, labels[keep]]).sum() / wy.sum()
    got = float(weighted_ce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w)))
    assert got == pytest.approx(want, rel=1e-5)


def test_layerwise_lr_decay_of_the_trainable_parameters():
    tuner = FineTuner(_backbone(), (("bright", 2),), freeze_blocks=1, layerwise_decay=0.5)
    params = tuner.init_params(jax.random.PRNGKey(0), _init(0))
    trainable, _ = tuner.split(params)
    rules = tuner.rules(trainable)
    assert rules.lr_mult["heads/bright/kernel"] == 1.0 and rules.lr_mult["backbone/norm/scale"] == 1.0
    assert rules.lr_mult["backbone/blocks_2/attn/qkv/kernel"] == 0.5  # depth 3: 0.5 ** (4 - 3)
    assert rules.lr_mult["backbone/blocks_1/attn/qkv/kernel"] == 0.25
    assert rules.wd_mult["backbone/blocks_1/attn/qkv/bias"] == 0.0 and rules.wd_mult["heads/bright/kernel"] == 1.0
