"""3D fine-tuning: the volume transforms, and ``configs/finetune.py:smoke3d`` end to end in process from the
``smoke_checkpoints_3d`` run (a 3D ViT, patch 6, 24^3 crops), with the random-init baseline, two label
fractions and the first of the two blocks frozen; then the sentences that refuse 2D/3D mix-ups.
"""

import contextlib
import io
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax.data.augment3d import crop_box_3d
from medjax.data.views3d import SingleView3D, relative_box
from medjax import runs
from medjax.data.sources import demo_fingerprint
from medjax.finetune import data as finetune_data
from medjax.finetune import trainer as finetune
from medjax.finetune.validate import validate
from tests import helpers


def load_config(variant="smoke3d"):
    return helpers.load_config("finetune", variant)



def _volume(seed=0, shape=(10, 14, 18)):
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def test_eval_view_is_the_whole_volume_resized_and_normalised():
    t = SingleView3D(8, mean=(0.5,), std=(0.25,))
    ramp = np.broadcast_to(np.linspace(0.0, 1.0, 18, dtype=np.float32), (10, 14, 18))  # rises along W
    x = t.eval(ramp)
    assert x.shape == (8, 8, 8, 1) and x.dtype == np.float32
    assert np.all(np.diff(x[..., 0], axis=2) > 0) and np.allclose(np.diff(x[..., 0], axis=0), 0)
    assert -2.0 - 1e-6 <= x.min() < -1.5 and 1.5 < x.max() <= 2.0 + 1e-6  # (clip(v) - 0.5) / 0.25
    const = t.eval(np.full((5, 9, 7), 0.75, np.float32))  # any box shape to a cube; values kept
    np.testing.assert_allclose(const, 1.0, atol=1e-6)
    batch = SingleView3D(6, channels=3).eval_batch([_volume(0), _volume(1, (4, 6, 6))])
    assert batch.shape == (2, 6, 6, 6, 3) and np.array_equal(batch[..., 0], batch[..., 2])
    assert SingleView3D(6).eval_batch([]).shape == (0, 6, 6, 6, 1)


def test_train_view_is_seeded_and_flips_left_right_only():
    v = _volume()
    t = SingleView3D(8, scale=(0.3, 1.0), flip_p=0.5)
    a = t.train_batch([v, v], np.random.default_rng(3))
    assert a.shape == (2, 8, 8, 8, 1)
    np.testing.assert_array_equal(a, t.train_batch([v, v], np.random.default_rng(3)))
    assert not np.array_equal(a, t.train_batch([v, v], np.random.default_rng(4)))
    # The whole volume as the box (a slab too): the train view is the eval view, mirrored along W when flipped.
    whole = SingleView3D(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0)
    slab = _volume(2, (5, 12, 16))
    np.testing.assert_array_equal(whole.train(slab, np.random.default_rng(0)), whole.eval(slab)[:, :, ::-1])
    kept = SingleView3D(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    np.testing.assert_array_equal(kept.train(slab, np.random.default_rng(0)), kept.eval(slab))
    with pytest.raises(ValueError, match="fractions of the volume's voxels"):
        SingleView3D(8, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="is not a volume"):
        t.eval(np.zeros((8, 8), np.float32))


def test_train_boxes_cover_the_asked_fraction_of_a_thin_slab():
    shape, rng = (16, 75, 75), np.random.default_rng(0)
    for scale in ((0.5, 0.5), (0.2, 0.3)):
        boxes = [relative_box(shape, scale, (3 / 4, 4 / 3), rng) for _ in range(200)]
        fractions = [d * h * w / np.prod(shape) for *_, d, h, w in boxes]
        assert abs(np.median(fractions) - np.mean(scale)) < 0.05, (scale, np.median(fractions))
        for sd, sh, sw, d, h, w in boxes:
            assert 0 <= sd <= 16 - d and 0 <= sh <= 75 - h and 0 <= sw <= 75 - w
    # the multi-crop's voxel cubes cannot: all 16 slices, and far less than half of the voxels
    voxel = [crop_box_3d(shape, (0.5, 0.5), (3 / 4, 4 / 3), rng) for _ in range(200)]
    assert np.median([d * h * w / np.prod(shape) for *_, d, h, w in voxel]) < 0.35


@pytest.fixture(scope="module")
def run3d(smoke_checkpoints_3d, smoke_demo_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune3d")
    c = load_config("smoke3d")
    c.finetune.checkpoint_dir = str(smoke_checkpoints_3d)
    c.finetune.freeze_blocks = 1
    c.data.demo_dir = str(smoke_demo_dir)
    c.data.target_spacing = (12.0, 12.0, 12.0)  # not the run's 6 mm: the run's settings must win
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = finetune.run(c, str(workdir))
    return workdir, results, out.getvalue()


def test_smoke3d_trains_every_init_on_whole_volumes(run3d):
    workdir, results, stdout = run3d
    assert "train split: 12 series of 4 patients -> 12 volumes at 6x6x6 mm; first volume 8x37x37" in stdout
    assert results == json.loads(json.dumps(json.loads((workdir / "results.json").read_text())))
    for name in ("results.md", "training_curves.png", "label_fractions.png", "confusion_pretrained_lesion.png"):
        assert (workdir / name).stat().st_size > 0, name
    assert list(results["inits"]) == ["random_init", "pretrained"]
    assert results["inits"]["pretrained"]["step"] == 2 and results["inits"]["pretrained"]["latest"]
    # one example per series: 4 patients x 3 contrasts per split
    assert results["unit"] == "volumes" and results["num_volumes"] == {"train": 12, "val": 12, "test": 12}
    assert results["targets"]["lesion"]["class_names"] == ["none", "round", "ring", "diffuse"]
    assert "of the patient" in results["targets"]["lesion"]["description"]
    assert [(r["init"], r["fraction"]) for r in results["runs"]] == [
        ("random_init", 0.5), ("random_init", 1.0), ("pretrained", 0.5), ("pretrained", 1.0)]
    for r in results["runs"]:
        assert r["train_volumes"] == 3 * r["train_patients"]
        assert len(r["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in r["history"])
        for t in ("lesion", "contrast"):
            test = r["test"][t]
            assert 0.0 <= test["balanced_accuracy"] <= 1.0 and np.isfinite(test["macro_f1"])
            assert len(r["test_predictions"][t]["labels"]) == 12
    assert {(s["init"], s["target"]) for s in results["summary"]} == {
        (i, t) for i in ("random_init", "pretrained") for t in ("lesion", "contrast")}
    assert "volumes train / val / test: 12 / 12 / 12" in (workdir / "results.md").read_text()
    assert results["config"]["model"]["spatial_dims"] == 3
    assert "| pretrained | 1 | lesion |" in stdout


def test_frozen_block_is_the_pretrained_one_bit_for_bit_in_3d(run3d, smoke_checkpoints_3d):
    _, results, _ = run3d
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.restore(os.path.join(results["checkpoint"]["path"], "state"))
    pretrained = runs.open_run(str(smoke_checkpoints_3d), -1).params
    assert saved["backbone"]["patch_embed"]["proj"]["kernel"].shape == (6, 6, 6, 1, 32)  # cubic patches
    before = {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
        pretrained)}
    after = {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
        saved["backbone"])}
    assert set(before) == set(after)
    frozen = sorted(k[len("backbone/"):] for k in results["frozen_parameters"])
    assert "blocks_0/attn/qkv/kernel" in frozen and "pos_embed" in frozen
    for k in frozen:
        assert after[k].tobytes() == before[k].tobytes(), k
    assert not np.array_equal(after["blocks_1/attn/qkv/kernel"], before["blocks_1/attn/qkv/kernel"])


def test_random_init_3d_builds_a_cubic_backbone(tmp_path):
    c = load_config("smoke3d")
    c.finetune.init = "random"
    init = finetune.load_init(c)
    backbone, params, record, size, run_dir = init.backbone, init.params, init.record, init.size, init.run_dir
    assert (backbone.spatial_dims, size, params, run_dir, record["kind"]) == (3, 96, None, None, "random")
    c.finetune.image_size = 12
    backbone = finetune.load_init(c).backbone
    shapes = jax.eval_shape(lambda: finetune.random_backbone(backbone, jax.random.PRNGKey(0)))
    assert shapes["pos_embed"].shape == (1, 1 + 2 ** 3, 32)


@pytest.mark.parametrize("case, match", [
    ("2d_checkpoint", r"config.model.spatial_dims=3 asks for 3D fine-tuning, but .* holds a 2D model"),
    ("official", r"init=official loads 2D DINOv2 weights, but config.model.spatial_dims=3"),
    ("slice_cache", r"config.data.cache_dir caches 2D slices, but the backbone is 3D"),
    ("slice_axis", r"config.data.slice_axis='coronal' picks 2D slices, but the backbone is 3D"),
    ("dims", r"config.model.spatial_dims=4 must be 2 \(slices\) or 3 \(volumes\)"),
])
def test_2d_3d_mix_ups_are_one_sentence(case, match, smoke_checkpoints, smoke_checkpoints_3d, tmp_path):
    c = load_config("smoke3d")
    c.finetune.checkpoint_dir = str(smoke_checkpoints_3d)
    if case == "2d_checkpoint":
        c.finetune.checkpoint_dir = str(smoke_checkpoints)
    elif case == "official":
        c.finetune.init, c.finetune.official_weights = "official", "weights.npz"
    elif case == "slice_cache":
        c.data.cache_dir = str(tmp_path / "cache")
    elif case == "slice_axis":
        c.data.slice_axis = "coronal"
    elif case == "dims":
        c.model.spatial_dims = 4
    with pytest.raises(ValueError, match=match) as err:
        finetune.run(c, str(tmp_path / "out"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("stamp, reused", [("current", True), ("stale", False)])
def test_the_runs_demo_data_is_reused_only_when_demo_manifest_would_not_rewrite_it(stamp, reused, tmp_path,
                                                                                   monkeypatch):
    c = load_config("demo3d")
    run_data = tmp_path / "run" / "demo_data"
    run_data.mkdir(parents=True)
    fingerprint = demo_fingerprint(c)
    if stamp == "stale":  # e.g. written before the demo's file layout changed
        fingerprint = {k: v for k, v in fingerprint.items() if k != "layout"}
    (run_data / "demo.json").write_text(json.dumps(fingerprint))
    monkeypatch.setattr(finetune_data, "demo_manifest", lambda config, workdir, say: config.data.demo_dir or workdir)
    where, demo = finetune_data.resolve_manifest(c, str(tmp_path / "out"), str(tmp_path / "run"))
    assert demo and (where == str(run_data)) == reused


@pytest.mark.parametrize("variant", ["demo3d", "smoke3d"])
def test_3d_variants_are_valid(variant):
    c = load_config(variant)
    validate(c)
    assert c.model.spatial_dims == 3 and c.data.target_spacing


def test_unknown_variant_names_the_3d_ones():
    with pytest.raises(ValueError, match="choose one of .*demo3d, smoke3d"):
        load_config("demo4d")
