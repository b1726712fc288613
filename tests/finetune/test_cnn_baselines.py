"""The supervised CNN baselines beside the ViT in fine-tuning (medjax.finetune.cnn), in process.

One ``:smoke`` fine-tuning from the earlier smoke checkpoint (every block trained, so the
random-init ViT shares its compiled step), ResNet-50 and DenseNet-121 at smoke size
(cnn_width 1/16, one block per stage); the ResNet starts from 3-channel weights written in
torchvision's layout (folded to the gray channel on loading), the DenseNet from scratch.
"""

import json

import jax
import numpy as np
import pytest

from medjax.finetune import cnn
from medjax.finetune import trainer as finetune
from medjax.finetune.validate import validate
from medjax.models import convert_cnn, official_io
from medjax.models.cnns import build_cnn
from tests import helpers

INITS = ["random_init", "pretrained", "resnet50", "densenet121"]


def _config(smoke_checkpoints, smoke_demo_dir, **overrides):
    c = helpers.load_config("finetune", "smoke")
    c.finetune.checkpoint_dir, c.finetune.step = str(smoke_checkpoints), 1
    c.finetune.image_size = 32  # DenseNet's last block needs 29 px or more (the smoke ViT's 28 leave it none)
    c.finetune.baselines = ("random", "resnet50", "densenet121")
    c.finetune.label_fractions = (1.0,)
    c.finetune.cnn_width, c.finetune.cnn_depth = 1 / 16, 0.01  # one block (dense layer) per stage
    c.data.demo_dir = str(smoke_demo_dir)
    for key, value in overrides.items():
        c.finetune[key] = value
    return c


@pytest.fixture(scope="module")
def cnn_run(smoke_checkpoints, smoke_demo_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cnn_baselines")
    rgb = build_cnn("resnet50", num_classes=0, in_chans=3, width=1 / 16, depth=0.01)
    variables = jax.jit(rgb.init)(jax.random.PRNGKey(5), np.zeros((1, 32, 32, 3), np.float32))
    weights = str(tmp / "resnet_small.npz")
    official_io.write_weights(weights, convert_cnn.export_state_dict(variables, rgb))
    config = _config(smoke_checkpoints, smoke_demo_dir, resnet50_weights=weights)
    seen = {}
    train_one = finetune.train_one

    def recording(tuner, params, *args, **kwargs):  # keeps each CNN's starting and trained statistics
        out = train_one(tuner, params, *args, **kwargs)
        if isinstance(tuner, cnn.CNNTuner):
            seen[kwargs["tag"].split()[0]] = (tuner.split(params)[0], out["trainable"])
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(finetune, "train_one", recording)
    try:
        results = finetune.run(config, str(tmp / "run"))
    finally:
        mp.undo()
    return tmp / "run", results, seen, variables


def test_every_model_is_in_one_table_with_its_minutes_per_epoch(cnn_run):
    workdir, results, seen, _ = cnn_run
    assert list(results["inits"]) == INITS
    assert results["inits"]["random_init"]["frozen_blocks"] == results["inits"]["pretrained"]["frozen_blocks"] == 0
    assert results["inits"]["resnet50"]["kind"] == "official" and results["inits"]["densenet121"]["kind"] == "random"
    assert results["inits"]["densenet121"]["architecture"].startswith("DenseNet (layers (1, 1, 1, 1), growth 2")
    runs = {r["init"]: r for r in results["runs"]}
    for init in INITS:
        assert runs[init]["timing"]["minutes_per_epoch"] > 0
        assert set(runs[init]["test"]) == {"lesion", "contrast"}
    # trainable parameters: the ViT's without its mask token, the CNNs' without their running statistics
    assert runs["pretrained"]["trainable_parameters"] == runs["random_init"]["trainable_parameters"]
    for name, (before, _) in seen.items():
        assert runs[name]["trainable_parameters"] == sum(v.size for k, v in before.items() if "batch_stats" not in k)
    table = (workdir / "results.md").read_text()
    summary = {(r["init"], r["target"]): r for r in results["summary"]}
    for init in INITS:
        for target in ("lesion", "contrast"):
            row = summary[(init, target)]
            minutes = row["minutes_per_epoch"]["mean"]
            speed = summary[("random_init", target)]["minutes_per_epoch"]["mean"] / minutes
            line = next(s for s in table.splitlines() if s.startswith(f"| {init} | 1 | {target} |"))
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == 3 + 6 + 3
            assert cells[3:9] == [f"{row[m]['mean']:.3f}" for m in (
                "accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc")]
            assert cells[9:] == [f"{minutes:.3g}", f"{runs[init]['trainable_parameters']:,}", f"{speed:.2f}x"]
    assert "| resnet50 | background |" in table or "| resnet50 | none |" in table  # per-class rows too
    assert "first step's compilation excluded" in table
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["runs"][2]["trainable_parameters"] == runs["resnet50"]["trainable_parameters"]


def test_batch_norm_statistics_move_in_training_and_converted_weights_start_the_resnet(cnn_run):
    _, results, seen, rgb_variables = cnn_run
    assert set(seen) == {"resnet50", "densenet121"}
    for name, (before, after) in seen.items():
        stats = [k for k in before if k.startswith("batch_stats/")]
        assert len(stats) > 10
        moved = [k for k in stats if not np.allclose(before[k], after[k])]
        assert len(moved) == len(stats), name  # every running mean and variance was updated
        kernels = [k for k in before if k.endswith("/kernel")]
        assert all(not np.array_equal(before[k], after[k]) for k in kernels), name
    before = seen["resnet50"][0]
    gray = convert_cnn.variables_from_state_dict(
        convert_cnn.export_state_dict(rgb_variables, build_cnn("resnet50", num_classes=0, in_chans=3, width=1 / 16,
                                                                depth=0.01)),
        build_cnn("resnet50", num_classes=0, in_chans=1, width=1 / 16, depth=0.01))
    np.testing.assert_allclose(before["backbone/conv1/kernel"], gray["params"]["conv1"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(before["batch_stats/bn1/mean"], gray["batch_stats"]["bn1"]["mean"], rtol=1e-6)
    assert before["backbone/conv1/kernel"].shape[2] == 1
    np.testing.assert_array_equal(before["backbone/layer2_0/conv2/kernel"],
                                  np.asarray(rgb_variables["params"]["layer2_0"]["conv2"]["kernel"]))


def test_cnn_settings_are_refused_in_one_sentence(smoke_checkpoints, smoke_demo_dir, tmp_path):
    c = _config(smoke_checkpoints, smoke_demo_dir, cnn_optimizer="adam")
    with pytest.raises(ValueError, match=r"^config.finetune.cnn_optimizer='adam' is not valid; choose sgd"):
        validate(c)
    c = _config(smoke_checkpoints, smoke_demo_dir, baselines=("random",), densenet121_weights="x.pth")
    with pytest.raises(ValueError, match=r"^config.finetune.densenet121_weights is set but config.finetune.baselines"):
        validate(c)
    wrong = str(tmp_path / "wrong.npz")  # published-size weights are refused by the smoke-size model
    layout = convert_cnn.expected_layout(build_cnn("resnet50", width=1 / 8, depth=0.01))
    official_io.write_weights(wrong, {k: np.zeros(shape, np.float32) for k, (_, _, shape) in layout.items()})
    c = _config(smoke_checkpoints, smoke_demo_dir, resnet50_weights=wrong)
    with pytest.raises(ValueError) as err:
        cnn.cnn_start(c.finetune, "resnet50", 0, 32)
    assert str(err.value) == (
        f"{wrong} does not match a torchvision/timm ResNet (blocks (1, 1, 1, 1), width 4, 1 input channel(s)): "
        "'conv1.weight' has shape (8, 3, 7, 7) where (4, 3, 7, 7) (RGB, folded to the model's gray channel) is "
        "expected (84 more mis-shaped); config.finetune.resnet50_weights needs torchvision or timm resnet50 "
        "weights of the size config.finetune.cnn_width and cnn_depth build (1 and 1: the published one), or '' to "
        "train from scratch.")


def test_demo_cxr_variant_sets_the_comparison():
    c = helpers.load_config("finetune", "demo_cxr")
    validate(c)
    f = c.finetune
    assert (f.targets, f.baselines, f.flip_p, f.freeze_blocks) == (
        ("diagnosis",), ("random", "resnet50", "densenet121"), 0.0, 3)
    assert (c.data.demo_kind, c.data.demo_image_size, f.cnn_width, f.cnn_depth) == ("cxr", 128, 1.0, 1.0)
