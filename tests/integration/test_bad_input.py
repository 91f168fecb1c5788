"""Bad input stops before anything starts: one line naming what is wrong, exit code 2, nothing created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.cli import build_parser, main

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
EXAMPLES = SPACES.parent / "examples"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CASES = {
    "unknown method": (["attack", "badnetz"], "unknown attack 'badnetz'"),
    "unknown defense": (["defend", "nothing"], "unknown defense 'nothing'"),
    "attack given to defend": (["defend", "badnets"], "is an attack"),
    "unknown dataset": (["attack", "badnets", "--dataset", "imagenet9"], "dataset: unknown 'imagenet9'"),
    "unknown model": (["attack", "badnets", "--model", "resnet9000"], "model: unknown 'resnet9000'"),
    "attack flag on an attack space": (
        ["tune", str(SPACES / "badnets.yaml"), "--attack", "blend"],
        "--attack applies to defenses",
    ),
    "rate outside [0, 1]": (["attack", "badnets", "--set", "poison_rate=1.5"], "poison_rate: 1.5 is outside"),
    "wrong type": (["attack", "badnets", "--set", "epochs=ten"], "epochs: expected int"),
    "unknown key": (["attack", "badnets", "--set", "epohcs=3"], "unknown key(s) epohcs"),
    "bad data key": (["attack", "badnets", "--set", "data.val_fraction=0.9"], "val_fraction: 0.9 is outside"),
    "malformed --set": (["attack", "badnets", "--set", "epochs"], "expected key=value"),
    "missing space file": (["tune", "no/such/space.yaml"], "search space file not found"),
    "pareto with asha": (
        ["tune", str(SPACES / "badnets.yaml"), "--objective", "pareto", "--scheduler", "asha"],
        "ASHA is single-objective",
    ),
    "unknown flag": (["tune", str(SPACES / "badnets.yaml"), "--num-smaples", "3"], "unrecognized arguments"),
    "GPU share this machine lacks": (
        ["tune", str(SPACES / "badnets.yaml"), "--gpus-per-trial", "0.5"],
        "no node has a GPU",
    ),
    "GPU share above 1 as a fraction": (
        ["tune", str(SPACES / "badnets.yaml"), "--gpus-per-trial", "1.5"],
        "whole GPUs",
    ),
    "zero samples": (["tune", str(SPACES / "badnets.yaml"), "--num-samples", "0"], "--num-samples 0: a positive"),
    "zero concurrency": (["tune", str(SPACES / "badnets.yaml"), "--max-concurrent", "0"], "--max-concurrent 0"),
    "negative concurrency": (["tune", str(SPACES / "badnets.yaml"), "--max-concurrent", "-2"], "--max-concurrent -2"),
    "negative failures": (["tune", str(SPACES / "badnets.yaml"), "--max-failures", "-1"], "--max-failures -1"),
    "target the dataset lacks": (["attack", "badnets", "--set", "target=15"], "target: 15 is not a class of digits"),
    "attack target the dataset lacks": (
        ["defend", "ft", "--attack", "badnets", "--set", "attack.target=15"],
        "target: 15 is not a class of digits",
    ),
    "attack run in a missing store": (["defend", "ft", "--attack-run", "doesnotexist"], "no MLflow store"),
    "blind tune of a val_asr space": (
        ["tune", str(SPACES / "ft.yaml"), "--knowledge", "blind"],
        "objective.metric val_asr needs the trigger",
    ),
    "blind pareto": (
        ["tune", str(SPACES / "ft.yaml"), "--knowledge", "blind", "--objective", "pareto", "--scheduler", "fifo"],
        "the pareto objective val_asr needs the trigger",
    ),
    "blind study of a val_asr space": (
        ["study", str(EXAMPLES / "study-digits.yaml"), "--knowledge", "blind"],
        "val_asr needs the trigger",
    ),
    "resume in a missing store": (["tune", str(SPACES / "badnets.yaml"), "--resume", "BADID"], "no MLflow store"),
    "study in a missing store": (["report", "--study", "deadbeef"], "no MLflow store"),
    "quickstart on missing data": (
        ["quickstart", "--dataset", "cifar10", "--data-root", "/nonexistent/bdo"],
        "--download",
    ),
    "missing real dataset": (
        ["attack", "badnets", "--dataset", "cifar10", "--data-root", "/nonexistent/bdo"],
        "--download",
    ),
    "patch file without the file pattern": (
        ["attack", "badnets", "--set", "patch_file=x.png"],
        "patch_file: read only by pattern 'file', not 'grid'",
    ),
    "pattern file without the file pattern": (
        ["attack", "blend", "--set", "pattern_file=x.png"],
        "pattern_file: read only by pattern 'file'",
    ),
    "empty dataset": (["attack", "badnets", "--dataset", ""], "argument --dataset: empty"),
    "empty model": (["attack", "badnets", "--model", " "], "argument --model: empty"),
    "empty experiment": (["attack", "badnets", "--experiment", ""], "argument --experiment: empty"),
    "port above 65535": (["ui", "--port", "99999"], "--port 99999: a port number in 1..65535"),
    "negative port": (["ui", "--port", "-1"], "--port -1: a port number in 1..65535"),
    "host that does not resolve": (["ui", "--host", "no-such-host.invalid"], "--host no-such-host.invalid: does not"),
    "dashboard address as the Ray address": (
        ["tune", str(SPACES / "badnets.yaml"), "--address", "http://127.0.0.1:8265"],
        "--address wants the GCS address (host:6379",
    ),
    "trigger image that does not exist": (
        ["attack", "badnets", "--set", "pattern=file", "--set", "patch_file=/nope.png"],
        "patch_file: /nope.png does not exist",
    ),
    "more CPUs per trial than a node has": (
        ["tune", str(SPACES / "badnets.yaml"), "--cpus-per-trial", "100000"],
        "--cpus-per-trial 100000: this machine",
    ),
    "more GPUs per trial than a node has": (
        ["tune", str(SPACES / "badnets.yaml"), "--gpus-per-trial", "1000"],
        "--gpus-per-trial 1000: ",
    ),
}


def assert_nothing_created(directory: Path) -> None:
    assert sorted(os.listdir(directory)) == [], f"bad input created {os.listdir(directory)}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_bad_input(case, tmp_path, monkeypatch, capsys):
    argv, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert_nothing_created(tmp_path)


SPACE_CASES = {
    "malformed yaml": ("method: badnets\nspace: {lr: [0.1\n", "malformed YAML"),
    "low above high": ("method: badnets\nspace:\n  lr: {uniform: [0.1, 0.01]}\n", "low 0.1 must be <= high 0.01"),
    "unknown distribution": ("method: badnets\nspace:\n  lr: {normal: [0.1, 0.01]}\n", "unknown distribution 'normal'"),
    "unknown top-level key": ("method: badnets\nspaces: {}\n", "unknown key(s) spaces"),
    "key not in the config": ("method: badnets\nspace:\n  lrr: {uniform: [0.01, 0.1]}\n", "'lrr' is not a field"),
    "range outside the config's": (
        "method: badnets\nspace:\n  poison_rate: {uniform: [0.1, 1.5]}\n",
        "poison_rate: 1.5 is outside",
    ),
    "wrong type in choice": ("method: badnets\nspace:\n  epochs: {choice: [2, three]}\n", "epochs: expected int"),
    "test metric as objective": (
        "method: badnets\nobjective: {metric: test_asr, mode: max}\n",
        "validation metrics only",
    ),
    "unknown method": ("method: nomethod\n", "unknown method 'nomethod'"),
    "negative fixed epsilon": ("method: cl\nfixed: {pgd_eps: -0.1}\n", "pgd_eps: -0.1 is outside"),
    "randint low >= high": ("method: badnets\nspace:\n  epochs: {randint: [5, 5]}\n", "must be < high"),
    "blind space selecting on val_asr": (
        "method: ft\nknowledge: blind\nobjective: {metric: val_asr, mode: min}\n",
        "objective.metric val_asr needs the trigger or the poison flags",
    ),
    "unknown knowledge level": ("method: ft\nknowledge: partial\n", "knowledge 'partial': use oracle or blind"),
    "duplicate key": (
        "method: badnets\nspace:\n  lr: {uniform: [0.01, 0.1]}\n  lr: {uniform: [0.1, 0.2]}\n",
        "line 4, column 3: duplicate key 'lr'",
    ),
    "derived keys in a cycle": (
        "method: badnets\nspace:\n  lr: {derived: momentum / 10}\n  momentum: {derived: lr * 10}\n",
        "space.lr: derived from momentum",
    ),
    "derived from itself": ("method: badnets\nspace:\n  lr: {derived: lr * 2}\n", "space.lr: derived from lr"),
    "derived from a later derived key": (
        "method: badnets\nspace:\n  epochs: {derived: batch_size / 8}\n  batch_size: {derived: 64}\n",
        "space.epochs: derived from batch_size",
    ),
    "objective no method reports": (
        "method: ft\nobjective: {metric: val_nosuchmetric, mode: max}\n",
        "objective.metric 'val_nosuchmetric': no method reports it",
    ),
    "split objective of a method that does not split": (
        "method: ft\nobjective: {metric: split_auroc, mode: max}\n",
        "ft does not split the training set",
    ),
}


@pytest.mark.parametrize("case", sorted(SPACE_CASES))
def test_search_space_bad_input(case, tmp_path, monkeypatch, capsys):
    text, message = SPACE_CASES[case]
    space = write(tmp_path / "space.yaml", text)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["tune", str(space)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err and "space.yaml" in err, err
    assert_nothing_created(work)


STUDY_CASES = {
    "missing seeds": ("attacks: [badnets]\ndefenses: [ft]\n", "seeds: a non-empty list"),
    "unknown attack": ("attacks: [nope]\ndefenses: [ft]\nseeds: [0]\n", "unknown attack 'nope'"),
    "unknown key": ("attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\nseed: 1\n", "unknown key(s) seed"),
    "bad attack value names the study": (
        "attacks: [{name: badnets, poison_rate: 2.0}]\ndefenses: [ft]\nseeds: [0]\n",
        "study.yaml: attacks: badnets: poison_rate: 2.0 is outside",
    ),
    "missing space beside the study": (
        "attacks: [badnets]\ndefenses: [{name: ft, space: nope.yaml}]\nseeds: [0]\n",
        "space nope.yaml not found",
    ),
    "repeated seed": ("attacks: [badnets]\ndefenses: [ft]\nseeds: [0, 1, 0]\n", "seeds: 0 listed more than once"),
    "duplicate key": (
        "attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\nseeds: [1]\n",
        "line 4, column 1: duplicate key 'seeds'",
    ),
    "zero jobs": ("attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\njobs: 0\n", "jobs: a positive integer"),
    "clean not a bool": ("attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\nclean: maybe\n", "clean: true or false"),
    "negative samples": (
        "attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\ntune: {num_samples: -1}\n",
        "num_samples: 0 (run the presets, no sweep) or a positive integer",
    ),
    "unknown defense key": (
        "attacks: [badnets]\ndefenses: [{name: ft, epochs: 3}]\nseeds: [0]\n",
        "defenses: ft: unknown key(s) epochs",
    ),
    "defense tune not a mapping": (
        "attacks: [badnets]\ndefenses: [{name: ft, tune: 3}]\nseeds: [0]\n",
        "defenses: ft: tune: a mapping",
    ),
    "blind objective reads the trigger": (
        "attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\nblind_vs_oracle: {objective: {metric: val_asr, mode: min}}\n",
        "blind_vs_oracle: objective.metric 'val_asr' is not a blind validation metric",
    ),
    "blind objective on a test metric": (
        "attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\nblind_vs_oracle: {objective: {metric: test_acc}}\n",
        "objective.metric 'test_acc' is not a blind validation metric",
    ),
    "blind_vs_oracle not a mapping": (
        "attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\nblind_vs_oracle: yes please\n",
        "blind_vs_oracle: true, or {objective:",
    ),
    "blind_vs_oracle with an untuned defense": (
        "attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\ntune: {num_samples: 0}\nblind_vs_oracle: true\n",
        "blind_vs_oracle tunes every defense; num_samples 0",
    ),
    "blind_vs_oracle with a steering searcher": (
        "attacks: [badnets]\ndefenses: [ft]\nseeds: [0]\ntune: {searcher: optuna}\nblind_vs_oracle: true\n",
        "blind_vs_oracle selects twice from the same trials",
    ),
}


@pytest.mark.parametrize("case", sorted(STUDY_CASES))
def test_study_bad_input(case, tmp_path, monkeypatch, capsys):
    text, message = STUDY_CASES[case]
    study = write(tmp_path / "study.yaml", text)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["study", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert_nothing_created(work)


def test_exponent_floats_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 as a string; bdo reads numbers by YAML 1.2 rules wherever it reads YAML."""
    from orchestrator.resolve import parse_set
    from orchestrator.spaces import load_space

    assert parse_set(["lr=1e-3", "attack.lr=5E-4", "epochs=1.0e+1"]) == {"lr": 1e-3, "attack.lr": 5e-4, "epochs": 10.0}
    space = load_space(
        write(
            tmp_path / "space.yaml",
            "method: ft\nfixed: {weight_decay: 5e-4}\nspace:\n  lr: {loguniform: [1e-4, 1e-1]}\n",
        )
    )
    assert space.fixed == {"weight_decay": 5e-4} and space.dims[0].args == [1e-4, 1e-1]


def test_set_value_with_a_duplicate_key_is_refused():
    from orchestrator.errors import BadInput
    from orchestrator.resolve import parse_set

    with pytest.raises(BadInput, match="duplicate key 'a'"):
        parse_set(["data.x={a: 1, a: 2}"])


def test_report_out_is_a_file_that_is_not_overwritten_unasked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.md").write_text("kept")
    (tmp_path / "folder").mkdir()
    for out, message in (
        ("old.md", "--out old.md: the file exists; pass --force"),
        ("folder", "--out folder: a folder; --out names the report file, e.g. folder/report.md"),
        ("old.md/x.md", "old.md is a file, not a folder"),
    ):
        assert main(["report", "--out", out]) == 2, out
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["folder", "old.md"] and (tmp_path / "old.md").read_text() == "kept"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["report", "--help"])
    assert "--out FILE" in capsys.readouterr().out


def test_ui_on_a_port_in_use(tmp_path, monkeypatch, capsys):
    import socket

    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}: cannot listen there" in err, err
    assert_nothing_created(tmp_path)


def test_unusable_storage_or_store_is_refused_before_it_is_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    cases = [
        (["--storage", "afile"], "--storage afile: "),
        (["--storage", "afile/runs"], "afile is a file, not a folder"),
        (["--tracking-uri", "notascheme://x"], "--tracking-uri notascheme://x: unknown scheme 'notascheme'"),
        (["--tracking-uri", "sqlite:///afile/mlflow.db"], "afile is a file, not a folder"),
        (["--tracking-uri", "nodir/mlflow.db"], "nodir does not exist; create it first"),
        # nobody, root included, may create a file there (MLflow retried it for about 105 s)
        (["--tracking-uri", "/proc/mlflow.db"], "cannot write /proc"),
    ]
    if os.geteuid() != 0:  # root writes into a read-only folder
        (tmp_path / "readonly").mkdir(mode=0o555)
        cases += [
            (["--storage", "readonly/runs"], "readonly is not writable"),
            (["--tracking-uri", "readonly/mlflow.db"], "readonly is not writable"),
        ]
    for flags, message in cases:
        assert main(["attack", "badnets", *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(["report", "--tracking-uri", "notascheme://x"]) == 2
    assert "unknown scheme" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["afile"] + (["readonly"] if os.geteuid() != 0 else [])


def test_unknown_attack_for_a_defense(tmp_path, monkeypatch, capsys):
    from methods.core.method import method_names

    defenses = method_names("defense")
    if not defenses:
        pytest.skip("no defense registered")
    monkeypatch.chdir(tmp_path)
    assert main(["defend", defenses[0], "--attack", "nope"]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert_nothing_created(tmp_path)


def test_alpha_sum_above_one_is_refused(tmp_path, monkeypatch, capsys):
    """alpha_c + alpha_p > 1 is a cross-field error of the SD split (needs the sd defense)."""
    from methods.core.registry import METHODS

    if "sd" not in METHODS:
        pytest.skip("sd is not registered")
    monkeypatch.chdir(tmp_path)
    assert main(["defend", "sd", "--set", "alpha_c=0.8", "--set", "alpha_p=0.3"]) == 2
    err = capsys.readouterr().err
    assert "alpha_c" in err and "alpha_p" in err
    assert_nothing_created(tmp_path)


def test_bad_ids_in_an_existing_store_name_the_run(tmp_path, monkeypatch, capsys):
    """A store that exists but lacks the run: still one line and exit 2, and the store is left as it was."""
    from orchestrator.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(store, "bdo")
    capsys.readouterr()  # MLflow's own lines while it created the store
    before = (tmp_path / "mlflow.db").read_bytes()
    cases = [
        (["report", "--tracking-uri", store, "--study", "deadbeef"], "--study deadbeef: no such run"),
        (
            ["defend", "ft", "--tracking-uri", store, "--attack-run", "doesnotexist"],
            "--attack-run doesnotexist: no such run",
        ),
        (
            ["tune", str(SPACES / "badnets.yaml"), "--tracking-uri", store, "--resume", "BADID"],
            "--resume BADID: no such run",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["mlflow.db"]
    assert (tmp_path / "mlflow.db").read_bytes() == before


def test_a_study_space_is_found_beside_the_study_file(tmp_path, monkeypatch):
    import argparse

    from orchestrator.study import load_study

    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "ft-small.yaml").write_text((SPACES / "ft.yaml").read_text())
    study = write(
        folder / "study.yaml", "attacks: [badnets]\ndefenses: [{name: ft, space: ft-small.yaml}]\nseeds: [0]\n"
    )
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(
        dataset=None,
        model=None,
        seed=None,
        set=[],
        no_preset=False,
        quick=True,
        searcher=None,
        scheduler=None,
        objective=None,
        num_samples=None,
        max_concurrent=None,
        cpus_per_trial=None,
        gpus_per_trial=None,
        workers_per_trial=None,
    )
    plan = load_study(study, args)
    assert plan.defenses == [("ft", (folder / "ft-small.yaml").resolve())]
