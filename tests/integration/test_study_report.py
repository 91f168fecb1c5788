"""A real (small) study through the CLI, then `bdo report` on it in every format, checked against the MLflow runs
it was built from; and the plots every kind of run leaves behind (curves, Pareto, FCT histogram, ASD pools)."""

from __future__ import annotations

import csv
import math
import os
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.integration.conftest import runs

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Short attacks (3 epochs instead of the preset's 15) keep the attack trainings cheap. Tuning on a seed that is not
# evaluated (2, against 0 and 1) gives the study an attack run of its own that belongs to no column of the table.
STUDY = """\
name: report-test
dataset: digits
model: small_cnn
attacks:
  - {name: badnets, epochs: 3}
  - {name: blend, epochs: 3}
defenses: [ft]
seeds: [0, 1]
tune: {num_samples: 2, searcher: random, scheduler: fifo, seed: 2}
quick: true
"""
ATTACKS, DEFENSES, SEEDS, TRIALS = ["badnets", "blend"], ["ft"], [0, 1], 2
# A second study over attacks the first one already trained: every attack comes from the cache, so none of its
# runs carries the second study's tag.
RERUN = """\
name: cached-attacks
attacks: [{name: badnets, epochs: 3}]
defenses: [ft]
seeds: [0, 1]
tune: {num_samples: 1, seed: 0}
quick: true
"""
CELL = re.compile(
    r"^(?P<acc>[\d.]+)±(?P<acc_sd>[\d.]+) / (?P<asr>[\d.]+)±(?P<asr_sd>[\d.]+)"
    r" \(seeds (?P<seeds>\d+)(?:, trials (?P<trials>\d+))?\)$"
)


def check_png(path: Path) -> None:
    from matplotlib import image

    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE), f"{path.name} is not a PNG"
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50 and pixels.shape[2] in (3, 4), (
        pixels.shape
    )
    # A figure that failed to draw anything is a flat white canvas.
    assert float(pixels[..., :3].std()) > 0.01, f"{path.name} is blank"


def check_plot(client, run_id: str, name: str, dst: Path) -> None:
    listed = {a.path: a for a in client.list_artifacts(run_id, "plots")}
    assert f"plots/{name}" in listed, f"run {run_id}: plots/ holds {sorted(listed)}"
    assert listed[f"plots/{name}"].file_size > 0
    dst.mkdir(parents=True, exist_ok=True)
    check_png(Path(client.download_artifacts(run_id, f"plots/{name}", str(dst))))


def expected_cells(client, study_runs: list) -> dict[tuple[str, str], dict]:
    """The report's cells recomputed from the runs: test metrics of the study's final runs, and for "no defense"
    of the attack runs the first defense's finals were built on (same data, one per seed); mean and sample std
    over seeds, plus the trials of the sweep that chose the configuration."""
    groups: dict[tuple[str, str], list] = {}
    for run in study_runs:
        tags = run.data.tags
        if tags["role"] == "final":
            groups.setdefault((tags["attack"], tags["method"]), []).append(run)
            if tags["method"] == DEFENSES[0]:
                groups.setdefault((tags["attack"], "no defense"), []).append(client.get_run(tags["attack_run_id"]))
    trials_of: dict[str, int] = {}
    for run in study_runs:
        if run.data.tags["role"] == "trial":
            sweep = run.data.tags["mlflow.parentRunId"]
            trials_of[sweep] = trials_of.get(sweep, 0) + 1
    cells = {}
    for key, group in groups.items():
        sweeps = {r.data.tags.get("sweep_run_id") for r in group}
        cell = {"seeds": len(group), "trials": sum(trials_of.get(s, 0) for s in sweeps)}
        for m in ("acc", "asr"):
            values = [r.data.metrics[f"test_{m}"] for r in group]
            cell[m] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        cells[key] = cell
    return cells


def parse_cell(text: str) -> dict:
    match = CELL.match(text.strip())
    assert match, f"cell {text!r} is not 'ACC±sd / ASR±sd (seeds n[, trials n])'"
    return {
        "acc": (float(match["acc"]) / 100, float(match["acc_sd"]) / 100),
        "asr": (float(match["asr"]) / 100, float(match["asr_sd"]) / 100),
        "seeds": int(match["seeds"]),
        "trials": int(match["trials"] or 0),
    }


def check_table(header: list[str], rows: list[list[str]], expected: dict, fmt: str) -> None:
    assert header == ["attack", "no defense", *DEFENSES], f"{fmt}: columns {header}"
    assert [r[0] for r in rows] == ATTACKS, f"{fmt}: rows {[r[0] for r in rows]}"
    for row in rows:
        for column, text in zip(header[1:], row[1:]):
            got, want = parse_cell(text), expected[(row[0], column)]
            assert got["seeds"] == len(SEEDS) == want["seeds"], (fmt, row[0], column, text)
            assert got["trials"] == want["trials"] == (0 if column == "no defense" else TRIALS), (
                fmt,
                row[0],
                column,
                text,
            )
            for m in ("acc", "asr"):
                # the table prints percentages to one decimal: half a unit of the last digit is all it may lose
                for shown, true in zip(got[m], want[m]):
                    assert math.isclose(shown, true, abs_tol=0.0005 + 1e-9), (fmt, row[0], column, m, text, want[m])


def md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


class Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def study_table_cells(out: str) -> dict[tuple[str, str], tuple[float, ...]]:
    """The table `bdo study` prints from the metrics it held in memory: a source independent of MLflow."""
    lines = out.splitlines()
    # Tune's own status tables print rows of "| ..." too; the study's table is the last one headed by "attack"
    start = max(i for i, line in enumerate(lines) if line.startswith("| attack |"))
    header = md_cells(lines[start])
    cells = {}
    for line in lines[start + 2 : start + 2 + len(ATTACKS)]:
        row = md_cells(line)
        for column, text in zip(header[1:], row[1:]):
            numbers = re.match(r"([\d.]+)±([\d.]+) / ([\d.]+)±([\d.]+) \(seeds (\d+)", text)
            assert numbers, text
            cells[(row[0], column)] = tuple(float(x) for x in numbers.groups())
    return cells


def test_study_then_report_in_every_format(ray_session, workdir, capsys, monkeypatch):
    monkeypatch.setenv("BDO_DEBUG", "1")  # a failing command raises with its traceback instead of exiting 1
    study_file = workdir / "study.yaml"
    study_file.write_text(STUDY)
    assert main(["study", str(study_file), "--quick"]) == 0
    study_out = capsys.readouterr().out

    client, all_runs = runs(workdir)
    (study,) = [r for r in all_runs if r.data.tags.get("role") == "study"]
    study_id = study.info.run_id
    assert study.info.status == "FINISHED"
    mine = [r for r in all_runs if r.data.tags.get("study_run_id") == study_id]
    roles = [r.data.tags["role"] for r in mine]
    n_sweeps = len(ATTACKS) * len(DEFENSES)
    assert roles.count("sweep") == n_sweeps and roles.count("trial") == n_sweeps * TRIALS, roles
    assert roles.count("final") == n_sweeps * len(SEEDS), roles
    # the tuning seed's attacks carry the study's tag too, and must not leak into the "no defense" column
    tuned_on = {r.data.tags["split_seed"] for r in mine if r.data.tags["role"] == "sweep"}
    assert roles.count("attack") == len(ATTACKS) * (len(SEEDS) + 1) and len(tuned_on) == 1, roles
    expected = expected_cells(client, mine)
    final_seeds = {r.data.tags["split_seed"] for r in mine if r.data.tags["role"] == "final"}
    assert len(final_seeds) == len(SEEDS) and tuned_on.isdisjoint(final_seeds), "finals run on the evaluation seeds"

    out_dir = workdir / "report"
    # once naming the study, once letting report find the latest study run itself
    assert (
        main(
            [
                "report",
                "--experiment",
                "bdo",
                "--study",
                study_id,
                "--format",
                "md",
                "--out",
                str(out_dir / "report.md"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert main(["report", "--format", "csv", "--out", str(out_dir / "report.csv")]) == 0
    assert (
        main(
            [
                "report",
                "--experiment",
                "bdo",
                "--study",
                study_id,
                "--format",
                "html",
                "--out",
                str(out_dir / "report.html"),
            ]
        )
        == 0
    )
    assert main(["report", "--format", "latex", "--out", str(out_dir / "report.tex")]) == 0
    assert main(["report", "--format", "runs-csv", "--out", str(out_dir / "report-runs.csv")]) == 0
    capsys.readouterr()

    tex = (out_dir / "report.tex").read_text()
    assert tex.startswith("\\begin{table}") and tex.count("\\\\") == 1 + len(ATTACKS) and "$\\pm$" in tex
    with open(out_dir / "report-runs.csv", newline="") as f:
        raw = list(csv.DictReader(f))
    for (attack, column), want in expected.items():  # the per-seed values give back every cell's mean
        accs = [float(r["test_acc"]) for r in raw if (r["attack"], r["defense"]) == (attack, column)]
        assert len(accs) == len(SEEDS) and math.isclose(sum(accs) / len(accs), want["acc"][0], abs_tol=1e-9)

    md = (out_dir / "report.md").read_text()
    assert md in printed, "report prints what it writes"
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert re.fullmatch(r"\|(---\|)+", table[1]), table[1]
    check_table(md_cells(table[0]), [md_cells(line) for line in table[2:]], expected, "md")
    assert "mean±std over seeds" in md and "test ACC / ASR" in md

    with open(out_dir / "report.csv", newline="") as f:
        rows = list(csv.reader(f))
    check_table(rows[0], rows[1:], expected, "csv")

    parser = Cells()
    parser.feed((out_dir / "report.html").read_text())
    check_table(parser.rows[0], parser.rows[1:], expected, "html")

    # the study's own table comes from the metrics in memory, the report's from MLflow: they must agree
    printed_by_study = study_table_cells(study_out)
    for (attack, column), want in expected.items():
        acc, acc_sd, asr, asr_sd, n = printed_by_study[(attack, column)]
        assert n == len(SEEDS)
        for shown, true in zip((acc, acc_sd, asr, asr_sd), (*want["acc"], *want["asr"])):
            assert math.isclose(shown / 100, true, abs_tol=0.0005 + 1e-9), (attack, column, shown, true)

    artifacts = {a.path: a.file_size for a in client.list_artifacts(study_id)}
    for fmt in ("md", "csv", "html"):
        assert artifacts.get(f"report.{fmt}", 0) > 0, f"report.{fmt} not logged on the study run: {sorted(artifacts)}"
        logged = Path(client.download_artifacts(study_id, f"report.{fmt}", str(workdir / "logged")))
        assert logged.read_text() == (out_dir / f"report.{fmt}").read_text()

    # plots: every sweep its Pareto front, every run that trained per-epoch curves with ACC, ASR and RA
    plots_dir = workdir / "plots"
    for run in mine:
        role, run_id = run.data.tags["role"], run.info.run_id
        if role == "sweep":
            check_plot(client, run_id, "pareto.png", plots_dir / run_id)
        elif role in ("attack", "trial", "final"):
            check_plot(client, run_id, "curves.png", plots_dir / run_id)
            for key in ("val_acc", "val_asr", "val_ra", "test_acc", "test_asr", "test_ra"):
                history = client.get_metric_history(run_id, key)
                assert len(history) >= 2 and len({m.step for m in history}) == len(history), (role, key, len(history))

    # the second study's "no defense" cell is made of the very attack runs of the first one's
    rerun_file = workdir / "rerun.yaml"
    rerun_file.write_text(RERUN)
    assert main(["study", str(rerun_file), "--quick"]) == 0
    _, studies = runs(workdir, query="tags.role = 'study'")
    (rerun,) = [r for r in studies if r.info.run_id != study_id]
    capsys.readouterr()
    assert (
        main(
            ["report", "--study", rerun.info.run_id, "--format", "csv", "--out", str(workdir / "rerun" / "report.csv")]
        )
        == 0
    )
    with open(workdir / "rerun" / "report.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["attack", "no defense", "ft"] and [r[0] for r in rows] == ["badnets"], (header, rows)
    got, want = parse_cell(rows[0][1]), expected[("badnets", "no defense")]
    assert got["seeds"] == len(SEEDS), rows[0][1]
    for m in ("acc", "asr"):
        for shown, true in zip(got[m], want[m]):
            assert math.isclose(shown, true, abs_tol=0.0005 + 1e-9), (m, rows[0][1], want[m])


def test_sd_and_asd_runs_draw_their_plots(ray_session, workdir, monkeypatch):
    monkeypatch.setenv("BDO_DEBUG", "1")
    # SD as a single run (its hand-off is drawn by the same log_outputs as a trial's), ASD as a one-trial sweep
    assert main(["defend", "sd", "--attack", "badnets", "--set", "attack.epochs=3", "--set", "sd_ft_epochs=2"]) == 0
    assert main(["tune", str(SPACES / "asd.yaml"), "--quick", "--num-samples", "1", "--set", "attack.epochs=3"]) == 0
    client, all_runs = runs(workdir)
    by_method = {r.data.tags["method"]: r for r in all_runs if r.data.tags.get("role") in ("defense", "trial")}
    assert set(by_method) == {"sd", "asd"}, sorted(by_method)
    check_plot(client, by_method["sd"].info.run_id, "fct_hist.png", workdir / "plots" / "sd")
    check_plot(client, by_method["asd"].info.run_id, "asd_pools.png", workdir / "plots" / "asd")
    for run in by_method.values():
        check_plot(client, run.info.run_id, "curves.png", workdir / "plots" / run.data.tags["method"])


# A matrix-style study: the defense runs on its presets without a sweep, a clean-model column beside the attack's,
# and the attack builds and final runs trained two at a time in worker processes.
UNTUNED = """\
name: untuned
attacks: [{name: badnets, epochs: 4}]
defenses: [ft]
seeds: [0, 1]
tune: {num_samples: 0}
clean: true
jobs: 2
quick: true
"""


def test_an_untuned_study_with_a_clean_column_trained_two_at_a_time(workdir, capsys):
    study_file = workdir / "study.yaml"
    study_file.write_text(UNTUNED)
    assert main(["study", str(study_file)]) == 0
    study_out = capsys.readouterr().out
    client, all_runs = runs(workdir)
    (study,) = [r for r in all_runs if r.data.tags.get("role") == "study"]
    mine = [r for r in all_runs if r.data.tags.get("study_run_id") == study.info.run_id]
    roles = sorted(r.data.tags["role"] for r in mine)
    assert roles == ["attack"] * 4 + ["final"] * 2, roles  # no sweep, no trial; poisoned and clean attacks per seed
    finals = [r for r in mine if r.data.tags["role"] == "final"]
    assert {r.data.tags["torch_threads"] for r in finals} == {str(max(1, (os.cpu_count() or 1) // 2))}
    assert all("sweep_run_id" not in r.data.tags for r in finals)
    clean = [r for r in mine if r.data.tags["role"] == "attack" and r.data.params["attack.poison_rate"] == "0.0"]
    assert len(clean) == 2 and all(r.data.metrics["poison_count"] == 0 for r in clean)

    assert main(["report", "--format", "md"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = md_cells(next(line for line in lines if line.startswith("| attack |")))
    assert header == ["attack", "no defense", "clean model", "ft"], header
    row = dict(zip(header, md_cells(next(line for line in lines if line.startswith("| badnets |")))))
    poisoned, clean_cell = parse_cell(row["no defense"]), parse_cell(row["clean model"])
    assert clean_cell["seeds"] == poisoned["seeds"] == parse_cell(row["ft"])["seeds"] == 2
    # a model trained on nothing poisoned does not carry the trigger the poisoned one learned
    assert clean_cell["asr"][0] < 0.5 < poisoned["asr"][0], (clean_cell, poisoned)
    for label in ("badnets no defense seed 1", "badnets clean model seed 0", "badnets x ft seed 1"):
        assert f"  {label}: test_acc=" in study_out, study_out
