"""`bdo quickstart`: the embedded demo. One BadNets model on digits, then a small search for every registered
defense against it in one Ray session, and a table of what each selected trial reached."""

from __future__ import annotations

import math
import time

from methods.core.knowledge import BLIND
from methods.core.method import method_names
from orchestrator.resolve import SEARCH_SPACES
from orchestrator.runner import run_sweep
from orchestrator.session import Session
from orchestrator.spaces import load_space, plan_sweep


def run_quickstart(session: Session, args) -> int:
    from orchestrator.resolve import check_data, parse_set

    started = time.perf_counter()
    defenses = [n for n in method_names("defense") if (SEARCH_SPACES / f"{n}.yaml").is_file()]
    plans = []
    for name in defenses:
        space = load_space(SEARCH_SPACES / f"{name}.yaml")
        if args.knowledge == BLIND:
            # the demo's spaces select on val_asr, which reads the trigger; val_acc is the blind metric every
            # defense reports, so a blind demo selects on it (under the spaces' accuracy constraint, which is
            # blind) rather than refusing every defense
            space.metric, space.mode = "val_acc", "max"
        plans.append(
            plan_sweep(
                space,
                dataset=args.dataset or "digits",
                model=args.model or "small_cnn",
                seed=args.seed,
                attack="badnets",
                sets=parse_set(args.set),
                use_preset=not args.no_preset,
                quick=args.quick,
                num_samples=1 if args.quick else 2,
                scheduler="fifo",
                max_concurrent=2,
                knowledge=args.knowledge,
                recipe=args.recipe,
            )
        )
    check_data(plans[0].base, session)  # --dataset, --data-root and --download apply here as everywhere
    session.start_ray()
    rows, failed = [], 0
    try:
        for plan in plans:
            print(
                f"--- {plan.base.method}: {len(plan.tuned)} tuned parameters, {plan.num_samples} trial(s)", flush=True
            )
            result = run_sweep(session, plan, extra_tags={"quickstart": "true"})
            failed += result.failed
            best = result.best or {}
            rows.append((plan.base.method, best))
    finally:
        session.stop_ray()
    header = f"{'defense':<8} {'val_acc':>8} {'val_asr':>8} {'test_acc':>9} {'test_asr':>9} {'test_der':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, best in rows:
        cells = [best.get(k, math.nan) for k in ("val_acc", "val_asr", "test_acc", "test_asr", "test_der")]
        print(f"{name:<8} " + " ".join(f"{c:>8.3f}" if i < 2 else f"{c:>9.3f}" for i, c in enumerate(cells)))
    print(f"\nselected on validation metrics; {len(rows)} defenses in {time.perf_counter() - started:.0f}s")
    print(f"open the MLflow UI: bdo ui --tracking-uri {session.tracking_uri}   (then http://127.0.0.1:5000)")
    return 1 if failed else 0
