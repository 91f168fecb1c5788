"""The machine and versions a run used, and the printed table."""

from __future__ import annotations

import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import Row, format_number

COLUMNS = ("benchmark", "measured", "baseline", "ratio", "goal", "met", "peak host MB", "peak GPU MB")


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return math.nan


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "ram_gib": round(ram_gib(), 1),
        "device": device,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "ray": _version("ray"),
        "mlflow": _version("mlflow"),
    }
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def _cell(value: float, unit: str) -> str:
    text = format_number(value)
    return f"{text} {unit}".strip() if text != "-" else "-"


def cells(rows: list[Row]) -> list[tuple[str, ...]]:
    out = []
    for row in rows:
        if row.status != "ok":
            out.append((row.name, row.status.upper(), "", "", "", "", "", ""))
            continue
        met = None if row.goal is None else row.goal.met(row)
        out.append(
            (
                row.name,
                _cell(row.measured, row.unit),
                _cell(row.baseline, row.baseline_unit or row.unit),
                format_number(row.ratio) if math.isfinite(row.ratio) else "-",
                row.goal.text(row.unit) if row.goal else "-",
                "-" if met is None else ("yes" if met else "NO"),
                format_number(row.peak_host_mb),
                format_number(row.peak_gpu_mb),
            )
        )
    return out


def table_lines(rows: list[Row], markdown: bool = False) -> list[str]:
    body = cells(rows)
    if markdown:
        return ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"] + [
            "| " + " | ".join(c) + " |" for c in body
        ]
    widths = [max([len(COLUMNS[i])] + [len(c[i]) for c in body]) for i in range(len(COLUMNS))]
    right = {1, 2, 3, 6, 7}

    def line(values) -> str:
        return "  ".join(
            v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))
        ).rstrip()

    return [line(COLUMNS), line(["-" * w for w in widths])] + [line(c) for c in body]


def render(rows: list[Row], meta: dict[str, Any], markdown: bool = False) -> str:
    m = meta["machine"]
    head = [
        f"bdo benchmarks ({'quick' if meta['quick'] else 'full'} sizes) on {m['device']}: {m['nproc']} CPUs "
        f"({m['cpu']}), {m['ram_gib']} GiB RAM" + (f", {m['gpu']} ({m['gpu_mem_gib']} GiB)" if "gpu" in m else ""),
        f"python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, ray {m['ray']}, "
        f"mlflow {m['mlflow']}",
        f"command: {meta['command']}",
        f"load average (1 min) at start {meta['load_start'][0]:.2f}, at end {meta['load_end'][0]:.2f}; "
        f"wall {meta['wall_s']:.0f} s",
        "ratio = measured / baseline; peaks are of the measured side (see notes)"
        + (
            f"; a benchmark process holds ~{meta['floor_mb']:.0f} MB after importing torch, torchvision and methods"
            if math.isfinite(meta.get("floor_mb") or math.nan)
            else ""
        ),
        "",
    ]
    notes = ["", "notes:"]
    for row in rows:
        text = "; ".join(t for t in (row.what, row.note) if t)
        notes.append(f"- {row.name}: {text}" if markdown else f"  {row.name}: {text}")
    return "\n".join(head + table_lines(rows, markdown) + notes)


def command_line(argv: list[str]) -> str:
    exe = Path(sys.executable)
    try:
        shown = str(exe.relative_to(Path.cwd()))
    except ValueError:
        shown = str(exe)
    return " ".join([shown, "-m", "benchmarks", *argv])
