"""The multi-task trainer (``configs/multitask.py:smoke``): one fine-tuned backbone, a segmentation decoder
and a classification head trained together, reported side by side."""

import contextlib
import io
import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax.segment import trainer as segment
from medjax.segment.validate import validate
from tests.helpers import load_config as load

VARIANTS = ("", "demo", "demo_cxr", "smoke", "demo3d", "smoke3d")


@pytest.mark.parametrize("name", ["segment", "multitask"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_valid(name, variant):
    config = load(name, variant)
    config.segment.checkpoint_dir = "runs/demo"
    validate(config)
    assert config.mode == "segment"
    assert (config.segment.classification_weight > 0) == (name == "multitask")


@pytest.fixture(scope="module")
def multitask_run(smoke_checkpoints, smoke_demo_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multitask")
    config = load("multitask", "smoke")
    config.segment.checkpoint_dir = str(smoke_checkpoints)
    config.data.demo_dir = str(smoke_demo_dir)
    config.segment.random_baseline = False
    with contextlib.redirect_stdout(io.StringIO()):
        results = segment.run(config, str(workdir))
    return workdir, results


def test_multitask_reports_dice_and_accuracy_side_by_side(multitask_run):
    workdir, results = multitask_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["classification_classes"] == ["none", "round", "ring", "diffuse"]
    (run,) = saved["runs"]
    assert (run["init"], run["head"], run["backbone"]) == ("pretrained", "decoder", "fine-tuned")
    report = run["classification"]
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["balanced_accuracy"] <= 1.0
    assert sum(row["support"] for row in report["per_class"]) == run["test"]["slice"]["cases"]  # every test slice
    assert 0.0 <= run["test"]["patient"]["classes"]["lesion"]["dice_mean"] <= 1.0
    table = (workdir / "results.md").read_text()
    assert "| accuracy | bal. accuracy |" in table and "| pretrained | decoder | fine-tuned |" in table
    assert (workdir / "overlays_pretrained_decoder.png").stat().st_size > 0
    assert not (workdir / "few_label.png").exists()  # one fraction: no few-label plot


def test_fine_tuned_backbone_is_saved_with_the_heads(multitask_run, smoke_checkpoints):
    workdir, results = multitask_run
    (name,) = os.listdir(workdir / "models")
    path = workdir / "models" / name / "checkpoints" / "6" / "state"
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(str(path))
    assert set(state["params"]) == {"backbone", "head", "cls_head"}
    with ocp.StandardCheckpointer() as ckptr:
        start = ckptr.restore(str(smoke_checkpoints / "checkpoints" / "2" / "state"))["teacher"]["backbone"]
    moved = np.abs(state["params"]["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]
                   - start["blocks_0"]["attn"]["qkv"]["kernel"]).max()
    assert moved > 0  # the backbone was trained, not frozen


def test_rows_without_a_class_train_the_segmentation_only():
    """A film without a diagnosis (label < 0) adds nothing to the classification loss and all of its pixels
    to the segmentation loss."""
    import jax
    import jax.numpy as jnp
    import optax

    from medjax.segment import model

    spec = model.SegSpec(None, model.LinearSegHead(2), model.ClassifierHead(3), 1, 2, 1.0, 1.0, 1.0, True)
    rng = np.random.default_rng(0)
    batch = {"patch": jnp.asarray(rng.normal(size=(2, 2, 2, 4)), jnp.float32),
             "pooled": jnp.asarray(rng.normal(size=(2, 6)), jnp.float32),
             "images": jnp.zeros((2, 4, 4, 1)), "masks": jnp.asarray(rng.integers(0, 2, (2, 4, 4)), jnp.int32)}
    params = {"head": {"classifier": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), "bias": jnp.zeros(2)}},
              "cls_head": {"classifier": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
                                          "bias": jnp.zeros(3)}}}
    stats = {"patch_mean": jnp.zeros(4), "patch_std": jnp.ones(4), "pooled_mean": jnp.zeros(6),
             "pooled_std": jnp.ones(6), "cls_weights": jnp.asarray([1.0, 2.0, 0.5])}
    _, parts = model.total_loss(params, stats, {**batch, "labels": jnp.asarray([1, -1])}, jax.random.PRNGKey(0), spec)
    logits = batch["pooled"] @ params["cls_head"]["classifier"]["kernel"]
    first = optax.softmax_cross_entropy_with_integer_labels(logits[:1], jnp.asarray([1]))[0]
    assert float(parts["classification_ce"]) == pytest.approx(float(first), rel=1e-5)
    _, both = model.total_loss(params, stats, {**batch, "labels": jnp.asarray([1, 2])}, jax.random.PRNGKey(0), spec)
    assert float(both["classification_ce"]) != pytest.approx(float(first), rel=1e-3)
    assert float(both["ce"]) == float(parts["ce"])  # the segmentation loss sees both films either way
