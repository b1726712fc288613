"""Odd files in a manifest are named, never read silently wrong: 4D NIfTI (refused naming shape and key, or
one volume picked by config.data.volume_index), Siemens mosaics, colour images (folded to grey, said once
with a count), colour masks (refused); and pretraining never reads the mask column."""

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax.data.manifest import ManifestError, load_manifest
from medjax.data.slices import SliceIndex, VolumeIndex
from medjax.data.sources import slice_source, training_source
from medjax.readers import ImageReadError
from tests.helpers import load_config, smoke_config, smoke_config_3d
from tests.readers.test_mosaic import N, TILE, _truth, _write_mosaic

SHAPE_4D = (4, 5, 3, 3)  # x, y, z, time points


def _csv(tmp_path, rows, name="m.csv"):
    lines = ["patient_id,path,split,mask_path"] + [",".join(r) for r in rows]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return str(tmp_path / name)


def _fmri(path):
    """A 4D NIfTI whose time point t holds 10 * t + the voxel's z (so a picked volume is recognisable)."""
    data = np.zeros(SHAPE_4D, np.float32)
    for t in range(SHAPE_4D[3]):
        data[..., t] = 10 * t + np.arange(SHAPE_4D[2])[None, None, :] + 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return str(path)


@pytest.mark.parametrize("index_class", [SliceIndex, VolumeIndex])
def test_4d_nifti_is_refused_naming_file_shape_and_key(tmp_path, index_class):
    rows = load_manifest(_csv(tmp_path, [("p1", _fmri(tmp_path / "bold.nii.gz"), "train", "")]))
    with pytest.raises(ImageReadError, match=r"line 2 \(patient 'p1'\), path: .*bold\.nii\.gz: expected a 3D volume "
                                             r"but got a 4D volume of shape \(4, 5, 3, 3\) .*config\.data\.volume_index"):
        index_class(rows)


def test_4d_rows_skipped_by_skip_bad_are_listed(tmp_path, capsys):
    image = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 3), np.float32), np.eye(4)), str(image))
    rows = load_manifest(_csv(tmp_path, [("p1", _fmri(tmp_path / "bold.nii.gz"), "train", ""),
                                         ("p2", str(image), "train", "")]))
    index = SliceIndex(rows, skip_bad=True, skip_background=False)
    assert len(index) == 3 and [line for line, _, _ in index.bad_rows] == [2]
    assert "bold.nii.gz: expected a 3D volume but got a 4D volume" in capsys.readouterr().out


def test_volume_index_picks_one_volume_and_says_so_once(tmp_path, capsys):
    rows = load_manifest(_csv(tmp_path, [("p1", _fmri(tmp_path / "a.nii.gz"), "train", ""),
                                         ("p2", _fmri(tmp_path / "b.nii.gz"), "train", "")]))
    index = SliceIndex(rows, normalisation=None, skip_background=False, volume_index=2, cache_volumes=1)
    assert len(index) == 2 * SHAPE_4D[2]
    for i in list(range(len(index))) * 2:  # evictions re-read both files: nothing more is said
        assert np.all(index[i]["image"] == 20 + index[i]["slice_index"] + 1)
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1
    assert "SliceIndex: 2 4D file(s) of which one volume is used (config.data.volume_index); the first: line 2: " \
           in out and "a.nii.gz (volume 2 of 3)" in out
    volume = VolumeIndex(rows, normalisation=None, volume_index=0)[1]["image"]
    np.testing.assert_array_equal(volume, np.broadcast_to(np.arange(1, 4, dtype=np.float32), SHAPE_4D[:3]))
    with pytest.raises(ImageReadError, match=r"a\.nii\.gz: volume_index=3 asks for a volume .*choose one of 0\.\.2"):
        SliceIndex(rows, volume_index=3)
    with pytest.raises(ValueError, match=r"volume_index=-2 must be -1"):
        SliceIndex(rows, volume_index=-2)


def test_mosaic_file_and_mosaic_folder_in_a_manifest(tmp_path):
    _write_mosaic(tmp_path / "single.dcm")
    (tmp_path / "run").mkdir()
    for t in range(3):
        _write_mosaic(tmp_path / "run" / f"vol{t}.dcm", t=t)
    rows = load_manifest(_csv(tmp_path, [("p1", "single.dcm", "train", ""), ("p2", "run", "train", "")]))
    with pytest.raises(ImageReadError, match=r"line 3 \(patient 'p2'\), path: .*run: holds 3 Siemens mosaic files.*"
                                             r"config\.data\.volume_index"):
        VolumeIndex(rows, normalisation=None)
    volumes = VolumeIndex(rows, normalisation=None, volume_index=1)
    first, second = volumes[0]["image"], volumes[1]["image"]
    assert first.shape == second.shape == (TILE[1], TILE[0], N)  # axial: x along the columns, y along the rows
    k, i, j = np.mgrid[:N, : TILE[0], : TILE[1]]
    assert sorted(first.ravel()) == sorted(_truth(k, i, j).ravel())
    np.testing.assert_array_equal(second - first, 1000)  # volume 1 = the second time point


def test_colour_images_folded_to_grey_and_said_once_with_a_count(tmp_path, capsys):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "grey_rgb.png")
    colour = np.stack([grey, grey // 2, grey // 4], -1)
    Image.fromarray(colour).save(tmp_path / "c1.png")
    Image.fromarray(colour[::-1]).save(tmp_path / "c2.png")
    rows = load_manifest(_csv(tmp_path, [(f"p{n}", name, "train", "") for n, name in
                                         enumerate(("grey_rgb.png", "c1.png", "c2.png"))]))
    index = SliceIndex(rows, normalisation=None, cache_volumes=1)
    luma = colour.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    for _ in range(2):  # the second pass re-reads evicted files: nothing more is said
        np.testing.assert_array_equal(index[0]["image"], grey)  # equal channels: taken as they are
        np.testing.assert_allclose(index[1]["image"], luma, rtol=1e-6)
        np.testing.assert_allclose(index[2]["image"], luma[::-1], rtol=1e-6)
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1
    assert "SliceIndex: 2 colour image(s) (channels differ) folded to one grey channel with the ITU-R 601 luma " \
           "0.299 R + 0.587 G + 0.114 B; the first: line 3: " in out and "c1.png." in out
    index._note("colour", "line 9: late.png")  # met after the build (a file first read later): said once, at once
    index._note("colour", "line 10: later.png")
    assert capsys.readouterr().out == ""  # colour was already said for this index
    index._note("mask_grid", "line 9: mask m.png (2, 2) -> image (8, 8)")
    index._note("mask_grid", "line 10: mask n.png (2, 2) -> image (8, 8)")
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1 and "line 9: mask m.png" in out and "further ones are not listed" in out


def test_colour_mask_is_refused(tmp_path):
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.stack([np.full((6, 8), 255, np.uint8), np.zeros((6, 8), np.uint8),
                              np.zeros((6, 8), np.uint8)], -1)).save(tmp_path / "red.png")
    rows = load_manifest(_csv(tmp_path, [("p1", "x.png", "train", "red.png")]))
    with pytest.raises(ManifestError, match=r"line 2: mask .*red\.png is a colour image \(shape \(6, 8, 3\)\); save "
                                            r"masks as one-channel label maps"):
        SliceIndex(rows)


def _pretraining_manifest(tmp_path):
    """Three images whose masks are missing, not an image at all, and on another grid."""
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(np.random.default_rng(0).uniform(1, 2, (12, 12, 4)).astype(np.float32),
                                 np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)), str(tmp_path / "small.nii.gz"))
    return _csv(tmp_path, [("p1", "a.nii.gz", "train", "gone.nii.gz"), ("p2", "b.nii.gz", "train", "broken.nii.gz"),
                           ("p3", "c.nii.gz", "train", "small.nii.gz")])


@pytest.mark.parametrize("config", [smoke_config, smoke_config_3d, lambda: load_config("mae", "smoke")],
                         ids=["dinov2", "dinov2_3d", "mae"])
def test_pretraining_never_reads_or_checks_the_mask_column(tmp_path, config):
    config = config()
    config.data.manifest = _pretraining_manifest(tmp_path)
    config.data.target_spacing = (3.0, 3.0, 3.0) if config.model.spatial_dims == 3 else ()
    source = training_source(config, str(tmp_path))
    assert len(source) == (3 if config.model.spatial_dims == 3 else 12)
    assert all("mask" not in source[i] for i in range(len(source)))
    with pytest.raises(ManifestError, match=r"(?s)1 file\(s\) named in m\.csv do not exist.*mask_path .*gone\.nii\.gz"):
        slice_source(config, config.data.manifest, "train")  # a job that reads masks still checks them
    manifest = load_manifest(config.data.manifest, masks=False)
    assert [row.mask_path for row in manifest] == [None] * 3


def test_mae_reconstructions_read_images_only(tmp_path):
    from medjax.mae.reconstructions import _validation_images

    config = load_config("mae", "smoke")
    config.data.manifest = _pretraining_manifest(tmp_path)
    images = _validation_images(config, str(tmp_path), 2)
    assert images.shape[0] == 2 and np.isfinite(images).all()
