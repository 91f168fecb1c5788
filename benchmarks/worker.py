"""One benchmark process: runs the named cases (one case, or the cases of one group) and writes their rows as
JSON after each case, so a crash or a timeout still leaves the finished rows behind.

    python -m benchmarks.worker --cases NAME[,NAME] --device cpu|cuda [--quick] [--compile=MODE] --out rows.json
    python -m benchmarks.worker --share-child JSON --out result.json   (a process of the device-sharing row)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from benchmarks.common import (
    ROOT,
    BenchContext,
    MemoryProbe,
    Row,
    apply_env,
    hide_modules,
    last_line,
    load_average,
    sizes_for,
    status_kb,
)


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _write(path: Path, rows: list[Row]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in rows], indent=1, default=str))
    tmp.replace(path)


def run_cases(names: list[str], device: str, quick: bool, compile_model: str, verbose: bool, out: Path) -> int:
    from benchmarks.suite import GROUP_SETUP, case_by_name

    cases = [case_by_name(n) for n in names]
    import torch  # noqa: F401  (the floor every row's host peak starts from)
    import torchvision  # noqa: F401

    import methods  # noqa: F401

    floor_mb = (status_kb("self", "VmRSS") or 0) / 1024.0
    scratch = Path(tempfile.mkdtemp(prefix="bdo-bench-"))
    ctx = BenchContext(
        device=device,
        quick=quick,
        sizes=sizes_for(quick, device),
        probe=MemoryProbe(device),
        scratch=scratch,
        compile=compile_model,
        verbose=verbose,
    )
    rows: list[Row] = []
    failed = False
    try:
        with contextlib.ExitStack() as stack:
            group = cases[0].group
            try:
                if group in GROUP_SETUP:
                    stack.enter_context(_resolve(GROUP_SETUP[group])(ctx))
            except Exception as exc:  # the group could not start: every member fails with the reason
                traceback.print_exc()
                reason = f"{type(exc).__name__}: {last_line(exc)}"
                rows = [
                    Row(name=r, status="error", note=f"group {group} set-up failed: {reason}")
                    for c in cases
                    for r in c.rows
                ]
                _write(out, rows)
                return 1
            for case in cases:
                before = load_average()
                try:
                    produced = _resolve(case.func)(ctx, **case.kwargs)
                except Exception as exc:
                    traceback.print_exc()
                    failed = True
                    reason = f"{type(exc).__name__}: {last_line(exc)}"
                    produced = [Row(name=r, status="error", note=reason) for r in case.rows]
                after = load_average()
                for row in produced:
                    row.details.setdefault("process_floor_mb", floor_mb)
                    row.details.setdefault("load_before", before)
                    row.details.setdefault("load_after", after)
                    if not ctx.probe.hwm_reset_ok:
                        row.details["hwm_reset"] = "unavailable: host peak includes earlier cases of this process"
                rows.extend(produced)
                _write(out, rows)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    apply_env()
    hide_modules()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    parser.add_argument("--cases", default="")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", default="", metavar="MODE")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--share-child", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.share_child is not None:
        from benchmarks.throughput import share_child

        result = share_child(json.loads(args.share_child))
        out.write_text(json.dumps(result))
        return 0
    names = [n for n in args.cases.split(",") if n]
    return run_cases(names, args.device, args.quick, args.compile, args.verbose, out)


if __name__ == "__main__":
    sys.exit(main())
