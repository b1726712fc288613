"""Masks as annotation tools write them: on another grid than their image, or with values such as 255.

Resampled onto the image grid with nearest neighbour only when config.data.mask_resample asks for
it (said once), mapped through config.data.mask_values, and otherwise refused in one sentence that
names the CSV line, both shapes and the config key; the segmentation loaders (2D and 3D) keep the
same masks on the image's own grid for their metrics.
"""

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medjax.data.label_maps import fit_mask
from medjax.data.manifest import ManifestError, load_manifest
from medjax.data.slices import SliceIndex, VolumeIndex
from medjax.data.sources import index_options
from medjax.segment import data3d, evaluate3d
from medjax.segment.data import check_label_values, load_data
from tests.helpers import load_config, smoke_config_3d


def _nifti(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), np.asarray(affine, float)), str(path))
    return str(path)


def _csv(tmp_path, rows, name="m.csv"):
    lines = ["patient_id,path,split,mask_path"] + [",".join(r) for r in rows]
    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return str(tmp_path / name)


def _coarse_mask():
    """A 4 x 4 x 2 label map at 2 mm with a distinct label per voxel block (1..32)."""
    return np.arange(1, 33, dtype=np.float32).reshape(4, 4, 2)


def _half_resolution_pair(tmp_path, mask=None, name="img"):
    """An 8 x 8 x 4 image at 1 mm and a mask of the same field of view at 2 mm (voxel centres at 0.5 + 2i)."""
    image = _nifti(tmp_path / f"{name}.nii.gz", np.random.default_rng(0).uniform(1, 2, (8, 8, 4)), np.eye(4))
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] = 0.5
    return image, _nifti(tmp_path / f"{name}_mask.nii.gz", _coarse_mask() if mask is None else mask, coarse)


def test_mask_on_another_grid_is_refused_naming_line_shapes_and_key(tmp_path):
    image, mask = _half_resolution_pair(tmp_path)
    rows = load_manifest(_csv(tmp_path, [("p1", image, "train", mask)]))
    with pytest.raises(ManifestError, match=r"line 2: mask .*mask\.nii\.gz \(shape \(4, 4, 2\), spacing \(2, 2, 2\)\) "
                                            r"does not match image .*img\.nii\.gz \(shape \(8, 8, 4\).*"
                                            r"config\.data\.mask_resample=True"):
        SliceIndex(rows, skip_background=False)


def test_mask_resampled_nearest_neighbour_when_asked_and_said_once(tmp_path, capsys):
    (a, a_mask), (b, b_mask) = (_half_resolution_pair(tmp_path, name=n) for n in ("a", "b"))
    rows = load_manifest(_csv(tmp_path, [("p1", a, "train", a_mask), ("p2", b, "val", b_mask)]))
    volumes = VolumeIndex(rows, normalisation=None, mask_resample=True, cache_volumes=1)
    expected = np.repeat(np.repeat(np.repeat(_coarse_mask(), 2, 0), 2, 1), 2, 2)  # each label covers 2 x 2 x 2
    for i in (0, 1, 0, 1):  # cache evictions re-read the files: nothing more is said
        record = volumes[i]
        assert record["mask"].dtype == np.uint8 and record["mask"].shape == (8, 8, 4)
        np.testing.assert_array_equal(record["mask"], expected)
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1
    assert "VolumeIndex: 2 mask(s) on another grid than their image, resampled onto it with nearest neighbour " \
           "(config.data.mask_resample=True); the first: line 2: mask" in out and "(4, 4, 2) -> image (8, 8, 4)" in out


def test_mask_with_a_smaller_field_of_view_lands_where_it_was_drawn(tmp_path):
    image = _nifti(tmp_path / "img.nii.gz", np.ones((8, 8, 4)), np.eye(4))
    shifted = np.eye(4)
    shifted[0, 3] = 4.0  # covers x = 4..7 mm of the image only
    mask = _nifti(tmp_path / "half.nii.gz", np.full((4, 8, 4), 3.0), shifted)
    record = VolumeIndex(load_manifest(_csv(tmp_path, [("p1", image, "train", mask)])), mask_resample=True)[0]
    assert (record["mask"][4:] == 3).all() and (record["mask"][:4] == 0).all()  # background where it has no voxel


def test_2d_mask_of_another_size_is_stretched_over_the_same_field_of_view(tmp_path):
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "x.png")
    small = np.array([[0, 255], [255, 0]], np.uint8)
    Image.fromarray(small).save(tmp_path / "m.png")
    rows = load_manifest(_csv(tmp_path, [("p1", "x.png", "train", "m.png")]))
    with pytest.raises(ManifestError, match=r"line 2: mask .*m\.png \(shape \(2, 2\).*image .*x\.png \(shape \(8, 8\)"):
        SliceIndex(rows)
    record = SliceIndex(rows, mask_resample=True, mask_values={255: 1})[0]
    np.testing.assert_array_equal(record["mask"], np.kron(small // 255, np.ones((4, 4), np.uint8)))


def test_mask_values_mapped_before_the_label_check(tmp_path):
    binary = np.zeros((8, 8, 4), np.float32)
    binary[2:5, 3:6, 1:3] = 255
    image = _nifti(tmp_path / "img.nii.gz", np.ones((8, 8, 4)), np.eye(4))
    mask = _nifti(tmp_path / "m255.nii.gz", binary, np.eye(4))
    rows = load_manifest(_csv(tmp_path, [("p1", image, "train", mask)]))
    as_stored = VolumeIndex(rows)[0]["mask"]
    assert set(np.unique(as_stored)) == {0, 255}  # 255 is a valid label: taken as it is by default
    mapped = VolumeIndex(rows, mask_values={"255": 1})[0]["mask"]
    np.testing.assert_array_equal(mapped, (binary == 255).astype(np.uint8))
    swapped = fit_mask(None, _Grid((2,)), np.zeros(2), _Grid((2,)), np.array([1.0, 2.0]),
                       values={1.0: 2, 2.0: 1})[0]
    np.testing.assert_array_equal(swapped, [2, 1])  # every value maps from the stored one, not a mapped one
    with pytest.raises(ValueError, match=r"The mask .*m255\.nii\.gz .*holds label value\(s\) 255 that "
                                         r"config\.segment\.class_names does not name.*config\.data\.mask_values"):
        check_label_values(as_stored, ("background", "lesion"), rows[0], image)


class _Grid:
    """Just what fit_mask reads of an ImageData: spacing and affine."""

    def __init__(self, spacing):
        self.spacing, self.affine = spacing, None


def test_values_that_are_not_labels_are_listed_with_the_key(tmp_path):
    image = _nifti(tmp_path / "img.nii.gz", np.ones((4, 4, 2)), np.eye(4))
    soft = np.zeros((4, 4, 2), np.float32)
    soft[0, 0, 0], soft[1, 1, 1], soft[2, 2, 1] = 0.5, 0.25, 300
    mask = _nifti(tmp_path / "soft.nii.gz", soft, np.eye(4))
    rows = load_manifest(_csv(tmp_path, [("p1", image, "train", mask)]))
    with pytest.raises(ManifestError, match=r"line 2: mask .*soft\.nii\.gz holds values other than integers 0\.\.255 "
                                            r"\(0\.25, 0\.5, 300; range 0\.\.300\).*config\.data\.mask_values"):
        VolumeIndex(rows)
    record = VolumeIndex(rows, mask_values={"0.5": 1, "0.25": 1, "300": 2})[0]
    assert record["mask"][0, 0, 0] == 1 and record["mask"][1, 1, 1] == 1 and record["mask"][2, 2, 1] == 2


@pytest.mark.parametrize("key, value, match", [
    ("mask_values", "{255: 1}", r"config\.data\.mask_values is not valid JSON .*e\.g\. '\{\"255\": 1\}'"),
    ("mask_values", "[1, 2]", r"config\.data\.mask_values='\[1, 2\]' is not a JSON object"),
    ("mask_values", '{"255": 300}', r"config\.data\.mask_values maps '255' to 300; .*integer labels 0\.\.255"),
    ("mask_values", '{"edge": 1}', r"config\.data\.mask_values maps 'edge' to 1"),
    ("mask_values", '{"1": 1.5}', r"config\.data\.mask_values maps '1' to 1\.5"),
    ("volume_index", -2, r"config\.data\.volume_index=-2 must be -1 \(refuse 4D files\) or the volume"),
])
def test_bad_data_keys_are_one_sentence_from_every_validator(key, value, match):
    from medjax.finetune.validate import validate as finetune_validate
    from medjax.segment.validate import validate as segment_validate

    for config in (load_config("segment", "smoke"), load_config("finetune", "smoke")):
        config.data[key] = value
        with pytest.raises(ValueError, match=match):
            index_options(config)
        with pytest.raises(ValueError, match=match):
            (segment_validate if "segment" in config else finetune_validate)(config)
    config = load_config("segment", "smoke")
    config.data.mask_values = '{"255": 1, "128.5": 2}'
    assert index_options(config)["mask_values"] == {255.0: 1, 128.5: 2}


def test_2d_segmentation_keeps_resampled_mapped_masks_on_the_image_grid(tmp_path):
    """The slice loader's native masks and spacing are the image's, not the mask file's."""
    lines = []
    coarse = np.zeros((4, 4, 2), np.float32)
    coarse[1:3, 1:3, :] = 255
    for pid, split in (("A", "train"), ("B", "val"), ("C", "test")):
        image, mask = _half_resolution_pair(tmp_path, coarse, name=pid)
        lines.append((pid, image, split, mask))
    config = load_config("segment", "smoke")
    config.segment.manifest = _csv(tmp_path, lines)
    config.data.mask_resample, config.data.mask_values = True, '{"255": 1}'
    splits, info = load_data(config, str(tmp_path), "", size=14, mean=0.449, std=0.226, say=lambda m: None)
    test = splits["test"]
    assert len(test) == 4 and test.native[0].shape == (8, 8)  # four axial slices on the 8 x 8 image grid
    np.testing.assert_allclose(test.spacing, 1.0)
    np.testing.assert_allclose(test.slice_spacing, 1.0)
    assert test.native[0].sum() == 16 and set(np.unique(np.stack(test.native))) == {0, 1}


def test_3d_segmentation_native_masks_follow_the_image_grid_and_map_back(tmp_path):
    lines = []
    spacing = (1.0, 1.2, 2.0)
    for pid, split in (("A", "train"), ("B", "val"), ("C", "test")):
        rng = np.random.default_rng(len(lines))
        image = _nifti(tmp_path / f"{pid}.nii.gz", 100 + rng.random((10, 12, 4)), np.diag([*spacing, 1.0]))
        coarse = np.zeros((5, 6, 2), np.float32)
        coarse[1:3, 2:5, 1] = 255
        affine = np.diag([2 * s for s in spacing] + [1.0])
        affine[:3, 3] = [s / 2 for s in spacing]  # voxel centres between two image voxels per axis
        lines.append((pid, image, split, _nifti(tmp_path / f"{pid}_m.nii.gz", coarse, affine)))
    config = load_config("segment", "smoke3d")
    config.segment.manifest = _csv(tmp_path, lines)
    config.data.mask_resample, config.data.mask_values = True, '{"255": 1}'
    run_data = smoke_config_3d().data
    run_data.target_spacing = (0.5, 0.6, 1.0)
    splits, info = data3d.load_volumes(config, str(tmp_path), "", run_data, patch=6, mean=0.5, std=0.25,
                                       say=lambda m: None)
    test = splits["test"]
    expected = np.repeat(np.repeat(np.repeat((coarse == 255).astype(np.uint8), 2, 0), 2, 1), 2, 2)
    np.testing.assert_array_equal(test.native[0], data3d.axial_dhw(expected).astype(np.uint8))
    np.testing.assert_allclose(test.spacing[0], (2.0, 1.2, 1.0))  # the image's (d, h, w) mm, not the mask's
    onehot = np.eye(2, dtype=np.float32)[test.masks[0]]
    back = evaluate3d.to_native(onehot, test.to_input[0], test.native[0].shape).argmax(-1)
    np.testing.assert_array_equal(back, test.native[0])  # predictions map back onto the image's grid exactly
