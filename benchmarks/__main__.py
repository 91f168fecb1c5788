"""`python -m benchmarks [--quick] [--device cpu|cuda] [--only NAME,...] [--json out.json]`

Runs every benchmark that fits the device (each in a fresh process; the Ray/MLflow ones together in one) and
prints a table of measured figure, baseline, ratio and goal with peak host and GPU memory. Never fails on
timing: the exit code is 1 only when a benchmark crashed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, Row, apply_env, load_average, median, module_available, skipped
from benchmarks.report import command_line, machine_info, render
from benchmarks.suite import all_cases, batches, select


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI): every row, well under 2 minutes")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when available, else cpu"
    )
    parser.add_argument(
        "--only",
        default=None,
        metavar="NAME,...",
        help="benchmarks to run: names or prefixes (train, train.small_cnn, pgd, sweep, ...)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write rows and metadata as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for RESULTS.md)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="",
        metavar="MODE",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile the model in the fast-path rows (MODE: default, or reduce-overhead for CUDA graphs)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds per benchmark process (default 900 quick, 7200 full)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="print the table of a saved --json run instead of running anything",
    )
    parser.add_argument("--verbose", action="store_true", help="show the benchmark processes' progress and logs")
    return parser.parse_args(argv)


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m benchmarks: --device cuda, but torch sees no CUDA device")
    return requested


def run_batch(names: list[str], expected: list[str], device: str, args, log_dir: Path) -> list[Row]:
    """Run one benchmark process; rows it did not produce come back as errors naming the cause."""
    out = log_dir / f"{names[0]}.json"
    log_path = log_dir / f"{names[0]}.log"
    command = [
        sys.executable,
        "-m",
        "benchmarks.worker",
        "--cases",
        ",".join(names),
        "--device",
        device,
        "--out",
        str(out),
    ]
    command += [flag for flag, on in (("--quick", args.quick), ("--verbose", args.verbose)) if on]
    command += [f"--compile={args.compile}"] if args.compile else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    timeout = args.timeout or (900 if args.quick else 7200)
    reason = ""
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                command,
                cwd=str(ROOT),
                env=env,
                timeout=timeout,
                stdout=None if args.verbose else log,
                stderr=subprocess.STDOUT if not args.verbose else None,
            ).returncode
            if code not in (0, 1):
                reason = f"benchmark process exited {code}"
        except subprocess.TimeoutExpired:
            reason = f"benchmark process timed out after {timeout:.0f} s"
    rows = [Row.from_dict(d) for d in json.loads(out.read_text())] if out.is_file() else []
    got = {r.name for r in rows}
    if not reason and len(got) < len(expected):
        tail = log_path.read_text()[-500:].strip().splitlines() if log_path.is_file() else []
        reason = "benchmark process ended early" + (f": {tail[-1]}" if tail else "")
    rows += [Row(name=n, status="error", note=reason) for n in expected if n not in got]
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    apply_env()
    cases = all_cases()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows = [Row.from_dict(r) for r in saved.pop("rows")]
        for key in ("load_start", "load_end"):
            saved[key] = [math.nan if v is None else v for v in saved[key]]
        print(render(rows, saved, markdown=args.markdown))
        return 0
    if args.list:
        for case in cases:
            extra = " (GPU only)" if case.gpu_only else ""
            extra += f" (needs {', '.join(case.needs)})" if case.needs else ""
            print(f"{case.name:<26} rows: {', '.join(case.rows)}{extra}")
        return 0
    try:
        chosen = select(cases, args.only)
    except ValueError as exc:
        print(f"python -m benchmarks: {exc}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    started, load_start = time.perf_counter(), load_average()

    slots: list[tuple[str, list[str]] | Row] = []  # in suite order: a skipped row or (case, its rows)
    runnable = []
    for case in chosen:
        missing = [m for m in case.needs if not module_available(m)]
        if case.gpu_only and device != "cuda":
            slots.extend(skipped(r, "GPU only (run with --device cuda on a machine with a GPU)") for r in case.rows)
        elif missing:
            slots.extend(
                skipped(
                    r,
                    f"{' and '.join(missing)} not installed: this row needs the orchestrator "
                    f"stack (the pure-torch rows ran)",
                )
                for r in case.rows
            )
        else:
            runnable.append(case)
            slots.append((case.name, list(case.rows)))
    produced: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory(prefix="bdo-bench-logs-") as tmp:
        todo = batches(runnable)
        for i, batch in enumerate(todo, 1):
            label = ", ".join(c.name for c in batch)
            print(f"[{i}/{len(todo)}] {label} ...", file=sys.stderr, flush=True)
            began = time.perf_counter()
            rows = run_batch([c.name for c in batch], [r for c in batch for r in c.rows], device, args, Path(tmp))
            status = ", ".join(f"{r.name} {r.status}" for r in rows)
            print(f"[{i}/{len(todo)}] {status} ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
            for case in batch:
                produced[case.name] = [r for r in rows if r.name in case.rows]
    rows: list[Row] = []
    for slot in slots:
        rows.extend(produced[slot[0]] if isinstance(slot, tuple) else [slot])

    meta = {
        "machine": machine_info(device),
        "command": command_line(argv),
        "quick": args.quick,
        "compile": args.compile,
        "load_start": load_start,
        "load_end": load_average(),
        "wall_s": time.perf_counter() - started,
        "floor_mb": median([r.details["process_floor_mb"] for r in rows if "process_floor_mb" in r.details]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    print(render(rows, meta, markdown=args.markdown), flush=True)
    if args.json:
        payload = _finite({**meta, "rows": [r.to_dict() for r in rows]})
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str, allow_nan=False))
    return 1 if any(r.status == "error" for r in rows) else 0


def _finite(value):
    """NaN and infinities become null, so --json writes standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
