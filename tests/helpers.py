"""What several test modules share: config files loaded as a user's run would load them, the command line,
and checkpoints in a pretraining run's format written in seconds."""

import csv
import importlib.util
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(REPO, "configs")
SMOKE = "--config=configs/dinov2_reg.py:smoke"


def load_config_module(name: str):
    """The module of ``configs/<name>.py``, loaded from its file as ``--config`` does."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name: str, variant: str = "", **kwargs):
    """``configs/<name>.py``'s ``get_config(variant, **kwargs)``."""
    return load_config_module(name).get_config(variant, **kwargs)


def medjax(workdir, *overrides, config=SMOKE, check=True):
    """Runs ``python -m medjax.main`` like a user; returns the completed process."""
    cmd = [sys.executable, "-m", "medjax.main", config, f"--workdir={workdir}", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def smoke_config(registers: int = 4, **model_overrides):
    """The ``configs/dinov2_reg.py:smoke`` pretraining config, with optional ``config.model`` overrides."""
    config = load_config("dinov2_reg", "smoke", registers=registers)
    for key, value in model_overrides.items():
        config.model[key] = value
    return config


def smoke_config_3d(registers: int = 4):
    """The ``configs/dinov2_reg_3d.py:smoke`` pretraining config (a 3D ViT, patch 6, 24^3 global crops)."""
    return load_config("dinov2_reg_3d", "smoke", registers=registers)


def write_pretraining_checkpoints(workdir, config, steps=(1, 2)):
    """Checkpoints in a pretraining run's format (train state with the teacher backbone, and the run's
    config in ``meta``) with different random weights per step, written directly: what the evaluation
    trainers read, in seconds rather than a training run's minute."""
    import jax

    from medjax.checkpoint import Checkpointer, dumps_config, tree_fingerprint
    from medjax.pretrain.loss_model import build_models, init_params

    models = build_models(config)
    init = jax.jit(lambda key: init_params(models, key, config))  # one compile; eager init compiles op by op
    ckpt = Checkpointer(str(workdir), async_save=False)
    for k, step in enumerate(steps):
        params = init(jax.random.PRNGKey(100 + k))
        state = {"student": params, "teacher": params}
        ckpt.save(step, state, None, {"config": dumps_config(config), "fingerprint": tree_fingerprint(state)})
    ckpt.close()
    return workdir


def csv_rows(path) -> list[dict]:
    """A written manifest (or any CSV) as one dict per row."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_manifest_cli(capsys, *argv) -> tuple[int, str, str]:
    """``python -m medjax.data.make_manifest ARGV`` in this process: (exit status, stdout, stderr)."""
    from medjax.data import make_manifest

    status = make_manifest.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def brute_force_hd95(pred, target, spacing) -> float:
    """HD95 by definition, for tests: surface voxels are foreground voxels with a background face neighbour
    (outside the array counts as background), every surface-to-surface distance in mm, the 95th percentile
    of each direction's nearest distances, the larger of the two."""
    import numpy as np

    def surface_points(mask):
        mask = np.asarray(mask, bool)
        padded = np.pad(mask, 1)
        inner = tuple(slice(1, -1) for _ in range(mask.ndim))
        exposed = np.zeros_like(mask)
        for axis in range(mask.ndim):
            for shift in (-1, 1):
                exposed |= ~np.roll(padded, shift, axis=axis)[inner]
        return np.argwhere(mask & exposed) * np.asarray(spacing, float)

    a, b = surface_points(pred), surface_points(target)
    dist = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    return float(max(np.percentile(dist.min(1), 95), np.percentile(dist.min(0), 95)))
