"""Concurrent writers to one fresh MLflow store: a study's trials start together and log the same datasets."""

from __future__ import annotations

import multiprocessing

from orchestrator.tracking import DatasetRecord, Tracker

WRITERS = 6


def log_the_shared_dataset(uri: str, barrier, results) -> None:
    tracker = Tracker(uri, experiment="race")
    run_id = tracker.start_run("trial", {})
    record = DatasetRecord("digits-train", "d1g35t", "training", {"dataset": "digits"}, {"rows": 1})
    barrier.wait()  # every writer looks the dataset up before any has inserted it
    try:
        tracker.log_datasets(run_id, [record])
        results.put("ok")
    except Exception as error:  # reported to the test, which names it
        results.put(f"{type(error).__name__}: {error}")


def test_trials_logging_one_new_dataset_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri, experiment="race")  # the store and experiment exist; the dataset row does not
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(WRITERS), context.Queue()
    writers = [context.Process(target=log_the_shared_dataset, args=(uri, barrier, results)) for _ in range(WRITERS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    outcomes = [results.get(timeout=5) for _ in writers]
    assert outcomes == ["ok"] * WRITERS
    runs = Tracker(uri, experiment="race")
    for run in runs.client.search_runs([runs.experiment_id]):
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["digits-train"]
