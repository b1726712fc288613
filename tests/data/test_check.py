"""python -m medjax.data.check: passes on the demo manifest, names every bad row of a corrupted one."""

import json
import os
import shutil

import numpy as np
import pytest

from medjax.data import check
from medjax.data.demo import write_demo_dataset

COLUMNS = ["--label-columns", "lesion", "--ignore-columns", "contrast,series_description"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, write_demo_dataset(str(root), num_patients=2, image_size=48, slices=4)


def test_check_passes_on_the_demo_and_writes_previews_and_dumps(demo, tmp_path, capsys):
    _, manifest = demo
    status = check.main([manifest, *COLUMNS, "--preview", str(tmp_path / "p"), "--dump", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "rows: 6 (train 6); patients: 2" in out
    assert "shapes: 48x48x4 (6)" in out and "orientation: RAS (6)" in out and "problems: none" in out
    assert len(os.listdir(tmp_path / "p")) == 6 * 3  # three slices per series
    dumps = sorted(os.listdir(tmp_path / "d"))
    assert len(dumps) == 12  # .npy + .json per row
    meta = json.loads((tmp_path / "d" / dumps[0]).read_text())
    array = np.load(tmp_path / "d" / dumps[1])
    assert meta["orientation"] == "RAS" and len(meta["spacing"]) == 3
    assert meta["transform"]["method"] == "percentile"
    assert array.shape == tuple(meta["shape"]) and 0.0 <= array.min() and array.max() <= 1.0


def test_check_fails_naming_each_corrupted_file(demo, tmp_path, capsys):
    root, manifest = demo
    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    series = sorted(os.listdir(bad / "dicom" / "DEMO0000"))
    first = bad / "dicom" / "DEMO0000" / series[0]
    victim = sorted(first.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated DICOM slice
    for name in os.listdir(bad / "dicom" / "DEMO0001" / series[1]):
        os.remove(bad / "dicom" / "DEMO0001" / series[1] / name)  # an empty series folder
    status = check.main([str(bad / "manifest.csv"), *COLUMNS])
    out = capsys.readouterr().out
    assert status == 1
    assert "PROBLEMS: 2 bad row(s)" in out
    assert str(victim.name) in out or str(first) in out
    assert "DEMO0001" in out and series[1] in out


def test_check_reports_manifest_errors_in_one_sentence(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("patient_id,path,split\np1,missing.nii.gz,train\n")
    assert check.main([str(tmp_path / "m.csv")]) == 1
    err = capsys.readouterr().err
    assert "missing.nii.gz" in err and "Traceback" not in err


@pytest.mark.parametrize("axis, count", [("axial", 6 + 5), ("coronal", 5 + 4), ("sagittal", 4 + 6)])
def test_check_counts_slices_along_the_chosen_axis(tmp_path, capsys, axis, count):
    import nibabel as nib

    psr = np.array([[0.0, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0, 0, 0, 1]])
    for name, affine in [("ras.nii.gz", np.eye(4)), ("psr.nii.gz", psr)]:  # psr: stored axes go P, S, R
        volume = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / name))
    (tmp_path / "m.csv").write_text("patient_id,path,split\np1,ras.nii.gz,train\np2,psr.nii.gz,train\n")
    assert check.main([str(tmp_path / "m.csv"), "--axis", axis]) == 0
    out = capsys.readouterr().out
    assert f"2D slices ({axis}): {count}" in out and "shapes: 4x5x6 (1), 6x4x5 (1)" in out
