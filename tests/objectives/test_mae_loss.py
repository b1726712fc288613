"""MAE objective (medjax.objectives.mae): patch layout, random masking and the loss.

Fixtures come from tests/reference/make_mae_fixtures.py (official facebookresearch/mae code).
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.objectives.mae import mae_loss, mae_target, num_visible, patchify, random_masking, unpatchify

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


@functools.lru_cache(maxsize=None)
def fixture(name):
    with np.load(os.path.join(FIXTURES, name)) as f:
        data = dict(f)
    data["config"] = json.loads(str(data["config"]))
    data["x_nhwc"] = np.transpose(data["x_nchw"], (0, 2, 3, 1))
    return data


@pytest.mark.parametrize("name", ["mae_c3.npz", "mae_c1.npz"])
def test_patchify_matches_official(name):
    f = fixture(name)
    patches = patchify(jnp.asarray(f["x_nhwc"]), f["config"]["patch_size"])
    np.testing.assert_array_equal(np.asarray(patches), f["patches"])


def test_patch_vector_order_is_row_column_channel():
    p, c = 2, 3
    img = np.arange(2 * 4 * 6 * c, dtype=np.float32).reshape(2, 4, 6, c)
    patches = np.asarray(patchify(jnp.asarray(img), p))
    assert patches.shape == (2, 2 * 3, p * p * c)
    # Patch (row 1, column 2) is token 1 * 3 + 2; its vector runs over (row, column, channel) in the patch.
    np.testing.assert_array_equal(patches[1, 5], img[1, 2:4, 4:6, :].reshape(-1))


def test_3d_patch_order_and_roundtrip():
    p, c = 2, 2
    vol = np.random.default_rng(0).normal(size=(2, 4, 6, 2, c)).astype(np.float32)
    patches = np.asarray(patchify(jnp.asarray(vol), p))
    assert patches.shape == (2, 2 * 3 * 1, p**3 * c)
    # Token (d=1, h=2, w=0) -> index (1 * 3 + 2) * 1 + 0; vector in (pd, ph, pw, c) order.
    np.testing.assert_array_equal(patches[0, 5], vol[0, 2:4, 4:6, 0:2, :].reshape(-1))
    back = unpatchify(jnp.asarray(patches), p, spatial_dims=3, grid=(2, 3, 1))
    np.testing.assert_array_equal(np.asarray(back), vol)
    cube = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 4, 1)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify(cube, 2), 2, spatial_dims=3)), np.asarray(cube))


def test_unpatchify_inverts_2d_and_checks_shapes():
    x = jnp.asarray(fixture("mae_c3.npz")["x_nhwc"])
    np.testing.assert_array_equal(np.asarray(unpatchify(patchify(x, 8), 8)), np.asarray(x))
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        patchify(jnp.zeros((1, 30, 32, 1)), 8)
    with pytest.raises(ValueError, match="Cannot unpatchify"):
        unpatchify(jnp.zeros((1, 5, 64)), 8)


@pytest.mark.parametrize("name", ["mae_c3.npz", "mae_c1.npz"])
def test_loss_matches_official_with_and_without_norm_pix(name):
    f = fixture(name)
    imgs, pred, mask = jnp.asarray(f["x_nhwc"]), jnp.asarray(f["pred"]), jnp.asarray(f["mask"])
    norm = f["config"]["norm_pix_loss"]
    for flag, want in ((norm, f["loss"]), (not norm, f["loss_other"])):
        got = mae_loss(imgs, pred, mask, flag)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5, err_msg=f"norm_pix_loss={flag}")


def test_norm_pix_target_uses_unbiased_variance():
    imgs = np.random.default_rng(2).normal(3.0, 2.0, size=(2, 8, 8, 1)).astype(np.float32)
    t = np.asarray(patchify(jnp.asarray(imgs), 4), np.float64)
    want = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(mae_target(jnp.asarray(imgs), 4, True)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 8, 8, 8, 1)])
@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_only_counts_removed_patches(shape, norm_pix):
    rng = np.random.default_rng(3)
    imgs = jnp.asarray(rng.normal(size=shape), jnp.float32)
    target = mae_target(imgs, 4, norm_pix)
    mask = jnp.asarray(rng.random(target.shape[:2]) < 0.5, jnp.float32).at[:, 0].set(1.0).at[:, 1].set(0.0)
    keep = (1 - mask)[..., None]
    assert float(mae_loss(imgs, target, mask, norm_pix)) == 0.0
    noisy_kept = target + keep * 5.0  # wrong on kept patches only: still zero
    assert float(mae_loss(imgs, noisy_kept, mask, norm_pix)) == 0.0
    off = target + 1.0  # every element off by one: per-patch MSE 1 on removed patches
    np.testing.assert_allclose(float(mae_loss(imgs, off, mask, norm_pix)), 1.0, rtol=1e-6)
    bf16 = mae_loss(imgs.astype(jnp.bfloat16), off.astype(jnp.bfloat16), mask, norm_pix)
    assert bf16.dtype == jnp.float32


def test_random_masking_matches_official_rule():
    f = fixture("mae_c1.npz")
    noise = jnp.asarray(f["noise"])
    n, length = noise.shape
    x = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32)[None, :, None], (n, length, 3))
    visible, mask, ids_restore, ids_keep = random_masking(x, noise, float(f["mask_ratio"]))
    keep = int(length * (1 - float(f["mask_ratio"])))
    assert visible.shape == (n, keep, 3) and mask.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(mask), f["mask"])
    np.testing.assert_array_equal(np.asarray(ids_restore), f["ids_restore"])
    np.testing.assert_array_equal(np.asarray(mask.sum(1)), [length - keep] * n)
    # The visible tokens are the lowest-noise patches, in increasing-noise order.
    np.testing.assert_array_equal(np.asarray(visible[..., 0]), np.argsort(f["noise"], axis=1)[:, :keep])
    np.testing.assert_array_equal(np.asarray(ids_keep), np.argsort(f["noise"], axis=1)[:, :keep])


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.2, -0.1])
def test_mask_ratio_outside_open_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=f"mask_ratio={ratio} must lie strictly between 0 and 1"):
        num_visible(16, ratio)


def test_mask_ratio_leaving_no_visible_patch_is_rejected():
    assert num_visible(4, 0.75) == 1
    with pytest.raises(ValueError, match=r"mask_ratio=0.999 leaves .* 0 of 4 patches visible.*at most"):
        num_visible(4, 0.999)
    with pytest.raises(ValueError, match="noise has shape"):
        random_masking(jnp.zeros((2, 4, 3)), jnp.zeros((2, 5)), 0.5)


def test_masking_is_jittable_with_static_ratio():
    noise = jax.random.uniform(jax.random.PRNGKey(0), (3, 16))
    fn = jax.jit(lambda x, n: random_masking(x, n, 0.75)[1])
    mask = fn(jnp.zeros((3, 16, 2)), noise)
    np.testing.assert_array_equal(np.asarray(mask.sum(1)), [12, 12, 12])
