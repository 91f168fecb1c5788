"""Bad input: one line naming what is wrong and how to fix it, exit code 2, before anything starts."""

from __future__ import annotations


class BadInput(Exception):
    """Raised for any user error (config, search space, study file, CLI argument, missing file)."""

    exit_code = 2


def where(source: str | None, field: str | None, message: str) -> str:
    parts = [p for p in (source, field) if p]
    return f"{': '.join(parts)}: {message}" if parts else message
