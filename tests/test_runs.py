"""Opening a pretraining run (``medjax.runs``): a committed run written by an earlier layout of medjax loads,
trusting its saved config; the backbone, record and random init are the ones that run's code gave; mistakes
are one sentence.

``fixtures/smoke_run`` is ``configs/dinov2_reg.py:smoke`` stopped at step 2 (checkpoint with optimizer
state, Grain iterator and config), written before the job subpackages existed. The hashes below were computed
by that code (its ``load_run`` teacher, the saved student, and ``init_params(PRNGKey(7))["backbone"]``).
"""

import os
import shutil

import numpy as np
import pytest

from medjax import runs
from medjax.checkpoint import content_hash

RUN = os.path.join(os.path.dirname(__file__), "fixtures", "smoke_run")
TEACHER_HASH, STUDENT_HASH, RANDOM_SEED_7_HASH = "9e80c20c3bd90161", "81a3fc7ec3325e7f", "fdaedda0e77212dd"


@pytest.fixture(scope="module")
def run():
    return runs.open_run(RUN)


def test_an_earlier_run_opens_with_its_own_config(run):
    assert (run.step, run.steps, run.latest, run.objective, run.which) == (2, (2,), True, "pretrain", "teacher")
    assert run.path == os.path.join(os.path.abspath(RUN), "checkpoints", "2")
    assert run.config.model.embed_dim == 32 and run.config.model.patch_size == 7
    assert run.config.crops.global_size == 28 and run.backbone.img_size == 28
    assert run.backbone.num_register_tokens == 4 and run.spatial_dims == 2
    assert run.normalisation == ((0.449,), (0.226,))
    assert isinstance(run.config.crops.global_scale, tuple)  # JSON lists come back as the recipe's tuples


def test_backbone_record_and_random_init_are_that_runs(run):
    assert run.content_hash == content_hash(run.params) == TEACHER_HASH
    assert run.record() == {"path": run.path, "step": 2, "latest": True, "latest_step": 2,
                            "content_hash": TEACHER_HASH}
    assert content_hash(runs.open_run(RUN, which="student").params) == STUDENT_HASH
    assert content_hash(run.random_params(7)) == RANDOM_SEED_7_HASH
    out = run.backbone.apply({"params": run.params}, np.zeros((1, 28, 28, 1), np.float32))
    assert out["x_norm_patchtokens"].shape == (1, 16, 32)


def test_model_overrides_reach_the_backbone():
    assert runs.open_run(RUN, drop_path_rate=0.25).backbone.drop_path_rate == 0.25


def test_mistakes_are_one_sentence(tmp_path):
    cases = [
        (lambda: runs.open_run(str(tmp_path), key="config.probe.checkpoint_dir"),
         "No checkpoints in .*point config.probe.checkpoint_dir at the --workdir"),
        (lambda: runs.open_run(RUN, 5), "has no checkpoint at step 5; it has steps 2"),
        (lambda: runs.open_run(RUN, which="ema"), "has no 'ema' backbone; choose one of teacher, student"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as exc:
            call()
        assert "\n" not in str(exc.value)


def test_a_run_of_an_unknown_objective_is_refused(tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(RUN, copy)
    meta = copy / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"mode": "pretrain"', '"mode": "finetune"'))
    with pytest.raises(ValueError, match="config.mode='finetune', which holds no backbone"):
        runs.open_run(str(copy))
