"""Folds from the command line (config.data.folds) in every job's manifest loading, the cross-validation
rotation and its checks, and manifest problems shown whole and the same way by every job."""

import csv
import os

import pytest

from medjax import cross_validation
from medjax.data import sources
from medjax.data.manifest import KNOWN_COLUMNS, ManifestError
from tests.helpers import load_config


def write_fold_manifest(demo_dir, out_path, folds=3, label_rows=None):
    """The demo manifest of ``demo_dir`` with absolute paths, its split column replaced by a fold column:
    patient k (in order of first appearance) in fold k mod ``folds``; ``label_rows(row)`` may edit rows."""
    src = os.path.join(demo_dir, "manifest.csv")
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    patients = list(dict.fromkeys(r["patient_id"] for r in rows))
    for r in rows:
        for key in ("path", "mask_path"):
            r[key] = os.path.join(demo_dir, r[key]) if r[key] else ""
        del r["split"]
        r["fold"] = str(patients.index(r["patient_id"]) % folds)
        if label_rows:
            label_rows(r)
    with open(out_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(out_path)


def _files(folder, names):
    for n in names:
        (folder / n).write_bytes(b"")


def _csv(path, text):
    path.write_text("\n".join(line.strip() for line in text.strip().splitlines()) + "\n")
    return str(path)


@pytest.fixture
def fold_csv(tmp_path):
    """Six patients in folds 0..2 with a mask each (empty files: nothing here reads pixels)."""
    _files(tmp_path, [f"{p}{s}.nii" for p in "abcdef" for s in ("", "_mask")])
    return _csv(tmp_path / "folds.csv", "patient_id,path,mask_path,fold,grade\n" + "\n".join(
        f"p{p},{p}.nii,{p}_mask.nii,{i % 3},{i % 2}" for i, p in enumerate("abcdef")))


# ---------------------------------------------------------------- every job reads config.data.folds


def test_pretraining_rows_follow_config_data_folds(fold_csv):
    c = load_config("dinov2_reg", "smoke")
    c.data.manifest = fold_csv
    c.data.extra_columns = "grade"
    c.data.folds = '{"test": [0], "val": [1]}'
    _, rows = sources.split_rows(c, sources.training_manifest(c, "unused")[0], "train", masks=False)
    assert [r.patient_id for r in rows] == ["pc", "pf"] and {r.fold for r in rows} == {2}
    c.data.folds = '{"test": [2], "val": [0]}'
    _, rows = sources.split_rows(c, fold_csv, "test")
    assert [r.patient_id for r in rows] == ["pc", "pf"]


def test_segmentation_splits_follow_config_data_folds(fold_csv):
    from medjax.segment.data import read_manifest

    c = load_config("segment", "smoke")
    c.segment.manifest = fold_csv
    c.data.extra_columns = "grade"
    c.data.folds = '{"test": [1], "val": [2]}'
    src = read_manifest(c, "unused", "")
    assert {s: [r.patient_id for r in src.rows.split(s)] for s in ("train", "val", "test")} == {
        "train": ["pa", "pd"], "val": ["pc", "pf"], "test": ["pb", "pe"]}


def _job_loaders(path):
    """For each job: (config key of its manifest, a call that loads it the way the job does)."""
    from medjax.finetune import data as finetune_data
    from medjax.probe import data as probe_data
    from medjax.segment import data as segment_data

    def pretrain():
        c = load_config("dinov2_reg", "smoke")
        c.data.manifest, c.data.extra_columns = path, "grade"
        manifest, extra = sources.training_manifest(c, "unused")
        sources.split_rows(c, manifest, "train", extra_columns=extra, masks=False)

    def probe():
        c = load_config("linear_probe", "smoke")
        c.probe.manifest, c.probe.label_column = path, "grade"
        probe_data.load_splits(c, "unused", "")

    def finetune():
        c = load_config("finetune", "smoke")
        c.finetune.manifest, c.finetune.targets = path, ("grade",)
        finetune_data.load_splits(c, "unused")

    def segment():
        c = load_config("segment", "smoke")
        c.segment.manifest = path
        c.data.extra_columns = "grade"
        segment_data.read_manifest(c, "unused", "")

    return {"config.data.manifest": pretrain, "config.probe.manifest": probe,
            "config.finetune.manifest": finetune, "config.segment.manifest": segment}


@pytest.mark.parametrize("job", ["config.data.manifest", "config.probe.manifest", "config.finetune.manifest",
                                 "config.segment.manifest"])
def test_a_folder_for_a_manifest_is_one_sentence_naming_the_key(job, tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    with pytest.raises(ManifestError) as exc:
        _job_loaders(str(folder))[job]()
    msg = str(exc.value)
    assert msg.startswith(f"{job}='{folder}' is a folder, not a manifest; give the CSV manifest file")
    assert f"`python -m medjax.data.make_manifest LAYOUT {folder} --out manifest.csv`" in msg and "\n" not in msg


@pytest.mark.parametrize("job", ["config.data.manifest", "config.probe.manifest", "config.finetune.manifest",
                                 "config.segment.manifest"])
def test_a_fold_column_without_config_data_folds_asks_for_it(job, fold_csv):
    with pytest.raises(ManifestError) as exc:
        _job_loaders(fold_csv)[job]()
    assert str(exc.value) == ("folds.csv has a 'fold' column but no 'split' column; set config.data.folds to say "
                              "which folds are test and val, e.g. '{\"test\": [0], \"val\": [1]}' (the other folds "
                              "train).")


@pytest.mark.parametrize("job", ["config.data.manifest", "config.probe.manifest", "config.finetune.manifest",
                                 "config.segment.manifest"])
def test_manifest_problems_are_shown_whole_in_every_job(job, tmp_path):
    _files(tmp_path, ["a.nii", "a_mask.nii", "b.nii", "b_mask.nii"])
    path = _csv(tmp_path / "m.csv", """
        patient_id,path,mask_path,split,grade
        p1,a.nii,a_mask.nii,train,0
        p1,b.nii,b_mask.nii,test,1
        p2,gone.nii,b_mask.nii,val,1
        """)
    loaders = _job_loaders(path)
    with pytest.raises(ManifestError) as exc:
        loaders[job]()
    msg = str(exc.value)
    assert msg.startswith("m.csv failed 2 check(s); fix them before training:\n")
    assert "patient 'p1': train (line 2), test (line 3)" in msg and f"line 4: path {tmp_path}/gone.nii" in msg


def test_unknown_columns_name_the_config_keys(fold_csv):
    c = load_config("linear_probe", "smoke")
    c.probe.manifest, c.probe.label_column = fold_csv, "fold_label"
    from medjax.probe import data as probe_data

    with pytest.raises(ValueError, match="config.probe.label_column='fold_label' is not a column"):
        probe_data.load_splits(c, "unused", "")
    c = load_config("dinov2_reg", "smoke")
    c.data.folds = '{"test": [0], "val": [1]}'
    with pytest.raises(ManifestError) as exc:
        sources.split_rows(c, fold_csv, "train")
    msg = str(exc.value)
    assert msg.endswith(f"unknown column(s) 'grade'; known columns are {', '.join(KNOWN_COLUMNS)}; name columns to "
                        "accept but leave out of the data in config.data.extra_columns, or rename or remove them.")


@pytest.mark.parametrize("config_name", ["dinov2_reg", "mae", "linear_probe", "finetune", "segment"])
def test_every_validator_checks_config_data_folds(config_name):
    import importlib

    c = load_config(config_name, "smoke")
    c.data.folds = '{"test": [0], "val": [0]}'
    if config_name == "linear_probe":
        c.probe.checkpoint_dir = "run"  # the probe's own first check
    module = {"dinov2_reg": "pretrain", "mae": "mae", "linear_probe": "probe"}.get(config_name, config_name)
    with pytest.raises(ValueError, match=r"^config.data.folds puts fold 0 in both test and val"):
        importlib.import_module(f"medjax.{module}.validate").validate(c)


# ---------------------------------------------------------------- the cross-validation rotation and its checks


def test_rotation_tests_every_fold_once_and_validates_on_the_next():
    runs = [cross_validation.rotation(5, i) for i in range(5)]
    assert runs[0] == {"test": [0], "val": [1]} and runs[4] == {"test": [4], "val": [0]}
    assert sorted(r["test"][0] for r in runs) == sorted(r["val"][0] for r in runs) == list(range(5))


@pytest.mark.parametrize("value", [1, 2, -1, True, 2.5])
def test_cv_folds_below_three_is_one_sentence(value):
    with pytest.raises(ValueError, match=r"must be 0 \(no cross-validation\) or a number of folds of at least 3"):
        cross_validation.check_cv_folds(value, "config.probe.cv_folds")
    cross_validation.check_cv_folds(0, "k")
    cross_validation.check_cv_folds(3, "k")


def test_cv_manifest_needs_exactly_the_folds_0_to_k_minus_1(fold_csv, tmp_path):
    c = load_config("linear_probe", "smoke")
    c.probe.cv_folds = 3
    with pytest.raises(ValueError, match=r"needs config.probe.manifest: a CSV manifest with a fold column"):
        cross_validation.cv_manifest(c, "probe")
    c.probe.manifest = fold_csv
    assert cross_validation.cv_manifest(c, "probe") == fold_csv
    c.probe.cv_folds = 4
    with pytest.raises(ValueError, match=r"^config.probe.cv_folds=4 needs the fold column of .*folds.csv to hold "
                                         r"exactly the folds 0..3, but it holds 0, 1, 2; set"):
        cross_validation.cv_manifest(c, "probe")
    c.probe.cv_folds, c.data.folds = 3, '{"test": [0]}'
    with pytest.raises(ValueError, match=r"sets config.data.folds for each of its runs; leave config.data.folds "):
        cross_validation.cv_manifest(c, "probe")
    c.data.folds = ""
    c.probe.manifest = _csv(tmp_path / "split.csv", "patient_id,path,split\np1,a.nii,train")
    with pytest.raises(ValueError, match=r"needs a 'fold' column in .*split.csv"):
        cross_validation.cv_manifest(c, "probe")
    c.probe.manifest = str(tmp_path)
    with pytest.raises(ManifestError, match=r"^config.probe.manifest=.* is a folder"):
        cross_validation.cv_manifest(c, "probe")


def test_fold_summary_is_mean_and_sample_std():
    per_fold = [{"a": {"acc": 0.5, "f1": 0.25}}, {"a": {"acc": 0.75}}, {"a": {"acc": 1.0, "f1": 0.5}}]
    summary = cross_validation.summarise_folds(per_fold)
    assert summary["a"]["acc"]["mean"] == pytest.approx(0.75)
    assert summary["a"]["acc"]["std"] == pytest.approx(0.25)  # sqrt(((-.25)^2 + 0 + .25^2) / (3 - 1))
    assert summary["a"]["f1"]["values"][1] != summary["a"]["f1"]["values"][1]  # NaN where a fold lacks it
    table = cross_validation.summary_table(summary)
    assert "| a | acc | 0.750 ± 0.250 | 0.500, 0.750, 1.000 |" in table
