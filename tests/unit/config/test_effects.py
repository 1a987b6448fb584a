"""What changing a config field changes is declared on the field and read by fingerprints and resumption alike."""

from __future__ import annotations

import pytest
from pydantic import Field

from lmpipe.config import (
    ClassifyConfig,
    ContinueFinetuneConfig,
    PipelineConfig,
    SFTFinetuneConfig,
    TrainConfig,
    field_effect,
    fingerprinted,
    load_config,
    trajectory,
)
from lmpipe.config.training import Cadence, EarlyStopping, Optimizer, Runtime

# Neither the fingerprint nor a resume looks at these.
NO_EFFECT = {"eval_interval", "log_interval", "checkpoint_interval", "threads", "peak_flops"}
# Fingerprinted (the figures may change) but a checkpoint resumes across them: the global batch is compared instead.
EXECUTION = {"eval_batches", "device", "batch_size", "grad_accum_steps", "batch_tokens", "compile",
             "precision"}


@pytest.mark.parametrize("section", [TrainConfig(), ContinueFinetuneConfig(), SFTFinetuneConfig(sft_path="c.jsonl")])
def test_training_fields_split_into_output_execution_and_none(section):
    fields = set(section.model_dump())
    distributed = {"distributed"} if isinstance(section, TrainConfig) else set()
    # Pretraining defaults to Muon; fine-tuning to AdamW, whose runs Muon's settings cannot change.
    idle = NO_EFFECT | ({"muon"} if section.optimizer == "adamw" else set())
    assert (type(section) is TrainConfig) == (section.optimizer == "muon")
    assert fields - set(fingerprinted(section)) == idle
    assert fields - set(trajectory(section)) == idle | EXECUTION | distributed
    assert {f for f in fields if field_effect(section, f) == "execution"} == EXECUTION | distributed
    assert fingerprinted(section) == {k: v for k, v in section.model_dump(mode="json").items() if k not in idle}


@pytest.mark.parametrize("section", [TrainConfig(), ContinueFinetuneConfig()])
def test_muon_settings_count_only_when_muon_trains(section):
    tuned = {"muon": section.muon.model_copy(update={"lr": 0.05})}
    muon = section.model_copy(update={"optimizer": "muon"})
    adamw = section.model_copy(update={"optimizer": "adamw"})
    assert fingerprinted(muon) != fingerprinted(muon.model_copy(update=tuned))
    assert trajectory(muon)["muon"]["lr"] == 0.02 and trajectory(muon.model_copy(update=tuned))["muon"]["lr"] == 0.05
    assert fingerprinted(adamw) == fingerprinted(adamw.model_copy(update=tuned)) and "muon" not in fingerprinted(adamw)
    assert trajectory(adamw) == trajectory(adamw.model_copy(update=tuned))


@pytest.mark.parametrize("section", [TrainConfig(), ContinueFinetuneConfig()])
def test_eval_interval_counts_only_with_early_stopping(section):
    stopping = section.model_copy(update={"early_stopping_patience": 2})
    assert field_effect(section, "eval_interval") == "none"
    assert field_effect(stopping, "eval_interval") == "output"
    assert fingerprinted(stopping)["eval_interval"] == trajectory(stopping)["eval_interval"] == 100
    idle = NO_EFFECT - {"eval_interval"} | ({"muon"} if section.optimizer == "adamw" else set())
    assert set(stopping.model_dump()) - set(fingerprinted(stopping)) == idle


def test_classify_shares_the_sections_and_its_validation_cadence_decides_nothing():
    cfg = ClassifyConfig(path="l.csv")
    assert all(isinstance(cfg, s) for s in (Optimizer, Runtime, Cadence)) and not isinstance(cfg, EarlyStopping)
    assert set(cfg.model_dump()) - set(fingerprinted(cfg)) == {"eval_interval"}
    assert (cfg.eval_interval, cfg.learning_rate, cfg.weight_decay) == (50, 5e-4, 0.01)  # its own defaults
    with pytest.raises(ValueError, match="min_lr=0.1 exceeds learning_rate=0.0005"):
        ClassifyConfig(path="l.csv", min_lr=0.1)


def test_a_redeclared_default_keeps_the_base_mark():
    class Quick(TrainConfig):
        log_interval: int = Field(1, ge=1)

    assert field_effect(Quick(), "log_interval") == "none"
    assert field_effect(Quick(), "learning_rate") == "output"  # unmarked: output


def test_finetune_modes_are_variants_and_sft_fields_exist_only_in_sft_mode():
    cfg = load_config(None)
    assert isinstance(cfg.finetune, ContinueFinetuneConfig) and not hasattr(cfg.finetune, "sft_path")
    assert not hasattr(cfg.finetune, "distributed")
    sft = load_config(None, ["finetune.mode=sft", "finetune.sft_path=chat.jsonl", "finetune.sft_layout=packed"])
    assert isinstance(sft.finetune, SFTFinetuneConfig)
    assert (sft.finetune.sft_path, sft.finetune.sft_layout) == ("chat.jsonl", "packed")
    assert sft.champion_metric() == "finetuned.sft/val.bits_per_byte"
    # a dump validates back to the same variant (YAML, the Prefect form's JSON)
    assert PipelineConfig.model_validate(sft.model_dump(mode="json")) == sft
    assert PipelineConfig.model_validate({"finetune": {"max_steps": 3}}).finetune == ContinueFinetuneConfig(max_steps=3)


def test_the_flow_parameter_schema_builds():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    schema = parameter_schema(pipeline.fn).model_dump()
    finetune = schema["definitions"]["PipelineConfig"]["properties"]["finetune"]
    assert [v["$ref"].rsplit("/", 1)[-1] for v in finetune["anyOf"]] == ["ContinueFinetuneConfig", "SFTFinetuneConfig"]
    assert "sft_path" in schema["definitions"]["SFTFinetuneConfig"]["properties"]
    assert "sft_path" not in schema["definitions"]["ContinueFinetuneConfig"]["properties"]
