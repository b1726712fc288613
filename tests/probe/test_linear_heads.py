"""The 52-head linear probe against the reference's construction, written out head by head in numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medjax.probe import linear_heads

# ---------------------------------------------------------------- numpy reference


def _reference_linear_input(blocks, num_register_tokens, n, avgpool):
    """The reference's ``create_linear_input`` on ``get_intermediate_layers(n=4, return_class_token=True)``:
    per block (patch tokens without registers, CLS); concat the last n CLS, then the last block's mean patch."""
    x_tokens_list = [(b[:, 1 + num_register_tokens:], b[:, 0]) for b in blocks[-4:]]
    taken = x_tokens_list[-n:]
    out = np.concatenate([cls for _, cls in taken], axis=-1)
    if avgpool:
        out = np.concatenate([out, taken[-1][0].mean(axis=1)], axis=-1)
    return out.astype(np.float32)


def _numpy_head_step(w, b, m_w, m_b, x, labels, lr, multilabel, weights=None):
    """One head, one torch-SGD step, gradients in closed form (float64); multi-label entries times ``weights``."""
    logits = x @ w + b
    batch = x.shape[0]
    if multilabel:
        weights = np.ones_like(logits) if weights is None else weights
        p = 1.0 / (1.0 + np.exp(-logits))
        loss = np.mean(np.sum(weights * (np.logaddexp(0, logits) - labels * logits), axis=1))
        g = weights * (p - labels) / batch
    else:
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        onehot = np.eye(w.shape[1])[labels]
        loss = -np.mean(np.sum(onehot * logp, axis=1))
        g = (np.exp(logp) - onehot) / batch
    m_w = 0.9 * m_w + x.T @ g
    m_b = 0.9 * m_b + g.sum(axis=0)
    return w - lr * m_w, b - lr * m_b, m_w, m_b, loss


def _torch_cosine_lrs(base_lr, t_max, steps):
    """``CosineAnnealingLR(eta_min=0)``'s recursive update, as torch applies it after every step."""
    lrs, lr = [base_lr], base_lr
    for epoch in range(1, steps):
        if (epoch - 1 - t_max) % (2 * t_max) == 0:
            lr = lr + base_lr * (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = (1 + math.cos(math.pi * epoch / t_max)) / (1 + math.cos(math.pi * (epoch - 1) / t_max)) * lr
        lrs.append(lr)
    return np.array(lrs)


def _random_features(rng, batch, dim):
    return {"cls4": jnp.asarray(rng.normal(size=(batch, 4, dim)), jnp.float32),
            "patch_mean": jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)}


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)  # train steps donate their state


# ---------------------------------------------------------------- features


def test_feature_layout_matches_reference_construction():
    batch, regs, patches, dim = 2, 2, 3, 3
    # Five blocks so that "the last 4" is a real choice; every token distinct; registers huge so that
    # averaging them in would show.
    blocks = []
    for k in range(5):
        tokens = np.arange(batch * (1 + regs + patches) * dim, dtype=np.float32).reshape(batch, -1, dim)
        tokens = tokens + 100.0 * k
        tokens[:, 1:1 + regs] = 1e4
        blocks.append(tokens)
    feats = linear_heads.probe_features(tuple(jnp.asarray(b) for b in blocks), regs)
    assert feats["cls4"].shape == (batch, 4, dim) and feats["patch_mean"].shape == (batch, dim)
    assert feats["cls4"].dtype == jnp.float32
    np.testing.assert_array_equal(feats["patch_mean"], blocks[-1][:, 1 + regs:].mean(axis=1))
    for n, avgpool in linear_heads.LAYOUTS:
        got = np.asarray(linear_heads.linear_input(feats, n, avgpool))
        want = _reference_linear_input(blocks, regs, n, avgpool)
        assert got.shape == (batch, (n + avgpool) * dim)
        np.testing.assert_array_equal(got, want)
    x = np.asarray(linear_heads.linear_input(feats, 4, True))  # CLS in block order: oldest of the last four first
    np.testing.assert_array_equal(x[:, :dim], blocks[1][:, 0])
    np.testing.assert_array_equal(x[:, 3 * dim:4 * dim], blocks[4][:, 0])
    with pytest.raises(ValueError, match="last 4 blocks"):
        linear_heads.probe_features(tuple(jnp.asarray(b) for b in blocks[:3]), regs)


# ---------------------------------------------------------------- the fused step


@pytest.mark.parametrize("multilabel, masked", [(False, False), (True, False), (True, True)])
def test_fused_step_equals_independent_heads(multilabel, masked):
    """The fused step against 52 numpy heads; ``masked``: multi-label rows with masked (-1) entries, which
    count in no head's loss or gradient."""
    rng = np.random.default_rng(0)
    batch, dim, classes = 8, 4, 3
    # Global batch 2560 scales the grid by 10 (lrs up to 1.0) so that every head moves visibly.
    state = linear_heads.init_state(jax.random.PRNGKey(1), dim, classes, global_batch=2560)
    heads = linear_heads.unstack_heads(_copy(state))
    ref = [[np.asarray(h[k][p], np.float64)[0] for k in ("params", "momentum") for p in ("w", "b")]
           + [float(h["lr"][0])] for h in heads]
    n_lr = len(linear_heads.LR_GRID)
    for factor in (1.0, 0.7, 0.3):  # three steps, so momentum buffers carry over
        feats = _random_features(rng, batch, dim)
        labels = (rng.random((batch, classes)) < 0.4).astype(np.float32) if multilabel else \
            rng.integers(0, classes, batch)
        weights = None
        if masked:
            labels[rng.random((batch, classes)) < 0.3] = -1
            labels[0] = -1  # a row with every entry masked still counts in the batch mean
            labels, weights = linear_heads.multilabel_targets(labels)
            assert weights.min() == 0 and weights[1:].max() == 1
        device_w = None if weights is None else jnp.asarray(weights)
        state, losses = linear_heads.train_step(state, feats, jnp.asarray(labels), factor, device_w,
                                                multilabel=multilabel)
        heads, seq_losses = linear_heads.sequential_train_step(heads, feats, jnp.asarray(labels), factor, device_w,
                                                               multilabel=multilabel)
        ref_losses = []
        for i, (w, b, m_w, m_b, lr) in enumerate(ref):
            n, avgpool = linear_heads.LAYOUTS[i // n_lr]
            x = np.asarray(linear_heads.linear_input(feats, n, avgpool), np.float64)
            w, b, m_w, m_b, loss = _numpy_head_step(w, b, m_w, m_b, x, labels, lr * factor, multilabel, weights)
            ref[i] = [w, b, m_w, m_b, lr]
            ref_losses.append(loss)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-6)
        np.testing.assert_allclose(seq_losses, ref_losses, atol=1e-6)
    fused = linear_heads.unstack_heads(state)
    moved = worst = 0.0
    for i, (w, b, m_w, m_b, _) in enumerate(ref):
        # The whole state of every head (weights, biases and both momentum buffers), fused and one by one.
        for got, want in [(h[part][p], ref_value) for h in (fused[i], heads[i])
                          for part, p, ref_value in (("params", "w", w), ("params", "b", b),
                                                     ("momentum", "w", m_w), ("momentum", "b", m_b))]:
            worst = max(worst, np.max(np.abs(np.asarray(got[0], np.float64) - want)))
            assert worst <= 1e-6
        moved = max(moved, np.max(np.abs(b)))
    assert moved > 0.05  # the comparison is not between nearly untouched heads
    assert int(state.step) == 3


def test_masked_multilabel_loss_by_hand():
    """BCE of the labelled entries only, summed over findings, divided by the batch's rows: written out for
    two rows and three findings (one uncertain-and-ignored, one blank)."""
    logits = np.array([[[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]]])  # (1 head, 2 rows, 3 findings)
    rows = np.array([[1, -1, 0], [0, 1, -1]])
    targets, weights = linear_heads.multilabel_targets(rows)
    np.testing.assert_array_equal(targets, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(weights, [[1, 0, 1], [1, 1, 0]])

    def bce(z, y):  # -[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]
        p = 1.0 / (1.0 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    by_hand = (bce(2.0, 1) + bce(0.5, 0) + bce(0.0, 0) + bce(3.0, 1)) / 2
    got = linear_heads._head_losses(jnp.asarray(logits), jnp.asarray(targets), True, jnp.asarray(weights))
    np.testing.assert_allclose(np.asarray(got), [by_hand], rtol=1e-6)
    unmasked = linear_heads._head_losses(jnp.asarray(logits), jnp.asarray(targets), True)
    # Unmasked, the two entries would add their BCE against target 0.
    np.testing.assert_allclose(np.asarray(unmasked), [by_hand + (bce(-1.0, 0) + bce(-2.0, 0)) / 2], rtol=1e-6)


def test_summed_loss_gives_each_head_its_own_gradient():
    rng = np.random.default_rng(3)
    state = linear_heads.init_state(jax.random.PRNGKey(0), 4, 3, global_batch=256)
    feats = _random_features(rng, 8, 4)
    labels = jnp.asarray(rng.integers(0, 3, 8))
    x = linear_heads.linear_input(feats, 4, True)

    def total(params):  # what the fused step differentiates
        return sum(linear_heads._head_losses(linear_heads._logits(params[linear_heads.layout_key(n, a)], linear_heads.linear_input(feats, n, a)),
                                   labels, False).sum() for n, a in linear_heads.LAYOUTS)

    grads = jax.jit(jax.grad(total))(state.params)[linear_heads.layout_key(4, True)]
    own_grad = jax.jit(jax.grad(lambda p: linear_heads._head_losses(linear_heads._logits(p, x), labels, False).sum()))
    for i in (0, 6, 12):
        own = own_grad(jax.tree.map(lambda t: t[i:i + 1], state.params[linear_heads.layout_key(4, True)]))
        np.testing.assert_allclose(grads["w"][i], own["w"][0], atol=1e-7)
        np.testing.assert_allclose(grads["b"][i], own["b"][0], atol=1e-7)


def test_lr_scaling_and_cosine_schedule():
    np.testing.assert_allclose(linear_heads.scale_learning_rates(linear_heads.LR_GRID, 128), np.array(linear_heads.LR_GRID) / 2)
    state = linear_heads.init_state(jax.random.PRNGKey(0), 4, 3, global_batch=1024)
    np.testing.assert_allclose(state.lrs, np.array(linear_heads.LR_GRID) * 4, rtol=1e-6)
    total = 20
    factors = np.array([linear_heads.cosine_factor(s, total) for s in range(total + 1)])
    np.testing.assert_allclose(factors, _torch_cosine_lrs(1.0, total, total + 1), atol=1e-12)
    assert factors[0] == 1.0 and abs(factors[total]) < 1e-15 and linear_heads.cosine_factor(total + 5, total) == 0.0
    # One step from zero momentum moves the bias by exactly -grid_lr * batch/256 * factor * grad.
    feats = _random_features(np.random.default_rng(0), 8, 4)
    labels = jnp.array([0, 1, 2, 0, 1, 2, 0, 1])
    before = _copy(state)
    after, _ = linear_heads.train_step(state, feats, labels, linear_heads.cosine_factor(7, total))
    key = linear_heads.layout_key(1, False)
    step = np.asarray(after.params[key]["b"] - before.params[key]["b"], np.float64)
    grad = np.asarray(after.momentum[key]["b"], np.float64)
    expected = -np.array(linear_heads.LR_GRID)[:, None] * 4 * linear_heads.cosine_factor(7, total) * grad
    np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-9)


def test_init_statistics():
    dim, classes = 64, 16
    state = linear_heads.init_state(jax.random.PRNGKey(0), dim, classes, global_batch=256)
    for n, avgpool in linear_heads.LAYOUTS:
        p = state.params[linear_heads.layout_key(n, avgpool)]
        assert p["w"].shape == (13, (n + avgpool) * dim, classes) and p["b"].shape == (13, classes)
        w = np.asarray(p["w"])
        assert abs(w.std() - 0.01) < 0.0005 and abs(w.mean()) < 0.0005
        assert not np.allclose(w[0], w[1])  # heads start from different draws
        assert not np.asarray(p["b"]).any()
    assert not any(np.asarray(t).any() for t in jax.tree.leaves(state.momentum))


def test_separable_data_reaches_full_train_accuracy():
    rng = np.random.default_rng(0)
    n, dim, classes, steps = 96, 8, 4, 300
    labels = rng.integers(0, classes, n)
    centres = 3.0 * rng.normal(size=(classes, 5, dim))
    tokens = centres[labels] + 0.3 * rng.normal(size=(n, 5, dim))
    feats = {"cls4": jnp.asarray(tokens[:, :4], jnp.float32), "patch_mean": jnp.asarray(tokens[:, 4], jnp.float32)}
    state = linear_heads.init_state(jax.random.PRNGKey(0), dim, classes, global_batch=n)
    labels_j = jnp.asarray(labels)
    for s in range(steps):
        state, losses = linear_heads.train_step(state, feats, labels_j, linear_heads.cosine_factor(s, steps))
    losses = np.asarray(losses).reshape(4, 13)
    assert (np.diff(losses[:, :10], axis=1) < 0).all()  # each head learned at its own rate
    acc = (np.asarray(linear_heads.evaluate(state, feats)).argmax(-1) == labels[None]).mean(axis=1)
    names = linear_heads.head_names()
    mid = [i for i, name in enumerate(names) if 1e-3 <= linear_heads.LR_GRID[i % 13] <= 1e-1]
    assert all(acc[i] == 1.0 for i in mid), {names[i]: acc[i] for i in mid}


def test_head_names_and_order():
    names = linear_heads.head_names()
    assert len(names) == 52 == len(set(names))
    assert names[0] == "blocks1_avgpoolFalse_lr1e-05" and names[12] == "blocks1_avgpoolFalse_lr0.1"
    assert names[13] == "blocks1_avgpoolTrue_lr1e-05" and names[26] == "blocks4_avgpoolFalse_lr1e-05"
    assert names[-1] == "blocks4_avgpoolTrue_lr0.1" and names[9] == "blocks1_avgpoolFalse_lr0.01"
    # evaluate() and the unstacked heads follow the same order.
    state = linear_heads.init_state(jax.random.PRNGKey(0), 4, 3, global_batch=256)
    key = linear_heads.layout_key(4, False)
    state = state.replace(params={**state.params, key: {**state.params[key],
                                                        "b": state.params[key]["b"].at[5, 1].set(50.0)}})
    logits = np.asarray(linear_heads.evaluate(state, _random_features(np.random.default_rng(0), 8, 4)))
    assert logits.shape == (52, 8, 3)
    marked = names.index("blocks4_avgpoolFalse_lr0.0005")
    assert (logits[:, :, 1] > 25).all(axis=1).nonzero()[0].tolist() == [marked]
    heads = linear_heads.unstack_heads(state)
    assert float(heads[marked]["params"]["b"][0, 1]) == 50.0
    back = linear_heads.stack_heads(heads, state.step)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
