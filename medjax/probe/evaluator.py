"""Evaluators that run inside a pretraining run: kNN and the 52-head linear probe on the teacher.

Configured by ``config.evals`` (``configs/config_lib.py``: ``evals_config``): every ``evals.every``
steps the teacher backbone's features of a labelled manifest (the pretraining
data's own labels by default; for the demo, the slice-level lesion class) are
computed once and scored by kNN (DINO vote, T = 0.07) and by the linear probe
(all 52 heads, best on val, reported on test). The scores are logged like any
other metric (``eval/...`` in TensorBoard, metrics.jsonl and the overview
plot). With ``evals.final`` the last step also runs the full protocol against a
randomly initialised backbone and writes ``eval/results.md`` — the table that
answers "what did pretraining buy?".
"""

from __future__ import annotations

import json
import os

from typing import Callable

import ml_collections

from medjax import checkpoint, console, runs
from medjax.checkpoint import content_hash, host_arrays
from medjax.models.vit import VisionTransformer
from medjax.probe import findings as findings_lib
from medjax.probe import knn
from medjax.probe import report as probe_report
from medjax.probe import trainer as probe_lib
from medjax.probe.data import load_splits


def _probe_config(config) -> ml_collections.ConfigDict:
    """The probe settings the evaluator shares with ``configs/linear_probe.py`` (passes over train)."""
    e = config.evals
    c = ml_collections.ConfigDict(config.to_dict())
    c.probe = ml_collections.ConfigDict(dict(
        manifest=e.manifest or config.data.manifest, label_column=e.label_column, selection=e.selection,
        features="precomputed", batch_size=e.batch_size, epochs=e.probe_epochs, epoch_length=0, eval_every=0,
        feature_batch=64, label_fractions=(), fraction_seeds=1, knn_k=()))  # kNN: scored once, in ``scores``
    return c


class Evaluator:
    """Loads the labelled splits once; ``__call__`` scores a backbone, ``final`` compares with random init.

    ``random_params(seed)`` gives the random-init baseline: the pretraining objective's own initialisation
    of the same backbone.
    """

    def __init__(self, config, backbone: VisionTransformer, workdir: str, *, random_params: Callable[[int], dict],
                 say=console.say):
        self.config, self.backbone, self.workdir = _probe_config(config), backbone, workdir
        self.random_params = random_params
        self.out = os.path.join(workdir, "eval")  # the final results, tables and plots
        self.say = say
        with self.config.unlocked():
            self.splits, self.class_names, self.task, self.multilabel = load_splits(
                self.config, workdir, workdir)
        # Multi-label: the findings with both classes in val and test, which every mean AUC averages.
        self.findings = findings_lib.scored_findings(self.splits, self.class_names) if self.multilabel else None
        if self.multilabel and config.evals.knn:
            raise ValueError("config.evals.knn votes over classes and does not apply to a multi-label task; set "
                             "config.evals.knn=False.")
        self.say(f"evaluations: {self.task}; " + ", ".join(
            f"{len(s.labels)} {name}" for name, s in self.splits.items()) + " slices")

    def scores(self, params, *, name: str = "pretrained", full: bool = False, backbone=None) -> tuple[dict, dict]:
        """``(scalars, result)``: ``eval/...`` scalars to log, and with ``full`` the probe's whole result."""
        e, cfg = self.config.evals, self.config
        backbone = backbone or self.backbone
        feats = probe_lib.probe_features_of(name, backbone, params, self.splits, cfg, say=console.silent)
        scalars, result = {}, {}
        if e.knn:
            # kNN on the normed CLS token of the last block, as DINOv2's kNN evaluation.
            reports = knn.knn_evaluate(feats["train"]["cls4"][:, -1], self.splits["train"].labels, feats["test"]["cls4"][:, -1],
                                       self.splits["test"].labels, len(self.class_names), ks=tuple(e.knn_k),
                                       class_names=self.class_names)
            for k, r in reports.items():
                scalars[f"eval/knn_k{k}_accuracy"] = r["accuracy"]
                scalars[f"eval/knn_k{k}_balanced_accuracy"] = r["balanced_accuracy"]
            result["knn"] = {str(k): {m: r[m] for m in ("accuracy", "balanced_accuracy", "macro_f1", "k_used")}
                             for k, r in reports.items()}
        if e.linear_probe:
            if full:
                result.update(probe_lib.probe_backbone(name, backbone, params, self.splits, self.class_names,
                                                       self.multilabel, cfg, self.out, say=console.silent))
                val, test = result["val"], result["test"]
            else:
                fit = probe_lib.fit_and_select(backbone, params, feats, self.splits, len(self.class_names),
                                               self.multilabel, cfg, cfg.seed, say=console.silent)
                best, columns = fit["best"], self.findings and self.findings["scored"]
                val, _ = probe_lib.test_report(probe_lib.all_logits(fit["state"], feats["val"])[best],
                                               self.splits["val"].labels, self.class_names, self.multilabel, columns)
                test, _ = probe_lib.test_report(probe_lib.all_logits(fit["state"], feats["test"])[best],
                                                self.splits["test"].labels, self.class_names, self.multilabel, columns)
            for split, report in (("val", val), ("test", test)):
                for m in ("accuracy", "balanced_accuracy", "mean_auc"):
                    if m in report:
                        scalars[f"eval/linear_{split}_{m}"] = report[m]
        return scalars, result

    def __call__(self, backbone_params, step: int) -> dict:
        scalars, _ = self.scores(host_arrays(backbone_params))
        k = 20 if 20 in self.config.evals.knn_k else self.config.evals.knn_k[0]
        shown = (f"eval/knn_k{k}_accuracy", "eval/linear_val_accuracy", "eval/linear_test_accuracy",
                 "eval/linear_val_mean_auc", "eval/linear_test_mean_auc")
        self.say(f"evaluation at step {step}: " + ", ".join(
            f"{name.removeprefix('eval/')} {scalars[name]:.3f}" for name in shown if name in scalars))
        return scalars

    def final(self, backbone_params, step: int, checkpoint_path: str, seed: int) -> tuple[dict, str]:
        """Pretrained vs random init (and the runs of ``evals.compare_runs``) under the full protocol; writes
        WORKDIR/eval/; returns the pretrained backbone's scalars and the table."""
        os.makedirs(self.out, exist_ok=True)
        params = host_arrays(backbone_params)
        random = self.random_params(seed)
        results = {"task": self.task, "multilabel": self.multilabel, "class_names": self.class_names,
                   "run_dir": os.path.abspath(self.workdir), "backbones": {}}
        if self.multilabel:
            results["findings"] = self.findings
        entries = [("random_init", self.backbone, random, {"seed": seed, "content_hash": content_hash(random)}),
                   ("pretrained", self.backbone, params, {"path": checkpoint_path, "step": step, "latest": True,
                                                          "content_hash": content_hash(params)})]
        scalars = {}
        for name, backbone, p, record in entries + self._compared():
            s, result = self.scores(p, name=name, full=True, backbone=backbone)
            results["backbones"][name] = {"checkpoint": record, **result}
            if name == "pretrained":
                scalars = s  # logged at the last step
        if self.config.evals.linear_probe:
            return scalars, probe_report.write(results, self.out)  # with the kNN table when there is one
        table = f"Task: {self.task}.\n\nkNN on the last block's normed CLS token (T = 0.07), test:\n\n"
        table += probe_report.knn_table(results)
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(table)
        return scalars, table

    def _compared(self) -> list:
        """``(name, backbone, params, record)`` of the other runs in ``evals.compare_runs`` that can be read on
        these slices (same input size and normalisation); each one left out is said in a line."""
        out = []
        for run_dir in (d.strip() for d in self.config.evals.compare_runs.split(",") if d.strip()):
            if not checkpoint.saved_steps(run_dir):
                self.say(f"evals.compare_runs: {run_dir} holds no checkpoints (yet); it is not in the table.")
                continue
            run = runs.open_run(run_dir, key="config.evals.compare_runs", say=self.say)
            c = self.config.crops
            if (run.config.crops.global_size, run.normalisation) != (c.global_size, (tuple(c.mean), tuple(c.std))):
                self.say(f"evals.compare_runs: {run_dir} reads {run.config.crops.global_size} px inputs normalised "
                         "otherwise; compare it with the linear probe job (configs/linear_probe.py) instead.")
                continue
            name = f"{runs.OBJECTIVES[run.objective].name} {os.path.basename(os.path.normpath(run_dir))}"
            out.append((name, run.backbone, run.params, run.record()))
        return out
