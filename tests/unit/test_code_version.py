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


def _copy_without_git(tmp_path, monkeypatch):
    """Sources but no checkout, as in a Ray job's working dir (Ray leaves .git out)."""
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "__init__.py").write_text("")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not find a repo above it
    monkeypatch.setattr(tracking, "ROOT", tmp_path)
    tracking.code_version.cache_clear()


def test_without_a_checkout_the_commit_and_its_cleanliness_are_unknown(tmp_path, monkeypatch):
    _copy_without_git(tmp_path, monkeypatch)
    monkeypatch.delenv("BDO_GIT_COMMIT", raising=False)
    version = tracking.code_version()
    assert version["git_commit"] == "unknown"
    assert version["git_dirty"] == "unknown", "an unknown commit cannot be called clean"
    tracking.code_version.cache_clear()


def test_the_submitter_can_name_the_commit(tmp_path, monkeypatch):
    _copy_without_git(tmp_path, monkeypatch)
    monkeypatch.setenv("BDO_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    version = tracking.code_version()
    assert version["git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert version["git_dirty"] == "unknown", "the uploaded files may differ from the named commit"
    tracking.code_version.cache_clear()
