"""Backbone parity with the official DINOv2 code (fixtures from tests/reference/make_model_fixtures.py)
and the invariants the trainer relies on. Compiles are the cost on CPU, so each model is jitted once
and shape-only checks use ``jax.eval_shape``."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models import convert
from medjax.models.pos_embed import interpolate_pos_embed
from medjax.models.vit import MODELS, VisionTransformer, build_backbone, drop_path

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TOL = 1e-5  # observed <= 3e-6 on outputs of magnitude ~5


def load(name):
    with np.load(os.path.join(FIXTURES, name)) as f:
        data = dict(f)
    data["config"] = json.loads(str(data["config"]))
    return data


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def compiled(model, **static):
    return jax.jit(lambda p, *a: model.apply(p, *a, **static))


@functools.lru_cache(maxsize=None)
def official(name):
    """Fixture data, converted params and our outputs: forward with the official masks and
    (same compiled function) with no patch masked, which is what get_intermediate_layers sees."""
    data = load(name)
    cfg = data["config"]
    model = VisionTransformer(**cfg)
    sd = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
    params = {"params": convert.backbone_params_from_state_dict(sd, depth=cfg["depth"])}
    fn = compiled(model, n_last_blocks=int(data["n_last"]))
    x, masks = nhwc(data["x_nchw"]), jnp.asarray(data["masks"])
    return data, model, params, fn(params, x, masks), fn(params, x, jnp.zeros_like(masks))


@pytest.mark.parametrize("name", ["vit_mlp_c3.npz", "vit_swiglu_c1.npz", "vit_reg4_c1.npz"])
def test_matches_official_forward_and_intermediate_layers(name):
    data, model, _, out, unmasked = official(name)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert out[key].shape == data[f"out/{key}"].shape
        assert max_diff(out[key], data[f"out/{key}"]) <= TOL, key
    r = model.num_register_tokens
    assert out["x_norm_regtokens"].shape == (2, r, 48)
    if r:
        assert max_diff(out["x_norm_regtokens"], data["out/x_norm_regtokens"]) <= TOL
    # get_intermediate_layers(n, return_class_token=True, norm=True)
    assert len(unmasked["last_blocks_norm"]) == int(data["n_last"])
    for i, blk in enumerate(unmasked["last_blocks_norm"]):
        assert max_diff(blk[:, 0], data[f"inter/{i}/cls"]) <= TOL
        assert max_diff(blk[:, 1 + r :], data[f"inter/{i}/patch"]) <= TOL
    np.testing.assert_array_equal(out["last_blocks_norm"][-1][:, 0], out["x_norm_clstoken"])


@pytest.mark.parametrize("name,variants", [
    ("vit_pos_interp_plain.npz", {"model": (False, 0.1), "plain_size": (False, 0.0)}),
    ("vit_pos_interp_aa.npz", {"model": (True, 0.0), "aa_scale": (True, 0.1)}),
])
def test_pos_embed_interpolation_matches_torch(name, variants):
    data = load(name)
    pos = jnp.asarray(data["pos_embed"])
    for gh, gw in data["targets"]:
        for key, (antialias, offset) in variants.items():
            want = data[f"{key}/{gh}x{gw}"]
            got = interpolate_pos_embed(pos, (int(gh), int(gw)), antialias=antialias, offset=offset)
            if key != "model":  # raw F.interpolate output: patch positions only
                got = got[:, 1:]
            assert got.shape == want.shape
            assert max_diff(got, want) <= 1e-5, (key, gh, gw)
    assert interpolate_pos_embed(pos, (7, 7), antialias=True, offset=0.0) is pos


def reg4_variant(**kw):
    """The register fixture's model/params with config overrides (registers dropped when R=0)."""
    data, _, params, _, _ = official("vit_reg4_c1.npz")
    model = VisionTransformer(**{**data["config"], **kw})
    p = dict(params["params"])
    if not model.num_register_tokens:
        p.pop("register_tokens")
    return model, {"params": p}, nhwc(data["x_nchw"]), data


def test_registers_follow_cls_without_pos_embed():
    model, params, x, _ = reg4_variant()
    p = params["params"]
    tokens = model.apply(params, x, method=VisionTransformer.prepare_tokens)
    assert tokens.shape == (2, 1 + 4 + 8, 48)
    np.testing.assert_array_equal(tokens[:, 1:5], np.broadcast_to(p["register_tokens"], (2, 4, 48)))
    np.testing.assert_allclose(tokens[:, 0], np.broadcast_to(p["cls_token"][0] + p["pos_embed"][0, :1], (2, 48)),
                               atol=1e-6)
    no_reg, no_reg_params, _, _ = reg4_variant(num_register_tokens=0)
    plain = no_reg.apply(no_reg_params, x, method=VisionTransformer.prepare_tokens)
    np.testing.assert_array_equal(tokens[:, 5:], plain[:, 1:])


def test_mask_token_replaces_exactly_the_masked_patches():
    model, params, x, data = reg4_variant(num_register_tokens=0)
    masks = data["masks"]
    assert 0 < masks.sum() < masks.size
    mask_token = np.asarray(params["params"]["mask_token"])
    base = np.asarray(model.apply(params, x, method=VisionTransformer.prepare_tokens))
    masked = np.asarray(model.apply(params, x, jnp.asarray(masks), method=VisionTransformer.prepare_tokens))
    changed = np.any(base != masked, axis=-1)
    np.testing.assert_array_equal(changed[:, 1:], masks)
    assert not changed[:, 0].any()
    pos = base[:, 1:] - np.asarray(model.apply(params, x, method=lambda m, y: m.patch_embed(y)))
    np.testing.assert_allclose(masked[:, 1:][masks], (mask_token + pos)[masks], atol=1e-5)


@pytest.mark.parametrize("chans", [1, 3])
def test_output_shapes_valid_patching(chans):
    """A 96 px crop at patch 14 gives a 6x6 grid (remainder dropped) on a 224-built model."""
    model = VisionTransformer(img_size=224, patch_size=14, in_chans=chans, embed_dim=24, depth=2, num_heads=2,
                              num_register_tokens=2)
    x = jax.ShapeDtypeStruct((3, 96, 96, chans), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    out = jax.eval_shape(functools.partial(model.apply, n_last_blocks=2), params, x)
    assert params["params"]["patch_embed"]["proj"]["kernel"].shape == (14, 14, chans, 24)
    assert params["params"]["pos_embed"].shape == (1, 1 + 16 * 16, 24)
    assert out["x_norm_clstoken"].shape == (3, 24)
    assert out["x_norm_regtokens"].shape == (3, 2, 24)
    assert out["x_norm_patchtokens"].shape == (3, 36, 24)
    assert out["x_prenorm"].shape == (3, 1 + 2 + 36, 24)
    assert [t.shape for t in out["last_blocks_norm"]] == [(3, 39, 24)] * 2
    assert out["masks"] is None


def test_drop_path_identity_in_eval_and_stochastic_in_training():
    model, params, x, data = reg4_variant(drop_path_rate=0.5, drop_path_uniform=True)
    ref_model, _, _, _ = reg4_variant()
    masks = jnp.asarray(data["masks"])
    # train=False traces to exactly the program of the model without drop path
    jaxpr = lambda m: str(jax.make_jaxpr(lambda p: m.apply(p, x, masks, train=False))(params))  # noqa: E731
    assert jaxpr(model) == jaxpr(ref_model)
    fn = jax.jit(lambda p, key: model.apply(p, x, masks, train=True, rngs={"drop_path": key})["x_prenorm"])
    a, b = (fn(params, jax.random.PRNGKey(k)) for k in (3, 3))
    np.testing.assert_array_equal(a, b)
    # 2 images at rate 0.5: each branch runs on one of them, so two keys may draw the same ones by chance
    assert max(max_diff(a, fn(params, jax.random.PRNGKey(k))) for k in (4, 5, 6)) > 1e-3
    assert max_diff(a, data["out/x_prenorm"]) > 1e-3
    for uniform, want in ((False, [0.0, 0.2, 0.4]), (True, [0.4] * 3)):
        m = VisionTransformer(img_size=28, embed_dim=24, depth=3, num_heads=2, drop_path_rate=0.4,
                              drop_path_uniform=uniform)
        abstract = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.ones((1, 28, 28, 1)))
        assert [blk.drop_path_rate for blk in m.bind(abstract).blocks] == pytest.approx(want)


def test_drop_path_batch_subset_and_bernoulli():
    calls = []

    def branch(y):
        calls.append(y.shape[0])
        return jnp.ones_like(y)

    out = np.asarray(drop_path(jnp.zeros((8, 3, 2)), branch, 0.5, jax.random.PRNGKey(0)))
    assert calls == [4]  # only floor(8 * 0.5) samples are computed
    per_sample = out.reshape(8, -1)
    assert np.all(per_sample == per_sample[:, :1])
    assert sorted(per_sample[:, 0].tolist()) == [0.0] * 4 + [2.0] * 4
    out = np.asarray(drop_path(jnp.zeros((64, 2)), branch, 0.1, jax.random.PRNGKey(1)))
    assert np.all(np.isclose(out[:, 0], 0.0) | np.isclose(out[:, 0], 1 / 0.9))
    assert 0 < np.sum(out[:, 0] == 0) < 20


def test_bfloat16_compute_keeps_float32_params():
    model, params, x, data = reg4_variant(dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out = compiled(model)(params, x, jnp.asarray(data["masks"]))
    assert out["x_norm_clstoken"].dtype == jnp.bfloat16
    assert max_diff(out["x_norm_patchtokens"], data["out/x_norm_patchtokens"]) < 0.25


def test_remat_gives_identical_outputs_and_param_names():
    data, model, params, out, _ = official("vit_swiglu_c1.npz")
    remat = VisionTransformer(**{**data["config"], "remat": True})
    got = compiled(remat)(params, nhwc(data["x_nchw"]), jnp.asarray(data["masks"]))
    np.testing.assert_allclose(got["x_prenorm"], out["x_prenorm"], atol=1e-6)
    p = jax.eval_shape(remat.init, jax.random.PRNGKey(0), nhwc(data["x_nchw"]))["params"]
    assert jax.tree.map(lambda a: a.shape, p) == jax.tree.map(lambda a: a.shape, params["params"])
    assert set(p) == {"patch_embed", "cls_token", "pos_embed", "mask_token", "blocks_0", "blocks_1", "norm"}
    assert set(p["blocks_0"]) == {"norm1", "attn", "norm2", "mlp"}  # init_values=None: no LayerScale
    assert set(p["blocks_0"]["mlp"]) == {"w12", "w3"}
    assert p["blocks_0"]["mlp"]["w12"]["kernel"].shape == (48, 2 * 128)  # (int(192*2/3)+7)//8*8
    assert set(p["norm"]) == {"scale", "bias"}
    names = set(official("vit_mlp_c3.npz")[2]["params"]["blocks_2"])
    assert names == {"norm1", "attn", "ls1", "norm2", "mlp", "ls2"}


def test_init_follows_official_scheme():
    model = VisionTransformer(img_size=56, patch_size=14, embed_dim=256, depth=1, num_heads=4, num_register_tokens=4)
    p = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((1, 56, 56, 1)))["params"]
    assert 5e-7 < float(jnp.std(p["cls_token"])) < 2e-6 and 5e-7 < float(jnp.std(p["register_tokens"])) < 2e-6
    assert float(jnp.abs(p["mask_token"]).max()) == 0.0
    assert 0.017 < float(jnp.std(p["pos_embed"])) < 0.023
    qkv = p["blocks_0"]["attn"]["qkv"]
    assert 0.019 < float(jnp.std(qkv["kernel"])) < 0.021 and float(jnp.abs(qkv["bias"]).max()) == 0.0
    np.testing.assert_array_equal(p["blocks_0"]["ls1"]["gamma"], np.full(256, 1e-5, np.float32))
    np.testing.assert_array_equal(p["norm"]["scale"], np.ones(256, np.float32))
    assert 0.06 < float(jnp.abs(p["patch_embed"]["proj"]["kernel"]).max()) <= 1 / 14  # torch conv default


def test_registry_and_errors():
    assert build_backbone("vit_small").embed_dim == 384
    g = build_backbone("vit_giant2", in_chans=3, num_register_tokens=4)
    assert (g.embed_dim, g.depth, g.num_heads, g.ffn_layer, g.in_chans) == (1536, 40, 24, "swiglu", 3)
    assert set(MODELS) == {"vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant2"}
    assert (MODELS["vit_huge"]["embed_dim"], MODELS["vit_huge"]["depth"]) == (1280, 32)  # MAE's ViT-H
    with pytest.raises(ValueError, match="vit_small"):
        build_backbone("vit_colossal")
    sd = {k[3:]: v for k, v in load("vit_swiglu_c1.npz").items() if k.startswith("sd/")}
    with pytest.raises(ValueError, match="unexpected keys"):
        convert.backbone_params_from_state_dict(sd, depth=1)
    with pytest.raises(ValueError, match="blocks.2.norm1"):
        convert.backbone_params_from_state_dict(sd, depth=3)
