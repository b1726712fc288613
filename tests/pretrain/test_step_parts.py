"""The step's per-part FLOP count (medjax.bench.step_parts) and memory figures (medjax.bench.step)."""

import jax
import pytest

from medjax.bench.step import dinov2_step, step_flops, step_memory_mib
from medjax.bench.step_parts import hlo_parts, part_of
from tests.helpers import smoke_config


@pytest.fixture(scope="module")
def compiled_smoke_step(tmp_path_factory):
    config = smoke_config()
    jitted, state, batch, inputs, _ = dinov2_step(config, str(tmp_path_factory.mktemp("step_parts")))
    return config, jitted.lower(state, batch, *inputs).compile(), state, batch


def vit_forward_matmul_flops(images: int, tokens: int, patches: int, dim: int, depth: int, patch: int,
                             chans: int, mlp_ratio: int = 4) -> int:
    """Hand count: per block qkv + proj + the two MLP layers (2 N D (3D + D + 2 r D)) and attention
    (q k^T and attn v, 4 N^2 D); the patch embedding's convolution."""
    per_block = 2 * tokens * dim * (4 * dim + 2 * mlp_ratio * dim) + 4 * tokens**2 * dim
    return images * (depth * per_block + 2 * patches * dim * patch**2 * chans)


def test_teacher_forward_flops_equal_the_hand_count(compiled_smoke_step):
    config, compiled, _, _ = compiled_smoke_step
    flops, source = hlo_parts(compiled.as_text())
    m, c = config.model, config.crops
    grid = (c.global_size // m.patch_size) ** 2
    want = vit_forward_matmul_flops(images=c.n_global * config.train.batch_size_per_device,
                                    tokens=1 + m.num_register_tokens + grid, patches=grid, dim=m.embed_dim,
                                    depth=m.depth, patch=m.patch_size, chans=m.in_chans)
    assert flops["teacher_backbone"] == want
    # every named part of the step is found, and its matmuls are no more than XLA's count of everything
    assert {"student_global", "student_local", "student_heads", "teacher_heads", "student_global (backward)"} <= set(flops)
    assert {"optimizer", "teacher_ema", "losses"} <= {part_of(op_name) for _, op_name in source.values()}
    assert sum(flops.values()) <= step_flops(compiled)


def test_part_names_follow_the_scopes():
    assert part_of("jit(train_step)/jvp(student_local)/VisionTransformer/blocks_0/mlp/fc1/dot_general") == "student_local"
    assert part_of("jit(train_step)/transpose(jvp(student_heads))/DINOHead/mlp_1/dot_general") == \
        "student_heads (backward)"
    assert part_of("jit(train_step)/add") == "other"


def test_memory_figures_count_the_state_and_batch(compiled_smoke_step):
    _, compiled, state, batch = compiled_smoke_step
    figures = step_memory_mib(compiled)
    leaves = jax.tree.leaves((state, batch)) + [jax.random.PRNGKey(1)]
    assert figures["state_and_batch_mib"] == pytest.approx(sum(x.nbytes for x in leaves) / 2**20, rel=0.01)
    assert figures["temporaries_mib"] > 0
    assert figures["aliased_mib"] > 0.9 * jax.tree.reduce(lambda a, x: a + x.nbytes, state, 0) / 2**20  # donated
