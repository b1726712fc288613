"""Drop path in pretraining follows the official multi-crop path (NestedTensorBlock), not the plain Block."""

import jax
import jax.numpy as jnp
import numpy as np

from medjax.models.vit import VisionTransformer, drop_path
from medjax.pretrain.loss_model import build_models
from tests.helpers import smoke_config


def test_subset_rule_at_any_rate_when_asked():
    calls = []

    def branch(y):
        calls.append(y.shape[0])
        return jnp.ones_like(y)

    out = np.asarray(drop_path(jnp.zeros((32, 2)), branch, 0.1, jax.random.PRNGKey(0), subset_above=0.0))
    assert calls == [28]  # max(int(32 * 0.9), 1), the official sample_subset_size
    np.testing.assert_allclose(np.sort(out[:, 0]), [0.0] * 4 + [32 / 28] * 28, rtol=1e-6)
    drop_path(jnp.zeros((32, 2)), branch, 0.1, jax.random.PRNGKey(0))  # the plain Block's rule at 0.1
    assert calls == [28, 32]


def _branch_batch_sizes(model, params, x):
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x, train=True, rngs={"drop_path": jax.random.PRNGKey(1)}))
    return str(jaxpr(params))


def test_pretraining_student_runs_each_branch_on_a_subset():
    config = smoke_config()
    config.model.drop_path_rate = 0.1
    student = build_models(config).backbone
    assert student.drop_path_batch_subset
    plain = VisionTransformer(**{f: getattr(student, f) for f in ("img_size", "patch_size", "in_chans", "embed_dim",
                                                                  "depth", "num_heads", "num_register_tokens")},
                              drop_path_rate=0.1)
    x = jnp.zeros((10, student.img_size, student.img_size, student.in_chans))
    params = student.init(jax.random.PRNGKey(0), x)
    # 9 = int(10 * 0.9) samples enter each residual branch of the student; the plain model runs all 10
    assert f"f32[9,{(student.img_size // student.patch_size) ** 2 + 5}," in _branch_batch_sizes(student, params, x)
    assert "f32[9," not in _branch_batch_sizes(plain.clone(num_register_tokens=4), params, x)
    out = student.apply(params, x, train=False)
    np.testing.assert_array_equal(out["x_prenorm"], plain.clone(num_register_tokens=4).apply(params, x)["x_prenorm"])
