"""MAE trainer parts: the official lr schedule, the optimizer's weight-decay and frozen groups, the config
check's sentences, and single-view batches that are a pure function of seed and position."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.mae.batches import make_dataset, view_transform
from medjax.mae.trainer import make_optimizer
from medjax.mae.validate import validate, visible_patches
from medjax.models.backbone import backbone_from_config, mae_from_config
from medjax.schedules import HalfCycleCosine
from tests.helpers import load_config
from tests.phantom import DemoSlices

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "mae_lr_schedule.npz")


def test_lr_matches_the_official_per_iteration_schedule():
    z = np.load(FIXTURE)
    ipe = int(z["iters_per_epoch"])
    lr = HalfCycleCosine(float(z["blr"]) * int(z["batch"]) / 256, float(z["min_lr"]), int(z["epochs"]) * ipe,
                         int(z["warmup_epochs"]) * ipe)
    np.testing.assert_allclose(np.asarray(lr(np.arange(len(z["lr"])))), z["lr"], rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("variant", ["", "demo", "demo3d", "smoke", "bench", "vitb16", "vitl16", "vith14"])
def test_every_variant_is_valid_and_its_encoder_is_the_backbone(variant):
    config = load_config("mae", variant)
    validate(config)
    model, backbone = mae_from_config(config), backbone_from_config(config)
    assert (model.embed_dim, model.depth, model.num_heads, model.patch_size, model.img_size) == (
        backbone.embed_dim, backbone.depth, backbone.num_heads, backbone.patch_size, backbone.img_size)
    assert model.encoder_model().spatial_dims == backbone.spatial_dims == config.model.spatial_dims


def test_official_recipe_values():
    c = load_config("mae")
    assert (c.model.arch, c.model.patch_size, c.crops.global_size, c.mae.mask_ratio, c.mae.norm_pix_loss) == (
        "vit_base", 16, 224, 0.75, True)
    assert (c.decoder.embed_dim, c.decoder.depth, c.decoder.num_heads) == (512, 8, 16)
    assert (c.optim.base_lr, c.optim.adamw_beta1, c.optim.adamw_beta2, c.optim.weight_decay) == (1.5e-4, 0.9, 0.95, 0.05)
    assert (c.optim.epochs, c.optim.warmup_epochs, c.optim.min_lr, c.crops.scale) == (800, 40, 0.0, (0.2, 1.0))
    assert load_config("mae", "vith14").model.arch == "vit_huge" and load_config("mae", "vith14").model.patch_size == 14


def test_weight_decay_spares_vectors_and_frozen_tables_never_move():
    config = load_config("mae", "smoke")
    model = mae_from_config(config)
    params = jax.jit(lambda k: model.init({"params": k, "masking": k}, jnp.zeros((1, 28, 28, 1))))(
        jax.random.PRNGKey(0))["params"]
    lr = HalfCycleCosine(0.1, 0.1, 10, 0)
    tx = make_optimizer(config, lr)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)  # zero gradients: only weight decay moves a parameter
    wd = config.optim.weight_decay
    np.testing.assert_allclose(updates["decoder_embed"]["kernel"], -0.1 * wd * params["decoder_embed"]["kernel"],
                               rtol=1e-6)
    np.testing.assert_allclose(updates["encoder"]["cls_token"], -0.1 * wd * params["encoder"]["cls_token"], rtol=1e-6)
    for leaf in (updates["decoder_embed"]["bias"], updates["encoder"]["norm"]["scale"],
                 updates["encoder"]["pos_embed"], updates["decoder_pos_embed"]):
        assert not np.any(np.asarray(leaf))
    grads = jax.tree.map(jnp.ones_like, params)  # even with a gradient, the sin-cos tables stay fixed
    updates, _ = tx.update(grads, state, params)
    assert not np.any(np.asarray(updates["encoder"]["pos_embed"])) and np.any(np.asarray(updates["mask_token"]))


@pytest.mark.parametrize("key, value, message", [
    ("mae.mask_ratio", 0.0, "config.mae.mask_ratio=0.0 must lie strictly between 0 and 1"),
    ("mae.mask_ratio", 1.0, "config.mae.mask_ratio=1.0 must lie strictly between 0 and 1"),
    ("mae.mask_ratio", 0.99, "config.mae.mask_ratio=0.99 leaves no visible patch of the 16 per image"),
    ("crops.global_size", 30, "config.crops.global_size=30 is not divisible by config.model.patch_size=7"),
    ("decoder.num_heads", 3, "config.decoder.embed_dim=16 is not divisible by config.decoder.num_heads=3"),
])
def test_bad_values_are_one_sentence(key, value, message):
    config = load_config("mae", "smoke")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message) as exc:
        validate(config)
    assert "\n" not in str(exc.value)


def test_visible_patches_follow_the_official_rounding():
    config = load_config("mae", "demo")
    assert visible_patches(config) == int(64 * 0.25) == 16
    config.mae.mask_ratio = 0.7  # int(64 * 0.3) = 19, as the official int(L * (1 - mask_ratio))
    assert visible_patches(config) == 19


def test_views_are_a_function_of_seed_and_position():
    config = load_config("mae", "smoke")
    source = DemoSlices(num_patients=3, slices_per_patient=4, size=40)
    transform = view_transform(config)
    first = [b["images"] for b, _ in zip(make_dataset(source, transform, batch_size=4, seed=3), range(3))]
    again = [b["images"] for b, _ in zip(make_dataset(source, transform, batch_size=4, seed=3), range(3))]
    other = next(iter(make_dataset(source, transform, batch_size=4, seed=4)))["images"]
    assert first[0].shape == (4, 28, 28, 1) and first[0].dtype == np.float32
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other)
    halves = [next(iter(make_dataset(source, transform, batch_size=2, seed=3, process_index=p, process_count=2)))
              for p in (0, 1)]  # two processes draw disjoint records of one stream
    assert not np.array_equal(halves[0]["images"], halves[1]["images"])


def test_continued_pretraining_starts_from_official_weights(tmp_path):
    """config.model.init_weights: the official tiny MAE of the parity fixture (32 px, patch 4, 48 wide) is
    the starting point of the whole model, encoder and decoder."""
    from medjax import sharding
    from medjax.mae.trainer import init_sharded_state, start_from_official
    from medjax.models.convert_mae import load_official_mae

    z = np.load(os.path.join(os.path.dirname(FIXTURE), "mae_c1.npz"))
    weights = tmp_path / "mae.npz"
    np.savez(weights, **{k[3:]: z[k] for k in z.files if k.startswith("sd/")})
    config = load_config("mae", "smoke")
    config.model.embed_dim, config.model.depth, config.model.num_heads, config.model.patch_size = 48, 2, 4, 4
    config.crops.global_size = 32
    config.decoder.embed_dim, config.decoder.depth, config.decoder.num_heads = 32, 2, 4
    validate(config)
    model = mae_from_config(config)
    mesh = sharding.make_mesh()
    tx = make_optimizer(config, HalfCycleCosine(1e-3, 0.0, 10, 0))
    state, shardings = init_sharded_state(model, config, jax.random.PRNGKey(0), tx, mesh)
    state = start_from_official(state, shardings, model, str(weights))
    _, want = load_official_mae(str(weights), model=model)
    for got, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    with pytest.raises(FileNotFoundError, match="config.model.init_weights='nope.npz' does not exist"):
        start_from_official(state, shardings, model, "nope.npz")
