"""iBOT block masking: statistics against the reference, the batch rule, the static bound, indices."""

import numpy as np
import pytest

from medjax.data.masking import MaskingGenerator, mask_index_arrays, mask_upper_bound, sample_batch_masks

# The reference MaskingGenerator + collate_data_and_cast (16x16 grid, batches of 64 global-crop
# images, max_num_patches = 128) measured over 200,000 masks: masked images cover 0.2977 of the
# patches, with 5.13 blocks of mean height/width 1.30 (REFERENCE_NOTES, from 2000 masks: 0.298,
# 5.16, 1.28); M = 2496 for that batch.
REF_COVERAGE, REF_BLOCKS, REF_HW, REF_M64 = 0.2977, 5.13, 1.30, 2496


def _stats(n_masks=2000, n=64, seed=0):
    """Runs the batch rule with the generator's block log: shares, coverage, blocks, h/w."""
    gen = MaskingGenerator((16, 16))
    rng = np.random.default_rng(seed)
    bins = np.linspace(0.1, 0.5, n // 2 + 1)
    coverage, blocks = [], []
    for _ in range(n_masks // n):
        for i in range(n // 2):
            mask, b = gen.sample_blocks(int(256 * rng.uniform(bins[i], bins[i + 1])), rng)
            coverage.append(mask.mean())
            blocks.append(b)
    hw = np.array([(h, w) for bl in blocks for (_, _, h, w) in bl])
    return np.mean(coverage), np.mean([len(b) for b in blocks]), np.mean(hw[:, 0] / hw[:, 1])


def test_statistics_match_the_reference():
    coverage, n_blocks, hw = _stats()
    # 1000 masked images: coverage sd 0.115 -> SE 0.0037; blocks sd ~2.6 -> SE 0.08;
    # ~5100 blocks with h/w sd 0.94 -> SE 0.013. Tolerances are about 4 SE.
    assert abs(coverage - REF_COVERAGE) < 0.015
    assert abs(n_blocks - REF_BLOCKS) < 0.35
    assert abs(hw - REF_HW) < 0.06


def test_batch_rule_masks_exactly_half():
    gen = MaskingGenerator((16, 16))
    rng = np.random.default_rng(1)
    per_image = []
    for _ in range(2000 // 64):
        masks = sample_batch_masks(64, gen, rng)
        assert masks.shape == (64, 256) and masks.dtype == bool
        s = masks.sum(1)
        assert (s == 0).sum() == 32  # exactly int(64 * 0.5) masked, every batch
        per_image.append(s[s > 0])
    assert abs(np.concatenate(per_image).mean() / 256 - REF_COVERAGE) < 0.015
    odd = sample_batch_masks(7, gen, rng)
    assert (odd.sum(1) > 0).sum() == 3
    # Shuffled: masked images are not always the first ones.
    firsts = [sample_batch_masks(8, gen, rng)[0].any() for _ in range(200)]
    assert 0.35 < np.mean(firsts) < 0.65


def test_generator_respects_target_and_half_cap():
    gen = MaskingGenerator((14, 14))
    rng = np.random.default_rng(2)
    for target in range(0, 197, 7):
        mask, blocks = gen.sample_blocks(target, rng)
        assert mask.sum() <= target
        for _, _, h, w in blocks:
            assert 1 <= h < 14 and 1 <= w < 14 and h * w <= 98
            assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3  # log-uniform in [0.3, 1/0.3], then rounded
    # Asking for most of the grid still stops near the target (blocks may overlap).
    assert gen(98, rng).sum() >= 80


def test_upper_bound_is_the_reference_formula_and_never_exceeded():
    assert mask_upper_bound(64, 256) == REF_M64
    assert mask_upper_bound(2, 256) == 128  # one masked image, bin (0.1, 0.5)
    assert mask_upper_bound(1, 256) == 0
    rng = np.random.default_rng(3)
    for n, side in [(2, 4), (4, 8), (8, 16), (16, 7)]:
        gen = MaskingGenerator((side, side))
        bound = mask_upper_bound(n, side * side)
        worst = max(sample_batch_masks(n, gen, rng).sum() for _ in range(100))
        assert worst <= bound


def test_index_arrays_and_weights():
    gen = MaskingGenerator((8, 8))
    rng = np.random.default_rng(4)
    masks = sample_batch_masks(8, gen, rng)
    bound = mask_upper_bound(8, 64)
    idx, w, n = mask_index_arrays(masks, bound)
    assert idx.shape == w.shape == (bound,) and idx.dtype == np.int32 and w.dtype == np.float32
    assert n.shape == () and n.dtype == np.int32 and int(n) == masks.sum()
    k = int(n)
    assert masks.reshape(-1)[idx[:k]].all() and np.all(np.diff(idx[:k]) > 0)
    assert (idx[k:] == 0).all() and (w[k:] == 0).all()
    per_image = np.bincount(idx[:k] // 64, weights=w[:k], minlength=8)
    masked = masks.any(1)
    np.testing.assert_allclose(per_image[masked], 1.0, rtol=1e-6)  # each masked image weighs 1 in total
    assert (per_image[~masked] == 0).all()
    with pytest.raises(ValueError, match="upper bound"):
        mask_index_arrays(np.ones((2, 4), bool), 3)


def test_deterministic_given_generator():
    gen = MaskingGenerator((16, 16))
    a = sample_batch_masks(16, gen, np.random.default_rng(5))
    b = sample_batch_masks(16, gen, np.random.default_rng(5))
    c = sample_batch_masks(16, gen, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
