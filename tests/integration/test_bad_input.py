"""Bad input stops before anything starts: one line naming what is wrong, exit code 2, nothing created."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.cli import main

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CASES = {
    "unknown method": (["attack", "badnetz"], "unknown attack 'badnetz'"),
    "unknown defense": (["defend", "nothing"], "unknown defense 'nothing'"),
    "attack given to defend": (["defend", "badnets"], "is an attack"),
    "unknown dataset": (["attack", "badnets", "--dataset", "imagenet9"], "dataset: unknown 'imagenet9'"),
    "unknown model": (["attack", "badnets", "--model", "resnet9000"], "model: unknown 'resnet9000'"),
    "attack flag on an attack space": (["tune", str(SPACES / "badnets.yaml"), "--attack", "blend"], "--attack applies to defenses"),
    "rate outside [0, 1]": (["attack", "badnets", "--set", "poison_rate=1.5"], "poison_rate: 1.5 is outside"),
    "wrong type": (["attack", "badnets", "--set", "epochs=ten"], "epochs: expected int"),
    "unknown key": (["attack", "badnets", "--set", "epohcs=3"], "unknown key(s) epohcs"),
    "bad data key": (["attack", "badnets", "--set", "data.val_fraction=0.9"], "val_fraction: 0.9 is outside"),
    "malformed --set": (["attack", "badnets", "--set", "epochs"], "expected key=value"),
    "missing space file": (["tune", "no/such/space.yaml"], "search space file not found"),
    "pareto with asha": (["tune", str(SPACES / "badnets.yaml"), "--objective", "pareto", "--scheduler", "asha"], "ASHA is single-objective"),
    "unknown flag": (["tune", str(SPACES / "badnets.yaml"), "--num-smaples", "3"], "unrecognized arguments"),
    "GPU share this machine lacks": (["tune", str(SPACES / "badnets.yaml"), "--gpus-per-trial", "0.5"], "no node has a GPU"),
    "GPU share above 1 as a fraction": (["tune", str(SPACES / "badnets.yaml"), "--gpus-per-trial", "1.5"], "whole GPUs"),
    "missing real dataset": (["attack", "badnets", "--dataset", "cifar10", "--data-root", "/nonexistent/bdo"], "--download"),
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
    "range outside the config's": ("method: badnets\nspace:\n  poison_rate: {uniform: [0.1, 1.5]}\n", "poison_rate: 1.5 is outside"),
    "wrong type in choice": ("method: badnets\nspace:\n  epochs: {choice: [2, three]}\n", "epochs: expected int"),
    "test metric as objective": ("method: badnets\nobjective: {metric: test_asr, mode: max}\n", "validation metrics only"),
    "unknown method": ("method: nomethod\n", "unknown method 'nomethod'"),
    "negative fixed epsilon": ("method: cl\nfixed: {pgd_eps: -0.1}\n", "pgd_eps: -0.1 is outside"),
    "randint low >= high": ("method: badnets\nspace:\n  epochs: {randint: [5, 5]}\n", "must be < high"),
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
