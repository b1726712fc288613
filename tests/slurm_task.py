"""One task of a faked two-task SLURM step (``tests/test_slurm.py`` starts two).

    python -m tests.slurm_task OUT.json   (from the repository root, with SLURM_* variables set)

It sets up the run exactly as ``medjax.main`` does (``initialize_from_environment`` with the
default ``config.distributed``: no coordinator address), then checks that the two processes
really form one JAX run: a value gathered from every process, and ``sharding.barrier``.
"""

import json
import sys

import numpy as np

from medjax import distributed
from tests.helpers import smoke_config


def main(out_path):
    how = distributed.initialize_from_environment(smoke_config().distributed)
    import jax
    from jax.experimental import multihost_utils

    from medjax import sharding

    gathered = multihost_utils.process_allgather(np.array([10 * (jax.process_index() + 1)]))
    sharding.barrier("slurm_test")
    with open(out_path, "w") as f:
        json.dump({"how": how, "process_index": jax.process_index(), "process_count": jax.process_count(),
                   "devices": jax.device_count(), "gathered": np.asarray(gathered).ravel().tolist()}, f)


if __name__ == "__main__":
    main(sys.argv[1])
