"""iBOT block masking: statistics against the reference, the batch rule, the static bound, indices."""

import pathlib

import numpy as np
import pytest
from scipy import ndimage

from medjax.data.masking import MaskingGenerator, mask_index_arrays, mask_upper_bound, sample_batch_masks

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "masking_reference.npz"


@pytest.fixture(scope="module")
def official():
    """Masks the reference MaskingGenerator + collate_data_and_cast drew (tests/reference/make_masking_fixture.py):
    100 batches of 64 global-crop masks on a 16 x 16 grid, and each batch's upper bound."""
    with np.load(FIXTURE) as f:
        grid = int(f["grid"])
        masks = np.unpackbits(f["packed_masks"], axis=-1, count=grid * grid).astype(bool)
        return masks, f["upperbounds"]


def _mask_statistics(masks: np.ndarray) -> dict:
    """Per-masked-image samples: covered share, 4-connected regions, bounding-box height / width of each region."""
    masked = masks.reshape(-1, 16, 16)[masks.reshape(-1, 256).any(1)]
    regions, aspect = [], []
    for m in masked:
        labels, n = ndimage.label(m)
        regions.append(n)
        for rows, cols in ndimage.find_objects(labels):
            aspect.append((rows.stop - rows.start) / (cols.stop - cols.start))
    return {"coverage": masked.mean((1, 2)), "regions": np.asarray(regions, float), "aspect": np.asarray(aspect)}


def test_statistics_match_the_reference(official):
    reference_masks, _ = official
    gen = MaskingGenerator((16, 16))
    rng = np.random.default_rng(0)
    ours = np.stack([sample_batch_masks(64, gen, rng) for _ in range(len(reference_masks))])
    theirs, mine = _mask_statistics(reference_masks), _mask_statistics(ours)
    for name in ("coverage", "regions", "aspect"):
        a, b = theirs[name], mine[name]
        se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se, (name, a.mean(), b.mean(), se)  # same mean within 4 SE
    # The same share of masked images per batch (exactly half) and the same spread of coverage.
    assert ((reference_masks.sum(-1) > 0).sum(1) == 32).all() and ((ours.sum(-1) > 0).sum(1) == 32).all()
    assert abs(theirs["coverage"].std() - mine["coverage"].std()) < 0.01


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
    assert 0.27 < np.concatenate(per_image).mean() / 256 < 0.33  # the reference's 0.298 (fixture)
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


def test_upper_bound_is_the_reference_formula_and_never_exceeded(official):
    _, upperbounds = official
    assert (upperbounds == mask_upper_bound(64, 256)).all()  # the bound collate_data_and_cast computed
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
