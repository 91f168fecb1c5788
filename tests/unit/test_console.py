"""A single run's progress line counts the steps the run's engine announced, not its config's `epochs`."""

from __future__ import annotations

from orchestrator.console import ProgressPrinter


def test_progress_line_counts_every_stage_and_names_the_returned_models_report(capsys):
    progress = ProgressPrinter("argd")
    progress.expect_steps(20)  # e.g. ARGD: 10 teacher epochs, then 10 student epochs (its config's `epochs`)
    progress(12, {"val_acc": 0.5})
    progress(21, {"val_acc": 0.9})  # final_result's report of the model the defense returns
    first, last = capsys.readouterr().out.splitlines()
    assert "step 12/20 " in first and "[############........]" in first
    assert "step 21 (the returned model)" in last and "[####################]" in last
