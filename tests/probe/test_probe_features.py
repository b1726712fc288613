"""config.probe.features: "augmented" trains the heads on augmented crops pushed through the backbone at
every step, "precomputed" on the fixed features of the whole slices; the flag must change what is trained."""

import jax
import numpy as np

from medjax import console
from medjax.data.labelled import Split
from medjax.models.backbone import backbone_from_config, dinov2_init
from medjax.probe import trainer
from tests.helpers import load_config, smoke_config


def _setup():
    config = load_config("linear_probe", "smoke")
    model_config = smoke_config(layerscale=0.1)  # at the official 1e-5 a random backbone ignores its input
    config.crops = model_config.crops
    backbone = backbone_from_config(model_config)
    params = dinov2_init(backbone, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    size = model_config.crops.global_size
    splits = {}
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        labels = np.arange(n) % 2
        images = rng.normal(0, 0.3, (n, size, size, 1)).astype(np.float32)
        images[labels == 1, :, : size // 2] += 1.0  # a left-bright class: a flip changes the picture
        splits[split] = Split(images, labels, np.array([f"{split}{i // 2}" for i in range(n)]))
    feats = {s: trainer.embed(backbone, params, split.images, 8) for s, split in splits.items()}
    return config, backbone, params, splits, feats


def _heads(config, backbone, params, splits, feats, features):
    config.probe.features = features
    fit = trainer.fit_and_select(backbone, params, feats, splits, 2, False, config, seed=0, say=console.silent)
    return jax.device_get(fit["state"].params)


def test_augmented_features_differ_and_change_the_heads(monkeypatch):
    config, backbone, params, splits, feats = _setup()
    idx = np.arange(6)
    fixed = trainer._precomputed(feats["train"])(idx, np.random.default_rng(1))
    augmented = trainer._augmented(backbone, params, splits["train"].images, config.crops.mean[0],
                                   config.crops.std[0])(idx, np.random.default_rng(1))
    assert fixed.keys() == augmented.keys()
    for key in fixed:
        assert fixed[key].shape == augmented[key].shape
        assert not np.allclose(fixed[key], augmented[key], atol=1e-3), key  # other pixels, other features
    precomputed = _heads(config, backbone, params, splits, feats, "precomputed")
    trained = _heads(config, backbone, params, splits, feats, "augmented")
    gaps = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), precomputed, trained))
    assert max(gaps) > 1e-4  # the flag changes what the heads learn
    # ... and only through the augmentation: with an identity transform both modes train the same heads.
    monkeypatch.setattr(trainer, "augment", lambda images, rng, mean, std: images)
    identity = _heads(config, backbone, params, splits, feats, "augmented")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), precomputed, identity)
