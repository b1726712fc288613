"""The synthetic chest X-ray demo: findings measured on the films against their own generator, masks,
DICOM read back as medjax reads it, determinism, the NIH/CheXpert-style tables through make_manifest, and
the demo settings every job reads."""

import collections
import filecmp
import os

import ml_collections
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy.ndimage import binary_erosion, gaussian_filter

from medjax.data import sources
from medjax.data.cxr_patient import UNCERTAIN, render, synthesize_patient
from medjax.data.demo_cxr import (DIAGNOSES, FINDINGS, MANIFEST_COLUMNS, assign_patients, detector,
                                  write_cxr_dataset)
from medjax.data.manifest import load_manifest
from medjax.readers import read_image
from tests.helpers import csv_rows, load_config
from tests.helpers import make_manifest_cli as _run

SMALL = dict(num_patients=10, seed=1, image_size=64)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("cxr")
    return root, write_cxr_dataset(str(root), **SMALL)


def _width(mask):
    """Widest row of a mask, in pixels (what a reader measures for the cardiothoracic ratio)."""
    return max((np.ptp(np.flatnonzero(r)) + 1) if r.any() else 0 for r in mask)


def _patient_with(group, finding, seed=0):
    for i in range(200):
        p = synthesize_patient(seed, i, group)
        if p.truth[0][finding]:
            return p
    raise AssertionError(f"no {group} patient shows {finding}")


def test_cardiothoracic_ratio_measured_on_the_masks_decides_cardiomegaly():
    seen = collections.Counter()
    for i, group in enumerate(["normal", "cardiomegaly"] * 6):
        p = synthesize_patient(0, i, group)
        film = render(p, 0, 96, details=True)
        ratio = _width(film.heart) / _width(film.thorax)
        truth = p.truth[0]["Cardiomegaly"]
        assert (ratio > 0.5) == bool(truth), (i, group, ratio, p.anatomy.ctr)
        assert abs(ratio - p.anatomy.ctr) < 0.03
        assert p.labels[0]["Cardiomegaly"] in (truth, UNCERTAIN)
        seen[truth] += 1
    assert seen[0] >= 6 and seen[1] >= 6
    assert all(0.36 <= synthesize_patient(0, i, "normal").anatomy.ctr < 0.5 for i in range(20))


def test_effusion_makes_the_lateral_lung_base_dense_and_leaves_the_lung_mask():
    p = _patient_with("effusion", "Effusion")
    side = next(les.side for les in p.lesions[0] if les.kind == "Effusion")
    wet, dry = render(p, 0, 128, noise=False), render(p, 0, 128, lesions=(), noise=False)
    label = 1 if side < 0 else 2  # right lung (side -1) on the image left
    fluid = (dry.lungs == label) & (wet.lungs != label)
    assert fluid.sum() > 10
    rows, cols = np.nonzero(fluid)
    lung_rows, lung_cols = np.nonzero(dry.lungs == label)
    assert rows.mean() > np.percentile(lung_rows, 75)  # at the base
    lateral = cols.mean() < lung_cols.mean() if label == 1 else cols.mean() > lung_cols.mean()
    assert lateral
    assert wet.attenuation[fluid].mean() > dry.attenuation[fluid].mean() + 0.5
    assert wet.image[fluid].mean() > dry.image[fluid].mean() + 0.1
    other = dry.lungs == 3 - label
    assert abs(wet.attenuation[other].mean() - dry.attenuation[other].mean()) < 0.02


def test_pneumothorax_space_has_no_lung_markings_and_no_lung_mask():
    p = _patient_with("pneumothorax", "Pneumothorax")
    film = render(p, 0, 256, noise=False, details=True)
    normal = render(p, 0, 256, lesions=(), noise=False, details=True)
    gap = binary_erosion(film.gap, iterations=4)
    assert gap.sum() > 20
    assert np.all(film.lungs[film.gap] == 0)
    assert np.abs(film.markings[gap]).max() == 0 and np.abs(normal.markings[gap]).mean() > 0.3

    def texture(img):  # local variance of the high-passed film in the gap: lung markings, ribs
        high = img - gaussian_filter(img, 1.0)
        return (high[gap] ** 2).mean()

    assert texture(film.attenuation) < 0.75 * texture(normal.attenuation)  # the ribs stay
    assert film.attenuation[gap].mean() < normal.attenuation[gap].mean()  # no parenchyma: darker


def test_nodules_and_masses_are_sized_in_millimetres():
    for group, finding in (("nodule", "Nodule"), ("mass", "Mass")):
        p = _patient_with(group, finding)
        lesion = next(les for les in p.lesions[0] if les.kind == finding)
        assert (lesion.size < 30) if finding == "Nodule" else (lesion.size > 30)
        size = 128
        film = render(p, 0, size, noise=False)
        bare = render(p, 0, size, lesions=[les for les in p.lesions[0] if les.kind != finding], noise=False)
        opacity = film.attenuation - bare.attenuation > 0.05
        from medjax.data.cxr_patient import spacing_mm

        width_mm = _width(opacity) * spacing_mm(p, size)
        assert abs(width_mm - lesion.size) < max(0.35 * lesion.size, 3 * spacing_mm(p, size)), (width_mm, lesion)


def test_lung_masks_are_on_the_correct_side():
    for i in range(4):
        film = render(synthesize_patient(2, i, "normal"), 0, 64)
        cols = np.arange(64)[None, :]
        right, left = film.lungs == 1, film.lungs == 2
        assert right.sum() > 150 and left.sum() > 150
        assert (cols * right).sum() / right.sum() < 32 < (cols * left).sum() / left.sum()


def test_prevalences_give_certain_positives_in_every_split_at_the_default_size():
    groups, splits = assign_patients(60, 0)
    positives, uncertain, listed = collections.Counter(), 0, 0
    diagnoses = collections.Counter()
    for i, (group, split) in enumerate(zip(groups, splits)):
        p = synthesize_patient(0, i, group)
        for labels, dx in zip(p.labels, p.diagnosis):
            diagnoses[(dx, split)] += 1
            for f in FINDINGS:
                positives[(f, split)] += labels[f] == 1
                uncertain += labels[f] == UNCERTAIN
                listed += labels[f] != 0
    for f in FINDINGS:
        for s in ("train", "val", "test"):
            assert positives[(f, s)] > 0, (f, s)
    for dx in DIAGNOSES:
        for s in ("train", "val", "test"):
            assert diagnoses[(dx, s)] > 0, (dx, s)
    assert 0.03 <= uncertain / listed <= 0.15, uncertain / listed
    assert collections.Counter(splits) == {"train": 40, "val": 10, "test": 10}


def test_manifest_loads_and_dicom_matches_png(written):
    root, path = written
    rows = csv_rows(path)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    manifest = load_manifest(path, label_columns=FINDINGS + ("diagnosis",), ignore_columns=("follow_up",))
    assert len(manifest.patients()) == SMALL["num_patients"]
    dicom_rows = csv_rows(os.path.join(root, "manifest_dicom.csv"))
    photometric = collections.Counter()
    for png_row, dcm_row in zip(rows, dicom_rows):
        png = read_image(os.path.join(root, png_row["path"]))
        dcm = read_image(os.path.join(root, dcm_row["path"]))
        ds = pydicom.dcmread(os.path.join(root, dcm_row["path"]), stop_before_pixels=True)
        photometric[(ds.Modality, ds.PhotometricInterpretation)] += 1
        assert ds.ViewPosition == "PA" and ds.PatientID == png_row["patient_id"]
        assert int(ds.BitsStored) in (12, 14)

        def window(a):
            return (a - a.min()) / (a.max() - a.min())

        assert np.abs(window(png.array) - window(dcm.array)).max() < 2.0 / 2 ** int(ds.BitsStored) + 1e-4
        spacing = float(png_row["pixel_spacing"].split(",")[0])
        assert dcm.spacing[:2] == pytest.approx((spacing, spacing), rel=1e-5)
        assert 350 <= spacing * SMALL["image_size"] <= 430
        mask = np.asarray(Image.open(os.path.join(root, png_row["mask_path"])))
        assert mask.shape == png.array.shape and set(np.unique(mask)) <= {0, 1, 2}
    assert any(p == "MONOCHROME1" for _, p in photometric), photometric
    kinds = collections.Counter((detector(0, i)["modality"], detector(0, i)["photometric"]) for i in range(60))
    assert len(kinds) == 4  # CR and DX, each in MONOCHROME1 and MONOCHROME2


def test_rewrite_is_byte_identical(written, tmp_path):
    root, _ = written
    write_cxr_dataset(str(tmp_path), **SMALL)
    for folder, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root)
            assert filecmp.cmp(os.path.join(root, rel), tmp_path / rel, shallow=False), rel


def test_tables_through_make_manifest_reproduce_labels_and_splits(written, tmp_path, capsys):
    root, path = written
    ours = {os.path.basename(r["path"]): r for r in csv_rows(path)}
    out = tmp_path / "chexpert.csv"
    status, _, err = _run(capsys, "label-table", root, "--out", out, "--table", root / "labels.csv",
                          "--image-column", "Image Index", "--patient-column", "Patient ID",
                          "--finding-columns", ",".join(FINDINGS), "--keep-columns", "diagnosis", "--split-lists",
                          f"train={root / 'train_list.txt'}", f"val={root / 'val_list.txt'}",
                          f"test={root / 'test_list.txt'}")
    assert status == 0, err
    theirs = csv_rows(out)
    assert len(theirs) == len(ours)
    for r in theirs:
        mine = ours[os.path.basename(r["path"])]
        for c in ("patient_id", "split", "diagnosis", *FINDINGS):
            assert r[c] == mine[c], (c, r, mine)
    out = tmp_path / "nih.csv"
    status, _, err = _run(capsys, "label-table", root, "--out", out, "--table", root / "Data_Entry.csv",
                          "--image-column", "Image Index", "--patient-column", "Patient ID",
                          "--labels-column", "Finding Labels", "--spacing-columns", "OriginalImagePixelSpacing[x,y]",
                          "--original-size-columns", "OriginalImage[Width,Height]", "--split-lists",
                          f"train={root / 'train_val_list.txt'}", f"test={root / 'test_list.txt'}")
    assert status == 0, err
    for r in csv_rows(out):
        mine = ours[os.path.basename(r["path"])]
        assert r["patient_id"] == mine["patient_id"] and r["pixel_spacing"] == mine["pixel_spacing"]
        assert (r["split"] == "test") == (mine["split"] == "test")
        for f in FINDINGS:  # NIH's table has no uncertain label: -1 is listed, so it reads as 1
            assert r.get(f, "0") == ("1" if mine[f] in ("1", "-1") else "0"), (f, r, mine)


def _config(kind="cxr", **sections):
    c = ml_collections.ConfigDict({"seed": 0, "data": {"demo_kind": kind, "demo_patients": 4, "demo_image_size": 48,
                                                        "demo_slices": 4, "demo_dir": ""}, **sections})
    return c


def test_demo_kind_keeps_mri_and_cxr_folders_apart(tmp_path):
    mri, cxr = sources.demo_fingerprint(_config("mri")), sources.demo_fingerprint(_config("cxr"))
    assert "kind" not in mri and cxr["kind"] == "cxr" and mri != cxr
    manifest = sources.demo_manifest(_config("cxr"), str(tmp_path))
    assert manifest == str(tmp_path / "demo_data" / "manifest.csv") and os.path.isfile(manifest)
    assert sources.is_demo_folder(str(tmp_path / "demo_data"), cxr)
    assert not sources.is_demo_folder(str(tmp_path / "demo_data"), mri)
    probe = _config("cxr", probe={"label_column": "Cardiomegaly"})
    sources.use_run_demo_data(probe, str(tmp_path))
    assert probe.data.demo_dir == str(tmp_path / "demo_data")
    other = _config("mri", probe={"label_column": "contrast"})
    sources.use_run_demo_data(other, str(tmp_path))
    assert other.data.demo_dir == ""
    with pytest.raises(ValueError, match="config.data.demo_kind='xray' is not valid"):
        sources.demo_fingerprint(_config("xray"))


@pytest.mark.parametrize("section, key", [({"probe": {"label_column": ""}}, "config.probe.label_column"),
                                          ({"probe": {"label_column": ""}, "evals": {}}, "config.evals.label_column"),
                                          ({"finetune": {"targets": ()}}, "config.finetune.targets"),
                                          ({"segment": {"manifest": "", "demo_masks": "lesion"}},
                                           "config.segment.manifest")])
def test_jobs_defaulting_to_the_mri_lesion_column_are_refused_on_cxr(section, key, tmp_path):
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + " is empty"):
        sources.demo_manifest(_config("cxr", **section), str(tmp_path))
    assert not os.path.exists(tmp_path / "demo_data")


def test_demo_cxr_variants_use_the_cxr_demo_without_flips():
    for name in ("dinov2_reg", "mae"):
        c = load_config(name, "demo_cxr")
        assert c.data.demo_kind == "cxr" and c.crops.flip_p == 0.0 and c.evals.label_column == "diagnosis"
        assert load_config(name, "demo").data.demo_kind == "mri"
