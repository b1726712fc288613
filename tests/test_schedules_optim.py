"""Schedules and per-parameter optimizer rules against the reference DINOv2 code (committed fixture)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from medjax.schedules import CosineSchedule, PretrainSchedules, as_step_input, scaled_lr
from medjax import optim
from medjax.pretrain.loss_model import init_params
from tests.helpers import smoke_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "train_reference.npz")
# Values the fixture script used (tests/reference/make_train_fixtures.py).
EPOCHS, EPOCH_LEN, LR, MIN_LR, WARMUP = 10, 7, 0.002, 1e-6, 2
DEPTH, DECAY, PATCH_MULT = 3, 0.9, 0.2


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURE)


def reference_schedules(lr=LR, epochs=EPOCHS) -> PretrainSchedules:
    total = epochs * EPOCH_LEN
    return PretrainSchedules(
        lr=CosineSchedule(lr, MIN_LR, total, warmup_steps=WARMUP * EPOCH_LEN),
        freeze_last_layer_steps=EPOCH_LEN,
        weight_decay=CosineSchedule(0.04, 0.4, total),
        teacher_momentum=CosineSchedule(0.992, 1.0, total),
        teacher_temp=CosineSchedule(0.07, 0.07, 3 * EPOCH_LEN, warmup_steps=3 * EPOCH_LEN, start_warmup=0.04),
    )


def test_schedules_match_reference_cosine_scheduler(ref):
    steps = jnp.arange(EPOCHS * EPOCH_LEN + 3)
    sched = reference_schedules()
    baked = jax.vmap(sched.values)(steps)  # numbers as constants
    as_input = jax.jit(jax.vmap(lambda s, step: s.values(step), in_axes=(None, 0)))(as_step_input(sched), steps)
    for name in ref.files:
        if name in baked:
            np.testing.assert_allclose(np.asarray(baked[name]), ref[name], rtol=1e-6, atol=1e-9, err_msg=name)
            np.testing.assert_allclose(np.asarray(as_input[name]), ref[name], rtol=1e-6, atol=1e-9, err_msg=name)


def test_schedule_values_are_inputs_of_the_compiled_step_not_constants():
    """A run with another learning rate or length reuses the compiled step (and JAX's compilation cache)."""
    values = jax.jit(lambda s: s.values(jnp.int32(3)))
    a, b = as_step_input(reference_schedules()), as_step_input(reference_schedules(lr=0.5, epochs=1000))
    assert values.lower(a).as_text() == values.lower(b).as_text()
    assert float(values(b)["lr"]) != float(values(a)["lr"])


def test_lr_scaling_rules():
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)
    assert scaled_lr(0.1, 512, "linear_wrt_256") == pytest.approx(0.2)
    with pytest.raises(ValueError, match="scaling_rule"):
        scaled_lr(0.1, 512, "cubic")


def test_warmup_longer_than_run_is_a_clear_error():
    with pytest.raises(ValueError, match="warm-up"):
        CosineSchedule(1.0, 0.0, total_steps=5, warmup_steps=10)


def _official_name(path: str) -> str:
    """medjax param path -> the official parameter name of the same tensor."""
    parts = path.split("/")
    out = []
    for p in parts:
        if p.startswith("blocks_"):
            out += ["blocks", p.split("_")[1]]
        elif p.startswith("mlp_"):
            out += ["mlp", str(2 * int(p.split("_")[1]))]
        else:
            out.append({"kernel": "weight", "scale": "weight"}.get(p, p))
    return ".".join(out)


def test_param_multipliers_match_reference_param_groups(ref):
    config = smoke_config(embed_dim=48, depth=DEPTH, num_heads=3, num_register_tokens=4)
    config.head.n_prototypes, config.head.hidden_dim, config.head.bottleneck_dim = 32, 64, 16
    from medjax.pretrain.loss_model import build_models

    params = init_params(build_models(config), jax.random.PRNGKey(0), config)
    rules = optim.ParamRules.from_params(params, depth=DEPTH, layerwise_decay=DECAY, patch_embed_lr_mult=PATCH_MULT)
    ours = {}
    for (path, lr_m), wd_m, last in zip(
        jax.tree_util.tree_flatten_with_path(rules.lr_mult)[0],
        jax.tree.leaves(rules.wd_mult),
        jax.tree.leaves(rules.is_last_layer),
    ):
        ours[_official_name(optim._path_name(path))] = (lr_m, wd_m, last)
    reference = {name: (lr_m, wd_m, last) for name, lr_m, wd_m, last in json.loads(str(ref["param_groups_json"]))}
    for name, (lr_m, wd_m, last) in reference.items():
        assert name in ours, name
        got_lr, got_wd, got_last = ours[name]
        assert got_lr == pytest.approx(lr_m), name
        assert got_last == last, name
        # medjax also exempts the CLS and mask tokens from weight decay (documented difference).
        expected_wd = 0.0 if name in ("backbone.cls_token", "backbone.mask_token") else wd_m
        assert got_wd == expected_wd, name
    # Register tokens (absent from the pip reference) sit at layer 0 like the CLS token, without decay.
    assert ours["backbone.register_tokens"] == (pytest.approx(DECAY ** (DEPTH + 1)), 0.0, False)


def test_adamw_step_equals_optax_adamw_with_unit_multipliers():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: jnp.sin(p) + 0.3, params)
    rules = optim.ParamRules(
        lr_mult=jax.tree.map(lambda _: 1.0, params),
        wd_mult=jax.tree.map(lambda _: 1.0, params),
        is_last_layer=jax.tree.map(lambda _: False, params),
    )
    adam = optim.make_adam(0.9, 0.999)
    reference = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05)
    state, ref_state, p, ref_p = adam.init(params), reference.init(params), params, params
    for _ in range(3):
        u, state = adam.update(grads, state)
        p = optim.adamw_step(p, u, rules, lr=1e-2, last_layer_lr=0.0, weight_decay=0.05)
        ref_u, ref_state = reference.update(grads, ref_state, ref_p)
        ref_p = optax.apply_updates(ref_p, ref_u)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_clip_per_module_clips_each_module_separately():
    grads = {"backbone": {"w": jnp.full((4,), 3.0)}, "dino_head": {"w": jnp.full((4,), 0.1)}}
    clipped, total = optim.clip_per_module(grads, 3.0)
    assert float(optax.global_norm(clipped["backbone"])) == pytest.approx(3.0, rel=1e-5)
    np.testing.assert_allclose(clipped["dino_head"]["w"], grads["dino_head"]["w"])  # under the limit: untouched
    assert float(total) == pytest.approx(np.sqrt(4 * 9 + 4 * 0.01), rel=1e-6)


def test_last_layer_follows_its_own_lr():
    params = {"last_layer": {"w": jnp.ones(2)}, "other": {"w": jnp.ones(2)}}
    rules = optim.ParamRules.from_params(
        {"dino_head": params}, depth=1, layerwise_decay=1.0, patch_embed_lr_mult=1.0
    )
    updates = jax.tree.map(jnp.ones_like, {"dino_head": params})
    out = optim.adamw_step({"dino_head": params}, updates, rules, lr=0.1, last_layer_lr=0.0, weight_decay=0.0)
    np.testing.assert_array_equal(out["dino_head"]["last_layer"]["w"], 1.0)  # frozen
    np.testing.assert_allclose(out["dino_head"]["other"]["w"], 0.9)

