"""The Prefect run form: the parameter schema Prefect builds from the flows' signature, which the UI renders
as the custom-run form and the server checks a run's parameters against before the run is created."""

from __future__ import annotations

import re
from typing import Any

import pytest
from prefect.exceptions import ParameterTypeError
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import ValidationError, is_valid, validate

from flows.continual import continual
from flows.pipeline import pipeline, prepare_data
from lmpipe.config import ConfigError, PipelineConfig, load_config
from lmpipe.config.training import ModelConfig
from lmpipe.data.sources import DownloadError, check_sources

DEMO_WIKI_VALID = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"


@pytest.fixture(scope="module", params=[pipeline, prepare_data, continual], ids=["pipeline", "prepare_data", "continual"])
def schema(request: pytest.FixtureRequest) -> dict[str, Any]:
    return parameter_schema(request.param).model_dump_for_openapi()


@pytest.fixture(scope="module")
def defs() -> dict[str, Any]:
    return parameter_schema(pipeline).model_dump_for_openapi()["definitions"]


def _sections() -> set[str]:
    """Every model class the config is made of (PipelineConfig and each section under it), by name."""
    return {"PipelineConfig", *PipelineConfig.model_json_schema()["$defs"]}


def test_every_section_and_field_has_a_description(schema):
    defs = schema["definitions"]
    assert set(defs) == _sections() and len(defs) >= 20  # the form shows every section Prefect was given
    missing = [f"<parameters>.{name}" for name, p in schema["properties"].items() if not p.get("description")]
    missing += [name for name, d in defs.items() if not d.get("description")]
    missing += [f"{name}.{field}" for name, d in defs.items() for field, p in d["properties"].items()
                if not p.get("description")]
    assert missing == []
    assert sum(len(d["properties"]) for d in defs.values()) > 200


def _descriptions(schema: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(f"<parameters>.{n}", p["description"]) for n, p in schema["properties"].items()]
    for name, d in schema["definitions"].items():
        out.append((name, d["description"]))
        out += [(f"{name}.{f}", p["description"]) for f, p in d["properties"].items()]
    return out


def test_placeholders_render_as_markdown(schema):
    """The UI renders a description as markdown, where `<dataset id>` outside a code span is an HTML tag that
    vanishes and `*` starts emphasis: placeholders and globs go in backticks."""
    bad = [(where, text) for where, text in _descriptions(schema)
           if re.search(r"[<*]", re.sub(r"`[^`]*`", "", text))]
    assert bad == []
    source = schema["definitions"]["SourceConfig"]["properties"]["uri"]["description"]
    assert "`hf:<dataset id>`" in source and "`data/part-*.jsonl.zst`" in source


def test_static_constraints_are_in_the_schema(defs):
    prop = {name: d["properties"] for name, d in defs.items()}
    vocab = prop["TokenizerConfig"]["vocab_size"]
    assert (vocab["minimum"], vocab["maximum"]) == (257, 2**32 - 1)  # bytes + the one special token there must be
    assert "at least the byte alphabet (256) plus the special tokens: 261 with the 5 default ones" \
        in vocab["description"]
    specials = prop["TokenizerConfig"]["special_tokens"]
    assert (specials["minItems"], specials["uniqueItems"], specials["items"]["minLength"]) == (1, True, 1)
    assert prop["SourceConfig"]["sha256"]["anyOf"][0] == {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}
    assert prop["SourceConfig"]["uri"]["pattern"] == r"\S"
    assert prop["PipelineConfig"]["name"]["pattern"] == "^[A-Za-z0-9_.-]+$"
    assert prop["CorpusConfig"]["sources"]["minItems"] == 1
    assert (prop["CorpusConfig"]["val_fraction"]["exclusiveMinimum"],
            prop["CorpusConfig"]["val_fraction"]["exclusiveMaximum"]) == (0.0, 1.0)
    for field in ("n_layer", "n_head", "n_embd"):
        assert prop["ModelConfig"][field]["minimum"] == 1
    assert "a multiple of n_head" in prop["ModelConfig"]["n_embd"]["description"]
    assert prop["ModelConfig"]["block_size"]["minimum"] == 2
    for section in ("TrainConfig", "ContinueFinetuneConfig", "SFTFinetuneConfig"):
        assert prop[section]["batch_size"]["anyOf"] == [{"type": "integer", "minimum": 1},
                                                        {"type": "string", "const": "auto"}]
        assert (prop[section]["seed"]["minimum"], prop[section]["seed"]["maximum"]) == (0, 2**64 - 1)
        assert prop[section]["device"]["enum"] == ["auto", "cpu", "cuda", "mps"]
    assert prop["ContinueFinetuneConfig"]["mode"]["const"] == "continue"
    assert prop["SFTFinetuneConfig"]["mode"]["const"] == "sft"
    labels = prop["ClassifyConfig"]["labels"]["anyOf"][0]
    assert (labels["minItems"], labels["uniqueItems"], labels["items"]["minLength"]) == (2, True, 1)
    assert prop["TrackingConfig"]["experiment"]["minLength"] == 1


def _params(**sections: dict[str, Any]) -> dict[str, Any]:
    config = PipelineConfig().model_dump(mode="json")
    for section, values in sections.items():
        config[section] = {**config[section], **values}
    return {"config": config}


def test_the_server_checks_a_run_against_the_schema():
    """What Prefect's server does with a deployment run's parameters (schema_tools.validate, before the run is
    created): the demo passes; a vocabulary below the byte alphabet, a malformed hash or a zero batch do not."""
    full = parameter_schema(pipeline).model_dump_for_openapi()
    assert is_valid(_params(), full)
    with pytest.raises(ValidationError) as err:
        validate(_params(tokenizer={"vocab_size": 100}), full, raise_on_error=True)
    assert str(err.value) == ("Validation failed for field 'config.tokenizer.vocab_size'. Failure reason: 100 is "
                              "less than the minimum of 257")
    bad_pin = _params()
    bad_pin["config"]["data"]["pretrain"]["sources"][0]["sha256"] = "not-a-hash"
    assert not is_valid(bad_pin, full)
    assert not is_valid(_params(pretrain={"batch_size": 0}), full)
    assert is_valid(_params(pretrain={"batch_size": "auto", "batch_tokens": 4096}), full)
    # The model section's variants: a qwen3 field is the qwen3 form's, and checked there.
    assert is_valid(_params(model={"arch": "qwen3", "n_kv_head": 2}), full)
    gpt2 = _params()
    gpt2["config"]["model"] = ModelConfig().model_dump(mode="json")
    assert is_valid(gpt2, full)
    gpt2["config"]["model"]["n_kv_head"] = 2
    assert not is_valid(gpt2, full)  # arch gpt2 has no n_kv_head
    assert not is_valid(_params(model={"arch": "qwen3", "n_kv_head": 0}), full)


def test_a_vocabulary_below_the_real_minimum_fails_at_load_and_at_flow_start():
    """258 passes the form (the schema can only say 257: one special token), and fails with its real minimum when
    the config is loaded (CLI) and when the flow validates its parameters (a worker, before any stage)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["tokenizer.vocab_size=258"])
    assert str(err.value) == (
        "invalid configuration (defaults + overrides tokenizer.vocab_size=258):\n"
        "  tokenizer.vocab_size: 258 is too small: the byte alphabet (256) plus 5 special token(s) needs at least "
        "261 (got 258)")
    with pytest.raises(ParameterTypeError) as perr:
        pipeline.validate_parameters(_params(tokenizer={"vocab_size": 258}))
    assert str(perr.value) == (
        "Flow run received invalid parameters:\n"
        " - config.tokenizer.vocab_size: Value error, 258 is too small: the byte alphabet (256) plus 5 special "
        "token(s) needs at least 261")


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seeds_outside_the_generators_range_fail_at_load(seed):
    with pytest.raises(ConfigError, match=r"pretrain.seed: Input should be (greater|less) than or equal to "):
        load_config(None, [f"pretrain.seed={seed}"])


def test_a_uri_changed_under_the_demo_pin_fails_before_any_stage_and_says_what_to_do(tmp_path):
    """The run form pre-fills the demo's sources with their sha256 pins; a user who edits only `uri` gets an
    error, at preflight, that names the field, the uri, both hashes and the way out."""
    mine = tmp_path / "mine.txt"
    mine.write_text("hello\n", encoding="utf-8")
    params = _params()
    params["config"]["data"]["pretrain"]["sources"][0]["uri"] = str(mine)
    config = PipelineConfig.model_validate(params["config"])
    assert config.data.pretrain.sources[0].sha256 == DEMO_WIKI_VALID  # the pin the form kept
    with pytest.raises(DownloadError) as err:
        check_sources(config.data.pretrain, "data.pretrain")
    actual = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"  # sha256 of "hello\n"
    assert str(err.value) == (
        f"data.pretrain.sources[0].sha256: {str(mine)!r} has sha256 {actual}, expected {DEMO_WIKI_VALID}; if you "
        f"changed data.pretrain.sources[0].uri, clear sha256 or pin the new file's hash (sha256: {actual})")
    # Either way out works: no pin, or the new file's.
    for pin in (None, actual):
        params["config"]["data"]["pretrain"]["sources"][0]["sha256"] = pin
        check_sources(PipelineConfig.model_validate(params["config"]).data.pretrain, "data.pretrain")
    # The demo's own files still match their pins.
    check_sources(PipelineConfig().data.pretrain, "data.pretrain")
