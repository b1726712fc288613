"""DINOHead parity with the official head and its weight-norm invariants."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.models.convert import head_params_from_state_dict
from medjax.models.heads import DINOHead

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "dino_head.npz")


def load(tag):
    with np.load(FIXTURE) as f:
        data = {k[len(tag) + 1 :]: v for k, v in f.items() if k.startswith(tag + "/")}
    cfg = json.loads(str(data.pop("config")))
    sd = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
    return cfg, sd, data["x"], data["out"]


def make_head(cfg, **kw):
    return DINOHead(out_dim=cfg["out_dim"], hidden_dim=cfg.get("hidden_dim", 2048),
                    bottleneck_dim=cfg["bottleneck_dim"], nlayers=cfg["nlayers"], **kw)


@pytest.mark.parametrize("tag", ["h3", "h1"])
def test_head_matches_official(tag):
    cfg, sd, x, want = load(tag)
    params = head_params_from_state_dict(sd)
    assert sorted(params) == ["last_layer"] + [f"mlp_{i}" for i in range(cfg["nlayers"])]
    got = jax.jit(make_head(cfg).apply)({"params": params}, jnp.asarray(x))
    assert got.shape == want.shape
    assert float(np.max(np.abs(np.asarray(got) - want))) <= 1e-5


def test_head_init_params_and_weight_norm_invariance():
    head = DINOHead(out_dim=50, hidden_dim=32, bottleneck_dim=16, nlayers=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
    params = jax.jit(head.init)(jax.random.PRNGKey(0), x)
    last = params["params"]["last_layer"]
    assert last["weight_g"].shape == (50,) and last["weight_v"].shape == (16, 50)
    np.testing.assert_array_equal(last["weight_g"], np.ones(50, np.float32))
    assert float(jnp.abs(last["weight_v"]).max()) <= 0.25  # torch default Linear: U(+-1/sqrt(16))
    apply = jax.jit(head.apply)
    logits = apply(params, x)
    assert float(jnp.abs(logits).max()) <= 1.0 + 1e-6  # unit inputs times unit columns: cosines
    scaled = jax.tree.map(lambda a: a, params)
    scaled["params"]["last_layer"]["weight_v"] = 3.0 * last["weight_v"]
    np.testing.assert_allclose(apply(scaled, x), logits, atol=1e-6)
    scaled["params"]["last_layer"]["weight_g"] = 2.0 * last["weight_g"]
    np.testing.assert_allclose(apply(scaled, x), 2.0 * logits, atol=1e-6)
    paths = ["/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert sum("last_layer" in p for p in paths) == 2


def test_head_bfloat16_compute_keeps_float32_params():
    cfg, sd, x, want = load("h3")
    head = make_head(cfg, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.asarray(x))
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    got = jax.jit(head.apply)({"params": head_params_from_state_dict(sd)}, jnp.asarray(x))
    assert got.dtype == jnp.bfloat16
    assert float(np.max(np.abs(np.asarray(got, np.float32) - want))) < 0.05
