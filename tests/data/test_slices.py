"""Slice and volume indexes: display orientation, slice counts, background skipping, per-volume
normalisation, mask alignment, bad-row reporting, the LRU cache, crops and Grain compatibility."""

import pickle

import grain
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax.data.manifest import ManifestError, ManifestRow, load_manifest
from medjax.readers import ImageData, ImageReadError
from medjax.data.slices import SliceIndex, VolumeIndex

X, Y, Z = 4, 5, 6  # a non-cubic volume: a transposed slice would have the wrong shape


def _marked_volume():
    """Tissue (1) with three markers: anterior-right-superior 10, posterior-right-superior 5,
    posterior-left-inferior 7 (array axes: x -> Right, y -> Anterior, z -> Superior)."""
    v = np.ones((X, Y, Z), np.float32)
    v[X - 1, Y - 1, Z - 1], v[X - 1, 0, Z - 1], v[0, 0, 0] = 10, 5, 7
    return v


def _nifti(path, array, spacing=(1.0, 1.0, 1.0), flip_x=False):
    """Save `array` (given in RAS) as NIfTI; flip_x stores it LAS with the same world positions."""
    affine = np.diag([*spacing, 1.0])
    if flip_x:
        array, affine[0, 0], affine[0, 3] = array[::-1], -spacing[0], spacing[0] * (array.shape[0] - 1)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array, np.float32), affine), str(path))
    return path.name


def _manifest(tmp_path, rows, label_columns=()):
    """rows: (patient_id, path, split, mask_path, *labels) tuples -> a loaded Manifest."""
    head = ",".join(["patient_id", "path", "split", "mask_path", *label_columns])
    body = "\n".join(",".join(str(c) for c in row) for row in rows)
    (tmp_path / "m.csv").write_text(f"{head}\n{body}\n")
    return load_manifest(str(tmp_path / "m.csv"), label_columns=label_columns)


def test_axial_coronal_sagittal_counts_and_radiological_orientation(tmp_path):
    ras = _nifti(tmp_path / "ras.nii.gz", _marked_volume())
    las = _nifti(tmp_path / "las.nii.gz", _marked_volume(), flip_x=True)
    m = _manifest(tmp_path, [("p1", ras, "train", ""), ("p2", las, "train", "")])
    kw = dict(normalisation=None, skip_background=False)
    axial, coronal, sagittal = (SliceIndex(m, axis=a, **kw) for a in ("axial", "coronal", "sagittal"))
    assert (len(axial), len(coronal), len(sagittal)) == (2 * Z, 2 * Y, 2 * X)

    top = axial[Z - 1]  # most superior axial slice, seen from the feet
    assert top["image"].shape == (Y, X) and top["slice_index"] == Z - 1
    assert top["image"][0, 0] == 10  # anterior-right: top, image left
    assert top["image"][Y - 1, 0] == 5  # posterior-right: bottom, image left
    assert axial[0]["image"][Y - 1, X - 1] == 7  # posterior-left: bottom, image right
    front = coronal[Y - 1]["image"]  # most anterior coronal slice, seen from the front
    assert front.shape == (Z, X) and front[0, 0] == 10  # superior-right: top, image left
    back = coronal[0]["image"]
    assert back[0, 0] == 5 and back[Z - 1, X - 1] == 7  # inferior-left: bottom, image right
    right = sagittal[X - 1]["image"]  # patient's right side, anterior on the image left
    assert right.shape == (Z, Y) and right[0, 0] == 10 and right[0, Y - 1] == 5
    assert sagittal[0]["image"][Z - 1, Y - 1] == 7
    # The LAS file is reoriented by the reader: every slice equals the RAS file's.
    for index, n in ((axial, Z), (coronal, Y), (sagittal, X)):
        for k in range(n):
            np.testing.assert_array_equal(index[k]["image"], index[n + k]["image"])
    raw = SliceIndex(m, axis=2, **kw)[Z - 1]["image"]  # an integer axis: the raw array, no display flip
    assert raw.shape == (X, Y) and raw[X - 1, Y - 1] == 10


def test_record_format_labels_and_png(tmp_path):
    vol = _nifti(tmp_path / "v.nii", _marked_volume())
    for name in ("xray.png", "xray2.png"):
        Image.fromarray(np.arange(35, dtype=np.uint8).reshape(5, 7) * 7).save(tmp_path / name)
    m = _manifest(tmp_path, [("p1", vol, "train", "", "benign"), ("p2", "xray.png", "val", "", "malignant"),
                             ("p3", "xray2.png", "test", "", "")], label_columns=("dx",))
    index = SliceIndex(m, label_columns=("dx",), skip_background=False)
    assert len(index) == Z + 2  # a 2D image is one entry
    rec = index[0]
    assert set(rec) == {"image", "label", "patient_id", "split", "source", "slice_index"}
    assert rec["image"].dtype == np.float32 and rec["image"].shape == (Y, X)
    assert 0.0 <= rec["image"].min() and rec["image"].max() <= 1.0
    assert (rec["label"], rec["patient_id"], rec["split"]) == (0, "p1", "train")
    assert rec["source"] == str(tmp_path / "v.nii")
    png = index[Z]
    assert png["image"].shape == (5, 7) and png["slice_index"] == 0 and png["label"] == 1
    assert np.argmax(png["image"]) == 34  # 2D images keep their rows and columns
    assert index[-1]["label"] == -1 and SliceIndex(m)[0]["label"] == -1
    with pytest.raises(IndexError):
        index[len(index)]


def test_background_slices_are_skipped_counted_and_reported(tmp_path, capsys):
    v = np.zeros((6, 6, 10), np.float32)
    v[1:5, 1:5, 3:7] = 100.0  # 16 of 36 pixels in slices 3..6
    v[2, 2, 7] = 100.0  # one pixel (1/36 = 0.028) in slice 7
    m = _manifest(tmp_path, [("p1", _nifti(tmp_path / "v.nii", v), "train", "")])
    index = SliceIndex(m, normalisation=None)
    assert [index[i]["slice_index"] for i in range(len(index))] == [3, 4, 5, 6, 7]
    assert index.skipped == {"background_slices": 5, "bad_rows": 0}
    out = capsys.readouterr().out
    assert "skipped 5 background slices in 1 volume(s)" in out and "5 slices remain" in out
    strict = SliceIndex(m, normalisation=None, background_fraction=0.05)
    assert len(strict) == 4 and strict.skipped["background_slices"] == 6
    assert len(SliceIndex(m, normalisation=None, skip_background=False)) == 10
    assert len(SliceIndex(m, normalisation=None, axis="sagittal")) == 4  # x = 1..4 hold tissue
    capsys.readouterr()
    SliceIndex(m, normalisation=None, skip_background=False)
    assert capsys.readouterr().out == ""  # nothing skipped, nothing said


def test_normalisation_is_per_volume(tmp_path):
    rng = np.random.default_rng(0)
    v = rng.uniform(0.5, 1.0, (8, 8, 3)).astype(np.float32)
    v[..., 0] *= 10.0  # a dim slice ...
    v[..., 1] *= 1000.0  # ... and a bright one in the same volume
    v[..., 2] *= 500.0
    m = _manifest(tmp_path, [("p1", _nifti(tmp_path / "a.nii", v), "train", ""),
                             ("p2", _nifti(tmp_path / "b.nii", v * 3.0 + 7.0), "train", "")])
    index = SliceIndex(m, normalisation={"method": "percentile", "low": 0.5, "high": 99.5}, skip_background=False)
    dim, bright, mid = (index[k]["image"] for k in range(3))
    assert dim.max() < 0.02 and bright.max() == pytest.approx(1.0) and 0.4 < mid.max() < 0.6
    assert index.transform(0) == index.transform(1) == index.transform(2)
    assert index.transform(3) == index.transform(5) != index.transform(0)  # each volume has its own
    # The same anatomy at another gain and offset normalises to the same values.
    np.testing.assert_allclose(index[4]["image"], bright, atol=1e-5)


def test_masks_are_aligned_and_never_normalised(tmp_path):
    mask = np.zeros((X, Y, Z), np.float32)
    mask[X - 1, Y - 1, Z - 1] = 2  # on the image's brightest voxel
    img = _nifti(tmp_path / "img.nii", _marked_volume())
    msk = _nifti(tmp_path / "mask.nii", mask, flip_x=True)  # stored LAS: the reader aligns it
    index = SliceIndex(_manifest(tmp_path, [("p1", img, "train", msk)]), skip_background=False)
    rec = index[Z - 1]
    assert rec["mask"].dtype == np.uint8 and rec["mask"].shape == rec["image"].shape == (Y, X)
    assert rec["mask"][0, 0] == 2 and rec["mask"].sum() == 2
    assert np.argmax(rec["mask"]) == np.argmax(rec["image"])
    assert index[0]["mask"].sum() == 0
    vol = VolumeIndex(_manifest(tmp_path, [("p1", img, "train", msk)]))[0]
    assert vol["mask"].shape == (X, Y, Z) and vol["mask"][X - 1, Y - 1, Z - 1] == 2


@pytest.mark.parametrize("shape, spacing, values, match", [
    ((X, Y, Z - 1), (1.0, 1.0, 1.0), None, r"does not match image .*img\.nii \(shape \(4, 5, 6\)"),
    ((X, Y, Z), (1.0, 1.0, 1.01), None,
     r"spacing \(1, 1, 1\.01\)\) does not match .*spacing \(1, 1, 1\)\); resample the mask"),
    ((X, Y, Z), (1.0, 1.0, 1.0), 0.5, r"values other than integers 0\.\.255"),
])
def test_mask_mismatch_names_both_files(tmp_path, shape, spacing, values, match):
    img = _nifti(tmp_path / "img.nii", _marked_volume())
    msk = _nifti(tmp_path / "bad_mask.nii", np.full(shape, values or 0, np.float32), spacing=spacing)
    m = _manifest(tmp_path, [("p1", img, "train", msk)])
    with pytest.raises(ManifestError, match=match) as exc:
        SliceIndex(m)
    assert str(exc.value).startswith("line 2: mask ") and "bad_mask.nii" in str(exc.value)


def test_bad_rows_raise_with_line_or_are_skipped_and_reported(tmp_path, capsys):
    good = _nifti(tmp_path / "good.nii", _marked_volume())
    (tmp_path / "broken.nii").write_bytes(b"this is not a NIfTI file")
    m = _manifest(tmp_path, [("p1", good, "train", ""), ("p2", "broken.nii", "train", "")])
    with pytest.raises(ImageReadError, match=r"line 3 \(patient 'p2'\), path: .*broken\.nii"):
        SliceIndex(m)
    index = SliceIndex(m, skip_bad=True, skip_background=False)
    assert len(index) == Z and index.skipped["bad_rows"] == 1
    assert [(line, path) for line, path, _ in index.bad_rows] == [(3, str(tmp_path / "broken.nii"))]
    assert index.transforms[1] is None
    out = capsys.readouterr().out
    assert "skipped 1 of 2 rows whose files could not be read" in out and "line 3" in out
    volumes = VolumeIndex(m, skip_bad=True)
    assert len(volumes) == 1 and volumes.bad_rows[0][0] == 3


def _fake_rows(n):
    return [ManifestRow(line=i + 2, patient_id=f"p{i}", path=f"vol{i}", split="train", labels=(("y", str(i)),),
                        codes=(("y", i),)) for i in range(n)]


class _FakeReader:
    """In-memory reader that counts reads; unknown paths fail like unreadable files."""

    def __init__(self, images):
        self.images, self.reads = images, []

    def __call__(self, path, *, series_uid=None, expect_3d=None):
        self.reads.append(path)
        if path not in self.images:
            raise ImageReadError(f"{path}: unreadable")
        return self.images[path]


def test_volumes_are_read_once_then_served_from_a_small_lru_cache():
    rng = np.random.default_rng(1)
    images = {f"vol{i}": ImageData(rng.uniform(0, 1, (3, 3, 2)).astype(np.float32), (1.0, 1.0, 2.0),
                                   np.eye(4), {}) for i in range(3)}
    reader = _FakeReader(images)
    index = SliceIndex(_fake_rows(3), reader=reader, cache_volumes=1, label_columns=("y",), skip_background=False)
    assert len(index) == 6 and reader.reads == ["vol0", "vol1", "vol2"]
    assert index[5]["label"] == 2 and len(reader.reads) == 3  # the last volume is still cached
    first = index[0]["image"]
    assert reader.reads[3:] == ["vol0"] and index[1]["slice_index"] == 1 and len(reader.reads) == 4
    index[4]
    np.testing.assert_array_equal(index[0]["image"], first)  # reread after eviction: identical
    copy = pickle.loads(pickle.dumps(index))  # worker processes get a copy with an empty cache
    np.testing.assert_array_equal(copy[0]["image"], first)


def test_rgb_images_become_one_grey_channel():
    grey = np.arange(12, dtype=np.float32).reshape(3, 4)
    colour = np.stack([grey, grey * 0, grey * 0], axis=-1)
    images = {"vol0": ImageData(np.repeat(grey[..., None], 3, -1), (1.0, 1.0), None, {}),
              "vol1": ImageData(colour, (1.0, 1.0), None, {})}
    index = SliceIndex(_fake_rows(2), reader=_FakeReader(images), normalisation=None)
    np.testing.assert_array_equal(index[0]["image"], grey)  # equal channels: taken as they are
    np.testing.assert_allclose(index[1]["image"], 0.299 * grey)


def test_volume_index_records_crops_and_grain(tmp_path):
    img = _nifti(tmp_path / "img.nii", _marked_volume())
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "flat.png")
    index = VolumeIndex(_manifest(tmp_path, [("p1", img, "train", "")]), crop_size=(2, 3, 4))
    rec = index[0]
    assert rec["image"].shape == (X, Y, Z) and rec["slice_index"] == -1 and rec["patient_id"] == "p1"
    centre = index.crop(rec)
    assert centre["image"].shape == (2, 3, 4)
    np.testing.assert_array_equal(centre["image"], rec["image"][1:3, 1:4, 1:5])
    crops = [index.crop(rec, np.random.default_rng(s))["image"] for s in range(20)]
    assert all(c.shape == (2, 3, 4) for c in crops) and len({c.tobytes() for c in crops}) > 1
    big = VolumeIndex(_manifest(tmp_path, [("p1", img, "train", "")]), crop_size=(6, 5, 6))
    padded = big.crop(big[0], np.random.default_rng(0))["image"]
    assert padded.shape == (6, 5, 6) and padded[X:].max() == 0  # zero-padded past the volume
    ds = grain.MapDataset.source(index).random_map(index.crop, seed=3)
    assert ds[0]["image"].shape == (2, 3, 4) and ds[0]["patient_id"] == "p1"
    with pytest.raises(ImageReadError, match=r"line 2 \(patient 'p2'\), path: .*expected a 3D volume"):
        VolumeIndex(_manifest(tmp_path, [("p2", "flat.png", "train", "")]))
    with pytest.raises(ValueError, match="crop_size"):
        VolumeIndex([], crop_size=(2, 3))


def test_target_spacing_resamples_images_linearly_and_masks_nearest(tmp_path):
    import nibabel as nib

    from medjax.data.manifest import load_manifest
    from medjax.data.slices import SliceIndex

    image = np.zeros((8, 8, 4), np.float32)
    image[2:6, 2:6, :] = np.linspace(1.0, 2.0, 4)[None, None, :]
    mask = (image > 0).astype(np.uint8) * 2
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "mask.nii.gz"))
    (tmp_path / "m.csv").write_text("patient_id,path,split,mask_path\np1,img.nii.gz,train,mask.nii.gz\n")
    rows = load_manifest(str(tmp_path / "m.csv"))
    index = SliceIndex(rows, skip_background=False, normalisation=None, target_spacing=(0.5, 0.5, 1.0))
    assert len(index) == 8  # 4 slices at 2 mm -> 8 at 1 mm
    record = index[3]
    assert record["image"].shape == (16, 16) and record["mask"].shape == (16, 16)
    assert set(np.unique(record["mask"])) <= {0, 2}  # nearest neighbour keeps labels
    centre = [index[k]["image"][8, 8] for k in range(len(index))]
    assert np.all(np.diff(centre) >= 0) and len(np.unique(np.round(centre, 4))) > 4  # linear along z, not copies
