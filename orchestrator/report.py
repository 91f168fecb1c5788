"""`bdo report`: the table papers print, read back from MLflow. Rows are attacks, columns no defense and each
defense, cells test ACC / ASR (and RA, DER on request) as mean ± std over seeds, from a study's final runs
(each defense's configuration is the one its sweep selected on validation)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from orchestrator.errors import BadInput
from orchestrator.tables import ATTACK_COLUMNS, METRICS, PAPERS_REGIME, in_order, mean_std, outside_papers, render
from orchestrator.tracking import Tracker, resolve_tracking_uri, sqlite_path

REPORT_FILES = {
    "md": "report.md",
    "csv": "report.csv",
    "html": "report.html",
    "latex": "report.tex",
    "runs-csv": "report-runs.csv",
}


def collect(tracker: Tracker, study_run_id: str, metrics: list[str]) -> tuple[list[str], list[str], dict]:
    """(attacks, columns, cells) where cells[(attack, column)] = {metric: (mean, std), 'seeds': n, 'trials': n,
    'runs': [(seed, {metric: value}), ...]} (the per-seed values behind the mean)."""
    finals = tracker.search(f"tags.study_run_id = '{study_run_id}' and tags.role = 'final'")
    sweeps = tracker.search(f"tags.study_run_id = '{study_run_id}' and tags.role = 'sweep'")
    trials_per_sweep = {s.info.run_id: len(tracker.children(s.info.run_id)) for s in sweeps}
    groups: dict[tuple[str, str], list] = {}
    # see run_study: the attack runs tagged with the study are neither all of the column nor only it
    study_tags = tracker.client.get_run(study_run_id).data.tags
    for tag, column in ATTACK_COLUMNS.items():
        for attack, run_ids in json.loads(study_tags.get(tag, "{}")).items():
            groups[(attack, column)] = [tracker.client.get_run(r) for r in run_ids]
    for run in finals:
        groups.setdefault((run.data.tags["attack"], run.data.tags["method"]), []).append(run)
    # the study's own order of attacks and defenses (the paper's layout); a study run without it: alphabetical
    layout = json.loads(study_tags.get("layout", "{}"))
    present = {c for _, c in groups}
    attacks = in_order({a for a, _ in groups}, layout.get("attacks", []))
    columns = [c for c in ATTACK_COLUMNS.values() if c in present] + in_order(
        present - set(ATTACK_COLUMNS.values()), layout.get("defenses", [])
    )
    cells = {}
    for key, runs in groups.items():
        cell = {
            "seeds": len(runs),
            "runs": [
                (
                    r.data.params.get("attack.seed", r.data.params.get("seed", "")),
                    r.info.run_id,
                    {m: r.data.metrics.get(f"test_{m}", math.nan) for m in metrics},
                )
                for r in runs
            ],
        }
        cell["outside_papers"] = outside_papers([r.data.metrics.get(PAPERS_REGIME) for r in runs])
        for m in metrics:
            cell[m] = mean_std([r.data.metrics.get(f"test_{m}", math.nan) for r in runs])
        sweep_ids = {r.data.tags.get("sweep_run_id") for r in runs} - {None}
        cell["trials"] = sum(trials_per_sweep.get(s, 0) for s in sweep_ids)
        cells[key] = cell
    return attacks, columns, cells


def run_report(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise BadInput(f"--metrics: unknown {', '.join(bad)}; choose from {', '.join(METRICS)}")
    out = Path(args.out) if args.out else None
    if out is not None:  # refused before the store is opened, not after the table is built
        if out.is_dir():
            raise BadInput(
                f"--out {out}: a folder; --out names the report file, e.g. {out / REPORT_FILES[args.format]}"
            )
        if out.exists() and not args.force:
            raise BadInput(f"--out {out}: the file exists; pass --force to overwrite it, or name another file")
        taken = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        if taken is not None:
            raise BadInput(f"--out {out}: {taken} is a file, not a folder")
    uri = resolve_tracking_uri(args.tracking_uri)
    if (db := sqlite_path(uri)) is not None and not db.is_file():
        raise BadInput(f"--tracking-uri {uri}: no MLflow store there")
    tracker = Tracker(uri)
    experiment = tracker.client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise BadInput(f"--experiment {args.experiment!r} does not exist in {uri}")
    tracker.experiment_id = experiment.experiment_id
    study_id = args.study
    if study_id is None:
        studies = tracker.search("tags.role = 'study'")
        if not studies:
            raise BadInput(f"experiment {args.experiment!r} has no study run; run bdo study first")
        study_id = studies[0].info.run_id
    else:
        try:
            role = tracker.client.get_run(study_id).data.tags.get("role")
        except Exception:
            raise BadInput(
                f"--study {study_id}: no such run in {uri}; bdo report without --study takes the latest"
            ) from None
        if role != "study":
            raise BadInput(f"--study {study_id}: that run is not a study (role={role})")
    from orchestrator.compare import COMPARE_MODE, comparison_table

    if tracker.client.get_run(study_id).data.tags.get("mode") == COMPARE_MODE:
        content = comparison_table(tracker, study_id, args.format)  # always test ACC and ASR
    else:
        attacks, columns, cells = collect(tracker, study_id, metrics)
        content = render(attacks, columns, cells, metrics, args.format)
    name = REPORT_FILES[args.format]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(content)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_text(content)
        tracker.log_artifact(study_id, Path(d) / name)
    print(content)
    return 0
