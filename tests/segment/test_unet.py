"""The U-Net baseline: the network (odd sizes, its size against a hand count, the up-conv), the segmentation
data it is scored on (HD95 in mm from a PNG row's pixel_spacing against a brute-force distance, in pixels
without one, empty lung masks), the flip refusal for sided classes, and its rows in the ``:smoke`` run's table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from medjax.models.unet import UNet, UpConv2x2, parameter_count
from medjax.segment import evaluate2d
from medjax.segment.data import load_data
from medjax.segment.validate import validate
from tests.helpers import brute_force_hd95, load_config

LUNGS = ("background", "right_lung", "left_lung")


@pytest.mark.parametrize("shape", [(13, 22), (16, 16), (1, 7), (33, 9)])
def test_unet_output_has_the_input_size_for_any_side(shape):
    net = UNet(3, width=4, depth=3)
    out = jax.eval_shape(lambda x: net.init_with_output(jax.random.PRNGKey(0), x)[0], jnp.zeros((2, *shape, 1)))
    assert out.shape == (2, *shape, 3)


def test_odd_input_is_zero_padded_to_the_pooling_multiple_and_cropped_back():
    net = UNet(3, width=2, depth=2)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 13, 22, 1))
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)  # random params without compiling an init
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), shapes)
    padded = jnp.pad(x, ((0, 0), (0, 3), (0, 2), (0, 0)))  # 16 x 24: multiples of 2**2
    odd, even = jax.jit(lambda p: (net.apply(p, x), net.apply(p, padded)))(params)
    assert odd.shape == (1, 13, 22, 3)
    np.testing.assert_allclose(odd, even[:, :13, :22], rtol=1e-5, atol=1e-5)


def _conv(cin, cout, k=3):
    return k * k * cin * cout + cout  # kernel + bias


def test_classic_unet_parameter_count_matches_a_hand_count():
    # Ronneberger et al.: 1 input channel, 2 classes, 64 .. 1024 channels, up-conv 2x2 halving the channels.
    down = [_conv(1, 64) + _conv(64, 64), _conv(64, 128) + _conv(128, 128), _conv(128, 256) + _conv(256, 256),
            _conv(256, 512) + _conv(512, 512)]
    bottom = _conv(512, 1024) + _conv(1024, 1024)
    up = [_conv(1024, 512, 2) + _conv(1024, 512) + _conv(512, 512), _conv(512, 256, 2) + _conv(512, 256) + _conv(256, 256),
          _conv(256, 128, 2) + _conv(256, 128) + _conv(128, 128), _conv(128, 64, 2) + _conv(128, 64) + _conv(64, 64)]
    hand = sum(down) + bottom + sum(up) + _conv(64, 2, 1)
    assert hand == 31_030_658
    x = jnp.zeros((1, 16, 16, 1))
    paper = jax.eval_shape(UNet(2, width=64, depth=4, norm=False).init, jax.random.PRNGKey(0), x)
    assert parameter_count(paper) == hand
    # GroupNorm: a scale and a bias per channel after each of the 18 3x3 convs
    norms = 2 * 2 * (64 + 128 + 256 + 512 + 1024 + 512 + 256 + 128 + 64)
    assert parameter_count(jax.eval_shape(UNet(2).init, jax.random.PRNGKey(0), x)) == hand + norms


def test_up_conv_is_the_transposed_convolution_with_the_same_parameters():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5))
    rng = np.random.default_rng(0)
    params = {"params": {"kernel": jnp.asarray(rng.normal(size=(2, 2, 5, 6)), jnp.float32),
                         "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}}
    transposed = nn.ConvTranspose(6, (2, 2), strides=(2, 2), padding="VALID")
    ours, reference = jax.jit(lambda p: (UpConv2x2(6).apply(p, x), transposed.apply(p, x)))(params)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------- lung masks on PNG films (the chest X-ray demo's layout)

def _lungs(shape=(20, 16), right=True, left=True):
    m = np.zeros(shape, np.uint8)
    if right:
        m[4:15, 2:7] = 1  # the right lung on the image left, as on a PA film
    if left:
        m[5:16, 9:14] = 2
    return m


def _png_manifest(tmp_path, *, spacing=(("A", "0.5,0.8"), ("B", "0.5,0.8"), ("C", "0.5,0.8")), empty=()):
    rng = np.random.default_rng(0)
    lines = ["patient_id,path,split,mask_path,pixel_spacing"]
    cells = dict(spacing)
    for pid, split in (("A", "train"), ("B", "val"), ("C", "test")):
        Image.fromarray(rng.integers(0, 255, (20, 16), np.uint8)).save(tmp_path / f"{pid}.png")
        Image.fromarray(_lungs() * (pid not in empty)).save(tmp_path / f"{pid}_lungs.png")
        cell = f'"{cells[pid]}"' if cells.get(pid) else ""
        lines.append(f"{pid},{tmp_path / f'{pid}.png'},{split},{tmp_path / f'{pid}_lungs.png'},{cell}")
    (tmp_path / "films.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "films.csv")


def _load(tmp_path, manifest, empty_masks="refuse"):
    config = load_config("segment", "demo_cxr")
    config.segment.manifest = manifest
    config.segment.empty_masks = empty_masks
    return load_data(config, str(tmp_path), "", size=14, mean=0.449, std=0.226, say=lambda m: None)


def test_hd95_of_a_png_film_is_in_mm_from_its_pixel_spacing(tmp_path):
    splits, info = _load(tmp_path, _png_manifest(tmp_path))
    test = splits["test"]
    assert info["hd95_unit"] == "mm" and not info["spacing_assumed_for"]
    np.testing.assert_allclose(test.spacing, [[0.5, 0.8]])  # rows 0.5 mm, columns 0.8 mm
    gt = test.native[0]
    pred = np.zeros_like(gt)
    pred[6:15, 3:9] = 1  # the right lung moved down 2 rows and 1-2 columns right, cut shorter
    pred[5:16, 10:15] = 2  # the left lung one column right
    pred[0, 15] = 2  # and a stray left-lung pixel in the corner
    hd = evaluate2d.evaluate([pred], test, 3, "nan")["slice"]["hd95"][0]
    assert hd[0] == pytest.approx(brute_force_hd95(pred == 1, gt == 1, (0.5, 0.8)))
    assert hd[1] == pytest.approx(brute_force_hd95(pred == 2, gt == 2, (0.5, 0.8)))
    assert hd[0] > 0 and hd[1] > 0
    # the same masks with the spacing taken as 1 px would give other values: the spacing was used
    assert hd[0] != pytest.approx(brute_force_hd95(pred == 1, gt == 1, (1.0, 1.0)))


def test_hd95_without_any_pixel_spacing_is_in_pixels_and_a_mix_is_refused(tmp_path):
    none = (("A", ""), ("B", ""), ("C", ""))
    _, info = _load(tmp_path, _png_manifest(tmp_path, spacing=none))
    assert info["hd95_unit"] == "px" and len(info["spacing_assumed_for"]) == 2  # val and test films
    with pytest.raises(ValueError, match=r"1 of the 2 val and test images of .*films\.csv carry no pixel spacing "
                                         r"\(e\.g\. .*C_lungs\.png\) while the others do") as exc:
        _load(tmp_path, _png_manifest(tmp_path, spacing=(("A", ""), ("B", "0.5,0.8"), ("C", ""))))
    assert "\n" not in str(exc.value)


def test_empty_lung_masks_are_refused_in_one_sentence_naming_each_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"The mask\(s\) .*A_lungs\.png \(line 2\), .*C_lungs\.png \(line 4\) of "
                                         r".*films\.csv show no right_lung or left_lung at all") as exc:
        _load(tmp_path, _png_manifest(tmp_path, empty=("A", "C")))
    assert "\n" not in str(exc.value) and "config.segment.empty_masks='allow'" in str(exc.value)


def test_allowed_empty_mask_of_a_whole_image_is_named_in_a_warning(tmp_path, capsys):
    splits, _ = _load(tmp_path, _png_manifest(tmp_path, empty=("C",)), empty_masks="allow")
    assert not splits["test"].native[0].any()
    out = capsys.readouterr().out
    assert "WARNING: 1 whole 2D image(s)" in out and "C_lungs.png (line 4)" in out


def test_flip_with_sided_classes_is_refused():
    config = load_config("segment", "demo_cxr")
    config.segment.checkpoint_dir = "runs/x"
    assert config.segment.flip_p == 0 and config.data.demo_kind == "cxr"
    validate(config)
    config.segment.flip_p = 0.5
    with pytest.raises(ValueError, match=r"config\.segment\.flip_p=0\.5 flips images left-right, but config\.segment\."
                                         r"class_names right_lung, left_lung have sides"):
        validate(config)


# ------------------------------------------------- the :smoke run (tests/segment/conftest.py)

def test_results_table_holds_every_model_with_its_speed_size_and_dice(segment_run):
    workdir, results, _ = segment_run
    runs = results["runs"]
    assert {(r["init"], r["head"]) for r in runs} == {
        ("random_init", "linear"), ("random_init", "decoder"), ("pretrained", "linear"), ("pretrained", "decoder"),
        ("scratch", "unet")}
    unet = UNet(2, width=4, depth=2)  # the :smoke U-Net (background, lesion)
    count = parameter_count(jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
    assert results["baselines"]["unet"]["parameters"] == count
    table = (workdir / "results.md").read_text()
    assert "| trainable params | min / epoch | minutes |" in table
    for r in runs:
        # timed steps (all but the compiling first) at batch b over n images: (steps - 1) * b / n epochs
        b = min(8, r["train_slices"])
        epochs = (r["steps"] - 1) * b / r["train_slices"]
        assert 0 < r["minutes_per_epoch"] * epochs < r["minutes"]
        if r["head"] in ("unet", "linear"):  # linear: a 1x1 classifier on the 32-wide smoke tokens
            assert r["trainable_parameters"] == {"unet": count, "linear": (32 + 1) * 2}[r["head"]]
        d = r["test"]["patient"]["classes"]["lesion"]
        row = [line for line in table.splitlines()
               if line.startswith(f"| {r['init']} | {r['head']} | {r['backbone']} | {r['fraction']:g} |")]
        assert len(row) == 1
        cells = row[0].split(" | ")
        assert cells[6].startswith(f"{d['dice_mean']:.3f} ± ")  # Dice lesion / patient
        assert cells[-3] == f"{r['trainable_parameters']:,}" and float(cells[-2]) == pytest.approx(
            r["minutes_per_epoch"], rel=1e-2)
