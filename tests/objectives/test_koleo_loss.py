"""KoLeo regulariser: parity with the reference KoLeoLoss, a clear error for batch 1, safe duplicates."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.objectives.koleo import koleo_loss

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "losses.npz"
ATOL = 1e-5
_koleo = jax.jit(koleo_loss)
_value_and_grad = jax.jit(jax.value_and_grad(koleo_loss))


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def test_value_and_gradient_match_reference(ref):
    value, grad = _value_and_grad(ref["koleo_x"])
    assert abs(float(value) - float(ref["koleo_loss"])) <= ATOL
    np.testing.assert_allclose(grad, ref["koleo_grad"], rtol=0, atol=ATOL)


def test_per_global_crop_sum_matches_reference(ref):
    # The reference applies KoLeo to each global crop's CLS tokens separately and sums.
    total = sum(_koleo(chunk) for chunk in np.split(ref["koleo_x"], 2))
    assert abs(float(total) - float(ref["koleo_chunked_sum"])) <= ATOL


def test_duplicates_keep_reference_value_with_finite_small_gradient(ref):
    x = ref["koleo_dup_x"]  # row 3 copies row 0, row 7 is 2 x row 5
    value, grad = _value_and_grad(x)
    assert abs(float(value) - float(ref["koleo_dup_loss"])) <= ATOL
    assert np.isfinite(np.asarray(grad)).all()
    assert float(jnp.abs(grad).max()) < 10.0


@pytest.mark.parametrize(
    "make",
    [
        lambda x: np.concatenate([x, x[:1], x[:1]]),  # three copies: the reference gradient is ~1e8
        lambda x: np.concatenate([x, 3.0 * x[:1]]),  # equal after normalisation up to rounding
        lambda x: np.repeat(x[:1], 4, axis=0),  # fully collapsed batch
    ],
)
def test_degenerate_batches_stay_finite(make):
    x = make(np.random.default_rng(6).normal(size=(5, 16)).astype(np.float32))
    value, grad = _value_and_grad(x)
    assert np.isfinite(float(value))
    assert np.isfinite(np.asarray(grad)).all()
    assert float(jnp.abs(grad).max()) < 10.0


def test_zero_features_stay_finite():
    # Like the reference's normalisation, a zero row's direction is undefined (gradient ~1 / eps), but finite.
    x = np.concatenate([np.random.default_rng(8).normal(size=(4, 16)), np.zeros((2, 16))]).astype(np.float32)
    value, grad = _value_and_grad(x)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


def test_batch_of_one_is_a_clear_error():
    x = np.ones((1, 8), np.float32)
    with pytest.raises(ValueError, match=r"at least 2 samples.*batch size 1.*koleo_weight=0"):
        koleo_loss(x)
    with pytest.raises(ValueError, match="at least 2 samples"):
        jax.jit(koleo_loss)(x)  # shapes are static: raised while tracing


def test_sample_is_never_its_own_neighbour():
    # Two opposite vectors: each one's only neighbour is the other, at distance 2.
    x = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    np.testing.assert_allclose(_koleo(x), -np.log(2.0), atol=1e-6)


def test_spread_batch_scores_lower_than_clustered():
    rng = np.random.default_rng(7)
    spread = rng.normal(size=(8, 16)).astype(np.float32)
    clustered = (np.ones((8, 16)) + 0.05 * rng.normal(size=(8, 16))).astype(np.float32)
    assert float(_koleo(spread)) < float(_koleo(clustered))


def test_bfloat16_input_is_computed_in_float32(ref):
    value = _koleo(jnp.asarray(ref["koleo_x"], jnp.bfloat16))
    assert value.dtype == jnp.float32
    assert abs(float(value) - float(ref["koleo_loss"])) < 0.05


def test_koleo_term_per_device_groups_and_global():
    from medjax.objectives.koleo import koleo_term

    x = np.random.default_rng(11).normal(size=(2 * 8, 6)).astype(np.float32)  # 2 crops x 8 images
    crops = np.split(x, 2)
    per_device = sum(np.mean([float(koleo_loss(c[g:g + 2])) for g in range(0, 8, 2)]) for c in crops)
    whole = sum(float(koleo_loss(c)) for c in crops)
    assert abs(float(koleo_term(x, 2, group_size=2)) - per_device) < 1e-5
    assert abs(float(koleo_term(x, 2, group_size=0)) - whole) < 1e-5
    assert abs(float(koleo_term(x, 2, group_size=8)) - whole) < 1e-5  # one device holds the whole batch
    assert abs(per_device - whole) > 0.1  # the two forms really differ (neighbours among 2 vs 8 images)
    with pytest.raises(ValueError, match="groups of 3 images do not divide the batch of 8"):
        koleo_term(x, 2, group_size=3)
