"""The `bdo` command line. Everything is parsed and validated before Ray starts or any MLflow store or run is
created; bad input prints one line and exits 2. Exit codes: 0 done, 1 a run failed, 2 bad input, 128 + the signal
when stopped by SIGINT, SIGTERM or SIGHUP (130, 143, 129; its runs end KILLED: orchestrator.signals)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import BadInput
from orchestrator.signals import Interrupted, catch_stop_signals


def default_experiment() -> str:
    """MLflow's own variable names the experiment, as it does for MLflow's clients; else bdo's."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or "bdo"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage plus the error; we want one line
        raise BadInput(f"{self.prog}: {message} (see {self.prog} --help)")


def _name(value: str) -> str:
    """A registry or experiment name: an empty one would fall back to the default silently (or fail mid-run)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("empty; give a name, or leave the flag out for the default")
    return value


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset", type=_name, default=None, help="dataset registry name (default: digits, or the space's)"
    )
    p.add_argument("--model", type=_name, default=None, help="model registry name (default: small_cnn, or the space's)")
    p.add_argument("--seed", type=int, default=None, help="derives the split, poison, train and clean seeds")
    p.add_argument(
        "--experiment",
        type=_name,
        default=default_experiment(),
        help="MLflow experiment (default: MLFLOW_EXPERIMENT_NAME, else bdo)",
    )
    p.add_argument(
        "--storage",
        default=os.environ.get("BDO_STORAGE", "./bdo_runs"),
        help="run storage: attack cache and Tune state, a local or shared path (default: BDO_STORAGE or ./bdo_runs)",
    )
    p.add_argument(
        "--shared-storage",
        action="store_true",
        default=os.environ.get("BDO_SHARED_STORAGE", "").strip().lower() in ("1", "true", "yes"),
        help="--storage is on a filesystem every node of the Ray cluster mounts, though not a network "
        "filesystem bdo recognizes (default: BDO_SHARED_STORAGE=1; checked on multi-node clusters)",
    )
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )
    p.add_argument(
        "--data-root", default=None, help="where datasets live (default: BDO_DATA_ROOT or ~/.cache/bdo/data)"
    )
    p.add_argument("--download", action="store_true", help="download missing datasets")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (attack.KEY / data.KEY for the attack / dataset); repeatable",
    )
    p.add_argument("--no-preset", action="store_true", help="ignore search_spaces/presets/<dataset>/<method>.yaml")
    p.add_argument(
        "--recipe",
        default=None,
        help="a named recipe of the dataset's presets, layered over them (for example cpu: minutes on "
        "a CPU instead of the papers' GPU schedules; docs/search-spaces.md#recipes)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved configuration, device and resources, then exit without running",
    )


def _tune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--searcher", choices=("random", "grid", "optuna"), default=None)
    p.add_argument("--scheduler", choices=("fifo", "asha"), default=None)
    p.add_argument("--objective", choices=("single", "pareto"), default=None)
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPU share of each trial (default: the GPUs Ray finds, divided among concurrent trials; 0: CPU)",
    )
    p.add_argument("--workers-per-trial", type=int, default=None)
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial, from its last checkpoint")
    p.add_argument("--quick", action="store_true", help="apply the space's quick: overrides (tiny schedules)")
    _verbose(p)
    _knowledge(p)
    p.add_argument(
        "--no-default-trial",
        action="store_true",
        help="sample every trial; by default the first runs the untuned values (preset, else defaults)",
    )


def _knowledge(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--knowledge",
        choices=("oracle", "blind"),
        default=None,
        help="what selection may know: blind refuses objectives that read the trigger or the poison "
        "flags and switches in-method choices to their blind rules (default: the space's, else oracle)",
    )


def _verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, Tune's and every trial's own output (default: one line per finished trial)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bdo", description="Backdoor attacks and defenses as tunable trainables.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("list", help="what is registered: attacks, defenses, datasets, models")
    p.add_argument("kind", nargs="?", default=None, help="attacks, defenses, datasets or models (default: all)")
    p = sub.add_parser("describe", help="a method's config fields, presets and search space")
    p.add_argument("name")
    p = sub.add_parser("attack", help="train a backdoored model")
    p.add_argument("name")
    _shared(p)
    p = sub.add_parser("defend", help="run a defense against an attack")
    p.add_argument("name")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--attack", default=None, help="attack registry name (built once, cached)")
    group.add_argument("--attack-run", default=None, metavar="RUN_ID", help="reuse the attack of this MLflow run")
    _shared(p)
    p = sub.add_parser("tune", help="search a method's hyperparameters with Ray Tune")
    p.add_argument("space", help="search space YAML, e.g. search_spaces/dbr.yaml")
    p.add_argument("--attack", default=None, help="override the space's attack")
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="SWEEP_RUN_ID",
        help="continue an interrupted sweep (default: the latest unfinished one of this space)",
    )
    _shared(p)
    _tune_flags(p)
    p = sub.add_parser("study", help="attacks x defenses x seeds: tune each defense, rerun its choice per seed")
    p.add_argument("study", help="study YAML (docs/studies.md)")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="attack builds and final runs trained at once, in worker processes (default: the study's jobs, else 1)",
    )
    _shared(p)
    _tune_flags(p)
    p = sub.add_parser(
        "quickstart",
        help="the demo: one BadNets model (on digits unless --dataset says), every defense tuned against it",
    )
    p.add_argument("--quick", action="store_true", help="one trial per defense and tiny schedules")
    _knowledge(p)
    _verbose(p)
    _shared(p)
    p = sub.add_parser("ui", help="open the MLflow UI on the tracking store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument(
        "--experiment",
        type=_name,
        default=default_experiment(),
        help="the experiment whose runs page to print (default: MLFLOW_EXPERIMENT_NAME, else bdo)",
    )
    p = sub.add_parser("report", help="the paper table of a study, from MLflow")
    p.add_argument("--experiment", type=_name, default=default_experiment())
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--study", default=None, metavar="RUN_ID")
    p.add_argument(
        "--format",
        choices=("md", "csv", "html", "latex", "runs-csv"),
        default="md",
        help="md, csv, html or latex table; runs-csv: the per-seed values behind every cell",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="also write the table to FILE (folders created); an existing FILE needs --force",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--metrics", default="acc,asr", help="comma list of acc, asr, ra, der")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("bdo")
    except PackageNotFoundError:
        number = "unknown"
    from orchestrator.tracking import code_version

    commit = code_version()
    dirty = "+changes" if commit["git_dirty"] == "true" else ""
    return f"bdo {number} (git {commit['git_commit'][:12]}{dirty})"


def _dry_run_resources(plans, session) -> dict:
    """The device and GPU share a sweep would get, as far as it can be known without starting Ray."""
    from orchestrator.devices import ClusterShape, driver_device_name, resolve_gpus

    if session.address:
        return {"gpu_share": "chosen from the cluster's GPUs when the sweep starts", "cluster": session.address}
    shape = ClusterShape.local()
    resolved = [resolve_gpus(p, shape) for p in plans]
    return {
        "local_gpus": int(shape.node_gpus[0]),
        "gpus_per_trial_resolved": resolved[0].gpus_per_trial,
        "attack_device": driver_device_name(resolved[0]),
    }


def cmd_list(args) -> int:
    from orchestrator.discover import list_lines

    print("\n".join(list_lines(args.kind)))
    return 0


def cmd_describe(args) -> int:
    from orchestrator.discover import describe_lines

    print("\n".join(describe_lines(args.name)))
    return 0


def _print_run_plan(spec) -> int:
    import yaml

    from methods.core.hardware import default_device_name

    print(
        yaml.safe_dump(
            {
                "method": spec.method,
                "kind": spec.kind,
                "config": spec.config,
                "attack": spec.attack,
                "attack_config": spec.attack_config,
                "data": spec.data_config,
                "fast": spec.fast_config or "defaults (on for CUDA, off on CPU)",
                "recipe": spec.recipe,
                "presets": spec.presets,
                "device": default_device_name(),
            },
            sort_keys=False,
        ),
        end="",
    )
    return 0


# the schemes MLflow has a tracking store for (mlflow.tracking._tracking_service.utils), with an optional +driver
TRACKING_SCHEMES = (
    "sqlite",
    "file",
    "http",
    "https",
    "postgresql",
    "mysql",
    "mssql",
    "databricks",
    "databricks-uc",
    "uc",
)


def _check_folder(path: Path, what: str) -> None:
    """A folder bdo creates or writes into: refused now when it cannot be, not when the first run writes to it."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise BadInput(f"{what}: {existing} is a file, not a folder; pick another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{what}: {existing} is not writable; pick a folder you can write to")


def _check_writable_store(uri: str, db: Path) -> None:
    """SQLite writes the database file and, beside it, its journal (and bdo its creation lock): a folder or file
    it cannot write would otherwise fail only after MLflow retried opening it for about 105 s. Checked by doing:
    os.access misses a read-only mount for root, and root is refused by a read-only mount all the same."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=db.parent, prefix=f".{db.name}.write-check-"):
            pass
        if db.exists():
            with open(db, "r+b"):  # opened for writing, nothing written
                pass
    except OSError as exc:
        what = db if exc.filename == str(db) else db.parent
        raise BadInput(
            f"--tracking-uri {uri}: cannot write {what} ({exc.strerror or exc}); SQLite writes the store "
            f"and its journal file beside it, so point --tracking-uri at a database in a folder you can "
            f"write to"
        ) from None


def _check_tracking_uri(uri: str, write: bool = True) -> str:
    """A store MLflow cannot open, a SQLite file it cannot create or write, or one that is damaged, refused before
    anything is written. `write`: the command writes runs (not bdo ui or bdo report, which only read)."""
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise BadInput(
            f"--tracking-uri {uri}: unknown scheme {scheme!r}; use sqlite:///PATH (or a bare PATH), "
            f"http(s)://HOST:PORT of a tracking server, or a database URI such as postgresql://..."
        )
    if scheme == "sqlite":  # SQLite creates the file, not its folder
        from orchestrator.tracking import damaged_store, sqlite_damage, sqlite_path

        db = sqlite_path(uri)
        if db.is_dir():
            raise BadInput(f"--tracking-uri {uri}: {db} is a folder; name the database file, e.g. {db / 'mlflow.db'}")
        if not db.exists():
            _check_folder(db.parent, f"--tracking-uri {uri}")
            if not db.parent.is_dir():
                raise BadInput(f"--tracking-uri {uri}: the folder {db.parent} does not exist; create it first")
        elif problem := sqlite_damage(db):
            raise damaged_store(uri, db, problem)
        if write:
            _check_writable_store(uri, db)
    return uri


def _check_device(cpu_only: bool = False) -> None:
    """BDO_DEVICE names where runs train (methods.core.hardware): a device torch cannot parse, or a GPU this
    process cannot see, would fail the first run after its store and run were created. `cpu_only`: the command
    was told to keep everything on the CPU (--gpus-per-trial 0), so only a malformed value is refused."""
    requested = os.environ.get("BDO_DEVICE", "").strip()
    if not requested:
        return
    kind, colon, index = requested.partition(":")
    if kind not in ("cpu", "cuda") or (colon and not index.isdigit()):
        raise BadInput(
            f"BDO_DEVICE={requested!r}: not a device; use cpu, cuda or cuda:N, or unset it "
            "(the first GPU, else the CPU)"
        )
    if kind != "cuda" or cpu_only:
        return
    from methods.core.hardware import visible_gpu_count

    count = visible_gpu_count()
    if count == 0:
        raise BadInput(
            f"BDO_DEVICE={requested!r}: no CUDA device is visible to this process; set BDO_DEVICE=cpu or unset it"
        )
    if colon and int(index) >= count:
        raise BadInput(
            f"BDO_DEVICE={requested!r}: this process sees {count} GPU(s), cuda:0 to cuda:{count - 1}; "
            "pick one of those or unset BDO_DEVICE"
        )


def _session(args):
    from methods.data.configs import default_data_root
    from orchestrator.session import Session
    from orchestrator.tracking import resolve_tracking_uri

    _check_device(cpu_only=getattr(args, "gpus_per_trial", None) == 0)
    storage = Path(args.storage).expanduser().resolve()
    _check_folder(storage, f"--storage {args.storage}")
    tracking_uri = _check_tracking_uri(resolve_tracking_uri(args.tracking_uri))
    data_root = Path(args.data_root).expanduser().resolve() if args.data_root else default_data_root()
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):  # the dashboard's Jobs API, a common mix-up
        source = "--address" if args.address else "RAY_ADDRESS"
        raise BadInput(
            f"{source} {address}: --address wants the GCS address (host:6379, or auto on a cluster "
            "node); http://<head>:8265 is the dashboard's address, which is what ray job submit takes"
        )
    return Session(
        tracking_uri,
        args.experiment,
        storage,
        data_root,
        args.download,
        address,
        verbose=getattr(args, "verbose", False),
        shared_storage=args.shared_storage,
    )


def _require_store(uri: str, flag: str) -> None:
    """A flag that points into an existing store must not create an empty one when the store is missing."""
    from orchestrator.tracking import sqlite_path

    if (db := sqlite_path(uri)) is not None and not db.is_file():
        raise BadInput(
            f"{flag}: there is no MLflow store at {uri}; pass --tracking-uri of the store that holds the run"
        )


def cmd_attack(args) -> int:
    from orchestrator.execute import run_single
    from orchestrator.resolve import check_data, method_spec, parse_set, resolve_run

    method_spec(args.name, "attack")
    spec = resolve_run(
        args.name,
        args.dataset or "digits",
        args.model or "small_cnn",
        args.seed,
        sets=parse_set(args.set),
        use_preset=not args.no_preset,
        recipe=args.recipe,
    )
    session = _session(args)
    check_data(spec, session)
    if args.dry_run:
        return _print_run_plan(spec)
    run_id, metrics = run_single(session, spec)
    print(f"attack run {run_id}: test_acc={metrics['test_acc']:.3f} test_asr={metrics['test_asr']:.3f}")
    return 0


def _attack_from_run(args, session) -> tuple[str, dict, dict]:
    _require_store(session.tracking_uri, f"--attack-run {args.attack_run}")
    tracker = session.open_tracker()
    try:
        run = tracker.client.get_run(args.attack_run)
    except Exception:
        raise BadInput(f"--attack-run {args.attack_run}: no such run in {session.tracking_uri}") from None
    from orchestrator.resolve import read_yaml

    if run.data.tags.get("role") != "attack":
        raise BadInput(f"--attack-run {args.attack_run}: not an attack run (role={run.data.tags.get('role')})")
    path = tracker.client.download_artifacts(args.attack_run, "config.yaml")
    resolved = read_yaml(Path(path).read_text())
    return resolved["method"], resolved["config"], resolved["data"]


def cmd_defend(args) -> int:
    from orchestrator.execute import run_single
    from orchestrator.resolve import check_data, method_spec, parse_set, resolve_run

    method_spec(args.name, "defense")
    sets = parse_set(args.set)
    session = _session(args)
    attack_base = data_base = None
    attack = args.attack
    if args.attack_run:
        attack, attack_base, data_base = _attack_from_run(args, session)
    spec = resolve_run(
        args.name,
        args.dataset or (attack_base or {}).get("dataset", "digits"),
        args.model or (attack_base or {}).get("model", "small_cnn"),
        args.seed,
        attack,
        sets=sets,
        attack_base=attack_base,
        data_base=data_base,
        use_preset=not args.no_preset and not args.attack_run,
        recipe=args.recipe,
        check_files=not args.attack_run,
    )  # that run's model is used, its trigger image never read
    check_data(spec, session)
    given = None
    if args.attack_run:
        from orchestrator.execute import attack_of_run

        backdoor, key = attack_of_run(session.open_tracker(), args.attack_run, session.storage)
        given = (backdoor, key, args.attack_run)
    if args.dry_run:
        return _print_run_plan(spec)
    run_id, metrics = run_single(session, spec, given_attack=given)
    print(
        f"defense run {run_id}: test_acc={metrics.get('test_acc', float('nan')):.3f} "
        f"test_asr={metrics.get('test_asr', float('nan')):.3f} test_der={metrics.get('test_der', float('nan')):.3f}"
    )
    return 0


def _check_failures(args) -> None:
    if args.max_failures < 0:  # Ray reads -1 as "retry forever"
        raise BadInput(f"--max-failures {args.max_failures}: 0 or more retries of a failed trial")


def _plan(args, space_path: Path, quick: bool = False):
    from orchestrator.resolve import parse_set
    from orchestrator.spaces import load_space, plan_sweep

    space = load_space(space_path)
    return plan_sweep(
        space,
        dataset=args.dataset,
        model=args.model,
        seed=args.seed,
        attack=getattr(args, "attack", None),
        sets=parse_set(args.set),
        use_preset=not args.no_preset,
        quick=quick or getattr(args, "quick", False),
        searcher=args.searcher,
        scheduler=args.scheduler,
        objective=args.objective,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        workers_per_trial=args.workers_per_trial,
        default_trial=not getattr(args, "no_default_trial", False),
        knowledge=args.knowledge,
        recipe=args.recipe,
    )


def _check_local_resources(plans, session) -> None:
    """A local Ray gets this machine's CPUs and GPUs: CPUs or a GPU share per trial that it cannot give are bad
    input before Ray starts (Ray would wait for them for ever, after the attack was built). On a cluster the same
    check runs against its nodes once connected, still before the attack is built (session.check_resources); so
    does it locally, with the CPUs Ray itself counts (fewer than os.cpu_count() in a CPU-limited container)."""
    if session.address:
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():  # a caller's own Ray (tests, benchmarks),
        return  # whatever CPUs it declared: checked against it once the sweep asks (runner.run_sweep)
    from orchestrator.devices import ClusterShape
    from orchestrator.session import check_resources

    check_resources(plans, ClusterShape.local(), session.largest_node())


def cmd_tune(args) -> int:
    from orchestrator.resolve import check_data
    from orchestrator.runner import find_resumable_sweep, format_trials, run_sweep

    _check_failures(args)
    plan = _plan(args, Path(args.space))
    session = _session(args)
    check_data(plan.base, session)
    _check_local_resources([plan], session)
    if args.dry_run:
        from orchestrator.discover import plan_text

        print(plan_text([plan], _dry_run_resources([plan], session)), end="")
        return 0
    resume = None
    if args.resume is not None:  # a bad id is bad input: said before Ray starts
        _require_store(session.tracking_uri, "--resume")
        resume = find_resumable_sweep(session.open_tracker(), plan, session.storage, args.resume or None)
    session.start_ray()
    try:
        result = run_sweep(session, plan, resume_run_id=resume, max_failures=args.max_failures)
    except Interrupted as stop:
        if stop.partial is not None:  # the trials so far, the cut ones marked
            print(format_trials(stop.partial, plan.space.metric))
            print(f"sweep run {stop.partial.sweep_run_id} interrupted; the same command with --resume continues it")
        raise
    finally:
        session.stop_ray()
    print(format_trials(result, plan.space.metric))
    if plan.objective == "pareto":
        print("Pareto front (val_acc max, val_asr min): " + ", ".join(t["trial_id"] for t in result.pareto))
    print(f"sweep run {result.sweep_run_id}; open the UI with: bdo ui --tracking-uri {session.tracking_uri}")
    return 1 if result.failed else 0


def cmd_study(args) -> int:
    from orchestrator.study import load_study, run_study

    _check_failures(args)
    study = load_study(Path(args.study), args)
    session = _session(args)
    plans = list(study.sweeps.values()) + list(study.blind_sweeps.values())
    _check_local_resources(plans, session)
    if args.dry_run:
        from orchestrator.discover import plan_text

        print(
            f"study {study.name}: {len(study.attacks)} attacks x {len(study.defenses)} defenses "
            f"x seeds {study.seeds}; {study.jobs} run(s) at a time"
            + ("; clean-model column" if study.clean else "")
            + (
                f"; blind vs oracle, the blind sweeps on {' '.join(study.blind_objective)}"
                if study.blind_objective
                else ""
            )
        )
        if study.untuned:
            print(
                "on their presets, no sweep (num_samples 0; the search: blocks below are not run): "
                + ", ".join(study.defenses[i][0] for i in sorted(study.untuned))
            )
        print(plan_text(plans, _dry_run_resources(plans, session)), end="")
        return 0
    try:
        if len(study.untuned) < len(study.defenses):  # a study that runs every defense on its presets needs no Ray
            session.start_ray()
            from orchestrator.devices import ClusterShape
            from orchestrator.session import check_resources

            # the nodes of a cluster (--address), or what a local Ray counts: before the study builds its attacks
            check_resources(plans, ClusterShape.from_ray(), session.largest_node())
        outcome = run_study(session, study, args)
    finally:
        session.stop_ray()
    print(outcome.table)
    print(
        f"study run {outcome.study_run_id}; "
        f"table: bdo report --experiment {args.experiment} --study {outcome.study_run_id}"
    )
    return 1 if outcome.failed else 0


def cmd_quickstart(args) -> int:
    from orchestrator.quickstart import run_quickstart

    session = _session(args)
    return run_quickstart(session, args)


def cmd_ui(args) -> int:
    from orchestrator.tracking import resolve_tracking_uri
    from orchestrator.ui import check_address, start_server, stop_server

    uri = resolve_tracking_uri(args.tracking_uri)
    if uri.startswith(("http://", "https://")):  # a server already runs there (the cluster's): only say where
        from orchestrator.ui import served_runs_page

        print(f"runs of experiment {args.experiment}: {served_runs_page(uri, args.experiment)}", flush=True)
        return 0
    _check_tracking_uri(uri, write=False)
    check_address(args.host, args.port)
    from orchestrator.tracking import sqlite_path

    if (db := sqlite_path(uri)) is not None and not db.is_file():
        raise BadInput(f"--tracking-uri {uri}: no MLflow store there yet; run bdo quickstart or bdo tune first")
    from mlflow.tracking import MlflowClient

    from orchestrator.ui import runs_page

    experiment = MlflowClient(uri).get_experiment_by_name(args.experiment)
    process, url = start_server(uri, args.host, args.port)
    try:
        print(f"MLflow UI on {url} (store {uri}); Ctrl-C stops it", flush=True)
        if experiment is not None:
            print(f"runs of experiment {args.experiment}: {runs_page(url, experiment.experiment_id)}", flush=True)
        return process.wait()
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP (orchestrator.signals): the way a UI is meant to end
        return 0
    finally:
        stop_server(process)


def cmd_report(args) -> int:
    from orchestrator.report import run_report
    from orchestrator.tracking import resolve_tracking_uri

    _check_tracking_uri(resolve_tracking_uri(args.tracking_uri), write=False)
    return run_report(args)


COMMANDS = {
    "list": cmd_list,
    "describe": cmd_describe,
    "attack": cmd_attack,
    "defend": cmd_defend,
    "tune": cmd_tune,
    "study": cmd_study,
    "quickstart": cmd_quickstart,
    "ui": cmd_ui,
    "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    # MLflow draws a progress bar on stderr for every artifact it downloads, even a few-byte config.yaml
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as stop:  # --help and --version print and stop: a normal end, not an exception
            return int(stop.code or 0)
        return COMMANDS[args.command](args)
    except BadInput as exc:
        print(f"bdo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C; under entry, any stop signal (Interrupted)
        print(f"bdo: interrupted ({stop})" if isinstance(stop, Interrupted) else "bdo: interrupted", file=sys.stderr)
        return stop.exit_code if isinstance(stop, Interrupted) else 130
    except Exception as exc:  # a run failed: say so in one line, keep the traceback for --debug users
        if os.environ.get("BDO_DEBUG"):
            raise
        print(f"bdo: run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def entry() -> None:
    catch_stop_signals()  # here, not in main: a caller of main (the tests) keeps its own handlers
    sys.exit(main())


if __name__ == "__main__":
    entry()
