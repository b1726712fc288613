"""DINO objective: parity with the reference DINOLoss / ssl_meta_arch, and invariants."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.objectives import dino

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "losses.npz"
ATOL = 1e-5

# Jitted once per shape: faster than op-by-op dispatch, and what the trainer does.
_softmax_center = jax.jit(dino.softmax_center)
_update_center = jax.jit(dino.update_center)
_sinkhorn_knopp = jax.jit(dino.sinkhorn_knopp, static_argnames="n_iterations")
_cross_entropy = jax.jit(dino.cross_entropy)
_dino_loss = jax.jit(dino.dino_loss, static_argnames=("n_global", "n_local"))


@pytest.fixture(scope="module")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


def _loss_inputs(ref):
    return ref["dino_student_global_logits"], ref["dino_student_local_logits"], int(ref["dino_n_local"])


def test_softmax_center_matches_reference(ref):
    probs = _softmax_center(ref["dino_teacher_logits"], ref["dino_center"], float(ref["teacher_temperature"]))
    assert probs.dtype == jnp.float32
    np.testing.assert_allclose(probs, ref["dino_softmax_probs"], rtol=0, atol=ATOL)


def test_update_center_matches_reference(ref):
    new = _update_center(ref["dino_center"], ref["dino_teacher_logits"], momentum=0.9)
    np.testing.assert_allclose(new, ref["dino_center_updated"], rtol=0, atol=ATOL)
    assert new.shape == ref["dino_center"].shape
    # A (1, K) centre, the reference's buffer shape, keeps its shape.
    assert _update_center(ref["dino_center"][None], ref["dino_teacher_logits"]).shape == (1, 96)


def test_sinkhorn_matches_reference(ref):
    probs = _sinkhorn_knopp(ref["dino_teacher_logits"], float(ref["teacher_temperature"]), n_iterations=3)
    np.testing.assert_allclose(probs, ref["dino_sinkhorn_probs"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("mode", ["centering", "sinkhorn"])
def test_dino_loss_matches_reference(ref, mode):
    student_global, student_local, n_local = _loss_inputs(ref)
    temp = float(ref["teacher_temperature"])
    if mode == "centering":
        teacher = _softmax_center(ref["dino_teacher_logits"], ref["dino_center"], temp)
    else:
        teacher = _sinkhorn_knopp(ref["dino_teacher_logits"], temp)
    out = _dino_loss(student_global, student_local, teacher, n_global=2, n_local=n_local, student_temperature=0.1)
    assert abs(float(out["global"]) - float(ref[f"dino_{mode}_global"])) <= ATOL
    assert abs(float(out["local"]) - float(ref[f"dino_{mode}_local"])) <= ATOL


def test_dino_loss_without_local_crops_matches_reference(ref):
    # The reference divides by (2 + max(0, 1)) = 3 even with no local crops.
    student_global, _, _ = _loss_inputs(ref)
    teacher = _softmax_center(ref["dino_teacher_logits"], ref["dino_center"], float(ref["teacher_temperature"]))
    out = _dino_loss(student_global, np.zeros((0, 96), np.float32), teacher, n_global=2, n_local=0)
    assert abs(float(out["global"]) - float(ref["dino_centering_global_no_local"])) <= ATOL
    assert float(out["local"]) == 0.0


def test_global_crops_are_crossed_and_local_term_ignores_teacher_order(ref):
    student_global, student_local, n_local = _loss_inputs(ref)
    teacher = np.asarray(_softmax_center(ref["dino_teacher_logits"], ref["dino_center"], 0.04))
    swapped = np.concatenate(np.split(teacher, 2)[::-1])
    out = _dino_loss(student_global, student_local, teacher, n_global=2, n_local=n_local)
    out_swapped = _dino_loss(student_global, student_local, swapped, n_global=2, n_local=n_local)
    np.testing.assert_allclose(out["local"], out_swapped["local"], rtol=1e-6)
    # With the teacher crops swapped, the loss compares each crop with itself: manual same-crop value.
    ce = _cross_entropy(student_global, teacher)
    np.testing.assert_allclose(out_swapped["global"], ce.reshape(2, -1).mean(1).sum() / (2 + 2 * n_local), rtol=1e-6)
    assert not np.isclose(float(out["global"]), float(out_swapped["global"]), rtol=1e-3)


def test_sinkhorn_marginals():
    rng = np.random.default_rng(1)
    logits = np.tanh(rng.normal(size=(16, 32))).astype(np.float32)
    q = _sinkhorn_knopp(logits, 0.05, n_iterations=3)
    np.testing.assert_allclose(q.sum(axis=1), np.ones(16), atol=1e-5)  # each sample is an assignment
    q = _sinkhorn_knopp(logits, 0.05, n_iterations=200)
    np.testing.assert_allclose(q.sum(axis=0), np.full(32, 16 / 32), atol=1e-4)  # prototypes used equally
    assert float(q.min()) >= 0.0


def test_sinkhorn_is_stable_for_large_logits():
    rng = np.random.default_rng(2)
    cosines = np.tanh(rng.normal(size=(8, 24))).astype(np.float32)
    large = cosines + np.float32(9.0)  # up to 10: exp(10 / 0.04) overflows float32
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(large / np.float32(0.04))).all()
    q = _sinkhorn_knopp(large, 0.04)
    assert np.isfinite(np.asarray(q)).all()
    # A constant shift of all logits leaves Sinkhorn unchanged (up to rounding of logits / T).
    np.testing.assert_allclose(q, _sinkhorn_knopp(cosines, 0.04), atol=5e-5)


def test_sinkhorn_ignores_padding_rows():
    rng = np.random.default_rng(3)
    real = np.tanh(rng.normal(size=(10, 24))).astype(np.float32)
    padded = np.concatenate([real, np.full((6, 24), 50.0, np.float32)])
    valid = np.arange(16) < 10
    q = _sinkhorn_knopp(padded, 0.04, valid=valid)
    np.testing.assert_allclose(q[:10], _sinkhorn_knopp(real, 0.04), atol=1e-6)
    assert float(jnp.abs(q[10:]).max()) == 0.0
    # A buffer with no real row (no masked patch this step) gives zeros, not NaN.
    assert float(jnp.abs(_sinkhorn_knopp(padded, 0.04, valid=np.zeros(16, bool))).max()) == 0.0


def test_cross_entropy_is_minimal_where_student_matches_teacher():
    rng = np.random.default_rng(4)
    teacher = np.asarray(jax.nn.softmax(rng.normal(size=(5, 16)).astype(np.float32)))
    matching = 0.1 * np.log(teacher) + 3.0  # softmax(s / 0.1) == teacher; the offset does not matter
    loss_at = lambda s: jnp.sum(_cross_entropy(s, teacher, 0.1))  # noqa: E731
    entropy = -np.sum(teacher * np.log(teacher))
    np.testing.assert_allclose(loss_at(matching), entropy, rtol=1e-5)
    assert float(jnp.abs(jax.grad(loss_at)(matching)).max()) < 1e-4
    for _ in range(5):
        assert float(loss_at(matching + 0.05 * rng.normal(size=matching.shape))) > entropy


def test_center_ema_closed_form():
    logits = np.tile(np.linspace(-1, 1, 8, dtype=np.float32), (6, 1))
    center = np.full(8, 0.5, np.float32)
    c = center
    for _ in range(10):
        c = _update_center(c, logits, momentum=0.9)
    expected = 0.9**10 * center + (1 - 0.9**10) * logits[0]
    np.testing.assert_allclose(c, expected, atol=1e-6)


def test_bfloat16_inputs_are_computed_in_float32(ref):
    student_global, student_local, n_local = _loss_inputs(ref)
    teacher = _softmax_center(ref["dino_teacher_logits"].astype(jnp.bfloat16), ref["dino_center"], 0.04)
    assert teacher.dtype == jnp.float32
    out = _dino_loss(
        student_global.astype(jnp.bfloat16), student_local.astype(jnp.bfloat16), teacher, n_global=2, n_local=n_local
    )
    assert out["global"].dtype == jnp.float32
    assert abs(float(out["global"]) - float(ref["dino_centering_global"])) < 0.05


def test_dino_loss_rejects_mismatched_shapes(ref):
    student_global, student_local, _ = _loss_inputs(ref)
    teacher = ref["dino_softmax_probs"]
    with pytest.raises(ValueError, match="local logits"):
        _dino_loss(student_global, student_local, teacher, n_global=2, n_local=2)
    with pytest.raises(ValueError, match="same shape"):
        _dino_loss(student_global, student_local, teacher[:6], n_global=2, n_local=3)
