"""The manifest's pixel_spacing column: parsed and checked, taken by PNG rows (index resampling and the
segmentation HD95 spacing), refused where it contradicts a file's own header, and written by
make_manifest label-table rescaled to the stored image's size."""

import csv
import os

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from medjax.data import make_manifest as mm
from medjax.data.manifest import ManifestError, load_manifest
from medjax.data.slices import SliceIndex, given_spacing
from medjax.readers import read_image
from medjax.segment.data import _slice_spacing
from tests.helpers import load_config


def _png(path, shape=(8, 8), value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.zeros(shape, np.uint8)
    array[: shape[0] // 2] = value
    Image.fromarray(array).save(path)


def _dicom(path, pixels, spacing):
    """A single-frame DICOM image with its own PixelSpacing (row, col) in mm."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality, ds.PatientID = ComputedRadiographyImageStorage, sop, "CR", "p"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [f"{s:g}" for s in spacing]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _manifest(tmp_path, rows, columns="patient_id,path,split,mask_path,pixel_spacing"):
    path = tmp_path / "manifest.csv"
    path.write_text(columns + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return str(path)


def test_pixel_spacing_cells_are_parsed_and_every_bad_one_listed(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        _png(str(tmp_path / name))
    good = _manifest(tmp_path, [("p1", "a.png", "train", "", '"0.143,0.2"'), ("p2", "b.png", "train", "", "")])
    rows = load_manifest(good)
    assert rows[0].pixel_spacing == (0.143, 0.2) and rows[1].pixel_spacing is None
    bad = _manifest(tmp_path, [("p1", "a.png", "train", "", '"0.143,0.2"'), ("p2", "b.png", "train", "", "0.1"),
                               ("p3", "c.png", "train", "", '"-1,1"'), ("p4", "d.png", "train", "", '"a,b"'),
                               ("p5", "e.png", "train", "", '"0.1,0.1,0.1"')])
    with pytest.raises(ManifestError) as err:
        load_manifest(bad)
    assert err.value.problems == {"pixel_spacing": [3, 4, 5, 6]}
    text = str(err.value)
    assert "4 row(s) of manifest.csv have a pixel_spacing that is not two positive numbers" in text
    for shown in ("line 3: pixel_spacing '0.1'", "line 4: pixel_spacing '-1,1'", "line 5: pixel_spacing 'a,b'",
                  "line 6: pixel_spacing '0.1,0.1,0.1'"):
        assert shown in text


def test_png_row_takes_the_manifest_spacing_in_the_index_and_for_hd95(tmp_path):
    _png(str(tmp_path / "img.png"), value=200)
    _png(str(tmp_path / "mask.png"), value=1)
    _png(str(tmp_path / "plain.png"), value=200)
    _png(str(tmp_path / "plain_mask.png"), value=1)
    rows = load_manifest(_manifest(tmp_path, [("p1", "img.png", "train", "mask.png", '"0.5,0.25"'),
                                              ("p2", "plain.png", "train", "plain_mask.png", "")]))
    assert given_spacing(rows[0], read_image(rows[0].path), rows[0].path).spacing == (0.5, 0.25)
    # resampled to 1 mm pixels: 8 rows of 0.5 mm -> 4, 8 columns of 0.25 mm -> 2; the unspaced PNG stays 1 mm
    index = SliceIndex(rows, target_spacing=(1.0, 1.0), normalisation=None)
    assert index[0]["image"].shape == (4, 2) and index[0]["mask"].shape == (4, 2)
    assert index[1]["image"].shape == (8, 8)
    config = load_config("segment")
    config.segment.assumed_spacing_mm = (0.7, 0.7)
    assumed = set()
    (rows_cols, between) = _slice_spacing(config, rows[0], assumed)
    assert rows_cols == (0.5, 0.25) and np.isnan(between) and not assumed
    assert _slice_spacing(config, rows[1], assumed)[0] == (0.7, 0.7)  # neither file nor manifest: the config key
    assert assumed == {rows[1].mask_path}


def test_dicom_row_whose_own_spacing_differs_is_refused_by_line(tmp_path):
    pixels = np.arange(16, dtype=np.uint16).reshape(4, 4)
    _dicom(str(tmp_path / "a.dcm"), pixels, (0.2, 0.2))
    _dicom(str(tmp_path / "b.dcm"), pixels, (0.2, 0.2))
    rows = load_manifest(_manifest(tmp_path, [("p1", "a.dcm", "train", '"0.201,0.199"'),
                                              ("p2", "b.dcm", "train", '"0.143,0.143"')],
                                   columns="patient_id,path,split,pixel_spacing"))
    agreeing = given_spacing(rows[0], read_image(rows[0].path), rows[0].path)
    assert agreeing.spacing == (0.2, 0.2)  # within 1 %: the file's own spacing is kept
    with pytest.raises(ManifestError) as err:
        SliceIndex(rows, normalisation=None)
    text = str(err.value)
    assert err.value.problems == {"pixel_spacing_conflict": [3]}
    assert text.startswith("line 3: pixel_spacing 0.143,0.143 mm differs by more than 1 % from the spacing "
                           "(0.2, 0.2) mm that ") and str(tmp_path / "b.dcm") in text


def test_label_table_writes_pixel_spacing_rescaled_to_the_stored_size(tmp_path, capsys):
    root = tmp_path / "nih"
    _png(str(root / "images" / "a.png"), shape=(4, 8))  # stored: 8 wide, 4 high
    _png(str(root / "images" / "b.png"), shape=(16, 16))
    (root / "table.csv").write_text(
        "Image Index,Finding Labels,Patient ID,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
        "a.png,Hernia,1,2500,2048,0.143,0.139\nb.png,No Finding,2,1024,1024,0.168,0.168\n")
    base = ["label-table", str(root), "--table", str(root / "table.csv"), "--image-column", "Image Index",
            "--patient-column", "Patient ID", "--labels-column", "Finding Labels", "--val-fraction", "0",
            "--test-fraction", "0", "--spacing-columns", "OriginalImagePixelSpacing[x,y]"]
    out = tmp_path / "rescaled.csv"
    assert mm.main(base + ["--out", str(out), "--original-size-columns", "OriginalImage[Width,Height]"]) == 0
    text = capsys.readouterr().out
    with open(out, newline="") as f:
        written = {r["path"]: r["pixel_spacing"] for r in csv.DictReader(f)}
    # row: 0.139 * 2048 / 4 = 71.168 mm; col: 0.143 * 2500 / 8 = 44.6875 mm; b: 0.168 * 1024 / 16 = 10.752 mm
    assert written == {"nih/images/a.png": "71.168,44.6875", "nih/images/b.png": "10.752,10.752"}
    assert "rescaled from the original size" in text
    assert load_manifest(str(out), label_columns=("Hernia",))[0].pixel_spacing == (71.168, 44.6875)
    as_given = tmp_path / "as_given.csv"
    assert mm.main(base + ["--out", str(as_given)]) == 0
    assert "written as given, not rescaled" in capsys.readouterr().out
    with open(as_given, newline="") as f:
        assert [r["pixel_spacing"] for r in csv.DictReader(f)] == ["0.139,0.143", "0.168,0.168"]
