"""3D segmentation: the heads on (D, H, W) token grids, the volume data and its way back to each mask
file's grid, and the trainer end to end on ``configs/segment.py:smoke3d`` (a 3D ``:smoke`` backbone from
the ``smoke_checkpoints_3d`` fixture)."""

import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medjax.readers import read_image
from medjax.segment import data3d, evaluate3d
from medjax.segment import model as segment_model
from medjax.segment import trainer as segment
from medjax.data.sources import axial_dhw
from medjax.segment.validate import validate
from tests.helpers import load_config, smoke_config_3d


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("kind", ["linear", "decoder"])
def test_3d_heads_give_logits_at_the_input_shape(kind):
    # Shapes only (jax.eval_shape): eager 3D convolutions compile op by op for seconds each on a CPU.
    head = segment_model.build_head(kind, 3, (8, 4), True)
    patch = jax.ShapeDtypeStruct((2, 2, 7, 7, 16), jnp.float32)  # the tokens of a 12 x 42 x 42 input, patch 6
    image = jax.ShapeDtypeStruct((2, 12, 42, 42, 1), jnp.float32)
    params = jax.eval_shape(head.init, jax.random.PRNGKey(0), patch, image)
    assert jax.eval_shape(head.apply, params, patch, image).shape == (2, 12, 42, 42, 3)
    if kind == "decoder":
        assert params["params"]["stage0_conv"]["kernel"].shape == (3, 3, 3, 8 + 1, 8)  # on features + image
        # The demo's 16 x 80 x 80 input with patch 8 (2 x 10 x 10 tokens): three x2 stages, then x2 to the input.
        head = segment_model.build_head(kind, 2, (8, 4, 2), True)
        patch = jax.ShapeDtypeStruct((1, 2, 10, 10, 4), jnp.float32)
        image = jax.ShapeDtypeStruct((1, 16, 80, 80, 1), jnp.float32)
        params = jax.eval_shape(head.init, jax.random.PRNGKey(0), patch, image)
        assert jax.eval_shape(head.apply, params, patch, image).shape == (1, 16, 80, 80, 2)


def test_3d_resize_and_downsample_match_jax_and_box_means():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 4, 5, 2)).astype(np.float32)
    want = jax.jit(lambda v: jax.image.resize(v, (1, 6, 8, 10, 2), "bilinear"))(x)  # trilinear
    np.testing.assert_allclose(jax.jit(lambda v: segment_model.resize(v, (6, 8, 10)))(x), want, atol=1e-5)
    image = rng.normal(size=(1, 4, 6, 8, 1)).astype(np.float32)
    box = image.reshape(1, 2, 2, 3, 2, 4, 2, 1).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(jax.jit(lambda v: segment_model.downsample(v, (2, 3, 4)))(image), box, atol=1e-6)


# ---------------------------------------------------------------- data and the way back

SPACING = (1.0, 1.2, 2.0)  # x, y, z mm
SHAPE = (10, 12, 4)  # x, y, z voxels


def _nifti(path, array, spacing=SPACING):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _volumes(tmp_path, target, volume_shape=()):
    """Three patients (train, val, test), one volume each with an off-centre lesion (val: none)."""
    rng = np.random.default_rng(0)
    lines = ["patient_id,path,split,mask_path"]
    for pid, split in (("A", "train"), ("B", "val"), ("C", "test")):
        mask = np.zeros(SHAPE, np.uint8)
        if pid != "B":
            mask[1:5, 2:9, 1:3] = 1
            mask[6, 10, 3] = 1
        image = 100 + 10 * rng.random(SHAPE) + 50 * mask
        lines.append(f"{pid},{_nifti(tmp_path / f'{pid}.nii.gz', image)},{split},"
                     f"{_nifti(tmp_path / f'{pid}_m.nii.gz', mask)}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    config = load_config("segment", "smoke3d")
    config.segment.manifest = str(tmp_path / "m.csv")
    config.segment.volume_shape = volume_shape
    run_data = smoke_config_3d().data
    run_data.target_spacing = target
    return data3d.load_volumes(config, str(tmp_path), "", run_data, patch=6, mean=0.5, std=0.25, say=lambda m: None)


def _one_hot_back(split, i):
    """The input-grid mask as one-hot logits, mapped to the native grid and argmaxed: the prediction path."""
    onehot = np.eye(2, dtype=np.float32)[split.masks[i]]
    return evaluate3d.to_native(onehot, split.to_input[i], split.native[i].shape).argmax(-1)


def test_volumes_are_padded_to_one_input_shape_and_map_back_exactly(tmp_path):
    # Target spacing half the native one: every native voxel is a resampled voxel, so the way back is exact.
    splits, info = _volumes(tmp_path, (0.5, 0.6, 1.0))
    test = splits["test"]
    assert info["input_shape"] == [12, 24, 24]  # (8, 24, 20) resampled voxels rounded up to patch 6
    assert test.images.shape == (1, 12, 24, 24, 1) and test.masks.shape == (1, 12, 24, 24)
    native = axial_dhw(read_image(str(tmp_path / "C_m.nii.gz")).array)
    np.testing.assert_array_equal(test.native[0], native)  # the mask file's grid, axial layout
    np.testing.assert_allclose(test.spacing[0], (2.0, 1.2, 1.0))  # (d, h, w) = (z, y, x) mm
    assert test.masks[0].sum() > 7 * native.sum()  # resampled x2 per axis (ties: 1 or 3 copies), none lost
    assert np.isclose(test.images[0, 0, 0, 0, 0], -0.5 / 0.25)  # padding: 0 before mean/std, as pretraining
    for split in splits.values():
        np.testing.assert_array_equal(_one_hot_back(split, 0), split.native[0])
    assert info["hd95_unit"] == "mm"


def test_volumes_larger_than_the_input_are_scaled_down_and_still_map_back(tmp_path):
    splits, info = _volumes(tmp_path, (0.5, 0.6, 1.0), volume_shape=(6, 12, 12))
    test = splits["test"]
    assert test.masks.shape == (1, 6, 12, 12)
    back, gt = _one_hot_back(test, 0), test.native[0]
    assert back.shape == gt.shape
    assert 2 * (back & gt).sum() / (back.sum() + gt.sum()) > 0.7  # a half-size copy of a small lesion


def test_perfect_predictions_score_one_and_zero_mm_and_empty_cases_follow_the_rule(tmp_path):
    splits, _ = _volumes(tmp_path, (2.0, 2.4, 4.0))  # coarser than native: evaluation stays on the native grid
    for name, split in splits.items():
        levels = evaluate3d.evaluate(list(split.native), split, 2, "nan")
        dice, hd = levels["volume"]["dice"][0, 0], levels["volume"]["hd95"][0, 0]
        if name == "val":  # empty ground truth, empty prediction: left out
            assert np.isnan(dice) and np.isnan(hd)
        else:
            assert dice == 1.0 and hd == 0.0
        assert levels["patient"]["ids"] == [str(split.patients[0])]
    val = splits["val"]
    spurious = [np.ones_like(val.native[0])]
    levels = evaluate3d.evaluate(spurious, val, 2, "one")
    assert levels["volume"]["dice"][0, 0] == 0.0 and np.isinf(levels["volume"]["hd95"][0, 0])


def test_augmentation_moves_image_and_mask_together():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 6, 12, 12), np.uint8)
    masks[:, 2:5, 3:9, 1:6] = 1
    images = masks[..., None].astype(np.float32)
    x, m = data3d.augment(images, masks, rng, flip_p=1.0, crop_scale=(1.0, 1.0))
    np.testing.assert_array_equal(m, masks[..., ::-1])  # flipped left-right (W) only
    x, m = data3d.augment(images, masks, rng, flip_p=0.5, crop_scale=(0.5, 0.9))
    assert x.shape == images.shape and m.shape == masks.shape and m.dtype == np.uint8
    assert ((x[..., 0] > 0.5) == (m == 1)).mean() > 0.97
    assert not np.array_equal(m, masks)


# ---------------------------------------------------------------- end to end


def _run(config, tmp_path_factory, name):
    workdir = tmp_path_factory.mktemp(name)
    with contextlib.redirect_stdout(io.StringIO()):
        results = segment.run(config, str(workdir))
    return workdir, results


@pytest.fixture(scope="module")
def segment3d_run(smoke_checkpoints_3d, smoke_demo_dir, tmp_path_factory):
    config = load_config("segment", "smoke3d")
    config.segment.checkpoint_dir = str(smoke_checkpoints_3d)
    config.data.demo_dir = str(smoke_demo_dir)
    return _run(config, tmp_path_factory, "segment3d")


def test_segment3d_writes_volume_metrics_baseline_and_native_predictions(segment3d_run):
    workdir, _ = segment3d_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["spatial_dims"] == 3 and saved["hd95_unit"] == "mm" and "left out of the mean" in saved["rules"]
    assert saved["input_size"] == [12, 42, 42]  # 8 x 37 x 37 voxels at 6 mm, padded to multiples of 6
    record = saved["inits"]["pretrained"]
    assert record["step"] == 2 and record["latest"] and record["path"].endswith(os.path.join("checkpoints", "2"))
    assert record["content_hash"] != saved["inits"]["random_init"]["content_hash"]
    assert [(r["init"], r["head"], r["fraction"]) for r in saved["runs"]] == [
        (i, h, f) for i in ("random_init", "pretrained") for h in ("linear", "decoder") for f in (0.5, 1.0)]
    for r in saved["runs"]:
        assert r["train_volumes"] > 0 and set(r["test"]) == {"volume", "patient"}
        table = r["per_case"]["volume"]
        assert len(table["ids"]) == r["test"]["volume"]["cases"] == 12  # 4 test patients x 3 series
        for d, h in zip(table["dice"], table["hd95"]):
            # Dice in [0, 1]; both empty: NaN for both; exactly one empty: Dice 0 and HD95 inf; else HD95 >= 0 mm.
            if d[0] == "nan":
                assert h[0] == "nan"
            else:
                assert 0.0 <= d[0] <= 1.0 and (h[0] == "inf" and d[0] == 0.0 or h[0] != "inf" and h[0] >= 0.0)
        assert r["test"]["patient"]["cases"] == 4
    full = {r["init"]: r["train_patients"] for r in saved["runs"] if r["fraction"] == 1.0}
    assert all(r["train_patients"] == full[r["init"]] // 2 for r in saved["runs"] if r["fraction"] == 0.5)
    assert "Dice lesion / volume" in (workdir / "results.md").read_text()
    overlays = [f"overlays_{i}_{h}.png" for i in ("random_init", "pretrained") for h in ("linear", "decoder")]
    for name in ["few_label.png", "training_curves.png"] + overlays:
        assert (workdir / name).stat().st_size > 0, name
    # Predictions are written on the grid of each case's mask file (48 x 48 x 8 at 4.67 mm, not the input).
    folder = workdir / "predictions" / "pretrained_decoder"
    files = sorted(os.listdir(folder))
    assert files and all(f.endswith(".nii.gz") for f in files)
    manifest = {line.split(",")[0] + "_" + line.split(",")[1].rstrip("/").split("/")[-1]: line.split(",")[-1]
                for line in open(saved["manifest"]).read().splitlines()[1:]}
    for f in files:
        pred = read_image(str(folder / f))
        mask = read_image(os.path.join(os.path.dirname(saved["manifest"]), manifest[f[:-len(".nii.gz")]]))
        assert pred.array.shape == mask.array.shape == (48, 48, 8)
        np.testing.assert_allclose(pred.affine, mask.affine, atol=1e-4)


def test_predict_returns_labels_on_each_native_grid(segment3d_run, smoke_checkpoints_3d, smoke_demo_dir, tmp_path):
    config = load_config("segment", "smoke3d")
    config.segment.checkpoint_dir = str(smoke_checkpoints_3d)
    config.data.demo_dir = str(smoke_demo_dir)
    config.segment.random_baseline = False
    loaded = segment.load_backbones(config)
    backbone, inits, mean, std = loaded.module, loaded.inits, loaded.mean, loaded.std
    run_dir, run_data = loaded.run_dir, loaded.run_data
    splits, _ = data3d.load_volumes(config, str(tmp_path), run_dir, run_data, patch=6, mean=mean, std=std,
                                 say=lambda m: None)
    test = splits["test"]
    spec = segment_model.SegSpec(backbone, segment_model.build_head("linear", 2, (8,), True), None, 1, 2, 1.0, 1.0, 0.0, False)
    params = {"head": segment_model.init_fn(spec.head)(jax.random.PRNGKey(0), jnp.zeros((1, 2, 7, 7, backbone.embed_dim)),
                                            jnp.asarray(test.images[:1]))["params"],
              "backbone": inits["pretrained"][0]}
    d = backbone.embed_dim
    stats = {"patch_mean": jnp.zeros(d), "patch_std": jnp.ones(d)}
    native, probs = evaluate3d.predict(spec, params, stats, test, None, 5)
    assert probs is None and len(native) == len(test)
    assert all(p.shape == g.shape == (8, 48, 48) and p.dtype == np.uint8 for p, g in zip(native, test.native))


# ---------------------------------------------------------------- 2D / 3D mismatches


@pytest.mark.parametrize("variant, dims", [("smoke", 3), ("smoke3d", 2)])
def test_a_2d_config_with_a_3d_checkpoint_or_the_reverse_is_one_sentence(variant, dims, smoke_checkpoints,
                                                                          smoke_checkpoints_3d):
    config = load_config("segment", variant)
    config.segment.checkpoint_dir = str(smoke_checkpoints_3d if dims == 3 else smoke_checkpoints)
    with pytest.raises(ValueError, match=rf"has a {dims}D backbone .* but config\.segment\.spatial_dims="
                                         rf"{5 - dims}; use ") as exc:
        segment.load_backbones(config)
    assert "\n" not in str(exc.value)


def test_official_2d_weights_are_refused_for_volumes():
    config = load_config("segment", "smoke3d")
    config.segment.official_weights = "dinov2_vits14.pth"
    with pytest.raises(ValueError, match="are 2D DINOv2 weights but config.segment.spatial_dims=3"):
        validate(config)


def test_multitask_smoke3d_trains_a_fine_tuned_backbone_with_a_volume_label(smoke_checkpoints_3d, smoke_demo_dir,
                                                                           tmp_path_factory):
    config = load_config("segment", "smoke3d", multitask=True)
    config.segment.checkpoint_dir = str(smoke_checkpoints_3d)
    config.data.demo_dir = str(smoke_demo_dir)
    config.segment.random_baseline = False  # the frozen run above has the baseline; keep this one short
    config.segment.steps = 2
    config.segment.eval_every = 2
    workdir, results = _run(config, tmp_path_factory, "multitask3d")
    (r,) = results["runs"]
    assert r["backbone"] == "fine-tuned" and r["classification"]["accuracy"] >= 0.0
    assert "volume" in results["task"]  # the demo label: the lesion class the volume shows
    assert len(r["classification"]["confusion_matrix"]) == len(results["classification_classes"])
    assert os.listdir(workdir / "models" / "pretrained_decoder_f1_s0" / "checkpoints")
