"""Device mesh and how arrays are laid out on it.

The mesh has a ``data`` and an ``fsdp`` axis (sizes from the config, -1 = all
remaining devices). Batches are split over both axes along their leading
dimension; parameters are replicated (FSDP parameter sharding arrives with the
scale work). Host batches become global arrays with
``jax.make_array_from_process_local_data`` so the same code runs on one or many
processes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError("Only one of config.mesh.data and config.mesh.fsdp may be -1 (all remaining devices).")
    known = int(np.prod([s for s in sizes if s != -1]))
    if known <= 0 or n % known:
        raise ValueError(
            f"The mesh data={data} x fsdp={fsdp} does not divide the {n} available devices; "
            "choose sizes whose product divides the device count (or -1 for the rest)."
        )
    sizes = [n // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"The mesh data={sizes[0]} x fsdp={sizes[1]} uses {int(np.prod(sizes))} devices but "
            f"{n} are available; make the product equal the device count."
        )
    return Mesh(np.asarray(devices).reshape(sizes), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "batch") -> None:
    if global_batch % mesh.size:
        raise ValueError(
            f"The global {what} of {global_batch} does not split over the {mesh.size} devices of the mesh; "
            "choose a batch size that is a multiple of the device count."
        )


def to_global(host_batch: dict, shardings: dict) -> dict:
    """Host numpy arrays -> global jax arrays with the given per-key shardings."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in host_batch.items()
    }
