"""iBOT objective on a fixed-size masked-patch buffer: parity with the reference and invariants."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.objectives import dino, ibot

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "losses.npz"
ATOL = 1e-5

# Jitted once per shape: faster than op-by-op dispatch, and what the trainer does.
_softmax_center = jax.jit(dino.softmax_center)
_sinkhorn_knopp = jax.jit(dino.sinkhorn_knopp, static_argnames="n_iterations")
_ibot_loss = jax.jit(ibot.ibot_loss)
_ibot_grad = jax.jit(jax.grad(ibot.ibot_loss))
_ibot_value_and_grad = jax.jit(jax.value_and_grad(ibot.ibot_loss))
_update_masked_center = jax.jit(ibot.update_masked_center)


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _buffer(ref):
    """Weights and validity of the M-row buffer: real masked patches first, then zero-weight padding."""
    n_masked = ref["ibot_mask_indices"].shape[0]
    m = ref["ibot_student_logits"].shape[0]
    weights = np.zeros(m, np.float32)
    weights[:n_masked] = ref["ibot_mask_weights"]
    return weights, np.arange(m) < n_masked, n_masked


def test_mask_weights_follow_from_masks(ref):
    masks = ref["ibot_masks"]
    per_image = 1.0 / np.maximum(masks.sum(1), 1)
    image_of_patch = ref["ibot_mask_indices"] // masks.shape[1]
    np.testing.assert_allclose(per_image[image_of_patch], ref["ibot_mask_weights"], rtol=1e-7)
    # Each masked image weighs 1 in total; unmasked images still count in n_images.
    assert np.isclose(ref["ibot_mask_weights"].sum(), (masks.sum(1) > 0).sum())
    assert (masks.sum(1) == 0).any() and int(ref["ibot_n_images"]) == masks.shape[0]


@pytest.mark.parametrize("mode", ["centering", "sinkhorn"])
def test_ibot_loss_matches_reference(ref, mode):
    weights, valid, n_masked = _buffer(ref)
    temp = float(ref["teacher_temperature"])
    if mode == "centering":
        probs = _softmax_center(ref["ibot_teacher_logits"], ref["ibot_center"], temp)
    else:
        probs = _sinkhorn_knopp(ref["ibot_teacher_logits"], temp, valid=valid)
    np.testing.assert_allclose(probs[:n_masked], ref[f"ibot_{mode}_probs"], rtol=0, atol=ATOL)
    loss = _ibot_loss(ref["ibot_student_logits"], probs, weights, int(ref["ibot_n_images"]), 0.1)
    assert loss.dtype == jnp.float32
    assert abs(float(loss) - float(ref[f"ibot_{mode}_loss"])) <= ATOL


def test_masked_center_matches_reference(ref):
    _, valid, _ = _buffer(ref)
    new = _update_masked_center(ref["ibot_center"], ref["ibot_teacher_logits"], valid, 0.9)
    np.testing.assert_allclose(new, ref["ibot_center_updated"], rtol=0, atol=ATOL)


def test_padding_rows_are_ignored_even_when_garbage(ref):
    weights, valid, n_masked = _buffer(ref)
    probs = np.asarray(_softmax_center(ref["ibot_teacher_logits"], ref["ibot_center"], 0.04))
    student = ref["ibot_student_logits"].copy()
    garbage_probs, garbage_student = probs.copy(), student.copy()
    garbage_probs[n_masked:] = np.nan
    garbage_student[n_masked:] = 1e4
    clean = _ibot_loss(student, probs, weights, 12)
    value, grad = _ibot_value_and_grad(garbage_student, garbage_probs, weights, 12)
    np.testing.assert_allclose(value, clean, rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad[n_masked:]).max()) == 0.0
    # Garbage teacher logits in padding rows do not move the centre.
    teacher = ref["ibot_teacher_logits"].copy()
    teacher[n_masked:] = 1e6
    np.testing.assert_allclose(
        _update_masked_center(ref["ibot_center"], teacher, valid),
        _update_masked_center(ref["ibot_center"], ref["ibot_teacher_logits"], valid),
        atol=1e-7,
    )


def test_loss_divides_by_all_global_crop_images(ref):
    weights, _, _ = _buffer(ref)
    probs = _softmax_center(ref["ibot_teacher_logits"], ref["ibot_center"], 0.04)
    twelve = _ibot_loss(ref["ibot_student_logits"], probs, weights, 12)
    six = _ibot_loss(ref["ibot_student_logits"], probs, weights, 6)
    np.testing.assert_allclose(six, 2 * twelve, rtol=1e-6)


def test_loss_is_minimal_where_student_matches_teacher():
    rng = np.random.default_rng(5)
    teacher = np.asarray(jax.nn.softmax(rng.normal(size=(8, 12)).astype(np.float32)))
    weights = np.array([0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 1.0, 0.0, 0.0], np.float32)
    matching = 0.1 * np.log(teacher)
    grad = _ibot_grad(matching, teacher, weights, 4)
    assert float(jnp.abs(grad).max()) < 1e-4
    base = float(_ibot_loss(matching, teacher, weights, 4))
    for _ in range(5):
        assert float(_ibot_loss(matching + 0.05 * rng.normal(size=matching.shape), teacher, weights, 4)) > base


def test_no_masked_patch_gives_zero_loss_and_keeps_centre():
    center = np.linspace(-0.1, 0.1, 12, dtype=np.float32)
    logits = np.ones((6, 12), np.float32)
    np.testing.assert_array_equal(_update_masked_center(center, logits, np.zeros(6, bool)), center)
    assert float(_ibot_loss(logits, np.full((6, 12), 1 / 12, np.float32), np.zeros(6, np.float32), 4)) == 0.0
