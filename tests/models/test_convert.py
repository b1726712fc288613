"""Loading and exporting official DINOv2 weights (medjax.models.convert.load_official and friends).

Parity fixtures come from tests/reference/make_model_fixtures.py; vit_chunked_c3.npz has chunked
blocks and official outputs at twice its built resolution. Compiles dominate on CPU: each forward
below is a tiny model jitted once.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from medjax.models import convert, official_io
from medjax.models.pos_embed import interpolate_pos_embed
from medjax.models.vit import VisionTransformer

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TOL = 1e-4  # observed <= 2.2e-6 on outputs of magnitude ~5
OUT_KEYS = ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm")


@functools.lru_cache(maxsize=None)
def fixture(name):
    with np.load(os.path.join(FIXTURES, name)) as f:
        data = dict(f)
    if "config" in data:
        data["config"] = json.loads(str(data["config"]))
    data["sd"] = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
    return data


def state_dict(name):
    return dict(fixture(name)["sd"])


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def forward(model, params, x, masks=None):
    return jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))(params, x, masks)


def assert_same_tree(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def training_checkpoint(sd, student_sd, chunks):
    """The layout of an official training checkpoint: chunked blocks, teacher/student prefixes, heads."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    size = depth // chunks

    def chunked(d):
        out = {}
        for k, v in d.items():
            if k.startswith("blocks."):
                i = int(k.split(".")[1])
                k = f"blocks.{i // size}.{k[len('blocks.'):]}"
            out[k] = v
        return out

    head = {k[len("h3/sd/"):]: v for k, v in fixture("dino_head.npz").items() if k.startswith("h3/sd/")}
    model = {}
    for role, d in (("teacher", sd), ("student", student_sd)):
        model.update({f"{role}.backbone.{k}": v for k, v in chunked(d).items()})
        model.update({f"{role}.dino_head.{k}": v for k, v in head.items()})
        model[f"{role}.ibot_head.mlp.weight"] = np.zeros((3, 3), np.float32)
    return {"model": model, "optimizer": {"state": {}}, "iteration": 1250}, head


@pytest.mark.parametrize("name", ["vit_mlp_c3.npz", "vit_swiglu_c1.npz", "vit_reg4_c1.npz"])
def test_load_official_reproduces_official_outputs_and_exports_back(name):
    data = fixture(name)
    cfg = data["config"]
    model, params = convert.load_official(data["sd"], num_heads=cfg["num_heads"])
    inferred = {k: getattr(model, k) for k in cfg if k != "init_values"}
    assert inferred == {k: v for k, v in cfg.items() if k != "init_values"}
    assert (model.init_values is None) == (cfg["init_values"] is None)
    out = forward(model, params, nhwc(data["x_nchw"]), jnp.asarray(data["masks"]))
    for key in OUT_KEYS + (("x_norm_regtokens",) if model.num_register_tokens else ()):
        assert max_diff(out[key], data[f"out/{key}"]) <= TOL, key
    np.testing.assert_array_equal(out["masks"], data["masks"])
    exported = convert.export_state_dict(params, model=model)
    assert list(exported) != [] and set(exported) == set(data["sd"])
    for k, v in data["sd"].items():  # exact round trip, official layout
        assert exported[k].dtype == np.float32
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert_same_tree(params, convert.backbone_params_from_state_dict(data["sd"], depth=cfg["depth"]))


@pytest.mark.parametrize("img_size", [None, 56])
def test_training_checkpoint_with_block_chunks_matches_official(img_size):
    """Chunked official blocks inside a training checkpoint; the official run is at 56 px from a 28 px
    build, so img_size=None tests run-time interpolation and img_size=56 the resize at load."""
    data = fixture("vit_chunked_c3.npz")
    assert "blocks.1.2.norm1.weight" in data["sd"]  # chunk 1 holds blocks 2 and 3
    ckpt = {"model": {"teacher.backbone." + k: v for k, v in data["sd"].items()}}
    ckpt["model"]["teacher.dino_head.last_layer.weight_g"] = np.ones((4, 1), np.float32)
    model, params = convert.load_official(ckpt, num_heads=2, img_size=img_size)
    assert (model.depth, model.img_size) == (4, img_size or 28)
    assert params["pos_embed"].shape == (1, 1 + (4 if img_size else 2) ** 2, 16)
    out = forward(model, params, nhwc(data["x_nchw"]), jnp.asarray(data["masks"]))
    for key in OUT_KEYS:
        assert max_diff(out[key], data[f"out/{key}"]) <= TOL, key


def test_training_checkpoint_layouts_pick_the_right_backbone_and_head():
    sd = state_dict("vit_reg4_c1.npz")
    student_sd = {k: v + 1.0 for k, v in sd.items()}
    _, want = convert.load_official(sd, num_heads=3)
    _, want_student = convert.load_official(student_sd, num_heads=3)
    ckpt, head = training_checkpoint(sd, student_sd, chunks=2)
    assert "teacher.backbone.blocks.1.1.norm1.weight" in ckpt["model"]
    assert_same_tree(convert.load_official(ckpt, num_heads=3)[1], want)
    assert_same_tree(convert.load_official(ckpt, num_heads=3, which="student")[1], want_student)
    flat = dict(ckpt["model"])  # prefixes without the {"model": ...} wrapper
    assert_same_tree(convert.load_official(flat, num_heads=3)[1], want)
    # evaluation checkpoint written by the official trainer: {"teacher": {"backbone.*", "dino_head.*"}}
    teacher = {"teacher": {k[len("teacher."):]: v for k, v in ckpt["model"].items() if k.startswith("teacher.")}}
    assert_same_tree(convert.load_official(teacher, num_heads=3)[1], want)
    with pytest.raises(ValueError, match="pass which='teacher'"):
        convert.load_official(teacher, num_heads=3, which="student")
    head_params = convert.head_params_from_state_dict(head)
    assert_same_tree(convert.load_official_head(ckpt), head_params)
    assert_same_tree(convert.load_official_head(teacher), head_params)


def test_npz_and_safetensors_files_load_identically(tmp_path):
    sd = state_dict("vit_reg4_c1.npz")
    model, params = convert.load_official(sd, num_heads=3)
    for ext in ("npz", "safetensors"):
        plain = tmp_path / f"official.{ext}"
        official_io.write_weights(str(plain), sd)
        got_model, got = convert.load_official(plain, num_heads=3)
        assert got_model == model
        assert_same_tree(got, params)
        saved = tmp_path / f"saved.{ext}"
        convert.save_official(str(saved), params, model=model)
        assert_same_tree(convert.load_official(str(saved), num_heads=3)[1], params)
    ckpt, _ = training_checkpoint(sd, sd, chunks=2)
    official_io.write_weights(str(tmp_path / "train.safetensors"), ckpt["model"])
    assert_same_tree(convert.load_official(tmp_path / "train.safetensors", num_heads=3)[1], params)


def test_pth_needs_torch_only_when_used(tmp_path):
    sd = state_dict("vit_swiglu_c1.npz")
    model, params = convert.load_official(sd, num_heads=3)
    path = str(tmp_path / "w.pth")
    try:
        import torch  # noqa: F401
    except ImportError:
        with open(path, "wb") as f:
            f.write(b"not read")
        with pytest.raises(ImportError, match=r"pip install 'medjax\[torch\]'"):
            convert.load_official(path)
        with pytest.raises(ImportError, match=r"\.npz or \.safetensors"):
            convert.save_official(path, params)
        return
    convert.save_official(path, params, model=model)
    assert_same_tree(convert.load_official(path, num_heads=3)[1], params)


def test_gray_fold_equals_rgb_model_on_replicated_image():
    data = fixture("vit_mlp_c3.npz")
    rgb_model, rgb_params = convert.load_official(data["sd"], num_heads=3)
    gray_model, gray_params = convert.load_official(data["sd"], num_heads=3, in_chans=1)
    assert gray_model.in_chans == 1 and gray_params["patch_embed"]["proj"]["kernel"].shape == (14, 14, 1, 48)
    gray = np.random.default_rng(0).random((2, 56, 42, 1))
    mean, std = np.array(convert.IMAGENET_MEAN), np.array(convert.IMAGENET_STD)
    rgb = ((gray - mean) / std).astype(np.float32)
    x1 = ((gray - convert.GRAY_MEAN) / convert.GRAY_STD).astype(np.float32)
    masks = jnp.asarray(data["masks"])
    want = forward(rgb_model, rgb_params, jnp.asarray(rgb), masks)
    got = forward(gray_model, gray_params, jnp.asarray(x1), masks)
    for key in OUT_KEYS:
        assert max_diff(got[key], want[key]) <= 2e-5, key

    # the algebra itself, in float64 on one patch, with other gray statistics
    w, b = data["sd"]["patch_embed.proj.weight"], data["sd"]["patch_embed.proj.bias"]
    k1, b1 = convert.fold_rgb_patch_embed(w, b, gray_mean=0.3, gray_std=0.2)
    g = gray[0, :14, :14, 0]
    rgb_out = np.einsum("dcij,cij->d", w.astype(np.float64), (g[None] - mean[:, None, None]) / std[:, None, None])
    gray_out = np.einsum("dij,ij->d", k1[:, 0].astype(np.float64), (g - 0.3) / 0.2) + b1
    np.testing.assert_allclose(gray_out, rgb_out + b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", ["vit_reg4_c1.npz", "vit_mlp_c3.npz"])
def test_pos_embed_resized_once_equals_runtime_interpolation(name):
    sd = state_dict(name)
    model, params = convert.load_official(sd, num_heads=3, img_size=70)  # 3x3 grid -> 5x5
    assert (model.img_size, params["pos_embed"].shape) == (70, (1, 26, 48))
    runtime = jax.jit(lambda p: interpolate_pos_embed(p, (5, 5), antialias=model.interpolate_antialias,
                                                      offset=model.interpolate_offset))(sd["pos_embed"])
    assert max_diff(params["pos_embed"], runtime) <= 1e-6
    same = convert.load_official(sd, num_heads=3, img_size=42 + 13)[1]  # same 3x3 grid: untouched
    np.testing.assert_array_equal(same["pos_embed"], sd["pos_embed"])


@pytest.mark.parametrize("name,antialias,offset", [("vit_pos_interp_plain.npz", False, 0.1),
                                                   ("vit_pos_interp_aa.npz", True, 0.0)])
def test_pos_embed_resize_matches_official_interpolation(name, antialias, offset):
    with np.load(os.path.join(FIXTURES, name)) as f:
        data = dict(f)
    for gh, gw in data["targets"]:
        if gh == gw:
            got = convert.resize_pos_embed(data["pos_embed"], int(gh), antialias=antialias, offset=offset)
            assert max_diff(got, data[f"model/{gh}x{gw}"]) <= 1e-5, (gh, gw)


def test_mlp_ratio_and_heads_inferred_for_official_sizes():
    for dim, hidden, ffn in ((384, 1536, "mlp"), (1024, 4096, "mlp"), (1536, 4096, "swiglu"), (48, 96, "mlp")):
        ratio = convert._mlp_ratio(dim, hidden, ffn)
        assert convert._ffn_hidden(dim, ratio, ffn) == hidden
    assert convert._mlp_ratio(1536, 4096, "swiglu") == 4.0  # ViT-g: w12 is (2 * 4096, 1536)
    sd = {"patch_embed.proj.weight": np.zeros((384, 3, 14, 14)), "pos_embed": np.zeros((1, 1370, 384)),
          "cls_token": np.zeros((1, 1, 384)), "register_tokens": np.zeros((1, 4, 384)),
          "blocks.0.mlp.fc1.weight": np.zeros((1536, 384)), "blocks.0.ls1.gamma": np.zeros(384),
          "blocks.0.attn.qkv.bias": np.zeros(1152), "blocks.11.norm1.weight": np.zeros(384)}
    sd.update({f"blocks.{i}.norm1.weight": np.zeros(384) for i in range(12)})
    cfg = convert.infer_config(sd)
    assert cfg == dict(img_size=518, patch_size=14, in_chans=3, embed_dim=384, depth=12, mlp_ratio=4.0,
                       qkv_bias=True, ffn_layer="mlp", init_values=1.0, num_register_tokens=4,
                       interpolate_antialias=True, interpolate_offset=0.0)


def test_errors_are_one_clear_sentence(tmp_path):
    sd = state_dict("vit_reg4_c1.npz")
    with pytest.raises(ValueError, match=r"unknown weights file extension '\.bin'"):
        convert.load_official(tmp_path / "w.bin")
    with pytest.raises(ValueError, match=r"unknown weights file extension '\.h5'"):
        convert.save_official(str(tmp_path / "w.h5"), convert.load_official(sd, num_heads=3)[1])
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        convert.load_official(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"'blocks.0.mlp.fc1.bias' has shape \(192,\) .* expects \(96,\)"):
        convert.load_official(sd, num_heads=3, mlp_ratio=2.0)
    one_chan = VisionTransformer(img_size=42, in_chans=3, embed_dim=48, depth=2, num_heads=3, num_register_tokens=4)
    with pytest.raises(ValueError, match=r"'patch_embed.proj.weight' has shape \(48, 1, 14, 14\) .* \(48, 3, 14, 14\)"):
        convert.load_official(sd, model=one_chan)
    with pytest.raises(ValueError, match=r"keys the model does not use \(blocks\.1\.attn"):
        convert.load_official(sd, model=one_chan.clone(in_chans=1, depth=1))
    with pytest.raises(ValueError, match="lack 1 keys the model needs \\(blocks.1.norm2.bias\\)"):
        convert.load_official({k: v for k, v in sd.items() if k != "blocks.1.norm2.bias"}, num_heads=3)
    with pytest.raises(ValueError, match=r"1 keys the model does not use \(head.weight\)"):
        convert.load_official({**sd, "head.weight": np.zeros(3)}, num_heads=3)
    with pytest.raises(ValueError, match="neither a teacher nor a student backbone"):
        convert.load_official({"model": {"teacher.dino_head.mlp.weight": np.zeros(3)}})
    with pytest.raises(ValueError, match="neither a teacher nor a student backbone"):
        convert.load_official({"model": {"optimizer_step": np.zeros(1)}})
    ckpt, _ = training_checkpoint(sd, sd, chunks=1)
    only_teacher = {k: v for k, v in ckpt["model"].items() if k.startswith("teacher.")}
    with pytest.raises(ValueError, match="no student backbone .* pass which='teacher'"):
        convert.load_official(only_teacher, which="student")
    with pytest.raises(ValueError, match="not a multiple of DINOv2's 64-dim heads; pass num_heads"):
        convert.load_official(sd)
    with pytest.raises(ValueError, match="not a DINOv2 backbone"):
        convert.load_official({"weight": np.zeros(3)})
    with pytest.raises(ValueError, match="either model= or"):
        convert.load_official(sd, model=one_chan, img_size=56)
    with pytest.raises(ValueError, match="Unknown VisionTransformer field"):
        convert.load_official(sd, num_heads=3, embed=48)
