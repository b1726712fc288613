"""3D multi-crop views, 3D iBOT masks and the pipeline's 3D batches."""

import numpy as np
import pytest

from medjax.data.augment3d import MultiCrop3DConfig, crop_box_3d, multicrop3d
from medjax.data.masking import MaskingGenerator3D, mask_upper_bound, sample_batch_masks
from medjax.data.pipeline import make_pretrain_dataset
from medjax.data.slices import display_slice
from medjax.data.sources import axial_dhw

CFG = MultiCrop3DConfig(global_size=12, local_size=6, n_local=3)
LO, HI = (0.0 - 0.449) / 0.226, (1.0 - 0.449) / 0.226


def _volume(shape=(10, 20, 18), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_views_have_the_2d_keys_cubic_shapes_and_range():
    out = multicrop3d(_volume(), np.random.default_rng(1), MultiCrop3DConfig(**{**CFG.__dict__, "noise_p": 0.0}))
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    assert all(v.shape == (12, 12, 12, 1) and v.dtype == np.float32 for v in out["global_crops"])
    assert all(v.shape == (6, 6, 6, 1) for v in out["local_crops"])
    for v in out["global_crops"] + out["local_crops"]:
        assert LO - 1e-5 <= v.min() and v.max() <= HI + 1e-5


def test_views_are_a_function_of_the_seed():
    a, b, c = (multicrop3d(_volume(), np.random.default_rng(s), CFG) for s in (5, 5, 6))
    for key in ("global_crops", "local_crops"):
        for x, y in zip(a[key], b[key]):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a["global_crops"][0], c["global_crops"][0])


def test_whole_volume_crop_is_identity_and_flip_mirrors_left_right():
    vol = _volume((8, 8, 8))
    plain = dict(global_size=8, local_size=4, n_local=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                 intensity_p=0.0, gamma_p=0.0, global_blur_p=(0.0,), noise_p=0.0, mean=(0.0,), std=(1.0,))
    same = multicrop3d(vol, np.random.default_rng(0), MultiCrop3DConfig(flip_p=0.0, **plain))
    np.testing.assert_allclose(same["global_crops"][0][..., 0], vol, atol=1e-6)
    flipped = multicrop3d(vol, np.random.default_rng(0), MultiCrop3DConfig(flip_p=1.0, **plain))
    np.testing.assert_allclose(flipped["global_crops"][0][..., 0], vol[:, :, ::-1], atol=1e-6)


def test_crop_boxes_fit_and_thin_slabs_are_clamped():
    rng = np.random.default_rng(0)
    for _ in range(200):
        sd, sh, sw, d, h, w = crop_box_3d((10, 20, 18), (0.05, 0.32), (0.75, 4 / 3), rng)
        assert 0 <= sd <= 10 - d and 0 <= sh <= 20 - h and 0 <= sw <= 18 - w and min(d, h, w) >= 1
        assert 0.02 <= d * h * w / 3600 <= 0.45
    sd, sh, sw, d, h, w = crop_box_3d((4, 60, 60), (0.9, 1.0), (0.75, 4 / 3), rng)  # no cube fits a 4-slice slab
    assert d == 4 and h <= 60 and w <= 60


def test_3d_masks_respect_the_ratio_bins_and_bound():
    gen = MaskingGenerator3D((4, 4, 4))
    masks = sample_batch_masks(16, gen, np.random.default_rng(0))
    assert masks.shape == (16, 64)
    counts = np.sort(masks.sum(1))
    assert (counts == 0).sum() >= 8 and counts.max() <= 32 and counts.sum() <= mask_upper_bound(16, 64)
    assert counts[-8:].min() > 0


def test_axial_layout_matches_the_2d_axial_slices():
    vol = _volume((5, 6, 7))  # RAS (X, Y, Z)
    dhw = axial_dhw(vol)
    assert dhw.shape == (7, 6, 5)
    for k in range(7):
        np.testing.assert_array_equal(dhw[k], display_slice(vol, "axial", k))


def test_pipeline_batches_3d_views_and_masks():
    source = [{"image": _volume(seed=s)} for s in range(4)]
    ds = make_pretrain_dataset(source, CFG, batch_size=2, patch_size=3, prefetch=0)
    batch = next(iter(ds))
    assert batch["global_crops"].shape == (4, 12, 12, 12, 1)
    assert batch["local_crops"].shape == (6, 6, 6, 6, 1)
    assert batch["masks"].shape == (4, 64) and batch["mask_indices"].shape == (mask_upper_bound(4, 64),)
    empty = make_pretrain_dataset(source, MultiCrop3DConfig(global_size=12, local_size=6, n_local=0),
                                  batch_size=2, patch_size=3, prefetch=0)
    assert next(iter(empty))["local_crops"].shape == (0, 6, 6, 6, 1)


def test_bad_volume_shape_is_one_sentence():
    with pytest.raises(ValueError, match="is not a volume"):
        multicrop3d(np.zeros((4, 4)), np.random.default_rng(0), CFG)
