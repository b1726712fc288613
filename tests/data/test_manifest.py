"""Manifest CSV: parsing, path resolution, class codes, folds, and every validation error with its lines."""

import os

import numpy as np
import pytest

from medjax.data.manifest import (UNCERTAIN, UNLABELLED, ManifestError, OptionNames, check_labels, fold_splits,
                                  load_manifest, parse_folds)


def _write(tmp_path, text, files=(), name="manifest.csv"):
    """A CSV (its text dedented per line) plus empty files for the given relative paths."""
    for f in files:
        p = tmp_path / f
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    csv = tmp_path / name
    csv.write_text("\n".join(line.strip() for line in text.strip().splitlines()) + "\n")
    return str(csv)


def test_valid_manifest_rows_paths_and_codes(tmp_path):
    files = ["img/a.nii.gz", "img/b.nii.gz", "img/c.png", "img/a_mask.nii.gz", "dcm/series1"]
    csv = _write(tmp_path, """
        patient_id,path,split,grade,site,mask_path,series_uid
        p1,img/a.nii.gz,train,2,north,img/a_mask.nii.gz,
        p2,img/b.nii.gz,Val,0,south,,

        p3,img/c.png,test,,north,,
        p1,dcm/series1,train,2,south,,1.2.3
        """, files)
    m = load_manifest(csv, label_columns=("grade", "site"))
    assert len(m) == 4 and [r.line for r in m] == [2, 3, 5, 6]  # the blank line 4 still counts
    assert m[0].path == os.path.join(str(tmp_path), "img", "a.nii.gz")
    assert m[0].mask_path == os.path.join(str(tmp_path), "img", "a_mask.nii.gz") and m[1].mask_path is None
    assert m[3].series_uid == "1.2.3" and m[0].series_uid is None
    assert m[1].split == "val"  # split names are case-insensitive
    assert m.patients() == ("p1", "p2", "p3")
    assert [r.patient_id for r in m.split("train")] == ["p1", "p1"]
    assert m.split("train").classes == m.classes  # a split keeps the manifest's class codes
    # Integer labels keep their values (class 1 is absent, 2 stays 2); names are coded in sorted order.
    assert m.label_values("grade") == ("0", "2") and [r.label("grade") for r in m] == [2, 0, -1, 2]
    assert m.label_values("site") == ("north", "south") and [r.label("site") for r in m] == [0, 1, 0, 1]
    assert dict(m[2].labels) == {"grade": "", "site": "north"}
    with pytest.raises(KeyError, match="not loaded"):
        m[0].label("age")


def test_missing_files_are_all_listed_with_lines(tmp_path):
    csv = _write(tmp_path, """
        patient_id,path,split,mask_path
        p1,a.nii,train,
        p2,gone1.nii,train,
        p3,b.nii,val,gone_mask.nii
        p4,gone2.nii,test,
        """, ["a.nii", "b.nii"])
    with pytest.raises(ManifestError) as exc:
        load_manifest(csv)
    msg = str(exc.value)
    assert msg.startswith("3 file(s) named in manifest.csv do not exist")
    assert "relative paths resolve against" in msg and "fix the paths" in msg
    for line, name in ((3, "gone1.nii"), (4, "gone_mask.nii"), (5, "gone2.nii")):
        assert f"line {line}: " in msg and name in msg
    assert "line 2:" not in msg and exc.value.problems == {"missing": [3, 4, 5]}
    assert load_manifest(csv, check_files=False)[1].path.endswith("gone1.nii")


def test_no_file_exists_hints_at_the_root(tmp_path):
    csv = _write(tmp_path, "patient_id,path,split\np1,x.nii,train\np2,y.nii,test")
    with pytest.raises(ManifestError, match="none of them exist, so check that paths are relative to"):
        load_manifest(csv)


def test_unknown_column_lists_known_ones(tmp_path):
    csv = _write(tmp_path, "patient_id,path,split,age\np1,a.nii,train,40", ["a.nii"])
    with pytest.raises(ManifestError) as exc:
        load_manifest(csv)
    msg = str(exc.value)
    assert "line 1 has unknown column(s) 'age'" in msg
    assert "patient_id, path, split, fold, mask_path, series_uid" in msg and "the label-column option" in msg
    assert "label_columns" not in msg and "ignore_columns" not in msg  # option names, not Python arguments
    assert len(load_manifest(csv, ignore_columns=("age",))) == 1
    assert load_manifest(csv, label_columns=("age",))[0].label("age") == 40


def test_requested_label_column_must_exist(tmp_path):
    csv = _write(tmp_path, "patient_id,path,split\np1,a.nii,train", ["a.nii"])
    with pytest.raises(ManifestError, match=r"label column 'diagnosis' is not in the header.*patient_id, path, split"):
        load_manifest(csv, label_columns=("diagnosis",))


def test_header_problems(tmp_path):
    with pytest.raises(ManifestError, match="lacks the required column"):
        load_manifest(_write(tmp_path, "patient_id,split\np1,train"))
    with pytest.raises(ManifestError, match="twice"):
        load_manifest(_write(tmp_path, "patient_id,path,path\np1,a,b"))
    with pytest.raises(ManifestError, match="has a header but no rows"):
        load_manifest(_write(tmp_path, "patient_id,path,split"))
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(str(tmp_path / "nope.csv"))


def test_duplicate_rows_name_both_lines(tmp_path):
    csv = _write(tmp_path, """
        patient_id,path,split
        p1,a.nii,train
        p2,b.nii,train
        p1,./a.nii,train
        """, ["a.nii", "b.nii"])
    with pytest.raises(ManifestError) as exc:
        load_manifest(csv)
    assert "1 row(s) of manifest.csv repeat an image listed earlier" in str(exc.value)
    assert "line 4 repeats line 2" in str(exc.value) and "remove the repeats" in str(exc.value)
    assert exc.value.problems == {"duplicate": [4]}


def test_long_lists_are_cut_to_five_rows(tmp_path):
    body = "\n".join(f"p{i},a.nii,train" for i in range(8))
    with pytest.raises(ManifestError) as exc:
        load_manifest(_write(tmp_path, "patient_id,path,split\n" + body, ["a.nii"]))
    msg = str(exc.value)
    assert "7 row(s)" in msg and "line 7 repeats line 2" in msg and "line 8 " not in msg
    assert "... and 2 more" in msg and exc.value.problems["duplicate"] == [3, 4, 5, 6, 7, 8, 9]


def test_empty_patient_id_and_unknown_split(tmp_path):
    csv = _write(tmp_path, """
        patient_id,path,split
        p1,a.nii,train
        ,b.nii,train
        p3,c.nii,training
        p4,d.nii,
        """, ["a.nii", "b.nii", "c.nii", "d.nii"])
    with pytest.raises(ManifestError) as exc:
        load_manifest(csv)
    msg = str(exc.value)
    assert msg.startswith("manifest.csv failed 2 check(s); fix them before training:")
    assert "1 row(s) of manifest.csv have an empty patient_id or path" in msg and "line 3: empty patient_id" in msg
    assert "2 row(s) of manifest.csv have an unknown split; use one of train, val, test" in msg
    assert "line 4: split 'training'" in msg and "line 5: split ''" in msg
    assert exc.value.problems == {"empty": [3], "split": [4, 5]}


def test_patient_in_two_splits_is_refused(tmp_path):
    csv = _write(tmp_path, """
        patient_id,path,split
        p1,a.nii,train
        p2,b.nii,train
        p1,c.nii,test
        p2,d.nii,train
        p1,e.nii,val
        """, ["a.nii", "b.nii", "c.nii", "d.nii", "e.nii"])
    with pytest.raises(ManifestError) as exc:
        load_manifest(csv)
    msg = str(exc.value)
    assert "1 patient(s) of manifest.csv appear in more than one split" in msg
    assert "put all rows of a patient in one split" in msg
    assert "patient 'p1': train (line 2), test (line 4), val (line 6)" in msg and "'p2'" not in msg
    assert exc.value.problems == {"patient_in_two_splits": [2, 4, 6]}


def test_fold_splits_mapping():
    assert fold_splits(5, test_fold=0, val_fold=1) == {0: "test", 1: "val", 2: "train", 3: "train", 4: "train"}
    assert fold_splits(3, test_fold=2) == {0: "train", 1: "train", 2: "test"}
    for args in ((1, 0), (5, 5), (5, 0, 0), (5, 0, -1)):
        with pytest.raises(ValueError):
            fold_splits(*args)


def test_folds_give_splits_and_keep_patients_together(tmp_path):
    files = ["a.nii", "b.nii", "c.nii", "d.nii"]
    csv = _write(tmp_path, "patient_id,path,fold\np1,a.nii,0\np2,b.nii,1\np3,c.nii,2\np3,d.nii,2", files)
    m = load_manifest(csv, folds=fold_splits(3, test_fold=1, val_fold=2))
    assert [(r.split, r.fold) for r in m] == [("train", 0), ("test", 1), ("val", 2), ("val", 2)]
    with pytest.raises(ManifestError, match=r"has a 'fold' column but no 'split' column; set the fold mapping"):
        load_manifest(csv)
    bad = _write(tmp_path, "patient_id,path,fold\np1,a.nii,0\np1,b.nii,1\np2,c.nii,7", files, "bad.csv")
    with pytest.raises(ManifestError) as exc:
        load_manifest(bad, folds=fold_splits(2, test_fold=1))
    assert "line 4: fold '7' is not one of [0, 1]" in str(exc.value)
    assert "patient 'p1': train (line 2), test (line 3)" in str(exc.value)


def test_unsplit_manifest_for_pretraining(tmp_path):
    csv = _write(tmp_path, "patient_id,path\np1,a.nii\np2,b.nii", ["a.nii", "b.nii"])
    m = load_manifest(csv, require_split=False)
    assert [r.split for r in m] == ["", ""] and len(m.split("train")) == 0
    with pytest.raises(ManifestError, match="has no 'split' column; add one"):
        load_manifest(csv)


def test_negative_label_other_than_uncertain_is_refused(tmp_path):
    csv = _write(tmp_path, "patient_id,path,split,y\np1,a.nii,train,1\np2,b.nii,train,-1\np3,c.nii,train,-2",
                 ["a.nii", "b.nii", "c.nii"])
    with pytest.raises(ManifestError, match=r"negative values other than -1 \(uncertain\).*leave a cell empty") as exc:
        load_manifest(csv, label_columns=("y",))
    assert "line 4: -2" in str(exc.value) and "line 3" not in str(exc.value)
    assert exc.value.problems == {"negative_label": [4]}


def test_uncertain_label_has_its_own_code_and_is_no_class(tmp_path):
    files = [f"{c}.nii" for c in "abcdef"]
    csv = _write(tmp_path, """
        patient_id,path,split,effusion,site
        p1,a.nii,train,1,north
        p2,b.nii,train,-1,south
        p3,c.nii,train,,north
        p4,d.nii,val,0,south
        p5,e.nii,test,1,north
        p6,f.nii,train,0,north
        """, files)
    m = load_manifest(csv, label_columns=("effusion", "site"))
    assert [r.label("effusion") for r in m] == [1, UNCERTAIN, UNLABELLED, 0, 1, 0]
    assert UNCERTAIN != UNLABELLED and UNCERTAIN < 0 and UNLABELLED < 0
    assert m.label_values("effusion") == ("0", "1") and m.classes["effusion"] == {"0": 0, "1": 1}
    assert dict(m[1].labels)["effusion"] == "-1"  # the raw text stays available
    # check_labels counts classes only: the uncertain and the blank row are in no class
    assert check_labels(m, "effusion") == {"train": {"1": 1, "0": 1}, "val": {"0": 1}, "test": {"1": 1}}


def test_uncertain_rows_are_unlabelled_for_a_single_label_job(tmp_path):
    """What the probe, fine-tuning and the few-label draws keep: codes >= 0 (uncertain and blank rows out)."""
    from medjax.data.fractions import patient_strata

    csv = _write(tmp_path, "patient_id,path,split,y\np1,a.nii,train,-1\np2,b.nii,train,\np3,c.nii,train,2",
                 ["a.nii", "b.nii", "c.nii"])
    m = load_manifest(csv, label_columns=("y",))
    codes = [r.label("y") for r in m]
    assert [c for c in codes if c >= 0] == [2]
    assert patient_strata([r.patient_id for r in m], np.array(codes)) == {"p1": -1, "p2": -1, "p3": 2}


def test_check_labels_refuses_a_class_only_in_test(tmp_path):
    files = [f"{c}.nii" for c in "abcde"]
    csv = _write(tmp_path, """
        patient_id,path,split,dx
        p1,a.nii,train,benign
        p2,b.nii,train,malignant
        p3,c.nii,val,benign
        p4,d.nii,test,rare
        p5,e.nii,test,malignant
        """, files)
    m = load_manifest(csv, label_columns=("dx",))
    with pytest.raises(ManifestError) as exc:
        check_labels(m, "dx")
    msg = str(exc.value)
    assert "class(es) of label column 'dx'" in msg and "never in train" in msg
    assert "class 'rare' in test: line(s) 5" in msg and "benign" not in msg.split("\n", 1)[1]
    assert exc.value.problems == {"class_not_in_train": [5]}
    ok = load_manifest(_write(tmp_path, "patient_id,path,split,dx\np1,a.nii,train,x\np2,b.nii,test,x\n"
                              "p3,c.nii,train,y", files, "ok.csv"), label_columns=("dx",))
    assert check_labels(ok, "dx") == {"train": {"x": 1, "y": 1}, "val": {}, "test": {"x": 1}}
    with pytest.raises(KeyError):
        check_labels(ok, "other")


def test_fold_mapping_in_its_json_form(tmp_path):
    files = [f"{c}.nii" for c in "abcde"]
    csv = _write(tmp_path, "patient_id,path,fold\np1,a.nii,0\np2,b.nii,1\np3,c.nii,2\np4,d.nii,3\np4,e.nii,3",
                 files)
    m = load_manifest(csv, folds=parse_folds('{"test": [2], "val": 0}'))
    assert [(r.split, r.fold) for r in m] == [("val", 0), ("train", 1), ("test", 2), ("train", 3), ("train", 3)]
    names = OptionNames(folds="config.data.folds")
    with pytest.raises(ManifestError, match=r"^config.data.folds names fold\(s\) 7 that the fold column of "
                                            r"manifest.csv does not hold \(it holds 0, 1, 2, 3\); name folds"):
        load_manifest(csv, folds={"test": (7,)}, names=names)
    with pytest.raises(ManifestError, match=r"no 'split' column; set config.data.folds to say which folds are test "
                                            r"and val, e.g. '\{\"test\": \[0\], \"val\": \[1\]\}'"):
        load_manifest(csv, names=names)
    split_csv = _write(tmp_path, "patient_id,path,split\np1,a.nii,train", files, "split.csv")
    with pytest.raises(ManifestError, match=r"^config.data.folds is set but split.csv has no 'fold' column"):
        load_manifest(split_csv, folds={"test": (0,)}, names=names)
    both = _write(tmp_path, "patient_id,path,split,fold\np1,a.nii,train,0", files, "both.csv")
    with pytest.raises(ManifestError, match=r"^both.csv has a 'split' column and config.data.folds is set too"):
        load_manifest(both, folds={"test": (0,)}, names=names)
    assert load_manifest(both)[0].split == "train"  # both columns, no mapping: the split column
    odd = _write(tmp_path, "patient_id,path,fold\np1,a.nii,0\np2,b.nii,x\np3,c.nii,1", files, "odd.csv")
    with pytest.raises(ManifestError, match=r"1 row\(s\) of odd.csv have a fold that config.data.folds does not "
                                            r"place(.|\n)*line 3: fold 'x' is not a whole number"):
        load_manifest(odd, folds={"test": (0,)}, names=names)


@pytest.mark.parametrize("text, match", [
    ('{"test": [0], "val": [0]}', r"puts fold 0 in both test and val; give each fold one split"),
    ('{"tset": [0]}', r"names unknown split\(s\) 'tset'; use train, val, test"),
    ('{"test": [0.5]}', r"gives test \[0.5\]; list the split's folds as non-negative integers"),
    ('{"test": [-1]}', r"gives test \[-1\]"),
    ('{"test": [true]}', r"gives test \[true\]"),
    ('[0, 1]', r"is not a JSON object naming at least one split"),
    ('{}', r"is not a JSON object naming at least one split"),
    ("{'test': [0]}", r"is not valid JSON \(Expecting property name"),
])
def test_fold_mapping_mistakes_are_one_sentence(text, match):
    with pytest.raises(ValueError, match=r"^config.data.folds.*" + match) as exc:
        parse_folds(text, "config.data.folds")
    assert "\n" not in str(exc.value)


def test_parse_folds_reads_lists_and_single_folds():
    assert parse_folds("") is None and parse_folds("  ") is None
    assert parse_folds('{"test": [3, 4], "val": 1, "train": [0]}') == {"test": (3, 4), "val": (1,), "train": (0,)}


def test_a_folder_for_a_manifest_is_one_sentence(tmp_path):
    (tmp_path / "scans").mkdir()
    with pytest.raises(ManifestError) as exc:
        load_manifest(str(tmp_path / "scans"))
    msg = str(exc.value)
    assert "is a folder, not a manifest" in msg and f"python -m medjax.data.make_manifest LAYOUT {tmp_path}/scans " \
        "--out manifest.csv" in msg and "\n" not in msg
    _write(tmp_path / "scans", "patient_id,path,split\np1,a.nii,train", name="manifest.csv")
    with pytest.raises(ManifestError, match=r"such as .*scans/manifest.csv, which exists"):
        load_manifest(str(tmp_path / "scans"))
