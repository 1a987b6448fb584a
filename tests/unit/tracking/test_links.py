"""Where the MLflow UI shows a run, and how an MLflow run names the Prefect flow run that opened it."""

from __future__ import annotations

from lmpipe.tracking.links import FlowRunRef, mlflow_ui


def test_a_tracking_server_is_its_own_ui_and_a_store_file_says_how_to_start_one():
    server = mlflow_ui("http://mlflow.team.internal:5000/")
    assert server.command is None
    assert server.run("4", "abc") == "http://mlflow.team.internal:5000/#/experiments/4/runs/abc?workflowType=machine_learning"
    assert server.experiment("4") == "http://mlflow.team.internal:5000/#/experiments/4?workflowType=machine_learning"
    assert server.model_version("my model", "2") == (
        "http://mlflow.team.internal:5000/#/models/my%20model/versions/2?workflowType=machine_learning")
    assert server.where("http://x") == "http://x"

    local = mlflow_ui("sqlite:///w/mlflow.db")
    assert local.command == "mlflow ui --backend-store-uri sqlite:///w/mlflow.db --port 5000"
    assert local.run("1", "r") == "http://127.0.0.1:5000/#/experiments/1/runs/r?workflowType=machine_learning"
    assert local.where("http://x") == "http://x (start the UI first: `mlflow ui --backend-store-uri " \
                                      "sqlite:///w/mlflow.db --port 5000`)"


def test_a_flow_run_is_linked_when_its_api_has_a_ui_and_explained_when_not():
    served = FlowRunRef(id="f1", name="brave-otter", url="http://127.0.0.1:4200/flow-runs/flow-run/f1")
    assert served.note() == "Prefect flow run [brave-otter](http://127.0.0.1:4200/flow-runs/flow-run/f1) (id `f1`)."
    assert served.tags() == {"prefect.flow_run_id": "f1",
                             "prefect.flow_run_url": "http://127.0.0.1:4200/flow-runs/flow-run/f1"}
    temporary = FlowRunRef(id="f2", name="calm-heron", hint="`PREFECT_HOME=w/prefect prefect server start` shows it")
    assert temporary.note() == ("Prefect flow run `calm-heron` (id `f2`), on a temporary Prefect API with no UI: "
                                "`PREFECT_HOME=w/prefect prefect server start` shows it.")
    assert temporary.tags() == {"prefect.flow_run_id": "f2"}
