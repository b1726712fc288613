"""A resumed pretraining run must continue the run its checkpoint started, not another one.

Every checkpoint's metadata holds the config the run was saved with, the global batch and a content hash
of the manifest file (``run_meta``). Before a resume restores anything, ``check`` compares them with the
current run's: any change to a key that shapes what is trained (learning rates and schedules, epochs and
epoch length, batch size, model, loss, crops, seed, data settings, the manifest's path or content) is
refused, naming every change with its old and new value, unless ``config.allow_config_change`` is True,
which continues with a warning naming the same changes.

Keys that change how the run is watched or fed but not what it computes may change freely
(``FREE_KEYS``): log, checkpoint and plot intervals, checkpoints kept, ``train.stop_at_step`` (stopping
earlier or later inside the same schedule), the in-run evaluations, the host's data workers, volume
cache and slice cache folder, the demo folder's location, rematerialisation, the mesh layout and the
multi-process settings (the global batch they give is compared on its own). Total steps are not free:
the schedules (lr, weight decay, teacher momentum and temperature) span ``optim.epochs x epoch_length``
steps, so extending a run changes the curve of the steps it has already planned; to split a run into
parts use ``train.stop_at_step``.
"""

from __future__ import annotations

import hashlib
import os

from medjax import console
from medjax.checkpoint import CheckpointMismatchError
from medjax.config_docs import flat_keys

# Dotted keys (or sections, ending in ".") whose change leaves what the run trains unchanged.
FREE_KEYS = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.plot_every",
    "train.stop_at_step", "train.reconstructions",
    "data.num_workers", "data.volumes_in_memory", "data.cache_dir", "data.demo_dir",
    "model.remat", "evals.", "mesh.", "distributed.", "allow_config_change",
)


def file_hash(path: str) -> str:
    """sha256 of a file's bytes (the first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def run_meta(config, fingerprint: dict, global_batch: int) -> dict:
    """What a pretraining checkpoint saves about its run besides the state."""
    from medjax.checkpoint import dumps_config

    meta = {"fingerprint": fingerprint, "config": dumps_config(config), "global_batch": int(global_batch)}
    if config.data.manifest and os.path.exists(config.data.manifest):
        meta["manifest_sha256"] = file_hash(config.data.manifest)
    return meta


def _is_free(key: str) -> bool:
    return any(key == free or (free.endswith(".") and key.startswith(free)) for free in FREE_KEYS)


def _show(value) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


def changes(saved: dict, current: dict) -> list[str]:
    """One sentence per training-relevant difference between a checkpoint's meta and the current run's."""
    old, new = flat_keys(saved.get("config", {})), flat_keys(current.get("config", {}))
    same_manifest_content = ("manifest_sha256" in saved and
                             saved.get("manifest_sha256") == current.get("manifest_sha256"))
    out = []
    for key in sorted(set(old) | set(new)):
        if _is_free(key) or old.get(key) == new.get(key):
            continue
        if key == "data.manifest" and same_manifest_content:
            continue  # the same file moved or renamed
        what = " (a dtype change)" if "dtype" in key.rsplit(".", 1)[-1] else ""
        if key not in old:
            continue  # a key added to medjax after this run was saved: the run could not have set it
        if key not in new:
            out.append(f"config.{key} is gone (was {_show(old[key])}).")
        else:
            out.append(f"config.{key} changed{what}: {_show(old[key])} -> {_show(new[key])}.")
    if "global_batch" in saved and saved["global_batch"] != current.get("global_batch"):
        out.append(f"The global batch changed: {saved['global_batch']} -> {current.get('global_batch')} images per "
                   "step (config.train.batch_size_per_device x the devices of config.mesh).")
    manifest = current.get("config", {}).get("data", {}).get("manifest")
    if ("manifest_sha256" in saved and old.get("data.manifest") == manifest and manifest
            and saved["manifest_sha256"] != current.get("manifest_sha256")):
        out.append(f"The manifest file {manifest} changed since the checkpoint (same path, different content: "
                   f"sha256 {saved['manifest_sha256']} -> {current.get('manifest_sha256')}).")
    return out


def check(saved: dict, current: dict, where: str, *, allow: bool, say_warning=console.warn) -> None:
    """Refuses (``CheckpointMismatchError``) to resume the checkpoint ``where`` under a changed config, or,
    with ``allow``, warns and lets it continue."""
    found = changes(saved, current)
    if not found:
        return
    listed = " ".join(found)
    if allow:
        say_warning(f"Resuming {where} with a changed config (config.allow_config_change=True): {listed} The run "
                    "continues from its checkpoint under the new settings.")
        return
    raise CheckpointMismatchError(
        f"The checkpoint {where} was trained with another config, and resuming would silently continue under "
        f"new settings. {listed} Rerun with the config it was trained with, start in a fresh --workdir, or pass "
        "--config.allow_config_change=True to continue anyway.")
