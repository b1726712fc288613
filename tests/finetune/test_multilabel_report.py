"""Fine-tuning on several 0/1 finding columns: config.data.uncertain_labels per target head, the refusals, and
results.md's per-finding AUC table with the mean over the findings scored in val and test."""

import numpy as np
import pytest

from medjax.finetune import data as finetune_data
from medjax.finetune import report
from tests.helpers import load_config
from tests.probe.test_multilabel_policy import FINDINGS, ROWS, _manifest


def _config(manifest, policy, targets=FINDINGS):
    c = load_config("finetune", "smoke")
    c.finetune.manifest, c.finetune.targets = manifest, tuple(targets)
    c.data.uncertain_labels = policy
    return c


@pytest.mark.parametrize("policy", ["ignore", "zeros", "ones"])
def test_each_head_reads_uncertain_labels_by_the_policy(tmp_path, policy):
    splits, targets = finetune_data.load_splits(_config(_manifest(tmp_path), policy), str(tmp_path))
    assert [t.class_names for t in targets] == [("0", "1")] * 3
    table = {"1": 1, "0": 0, "": -1, "-1": {"ignore": -1, "zeros": 0, "ones": 1}[policy]}
    for s in ("train", "val", "test"):
        # A row stays while some head has a label; an ignored uncertain label leaves out that head only.
        want = [[table[v] for v in r[2:]] for r in ROWS if r[1] == s and any(r[2:])]
        np.testing.assert_array_equal(splits[s].labels, want)


def test_non_binary_column_and_finding_without_positive_are_refused(tmp_path):
    grades = [r[:2] + ({"1": "2"}.get(r[2], r[2]),) + r[3:] for r in ROWS]
    with pytest.raises(ValueError, match=r"uncertain_labels='ones' reads an uncertain -1 as 1, which makes no sense "
                                         r"for label column 'Effusion' of findings.csv \(classes 0, 2;"):
        finetune_data.load_splits(_config(_manifest(tmp_path, grades), "ones"), str(tmp_path))
    no_positive = [r[:3] + ("0" if r[3] == "1" else r[3],) + r[4:] for r in ROWS]
    with pytest.raises(ValueError, match=r"Target column\(s\) 'Nodule' of .* have no positive \(1\) train slice"):
        finetune_data.load_splits(_config(_manifest(tmp_path, no_positive), "zeros"), str(tmp_path))


def _report(per_class, support):
    return {t: {"per_class": [{"support": support[t][0], "auc": a}, {"support": support[t][1], "auc": a}]}
            for t, a in per_class.items()}


def _results():
    val_support = {"Effusion": (2, 1), "Nodule": (3, 0), "Mass": (2, 2)}
    test_support = {"Effusion": (1, 2), "Nodule": (2, 2), "Mass": (3, 1)}
    aucs = {("random_init", 0): (0.5, 0.6, 0.7), ("random_init", 1): (0.7, 0.6, 0.9),
            ("pretrained", 0): (0.8, float("nan"), 0.9), ("pretrained", 1): (1.0, float("nan"), 0.7)}
    runs = []
    for fraction in (0.1, 1.0):
        for (init, seed), a in aucs.items():
            a = [v - (0.1 if fraction < 1 else 0.0) for v in a]
            runs.append({"init": init, "fraction": fraction, "seed": seed,
                         "val": _report(dict(zip(FINDINGS, a)), val_support),
                         "test": _report(dict(zip(FINDINGS, a)), test_support)})
    return {"targets": {t: {"class_names": ["0", "1"]} for t in FINDINGS},
            "inits": {"random_init": {}, "pretrained": {}}, "runs": runs}


def test_per_finding_table_and_mean_auc_over_scored_findings():
    found = report.finding_summary(_results())
    assert found["scored"] == ["Effusion", "Mass"] and found["left_out"] == {"Nodule": "no positive in val"}
    means = {(m["init"], m["fraction"]): m["test_mean_auc"] for m in found["mean_auc"]}
    # seeds 0 and 1 of pretrained at 100 %: (0.8 + 0.9) / 2 and (1.0 + 0.7) / 2
    assert means["pretrained", 1.0]["values"] == pytest.approx([0.85, 0.85])
    assert means["random_init", 0.1]["mean"] == pytest.approx(np.mean([(0.4 + 0.6) / 2, (0.6 + 0.8) / 2]))
    text = report.findings_section(found)
    assert "test AUC, mean over 2 of 3 findings (both classes in val and test); left out: Nodule (no positive " \
           "in val)" in text
    assert "| pretrained | 1 | 0.850 ± 0.000 |" in text
    assert "| Effusion | 1 / 2 | 2 / 1 | 0.600 / 0.600 | 0.900 / 0.900 | yes |" in text
    assert "| Nodule | 0 / 3 | 2 / 2 | 0.600 / 0.600 | - / - | no: no positive in val |" in text
    single = _results()
    single["targets"]["Mass"]["class_names"] = ["a", "b", "c"]
    assert report.finding_summary(single) is None  # not every target a 0/1 column: no findings section
