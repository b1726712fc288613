"""The one way to open a pretraining run: its checkpoints, its saved config and its backbone.

Probe, kNN, fine-tuning, segmentation, the in-run evaluators and the benches all call
:func:`open_run`. It reads a step through ``medjax.checkpoint``, trusts the config the run saved
(the run's own model, crops and data), builds the backbone with ``medjax.models.backbone`` and
checks the saved weights fit it. Which objective trained the run (its ``config.mode``) says where
the backbone lies in the train state and how a random-init baseline of the same model starts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import ml_collections

from medjax import checkpoint, console
from medjax.models.backbone import backbone_from_config, dinov2_init, dummy_input, mae_encoder_init
from medjax.models.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class Objective:
    """Where a pretraining objective keeps backbones in its train state, and how it initialises one."""

    backbones: dict  # which backbone ("teacher", ...) -> path of keys in the saved state
    default: str  # the backbone evaluations read
    random_init: Callable  # (run config, backbone, key) -> backbone params as the objective draws them
    name: str  # in tables


# config.mode of the run -> its objective.
OBJECTIVES = {
    "pretrain": Objective({"teacher": ("teacher", "backbone"), "student": ("student", "backbone")}, "teacher",
                          lambda config, backbone, key: dinov2_init(backbone, key), "DINOv2"),
    "mae": Objective({"encoder": ("params", "encoder")}, "encoder",
                     lambda config, backbone, key: mae_encoder_init(config, key), "MAE"),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """A pretraining run opened at one checkpoint step."""

    directory: str  # the run's --workdir
    step: int
    steps: tuple  # every saved step, sorted
    config: ml_collections.ConfigDict  # the config the run saved
    objective: str  # the run's config.mode
    which: str  # the backbone read: "teacher", "student", ...
    backbone: VisionTransformer
    params: dict  # host arrays
    content_hash: str

    @property
    def path(self) -> str:
        return checkpoint.step_dir(self.directory, self.step)

    @property
    def latest(self) -> bool:
        return self.step == self.steps[-1]

    @property
    def spatial_dims(self) -> int:
        return self.backbone.spatial_dims

    @property
    def normalisation(self) -> tuple[tuple, tuple]:
        """``(mean, std)`` per channel the run's inputs were normalised with."""
        return tuple(self.config.crops.mean), tuple(self.config.crops.std)

    def record(self) -> dict:
        """What results record about the weights they came from."""
        return {"path": self.path, "step": self.step, "latest": self.latest, "latest_step": self.steps[-1],
                "content_hash": self.content_hash}

    def random_params(self, seed: int) -> dict:
        """Random-init weights of the same backbone, as this run's objective starts from ``seed``."""
        return OBJECTIVES[self.objective].random_init(self.config, self.backbone, jax.random.PRNGKey(seed))


def _to_config(saved: dict) -> ml_collections.ConfigDict:
    """The saved JSON config as a ConfigDict (JSON lists back to tuples, as the recipes write them)."""
    def tuples(value):
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value

    return ml_collections.ConfigDict(tuples(saved))


def _subtree(state: dict, path: tuple, where: str) -> dict:
    for key in path:
        if not isinstance(state, dict) or key not in state:
            raise ValueError(f"The checkpoint {where} has no {'/'.join(path)} in its state; it was not written by "
                             "the objective its config names.")
        state = state[key]
    return state


def _check_shapes(backbone: VisionTransformer, params: dict, where: str, which: str) -> None:
    """Saved weights that do not fit the model the run's own config builds: one sentence."""
    expected = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), dummy_input(backbone))["params"])
    want = {k: v[0] for k, v in checkpoint.tree_fingerprint(expected).items()}
    have = {k: v[0] for k, v in checkpoint.tree_fingerprint(params).items()}
    if want != have:
        differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        k = differ[0]
        raise ValueError(f"The {which} backbone in {where} does not match the model its saved config builds "
                         f"({len(differ)} parameters differ, e.g. {k}: checkpoint {have.get(k)} vs model "
                         f"{want.get(k)}); the checkpoint and its config are from different models.")


def open_run(directory: str, step: int = -1, *, which: str | None = None, doing: str = "evaluating",
             key: str = "checkpoint_dir", say=console.say, **model_overrides) -> Run:
    """Opens ``directory`` (a pretraining run's --workdir) at ``step`` (-1 = the latest).

    ``which`` picks the backbone (default: the objective's, e.g. DINOv2's teacher); ``doing`` words
    the warning printed when the step is not the latest; ``key`` is the config key that named the run,
    for error sentences; ``model_overrides`` set ``config.model`` fields of the backbone built (e.g.
    ``drop_path_rate`` for fine-tuning).
    """
    steps = checkpoint.saved_steps(directory)
    if not steps:
        raise FileNotFoundError(f"No checkpoints in {checkpoint.checkpoints_dir(directory)}; point {key} at the "
                                "--workdir of a pretraining run (the folder that holds checkpoints/).")
    step = steps[-1] if step is None or step < 0 else int(step)
    if step not in steps:
        raise ValueError(f"The run {directory} has no checkpoint at step {step}; it has steps "
                         f"{', '.join(map(str, steps))}.")
    where = checkpoint.step_dir(directory, step)
    state, meta = checkpoint.read_saved(directory, step)
    config = _to_config(meta["config"])
    objective = config.get("mode", "pretrain")
    if objective not in OBJECTIVES:
        raise ValueError(f"The run {directory} was trained by config.mode={objective!r}, which holds no backbone "
                         f"to evaluate; give the --workdir of a run of {', '.join(OBJECTIVES)}.")
    kind = OBJECTIVES[objective]
    which = which or kind.default
    if which not in kind.backbones:
        raise ValueError(f"A {objective} run has no {which!r} backbone; choose one of {', '.join(kind.backbones)}.")
    params = _subtree(state, kind.backbones[which], where)
    with config.unlocked():
        for name, value in model_overrides.items():
            config.model[name] = value
    try:
        backbone = backbone_from_config(config)
    except (AttributeError, KeyError) as e:
        raise ValueError(f"The config saved in {where} lacks {e}; the run was written by another version of "
                         "medjax, so rerun its pretraining or pass a run of this version.") from None
    _check_shapes(backbone, params, where, which)
    if step != steps[-1]:
        say(f"WARNING: {doing} step {step}, which is NOT the latest checkpoint of {directory} (latest: "
            f"{steps[-1]}); the results describe an earlier backbone than the run's final one.")
    return Run(directory=directory, step=step, steps=tuple(steps), config=config, objective=objective, which=which,
               backbone=backbone, params=params, content_hash=checkpoint.content_hash(params))
