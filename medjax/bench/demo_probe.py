"""Quick linear probe of a demo pretraining run: pretrained teacher backbone vs random init.

    python -m medjax.bench.demo_probe --workdir=runs/demo [--step=120]

Loads the teacher backbone from ``workdir/checkpoints/<step>`` (the latest step by
default) with the config that run saved in its ``meta`` item, embeds the demo
dataset's train and test slices (the whole 128 px slice resized to the global crop
size, normalised as in training) as concat(CLS, mean patch token) of the normed
last block, fits a logistic regression on train and reports test accuracy and
balanced accuracy; then does the same for a randomly initialised backbone
(the run's own initialisation from ``config.seed``). A sanity check that pretraining
learned something, not the project's evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medjax import runs
from medjax.data.labelled import split_images
from medjax.data.sources import DEMO_COLUMNS, demo_manifest

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a demo pretraining run.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to probe (default: the latest).")
_LABEL = flags.DEFINE_enum("label", "lesion", ["lesion", "contrast"],
                           "Task: slice-level lesion class, or the series contrast (T1/T2/FLAIR).")
_BATCH = 64


def images(config, workdir: str, split: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    """The demo's slices of ``split`` at the global crop size and their labels (lesion: slice-level)."""
    manifest = demo_manifest(config, workdir)
    extra = tuple(c for c in DEMO_COLUMNS if c != label)
    return split_images(config, manifest, split, label, demo_rule=label == "lesion", extra_columns=extra)


def features(backbone, params, x: np.ndarray) -> np.ndarray:
    """concat(CLS, mean patch token) of the normed last block, in batches."""

    @jax.jit
    def embed(batch):
        out = backbone.apply({"params": params}, batch, train=False)
        return jnp.concatenate([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(axis=1)], axis=-1)

    return np.concatenate([np.asarray(embed(x[i : i + _BATCH])) for i in range(0, len(x), _BATCH)])


def probe(backbone, params, train, test) -> tuple[float, float]:
    """Test (accuracy, balanced accuracy) of a logistic regression on standardised features."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(features(backbone, params, train[0]), train[1])
    pred = clf.predict(features(backbone, params, test[0]))
    return accuracy_score(test[1], pred), balanced_accuracy_score(test[1], pred)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
    run = runs.open_run(_WORKDIR.value, -1 if _STEP.value is None else _STEP.value, key="--workdir")
    config = run.config
    random = run.random_params(config.seed)
    train, test = (images(config, _WORKDIR.value, s, _LABEL.value) for s in ("train", "test"))
    print(f"demo_probe: {_WORKDIR.value} step {run.step}; {len(train[1])} train / {len(test[1])} test slices")
    results = {}
    for name, params in (("pretrained", run.params), ("random", random)):
        results[name] = probe(run.backbone, params, train, test)
        print(f"  {name:10s} test accuracy {results[name][0]:.3f}, balanced accuracy {results[name][1]:.3f}")
    print(f"pretrained_acc={results['pretrained'][0]:.3f} random_acc={results['random'][0]:.3f}")


if __name__ == "__main__":
    app.run(main)
