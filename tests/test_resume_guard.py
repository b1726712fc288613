"""A resume under changed training settings is refused (or, with config.allow_config_change, warned about),
naming every change; keys that do not change what is trained may change; a changed manifest file is noticed by
its content; a dtype difference says "dtype"."""

import jax.numpy as jnp
import numpy as np
import pytest

from medjax import checkpoint, resume_guard, training_loop
from medjax.checkpoint import CheckpointMismatchError
from tests.helpers import smoke_config


def _meta(config, global_batch=4):
    return resume_guard.run_meta(config, {"['w']": [[2], "float32"]}, global_batch)


def test_training_keys_are_named_with_old_and_new_values_and_free_keys_pass(tmp_path):
    old = smoke_config()
    new = smoke_config()
    new.optim.base_lr, new.train.batch_size_per_device, new.model.dtype = 0.001, 8, "bfloat16"
    new.train.log_every, new.evals.every, new.data.num_workers, new.train.stop_at_step = 7, 3, 2, 5  # free
    found = resume_guard.changes(_meta(old), _meta(new, global_batch=8))
    assert found == [
        "config.model.dtype changed (a dtype change): 'float32' -> 'bfloat16'.",
        "config.optim.base_lr changed: 0.004 -> 0.001.",
        "config.train.batch_size_per_device changed: 4 -> 8.",
        "The global batch changed: 4 -> 8 images per step (config.train.batch_size_per_device x the devices of "
        "config.mesh).",
    ]
    free = smoke_config()
    free.train.checkpoint_every, free.mesh.fsdp, free.allow_config_change = 9, 2, True
    assert resume_guard.changes(_meta(old), _meta(free)) == []


def test_manifest_content_is_compared_not_only_its_path(tmp_path):
    manifest = tmp_path / "scans.csv"
    manifest.write_text("patient_id,path,split\np1,a.nii,train\n")
    config = smoke_config()
    config.data.manifest = str(manifest)
    before = _meta(config)
    manifest.write_text("patient_id,path,split\np1,a.nii,train\np2,b.nii,train\n")
    [sentence] = resume_guard.changes(before, _meta(config))
    assert sentence.startswith(f"The manifest file {manifest} changed since the checkpoint (same path, different "
                               f"content: sha256 {before['manifest_sha256']} -> ")
    moved = tmp_path / "moved.csv"
    moved.write_text(manifest.read_text())
    renamed = smoke_config()
    renamed.data.manifest = str(moved)
    assert resume_guard.changes(_meta(config), _meta(renamed)) == []  # the same rows under another name


def _saved_run(tmp_path, config):
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    state = {"w": jnp.arange(2, dtype=jnp.float32)}
    ckpt.save(3, state, None, resume_guard.run_meta(config, checkpoint.tree_fingerprint(state), 4))
    return ckpt, state


class _NoData:
    iterator = None


def test_the_training_loop_refuses_or_warns(tmp_path, capsys):
    ckpt, state = _saved_run(tmp_path, smoke_config())
    changed = smoke_config()
    changed.optim.base_lr, changed.optim.epochs = 0.001, 6
    meta = resume_guard.run_meta(changed, checkpoint.tree_fingerprint(state), 4)
    with pytest.raises(CheckpointMismatchError) as err:
        training_loop.resumable_step(ckpt, meta, allow_config_change=False)
    message = str(err.value)
    assert "trained with another config" in message and "\n" not in message
    assert "config.optim.base_lr changed: 0.004 -> 0.001. config.optim.epochs changed: 3 -> 6." in message
    assert "--config.allow_config_change=True" in message
    resume_at = training_loop.resumable_step(ckpt, meta, allow_config_change=True)
    restored, start = training_loop.resume(ckpt, resume_at, state, _NoData(), meta, 12)
    assert start == 3 and np.array_equal(restored["w"], [0.0, 1.0])
    assert "WARNING: Resuming" in capsys.readouterr().out
    ckpt.close()


def test_a_dtype_difference_of_the_parameters_says_dtype(tmp_path):
    ckpt, state = _saved_run(tmp_path, smoke_config())
    meta = resume_guard.run_meta(smoke_config(), checkpoint.tree_fingerprint({"w": state["w"].astype(jnp.bfloat16)}), 4)
    with pytest.raises(CheckpointMismatchError, match=r"1 parameters differ in dtype, e.g. \['w'\]: checkpoint "
                                                      r"float32 vs config bfloat16"):
        training_loop.resumable_step(ckpt, meta, allow_config_change=True)
    ckpt.close()
