"""The 3D backbone (``spatial_dims=3``): cubic patch embedding, token order, 3D positional embedding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.pos_embed import bicubic_matrix, interpolate_pos_embed_3d
from medjax.models.vit import PatchEmbed, VisionTransformer


def test_patch_embedding_is_cubic_and_flattens_tokens_in_dhw_order():
    p, grid = 2, (2, 3, 4)  # a non-cubic grid: a wrong flattening order cannot pass
    values = np.arange(np.prod(grid), dtype=np.float32).reshape(grid) + 1.0
    volume = np.kron(values, np.ones((p, p, p), np.float32))[None, ..., None]  # patch n filled with n + 1
    embed = PatchEmbed(p, 3, spatial_dims=3)
    params = embed.init(jax.random.PRNGKey(0), jnp.asarray(volume))["params"]
    assert params["proj"]["kernel"].shape == (p, p, p, 1, 3)
    mean_kernel = {"proj": {"kernel": jnp.full((p, p, p, 1, 3), 1.0 / p**3), "bias": jnp.zeros(3)}}
    tokens = np.asarray(embed.apply({"params": mean_kernel}, jnp.asarray(volume)))
    assert tokens.shape == (1, 24, 3)
    np.testing.assert_allclose(tokens[0, :, 0], values.reshape(-1), rtol=1e-6)


def test_3d_backbone_shapes_masks_and_other_grids():
    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_register_tokens=2,
                              spatial_dims=3)
    x = jnp.ones((2, 8, 8, 8, 1))
    params = model.init(jax.random.PRNGKey(0), x)
    assert params["params"]["pos_embed"].shape == (1, 1 + 2**3, 16)
    assert params["params"]["patch_embed"]["proj"]["kernel"].shape == (4, 4, 4, 1, 16)
    masks = jnp.zeros((2, 8), bool).at[0, 3].set(True)
    out = model.apply(params, x, masks)
    assert out["x_norm_patchtokens"].shape == (2, 8, 16) and out["x_norm_regtokens"].shape == (2, 2, 16)
    assert np.all(np.isfinite(np.asarray(out["x_norm_clstoken"])))
    other = jax.eval_shape(lambda: model.apply(params, jnp.ones((1, 8, 12, 16, 1))))  # 2 x 3 x 4 patches
    assert other["x_norm_patchtokens"].shape == (1, 24, 16)
    with pytest.raises(ValueError, match="spatial_dims=3"):
        model.apply(params, jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="spatial_dims=4"):
        VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, spatial_dims=4).init(
            jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("antialias, offset", [(True, 0.0), (False, 0.1)])
def test_3d_pos_embed_identity_shape_and_axis_order(antialias, offset):
    m, dim = 4, 5
    rng = np.random.default_rng(0)
    pe = jnp.asarray(rng.standard_normal((1, 1 + m**3, dim)), jnp.float32)
    assert interpolate_pos_embed_3d(pe, (m, m, m), antialias=antialias, offset=offset) is pe
    out = interpolate_pos_embed_3d(pe, (2, 3, 6), antialias=antialias, offset=offset)
    assert out.shape == (1, 1 + 2 * 3 * 6, dim)
    np.testing.assert_array_equal(out[:, 0], pe[:, 0])  # CLS kept
    # A field that varies along one axis only resizes as the 1-D rule along that axis: D, H, W order.
    f = rng.standard_normal((m, dim)).astype(np.float32)
    for axis, g in zip(range(3), (2, 3, 6)):
        field = np.broadcast_to(np.expand_dims(f, tuple(a for a in range(3) if a != axis)), (m, m, m, dim))
        pe1 = jnp.asarray(np.concatenate([np.zeros((1, 1, dim), np.float32), field.reshape(1, -1, dim)], axis=1))
        got = np.asarray(interpolate_pos_embed_3d(pe1, (2, 3, 6), antialias=antialias, offset=offset))
        got = got[0, 1:].reshape(2, 3, 6, dim)
        scale = (g + offset) / m if offset else None
        w = bicubic_matrix(m, g, antialias=antialias, scale_factor=scale)
        want = np.expand_dims(w @ f, tuple(a for a in range(3) if a != axis))
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-5)


def test_3d_pos_embed_rejects_non_cubic_tables():
    with pytest.raises(ValueError, match="not a cubic grid"):
        interpolate_pos_embed_3d(jnp.zeros((1, 1 + 10, 4)), (2, 2, 2), antialias=False, offset=0.0)
