"""python -m medjax.data.make_manifest for the table and DICOM layouts: NIH- and CheXpert-style label
tables, SIIM-style run-length masks (pixel-for-pixel against the DICOM as medjax reads it) and DICOM
trees grouped by series; bad input listed all at once with exit status 1."""

import os

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from medjax.data import check
from medjax.data.dicom_layouts import rle_mask, rle_runs
from medjax.data.manifest import load_manifest
from medjax.readers import read_image
from tests.helpers import csv_rows
from tests.helpers import make_manifest_cli as _run  # (status, stdout, stderr) of one command line


def _png(path, value=0, size=(4, 4)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full(size, value, np.uint8)).save(path)


def _dicom(path, pixels, *, patient="P1", series=None, sop=None, description="", modality="CR"):
    """A minimal single-frame uncompressed DICOM image; returns its SOPInstanceUID."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop = sop or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ComputedRadiographyImageStorage, sop
    ds.PatientID, ds.Modality, ds.SeriesDescription = patient, modality, description
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series or generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return sop


NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,OriginalImagePixelSpacing[x,y]\n"
NIH_ROWS = [("00000001_000.png", "Cardiomegaly|Effusion", 1, "0.143,0.139"), ("00000001_001.png", "No Finding", 1,
            "0.143,0.143"), ("00000002_000.png", "Hernia", 2, "0.168,0.168"), ("00000003_000.png", "No Finding", 3,
            "0.143,0.143"), ("00000004_000.png", "Effusion", 4, "0.139,0.139"), ("00000005_000.png", "Hernia", 5,
            "0.2,0.2")]


@pytest.fixture
def nih(tmp_path):
    """ChestX-ray14-like: images_00k/images/*.png, Data_Entry_2017.csv and the two official lists."""
    root = tmp_path / "nih"
    for k, (name, *_rest) in enumerate(NIH_ROWS):
        _png(str(root / f"images_{1 + k // 3:03d}" / "images" / name), value=k)
    lines = [f"{n},{f},0,{p},5{p},{s}\n" for n, f, p, s in NIH_ROWS]
    (root / "Data_Entry_2017.csv").write_text(NIH_HEADER + "".join(lines))
    (root / "train_val_list.txt").write_text("\n".join(r[0] for r in NIH_ROWS[:4]) + "\n")
    (root / "test_list.txt").write_text(NIH_ROWS[4][0] + "\n")  # image 5 is in no list
    return root


def _nih_args(root, out, *more):
    return ["label-table", root, "--out", out, "--table", root / "Data_Entry_2017.csv", "--image-column",
            "Image Index", "--patient-column", "Patient ID", "--labels-column", "Finding Labels",
            "--spacing-columns", "OriginalImagePixelSpacing[x,y]", "--keep-columns", "Patient Age",
            "--split-lists", f"train={root / 'train_val_list.txt'}", f"test={root / 'test_list.txt'}", *more]


def test_label_table_nih_findings_split_lists_and_spacing(nih, tmp_path, capsys):
    out = tmp_path / "m.csv"
    status, text, err = _run(capsys, *_nih_args(nih, out, "--val-fraction", "0.34"))
    assert status == 0, err
    rows = csv_rows(out)
    assert list(rows[0]) == ["patient_id", "path", "split", "Cardiomegaly", "Effusion", "Hernia", "pixel_spacing",
                             "Patient Age"]
    got = [(r["patient_id"], r["path"], r["Cardiomegaly"], r["Effusion"], r["Hernia"], r["pixel_spacing"])
           for r in rows]
    assert got == [("1", "nih/images_001/images/00000001_000.png", "1", "1", "0", "0.139,0.143"),  # row (y), col (x)
                   ("1", "nih/images_001/images/00000001_001.png", "0", "0", "0", "0.143,0.143"),
                   ("2", "nih/images_001/images/00000002_000.png", "0", "0", "1", "0.168,0.168"),
                   ("3", "nih/images_002/images/00000003_000.png", "0", "0", "0", "0.143,0.143"),
                   ("4", "nih/images_002/images/00000004_000.png", "0", "1", "0", "0.139,0.139")]
    splits = {r["patient_id"]: r["split"] for r in rows}
    assert splits["4"] == "test" and sorted(splits[p] for p in "123") == ["train", "train", "val"]
    assert rows[0]["split"] == rows[1]["split"]  # patient 1's two images stay together
    load_manifest(str(out), label_columns=("Cardiomegaly", "Effusion", "Hernia"),
                  ignore_columns=("Patient Age",))
    assert "1 image(s) of Data_Entry_2017.csv are in no split list and were left out (e.g. 00000005_000.png)" in text
    assert "written as given, not rescaled" in text
    assert "--config.probe.label_column=Cardiomegaly,Effusion,Hernia" in text and "multi-label" in text
    assert "Hernia=1" in text and "Cardiomegaly=0" not in text


def test_label_table_lists_every_bad_row_at_once(nih, tmp_path, capsys):
    with open(nih / "test_list.txt", "a") as f:
        f.write("00000002_001.png\n00000003_000.png\n")  # patient 2 across lists; an image in both lists
    with open(nih / "Data_Entry_2017.csv", "a") as f:
        f.write("00000009_000.png,Hernia,0,9,50,0.1,0.1\n00000004_001.png,,0,4,50,0.1,-2\n"
                "00000002_001.png,Hernia,1,2,50,0.1,0.1\n")
    for name in ("00000004_001.png", "00000002_001.png"):
        _png(str(nih / "images_009" / name))
    status, _, err = _run(capsys, *_nih_args(nih, tmp_path / "m.csv"))
    assert status == 1 and "Traceback" not in err and not (tmp_path / "m.csv").exists()
    assert "5 problem(s) of 5 kind(s)" in err
    assert "images in two split lists" in err and "00000003_000.png: train and test (test_list.txt line 3)" in err
    assert "table images not found under ROOT" in err and "line 8: '00000009_000.png' (not found)" in err
    assert "finding cells that are empty" in err and "line 9: ''" in err
    assert "pixel spacings (mm) or original sizes (pixels) that are no positive number" in err and "line 9: y]='-2'" in err
    assert "patients in two split lists" in err and "patient '2': test, train" in err


CHEX_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema\n"
CHEX_ROWS = [("patient00001/study1/view1_frontal.jpg", "Frontal,AP,1.0,,"),
             ("patient00001/study1/view2_lateral.jpg", "Lateral,,1.0,0.0,"),
             ("patient00002/study1/view1_frontal.jpg", "Frontal,PA,,-1.0,1.0"),
             ("patient00003/study2/view1_frontal.jpg", "Frontal,AP,0.0,1.0,-1.0")]


@pytest.fixture
def chexpert(tmp_path):
    root = tmp_path / "chex"
    for k, (path, _) in enumerate(CHEX_ROWS):
        _png(str(root / "CheXpert-v1.0-small" / "train" / path), value=k)
    table = "".join(f"CheXpert-v1.0-small/train/{p},Female,60,{cells}\n" for p, cells in CHEX_ROWS)
    (root / "train.csv").write_text(CHEX_HEADER + table)
    return root


@pytest.mark.parametrize("inside", [False, True])
def test_label_table_chexpert_keeps_uncertain_and_blank(chexpert, tmp_path, capsys, inside):
    out = tmp_path / "m.csv"
    root = chexpert / "CheXpert-v1.0-small" if inside else chexpert  # leading folders dropped when inside
    status, text, err = _run(capsys, "label-table", root, "--out", out, "--table", chexpert / "train.csv",
                             "--image-column", "Path", "--patient-pattern", r"patient(\d+)", "--findings-after",
                             "AP/PA", "--keep-columns", "Frontal/Lateral", "--val-fraction", "0",
                             "--test-fraction", "0.34")
    assert status == 0, err
    rows = csv_rows(out)
    assert list(rows[0]) == ["patient_id", "path", "split", "No Finding", "Cardiomegaly", "Edema", "Frontal/Lateral"]
    assert [(r["patient_id"], r["No Finding"], r["Cardiomegaly"], r["Edema"]) for r in rows] == [
        ("00001", "1", "", ""), ("00001", "1", "0", ""), ("00002", "", "-1", "1"), ("00003", "0", "1", "-1")]
    assert rows[2]["path"] == "chex/CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg"
    assert sorted(r["split"] for r in rows).count("test") in (1, 2) and rows[0]["split"] == rows[1]["split"]
    manifest = load_manifest(str(out), label_columns=("No Finding",),
                             ignore_columns=("Cardiomegaly", "Edema", "Frontal/Lateral"))
    assert [r.label("No Finding") for r in manifest] == [1, 1, -1, 0]
    assert "columns holding -1 (uncertain), kept as they are and read as unlabelled there: Cardiomegaly, Edema" in text


def test_label_table_chexpert_values_outside_the_vocabulary(chexpert, tmp_path, capsys):
    with open(chexpert / "train.csv", "a") as f:
        f.write("CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg,Male,50,Frontal,AP,2.0,x,1\n")
        f.write("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Male,50,Frontal,AP,1,0,0\n")
    _png(str(chexpert / "CheXpert-v1.0-small" / "train" / "patient00004" / "study1" / "view1_frontal.jpg"))
    status, _, err = _run(capsys, "label-table", chexpert, "--out", tmp_path / "m.csv", "--table",
                          chexpert / "train.csv", "--image-column", "Path", "--patient-pattern", r"patient(\d+)",
                          "--finding-columns", "No Finding,Cardiomegaly,Edema")
    assert status == 1
    assert "2 x finding values outside 1 / 0 / -1 (uncertain) / blank" in err
    assert "train.csv line 6: No Finding='2.0'" in err and "train.csv line 6: Cardiomegaly='x'" in err
    assert "1 x images listed twice in the table" in err and "line 7" in err


def test_rle_decoding_of_a_hand_counted_example():
    runs = rle_runs("2 3 4 1", 12)  # starts count from the end of the previous run
    assert runs == [(2, 3), (9, 1)]
    expected = np.zeros((3, 4), np.uint8)  # pixels numbered down the columns: p -> (p % 3, p // 3)
    for row, col in ((2, 0), (0, 1), (1, 1), (0, 3)):
        expected[row, col] = 1
    np.testing.assert_array_equal(rle_mask(runs, 3, 4), expected)
    assert rle_runs(" -1", 12) == []
    for bad, why in (("1 2 3", "pairs"), ("5 8", "past the image"), ("1 a", "not an integer")):
        with pytest.raises(ValueError, match=why):
            rle_runs(bad, 12)


def _siim_encode(mask: np.ndarray) -> str:
    """The dataset's encoding of a mask, written independently of the decoder under test."""
    flat = np.concatenate([[0], mask.T.ravel(), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    previous, numbers = 0, []
    for s, e in zip(starts, ends):
        numbers += [int(s - previous), int(e - s)]
        previous = e
    return " ".join(map(str, numbers))


def test_rle_table_masks_line_up_with_the_dicom_pixel_for_pixel(tmp_path, capsys):
    root = tmp_path / "siim" / "dicom-images-train"
    mask = np.zeros((5, 7), np.uint8)  # asymmetric: an L near the top left and one bottom-right pixel
    mask[0:4, 1] = 1
    mask[3, 1:4] = 1
    mask[4, 6] = 1
    part_a, part_b = mask.copy(), mask.copy()
    part_a[:, 4:] = 0
    part_b[:, :4] = 0  # two rows of the table, united
    uid = _dicom(str(root / "1.2.3" / "1.2.4" / "img1.dcm"), mask * 100 + 7, patient="pat-a", sop="1.2.276.1")
    empty = _dicom(str(root / "x" / "img2.dcm"), np.full((5, 7), 3), patient="pat-b", sop="1.2.276.2")
    _dicom(str(root / "y" / "img3.dcm"), np.zeros((5, 7)), patient="pat-c", sop="1.2.276.3")
    table = tmp_path / "train-rle.csv"
    table.write_text(f"ImageId, EncodedPixels\n{uid}, {_siim_encode(part_a)}\n{empty}, -1\n{uid}, "
                     f"{_siim_encode(part_b)}\n")
    out = tmp_path / "work" / "m.csv"
    status, text, err = _run(capsys, "rle-table", root, "--table", table, "--out", out, "--val-fraction", "0",
                             "--test-fraction", "0")
    assert status == 0, err
    rows = csv_rows(out)
    assert [(r["patient_id"], r["pneumothorax"], r["mask_path"]) for r in rows] == [
        ("pat-a", "1", "masks/1.2.276.1.png"), ("pat-b", "0", "masks/1.2.276.2.png")]
    manifest = load_manifest(str(out), label_columns=("pneumothorax",))
    image, written = read_image(manifest[0].path), read_image(manifest[0].mask_path)
    np.testing.assert_array_equal(written.array, mask)
    np.testing.assert_array_equal(image.array, mask * 100 + 7)  # same orientation as the DICOM as read
    assert read_image(manifest[1].mask_path).array.max() == 0
    assert "1 DICOM image(s) under ROOT are not in train-rle.csv" in text
    assert 'class_names=("background","pneumothorax")' in text
    assert check.main([str(out), "--label-columns", "pneumothorax"]) == 0  # images and masks read, shapes agree
    assert "problems: none" in capsys.readouterr().out


def test_rle_table_lists_bad_rows(tmp_path, capsys):
    root = tmp_path / "dcm"
    uid = _dicom(str(root / "a.dcm"), np.zeros((4, 4)), sop="1.2.9.1")
    (root / "notes.txt").write_text("not dicom")
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    table = tmp_path / "t.csv"
    table.write_text(f"ImageId, EncodedPixels\n{uid}, 1 2 3\n1.2.9.9, -1\n{uid}, 10 7\n")
    status, _, err = _run(capsys, "rle-table", root, "--table", table, "--out", tmp_path / "m.csv")
    assert status == 1 and "Traceback" not in err
    assert "t.csv line 2: '1 2 3' has 3 numbers" in err and "t.csv line 4: '10 7' runs past the image's 16" in err
    assert "t.csv line 3: '1.2.9.9'" in err and "broken.dcm" in err
    assert not (tmp_path / "masks").exists()  # nothing written when the table is bad


def test_dicom_tree_one_row_per_series_with_labels_from_a_map(tmp_path, capsys):
    root = tmp_path / "mri"
    t1, t2, flair = generate_uid(), generate_uid(), generate_uid()
    for k in range(2):
        _dicom(str(root / "PAT1" / "study" / "t1" / f"{k}.dcm"), np.zeros((4, 4)), patient="PAT1", series=t1,
               description="T1 SE", modality="MR")
    _dicom(str(root / "PAT1" / "study" / "mixed" / "a.dcm"), np.zeros((4, 4)), patient="PAT1", series=t2,
           description="t2_fse", modality="MR")
    _dicom(str(root / "PAT1" / "study" / "mixed" / "b.dcm"), np.zeros((4, 4)), patient="PAT1", series=flair,
           description="FLAIR", modality="MR")
    _dicom(str(root / "PAT2" / "s1" / "1.dcm"), np.zeros((4, 4)), patient="", series=generate_uid(),
           description="T1 post", modality="MR")
    (root / "README.txt").write_text("not dicom")
    label_map = tmp_path / "map.csv"
    label_map.write_text("pattern,label\n\\bt1,T1\nt2,T2\n")
    out = tmp_path / "m.csv"
    status, text, err = _run(capsys, "dicom-tree", root, "--out", out, "--label-map", label_map,
                             "--val-fraction", "0", "--test-fraction", "0")
    assert status == 0, err
    rows = csv_rows(out)
    assert list(rows[0]) == ["patient_id", "path", "split", "label", "series_uid", "series_description", "modality"]
    got = sorted((r["patient_id"], r["path"], r["label"], r["series_uid"], r["series_description"]) for r in rows)
    assert got == [("PAT1", "mri/PAT1/study/mixed", "", flair, "FLAIR"),
                   ("PAT1", "mri/PAT1/study/mixed", "T2", t2, "t2_fse"),
                   ("PAT1", "mri/PAT1/study/t1", "T1", "", "T1 SE"),
                   ("PAT2", "mri/PAT2/s1", "T1", "", "T1 post")]
    load_manifest(str(out), label_columns=("label",), ignore_columns=("series_description", "modality"))
    assert "1 series have an empty PatientID; their patient is the first folder under ROOT" in text
    assert "1 series got no label" in text and "1 file(s) under ROOT are no DICOM image" in text
    status, _, _ = _run(capsys, "dicom-tree", root, "--out", out, "--label-from", "series_description")
    assert status == 0 and sorted(r["label"] for r in csv_rows(out)) == ["FLAIR", "T1 SE", "T1 post", "t2_fse"]
