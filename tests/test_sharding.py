"""Sharding, FSDP and multiple processes.

The slow parts run once per module, side by side (the two CPU cores are used
together): ``tests/sharding_meshes.py`` (8 simulated CPU devices: data-only,
FSDP-only and mixed meshes against one device) and a two-process pretraining
run through the command line (``localhost`` coordinator, Gloo collectives, one
CPU device per process, parameters split over the two processes), followed by
its one-process reference ``tests/sharding_two_process.py``.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from medjax import distributed, sharding
from medjax.pretrain.batches import global_mask_indices
from tests.sharding_two_process import OVERRIDES, merge
from tests.helpers import smoke_config

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Faster CPU compilation for the subprocesses (every run compared uses the same flags).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env():
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), FAST_COMPILE) if f)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONPATH": REPO}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(args, log):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc, log, what, timeout=600):
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.seek(0)
    out = log.read()
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    workdir = tmp / "two_process"
    logs = {name: open(tmp / f"{name}.log", "w+") for name in ("meshes", "p0", "p1", "reference")}
    t0 = time.perf_counter()
    started = []
    try:
        meshes = _start(["-m", "tests.sharding_meshes", str(tmp / "meshes.json")], logs["meshes"])
        started.append(meshes)
        port = _free_port()
        cli = ["-m", "medjax.main", "--config=configs/dinov2_reg.py:smoke", f"--workdir={workdir}",
               *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
               f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
               "--config.distributed.initialization_timeout=120"]
        procs = [_start([*cli, f"--config.distributed.process_id={i}"], logs[f"p{i}"]) for i in range(2)]
        started += procs
        outs = {f"p{i}": _finish(p, logs[f"p{i}"], f"process {i} of the two-process run")
                for i, p in enumerate(procs)}
        reference = _start(["-m", "tests.sharding_two_process", str(workdir), str(tmp / "two_process.json")],
                           logs["reference"])
        started.append(reference)
        _finish(reference, logs["reference"], "the one-process reference")
        _finish(meshes, logs["meshes"], "tests/sharding_meshes.py")
    finally:
        for proc in started:  # after a failure: nothing left waiting for a partner
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs.values():
            log.close()
    print(f"sharding subprocesses: {time.perf_counter() - t0:.1f} s")
    return {
        "meshes": json.loads((tmp / "meshes.json").read_text()),
        "two_process": json.loads((tmp / "two_process.json").read_text()),
        "workdir": workdir,
        **outs,
    }


@pytest.mark.parametrize("mesh", ["data=8 fsdp=1", "data=1 fsdp=8", "data=2 fsdp=4 sinkhorn_knopp"])
def test_meshes_match_one_device(runs, mesh):
    r = runs["meshes"]["steps"][mesh]
    for key, diff in r["metrics"].items():  # every step's losses, gradient norm, teacher entropies
        assert diff < 1e-5, (mesh, key, diff)
    # Parameters, teacher, Adam moments and centres after 3 steps. Adam divides by sqrt(v), so
    # small gradient components carry their rounding differences into the update (observed ~1.5e-5).
    assert r["state"] < 1e-4, (mesh, r["worst_leaf"], r["state"])
    fsdp = int(mesh.split("fsdp=")[1].split()[0])
    assert (r["split_leaves"] > 0) == (fsdp > 1), r  # FSDP really splits the state


def test_global_reductions_see_the_whole_batch(runs):
    functions = dict(runs["meshes"]["functions"])
    # KoLeo per device: each device's 2 images per crop are its neighbour pool (value and gradient).
    assert functions.pop("koleo_per_device_vs_global") > 0.1  # really not the whole batch's KoLeo
    for name, diff in functions.items():  # Sinkhorn-Knopp, DINO and iBOT centres, KoLeo per device
        assert diff < 1e-6, (name, diff)


def test_two_processes_match_one_process(runs):
    r = runs["two_process"]
    assert r["logged_steps"] == [1, 2, 3]
    for key, diff in r["loss_diff"].items():
        assert diff < 1e-5, (key, diff)
    # The step-3 checkpoint. Drop path runs each residual branch on a subset of the global batch, gathered
    # across the two processes' shards, so gradients are summed in another order than on one device; Adam
    # turns that rounding into relative differences of ~1e-4 in small leaves (1.007e-4 measured on a
    # LayerNorm bias, the losses within 1e-5 above).
    assert r["state_diff"] < 2e-4, (r["worst_leaf"], r["state_diff"])


def test_only_process_zero_writes_logs_and_all_write_the_checkpoint(runs):
    workdir = runs["workdir"]
    assert "Pretraining finished at step 3" in runs["p0"] and "step      3/6" in runs["p0"]
    assert "Pretraining finished" not in runs["p1"] and "step      1/6" not in runs["p1"]
    assert len(os.listdir(workdir / "tensorboard")) == 1
    assert (workdir / "training_overview.png").exists()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    data = os.listdir(workdir / "checkpoints" / "3" / "data")  # each process saved its Grain position
    assert "process_0-of-2.json" in data and "process_1-of-2.json" in data


# ---- fast checks, in this process ----


def test_fsdp_rule_splits_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((384, 1152), 4, 1024) == sharding.P(None, "fsdp")
    assert sharding.fsdp_spec((1536, 384), 4, 1024) == sharding.P("fsdp", None)
    assert sharding.fsdp_spec((6, 1000), 8, 1024) == sharding.P(None, "fsdp")
    assert sharding.fsdp_spec((3, 7, 11), 2, 1) == sharding.P()  # nothing divisible: replicated
    assert sharding.fsdp_spec((64,), 8, 1024) == sharding.P()  # small: replicated
    assert sharding.fsdp_spec((4096, 4096), 1, 0) == sharding.P()  # no fsdp axis
    assert sharding.fsdp_spec((), 8, 0) == sharding.P()
    assert sharding.logical_spec("batch", None) == sharding.P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="Unknown logical axis 'heads'"):
        sharding.logical_spec("heads")


def test_mesh_that_does_not_fit_the_devices_is_one_sentence():
    devices = list(range(8))  # stand-ins: the checks run before a Mesh is built
    with pytest.raises(ValueError, match=r"The mesh data=3 x fsdp=1 does not divide the 8 available devices"):
        sharding.make_mesh(3, 1, devices=devices)
    with pytest.raises(ValueError, match=r"The mesh data=2 x fsdp=2 uses 4 devices but 8 are available"):
        sharding.make_mesh(2, 2, devices=devices)
    with pytest.raises(ValueError, match=r"config.mesh.fsdp=0 must be a positive number or -1"):
        sharding.make_mesh(-1, 0, devices=devices)
    mesh = sharding.make_mesh()
    assert mesh.shape == {"data": len(mesh.devices.flat), "fsdp": 1}


def test_mask_indices_point_into_the_global_batch():
    rng = np.random.default_rng(0)
    n_global, n_local, images, patches = 2, 2, 3, 5
    batches = []
    for _ in range(2):  # two processes' host batches, masked independently
        masks = rng.random((n_global * images, patches)) < 0.4
        flat = np.flatnonzero(masks.reshape(-1))
        batches.append({"masks": masks, "mask_indices": flat,
                        "global_crops": rng.random((n_global * images, 1)),
                        "local_crops": rng.random((n_local * images, 1))})
    merged = merge(batches, n_global, n_local)
    moved = np.concatenate([global_mask_indices(b["mask_indices"], n_patches=patches, images=images,
                                                process_index=p, process_count=2)
                            for p, b in enumerate(batches)])
    assert sorted(moved) == list(np.flatnonzero(merged["masks"].reshape(-1)))
    # One process: the indices are unchanged.
    local = batches[0]["mask_indices"]
    np.testing.assert_array_equal(global_mask_indices(local, n_patches=patches, images=images, process_index=0,
                                                      process_count=1), local)


def test_distributed_config_and_slurm_detection():
    d = smoke_config().distributed
    assert distributed.initialize_from_environment(d, environ={}) == "single"
    d.num_processes = 2
    with pytest.raises(ValueError, match="needs config.distributed.coordinator_address"):
        distributed.check_distributed_config(d)
    d.coordinator_address, d.process_id = "node001", 2
    with pytest.raises(ValueError, match=r"process_id=2 must lie in \[0, 2\)"):
        distributed.check_distributed_config(d)
    d.process_id = 1
    with pytest.raises(ValueError, match="'node001' is not host:port"):
        distributed.check_distributed_config(d)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}
    assert distributed.slurm_tasks({**slurm, "SLURM_STEP_NUM_TASKS": "8"}) == 8
    assert distributed.slurm_tasks({**slurm, "SLURM_NTASKS": "8"}) == 0  # a batch script's process, not srun
    assert distributed.initialize_from_environment(None, {**slurm, "SLURM_STEP_NUM_TASKS": "1"}) == "single"


def test_unreachable_coordinator_is_one_sentence_naming_it():
    port = _free_port()  # nothing listens there
    d = smoke_config().distributed
    d.coordinator_address, d.num_processes, d.process_id, d.initialization_timeout = f"localhost:{port}", 2, 1, 1
    t = time.perf_counter()
    with pytest.raises(distributed.DistributedSetupError) as e:
        distributed.initialize_from_environment(d, environ={})
    assert time.perf_counter() - t < 10
    message = str(e.value)
    assert f"The coordinator localhost:{port} (process 0) was not reachable within 1 s" in message
    assert "\n" not in message
    with socket.socket() as taken:  # process 0 on a port something else holds
        taken.bind(("localhost", 0))
        taken.listen()
        d.process_id, d.coordinator_address = 0, f"localhost:{taken.getsockname()[1]}"
        with pytest.raises(distributed.DistributedSetupError, match=f"port {taken.getsockname()[1]} is unavailable"):
            distributed.initialize_from_environment(d, environ={})


def test_unreachable_coordinator_from_the_command_line(tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "medjax.main", "--config=configs/dinov2_reg.py:smoke", f"--workdir={tmp_path}",
           f"--config.distributed.coordinator_address=localhost:{port}", "--config.distributed.num_processes=2",
           "--config.distributed.process_id=1", "--config.distributed.initialization_timeout=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"medjax: error: The coordinator localhost:{port} (process 0) was not reachable"), last
    assert "Traceback" not in proc.stderr
