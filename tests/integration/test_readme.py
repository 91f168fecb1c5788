"""Every `bdo ...` command of README.md's shell blocks runs, in README order, in one working directory, and exits 0.

The commands are read from the README itself, so a command added there is tested without editing this file.
Left out: `make demo` / `make test` (they build the venv and run this suite) and the cluster section's `ray ...`
commands, which need a cluster; a `bdo` command inside `ray job submit` belongs to its job and is left out with it.
`--quick` is added to every command whose subcommand has it. `bdo quickstart --quick` is left to
test_quickstart.py, which runs that same command and checks its output. `bdo ui` serves until Ctrl-C, so its
server start is replaced by a stub that checks what it was asked to serve (tests/integration/test_ui_browser.py runs a
real one).
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest

from orchestrator import ui
from orchestrator.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# about 175 s on an idle 2-core runner, 680 s seen on a loaded one; the timeout only stops a hung run
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# test_quickstart.py runs exactly this; test_readme_commands_are_found fails if the README's command changes
QUICKSTART = ["quickstart", "--quick"]
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|console|shell)[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in SHELL_BLOCK.findall(text):
        # a backslash-newline continues the command, as in the shell
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):  # console blocks show a prompt
                line = line[2:]
            words = shlex.split(line, comments=True)
            if words[:1] == ["bdo"]:
                commands.append(shlex.join(words))
    return commands


def subcommands_with(flag: str) -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {name for name, p in sub.choices.items() if flag in p._option_string_actions}


def test_readme_commands_are_found():
    commands = readme_commands(README.read_text())
    used = {shlex.split(c)[1] for c in commands}
    # guards the extraction itself: if it silently found nothing, the test below would pass vacuously
    assert {"quickstart", "ui", "attack", "defend", "tune", "study", "report"} <= used, commands
    assert not any("--gpus-per-trial" in c for c in commands), "the ray job submit command is the cluster's"
    quickstarts = [shlex.split(c)[1:] for c in commands if shlex.split(c)[1] == "quickstart"]
    assert quickstarts == [QUICKSTART], "test_quickstart.py must run the README's quickstart command"


def test_readme_local_commands(ray_session, workdir, capsys, monkeypatch):
    commands = readme_commands(README.read_text())
    quick = subcommands_with("--quick")
    # README paths are relative to a checkout: give the working directory the repository's files they name
    for command in commands:
        for word in shlex.split(command)[1:]:
            top = Path(word).parts[0] if not word.startswith("-") and Path(word).parts else None
            if top and (ROOT / top).exists() and not (workdir / top).exists():
                (workdir / top).symlink_to(ROOT / top)

    served = []

    class Server:  # stands for the server process: "Ctrl-C" at once
        def wait(self) -> int:
            return 0

    def start_server(uri: str, host: str, port: int):
        served.append((uri, host, port))
        return Server(), f"http://{host}:{port}"

    monkeypatch.setattr(ui, "start_server", start_server)
    monkeypatch.setattr(ui, "stop_server", lambda process: None)

    failures, timings = [], []
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv == QUICKSTART:  # run and checked by test_quickstart.py; once per suite is enough
            continue
        if argv[0] in quick and "--quick" not in argv:
            argv.append("--quick")
        started = time.perf_counter()
        code = main(argv)
        timings.append((time.perf_counter() - started, shlex.join(["bdo", *argv])))
        out, err = capsys.readouterr()
        if code != 0:
            failures.append(f"{shlex.join(['bdo', *argv])} -> exit {code}\n{err.strip()[-2000:]}")
    with capsys.disabled():
        for seconds, command in timings:
            print(f"\n{seconds:6.0f}s  {command}", end="")
        print()
    assert not failures, "README commands that do not work:\n" + "\n\n".join(failures)
    # `bdo ui` found the store the commands before it wrote, at the README's address
    assert served == [(f"sqlite:///{workdir.resolve() / 'mlflow.db'}", "127.0.0.1", 5000)], served
