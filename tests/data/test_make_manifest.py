"""python -m medjax.data.make_manifest: folder layouts, fold tables, carving by patient, the CLI's listing
of bad input and its summary; every written manifest is read back by load_manifest."""

import os

import numpy as np
import pytest
from PIL import Image

from medjax.data import make_manifest as mm
from medjax.data.layouts import Entry, Layout
from medjax.data.manifest import fold_splits, load_manifest
from tests.helpers import csv_rows
from tests.helpers import make_manifest_cli as _run  # (status, stdout, stderr) of one command line


def _png(path, value=0, size=(6, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


@pytest.fixture
def brain_tumor(tmp_path):
    """Kaggle Brain-Tumor-MRI-like: Training/Testing/<class>/*.jpg, 4 training and 2 test images per class."""
    root = tmp_path / "brain"
    for split, n in (("Training", 4), ("Testing", 2)):
        for cls in ("glioma", "notumor"):
            for i in range(n):
                _png(str(root / split / cls / f"{split[:2]}_{cls}_{i}.png"), value=i)
    (root / "Training" / "glioma" / "Thumbs.db").write_text("not an image")
    return root


def test_class_folders_map_split_folders_and_carve_val_by_class(brain_tumor, tmp_path, capsys):
    out = tmp_path / "out" / "manifest.csv"
    status, text, err = _run(capsys, "class-folders", brain_tumor, "--out", out, "--no-patient-ids",
                             "--val-fraction", "0.25")
    assert status == 0, err
    rows = csv_rows(out)
    assert list(rows[0]) == ["patient_id", "path", "split", "label"]
    assert len(rows) == 12
    splits = {(r["split"], r["label"]): 0 for r in rows}
    for r in rows:
        splits[r["split"], r["label"]] += 1
    # Testing -> test as it is; val = a quarter of the 8 training images, one per class (stratified)
    assert splits == {("test", "glioma"): 2, ("test", "notumor"): 2, ("train", "glioma"): 3,
                      ("train", "notumor"): 3, ("val", "glioma"): 1, ("val", "notumor"): 1}
    assert all(r["split"] == "test" for r in rows if r["path"].startswith("../brain/Testing/"))
    assert rows[0]["patient_id"] == rows[0]["path"].removeprefix("../brain/")  # each image its own patient
    manifest = load_manifest(str(out), label_columns=("label",))
    assert len(manifest) == 12 and os.path.isfile(manifest[0].path)
    assert "WARNING: --no-patient-ids" in text and "leakage cannot be checked" in text
    assert "1 file(s) in class folders are no image" in text
    assert "--config.probe.label_column=label" in text and "--config.data.extra_columns=label" in text
    table = [line.split() for line in text.splitlines() if line.strip().startswith(("rows", "label=glioma"))]
    assert table == [["rows", "6", "2", "4", "12"], ["label=glioma", "3", "1", "2", "6"]]


def test_class_folders_need_a_patient_rule_and_list_every_empty_folder(brain_tumor, tmp_path, capsys):
    status, _, err = _run(capsys, "class-folders", brain_tumor, "--out", tmp_path / "m.csv")
    assert status == 1 and "--patient-pattern" in err and "--no-patient-ids" in err and "Traceback" not in err
    os.makedirs(brain_tumor / "Testing" / "pituitary")
    os.makedirs(brain_tumor / "Training" / "meningioma")
    os.makedirs(brain_tumor / "extra")
    status, _, err = _run(capsys, "class-folders", brain_tumor, "--out", tmp_path / "m.csv", "--no-patient-ids")
    assert status == 1 and not (tmp_path / "m.csv").exists()
    assert "3 problem(s) of 2 kind(s)" in err
    for name in ("Testing/pituitary", "Training/meningioma", "brain/extra"):
        assert name in err


def test_class_folders_patient_pattern_keeps_patients_whole(tmp_path, capsys):
    root = tmp_path / "data"
    for p in range(10):
        for k in range(3):
            _png(str(root / ("sick" if p % 2 else "well") / f"pat{p:02d}_img{k}.png"))
    out = tmp_path / "m.csv"
    status, _, err = _run(capsys, "class-folders", root, "--out", out, "--patient-pattern", r"pat(\d+)_",
                          "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "3")
    assert status == 0, err
    rows = csv_rows(out)
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add(r["split"])
    assert len(by_patient) == 10 and all(len(s) == 1 for s in by_patient.values())
    counts = {(s, lbl): 0 for s in ("train", "val", "test") for lbl in ("sick", "well")}
    for r in rows:
        counts[r["split"], r["label"]] += 1
    assert counts == {("train", "sick"): 9, ("train", "well"): 9, ("val", "sick"): 3, ("val", "well"): 3,
                      ("test", "sick"): 3, ("test", "well"): 3}  # one patient of each class in val and test
    status, _, _ = _run(capsys, "class-folders", root, "--out", tmp_path / "again.csv", "--patient-pattern",
                        r"pat(\d+)_", "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "3")
    assert csv_rows(tmp_path / "again.csv") == rows  # deterministic for a seed


def test_carving_is_by_patient_stratified_and_seeded():
    entries = [Entry(f"/x/{p}_{k}.png", f"p{p:03d}", labels={"label": "abc"[p % 3]})
               for p in range(60) for k in range(1 + p % 4)]
    layout = Layout(entries, ("label",))
    notes = mm.carve_splits(layout, val_fraction=0.1, test_fraction=0.2, seed=7)
    patients = {}
    for e in layout.entries:
        patients.setdefault(e.patient_id, set()).add(e.split)
    assert all(len(s) == 1 for s in patients.values())
    per = {(s, c): 0 for s in ("train", "val", "test") for c in "abc"}
    for p, (split,) in patients.items():
        per[split, "abc"[int(p[1:]) % 3]] += 1
    assert per == {("train", c): 14 for c in "abc"} | {("val", c): 2 for c in "abc"} | {("test", c): 4 for c in "abc"}
    assert notes == ["test carved from 60 patients: 12 patients (0.2), stratified by label",
                     "val carved from 60 patients: 6 patients (0.1), stratified by label"]
    other = Layout([Entry(e.path, e.patient_id, labels=dict(e.labels)) for e in entries], ("label",))
    mm.carve_splits(other, val_fraction=0.1, test_fraction=0.2, seed=8)
    assert [e.split for e in other.entries] != [e.split for e in layout.entries]
    with pytest.raises(mm.ManifestError, match="leave no training"):
        mm.carve_splits(layout, val_fraction=0.5, test_fraction=0.5, seed=0)


@pytest.fixture
def covid(tmp_path):
    """COVID-19-Radiography-like: <class>/images/*.png + <class>/masks/*.png."""
    root = tmp_path / "covid"
    for cls in ("COVID", "Normal"):
        for i in range(1, 4):
            _png(str(root / cls / "images" / f"{cls}-{i}.png"), value=i, size=(8, 8))
            _png(str(root / cls / "masks" / f"{cls}-{i}.png"), value=1, size=(8, 8))
    return root


def test_image_mask_folders_pair_by_stem(covid, tmp_path, capsys):
    out = tmp_path / "m.csv"
    status, text, err = _run(capsys, "image-mask-folders", covid, "--out", out, r"--patient-pattern=-(\d+)\.",
                             "--val-fraction", "0", "--test-fraction", "0.34")
    assert status == 0, err
    rows = csv_rows(out)
    assert list(rows[0]) == ["patient_id", "path", "split", "label", "mask_path"]
    assert {(r["path"], r["mask_path"], r["label"]) for r in rows} == {
        (f"covid/{c}/images/{c}-{i}.png", f"covid/{c}/masks/{c}-{i}.png", c) for c in ("COVID", "Normal")
        for i in (1, 2, 3)}
    assert {r["patient_id"] for r in rows} == {"1", "2", "3"}
    assert sum(r["split"] == "test" for r in rows) == 2  # one patient (COVID-k and Normal-k) of three
    manifest = load_manifest(str(out), label_columns=("label",))
    assert all(os.path.isfile(r.mask_path) for r in manifest)
    assert 'class_names=("background","foreground")' in text


def test_image_mask_folders_flat_layout_and_size_note(tmp_path, capsys):
    root = tmp_path / "flat"
    _png(str(root / "images" / "a.png"), size=(10, 12))
    _png(str(root / "masks" / "a.png"), value=255, size=(8, 8))
    out = tmp_path / "m.csv"
    status, text, err = _run(capsys, "image-mask-folders", root, "--out", out, "--no-patient-ids",
                             "--val-fraction", "0", "--test-fraction", "0")
    assert status == 0, err
    assert csv_rows(out) == [{"patient_id": "images/a.png", "path": "flat/images/a.png", "split": "train",
                           "mask_path": "flat/masks/a.png"}]  # nothing carved: every row trains
    assert "1 of 1 masks checked have another size than their image" in text and "mask_resample=True" in text
    assert "masks store the values 255 (first 1 masks)" in text
    assert """--config.data.mask_values='{"255": 1}'""" in text
    load_manifest(str(out))


def test_image_mask_folders_list_every_unpaired_file(covid, tmp_path, capsys):
    os.remove(covid / "COVID" / "masks" / "COVID-2.png")
    os.remove(covid / "Normal" / "images" / "Normal-3.png")
    _png(str(covid / "Normal" / "masks" / "Normal-9.png"))
    os.makedirs(covid / "Viral" / "images")
    os.makedirs(covid / "Viral" / "masks")
    status, _, err = _run(capsys, "image-mask-folders", covid, "--out", tmp_path / "m.csv", "--no-patient-ids")
    assert status == 1 and "Traceback" not in err
    assert "4 problem(s) of 3 kind(s)" in err
    assert "1 x images without a mask" in err and "COVID/images/COVID-2.png" in err
    assert "2 x masks without an image" in err and "Normal-3.png" in err and "Normal-9.png" in err
    assert "1 x empty class folders" in err and "covid/Viral" in err


def _knee_fold_table(tmp_path, *, scanner: bool):
    """Six patients' series folders in ROOT/knee and a PatientID,series,fold,grade[,scanner] table of them."""
    root = tmp_path / "knee"
    lines = ["PatientID,series,fold,grade" + (",scanner" if scanner else "")]
    for p in range(6):
        os.makedirs(root / f"P{p}" / "sag")
        lines.append(f"P{p},P{p}/sag,{p % 3},{p % 2}" + (f",S{p}" if scanner else ""))
    (tmp_path / "folds.csv").write_text("\n".join(lines) + "\n")
    return root, tmp_path / "folds.csv"


def test_fold_table_renames_folds_and_splits(tmp_path, capsys):
    root, table = _knee_fold_table(tmp_path, scanner=True)
    out = tmp_path / "out" / "m.csv"
    status, text, err = _run(capsys, "fold-table", root, "--table", table, "--out", out,
                             "--column", "PatientID=patient_id", "--column", "series=path",
                             "--label-columns", "grade", "--test-fold", "2", "--val-fold", "1")
    assert status == 0, err
    rows = csv_rows(out)
    assert list(rows[0]) == ["patient_id", "path", "split", "fold", "grade", "scanner"]
    assert [(r["patient_id"], r["path"], r["fold"], r["split"], r["grade"]) for r in rows[:3]] == [
        ("P0", "../knee/P0/sag", "0", "train", "0"), ("P1", "../knee/P1/sag", "1", "val", "1"),
        ("P2", "../knee/P2/sag", "2", "test", "0")]
    load_manifest(str(out), label_columns=("grade",), ignore_columns=("scanner",))
    only_folds = tmp_path / "out" / "folds_only.csv"
    with open(out) as src, open(only_folds, "w") as dst:  # the fold column alone also reads as folds
        for line in src:
            cells = line.rstrip("\n").split(",")
            dst.write(",".join(cells[:2] + cells[3:]) + "\n")
    folds = load_manifest(str(only_folds), label_columns=("grade",), ignore_columns=("scanner",),
                          folds=fold_splits(3, test_fold=2, val_fold=1))
    assert [r.split for r in folds] == [r["split"] for r in rows]
    assert "--ignore-columns scanner" in text and "--label-columns grade" in text
    assert "folds: 0 (2 rows, train), 1 (2 rows, val), 2 (2 rows, test)" in text


def test_fold_table_without_test_fold_writes_folds_for_config_data_folds(tmp_path, capsys):
    root, table = _knee_fold_table(tmp_path, scanner=False)
    out = tmp_path / "m.csv"
    status, text, err = _run(capsys, "fold-table", root, "--table", table, "--out", out,
                             "--column", "PatientID=patient_id", "--column", "series=path", "--label-columns", "grade")
    assert status == 0, err
    rows = csv_rows(out)
    assert list(rows[0]) == ["patient_id", "path", "fold", "grade"]  # no split: the jobs map the folds
    assert [r["fold"] for r in rows] == ["0", "1", "2", "0", "1", "2"]
    assert """'--config.data.folds={"test": [0], "val": [1]}'""" in text
    assert "--config.probe.cv_folds=3" in text
    mapped = load_manifest(str(out), label_columns=("grade",), folds=fold_splits(3, test_fold=0, val_fold=1))
    assert [r.split for r in mapped] == ["test", "val", "train"] * 2


def test_fold_table_lists_non_integer_folds_and_missing_paths(tmp_path, capsys):
    root = tmp_path / "knee"
    os.makedirs(root / "P0")
    (tmp_path / "t.csv").write_text("pid,path,fold\nP0,P0,0\nP1,P1,x\nP2,P2,1.5\nP3,P3,1\n")
    status, _, err = _run(capsys, "fold-table", root, "--table", tmp_path / "t.csv", "--out", tmp_path / "m.csv",
                          "--column", "pid=patient_id")
    assert status == 1
    assert "2 x folds in column 'fold' that are no non-negative integer" in err
    assert "t.csv line 3: 'x'" in err and "t.csv line 4: '1.5'" in err
    assert "1 x paths that do not exist" in err and "t.csv line 5: 'P3'" in err


def test_options_of_another_layout_are_refused(brain_tumor, tmp_path, capsys):
    status, _, err = _run(capsys, "class-folders", brain_tumor, "--no-patient-ids", "--out", tmp_path / "m.csv",
                          "--labels-column", "x")
    assert status == 1 and "--labels-column do(es) not apply to the class-folders layout" in err
