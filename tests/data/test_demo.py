"""The file-based demo dataset: DICOM and NIfTI that real readers accept, consistent geometry and labels."""

import collections
import csv
import glob
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medjax.data import demo
from medjax.data.demo_anatomy import synthesize_subject
from medjax.data.demo import LESION_CLASSES, MANIFEST_COLUMNS, assign_patients, write_demo_dataset

SMALL = dict(num_patients=5, seed=3, image_size=64, slices=8)
REQUIRED_TAGS = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                 "SOPClassUID", "Modality", "SeriesDescription", "SeriesNumber", "InstanceNumber",
                 "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                 "SpacingBetweenSlices", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
                 "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "RepetitionTime", "EchoTime",
                 "FrameOfReferenceUID")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    path = write_demo_dataset(str(root), **SMALL)
    rows = []
    for fmt in ("dicom", "nifti"):  # one manifest per format; manifest.csv repeats the DICOM one
        with open(root / f"manifest_{fmt}.csv", newline="") as f:
            rows += list(csv.DictReader(f))
    with open(path, newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [r["path"] for r in _dicom_rows(rows)]
    return root, path, rows


def _series(root, rel):
    """(datasets sorted along the slice normal, file names in that order)."""
    files = glob.glob(os.path.join(root, rel, "*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    normal = np.cross(*np.reshape(np.asarray(dss[0].ImageOrientationPatient, float), (2, 3)))
    order = np.argsort([np.dot(normal, np.asarray(d.ImagePositionPatient, float)) for d in dss])
    return [dss[i] for i in order], [os.path.basename(files[i]) for i in order]


def _physical(ds):
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _dicom_rows(rows):
    return [r for r in rows if r["path"].startswith("dicom/")]


def test_manifest_columns_and_relative_paths(dataset):
    root, path, rows = dataset
    with open(path) as f:
        assert tuple(f.readline().strip().split(",")) == MANIFEST_COLUMNS
    assert len(rows) == SMALL["num_patients"] * 3 * 2  # patients x contrasts x formats
    for r in rows:
        assert not os.path.isabs(r["path"]) and not os.path.isabs(r["mask_path"])
        target = os.path.join(root, r["path"])
        assert os.path.isdir(target) if r["path"].startswith("dicom/") else os.path.isfile(target)
        assert os.path.isfile(os.path.join(root, r["mask_path"]))
        assert int(r["lesion"]) in range(len(LESION_CLASSES))
        assert r["series_description"] == {"T1": "T1w", "T2": "T2w", "FLAIR": "FLAIR"}[r["contrast"]]
    assert {r["path"] for r in rows if r["path"].startswith("nifti/")} == {
        f"nifti/{r['patient_id']}_{r['contrast']}.nii.gz" for r in rows}


def test_no_patient_in_two_splits_and_classes_balanced(dataset):
    _, _, rows = dataset
    per_patient = collections.defaultdict(set)
    for r in rows:
        per_patient[r["patient_id"]].add((r["split"], r["lesion"], r["mask_path"]))
    assert len(per_patient) == SMALL["num_patients"] and all(len(v) == 1 for v in per_patient.values())
    labels, splits = assign_patients(24, seed=0)
    assert np.bincount(labels).tolist() == [6, 6, 6, 6]
    counts = collections.Counter(zip(splits, labels.tolist()))
    assert all(counts[("train", c)] == 4 and counts[("val", c)] == 1 and counts[("test", c)] == 1 for c in range(4))
    labels, splits = assign_patients(41, seed=1)
    assert np.ptp(np.bincount(labels)) <= 1 and collections.Counter(splits)["train"] in range(27, 32)
    assert all(set(labels[np.array(splits) == s]) == {0, 1, 2, 3} for s in ("train", "val", "test"))


def test_same_seed_writes_identical_files(dataset, tmp_path):
    root, _, rows = dataset
    write_demo_dataset(str(tmp_path), **SMALL)
    for r in rows:
        if r["path"].startswith("dicom/"):
            names = sorted(os.listdir(os.path.join(root, r["path"])))
            assert names == sorted(os.listdir(tmp_path / r["path"]))
            for n in names:  # UIDs derive from the seed: the whole file repeats, not only the pixels
                assert (tmp_path / r["path"] / n).read_bytes() == open(os.path.join(root, r["path"], n), "rb").read()
        else:
            for rel in (r["path"], r["mask_path"]):
                a = np.asarray(nib.load(os.path.join(root, rel)).dataobj)
                np.testing.assert_array_equal(a, np.asarray(nib.load(tmp_path / rel).dataobj))
    other = synthesize_subject(SMALL["seed"] + 1, 0, 0, image_size=64, slices=8).images["T1"]
    assert not np.allclose(other, synthesize_subject(SMALL["seed"], 0, 0, image_size=64, slices=8).images["T1"])


def test_dicom_tags_and_slice_geometry(dataset):
    root, _, rows = dataset
    series_uids, sop_uids, shuffled = set(), set(), False
    studies = collections.defaultdict(set)
    for r in _dicom_rows(rows):
        dss, names = _series(root, r["path"])
        assert len(dss) == SMALL["slices"]
        for d in dss:
            for tag in REQUIRED_TAGS:
                assert tag in d, (r["path"], tag)
            assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
            assert d.SOPClassUID == pydicom.uid.MRImageStorage and d.Modality == "MR"
            assert d.PatientID == r["patient_id"] and d.SeriesDescription == r["series_description"]
            assert [float(v) for v in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert (d.BitsAllocated, d.BitsStored, d.PixelRepresentation) == (16, 12, 0)
            assert d.PhotometricInterpretation == "MONOCHROME2" and d.pixel_array.max() <= 4095
            assert float(d.RescaleSlope) != 1.0
            assert float(d.SliceThickness) <= float(d.SpacingBetweenSlices)
            sop_uids.add(d.SOPInstanceUID)
            studies[d.PatientID].add((d.StudyInstanceUID, d.FrameOfReferenceUID))
        assert len({d.SeriesInstanceUID for d in dss}) == 1 and dss[0].SeriesInstanceUID not in series_uids
        series_uids.add(dss[0].SeriesInstanceUID)
        z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
        np.testing.assert_allclose(np.diff(z), float(dss[0].SpacingBetweenSlices), atol=1e-3)
        xy = np.array([[float(v) for v in d.ImagePositionPatient[:2]] for d in dss])
        assert np.ptp(xy, axis=0).max() == 0.0  # an axial stack: only z moves
        instances = [int(d.InstanceNumber) for d in dss]
        assert instances in (sorted(instances), sorted(instances, reverse=True))
        shuffled |= names != sorted(names)
    assert shuffled  # file names do not give the slice order
    assert len(sop_uids) == len(_dicom_rows(rows)) * SMALL["slices"]
    assert all(len(v) == 1 for v in studies.values())  # one study and frame of reference per patient


def _dicom_volume_ras(dss):
    """DICOM slices (sorted along the normal) in physical units -> (X, Y, Z) array in RAS voxel order."""
    vol = np.stack([_physical(d) for d in dss], axis=-1)  # (rows, cols, slices)
    return vol.transpose(1, 0, 2)[::-1, ::-1]  # columns run to the patient's left, rows posterior


def test_rescale_reproduces_the_float_image(dataset):
    root, _, rows = dataset
    for r in _dicom_rows(rows)[:6]:
        subject = synthesize_subject(SMALL["seed"], int(r["patient_id"][4:]), int(r["lesion"]),
                                     image_size=SMALL["image_size"], slices=SMALL["slices"])
        dss, _ = _series(root, r["path"])
        slope = float(dss[0].RescaleSlope)
        truth = subject.images[r["contrast"]]
        assert np.abs(_dicom_volume_ras(dss) - truth).max() <= slope
        nifti = nib.load(os.path.join(root, f"nifti/{r['patient_id']}_{r['contrast']}.nii.gz"))
        assert nifti.get_data_dtype() == np.int16
        assert np.abs(nifti.get_fdata(dtype=np.float32) - truth).max() <= slope


def test_nifti_affine_is_ras_and_matches_dicom_geometry(dataset):
    root, _, rows = dataset
    for r in _dicom_rows(rows)[::4]:
        dss, _ = _series(root, r["path"])
        img = nib.load(os.path.join(root, f"nifti/{r['patient_id']}_{r['contrast']}.nii.gz"))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)
        np.testing.assert_allclose(img.header.get_zooms(), (col_sp, row_sp, float(dss[0].SpacingBetweenSlices)))
        data = np.asarray(img.dataobj.get_unscaled())
        inv = np.linalg.inv(img.affine)
        rr, cc = np.meshgrid(np.arange(dss[0].Rows), np.arange(dss[0].Columns), indexing="ij")
        for k, d in enumerate(dss):
            iop = np.asarray(d.ImageOrientationPatient, float)
            lps = (np.asarray(d.ImagePositionPatient, float)[:, None, None] + iop[:3, None, None] * cc * col_sp
                   + iop[3:, None, None] * rr * row_sp)  # DICOM: column index along the row direction
            ras = lps * np.array([-1.0, -1.0, 1.0])[:, None, None]
            ijk = np.tensordot(inv[:3, :3], ras, axes=1) + inv[:3, 3, None, None]
            idx = np.rint(ijk).astype(int)
            np.testing.assert_allclose(ijk, idx, atol=1e-3)  # every pixel lands on a voxel centre
            assert (idx[2] == k).all()  # positions along the normal increase with RAS z
            np.testing.assert_array_equal(data[idx[0], idx[1], idx[2]], d.pixel_array)


def test_flair_nulls_csf_and_t2_shows_it_bright(dataset):
    root, _, rows = dataset
    for pid in sorted({r["patient_id"] for r in rows})[:3]:
        label = int(next(r["lesion"] for r in rows if r["patient_id"] == pid))
        fr = synthesize_subject(SMALL["seed"], int(pid[4:]), label, image_size=64, slices=8).fractions
        csf, wm = fr["csf"] > 0.8, fr["wm"] > 0.9
        assert csf.sum() >= 10 and wm.sum() >= 100
        t2, flair = (nib.load(os.path.join(root, f"nifti/{pid}_{c}.nii.gz")).get_fdata() for c in ("T2", "FLAIR"))
        assert flair[csf].mean() < 0.4 * flair[wm].mean()
        assert t2[csf].mean() > 2.0 * t2[wm].mean()


def test_lesion_masks_match_labels_and_stay_in_the_brain(dataset):
    root, _, rows = dataset
    seen = set()
    for pid, label in sorted({(r["patient_id"], int(r["lesion"])) for r in rows}):
        mask_img = nib.load(os.path.join(root, f"masks/{pid}_lesion.nii.gz"))
        mask = np.asarray(mask_img.dataobj)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        np.testing.assert_array_equal(mask_img.affine, nib.load(os.path.join(root, f"nifti/{pid}_T1.nii.gz")).affine)
        fr = synthesize_subject(SMALL["seed"], int(pid[4:]), label, image_size=64, slices=8).fractions
        brain = fr["gm"] + fr["wm"] + fr["csf"] + fr["lesion"]
        if label == 0:
            assert mask.sum() == 0
            continue
        seen.add(label)
        inside = mask > 0
        assert inside.sum() > 0 and (brain[inside] > 0.5).all()
        assert inside.sum() < 0.05 * (brain > 0.5).sum()  # a local structure, not a global change
        t2 = nib.load(os.path.join(root, f"nifti/{pid}_T2.nii.gz")).get_fdata()
        assert t2[inside].mean() > t2[fr["wm"] > 0.9].mean()  # every kind is T2-bright against white matter
    assert seen == {1, 2, 3}


def test_command_line_and_argument_checks(tmp_path, capsys):
    demo.main([str(tmp_path), "--patients", "1", "--seed", "3", "--image-size", "64", "--slices", "8",
                     "--formats", "nifti", "--contrasts", "FLAIR"])
    assert "manifest.csv" in capsys.readouterr().out
    with open(tmp_path / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["contrast"]) for r in rows] == [("nifti/DEMO0000_FLAIR.nii.gz", "FLAIR")]
    with pytest.raises(ValueError, match="formats"):
        write_demo_dataset(str(tmp_path), formats=("png",))
    with pytest.raises(ValueError, match="contrasts"):
        write_demo_dataset(str(tmp_path), contrasts=("T1c",))


def test_project_reader_gives_the_same_volume_from_dicom_and_nifti(dataset):
    readers = pytest.importorskip("medjax.readers")
    root, _, rows = dataset
    for r in _dicom_rows(rows)[:3]:
        from_dicom = readers.read_image(os.path.join(root, r["path"]), expect_3d=True)
        nifti_path = os.path.join(root, f"nifti/{r['patient_id']}_{r['contrast']}.nii.gz")
        from_nifti = readers.read_image(nifti_path, expect_3d=True)
        slope = float(_series(root, r["path"])[0][0].RescaleSlope)
        assert from_dicom.array.shape == from_nifti.array.shape == (64, 64, 8)
        assert np.abs(from_dicom.array - from_nifti.array).max() <= slope
        np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)
        np.testing.assert_allclose(from_dicom.spacing, from_nifti.spacing, atol=1e-6)


def test_tissue_labels_follow_the_tissue_fractions_and_the_lesion_mask(dataset):
    root, path, _ = dataset
    with open(path, newline="") as f:
        plain = list(csv.DictReader(f))
    with open(root / "manifest_tissue.csv", newline="") as f:
        tissue_rows = list(csv.DictReader(f))
    assert [{**r, "mask_path": ""} for r in tissue_rows] == [{**r, "mask_path": ""} for r in plain]
    for r in tissue_rows:
        assert r["mask_path"] == f"masks/{r['patient_id']}_tissue.nii.gz"
    labels, _ = assign_patients(SMALL["num_patients"], SMALL["seed"])
    p = int(np.flatnonzero(labels > 0)[0])  # a patient with a lesion
    subject = synthesize_subject(SMALL["seed"], p, int(labels[p]), image_size=SMALL["image_size"],
                                 slices=SMALL["slices"], contrasts=("T1",))
    stored = np.asarray(nib.load(root / f"masks/{demo.patient_id(p)}_tissue.nii.gz").dataobj)
    expected = demo.tissue_labels(subject.fractions, subject.mask)
    np.testing.assert_array_equal(stored, expected)
    assert set(np.unique(stored)) <= set(range(len(demo.TISSUE_CLASSES)))
    lesion = demo.TISSUE_CLASSES.index("lesion")
    np.testing.assert_array_equal(stored == lesion, subject.mask > 0)
    # Away from the lesion, a voxel that is mostly grey matter is labelled grey matter, and so on.
    fr = subject.fractions
    for name, key in (("csf", "csf"), ("grey_matter", "gm"), ("white_matter", "wm")):
        pure = (fr[key] > 0.8) & (subject.mask == 0)
        assert pure.sum() > 50, name
        assert (stored[pure] == demo.TISSUE_CLASSES.index(name)).all(), name
    outside = (fr["csf"] + fr["gm"] + fr["wm"] + fr["lesion"]) < 0.2
    assert (stored[outside] == 0).all()
