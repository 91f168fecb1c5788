"""The robustness bar on seeds no digits preset was tuned on (the presets used seeds 0-5, see their comments):
every defense except the FT and NAD baselines, against BadNets and Blend, brings test ASR to at most 0.10 and loses
at most 3 points of test ACC against the backdoored model; D-ST and ASD train a new model from the poisoned set,
so theirs is measured against a model trained on the same data with nothing poisoned. It runs as a study on the
presets (no sweep), the way docs/results/digits.md was produced, two runs at a time; FT and NAD are measured in
that table, not here.

One cell is run and printed but not held: D-BR on Blend, a limit of the method in this setting measured over
seeds 3-5 against every alternative setting tried (docs/results/digits.md, "On seeds no preset was tuned on"): SD's
split fails on some seeds, and where it is perfect unlearning lowers ASR only as fast as it costs accuracy."""

from __future__ import annotations

import pytest

from orchestrator.cli import main
from tests.integration.conftest import runs

# its runs take about 320 s on 2 cores; the timeout only stops a hung run, so it is generous
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DEFENSES = ["aft", "argd", "asd", "dbr", "dst", "pbe"]
FROM_SCRATCH = {"asd", "dst"}  # compared against the clean model: they never start from the backdoored weights
ATTACKS, SEEDS = ["badnets", "blend"], [6, 7]
KNOWN_LIMITS = {("dbr", "blend")}
STUDY = f"""\
name: robustness
attacks: [{", ".join(ATTACKS)}]
defenses: [{", ".join(DEFENSES)}]
seeds: [{", ".join(map(str, SEEDS))}]
clean: true
tune: {{num_samples: 0}}
jobs: 2
"""


def test_every_defense_meets_the_bar_on_unseen_seeds(workdir, capsys):
    (workdir / "study.yaml").write_text(STUDY)
    code = main(["study", str(workdir / "study.yaml")])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    _, all_runs = runs(workdir)
    (study,) = [r for r in all_runs if r.data.tags.get("role") == "study"]
    mine = [r for r in all_runs if r.data.tags.get("study_run_id") == study.info.run_id]

    def seed_of(run) -> int:
        return int(run.data.params["attack.seed"])

    reference = {}
    for run in mine:
        if run.data.tags["role"] == "attack":
            clean = run.data.params["attack.poison_rate"] in ("0", "0.0")
            reference[(run.data.tags["method"], seed_of(run), clean)] = run.data.metrics
    results, failures = [], []
    for run in (r for r in mine if r.data.tags["role"] == "final"):
        defense, attack, seed = run.data.tags["method"], run.data.tags["attack"], seed_of(run)
        poisoned = reference[(attack, seed, False)]
        baseline = reference[(attack, seed, defense in FROM_SCRATCH)]
        after = run.data.metrics
        line = (
            f"{defense} on {attack} seed {seed}: ACC {baseline['test_acc']:.3f} -> {after['test_acc']:.3f}, "
            f"ASR {poisoned['test_asr']:.3f} -> {after['test_asr']:.3f}"
        )
        results.append(line + (" (known limit, not held)" if (defense, attack) in KNOWN_LIMITS else ""))
        meets = after["test_asr"] <= 0.10 and after["test_acc"] >= baseline["test_acc"] - 0.03
        if not meets and (defense, attack) not in KNOWN_LIMITS:
            failures.append(line)
    print("\n".join(sorted(results)))
    assert len(results) == len(DEFENSES) * len(ATTACKS) * len(SEEDS), sorted(results)
    assert all(poisoned["test_asr"] >= 0.9 for (_, _, clean), poisoned in reference.items() if not clean)
    assert not failures, "\n".join(failures)
