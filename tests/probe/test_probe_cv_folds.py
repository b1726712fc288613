"""k-fold cross-validation of the linear probe (config.probe.cv_folds) on a manifest with a fold column: one
ordinary probe run per fold in WORKDIR/fold_<i>, then mean ± sample std of every test metric over the folds."""

import json

import numpy as np
import pytest

from medjax.data import sources
from medjax.probe import trainer as probe
from tests.data.test_folds import write_fold_manifest
from tests.helpers import load_config


def _config(checkpoints, demo_dir, manifest=""):
    c = load_config("linear_probe", "smoke")
    c.probe.checkpoint_dir = str(checkpoints)
    c.probe.label_column = "contrast"  # T1 / T2 / FLAIR: every patient has all three, so every fold has them
    c.probe.label_fractions = ()
    c.probe.knn_k = (5,)
    c.probe.random_baseline = False
    c.data.demo_dir = str(demo_dir)
    c.data.extra_columns = "lesion,series_description"
    c.probe.manifest = manifest
    return c


@pytest.fixture(scope="module")
def cv_run(smoke_checkpoints, smoke_demo_dir, tmp_path_factory):
    demo = load_config("linear_probe", "smoke")
    demo.data.demo_dir = str(smoke_demo_dir)
    sources.demo_manifest(demo, str(smoke_demo_dir))  # written once per session, shared with other tests
    out = tmp_path_factory.mktemp("probe_cv")
    manifest = write_fold_manifest(str(smoke_demo_dir), out / "folds.csv", folds=3)
    c = _config(smoke_checkpoints, smoke_demo_dir, manifest)
    c.probe.cv_folds = 3
    workdir = out / "cv"
    workdir.mkdir()
    return workdir, probe.run(c, str(workdir))


def test_every_fold_is_a_full_probe_run_and_every_slice_is_tested_once(cv_run):
    workdir, record = cv_run
    folds = [json.loads((workdir / f"fold_{i}" / "results.json").read_text()) for i in range(3)]
    for i, r in enumerate(folds):
        assert json.loads(r["config"]["data"]["folds"]) == {"test": [i], "val": [(i + 1) % 3]}
        assert set(r["backbones"]) == {"pretrained"}
        assert (workdir / f"fold_{i}" / "results.md").exists()
    total = sum(folds[0]["backbones"]["pretrained"]["num_slices"].values())
    for split in ("test", "val"):  # each fold is test once and val once
        assert sum(r["backbones"]["pretrained"]["num_slices"][split] for r in folds) == total
    assert [f["fold"] for f in record["folds"]] == [0, 1, 2]


def test_summary_is_the_mean_and_sample_std_of_the_folds(cv_run):
    workdir, record = cv_run
    folds = [json.loads((workdir / f"fold_{i}" / "results.json").read_text()) for i in range(3)]
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(record["summary"]))  # what run() returns is what it wrote
    assert saved["cv_folds"] == 3 and "n - 1" in saved["std"]
    for backbone in ("pretrained",):
        acc = [r["backbones"][backbone]["test"]["accuracy"] for r in folds]
        knn = [r["backbones"][backbone]["knn"]["5"]["balanced_accuracy"] for r in folds]
        summary = saved["summary"][backbone]
        assert summary["accuracy"]["values"] == pytest.approx(acc)
        assert summary["accuracy"]["mean"] == pytest.approx(np.mean(acc))
        assert summary["accuracy"]["std"] == pytest.approx(np.std(acc, ddof=1))
        assert summary["kNN k=5 balanced_accuracy"]["mean"] == pytest.approx(np.mean(knn))
        assert set(summary) >= {"balanced_accuracy", "macro_f1", "macro_auc"}
    table = (workdir / "results.md").read_text()
    s = saved["summary"]["pretrained"]["accuracy"]
    assert f"| pretrained | accuracy | {s['mean']:.3f} ± {s['std']:.3f} |" in table
    assert "3-fold cross-validation" in table


def test_cv_on_the_demo_dataset_is_one_sentence(smoke_checkpoints, smoke_demo_dir, tmp_path):
    c = _config(smoke_checkpoints, smoke_demo_dir)
    c.probe.cv_folds = 3
    with pytest.raises(ValueError, match=r"^config.probe.cv_folds=3 needs config.probe.manifest: a CSV manifest "
                                         r"with a fold column .*the built-in demo dataset has none\.$"):
        probe.run(c, str(tmp_path))
