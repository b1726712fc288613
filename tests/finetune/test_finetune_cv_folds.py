"""k-fold cross-validation of fine-tuning (config.finetune.cv_folds): one ordinary fine-tuning run per fold in
WORKDIR/fold_<i>, then mean ± sample std of every test metric over the folds; a second target whose
uncertain (-1) cells must count as unlabelled."""

import json

import numpy as np
import pytest

from medjax.data import sources
from medjax.finetune import trainer as finetune
from tests import helpers
from tests.data.test_folds import write_fold_manifest

UNCERTAIN_PATIENTS = (0, 4, 8)  # one per fold (patient k is in fold k mod 3)


def _t2_with_uncertain_patients():
    """Adds ``is_t2`` (0/1), -1 (uncertain) on every row of the patients in ``UNCERTAIN_PATIENTS``."""
    seen = []

    def edit(row):
        if row["patient_id"] not in seen:
            seen.append(row["patient_id"])
        uncertain = seen.index(row["patient_id"]) in UNCERTAIN_PATIENTS
        row["is_t2"] = "-1" if uncertain else str(int(row["contrast"] == "T2"))
    return edit


@pytest.fixture(scope="module")
def cv_run(smoke_demo_dir, tmp_path_factory):
    c = helpers.load_config("finetune", "smoke")
    c.data.demo_dir = str(smoke_demo_dir)
    sources.demo_manifest(c, str(smoke_demo_dir))  # written once per session, shared with other tests
    out = tmp_path_factory.mktemp("finetune_cv")
    c.finetune.manifest = write_fold_manifest(str(smoke_demo_dir), out / "folds.csv", 3, _t2_with_uncertain_patients())
    c.finetune.targets = ("contrast", "is_t2")
    c.finetune.cv_folds = 3
    c.finetune.init, c.finetune.image_size, c.finetune.baselines = "random", 28, ()
    c.finetune.label_fractions = (1.0,)
    c.model.arch, c.model.patch_size = "vit_tiny", 7
    c.model.embed_dim, c.model.depth, c.model.num_heads = 32, 2, 2
    c.data.extra_columns = "lesion,series_description"
    workdir = out / "cv"
    workdir.mkdir()
    return workdir, finetune.run(c, str(workdir))


def test_every_fold_is_a_full_run_and_every_slice_is_tested_once(cv_run):
    workdir, _ = cv_run
    folds = [json.loads((workdir / f"fold_{i}" / "results.json").read_text()) for i in range(3)]
    for i in range(3):
        assert (workdir / f"fold_{i}" / "results.md").exists() and (workdir / f"fold_{i}" / "checkpoints").is_dir()
    total = sum(folds[0]["num_slices"].values())
    assert sum(r["num_slices"]["test"] for r in folds) == sum(r["num_slices"]["val"] for r in folds) == total


def test_uncertain_cells_are_unlabelled(cv_run):
    workdir, _ = cv_run
    folds = [json.loads((workdir / f"fold_{i}" / "results.json").read_text()) for i in range(3)]
    for r in folds:
        assert r["targets"]["is_t2"]["class_names"] == ["0", "1"]  # -1 is no class
        test = r["runs"][0]["test"]
        # every fold holds one uncertain patient: its test slices count for contrast, not for is_t2
        assert 0 < test["is_t2"]["num_samples"] < test["contrast"]["num_samples"] == r["num_slices"]["test"]


def test_summary_is_the_mean_and_sample_std_of_the_folds(cv_run, capsys):
    workdir, record = cv_run
    folds = [json.loads((workdir / f"fold_{i}" / "results.json").read_text()) for i in range(3)]
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(record["summary"]))
    row = saved["summary"]["random_init, fraction 1, contrast"]
    values = [r["runs"][0]["test"]["contrast"]["balanced_accuracy"] for r in folds]
    assert row["balanced_accuracy"]["values"] == pytest.approx(values)
    assert row["balanced_accuracy"]["std"] == pytest.approx(np.std(values, ddof=1))
    assert set(row) == {"accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc"}
    assert set(saved["summary"]) == {"random_init, fraction 1, contrast", "random_init, fraction 1, is_t2"}
    table = (workdir / "results.md").read_text()
    s = row["macro_f1"]
    assert f"| random_init, fraction 1, contrast | macro_f1 | {s['mean']:.3f} ± {s['std']:.3f} |" in table
