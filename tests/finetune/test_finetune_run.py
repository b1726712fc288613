"""Fine-tuning end to end: the ``:smoke`` config through the command line, and the error sentences and
the official-weights init in process.

The command-line run starts from the earlier of the two checkpoints of ``smoke_checkpoints`` (a
directory in a pretraining run's format, so it must warn), freezes the first of the two blocks,
trains two targets (the demo's slice-level lesion class and the contrast) on two label fractions,
with the random-init baseline.
"""

import csv
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax import metrics
from medjax import runs
from medjax.finetune import trainer as finetune
from medjax.finetune.validate import validate
from tests import helpers
from tests.helpers import medjax

SMOKE = "--config=configs/finetune.py:smoke"


def load_config(variant="smoke"):
    return helpers.load_config("finetune", variant)


@pytest.fixture(scope="module")
def finetune_run(smoke_checkpoints, smoke_demo_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune")
    proc = medjax(workdir, f"--config.finetune.checkpoint_dir={smoke_checkpoints}", "--config.finetune.step=1",
                  "--config.finetune.freeze_blocks=1", f"--config.data.demo_dir={smoke_demo_dir}", config=SMOKE)
    return workdir, proc


def test_run_writes_tables_plots_and_a_checkpoint(finetune_run):
    workdir, proc = finetune_run
    names = ["results.json", "results.md", "training_curves.png", "label_fractions.png"]
    names += [f"confusion_{i}_{t}.png" for i in ("random_init", "pretrained") for t in ("lesion", "contrast")]
    for name in names:
        assert (workdir / name).stat().st_size > 0, name
    results = json.loads((workdir / "results.json").read_text())
    assert list(results["inits"]) == ["random_init", "pretrained"]
    record = results["inits"]["pretrained"]
    assert record["step"] == 1 and record["latest"] is False and record["latest_step"] == 2
    assert len(record["content_hash"]) == 16
    assert [(r["init"], r["fraction"]) for r in results["runs"]] == [
        ("random_init", 0.5), ("random_init", 1.0), ("pretrained", 0.5), ("pretrained", 1.0)]
    assert {(r["init"], r["fraction"], r["target"]) for r in results["summary"]} == {
        (i, f, t) for i in ("random_init", "pretrained") for f in (0.5, 1.0) for t in ("lesion", "contrast")}
    half, full = results["runs"][2], results["runs"][3]
    assert half["train_patients"] < full["train_patients"] and full["train_slices"] == results["num_slices"]["train"]
    assert full["timing"]["minutes_per_epoch"] > 0 and full["timing"]["compile_s"] > 0
    assert results["targets"]["contrast"]["class_names"] == ["FLAIR", "T1", "T2"]
    table = (workdir / "results.md").read_text()
    for row in ("| random_init | 0.5 | lesion |", "| pretrained | 1 | contrast |", "| pretrained | ring |"):
        assert row in table, row
    assert "| pretrained | 1 | lesion |" in proc.stdout  # the table is printed too
    assert "WARNING" in proc.stdout and "NOT the latest checkpoint" in proc.stdout
    assert "(not latest)" in table


def test_test_metrics_recompute_from_the_saved_predictions(finetune_run):
    workdir, _ = finetune_run
    results = json.loads((workdir / "results.json").read_text())
    for run in results["runs"]:
        for target, saved in run["test_predictions"].items():
            again = metrics.classification_report(
                np.array(saved["labels"]), np.array(saved["predictions"]), np.array(saved["probabilities"]),
                results["targets"][target]["class_names"])
            assert json.loads(json.dumps(again)) == run["test"][target]


def test_frozen_block_is_the_pretrained_one_bit_for_bit(finetune_run, smoke_checkpoints):
    workdir, _ = finetune_run
    results = json.loads((workdir / "results.json").read_text())
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.restore(os.path.join(results["checkpoint"]["path"], "state"))
    run = runs.open_run(str(smoke_checkpoints), 1)
    pretrained, step = run.params, run.step
    assert step == 1 and set(saved) == {"backbone", "heads"} and set(saved["heads"]) == {"lesion", "contrast"}
    flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(v) for p, v in  # noqa: E731
                         jax.tree_util.tree_flatten_with_path(tree)[0]}
    before, after = flat(pretrained), flat(saved["backbone"])
    assert set(before) == set(after)
    frozen = [k for k in before if any(s in k for s in ("blocks_0", "patch_embed", "pos_embed", "cls_token",
                                                        "register_tokens", "mask_token"))]
    assert len(frozen) > 10
    for k in frozen:
        assert after[k].tobytes() == before[k].tobytes(), k
    assert not np.array_equal(after["['blocks_1']['attn']['qkv']['kernel']"],
                              before["['blocks_1']['attn']['qkv']['kernel']"])
    assert sorted(results["frozen_parameters"]) == sorted(
        "backbone/" + k.strip("[]'").replace("']['", "/") for k in frozen)


def _manifest(demo_dir, out, edit):
    """A copy of the demo manifest with absolute paths, rows changed by ``edit(row)``."""
    src = os.path.join(demo_dir, "manifest.csv")
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("path", "mask_path"):
            r[key] = os.path.join(os.path.dirname(src), r[key])
        edit(r)
    path = os.path.join(out, "manifest.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _random_config(**finetune_overrides):
    """The smoke config with a random-init 2-block model (no checkpoint to load)."""
    c = load_config()
    c.finetune.init = "random"
    c.finetune.image_size = 28
    c.model.arch, c.model.patch_size = "vit_tiny", 7
    c.model.embed_dim, c.model.depth, c.model.num_heads = 32, 2, 2
    for key, value in finetune_overrides.items():
        c.finetune[key] = value
    return c


def _contrast_pd_in_test(r):
    if r["split"] == "test":
        r["contrast"] = "PD"


def _no_val(r):
    if r["split"] == "val":
        r["split"] = "train"


@pytest.mark.parametrize("case, match", [
    ("column", r"names 'grade', which is not a column of .* \(it has patient_id, path, split, lesion, contrast"),
    ("test_only_class", r"label column 'contrast' in manifest.csv appear in val/test but never in train"),
    ("no_val", r"has no rows in the 'val' split"),
    ("fraction", r"label_fractions holds 1.5; every label fraction must lie in \(0, 1\]"),
    ("no_checkpoint_dir", r"config.finetune.checkpoint_dir is empty"),
    ("too_many_frozen", r"freeze_blocks=3 must lie in \[0, 2\]"),
])
def test_user_errors_are_one_sentence(case, match, finetune_run, smoke_demo_dir, tmp_path):
    c = _random_config()
    if case == "column":
        c.finetune.targets = ("lesion", "grade")
    elif case == "test_only_class":
        c.finetune.manifest = _manifest(smoke_demo_dir, tmp_path, _contrast_pd_in_test)
    elif case == "no_val":
        c.finetune.manifest = _manifest(smoke_demo_dir, tmp_path, _no_val)
    elif case == "fraction":
        c.finetune.label_fractions = (0.1, 1.5)
    elif case == "no_checkpoint_dir":
        c.finetune.init = "checkpoint"
    elif case == "too_many_frozen":
        c.finetune.freeze_blocks = 3
    c.data.demo_dir = str(smoke_demo_dir)  # written by finetune_run
    c.data.extra_columns = "series_description"  # a column of the demo manifest that is no label
    with pytest.raises(ValueError, match=match) as err:
        finetune.run(c, str(tmp_path))
    if case == "test_only_class":  # a manifest problem is shown whole: its sentence, then the CSV lines
        assert str(err.value).splitlines()[1].strip() == "class 'PD' in test: line(s) 11, 12, 13, 14, 15"
    else:
        assert "\n" not in str(err.value)


def test_checkpoint_of_another_architecture_is_refused(smoke_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_checkpoints / "checkpoints" / "2", run / "checkpoints" / "2")
    meta = run / "checkpoints" / "2" / "meta" / "metadata"
    saved = json.loads(meta.read_text())
    saved["config"]["model"]["depth"] = 3  # the weights have 2 blocks
    meta.write_text(json.dumps(saved))
    c = load_config()
    c.finetune.checkpoint_dir = str(run)
    with pytest.raises(ValueError, match="does not match the model its saved config builds"):
        finetune.run(c, str(tmp_path / "out"))


def test_command_line_error_is_one_line(tmp_path):
    proc = medjax(tmp_path, "--config.finetune.init=pretrained", config=SMOKE, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "medjax: error: config.finetune.init='pretrained' is not valid; choose one of checkpoint, official, random.")


def test_official_weights_init(tmp_path):
    convert = pytest.importorskip("medjax.models.convert")
    if not hasattr(convert, "load_official"):
        pytest.skip("medjax.models.convert.load_official is not available")
    from medjax.models.vit import VisionTransformer

    # A tiny 3-channel "official" backbone (64-dim heads, as DINOv2), exported in the official key layout.
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=3, embed_dim=64, depth=2, num_heads=1,
                              num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 3), np.float32))["params"]
    weights = str(tmp_path / "official.npz")
    convert.save_official(weights, params, model=model)
    c = load_config()
    c.finetune.init = "official"
    c.finetune.official_weights = weights
    c.finetune.image_size = 42
    init = finetune.load_init(c)
    backbone, loaded, record, size, run_dir = init.backbone, init.params, init.record, init.size, init.run_dir
    mean, std = init.mean, init.std
    assert record["kind"] == "official" and record["path"] == weights and len(record["content_hash"]) == 16
    assert (size, run_dir, mean, std) == (42, None, (convert.GRAY_MEAN,), (convert.GRAY_STD,))
    # gray input: the RGB patch kernel is folded into one channel; the grid is resampled to 42 px
    assert backbone.in_chans == 1 and loaded["patch_embed"]["proj"]["kernel"].shape == (7, 7, 1, 64)
    assert loaded["pos_embed"].shape == (1, 1 + 6 * 6, 64)
    np.testing.assert_allclose(loaded["blocks_1"]["mlp"]["fc1"]["kernel"], params["blocks_1"]["mlp"]["fc1"]["kernel"])
    assert "backbone/blocks_1/attn/qkv/kernel" in finetune.frozen_names(backbone, 2)
    c.finetune.official_weights = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finetune.load_init(c)


def test_official_mae_weights_start_the_encoder(tmp_path):
    """init=official with official_kind=mae: the encoder of the official tiny MAE of the parity fixture."""
    from medjax.models.convert_mae import load_official_mae

    z = np.load(os.path.join(helpers.REPO, "tests", "fixtures", "mae_c1.npz"))
    weights = str(tmp_path / "mae.npz")
    np.savez(weights, **{k[3:]: z[k] for k in z.files if k.startswith("sd/")})
    c = load_config()
    c.finetune.init, c.finetune.official_kind, c.finetune.official_weights = "official", "mae", weights
    c.finetune.image_size = 32
    c.model.num_heads = 4  # a non-official width: its heads are not in the weights
    init = finetune.load_init(c)
    _, want = load_official_mae(weights, img_size=32, in_chans=1, num_heads=4)
    assert init.backbone.embed_dim == 48 and init.backbone.init_values is None and init.record["kind"] == "official"
    for got, expected in zip(jax.tree.leaves(init.params), jax.tree.leaves(want["encoder"]), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("variant", ["", "demo", "smoke"])
def test_config_variants_are_valid(variant):
    c = load_config(variant)
    validate(c)
    assert c.mode == "finetune"


def test_a_short_fine_tune_from_official_weights(tmp_path, smoke_demo_dir):
    """init=official end to end: converted official weights (RGB, 4 registers) fine-tuned on the smoke demo
    slices with the first block frozen; the frozen block stays the official one, the rest trains."""
    from medjax.models import convert
    from medjax.models.vit import VisionTransformer

    model = VisionTransformer(img_size=28, patch_size=7, in_chans=3, embed_dim=64, depth=2, num_heads=1,
                              num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    weights = str(tmp_path / "official.npz")
    convert.save_official(weights, model.init(jax.random.PRNGKey(3), np.zeros((1, 28, 28, 3), np.float32))["params"],
                          model=model)
    c = load_config()
    c.finetune.init, c.finetune.official_weights, c.finetune.image_size = "official", weights, 28
    c.finetune.baselines, c.finetune.label_fractions, c.finetune.freeze_blocks = (), (1.0,), 1
    c.data.demo_dir = str(smoke_demo_dir)
    workdir = tmp_path / "run"
    results = finetune.run(c, str(workdir))
    assert results["inits"]["official"]["kind"] == "official" and [r["init"] for r in results["runs"]] == ["official"]
    for target in ("lesion", "contrast"):
        assert 0.0 <= results["runs"][0]["test"][target]["accuracy"] <= 1.0
    _, official = convert.load_official(weights, img_size=28, in_chans=1)
    with ocp.StandardCheckpointer() as ckptr:
        tuned = ckptr.restore(os.path.join(results["checkpoint"]["path"], "state"))["backbone"]
    jax.tree.map(np.testing.assert_array_equal, tuned["blocks_0"], official["blocks_0"])  # frozen: official
    assert np.abs(tuned["blocks_1"]["mlp"]["fc1"]["kernel"] - official["blocks_1"]["mlp"]["fc1"]["kernel"]).max() > 0
