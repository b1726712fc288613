"""One run over several processes (hosts): ``jax.distributed`` set up from SLURM or from the config.

``initialize_from_environment`` must run before JAX touches a device. It picks
one of three cases:

* **explicit**: ``config.distributed.coordinator_address`` ("host:port" of
  process 0) is set; ``num_processes`` and ``process_id`` come from the config
  (``--config.distributed.process_id=...`` on each process's command line).
* **SLURM**: no address is set and the process was started by ``srun`` in a
  step of more than one task; JAX reads the coordinator (first node of the
  step, a port derived from the job id, or ``JAX_COORDINATOR_PORT``), the
  process count and id from SLURM's variables, and each task uses the GPU
  numbered by its ``SLURM_LOCALID`` (one task per GPU, see ``launch/``).
* **single process**: anything else; nothing to do.

Every process then sees every device of the run. Each process reads its own
share of the data (Grain shards by ``jax.process_index()``), only process 0
writes logs and plots, and checkpoints are written by all processes together.
CPU-only multi-process runs (tests, debugging) use Gloo collectives, JAX's
default on CPU.

A coordinator that cannot be reached within
``config.distributed.initialization_timeout`` seconds ends in one sentence
naming the address (JAX itself would abort the process with a C++ trace).
"""

from __future__ import annotations

import os
import socket
import time


class DistributedSetupError(RuntimeError):
    """The processes of a multi-process run could not be connected."""


def check_distributed_config(d) -> None:
    """Raises ValueError with one sentence for an inconsistent ``config.distributed``."""
    if d.num_processes < 1:
        raise ValueError(f"config.distributed.num_processes={d.num_processes} must be 1 or more.")
    if not 0 <= d.process_id < d.num_processes:
        raise ValueError(
            f"config.distributed.process_id={d.process_id} must lie in [0, {d.num_processes}) "
            f"for config.distributed.num_processes={d.num_processes}."
        )
    if d.initialization_timeout <= 0:
        raise ValueError(
            f"config.distributed.initialization_timeout={d.initialization_timeout} must be a positive "
            "number of seconds."
        )
    if d.coordinator_address:
        _split_address(d.coordinator_address)
    elif d.num_processes > 1:
        raise ValueError(
            f"config.distributed.num_processes={d.num_processes} needs config.distributed.coordinator_address "
            "(host:port of process 0), or start the processes with srun under SLURM."
        )


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"config.distributed.coordinator_address={address!r} is not host:port (e.g. node001:12355)."
        )
    return host.strip("[]"), int(port)


def slurm_tasks(environ=os.environ) -> int:
    """Number of tasks of the SLURM step this process was started in by srun (0 outside srun).

    Only srun sets the step variables: a batch script's own process (SLURM_NTASKS = the whole
    allocation's tasks) is a single process, not one of many."""
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(environ.get(k) for k in needed):
        return 0
    return int(environ["SLURM_STEP_NUM_TASKS"])


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Returns once something listens at ``address``; DistributedSetupError after ``timeout`` seconds."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(timeout, 0.1))):
                return
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        if time.monotonic() >= deadline:
            raise DistributedSetupError(
                f"The coordinator {address} (process 0) was not reachable within {timeout:g} s ({reason}); "
                "start process 0 first, check the host name and port, or raise "
                "config.distributed.initialization_timeout."
            )
        time.sleep(0.25)


def _check_port_free(address: str) -> None:
    _, port = _split_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise DistributedSetupError(
                f"Process 0 cannot serve the coordinator at {address}: port {port} is unavailable on this "
                f"host ({e.strerror}); choose another port in config.distributed.coordinator_address."
            ) from None


def initialize_from_environment(d, environ=os.environ) -> str:
    """Starts ``jax.distributed`` if this is one process of several; returns which case applied.

    ``d`` is ``config.distributed`` (or None: SLURM detection only). Returns
    "explicit", "slurm" or "single".
    """
    timeout = 300 if d is None else d.initialization_timeout
    if d is not None:
        check_distributed_config(d)
    explicit = d is not None and bool(d.coordinator_address) and d.num_processes > 1
    n_slurm = slurm_tasks(environ)
    if not explicit and n_slurm <= 1:
        return "single"

    import jax

    if explicit:
        if d.process_id == 0:
            _check_port_free(d.coordinator_address)
        else:
            wait_for_coordinator(d.coordinator_address, timeout)
        jax.distributed.initialize(
            coordinator_address=d.coordinator_address,
            num_processes=d.num_processes,
            process_id=d.process_id,
            initialization_timeout=max(1, round(timeout)),
        )
        return "explicit"
    jax.distributed.initialize(initialization_timeout=max(1, round(timeout)))
    return "slurm"
