"""The one place that talks to orbax: train state + Grain iterator state + run metadata.

A checkpoint step directory holds three items written together:
``state`` (the train-state pytree), ``data`` (the Grain iterator position, so a
resumed run sees exactly the batches an uninterrupted one would) and ``meta``
(JSON: the config and a fingerprint of the model, checked on restore so a
checkpoint of another architecture is refused with a clear message).
"""

from __future__ import annotations

import hashlib
import json
import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir was written for a different model or run."""


def tree_fingerprint(tree) -> dict:
    """Shapes and dtypes of every leaf, keyed by path: what must match to restore."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in flat}


def host_arrays(tree):
    """Every leaf as a numpy array on every process: parameters restored or trained under a mesh may be
    sharded over devices and hosts, and an evaluation wants whole arrays it can place where it needs."""
    from jax.experimental import multihost_utils

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # parts live on other hosts
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(whole, tree)


def content_hash(tree) -> str:
    """A short hash of the parameter values: records which weights a result came from."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()[:16]


def checkpoints_dir(workdir: str) -> str:
    """Where a run keeps its checkpoints: ``workdir/checkpoints``."""
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def step_dir(workdir: str, step: int) -> str:
    """One saved step of a run: ``workdir/checkpoints/<step>``."""
    return os.path.join(checkpoints_dir(workdir), str(step))


def saved_steps(workdir: str) -> list[int]:
    """The steps saved under ``workdir/checkpoints``, sorted (none: an empty list)."""
    root = checkpoints_dir(workdir)
    return sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []


def read_saved(workdir: str, step: int) -> tuple[dict, dict]:
    """``(state, meta)`` of a saved step as host arrays, without knowing the model that wrote it."""
    path = step_dir(workdir, step)
    with open(os.path.join(path, "meta", "metadata")) as f:
        meta = json.load(f)
    with ocp.StandardCheckpointer() as reader:
        state = reader.restore(os.path.join(path, "state"))
    return host_arrays(state), meta


class Checkpointer:
    """Saves and restores (state, data iterator, meta) under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = checkpoints_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data", "meta"),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_iterator, meta: dict) -> None:
        args = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def saved_meta(self, step: int) -> dict:
        """The metadata saved with ``step`` (its run's config, model fingerprint, ...)."""
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state, data_iterator, expected_meta: dict):
        """Restores ``step`` into the shapes/shardings of ``abstract_state``; checks the model."""
        meta = self.saved_meta(step)
        check_compatible(meta, expected_meta, os.path.join(self.directory, str(step)))
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], meta

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def check_compatible(meta: dict, expected: dict, path: str) -> None:
    """A checkpoint of another job or another model (parameter shapes or dtypes): one sentence."""
    saved_mode = meta.get("config", {}).get("mode")
    wanted_mode = expected.get("config", {}).get("mode")
    if saved_mode and wanted_mode and saved_mode != wanted_mode:
        raise CheckpointMismatchError(
            f"The checkpoint {path} is of a config.mode={saved_mode!r} run, which a config.mode={wanted_mode!r} run "
            "cannot continue; start in a fresh --workdir (or rerun with the config it was trained with).")
    saved, wanted = meta.get("fingerprint", {}), expected.get("fingerprint", {})
    if saved == wanted:
        return
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    shapes = sorted(k for k in set(saved) & set(wanted) if saved[k][0] != wanted[k][0])
    dtypes = sorted(k for k in set(saved) & set(wanted) if saved[k][1] != wanted[k][1])
    detail = []
    if shapes:
        k = shapes[0]
        detail.append(f"{len(shapes)} parameters differ in shape, e.g. {k}: checkpoint {saved[k][0]} vs config {wanted[k][0]}")
    if dtypes:
        k = dtypes[0]
        detail.append(f"{len(dtypes)} parameters differ in dtype, e.g. {k}: checkpoint {saved[k][1]} vs config "
                      f"{wanted[k][1]}")
    if missing:
        detail.append(f"{len(missing)} parameters are missing from it, e.g. {missing[0]}")
    if extra:
        detail.append(f"{len(extra)} parameters are not in the configured model, e.g. {extra[0]}")
    raise CheckpointMismatchError(
        f"The checkpoint {path} was written by a different model ({'; '.join(detail)}); "
        "use the config it was trained with or start in a fresh --workdir."
    )


def dumps_config(config) -> dict:
    """The config as plain JSON (for checkpoint metadata and results)."""
    return json.loads(config.to_json_best_effort())
