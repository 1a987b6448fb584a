"""What a run reports at the end: the table `lmpipe run` prints (stages, evaluation, registry, where to look) and
the markdown summary every flow run publishes as its first Prefect artifact (its MLflow runs, linked)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lmpipe.tracking.links import link, mlflow_ui


def format_summary(summary: dict[str, Any], seconds: float) -> str:
    """The flow's summary (``Ledger.summary``) as the table `lmpipe run` ends with."""
    lines = _stage_rows(summary["stages"], seconds)
    lines += _evaluation_rows(summary["metrics"].get("evaluate", {}))
    classifier = summary["metrics"].get("classify")
    if classifier:
        lines += ["", f"classifier: accuracy {classifier['accuracy']:.3f}, macro-F1 {classifier['macro_f1']:.3f} "
                      "on the held-out examples"]
    lines += _registry_rows(summary.get("registered"))
    return "\n".join(lines + _where_to_look(summary))


def _stage_rows(stages: list[dict[str, Any]], seconds: float) -> list[str]:
    width = max([28, *(len(s["label"]) + 3 for s in stages)])  # corpus names make labels long
    lines = ["", f"{'stage':<{width}}{'status':<8}{'seconds':>9}  output", "-" * (width + 50)]
    lines += [f"{s['label']:<{width}}{s['status']:<8}{s['seconds']:>9.1f}  {s['out_dir']}" for s in stages]
    lines.append(f"{'total (incl. start-up)':<{width + 8}}{seconds:>9.1f}")
    return lines


def _evaluation_rows(evaluation: dict[str, float]) -> list[str]:
    lines: list[str] = []
    held_out = sorted(k.removesuffix(".loss") for k in evaluation if k.endswith(".loss"))
    if held_out:
        lines += ["", f"{'model':<12}{'corpus':<20}{'loss':>8}{'ppl':>10}{'bits/byte':>11}"]
    for stem in held_out:
        model, corpus = stem.split(".", 1)  # model names have no dots; corpus names may
        lines.append(f"{model:<12}{corpus:<20}{evaluation[stem + '.loss']:>8.3f}"
                     f"{evaluation[stem + '.perplexity']:>10.1f}{evaluation[stem + '.bits_per_byte']:>11.3f}")
    choice = sorted(k.removesuffix(".acc_norm") for k in evaluation if k.endswith(".acc_norm"))
    if choice:
        lines += ["", f"{'model':<12}{'benchmark':<20}{'acc':>8}{'acc_norm':>10}"]
    for stem in choice:
        model, bench = stem.split(".", 1)
        lines.append(f"{model:<12}{bench:<20}{evaluation[stem + '.acc']:>8.3f}{evaluation[stem + '.acc_norm']:>10.3f}")
    return lines


def _registry_rows(registered: dict[str, Any] | None) -> list[str]:
    if not registered:
        return []
    version = registered["version"]
    lines = ["", f"registered model: {registered['model_uri']} (version {version})"]
    decision = registered.get("promotion")
    if decision:
        lines.append(f"champion gate:    {'promoted to' if decision['promoted'] else 'not promoted to'} "
                     f"@{decision['alias']}: {decision['reason']}")
    now = registered.get("aliases_now")
    for i, (alias, holder) in enumerate((now or {}).items()):
        if holder is None:
            where = f"@{alias} -> no version"
        else:
            where = f"@{alias} -> version {holder}"
        if decision and alias == decision["alias"]:  # the champion alias: the gate's decision and what came after
            if holder == version:
                note = "this run's version, " + ("promoted" if decision["promoted"] else "moved to it since")
            elif decision["promoted"]:
                note = f"this run's version {version} was promoted, and replaced since"
            else:
                note = f"this run's version {version} was not promoted"
        else:
            note = "this run's version" if holder == version else f"moved since this run registered version {version}"
        lines.append(f"{'aliases now:' if i == 0 else '':<18}{where} ({note})")
    return lines


def _where_to_look(summary: dict[str, Any]) -> list[str]:
    uri = summary["tracking_uri"]
    ui = mlflow_ui(uri)
    lines = [
        "",
        f"artifacts:   {summary['workdir']}",
        f"MLflow run:  {summary['mlflow_run_id']} in {uri}",
        f"MLflow UI:   {ui.run(summary['experiment_id'], summary['mlflow_run_id'])}",
    ]
    if ui.command:
        lines.append(f"             (start it first: {ui.command})")
    if "PREFECT_API_URL" in os.environ:
        lines.append(f"Prefect UI:  {os.environ['PREFECT_API_URL'].removesuffix('/api')}")
    else:
        lines.append(f"Prefect UI:  {prefect_server_command()}   # then open http://127.0.0.1:4200")
    return lines


def prefect_server_command() -> str:
    """How to open the UI on the runs a temporary Prefect API recorded: a server on the same PREFECT_HOME."""
    return f"PREFECT_HOME={os.environ.get('PREFECT_HOME', '~/.prefect')} prefect server start"


def summary_markdown(summary: dict[str, Any], flow_name: str, status: str,
                     stage_runs: Mapping[str, str | None]) -> str:
    """The flow run's summary artifact: its MLflow run and experiment (linked), the registered version, and each
    stage with the MLflow run that built it (``stage_runs``: label -> run id; a reused stage's is the earlier run
    that built its directory; None: no run, e.g. chunk tasks, which their stage's run reports)."""
    uri, exp, parent = summary["tracking_uri"], summary["experiment_id"], summary["mlflow_run_id"]
    ui = mlflow_ui(uri)
    lines = [f"# lmpipe {flow_name}: {status}", "",
             f"MLflow run {link(parent, ui.run(exp, parent))} in experiment {link(exp, ui.experiment(exp))} "
             f"(tracking URI `{uri}`); work directory `{summary['workdir']}`."]
    if ui.command:
        lines += ["", f"No MLflow server serves this store: start the UI with `{ui.command}`, then the links open."]
    registered = summary.get("registered")
    if registered:
        name, version = registered["name"], registered["version"]
        lines += ["", f"Registered {link(f'{name} version {version}', ui.model_version(name, version))} "
                      f"(`{registered['model_uri']}`)."]
        decision = registered.get("promotion")
        if decision:
            lines.append(f"Champion gate: {'promoted to' if decision['promoted'] else 'not promoted to'} "
                         f"@{decision['alias']}: {decision['reason']}.")
        now = registered.get("aliases_now") or {}
        if now:
            lines.append("Aliases now: " + ", ".join(f"@{alias} → " + ("no version" if v is None else f"version {v}")
                                                     for alias, v in now.items()) + ".")
    if summary["stages"]:
        lines += ["", "| stage | status | seconds | MLflow run (reused: the run that built it) |",
                  "|---|---|---:|---|"]
        for s in summary["stages"]:
            run_id = stage_runs.get(s["label"])
            where = link(run_id, ui.run(exp, run_id)) if run_id else "–"
            lines.append(f"| {s['label']} | {s['status']} | {s['seconds']:.1f} | {where} |")
    return "\n".join(lines) + "\n"
