"""Start and stop a local MLflow UI server over a tracking store (used by `bdo ui` and the browser test).

Lean mode: one worker and no job-execution consumer (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false), so the server
is a single uvicorn process. It binds only the host it is given (loopback by default). Runs logged by bdo keep
their artifacts under file:// URIs (the experiment's artifact_location), which the server reads directly for the
UI, so no artifact proxy settings are needed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import IO

from orchestrator.errors import BadInput

READY_TIMEOUT_S = 180.0  # the server imports all of MLflow before it answers; slow on a loaded 2-core machine
STOP_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free on `host` now (another process may still take it before the server does)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_address(host: str, port: int) -> None:
    """Bad input before a server starts: a port outside 1..65535, a host that does not resolve, or an address this
    machine cannot listen on (the port taken, the host not one of its own) would otherwise surface as the server's
    traceback."""
    if not 1 <= port <= 65535:
        raise BadInput(f"--port {port}: a port number in 1..65535 (default 5000)")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise BadInput(
            f"--host {host}: does not resolve ({getattr(exc, 'strerror', None) or exc}); "
            f"give an address of this machine, e.g. 127.0.0.1"
        ) from None
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port is free
        try:
            sock.bind(address)
        except OSError as exc:
            raise BadInput(
                f"--host {host} --port {port}: cannot listen there ({exc.strerror}); "
                f"pick another --port, or a --host of this machine"
            ) from None


def runs_page(url: str, experiment_id: str) -> str:
    """The experiment's runs table. MLflow 3.17's UI opens every experiment in its GenAI mode (traces, token
    usage) unless the address or the browser's saved choice says otherwise: its bundled code takes the mode from
    the `workflowType` parameter, else from local storage, and no longer from the experiment's
    `mlflow.experimentKind` tag, which bdo sets all the same. So bdo hands out this address."""
    return f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def served_runs_page(uri: str, experiment: str) -> str:
    """Where a server that already runs (an http(s) tracking URI, such as the cluster's) shows the experiment's
    runs: its runs page if the server answers at once and has the experiment, else the server's own address.
    MLflow's client retries an unreachable server for minutes; a link needs one quick try, so its retries and
    timeout are lowered here unless the user set them (`bdo ui` ends right after)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    from mlflow.tracking import MlflowClient

    try:
        found = MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception:  # not reachable from here (e.g. no port-forward yet) or refused: the address still helps
        found = None
    return runs_page(uri.rstrip("/"), found.experiment_id) if found is not None else uri


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never ask a proxy for a local server


def _answers(url: str) -> bool:
    try:
        with _DIRECT.open(url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_server(
    backend_uri: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    timeout: float = READY_TIMEOUT_S,
    output: IO | int | None = None,
    cwd: str | os.PathLike | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on backend_uri, bound to host:port only, and return (process, url) once it answers.

    port=None picks a free port (and tries another if that one was taken meanwhile). `output` receives the
    server's stdout and stderr (a file, subprocess.DEVNULL; None: inherited). The server runs in its own process
    group so stop_server can end it with its uvicorn child. Raises RuntimeError if it exits or does not answer
    within `timeout` seconds.
    """
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    attempts = 3 if port is None else 1
    last_error = ""
    for _ in range(attempts):
        chosen = port if port is not None else free_port(host)
        url = _url(host, chosen)
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            backend_uri,
            "--host",
            host,
            "--port",
            str(chosen),
            "--workers",
            "1",
        ]
        process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    last_error = f"mlflow server exited with status {process.returncode} before answering on {url}"
                    break
                if _answers(url):
                    return process, url
                time.sleep(0.5)
            else:
                raise RuntimeError(f"mlflow server did not answer on {url} within {timeout:.0f} s")
        except BaseException:  # no answer in time, or bdo stopped by a signal while it boots: end the server too
            stop_server(process)
            raise
        stop_server(process)  # exited early (e.g. the port was taken): make sure nothing of it is left
    raise RuntimeError(last_error)


def stop_server(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """End the server's whole process group: SIGTERM, then SIGKILL if it is still there after `timeout`."""
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        group = process.pid  # the leader is gone; its group id was its pid (start_new_session=True)
    if group == os.getpgrp():  # never signal our own group (a process not started by start_server)
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(group):
            process.poll()  # reap the leader so it does not linger as a zombie member of the group
            time.sleep(0.2)
        if not _group_alive(group):
            break
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(group: int) -> bool:
    """Whether any process of the group still runs (zombies, which nobody may reap in a container, do not count)."""
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":  # fields after "(comm)": state, ppid, pgrp, ...
                return True
        return False
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
