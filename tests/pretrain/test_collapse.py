"""Collapse caught while a run goes on: the verdict, the watch over logged windows, the progress line and
the shaded plot."""

import json
import math

import numpy as np

from medjax import reporting
from medjax.pretrain.collapse import SMALL_BATCH_ADVICE, CollapseWatch, collapse_verdict

LOG_K = math.log(512)


def test_collapse_verdict_names_each_state():
    log_k = np.log(4096)
    assert collapse_verdict(0.995 * log_k, log_k, 4096).startswith("collapsed to uniform")
    # Flat-looking (98 % of log K) but image-specific: the chest X-ray demo's teacher at its last step.
    assert collapse_verdict(6.13, 6.238, 512).startswith("not collapsed")
    assert collapse_verdict(0.01, 0.02, 4096).startswith("collapsed to one mode")
    assert collapse_verdict(3.0, 3.05, 4096).startswith("targets carry little information about the image yet (0.05 nats")
    assert collapse_verdict(3.0, 8.0, 4096).startswith("not collapsed")


def _row(teacher, batch):
    return {"loss": 1.0, "teacher_entropy": teacher, "teacher_batch_entropy": batch}


def test_watch_waits_for_the_grace_period_and_two_windows_then_names_each_kind():
    watch = CollapseWatch(512, grace_steps=10)
    assert watch.check(10, _row(LOG_K, LOG_K)) == ""  # everything starts alike
    healthy = _row(4.0, 6.0)
    assert watch.check(20, healthy) == "" and healthy["collapse_warning"] == 0.0
    assert watch.check(30, _row(0.995 * LOG_K, LOG_K)) == ""  # one window: maybe a dip
    assert watch.check(40, _row(0.995 * LOG_K, LOG_K)) == "collapse: uniform targets"
    assert watch.check(50, _row(0.1, 0.2)) == "collapse: one target for every image"
    assert watch.check(60, _row(5.0, 5.03)) == "collapse: targets ignore the image"
    falling = _row(1.0, 2.9)  # the batch mean at 2.9 nats of its best 6.24: images agree on few prototypes
    assert watch.check(70, falling).startswith("collapsing: the batch-mean target entropy fell from 6.24 to 2.90")
    assert falling["collapse_warning"] == 1.0
    assert watch.first_flagged == 40 and watch.flagged_windows == 4
    assert watch.summary().startswith("collapse warnings in 4 logged window(s) from step 40")
    assert SMALL_BATCH_ADVICE in watch.summary()


def test_the_demo_run_is_not_flagged_and_the_official_settings_are():
    # Teacher / batch-mean entropies logged by the :demo run (K = 512, Sinkhorn-Knopp): uniform until step
    # 20, then image-specific (it beats random init by 0.55 in kNN accuracy at step 60).
    demo = [(1, 6.238, 6.238), (10, 6.238, 6.238), (20, 6.230, 6.238), (30, 6.048, 6.238), (40, 5.850, 6.238),
            (50, 5.885, 6.238), (70, 5.957, 6.238), (80, 5.968, 6.238)]
    watch = CollapseWatch(512, grace_steps=12)
    assert [watch.check(s, _row(t, b)) for s, t, b in demo] == [""] * len(demo)
    # The official settings plus Sinkhorn-Knopp at the demo's length (K = 4096, BUILD_NOTES): uniform to the end.
    official = CollapseWatch(4096, grace_steps=12)
    notes = [official.check(s, _row(8.29, 8.318)) for s in (10, 20, 30, 40)]
    assert notes == ["", "", "collapse: uniform targets", "collapse: uniform targets"]


def test_sharper_targets_with_a_spread_batch_are_not_a_collapse():
    # A continued run after its head warm-up: per-image targets flatten (information 2.27 -> 0.69 nats) while
    # the batch mean stays uniform and kNN accuracy rises; not flagged.
    watch = CollapseWatch(512, grace_steps=12)
    for step, teacher in ((24, 3.97), (36, 5.0), (48, 5.55), (60, 5.6)):
        assert watch.check(step, _row(teacher, 6.238)) == ""


def test_a_healthy_run_has_no_warning_and_rows_without_entropies_pass():
    watch = CollapseWatch(512, grace_steps=0)
    for step, (t, b) in enumerate([(5.5, 6.0), (5.0, 6.1), (4.6, 6.1), (4.2, 6.0)], start=1):
        assert watch.check(step, _row(t, b)) == ""
    assert watch.check(5, {"loss": 0.5}) == ""  # MAE rows: nothing to judge
    assert watch.summary() == ""


def test_progress_line_and_overview_show_the_warning(tmp_path, capsys, monkeypatch):
    reporter = reporting.Reporter(str(tmp_path), total_steps=100, images_per_step=8, is_main=False)
    reporter.is_main = True  # print without opening TensorBoard writers
    reporter.progress(30, {"loss": 2.0}, "collapse: uniform targets")
    assert capsys.readouterr().out.strip().endswith("loss 2.0000  ! collapse: uniform targets")
    rows = [{"step": s, "loss": 1.0, "teacher_entropy": 6.0, "teacher_batch_entropy": 6.2,
             "collapse_warning": float(s >= 30)} for s in (10, 20, 30, 40)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []  # the bands each shaded panel got
    original = reporting._shade_collapse_warnings

    def shade_and_count(ax, rows):
        original(ax, rows)
        drawn.append(list(ax.patches))

    monkeypatch.setattr(reporting, "_shade_collapse_warnings", shade_and_count)
    reporting.plot_training_overview(str(tmp_path / "metrics.jsonl"), str(tmp_path / "overview.png"))
    assert (tmp_path / "overview.png").stat().st_size > 0
    assert len(drawn) == 1 and len(drawn[0]) == 2  # two flagged windows shaded in the collapse panel
