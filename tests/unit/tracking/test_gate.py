"""The champion gate does not decide on too little held-out data: the version is registered and tagged as not
decided, and no champion alias moves on it. Real SQLite stores, real registrations."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from lmpipe.config.evaluation import TrackingConfig
from lmpipe.stages.register import run_register
from lmpipe.tracking.registry import DECISION_DETAIL_TAG, DECISION_TAG, held_out_shortfall, recorded_decision
from lmpipe.tracking.runs import close_run, open_pipeline_run, stage_run
from tests.unit.tracking.test_registration import models, registry  # noqa: F401 - the fixture, shared

SFT = "finetuned.sft/val.bits_per_byte"


def too_few(what: str, amount: str, key: str, field: str, minimum: str, metric: str = SFT) -> str:
    return (f"{metric} was scored on {amount} {what} ({key}), fewer than tracking.{field}={minimum}: too few to "
            f"tell the models apart (the champion is kept; score on more held-out data, or lower tracking.{field})")


@pytest.mark.parametrize(
    ("metric", "evaluation", "reason"),
    [
        # The case: one held-out SFT example of 14 tokens.
        (SFT, {"finetuned.sft/val.examples": 1, "finetuned.sft/val.tokens": 14},
         too_few("held-out example", "1", "finetuned.sft/val.examples", "min_held_out_examples", "30")),
        (SFT, {"finetuned.sft/val.examples": 300, "finetuned.sft/val.tokens": 999},
         too_few("held-out tokens", "999", "finetuned.sft/val.tokens", "min_held_out_tokens", "1,000")),
        (SFT, {"finetuned.sft/val.examples": 29, "finetuned.sft/val.tokens": 5000},
         too_few("held-out examples", "29", "finetuned.sft/val.examples", "min_held_out_examples", "30")),
        (SFT, {"finetuned.sft/val.examples": 30, "finetuned.sft/val.tokens": 1000}, None),
        ("finetuned.shake.loss", {"finetuned.shake.tokens": 999},
         too_few("held-out tokens", "999", "finetuned.shake.tokens", "min_held_out_tokens", "1,000",
                 "finetuned.shake.loss")),
        ("finetuned.shake.perplexity", {"finetuned.shake.tokens": 32768}, None),
        ("finetuned.piqa.acc_norm", {"finetuned.piqa.n": 20, "finetuned.piqa.tokens": 5},
         too_few("benchmark items", "20", "finetuned.piqa.n", "min_held_out_examples", "30",
                 "finetuned.piqa.acc_norm")),
        ("finetuned.piqa.acc", {"finetuned.piqa.n": 1838}, None),
        ("finetuned.shake.loss", {}, None),  # no amount logged: nothing to hold it to
    ],
)
def test_the_shortfall_names_the_amount_the_minimum_and_what_to_do(metric, evaluation, reason) -> None:
    cfg = TrackingConfig()
    assert (cfg.min_held_out_examples, cfg.min_held_out_tokens) == (30, 1000)
    assert held_out_shortfall(metric, evaluation, min_examples=30, min_tokens=1000) == reason


def register(workdir, fingerprint, finetuned, tokenizer, evaluation, cfg=None):
    cfg = cfg or TrackingConfig(registered_model="m")
    ctx = open_pipeline_run(cfg, workdir, "pipeline", {}, {})
    with stage_run(ctx, "register", fingerprint, {}) as run:
        run.log_metrics(evaluation)
        result = run_register(cfg, ctx, run, finetuned, tokenizer, workdir / "register" / fingerprint, fingerprint,
                              metric=SFT, evaluation=evaluation)
    close_run(ctx, ctx.parent_run_id, "FINISHED")
    return result, MlflowClient(ctx.uri), run.run_id


def test_too_little_held_out_data_registers_the_version_undecided(workdir, models, tokenizer) -> None:  # noqa: F811
    small = {SFT: 2.0, "finetuned.sft/val.examples": 1.0, "finetuned.sft/val.tokens": 14.0}
    first, client, run_id = register(workdir, "reg-a", models[0], tokenizer, small)
    reason = "not decided: " + too_few("held-out example", "1", "finetuned.sft/val.examples",
                                       "min_held_out_examples", "30")
    decision = first.meta["promotion"]
    assert (decision["promoted"], decision["decided"], decision["reason"]) == (False, False, reason)
    assert first.metrics["decided"] == 0.0 and first.metrics["promoted"] == 0.0
    # No champion yet, and none made of this version: only the candidate alias moves.
    assert registry(client) == {"1": ["candidate"]}
    tags = client.get_model_version("m", "1").tags
    assert tags[DECISION_TAG] == reason
    run_tags = client.get_run(run_id).data.tags
    assert (run_tags[DECISION_TAG], run_tags[DECISION_TAG + ".decided"]) == (reason, "False")
    # A killed registration completed later returns the same undecided decision and moves no champion alias.
    client.delete_registered_model_alias("m", "candidate")
    assert recorded_decision(client, "m", "1", alias="champion", aliases=("candidate",)) == decision
    assert registry(client) == {"1": ["candidate"]}
    client.delete_model_version_tag("m", "1", DECISION_DETAIL_TAG)  # an older registration: the text tag alone
    assert recorded_decision(client, "m", "1", alias="champion")["decided"] is False

    # Enough held-out data: decided (no champion yet: promoted). Then too little again: the champion stays.
    enough = {SFT: 2.5, "finetuned.sft/val.examples": 40.0, "finetuned.sft/val.tokens": 1200.0}
    second, _, _ = register(workdir, "reg-b", models[1], tokenizer, enough)
    assert second.meta["promotion"]["decided"] and second.meta["promotion"]["reason"] == "no @champion yet"
    assert registry(client) == {"1": [], "2": ["candidate", "champion"]}
    lowered = TrackingConfig(registered_model="m", min_held_out_examples=1, min_held_out_tokens=10)
    third, _, _ = register(workdir, "reg-c", models[0], tokenizer, small, lowered)
    assert third.meta["version"] == "1"  # the same weights: the version's recorded decision stands
    assert third.meta["promotion"]["reason"] == reason and registry(client) == {"1": ["candidate"], "2": ["champion"]}
