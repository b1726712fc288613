"""The SLURM path of ``medjax.distributed``: two local processes started with the variables srun sets.

No SLURM is needed: each process gets the environment of one task of a two-task step on one node
(``SLURM_STEP_NODELIST=localhost``); JAX then derives the coordinator from the first node and a port
from the job id, as it does on a cluster.
"""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _job_id_with_free_port() -> int:
    """A job id whose coordinator port (JAX: 61440 + job id mod 4096) is free now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    if port < 61440:  # outside JAX's range for SLURM: take the first free one inside it
        for port in range(61440, 65536):
            with socket.socket() as s:
                if s.connect_ex(("localhost", port)) != 0:
                    break
    return 4096 * 7 + (port - 61440)


def test_two_srun_tasks_form_one_run(tmp_path):
    job = _job_id_with_free_port()
    procs = []
    for task in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "SLURM_JOB_ID": str(job),
               "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2",
               "SLURM_STEP_NUM_NODES": "1", "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.slurm_task", str(tmp_path / f"task{task}.json")],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    results = [json.loads((tmp_path / f"task{t}.json").read_text()) for t in range(2)]
    for task, r in enumerate(results):
        assert r["how"] == "slurm"
        assert (r["process_index"], r["process_count"], r["devices"]) == (task, 2, 2)
        assert r["gathered"] == [10, 20]  # each process sees the other's value
