"""Device mesh and how arrays are laid out on it.

The mesh has a ``data`` and an ``fsdp`` axis (sizes from ``config.mesh``, -1 =
all remaining devices). Where arrays go is declared as data, in
``LOGICAL_RULES``, mapping logical axes to mesh axes:

* ``batch``: the leading dimension of every batch entry is split over *both*
  mesh axes, i.e. over every device. This is standard FSDP: the devices of the
  ``fsdp`` axis are data-parallel too; they additionally split the parameters.
* ``fsdp``: one dimension of each large parameter (and of its optimizer
  moments, the teacher's copy and the centres: every leaf of the train state)
  is split over the ``fsdp`` axis: the largest dimension divisible by the axis
  size, for leaves with at least ``min_size`` elements. Smaller leaves, and all
  leaves when the axis has size 1, are replicated.

The step is jitted with these shardings as its in/out shardings and XLA inserts
the all-gathers (parameters before use) and reduce-scatters (gradients); model
code never names devices. Every reduction in the loss (DINO centre, Sinkhorn-
Knopp, means) runs over the *global* arrays, so it sees the global batch
whatever the mesh.

Host batches become global arrays with ``jax.make_array_from_process_local_data``
so the same code runs on one or many processes; the mesh lists devices process
by process, so each process's rows are one contiguous block of the global batch.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Change the layout here, not in model or trainer code.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("fsdp", "fsdp"),
)


def logical_spec(*logical_axes: str | None) -> P:
    """PartitionSpec for an array whose dimensions have these logical names (None = not split)."""
    rules = dict(LOGICAL_RULES)
    unknown = [a for a in logical_axes if a is not None and a not in rules]
    if unknown:
        raise ValueError(f"Unknown logical axis {unknown[0]!r}; known: {', '.join(rules)}.")
    return P(*(rules[a] if a is not None else None for a in logical_axes))


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """Mesh of shape (data, fsdp) over ``devices`` (default: all devices, ordered process by process)."""
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    n = len(devices)
    sizes = [data, fsdp]
    for name, size in zip(BATCH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"config.mesh.{name}={size} must be a positive number or -1 (all remaining devices).")
    if sizes.count(-1) > 1:
        raise ValueError("Only one of config.mesh.data and config.mesh.fsdp may be -1 (all remaining devices).")
    known = int(np.prod([s for s in sizes if s != -1]))
    if n % known:
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


def check_mesh_config(m) -> None:
    """``config.mesh`` of a trainer: one sentence naming the first bad value."""
    for axis in ("data", "fsdp"):
        if m[axis] == 0 or m[axis] < -1:
            raise ValueError(f"config.mesh.{axis}={m[axis]} must be a positive number or -1 (all remaining devices).")
    if m.data == -1 and m.fsdp == -1:
        raise ValueError("Only one of config.mesh.data and config.mesh.fsdp may be -1 (all remaining devices).")
    if m.fsdp_min_size < 0:
        raise ValueError(f"config.mesh.fsdp_min_size={m.fsdp_min_size} must be 0 or more.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, logical_spec("batch"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """The FSDP rule for one leaf: its largest dimension divisible by ``fsdp_size`` goes on ``fsdp``."""
    if fsdp_size <= 1 or math.prod(shape) < max(min_size, 1):
        return P()
    candidates = [i for i, d in enumerate(shape) if d >= fsdp_size and d % fsdp_size == 0]
    if not candidates:
        return P()
    dim = max(candidates, key=lambda i: (shape[i], i))  # ties: the later (output) dimension
    return logical_spec(*("fsdp" if i == dim else None for i in range(len(shape))))


def param_shardings(tree, mesh: Mesh, min_size: int = 2**14):
    """NamedShardings for every leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``) by the FSDP rule."""
    size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), size, min_size)), tree)


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "batch") -> None:
    if global_batch % mesh.size:
        raise ValueError(
            f"The global {what} of {global_batch} does not split over the {mesh.size} devices of the mesh; "
            "choose a batch size that is a multiple of the device count."
        )


def to_global(host_batch: dict, shardings: dict) -> dict:
    """Host numpy arrays (this process's rows) -> global jax arrays with the given per-key shardings."""
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in host_batch.items()
    }


def barrier(name: str) -> None:
    """Waits until every process reaches this point (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
