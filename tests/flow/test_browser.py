"""What a user sees, in a real browser: headless Chromium (the system's package) driven by Playwright against a real
`prefect server` that ran the tiny pipeline through a deployment and a worker, and `mlflow ui` on its store.

Screenshots go to ``$LMPIPE_TEST_OUTPUT/browser`` (default: ``test-output/browser`` in the checkout)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lmpipe.config.pipeline import PipelineConfig
from tests.conftest import REPO, tiny_config
from tests.servers import mlflow_ui, prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.deployment, pytest.mark.browser]

SHOTS = Path(os.environ.get("LMPIPE_TEST_OUTPUT", REPO / "test-output")) / "browser"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("the browser tests need Chromium: install the system package (Debian: apt-get install chromium); "
                    ".ci/run does")
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A completed deployment run of the tiny pipeline, the Prefect UI and the MLflow UI on its results."""
    root = tmp_path_factory.mktemp("browser")
    with prefect_server(root) as server:
        server.prefect("work-pool", "create", "lmpipe-local", "--type", "process")
        server.prefect("deploy", "--all")
        deployment = server.get("/deployments/name/lmpipe-pipeline/pipeline")
        cfg = tiny_config(root / "work")
        run = server.post(f"/deployments/{deployment['id']}/create_flow_run",
                          {"parameters": {"config": cfg.model_dump(mode="json")}})
        with server.worker("lmpipe-local", root):
            state = server.wait_final(run["id"], timeout=400)
        assert state == "COMPLETED", (server.logs / "worker.log").read_text()[-4000:]
        store = f"sqlite:///{Path(cfg.workdir).resolve() / 'mlflow.db'}"
        with mlflow_ui(store, server.logs) as mlflow_url:
            yield {"prefect": server, "deployment": deployment, "flow_run": run["id"], "store": store,
                   "mlflow": mlflow_url}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    yield context.new_page()
    context.close()


def _shot(page, name: str) -> Path:
    """A screenshot of the whole page. Both UIs scroll inside their own panes, which a full-page screenshot does not
    unroll, so the viewport first grows to the tallest pane's height (and goes back afterwards)."""
    path = SHOTS / f"{name}.png"
    viewport = page.viewport_size
    height = page.evaluate("() => Math.max(...Array.from(document.querySelectorAll('*'), e => e.scrollHeight))")
    page.set_viewport_size({"width": viewport["width"], "height": min(max(height, viewport["height"]), 10_000)})
    time.sleep(1)  # the panes lay out again
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(viewport)
    return path


def _settle(page, text: str, timeout_s: float = 60) -> None:
    """Until the page shows ``text`` (single-page apps render after load)."""
    page.get_by_text(text, exact=False).first.wait_for(timeout=timeout_s * 1000)


def test_the_custom_run_form_shows_every_config_section(site, page):
    ui = site["prefect"].ui
    page.goto(f"{ui}/deployments/deployment/{site['deployment']['id']}/run")
    _settle(page, "Parameters")
    time.sleep(2)
    text = page.inner_text("body")
    _shot(page, "prefect-custom-run-form")
    titles = [field.title or name.replace("_", " ").title()
              for name, field in PipelineConfig.model_fields.items()]
    missing = [t for t in titles if t not in text]
    assert not missing, f"sections not on the form: {missing}"
    # The whole form is taller than a screenshot can be: each section, scrolled to the top, has its own.
    for name, field in PipelineConfig.model_fields.items():
        if field.annotation not in (str, int, float):  # a section (a model, a union of models, or None)
            title = field.title or name.replace("_", " ").title()
            heading = page.get_by_text(re.compile(rf"^{re.escape(title)}( \(Optional\))?$")).first
            heading.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(SHOTS / f"prefect-custom-run-form-{name}.png"))


def test_the_mlflow_ui_shows_the_runs_and_the_registered_model(site, page):
    client = MlflowClient(site["store"])
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    stages = {r.info.run_name: r.info.run_id for r in runs if r is not parent}
    assert {"download/wikitext2", "clean/wikitext2", "clean/tinyshakespeare", "pretrain", "finetune", "evaluate",
            "register"} <= set(stages)

    def link(name: str):  # a link whose whole text is the run's name (not a metric or parameter named after it)
        return page.get_by_role("link", name=name, exact=True)

    # The experiment's runs view, as the README says to open it (MLflow 3 opens its GenAI view otherwise).
    runs_view = f"{site['mlflow']}/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    page.goto(runs_view)
    link(parent.info.run_name).wait_for(timeout=60_000)
    assert "Run Name" in page.inner_text("body")  # the runs table, not the GenAI view
    # The stage runs are nested under the parent: its row's expander lists them.
    page.get_by_role("gridcell").filter(has=link(parent.info.run_name)).get_by_role("button").click()
    link("clean/wikitext2").wait_for(timeout=30_000)
    _shot(page, "mlflow-runs")
    assert link(parent.info.run_name).get_attribute("href").endswith(f"/runs/{parent.info.run_id}")
    for name, run_id in stages.items():
        assert link(name).get_attribute("href").endswith(f"/runs/{run_id}"), name

    page.goto(f"{site['mlflow']}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
              "?workflowType=machine_learning")
    _settle(page, "Child runs")
    link("register").wait_for(timeout=30_000)
    _shot(page, "mlflow-parent-run")
    assert parent.info.run_name in page.inner_text("body")
    # The stage runs, listed on the parent's page, newest first (the first ten; the rest behind "Load more").
    for name in ("register", "evaluate", "finetune", "pretrain", "clean/tinyshakespeare", "clean/wikitext2"):
        assert link(name).get_attribute("href").endswith(f"/runs/{stages[name]}"), name

    page.goto(f"{site['mlflow']}/#/models/lmpipe-gpt")
    _settle(page, "Version 1")
    text = page.inner_text("body")
    _shot(page, "mlflow-registered-model")
    assert "candidate" in text and "champion" in text, text[:3000]


def test_a_completed_runs_artifacts_tab_shows_the_report_and_the_loss_curves(site, page):
    ui = site["prefect"].ui
    page.goto(f"{ui}/runs/flow-run/{site['flow_run']}")
    _settle(page, "Artifacts")
    page.get_by_text("Artifacts", exact=True).first.click()
    _settle(page, "evaluation-report")
    _shot(page, "prefect-artifacts")
    assert "pipeline-run-summary" in page.inner_text("body")
    page.get_by_text("evaluation-report").first.click()
    # The report's tables, and its loss curves embedded in it (a relative path would load nothing).
    page.wait_for_selector("img[src^='data:image/png']", timeout=60_000)
    _settle(page, "bits per UTF-8 byte")
    time.sleep(1)
    images = page.eval_on_selector_all("img", "els => els.map(e => [(e.getAttribute('src') || '').slice(0, 22), "
                                              "e.complete, e.naturalWidth])")
    text = page.inner_text("body")
    _shot(page, "prefect-evaluation-report")
    assert any(src.startswith("data:image/png") and done and width > 0 for src, done, width in images), json.dumps(
        images)
    assert "| model |" not in text and "finetuned" in text  # the tables render as tables, not as markdown source
