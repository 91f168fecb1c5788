"""What a run records about the code it ran: an uncommitted new method is visible, and so is any source edit."""
from __future__ import annotations

import subprocess

import orchestrator.tracking as tracking


def _repo(tmp_path, monkeypatch):
    for folder in ("methods", "orchestrator"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "start")
    monkeypatch.setattr(tracking, "ROOT", tmp_path)
    tracking.code_version.cache_clear()
    return tmp_path


def test_an_untracked_new_method_makes_the_checkout_dirty_and_changes_the_source_hash(tmp_path, monkeypatch):
    root = _repo(tmp_path, monkeypatch)
    clean = tracking.code_version()
    assert clean["git_dirty"] == "false"
    (root / "methods" / "mydefense.py").write_text("X = 1\n")
    tracking.code_version.cache_clear()
    added = tracking.code_version()
    assert added["git_dirty"] == "true", "a new, uncommitted method file is not a clean commit"
    assert added["source_sha256"] != clean["source_sha256"]
    assert added["git_commit"] == clean["git_commit"]
    tracking.code_version.cache_clear()
