"""The segmentation trainer end to end on the ``:smoke`` config, and what it does with bad input.

The run is ``segment_run`` (tests/segment/conftest.py): the backbone comes from
``smoke_checkpoints`` (a directory in a pretraining run's format, written directly); the trainer
reads its step 1, which is not the latest, so the same run shows the warning. The bad-input tests use a three-patient NIfTI manifest built here and
stop in the data layer, before any model is built.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medjax.segment.validate import validate
from medjax.segment.data import load_data
from tests.helpers import load_config, medjax


def test_segment_writes_results_tables_overlays_and_models(segment_run):
    workdir, results, stdout = segment_run
    names = ["results.json", "results.md", "training_curves.png", "few_label.png"]
    names += [f"overlays_{i}_{h}.png" for i in ("random_init", "pretrained") for h in ("linear", "decoder")]
    names.append("overlays_scratch_unet.png")
    for name in names:
        assert (workdir / name).stat().st_size > 0, name
    assert len(os.listdir(workdir / "predictions" / "pretrained_decoder")) == 2
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["empty_rule"] == "nan" and "left out of the mean" in saved["rules"]
    assert saved["hd95_unit"] == "mm"
    record = saved["inits"]["pretrained"]
    assert record["step"] == 1 and record["latest"] is False and record["latest_step"] == 2
    assert record["content_hash"] != saved["inits"]["random_init"]["content_hash"]
    assert "WARNING" in stdout and "NOT the latest checkpoint" in stdout
    # 2 inits x 2 heads x fractions (0.5, 1.0), one seed each, then the U-Net baseline at each fraction
    assert [(r["init"], r["head"], r["fraction"]) for r in saved["runs"]] == [
        (i, h, f) for i in ("random_init", "pretrained") for h in ("linear", "decoder") for f in (0.5, 1.0)] + [
        ("scratch", "unet", 0.5), ("scratch", "unet", 1.0)]
    table = (workdir / "results.md").read_text()
    assert table.count("| pretrained | decoder | frozen |") == 2 and "Dice lesion / patient" in table
    for r in saved["runs"]:
        assert 0 < r["train_patients"] and r["train_slices"] > 0 and r["minutes"] > 0
        for level in ("slice", "volume", "patient"):
            c = r["test"][level]["classes"]["lesion"]
            assert 0.0 <= c["dice_mean"] <= 1.0, (level, c)
            assert c["hd95_n"] == 0 or c["hd95_mean"] >= 0.0
        assert len(r["history"]) == 2 and all(np.isfinite(h["train_loss"]) for h in r["history"])
    full = {r["init"]: r["train_patients"] for r in saved["runs"] if r["fraction"] == 1.0}
    for r in saved["runs"]:
        if r["fraction"] == 0.5:
            assert r["train_patients"] == full[r["init"]] // 2  # half of the training patients, whole patients
    assert len(os.listdir(workdir / "models")) == 10


def test_patient_summary_recomputes_from_the_saved_per_patient_values(segment_run):
    _, results, _ = segment_run
    for r in results["runs"]:
        dice = np.array([v[0] for v in r["per_case"]["patient"]["dice"]], float)
        summary = r["test"]["patient"]["classes"]["lesion"]
        assert summary["dice_mean"] == pytest.approx(np.nanmean(dice))
        assert summary["dice_n"] + summary["dice_left_out"] == len(dice)


# ---------------------------------------------------------------- bad input

SPACING = (0.8, 0.6, 2.0)  # x, y, z
SHAPE = (12, 10, 3)


def _nifti(path, array, spacing=SPACING):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.diag([*spacing, 1.0])), str(path))
    return path.name


def _manifest(tmp_path, masks: dict, *, no_mask_for=None):
    """One volume per patient (train, val, test), each with the given mask array (or a file name)."""
    rng = np.random.default_rng(0)
    lines = ["patient_id,path,split,mask_path"]
    for pid, split in (("A", "train"), ("B", "val"), ("C", "test")):
        image = _nifti(tmp_path / f"{pid}.nii.gz", 100 + 10 * rng.random(SHAPE))
        mask = masks.get(pid)
        name = "" if pid == no_mask_for else mask if isinstance(mask, str) else _nifti(tmp_path / f"{pid}_m.nii.gz",
                                                                                      mask)
        lines.append(f"{pid},{image},{split},{name}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "m.csv")


def _lesion(value=1):
    m = np.zeros(SHAPE, np.uint8)
    m[3:6, 4:7, 1] = value
    return m


def _load(tmp_path, manifest, class_names=("background", "lesion")):
    config = load_config("segment", "smoke")
    config.segment.manifest = manifest
    config.segment.class_names = class_names
    return load_data(config, str(tmp_path), "", size=14, mean=0.449, std=0.226, say=lambda m: None)


def test_good_manifest_keeps_native_masks_and_spacing_and_accepts_empty_masks(tmp_path):
    masks = {"A": _lesion(), "B": _lesion(), "C": np.zeros(SHAPE, np.uint8)}  # C: an empty mask, which is valid
    splits, info = _load(tmp_path, _manifest(tmp_path, masks))
    test = splits["test"]
    assert len(test) == 3 and test.native[0].shape == (SHAPE[1], SHAPE[0])  # axial display: (y, x)
    np.testing.assert_allclose(test.spacing, [[0.6, 0.8]] * 3)  # rows along y, columns along x
    np.testing.assert_allclose(test.slice_spacing, 2.0)
    assert splits["train"].masks.shape == (3, 14, 14) and splits["train"].masks.max() == 1
    assert info["hd95_unit"] == "mm" and not any(m.any() for m in test.native)


@pytest.mark.parametrize("case, match", [
    ("value", r"The mask .*A_m\.nii\.gz of .*A\.nii\.gz \(patient A\) holds label value\(s\) 3 that "
              r"config\.segment\.class_names does not name \(it names 0 background, 1 lesion\)"),
    ("shape", r"mask .*C_bad\.nii\.gz \(shape \(12, 10, 2\).*does not match image .*C\.nii\.gz \(shape \(12, 10, 3\)"),
    ("spacing", r"mask .*C_bad\.nii\.gz .*spacing \(0\.8, 0\.6, 2\.5\)\) does not match image"),
    ("missing", r"Line 4 of .*m\.csv \(.*C\.nii\.gz\) has no mask_path"),
    ("absent class", r"Class\(es\) oedema of config\.segment\.class_names appear in no training mask"),
])
def test_bad_masks_end_in_one_sentence(tmp_path, case, match):
    masks = {"A": _lesion(3 if case == "value" else 1), "B": _lesion(), "C": _lesion()}
    if case == "shape":
        masks["C"] = _nifti(tmp_path / "C_bad.nii.gz", np.zeros((12, 10, 2)))
    if case == "spacing":
        masks["C"] = _nifti(tmp_path / "C_bad.nii.gz", np.zeros(SHAPE), spacing=(0.8, 0.6, 2.5))
    manifest = _manifest(tmp_path, masks, no_mask_for="C" if case == "missing" else None)
    names = ("background", "lesion", "oedema") if case == "absent class" else ("background", "lesion")
    with pytest.raises(ValueError, match=match) as exc:
        _load(tmp_path, manifest, names)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("key, value, match", [
    ("checkpoint_dir", "", "Set exactly one of config.segment.checkpoint_dir"),
    ("heads", ("linear", "unet"), "config.segment.heads=('linear', 'unet') must list"),
    ("empty_rule", "zero", "config.segment.empty_rule='zero' is not valid"),
    ("label_fractions", (0.0, 1.0), "must hold fractions in"),
    ("class_names", ("background",), "must name background and at least one structure"),
    ("demo_masks", "organs", "config.segment.demo_masks='organs' is not valid"),
    ("class_names", ("background", "tumour"), "does not match the demo's lesion masks; set it to ('background', "
                                              "'lesion')"),
    ("demo_masks", "lungs", "config.segment.demo_masks='lungs' is not a mask set of the 'mri' demo"),
    ("empty_masks", "skip", "config.segment.empty_masks='skip' is not valid"),
    ("baselines", ("unet", "resnet"), "config.segment.baselines=('unet', 'resnet') must list unet at most once"),
    ("unet_depth", 0, "config.segment.unet_depth=0 must be a positive number"),
])
def test_bad_config_values_are_named(key, value, match):
    config = load_config("segment", "smoke")
    config.segment.checkpoint_dir = "runs/x"
    config.segment[key] = value
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        validate(config)


def test_demo_tissue_masks_label_csf_grey_and_white_matter(smoke_demo_dir, tmp_path):
    config = load_config("segment", "smoke")
    config.data.demo_dir = str(smoke_demo_dir)
    config.segment.demo_masks = "tissue"
    config.segment.class_names = load_config("segment", "demo").segment.class_names
    config.segment.checkpoint_dir = "runs/x"
    validate(config)
    splits, info = load_data(config, str(tmp_path), "", size=14, mean=0.449, std=0.226, say=lambda m: None)
    assert info["task"].startswith("demo brain MRI, tissue masks")
    assert info["manifest"].endswith("manifest_tissue.csv")
    counts = np.bincount(np.concatenate([m.ravel() for m in splits["train"].masks]), minlength=5)
    assert counts.size == 5 and (counts[:4] > 0).all()  # background, CSF, grey and white matter all present
    assert counts[2] + counts[3] > counts[1]  # more brain tissue than CSF in the slab


def test_command_line_error_is_one_sentence(tmp_path):
    proc = medjax(tmp_path, config="--config=configs/segment.py:smoke", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("medjax: error: Set exactly one of config.segment.checkpoint_dir"), proc.stderr
