import numpy as np
import pytest
from PIL import Image

from medjax.data.views import SingleView

MEAN, STD = 0.449, 0.226


def _slice(h=40, w=52, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (h, w)).astype(np.float32)
    x[5:15, 3:20] = 1.0  # an asymmetric bright block: flips and crops are visible
    return x


def test_eval_is_the_whole_slice_resized_clipped_and_normalised():
    x = _slice()
    t = SingleView(32, (MEAN,), (STD,))
    want = np.asarray(Image.fromarray(x, mode="F").resize((32, 32), Image.BICUBIC))
    want = (np.clip(want, 0.0, 1.0) - np.float32(MEAN)) / np.float32(STD)
    got = t.eval(x)
    assert got.shape == (32, 32, 1) and got.dtype == np.float32
    np.testing.assert_array_equal(got[..., 0], want.astype(np.float32))
    np.testing.assert_array_equal(t.eval_batch([x, x]), np.stack([got, got]))


def test_train_view_is_seeded_and_in_range():
    x = _slice()
    t = SingleView(24, (MEAN,), (STD,))
    a = t.train_batch([x] * 4, np.random.default_rng(3))
    b = t.train_batch([x] * 4, np.random.default_rng(3))
    c = t.train_batch([x] * 4, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (4, 24, 24, 1) and a.dtype == np.float32
    assert not np.array_equal(a[0], a[1])  # each view draws its own crop
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert a.min() >= lo - 1e-6 and a.max() <= hi + 1e-6


def test_full_crop_without_flip_is_the_eval_view_and_flip_mirrors_it():
    x = _slice(36, 36)
    full = dict(size=24, mean=(MEAN,), std=(STD,), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = SingleView(**full, flip_p=0.0)
    flipped = SingleView(**full, flip_p=1.0)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(plain.train(x, rng), plain.eval(x))
    np.testing.assert_array_equal(flipped.train(x, rng), plain.eval(x)[:, ::-1])


def test_crop_scale_controls_the_area_seen():
    # A slice that is 0 on the left half and 1 on the right: small crops are mostly one value.
    x = np.zeros((64, 64), np.float32)
    x[:, 32:] = 1.0
    rng = np.random.default_rng(0)
    small = SingleView(16, scale=(0.02, 0.02), flip_p=0.0)
    views = small.train_batch([x] * 50, rng) * np.float32(0.226) + np.float32(0.449)
    pure = np.mean([(v.max() - v.min()) < 1e-3 for v in views])
    assert pure > 0.5  # most 2 % crops lie within one half
    whole = SingleView(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0).train(x, rng)
    assert whole.min() < 0 < whole.max()


def test_channels_are_repeated_for_a_three_channel_model():
    x = _slice()
    t = SingleView(16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), channels=3)
    v = t.eval(x)
    assert v.shape == (16, 16, 3)
    raw = v * np.float32([0.229, 0.224, 0.225]) + np.float32([0.485, 0.456, 0.406])
    np.testing.assert_allclose(raw[..., 0], raw[..., 2], atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scale=(0.5, 1.5)), "scale"),
    (dict(scale=(0.0, 1.0)), "scale"),
    (dict(flip_p=2.0), "flip_p"),
    (dict(mean=(0.1, 0.2), std=(0.3,)), "equal lengths"),
    (dict(mean=(0.1, 0.2), std=(0.3, 0.3), channels=3), "give 1 or 3"),
])
def test_bad_settings_are_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SingleView(16, **kwargs)
