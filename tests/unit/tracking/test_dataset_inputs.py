"""Two runs that log the same dataset at the same moment both get it as an input, and the store keeps it once.

MLflow looks a dataset up and inserts it when it is missing: two processes can both miss it and the second
insert breaks the store's unique key (seen when two configs sharing their data stages ran together).
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag

ROUNDS = 12


def _dataset() -> DatasetInput:
    return DatasetInput(Dataset(name="corpus", digest="0123456789abcdef", source_type="local",
                                source='{"uri": "shard/0123"}', profile='{"train_tokens": 1}'),
                        tags=[InputTag("mlflow.data.context", "train")])


def _log_all(uri: str, run_ids: list[str], barrier, attempts: int, failures) -> None:
    from lmpipe.tracking.runs import log_inputs

    client = MlflowClient(tracking_uri=uri)
    for run_id in run_ids:
        barrier.wait(timeout=120)  # both processes insert at once, round after round
        try:
            log_inputs(client, run_id, [_dataset()], attempts=attempts)
        except Exception as err:  # noqa: BLE001 - reported to the test, which names it
            failures.put(f"{run_id}: {type(err).__name__}: {str(err)[:200]}")


def _race(tmp_path: Path, attempts: int) -> tuple[MlflowClient, list[list[str]], list[str]]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    pairs = []
    for i in range(ROUNDS):  # a fresh experiment per round: the dataset is new to it each time
        experiment = client.create_experiment(f"e{i}")
        pairs.append([client.create_run(experiment).info.run_id for _ in range(2)])
    ctx = mp.get_context("spawn")  # no SQLAlchemy connection shared across a fork
    barrier, failures = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_log_all, args=(uri, [pair[k] for pair in pairs], barrier, attempts, failures))
             for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    found = []
    while not failures.empty():
        found.append(failures.get())
    return client, pairs, found


def test_runs_logging_one_dataset_at_once_both_get_it(tmp_path: Path) -> None:
    client, pairs, failures = _race(tmp_path, attempts=3)
    assert failures == []
    for pair in pairs:
        for run_id in pair:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("corpus", "0123456789abcdef")]
        # one dataset row per experiment: both runs point at it
        experiment = client.get_run(pair[0]).info.experiment_id
        assert {d.dataset.digest for r in client.search_runs([experiment]) for d in r.inputs.dataset_inputs} == {
            "0123456789abcdef"}
