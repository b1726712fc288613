"""The MAE model (medjax.models.mae), its sin-cos tables and official-weight loading (convert_mae).

Parity fixtures come from tests/reference/make_mae_fixtures.py (official facebookresearch/mae):
tiny models with 3 channels (patch 8, norm_pix_loss False) and 1 channel (patch 4, norm_pix_loss
True), the official outputs for a fixed per-patch noise, and official 2D sin-cos tables.
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from medjax.models import official_io
from medjax.models.convert import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from medjax.models.convert_mae import export_mae_state_dict, load_official_mae
from medjax.models.mae import MAE_MODELS, MaskedAutoencoderViT, build_mae, trainable_mask
from medjax.models.sincos import get_2d_sincos_pos_embed, get_3d_sincos_pos_embed
from medjax.objectives.mae import mae_loss

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
PRED_TOL = 1e-4  # observed <= 2e-6 on predictions of magnitude ~4
TINY = dict(img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=4, decoder_embed_dim=36, decoder_depth=1,
            decoder_num_heads=4)


@functools.lru_cache(maxsize=None)
def fixture(name):
    with np.load(os.path.join(FIXTURES, name)) as f:
        data = dict(f)
    if "config" in data:
        data["config"] = json.loads(str(data["config"]))
        data["sd"] = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
        data["x_nhwc"] = np.transpose(data["x_nchw"], (0, 2, 3, 1))
    return data


def sincos(dim, grid, spatial_dims=2):
    """The float32 table (with CLS row) the model stores."""
    table = get_2d_sincos_pos_embed if spatial_dims == 2 else get_3d_sincos_pos_embed
    return table(dim, grid, cls_token=True).astype(np.float32)


def heads(cfg):
    return dict(num_heads=cfg["num_heads"], decoder_num_heads=cfg["decoder_num_heads"])


@functools.lru_cache(maxsize=None)
def loaded(name):
    f = fixture(name)
    return load_official_mae(dict(f["sd"]), norm_pix_loss=f["config"]["norm_pix_loss"], **heads(f["config"]))


def run(model, params, x, noise, mask_ratio):
    fn = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n, mask_ratio=mask_ratio))
    return fn(params, jnp.asarray(x), jnp.asarray(noise))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- sin-cos tables ---------------------------------------------------------------------------


def test_2d_sincos_equals_official():
    tables = fixture("mae_sincos.npz")
    for key, want in tables.items():
        dim, rest = key.split("x")
        grid, cls = int(rest.split("_")[0]), rest.endswith("_cls")
        np.testing.assert_array_equal(get_2d_sincos_pos_embed(int(dim), grid, cls_token=cls), want, err_msg=key)
    for name in ("mae_c3.npz", "mae_c1.npz"):  # the fixed tables inside the official models
        f = fixture(name)
        grid = f["config"]["img_size"] // f["config"]["patch_size"]
        for key in ("pos_embed", "decoder_pos_embed"):
            table = f["sd"][key][0]
            np.testing.assert_array_equal(sincos(table.shape[1], grid), table)


def test_3d_sincos_layout():
    grid, dim = (2, 3, 4), 36
    table = get_3d_sincos_pos_embed(dim, grid, cls_token=True)
    assert table.shape == (1 + 24, dim)
    np.testing.assert_array_equal(table[0], 0.0)
    rows = table[1:]
    assert len({r.tobytes() for r in rows}) == 24  # every position distinct
    cube, t = rows.reshape(2, 3, 4, dim), dim // 3  # tokens in (D, H, W) order; thirds encode W, H, D
    np.testing.assert_array_equal(cube[..., t:], np.broadcast_to(cube[:, :, :1, t:], (2, 3, 4, 2 * t)))
    np.testing.assert_array_equal(cube[..., 2 * t :], np.broadcast_to(cube[:, :1, :1, 2 * t :], (2, 3, 4, t)))
    np.testing.assert_array_equal(cube[0, 0, :, :t], get_2d_sincos_pos_embed(2 * t, (1, 4))[:, :t])
    np.testing.assert_array_equal(get_3d_sincos_pos_embed(dim, 2), get_3d_sincos_pos_embed(dim, (2, 2, 2)))
    with pytest.raises(ValueError, match="divisible by 6.*got 32; use e.g. 30 or 36"):
        get_3d_sincos_pos_embed(32, 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(30, 2)


# --- parity with the official model -----------------------------------------------------------


@pytest.mark.parametrize("name", ["mae_c3.npz", "mae_c1.npz"])
def test_forward_matches_official(name):
    f = fixture(name)
    model, params = loaded(name)
    assert (model.in_chans, model.patch_size, model.norm_pix_loss) == (
        f["config"]["in_chans"], f["config"]["patch_size"], f["config"]["norm_pix_loss"])
    out = run(model, params, f["x_nhwc"], f["noise"], float(f["mask_ratio"]))
    np.testing.assert_array_equal(np.asarray(out["mask"]), f["mask"])
    np.testing.assert_array_equal(np.asarray(out["ids_restore"]), f["ids_restore"])
    assert max_diff(out["latent"], f["latent"]) < PRED_TOL
    assert out["pred"].shape == f["pred"].shape and max_diff(out["pred"], f["pred"]) < PRED_TOL
    assert out["loss"].dtype == jnp.float32
    np.testing.assert_allclose(float(out["loss"]), float(f["loss"]), rtol=1e-5)
    other = mae_loss(jnp.asarray(f["x_nhwc"]), out["pred"], out["mask"], not model.norm_pix_loss)
    np.testing.assert_allclose(float(other), float(f["loss_other"]), rtol=1e-5)


def test_weights_load_the_same_from_npz_safetensors_and_checkpoint_dicts(tmp_path):
    f = fixture("mae_c3.npz")
    _, want = loaded("mae_c3.npz")
    npz, st = str(tmp_path / "mae.npz"), str(tmp_path / "mae.safetensors")
    official_io.write_weights(npz, f["sd"])
    official_io.write_weights(st, f["sd"])
    checkpoint = {"model": {f"module.{k}": v for k, v in f["sd"].items()}, "epoch": 3}
    flat_want = traverse_util.flatten_dict(want)
    for source in (npz, st, checkpoint):
        _, got = load_official_mae(source, **heads(f["config"]))
        got = traverse_util.flatten_dict(got)
        assert set(got) == set(flat_want)
        for k in got:
            np.testing.assert_array_equal(got[k], flat_want[k], err_msg=str(k))
    exported = export_mae_state_dict(want)
    assert set(exported) == set(f["sd"])
    for k, v in exported.items():
        np.testing.assert_array_equal(v, f["sd"][k], err_msg=k)


def test_encoder_only_weights_start_a_fresh_decoder():
    f = fixture("mae_encoder_only.npz")
    released = {"model": dict(f["sd"])}  # the layout of mae_pretrain_vit_*.pth
    assert not any(k.startswith("decoder") or k == "mask_token" for k in f["sd"])
    with pytest.warns(UserWarning, match="only the MAE encoder.*decoder starts from a fresh"):
        model, params = load_official_mae(released, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
                                          decoder_num_heads=4)
    assert params["decoder_pred"]["kernel"].shape == (32, 8 * 8 * 3)
    np.testing.assert_array_equal(params["decoder_pred"]["bias"], 0.0)
    np.testing.assert_array_equal(params["decoder_pos_embed"][0], sincos(32, 4))
    _, full = loaded("mae_c3.npz")
    for k, v in traverse_util.flatten_dict(params["encoder"]).items():
        np.testing.assert_array_equal(v, traverse_util.flatten_dict(full["encoder"])[k], err_msg=str(k))
    encode = jax.jit(lambda p, x, n: model.apply({"params": p}, x, n, 0.75, method=model.forward_encoder))
    latent, mask, _ = encode(params, jnp.asarray(f["x_nhwc"]), jnp.asarray(f["noise"]))
    np.testing.assert_array_equal(np.asarray(mask), f["mask"])
    assert max_diff(latent, f["latent"]) < PRED_TOL


def test_gray_model_from_rgb_weights_folds_encoder_and_decoder():
    f = fixture("mae_c3.npz")
    rgb_model, rgb_params = loaded("mae_c3.npz")
    gray_model, gray_params = load_official_mae(dict(f["sd"]), in_chans=1, **heads(f["config"]))
    gray = np.random.default_rng(5).uniform(0.0, 1.0, size=(2, 32, 32, 1)).astype(np.float32)
    rgb_in = (gray - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    gray_in = (gray - GRAY_MEAN) / GRAY_STD
    rgb = run(rgb_model, rgb_params, rgb_in, f["noise"], 0.75)
    out = run(gray_model, gray_params, gray_in, f["noise"], 0.75)
    assert max_diff(out["latent"], rgb["latent"]) < 1e-4
    p = np.asarray(rgb["pred"]).reshape(2, 16, 64, 3)  # (p, q, c) order: channel last
    in_gray_units = (p * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN) - GRAY_MEAN) / GRAY_STD
    assert max_diff(out["pred"], in_gray_units.mean(-1)) < 1e-4


def test_other_image_size_regenerates_sincos_tables():
    f = fixture("mae_c3.npz")
    model, params = load_official_mae(dict(f["sd"]), img_size=48, **heads(f["config"]))
    np.testing.assert_array_equal(params["encoder"]["pos_embed"][0], sincos(48, 6))
    np.testing.assert_array_equal(params["decoder_pos_embed"][0], sincos(32, 6))
    out = jax.eval_shape(lambda: model.apply({"params": params}, jnp.zeros((1, 48, 48, 3)), noise=jnp.zeros((1, 36))))
    assert out["pred"].shape == (1, 36, 192)


def test_weights_that_disagree_with_the_configuration_are_rejected():
    f = fixture("mae_c3.npz")
    sd = dict(f["sd"])
    with pytest.raises(ValueError, match=r"'patch_embed.proj.weight' has shape \(48, 3, 8, 8\) but the MAE "
                                         r"configuration expects \(48, 2, 8, 8\); drop or correct in_chans"):
        load_official_mae(sd, in_chans=2, **heads(f["config"]))
    other = MaskedAutoencoderViT(**dict(f["config"], decoder_embed_dim=64, norm_pix_loss=False))
    with pytest.raises(ValueError, match=r"'mask_token' has shape \(1, 1, 32\) but .* expects \(1, 1, 64\); "
                                         r"build the model to match the weights, or pass model=None"):
        load_official_mae(sd, model=other)
    with pytest.raises(ValueError, match="lack 1 keys the model needs \\(decoder_norm.bias\\)"):
        load_official_mae({k: v for k, v in sd.items() if k != "decoder_norm.bias"}, **heads(f["config"]))
    with pytest.raises(ValueError, match="keys the model does not use \\(blocks.1.extra\\)"):
        load_official_mae(dict(sd, **{"blocks.1.extra": np.zeros(3)}), **heads(f["config"]))
    with pytest.raises(ValueError, match="not both"):
        load_official_mae(sd, model=other, img_size=32)


# --- the model itself -------------------------------------------------------------------------


def test_official_initialisation():
    model = MaskedAutoencoderViT(**dict(TINY, in_chans=3, decoder_embed_dim=32))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))["params"]
    flat = traverse_util.flatten_dict(params)
    for path, leaf in flat.items():
        leaf, name = np.asarray(leaf), "/".join(path)
        if path[-1] == "kernel":  # Xavier uniform; the patch conv viewed as (out, -1)
            bound = math.sqrt(6.0 / (math.prod(leaf.shape[:-1]) + leaf.shape[-1]))
            assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound, name
            assert abs(leaf.std() - bound / math.sqrt(3)) < 0.1 * bound, name
        elif path[-1] == "scale":
            np.testing.assert_array_equal(leaf, 1.0, err_msg=name)
        elif path[-1] == "bias" and path[:2] != ("encoder", "patch_embed"):
            np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
    bias_bound = 1 / math.sqrt(3 * 4 * 4)  # torch's default conv bias, which the official init keeps
    assert 0 < np.abs(params["encoder"]["patch_embed"]["proj"]["bias"]).max() <= bias_bound
    for token in (params["encoder"]["cls_token"], params["mask_token"]):
        assert 0.01 < float(np.std(token)) < 0.04
    np.testing.assert_array_equal(params["encoder"]["pos_embed"][0], sincos(48, 4))
    np.testing.assert_array_equal(params["decoder_pos_embed"][0], sincos(32, 4))
    # The encoder's tree is exactly a VisionTransformer's, so probing / fine-tuning take it as is.
    vit, x = model.encoder_model(), jnp.zeros((1, 16, 16, 3))
    shapes = lambda t: {k: v.shape for k, v in traverse_util.flatten_dict(t).items()}  # noqa: E731
    assert shapes(jax.eval_shape(vit.init, jax.random.PRNGKey(1), x)["params"]) == shapes(params["encoder"])
    out = jax.eval_shape(lambda p: vit.apply({"params": p}, x), params["encoder"])
    assert out["x_norm_patchtokens"].shape == (1, 16, 48)


def test_fixed_position_tables_get_no_gradient():
    model, params = loaded("mae_c1.npz")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 1))
    loss = lambda p: model.apply({"params": p}, x, rngs={"masking": jax.random.PRNGKey(2)})["loss"]  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    assert not np.any(np.asarray(grads["encoder"]["pos_embed"])) and not np.any(np.asarray(grads["decoder_pos_embed"]))
    assert np.any(np.asarray(grads["encoder"]["cls_token"])) and np.any(np.asarray(grads["mask_token"]))
    mask = traverse_util.flatten_dict(trainable_mask(params))
    assert sorted(k for k, v in mask.items() if not v) == [("decoder_pos_embed",), ("encoder", "pos_embed")]


def test_3d_model_with_registers_masks_and_round_trips(tmp_path):
    model = MaskedAutoencoderViT(**dict(TINY, in_chans=2, spatial_dims=3, num_register_tokens=2, norm_pix_loss=True))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 16, 2))

    @jax.jit
    def init_and_run(key):  # one compile: init, then masking draws for the keys 2, 2 and 3
        variables = model.init(key, x)
        keys = jnp.stack([jax.random.PRNGKey(i) for i in (2, 2, 3)])
        return variables["params"], jax.vmap(lambda k: model.apply(variables, x, rngs={"masking": k}))(keys)

    params, outs = init_and_run(jax.random.PRNGKey(1))
    out, same, other = (jax.tree_util.tree_map(lambda a, i=i: a[i], outs) for i in range(3))
    assert params["encoder"]["patch_embed"]["proj"]["kernel"].shape == (4, 4, 4, 2, 48)
    np.testing.assert_array_equal(params["decoder_pos_embed"][0], sincos(36, 4, 3))
    assert out["pred"].shape == (2, 64, 4**3 * 2) and out["latent"].shape == (2, 1 + 2 + 16, 48)
    np.testing.assert_array_equal(np.asarray(out["mask"].sum(1)), [48, 48])  # L - int(L * 0.25) per sample
    np.testing.assert_array_equal(np.asarray(same["pred"]), np.asarray(out["pred"]))
    assert not np.array_equal(np.asarray(other["mask"]), np.asarray(out["mask"]))
    assert np.isfinite(float(out["loss"])) and float(out["loss"]) > 0
    path = str(tmp_path / "mae3d.safetensors")
    official_io.write_weights(path, export_mae_state_dict(params))
    loaded3d, params3d = load_official_mae(path, num_heads=4, decoder_num_heads=4, norm_pix_loss=True)
    assert loaded3d == model  # configuration read back from the weights, including registers and 3D
    flat, back = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params3d)
    assert set(flat) == set(back)
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k], err_msg=str(k))


def test_bfloat16_compute_keeps_a_float32_loss():
    f = fixture("mae_c3.npz")
    model, params = load_official_mae(dict(f["sd"]), dtype=jnp.bfloat16, **heads(f["config"]))
    out = run(model, params, f["x_nhwc"], f["noise"], 0.75)
    assert out["loss"].dtype == jnp.float32 and out["pred"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out["mask"]), f["mask"])
    assert abs(float(out["loss"]) - float(f["loss"])) < 0.05 * float(f["loss"])


def test_train_mode_uses_drop_path():
    f = fixture("mae_c1.npz")
    model, params = loaded("mae_c1.npz")
    model = model.clone(drop_path_rate=0.5)
    x, noise = jnp.asarray(f["x_nhwc"]), jnp.asarray(f["noise"])
    fn = jax.jit(lambda k: model.apply({"params": params}, x, noise=noise, mask_ratio=0.6, train=True,
                                       rngs={"drop_path": k})["loss"])
    loss = float(fn(jax.random.PRNGKey(3)))
    assert loss == float(fn(jax.random.PRNGKey(3))) and loss != float(f["loss"])
    # a small batch at rate 0.5: two keys may pick the same samples by chance, three others will not all
    assert any(float(fn(jax.random.PRNGKey(k))) != loss for k in (4, 5, 6))


def test_bad_inputs_raise_value_errors_naming_the_value():
    model = MaskedAutoencoderViT(**dict(TINY, patch_size=8, in_chans=1))  # 2 x 2 = 4 patches
    x = jnp.zeros((1, 16, 16, 1))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, noise=jnp.zeros((1, 4))))

    def call(images, ratio=0.5):
        noise = jnp.zeros(images.shape[:1] + (4,))
        jax.eval_shape(lambda p: model.apply(p, images, noise=noise, mask_ratio=ratio), params)

    for ratio in (0.0, 1.0, 1.2):
        with pytest.raises(ValueError, match=f"mask_ratio={ratio} must lie strictly between 0 and 1"):
            call(x, ratio)
    with pytest.raises(ValueError, match="mask_ratio=0.999 leaves .* 0 of 4 patches visible"):
        call(x, 0.999)
    with pytest.raises(ValueError, match="Image size 20x20 is not divisible by patch_size=8"):
        call(jnp.zeros((1, 20, 20, 1)))
    with pytest.raises(ValueError, match="Image size 24x24 differs from img_size=16"):
        call(jnp.zeros((1, 24, 24, 1)))
    with pytest.raises(ValueError, match="in_chans=1"):
        call(jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="img_size=18 is not divisible by patch_size=4"):
        MaskedAutoencoderViT(**dict(TINY, img_size=18)).init(jax.random.PRNGKey(0), jnp.zeros((1, 18, 18, 1)))


def test_registered_sizes():
    assert MAE_MODELS["mae_vit_huge_patch14"]["embed_dim"] == 1280
    model = build_mae("mae_vit_base_patch16", in_chans=3)
    assert (model.embed_dim, model.depth, model.num_heads, model.patch_size) == (768, 12, 12, 16)
    assert (model.decoder_embed_dim, model.decoder_depth, model.decoder_num_heads) == (512, 8, 16)
    assert build_mae(**TINY).embed_dim == 48
    with pytest.raises(ValueError, match="Unknown MAE model 'mae_vit_tiny'"):
        build_mae("mae_vit_tiny")
