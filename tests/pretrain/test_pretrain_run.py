"""End-to-end pretraining through the real command line, on the ``:smoke`` config.

One straight 6-step run and one 3 + 3 run (a process exit in between) are made
once per session; the tests read their workdirs.
"""

import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from medjax.reporting import read_metrics
from tests.helpers import medjax


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    proc = medjax(workdir)
    return workdir, proc


@pytest.fixture(scope="session")
def interrupted_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("interrupted")
    first = medjax(workdir, "--config.train.stop_at_step=3")
    half = tmp_path_factory.mktemp("half")
    shutil.copytree(workdir, half, dirs_exist_ok=True)  # kept for the NaN test
    second = medjax(workdir)
    return workdir, half, first, second


def restore_state(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path)


def test_run_leaves_checkpoints_logs_and_plots(straight_run):
    workdir, proc = straight_run
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    events = os.listdir(workdir / "tensorboard")
    assert any(name.startswith("events.out.tfevents") for name in events)
    png = workdir / "training_overview.png"
    assert png.stat().st_size > 20_000  # a real figure, not an empty canvas
    rows = read_metrics(workdir / "metrics.jsonl")
    assert rows[-1]["step"] == 6
    for key in ("loss", "dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss", "lr", "weight_decay",
                "teacher_momentum", "teacher_temp", "teacher_entropy", "grad_norm"):
        assert np.isfinite(rows[-1][key]), key
    total = sum(rows[-1][k] for k in ("dino_global_loss", "dino_local_loss", "ibot_loss", "koleo_loss"))
    assert rows[-1]["loss"] == pytest.approx(total, rel=1e-5)
    assert "built-in demo dataset" in proc.stdout
    assert "Pretraining finished" in proc.stdout


def test_teacher_neither_uniform_nor_one_hot(straight_run):
    workdir, _ = straight_run
    last = read_metrics(workdir / "metrics.jsonl")[-1]
    log_k = last["log_prototypes"]
    assert 0.05 * log_k < last["teacher_entropy"] < 0.98 * log_k
    assert 0.05 * log_k < last["teacher_batch_entropy"] <= log_k + 1e-5


def test_resume_gives_the_same_batches_and_params(straight_run, interrupted_run):
    straight, _ = straight_run
    resumed, _, first, second = interrupted_run
    assert "Resumed from step 3" in second.stdout
    a = {r["step"]: r for r in read_metrics(straight / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(resumed / "metrics.jsonl")}
    assert set(a) == set(b)
    for step in a:  # the losses depend on the batches: equal losses, equal batches
        assert a[step]["loss"] == b[step]["loss"], step
    sa, sb = restore_state(straight, 6), restore_state(resumed, 6)
    flat_a, flat_b = _flatten(sa), _flatten(sb)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
    iterator_state = "checkpoints/6/data/process_0-of-1.json"
    assert (straight / iterator_state).read_text() == (resumed / iterator_state).read_text()


def _flatten(tree, prefix=""):
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
    else:
        out[prefix] = np.asarray(tree)
    return out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(interrupted_run, tmp_path):
    _, half, _, _ = interrupted_run
    workdir = tmp_path / "nan"
    shutil.copytree(half, workdir)
    proc = medjax(workdir, "--config.optim.base_lr=inf", "--config.allow_config_change=True", check=False)
    assert proc.returncode == 2
    message = proc.stderr.strip().splitlines()[-1]
    assert "Non-finite loss or parameters at step 3" in message, message
    assert "loss=" in message
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    good = _flatten(restore_state(workdir, 3))
    assert all(np.all(np.isfinite(v)) for v in good.values() if v.dtype.kind == "f")


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--config.train.no_such_key=3",), "--config.train.no_such_key names no key of the config"),
        (("--config.train.log_every=abc",), "--config.train.log_every"),
        (("--config.model.dtype=float16",), "config.model.dtype='float16' is not valid"),
        (("--config.crops.n_global=3",), "config.crops.n_global=3"),
        (("--config.train.batch_size_per_device=0",), "config.train.batch_size_per_device=0 must be a positive"),
    ],
)
def test_bad_config_values_give_one_sentence(tmp_path, args, expected):
    proc = medjax(tmp_path / "w", *args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("medjax: error:"), proc.stderr
    assert expected in lines[-1]
    assert "Traceback" not in proc.stderr


def test_unknown_variant_and_missing_config_file(tmp_path):
    proc = medjax(tmp_path / "w", config="--config=configs/dinov2_reg.py:huge", check=False)
    assert proc.returncode == 2
    assert "Unknown variant 'huge'" in proc.stderr and "Traceback" not in proc.stderr
    proc = medjax(tmp_path / "w", config="--config=configs/no_such_file.py", check=False)
    assert proc.returncode == 2
    assert "Cannot load the --config file" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = medjax(blocker / "run", check=False)
    assert proc.returncode == 2
    assert "Cannot create --workdir" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_of_another_model_is_refused(straight_run, tmp_path):
    straight, _ = straight_run
    workdir = tmp_path / "other"
    shutil.copytree(straight, workdir)
    proc = medjax(workdir, "--config.model.embed_dim=48", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "was written by a different model" in last and "fresh --workdir" in last
