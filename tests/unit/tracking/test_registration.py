"""Registration is idempotent: the same weights are one registered version however often the register stage runs or
is killed, a killed registration is completed (gate decision, aliases), and the summary says where the aliases
point now. Real SQLite stores, real registrations, a real SIGKILL."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lmpipe.artifacts import StageResult, sha256_file
from lmpipe.config.evaluation import TrackingConfig
from lmpipe.stages.register import run_register
from lmpipe.tracking.registry import (
    CHAMPION_BEFORE_TAG,
    DECISION_TAG,
    FINETUNE_TAG,
    WEIGHTS_TAG,
    champion_metrics,
    register_model,
)
from lmpipe.tracking.runs import close_run, open_pipeline_run, stage_run
from tests.unit.tracking.test_store import fork, wait

CFG = TrackingConfig(registered_model="m")
METRIC = "finetuned.shake.loss"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> list[StageResult]:
    """Two fine-tune stages with different weights (a tiny GPT each), as the register stage receives them."""
    import torch

    from lmpipe.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from lmpipe.model.checkpoint import export_model
    from lmpipe.model.gpt import GPT, GPTConfig
    from lmpipe.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("models")
    tok_file = tokenizer.path("tokenizer.json")
    stages = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT(GPTConfig(vocab_size=load_tokenizer(tok_file).get_vocab_size(), block_size=16, n_layer=1,
                              n_head=2, n_embd=16))
        ckpt = save_checkpoint(root / f"ckpts{seed}", 1, model, torch.optim.AdamW(model.parameters()),
                               {"tokenizer_fingerprint": tokenizer_fingerprint(tok_file)})
        export_model(ckpt, root / f"ft{seed}" / "model")
        stages.append(StageResult(stage="finetune", fingerprint=f"ft{seed}", out_dir=str(root / f"ft{seed}")))
    return stages


def evaluation(loss: float) -> dict[str, float]:
    return {METRIC: loss, "finetuned.shake.tokens": 2048.0}


def register(workdir: Path, fingerprint: str, finetuned: StageResult, tokenizer: StageResult, loss: float):
    """One pipeline run's register stage, as the register task runs it: (its result, the pipeline's context)."""
    ctx = open_pipeline_run(CFG, workdir, "pipeline", {}, {})
    with stage_run(ctx, "register", fingerprint, {}) as run:
        run.log_metrics(evaluation(loss))
        result = run_register(CFG, ctx, run, finetuned, tokenizer, workdir / "register" / fingerprint, fingerprint,
                              metric=METRIC, evaluation=evaluation(loss))
    close_run(ctx, ctx.parent_run_id, "FINISHED")
    return result, ctx


def registry(client: MlflowClient) -> dict[str, list[str]]:
    """Every version of "m" and the aliases that point at it."""
    return {str(v.version): sorted(client.get_model_version("m", v.version).aliases)
            for v in client.search_model_versions("name='m'")}


def test_the_same_weights_are_registered_once(workdir, models, tokenizer):
    first, ctx = register(workdir, "reg-a", models[0], tokenizer, 2.5)
    client = MlflowClient(ctx.uri)
    assert first.meta["version"] == "1" and not first.meta["existing"]
    assert first.meta["promotion"]["promoted"] and first.meta["promotion"]["reason"] == "no @champion yet"
    # Created with the tags that say which model it is.
    tags = client.get_model_version("m", "1").tags
    assert tags[WEIGHTS_TAG] == sha256_file(models[0].path("model/model.safetensors")) and tags[FINETUNE_TAG] == "ft0"

    # The register stage runs again for the same model (its report changed: another fingerprint): no new version,
    # no model logged again, the recorded decision (not a new gate on the new figure).
    again, _ = register(workdir, "reg-b", models[0], tokenizer, 2.4)
    assert again.meta["version"] == "1" and again.meta["existing"]
    assert again.meta["promotion"] == first.meta["promotion"]
    assert registry(client) == {"1": ["candidate", "champion"]}
    assert len(client.search_logged_models([ctx.experiment_id])) == 1

    # A kill between the gate's decision and the alias moves leaves the version decided but without its aliases.
    client.delete_registered_model_alias("m", "candidate")
    client.delete_registered_model_alias("m", "champion")
    third, _ = register(workdir, "reg-c", models[0], tokenizer, 2.5)
    assert third.meta["version"] == "1" and third.meta["promotion"] == first.meta["promotion"]
    assert registry(client) == {"1": ["candidate", "champion"]}


def test_a_registration_killed_after_its_version_was_created_is_completed(workdir, models, tokenizer):
    from lmpipe.tracking.serving import served_requirements

    ready_read, ready_write = os.pipe()

    def killed_registration() -> None:
        """The register stage up to MLflow's "Created version": the figures logged, the version created."""
        import torch

        torch.set_num_threads(1)  # a forked child: no intra-op thread pool inherited half set up
        ctx = open_pipeline_run(CFG, workdir, "pipeline", {}, {})
        with stage_run(ctx, "register", "reg-a", {}) as run:
            run.log_metrics(evaluation(2.5))
            run.flush()
            info = register_model(run, CFG, models[0].path("model"), Path(tokenizer.out_dir), served_requirements(),
                                  finetune=models[0].fingerprint)
            os.write(ready_write, f"{run.run_id} {info['version']}\n".encode())
            signal.pause()

    child = fork(killed_registration)
    killed_run, version = os.read(ready_read, 200).decode().split()
    os.kill(child, signal.SIGKILL)
    assert wait(child) == -signal.SIGKILL
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert version == "1" and registry(client) == {"1": []}
    assert DECISION_TAG not in client.get_model_version("m", "1").tags

    result, ctx = register(workdir, "reg-a", models[0], tokenizer, 2.5)
    assert result.meta["version"] == "1" and result.meta["existing"]
    assert result.meta["promotion"]["promoted"] and result.meta["promotion"]["reason"] == "no @champion yet"
    assert registry(client) == {"1": ["candidate", "champion"]}
    tags = client.get_model_version("m", "1").tags
    assert tags[DECISION_TAG] == "promoted: no @champion yet" and tags[CHAMPION_BEFORE_TAG] == "none"
    # The version's run is the killed one, marked KILLED, with the figures the next evaluation compares with.
    assert client.get_model_version("m", "1").run_id == killed_run
    assert client.get_run(killed_run).info.status == "KILLED"
    assert champion_metrics(ctx.uri, "m", "champion")["metrics"] == evaluation(2.5)


def _registry_lines(summary: dict) -> list[str]:
    from flows.summary import format_summary

    lines = format_summary(summary, 1.0).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("registered model:"))
    return lines[start: lines.index("", start)]


def test_the_summary_says_where_the_aliases_point_now(workdir, models, tokenizer):
    from flows.ledger import Ledger

    register(workdir, "reg-a", models[0], tokenizer, 2.5)
    second, ctx = register(workdir, "reg-b", models[1], tokenizer, 2.6)
    summary = Ledger(results={"register": second}).summary(ctx)
    assert summary["registered"]["aliases_now"] == {"candidate": "2", "champion": "1"}
    assert _registry_lines(summary) == [
        "registered model: models:/m@candidate (version 2)",
        "champion gate:    not promoted to @champion: finetuned.shake.loss 2.6 >= 2.5 of version 1 (min wins)",
        "aliases now:      @candidate -> version 2 (this run's version)",
        "                  @champion -> version 1 (this run's version 2 was not promoted)",
    ]

    # The first run's register stage, reused from its directory: its record is of then, the aliases are of now.
    reused, ctx = register(workdir, "reg-a", models[0], tokenizer, 2.5)
    assert reused.meta["reused"]
    assert _registry_lines(Ledger(results={"register": reused}).summary(ctx)) == [
        "registered model: models:/m@candidate (version 1)",
        "champion gate:    promoted to @champion: no @champion yet",
        "aliases now:      @candidate -> version 2 (moved since this run registered version 1)",
        "                  @champion -> version 1 (this run's version, promoted)",
    ]
