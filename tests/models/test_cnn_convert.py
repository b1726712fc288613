"""ResNet / DenseNet against torchvision and timm 0.3.2 (medjax.models.resnet, densenet, convert_cnn).

Fixtures from tests/reference/make_cnn_fixtures.py: the reference classes at a reduced size
with random weights and running statistics, a 61 px input, eval-mode logits and pooled
features, and one train-mode forward (its logits and the running statistics it leaves).
cnn_layouts.npz holds the key -> shape tables of the full-size reference models.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from medjax.models import convert, convert_cnn, official_io
from medjax.models.cnns import build_cnn, torch_init
from medjax.models.densenet import DenseNet
from medjax.models.resnet import ResNet

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")
TOL = 1e-4  # observed <= 2.5e-6 on logits of magnitude ~1
PARITY = ("cnn_resnet_tv", "cnn_resnet_timm", "cnn_densenet_tv", "cnn_densenet_timm")


@functools.lru_cache(maxsize=None)
def fixture(name):
    with np.load(os.path.join(FIXTURES, f"{name}.npz")) as f:
        data = dict(f)
    cfg = json.loads(str(data.pop("config")))
    data["config"] = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    data["sd"] = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
    return data


def model_of(name, **overrides):
    cfg = {**fixture(name)["config"], **overrides}
    return ResNet(**cfg) if "resnet" in name else DenseNet(**cfg)


def flat_stats(batch_stats):
    return {convert_cnn.torch_key("batch_stats", p): np.asarray(v)
            for p, v in traverse_util.flatten_dict(batch_stats).items()}


@pytest.mark.parametrize("name", PARITY)
def test_converted_weights_give_the_reference_outputs(name):
    data = fixture(name)
    model = model_of(name)
    variables = convert_cnn.variables_from_state_dict(data["sd"], model)

    @jax.jit
    def both(v, x):
        evaluated = model.apply(v, x)
        trained, updated = model.apply(v, x, train=True, mutable=["batch_stats"])
        return evaluated, trained, updated["batch_stats"]

    evaluated, trained, stats = both(variables, jnp.asarray(data["x"].transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(evaluated["logits"], data["logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(evaluated["pooled"], data["pooled"], atol=TOL, rtol=0)
    # train mode: batch statistics normalise, the running ones move with torch's momentum and unbiased variance
    np.testing.assert_allclose(trained["logits"], data["train_logits"], atol=TOL, rtol=0)
    got = flat_stats(stats)
    want = {k[len("train_sd/"):]: v for k, v in data.items() if k.startswith("train_sd/")}
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)
        assert not np.allclose(got[key], data["sd"][key]), key  # the forward did move them


def test_full_size_layouts_and_parameter_counts_equal_torchvision_and_timm():
    with np.load(os.path.join(FIXTURES, "cnn_layouts.npz")) as f:
        layouts = json.loads(str(f["layouts"]))
    counts = {"resnet50": 25_557_032, "densenet121": 7_978_856}
    for arch, count in counts.items():
        layout = convert_cnn.expected_layout(build_cnn(arch))  # jax.eval_shape: nothing allocated
        assert sum(int(np.prod(shape)) for c, _, shape in layout.values() if c == "params") == count
        ours = {k: list(shape) for k, (_, _, shape) in layout.items()}
        for library in ("torchvision", "timm"):
            ref = layouts[f"{library}/{arch}"]
            assert ref["parameters"] == count
            want = {k: v for k, v in ref["keys"].items() if not k.endswith("num_batches_tracked")}
            assert list(ours.items()) == list(want.items())  # the same keys and shapes, in the same order


def test_files_checkpoint_wrappers_and_legacy_densenet_keys(tmp_path):
    sd = fixture("cnn_densenet_tv")["sd"]
    model = model_of("cnn_densenet_tv")
    want = traverse_util.flatten_dict(convert_cnn.variables_from_state_dict(sd, model))
    legacy = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in sd.items()}
    assert sum(".norm.1." in k for k in legacy) == 8 * 5  # 8 dense layers: 4 tensors + the counter each
    sources = [{"state_dict": {f"module.{k}": v for k, v in sd.items()}}, {"model": legacy}]
    for ext in (".npz", ".safetensors"):
        path = str(tmp_path / f"weights{ext}")
        official_io.write_weights(path, sd)
        sources.append(official_io.read_weights(path))
    for source in sources:
        got = traverse_util.flatten_dict(convert_cnn.variables_from_state_dict(source, model))
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    exported = convert_cnn.export_state_dict(convert_cnn.variables_from_state_dict(sd, model), model)
    assert list(exported) == [k for k in sd if not k.endswith("num_batches_tracked")]
    for key, value in exported.items():
        np.testing.assert_array_equal(value, sd[key])
    # a features-only model leaves the classifier out
    bare = convert_cnn.variables_from_state_dict(sd, model_of("cnn_densenet_tv", num_classes=0))
    assert "classifier" not in bare["params"] and "features" in bare["params"]


def test_a_state_dict_of_another_architecture_is_one_sentence(tmp_path):
    path = str(tmp_path / "densenet.npz")
    official_io.write_weights(path, fixture("cnn_densenet_tv")["sd"])
    with pytest.raises(ValueError) as err:
        convert_cnn.load_cnn(path, "resnet50")
    assert str(err.value) == (
        f"{path} does not match a torchvision/timm ResNet-50 (blocks (3, 4, 6, 3), width 64, 1 input channel(s)): "
        "265 expected key(s) are missing ('conv1.weight', 'bn1.weight', 'bn1.bias', ...); "
        "106 key(s) are not in the model ('features.conv0.weight', 'features.norm0.weight', "
        "'features.norm0.bias', ...).")
    sd = dict(fixture("cnn_resnet_tv")["sd"])
    with pytest.raises(ValueError) as err:
        convert_cnn.variables_from_state_dict(sd, model_of("cnn_resnet_tv", width=16), source="r.pth")
    message = str(err.value)
    assert message.startswith("r.pth does not match a torchvision/timm ResNet (blocks (2, 1, 1, 1), width 16, 3 "
                              "input channel(s)): 'conv1.weight' has shape (8, 3, 7, 7) where (16, 3, 7, 7) is "
                              "expected (")
    assert "\n" not in message and "missing" not in message
    del sd["layer4.0.bn3.running_var"]
    with pytest.raises(ValueError, match=r"1 expected key\(s\) are missing \('layer4.0.bn3.running_var'\)\.$"):
        convert_cnn.variables_from_state_dict(sd, model_of("cnn_resnet_tv"))


def test_rgb_weights_folded_for_gray_images_match_inside_the_border():
    """The 1-channel stem on a gray image equals the RGB stem on the replicated image where its 7x7 window
    misses the padding (conv1 output rows/columns 2..28 of 31 at 61 px)."""
    data = fixture("cnn_resnet_tv")
    rgb_model, gray_model = model_of("cnn_resnet_tv"), model_of("cnn_resnet_tv", in_chans=1)
    rgb = convert_cnn.variables_from_state_dict(data["sd"], rgb_model)
    gray = convert_cnn.variables_from_state_dict(data["sd"], gray_model)
    assert gray["params"]["conv1"]["kernel"].shape == (7, 7, 1, 8)
    g = np.random.default_rng(0).uniform(0, 1, (2, 61, 61, 1)).astype(np.float32)
    x_rgb = (g - np.asarray(convert.IMAGENET_MEAN, np.float32)) / np.asarray(convert.IMAGENET_STD, np.float32)
    x_gray = (g - convert.GRAY_MEAN) / convert.GRAY_STD

    def stem(variables, x):  # conv1 (7x7, stride 2, padding 3) and bn1 in eval mode, as the model computes them
        y = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        bn, stats = variables["params"]["bn1"], variables["batch_stats"]["bn1"]
        return np.asarray((y - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"])

    a, b = stem(rgb, x_rgb), stem(gray, x_gray)
    np.testing.assert_allclose(b[:, 2:29, 2:29], a[:, 2:29, 2:29], atol=1e-4, rtol=0)
    assert np.abs(b[:, 0] - a[:, 0]).max() > 1e-2  # the border differs: each RGB channel pads its own zero


def test_torch_init_draws_torchvisions_scales_on_the_host():
    for arch, fan_axis in (("resnet50", 3), ("densenet121", 2)):  # kaiming fan_out (ResNet), fan_in (DenseNet)
        model = build_cnn(arch, num_classes=10, in_chans=1, width=0.5, depth=0.2)
        variables = torch_init(model, seed=3)
        want = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32))
        assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, want)
        flat = traverse_util.flatten_dict(variables["params"])
        kernels = [v for p, v in flat.items() if p[-1] == "kernel" and v.ndim == 4 and v.size > 20_000]
        for k in kernels:
            fan = k.shape[0] * k.shape[1] * k.shape[fan_axis]
            assert abs(k.std() / np.sqrt(2.0 / fan) - 1) < 0.05
        assert all(np.all(v == 1) for p, v in flat.items() if p[-1] == "scale")
    assert not np.array_equal(torch_init(model, 1)["params"]["classifier"]["kernel"],
                              variables["params"]["classifier"]["kernel"])
