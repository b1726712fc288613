"""MAE pretraining end to end through the command line on ``configs/mae.py:smoke``: outputs, exact resume,
the run opened as a backbone like a DINOv2 run, and a workdir of the other objective refused."""

import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax import runs
from medjax.reporting import read_metrics
from tests.helpers import medjax

MAE_SMOKE = "--config=configs/mae.py:smoke"


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mae_straight")
    return workdir, medjax(workdir, config=MAE_SMOKE)


def test_run_leaves_checkpoints_logs_plots_and_reconstructions(mae_run):
    workdir, proc = mae_run
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert set(os.listdir(workdir / "checkpoints" / "6")) >= {"state", "data", "meta"}
    rows = read_metrics(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert rows[0]["lr"] == 0.0 and rows[-1]["lr"] > 0  # official warm-up starts at 0
    for name in ("training_overview.png", "reconstructions.png"):
        assert (workdir / name).stat().st_size > 5000
    assert os.listdir(workdir / "tensorboard")
    assert "MAE pretraining finished at step 6" in proc.stdout and "sees 4 of 16 patches" in proc.stdout


def test_resume_gives_the_same_params(mae_run, tmp_path):
    workdir, _ = mae_run
    medjax(tmp_path, "--config.train.stop_at_step=3", config=MAE_SMOKE)
    medjax(tmp_path, config=MAE_SMOKE)
    with ocp.StandardCheckpointer() as c:
        a = c.restore(str(workdir / "checkpoints" / "6" / "state"))["params"]
        b = c.restore(str(tmp_path / "checkpoints" / "6" / "state"))["params"]
    flat_a, flat_b = (sorted(ocp.tree.to_flat_dict(t).items()) for t in (a, b))
    for (ka, va), (kb, vb) in zip(flat_a, flat_b, strict=True):
        assert ka == kb
        np.testing.assert_array_equal(va, vb)


def test_an_mae_run_opens_as_a_backbone(mae_run):
    workdir, _ = mae_run
    run = runs.open_run(str(workdir))
    assert (run.objective, run.which, run.step, run.spatial_dims) == ("mae", "encoder", 6, 2)
    assert run.backbone.embed_dim == 32 and run.backbone.init_values is None
    out = run.backbone.apply({"params": run.params}, np.zeros((2, 28, 28, 1), np.float32), n_last_blocks=2)
    assert out["x_norm_clstoken"].shape == (2, 32) and len(out["last_blocks_norm"]) == 2
    random = run.random_params(0)
    assert set(random) == set(run.params) and run.content_hash != runs.open_run(str(workdir), 3).content_hash


def test_a_workdir_of_the_other_objective_is_refused(mae_run, tmp_path):
    workdir, _ = mae_run
    copy = tmp_path / "w"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    proc = medjax(copy, check=False)  # the DINOv2 smoke config in an MAE run's workdir
    assert proc.returncode == 2
    assert "config.mode='mae'" in proc.stderr and "fresh --workdir" in proc.stderr
    assert "Traceback" not in proc.stderr
