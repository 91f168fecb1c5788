"""A small blind_vs_oracle study through the CLI (orchestrator/compare.py), checked against the MLflow runs it made:
which sweeps ran under which knowledge, that each variant's configuration is the best trial on its own objective,
that every variant has its final runs, and that the table (printed by the study and by `bdo report`) shows their
test figures and the rank correlations over the blind sweep's trials."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from orchestrator.cli import main
from orchestrator.objective import rank
from tests.integration.conftest import runs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# FT trains the same under both knowledge levels (one sweep, selected twice); D-BR keeps its round by a rule that
# follows the level (two sweeps). D-BR's space is cut to four rounds to keep the test short.
STUDY = """\
name: blind-vs-oracle-test
dataset: digits
model: small_cnn
attacks:
  - {name: badnets, epochs: 3}
defenses: [ft, {name: dbr, space: dbr-short.yaml}]
seeds: [0, 1]
tune: {num_samples: 3, searcher: random, seed: 0}
quick: true
blind_vs_oracle: true
"""
DBR_SPACE = """\
method: dbr
dataset: digits
model: small_cnn
attack: {name: badnets}
fixed: {br_rounds: 4}
space:
  br_lr: {loguniform: [1.0e-4, 3.0e-3]}
  br_acc_margin: {choice: [0.01, 0.05]}
objective: {metric: val_der, mode: max}
num_samples: 3
quick: {data.train_limit: 400, sd_ft_epochs: 2}
"""
SEEDS, TRIALS = 2, 3
PAIR = re.compile(r"^([\d.]+)±[\d.]+ / ([\d.]+)±[\d.]+$")


def spearman_without_ties(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The comparison table in printed output (Tune's status tables print rows of "| ..." too: the table is the
    last block headed by "| attack | defense |")."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| attack | defense |"))
    block = [lines[start]]
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        block.append(line)
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block]
    return cells[0], cells[1:]


def test_blind_vs_oracle_study(ray_session, workdir, capsys, monkeypatch):
    monkeypatch.setenv("BDO_DEBUG", "1")
    (workdir / "dbr-short.yaml").write_text(DBR_SPACE)
    (workdir / "study.yaml").write_text(STUDY)
    assert main(["study", str(workdir / "study.yaml"), "--quick"]) == 0
    printed = capsys.readouterr().out

    client, all_runs = runs(workdir)
    (study,) = [r for r in all_runs if r.data.tags.get("role") == "study"]
    assert study.data.tags["mode"] == "blind-vs-oracle" and study.data.tags["blind_objective"] == "val_blind_score max"
    mine = [r for r in all_runs if r.data.tags.get("study_run_id") == study.info.run_id]
    sweeps = {(r.data.tags["method"], r.data.tags["variants"]): r for r in mine if r.data.tags["role"] == "sweep"}
    assert set(sweeps) == {("ft", "blind,oracle"), ("dbr", "blind"), ("dbr", "oracle")}, set(sweeps)
    assert sweeps[("dbr", "oracle")].data.tags["knowledge"] == "oracle"
    assert (
        sweeps[("dbr", "blind")].data.tags["knowledge"]
        == sweeps[("ft", "blind,oracle")].data.tags["knowledge"]
        == "blind"
    )
    trials = {
        key: client.search_runs([study.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
        for key, sweep in sweeps.items()
    }
    assert all(len(t) == TRIALS for t in trials.values()), {k: len(t) for k, t in trials.items()}

    def selected_is_best(key, objective: tuple, chosen: list, variant: str) -> None:
        """The selected trial ranks first of its sweep on the variant's objective (ties: any of the best)."""
        ranks = {t.data.tags["trial_id"]: rank(t.data.metrics, *objective) for t in trials[key]}
        (trial_id,) = {r.data.tags[f"selected_trial_id.{variant}"] for r in chosen}
        assert ranks[trial_id] == min(r for r in ranks.values() if r is not None), (key, objective, trial_id, ranks)

    finals = [r for r in mine if r.data.tags["role"] == "final"]
    for defense, blind_key, oracle_key in (
        ("ft", ("ft", "blind,oracle"), ("ft", "blind,oracle")),
        ("dbr", ("dbr", "blind"), ("dbr", "oracle")),
    ):
        mine_finals = [r for r in finals if r.data.tags["method"] == defense]
        for variant in ("preset", "blind", "oracle"):
            chosen = [r for r in mine_finals if variant in r.data.tags["variants"].split(",")]
            assert len(chosen) == SEEDS, (defense, variant, len(chosen))
            if defense == "dbr":  # the preset runs with the blind rules a defender without the trigger would use
                assert {r.data.tags["knowledge"] for r in chosen} == {"oracle" if variant == "oracle" else "blind"}
            if variant == "blind":
                selected_is_best(blind_key, ("val_blind_score", "max", {}), chosen, variant)
            if variant == "oracle":  # ft: its space's default, the bar; dbr: the study's space, DER
                oracle = ("val_asr", "min", {"val_acc_drop": 0.02}) if defense == "ft" else ("val_der", "max", {})
                selected_is_best(oracle_key, oracle, chosen, variant)

    assert main(["report", "--study", study.info.run_id]) == 0
    reported = capsys.readouterr().out
    header, rows = table_rows(reported)
    assert table_rows(printed) == (header, rows), "the study prints the table bdo report reads back from MLflow"
    assert [r[:2] for r in rows] == [["badnets", "ft"], ["badnets", "dbr"]]
    for row in rows:
        defense = row[1]
        for column, variant in zip(header[2:5], ("preset", "blind", "oracle")):
            group = [
                r for r in finals if r.data.tags["method"] == defense and variant in r.data.tags["variants"].split(",")
            ]
            acc, asr = (float(x) / 100 for x in PAIR.match(row[header.index(column)]).groups())
            assert math.isclose(acc, np.mean([r.data.metrics["test_acc"] for r in group]), abs_tol=6e-4), row
            assert math.isclose(asr, np.mean([r.data.metrics["test_asr"] for r in group]), abs_tol=6e-4), row
        assert row[-1] == str(TRIALS if defense == "ft" else 2 * TRIALS)
    blind_trials = trials[("ft", "blind,oracle")]
    concentration = [t.data.metrics["val_adv_concentration"] for t in blind_trials]
    asr = [t.data.metrics["val_asr"] for t in blind_trials]
    shown = rows[0][header.index("rho(adv. concentration, val ASR)")]
    if len(set(concentration)) == TRIALS and len(set(asr)) == TRIALS:
        assert math.isclose(float(shown), spearman_without_ties(concentration, asr), abs_tol=0.005), shown
