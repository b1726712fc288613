"""The :smoke variants work together on one user manifest with a label column of its own: pretraining
(``configs/dinov2_reg.py:smoke``, refusing a resume under another learning rate), the 52-head linear probe
(``configs/linear_probe.py:smoke``, whose 4-block layouts need the smoke model's 4 blocks) and fine-tuning
(``configs/finetune.py:smoke``, the target read from the manifest)."""

import csv

import pytest

from medjax.checkpoint import CheckpointMismatchError
from medjax.data import sources
from medjax.finetune import trainer as finetune
from medjax.pretrain import trainer as pretrain
from medjax.probe import linear_heads
from medjax.probe import trainer as probe
from tests.helpers import load_config, smoke_config


def _manifest(demo_dir, tmp_path) -> str:
    """The 12-patient smoke demo's manifest, written beside its files with a column of the user's own:
    ``bright`` = 1 for T2 and FLAIR series (fluid bright), 0 for T1."""
    config = load_config("linear_probe", "smoke")
    config.data.demo_dir = str(demo_dir)
    with open(sources.demo_manifest(config, str(tmp_path))) as f:
        rows = list(csv.DictReader(f))
    path = demo_dir / "manifest_bright.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["patient_id", "path", "split", "bright"])
        writer.writeheader()
        for row in rows:
            writer.writerow({"patient_id": row["patient_id"], "path": row["path"], "split": row["split"],
                             "bright": int(row["contrast"] != "T1")})
    return str(path)


def test_pretrain_probe_and_finetune_smoke_on_one_manifest(smoke_demo_dir, tmp_path):
    manifest = _manifest(smoke_demo_dir, tmp_path)
    run_dir = str(tmp_path / "pretrain")
    config = smoke_config()
    config.data.manifest, config.data.extra_columns = manifest, "bright"
    config.train.stop_at_step = 3
    assert pretrain.run(config, run_dir)["steps"] == 3
    config.optim.base_lr = 0.001
    with pytest.raises(CheckpointMismatchError, match=r"config\.optim\.base_lr changed: 0\.004 -> 0\.001\."):
        pretrain.run(config, run_dir)

    p = load_config("linear_probe", "smoke")
    p.probe.checkpoint_dir, p.probe.manifest, p.probe.label_column = run_dir, manifest, "bright"
    p.probe.random_baseline, p.probe.label_fractions, p.probe.knn_k = False, (1.0,), (5,)
    (tmp_path / "probe").mkdir()
    result = probe.run(p, str(tmp_path / "probe"))["backbones"]["pretrained"]
    assert result["checkpoint"]["step"] == 3
    assert set(result["val_per_head"]["accuracy"]) == set(linear_heads.head_names())  # all 52, 4-block ones too
    assert any(k.startswith("blocks4_") for k in result["val_per_head"]["accuracy"])
    assert 0.0 <= result["test"]["accuracy"] <= 1.0

    f = load_config("finetune", "smoke")
    f.finetune.checkpoint_dir, f.finetune.manifest, f.finetune.targets = run_dir, manifest, ("bright",)
    f.finetune.baselines, f.finetune.label_fractions = (), (1.0,)
    (tmp_path / "finetune").mkdir()
    out = finetune.run(f, str(tmp_path / "finetune"))
    assert list(out["targets"]) == ["bright"] and out["targets"]["bright"]["class_names"] == ["0", "1"]
    [fit] = out["runs"]
    assert (fit["init"], fit["fraction"], fit["train_patients"], fit["train_slices"]) == ("pretrained", 1.0, 4, 96)
    assert out["checkpoint"]["init"] == "pretrained"
