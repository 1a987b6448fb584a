
import pytest
import torch

from lmpipe.config.base import ConfigError
from lmpipe.config.loading import load_config
from lmpipe.config.pipeline import PipelineConfig
from lmpipe.config.training import ModelConfig, Qwen3ModelConfig
from lmpipe.stages.fingerprint import stage_fingerprint
from tests.conftest import REPO

REPO = REPO


def test_demo_preset_is_the_default():
    assert load_config(REPO / "configs" / "demo.yaml") == PipelineConfig()
    assert load_config(None) == PipelineConfig()


def test_overrides_are_typed_and_reach_nested_sections():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["pretrain.max_steps=7", "pretrain.learning_rate=1e-3", "model.bias=false",
                       "data.pretrain.val_fraction=0.25", "eval.prompts=[a, b, c]"])
    assert cfg.pretrain.max_steps == 7
    assert cfg.pretrain.learning_rate == 1e-3
    assert cfg.model.bias is False
    assert cfg.data.pretrain.val_fraction == 0.25
    assert cfg.eval.prompts == ["a", "b", "c"]
    assert cfg.model.n_layer == 2  # untouched preset value


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tokenizer.vocab_size=200", "tokenizer.vocab_size: 200 is too small: the byte alphabet (256) plus 5"),
        ("model.n_embd=30", "model.n_embd: 30 must be divisible by n_head=4"),
        ("pretrain.max_steps=0", "pretrain.max_steps: Input should be greater than or equal to 1 (got 0)"),
        ("pretrain.max_stepz=10", "pretrain.max_stepz: unknown field (got 10)"),
        ("data.pretrain.val_fraction=1.5", "data.pretrain.val_fraction: Input should be less than 1 (got 1.5)"),
        ("finetune.mode=sft", "finetune.sft_path: Field required"),
        ("finetune.mode=chat", "finetune: mode must be one of 'continue', 'sft'"),
        ("finetune.sft_path=chat.jsonl", "finetune.sft_path: unknown field (got 'chat.jsonl')"),  # mode continue
        ("tokenizer.eot_token=<eos>", "tokenizer.eot_token: eot_token '<eos>' must be one of special_tokens"),
        ("pretrain.device=tpu", "pretrain.device: Input should be 'auto', 'cpu', 'cuda' or 'mps' (got 'tpu')"),
    ],
)
def test_invalid_values_name_the_field_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config(None, ["pretrain.max_steps"])
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_vocab_floor_counts_every_special_token():
    cfg = load_config(None, ["tokenizer.special_tokens=[<|endoftext|>, <|user|>]", "tokenizer.vocab_size=258"])
    assert cfg.tokenizer.vocab_size == 258
    with pytest.raises(ConfigError, match="needs at least 258"):
        load_config(None, ["tokenizer.special_tokens=[<|endoftext|>, <|user|>]", "tokenizer.vocab_size=257"])


def test_fingerprint_depends_on_config_and_upstream_only():
    a = PipelineConfig()
    b = load_config(None, ["model.n_layer=5"])
    fp = stage_fingerprint("pretrain", {"model": a.model, "cfg": a.pretrain}, ["up1"])
    assert fp == stage_fingerprint("pretrain", {"model": a.model, "cfg": a.pretrain}, ["up1"])
    assert len(fp) == 16
    assert fp != stage_fingerprint("pretrain", {"model": b.model, "cfg": a.pretrain}, ["up1"])
    assert fp != stage_fingerprint("pretrain", {"model": a.model, "cfg": a.pretrain}, ["up2"])
    # Data stages do not see the model section at all.
    assert stage_fingerprint("train_tokenizer", a.tokenizer, ["d"]) \
        == stage_fingerprint("train_tokenizer", b.tokenizer, ["d"])


def test_corpora_need_distinct_names():
    with pytest.raises(ConfigError, match="data: Value error, finetune.name 'wikitext2' is also pretrain.name|"
                                          "finetune.name 'wikitext2' is also pretrain.name"):
        load_config(None, ["data.finetune.name=wikitext2"])


def test_gpt2_124m_preset_is_gpt2_small_with_a_half_million_token_batch():
    from lmpipe.model.gpt import GPT, GPTConfig

    cfg = load_config(REPO / "configs" / "gpt2-124m.yaml")
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
    assert cfg.tokenizer.vocab_size <= 65_536
    assert cfg.pretrain.batch_tokens == 524_288 and cfg.pretrain.sequences_per_step(m.block_size) == 512
    with torch.device("meta"):  # shapes only, no memory
        params = GPT(GPTConfig.from_config(m, cfg.tokenizer.vocab_size)).num_params(non_embedding=False)
    assert params == 124_475_904  # nanoGPT's GPT-2 small with the 50,304-token vocabulary
    assert load_config(REPO / "configs" / "gpu-smoke.yaml").pretrain.batch_size == "auto"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pretrain.batch_tokens=1000"], r"pretrain\.batch_tokens=1000 is not a multiple of model\.block_size=128"),
        (["pretrain.batch_tokens=2048", "pretrain.batch_size=3"],
         r"pretrain\.batch_tokens=2048 is 16 sequences .* pretrain\.batch_size=3 on "
         r"pretrain\.distributed\.nproc_per_node=1 processes"),
        (["pretrain.batch_size=auto"], r"pretrain: batch_size='auto' needs batch_tokens"),
        (["pretrain.batch_size=0"], r"pretrain\.batch_size: must be >= 1 or 'auto'"),
        # only pretraining launches torchrun: fine-tuning has no distributed section
        (["finetune.distributed.nproc_per_node=2"], r"finetune\.distributed: unknown field"),
        (["tracking.promote_metric=finetuned.nope.loss"],
         r"tracking\.promote_metric='finetuned\.nope\.loss' is not a metric the evaluation reports; choose one of "
         r"\['finetuned\.shakespeare_cloze\.acc', 'finetuned\.shakespeare_cloze\.acc_norm', "
         r"'finetuned\.tinyshakespeare\.bits_per_byte', "),
        (["tracking.alias=champion"], r"tracking: alias and champion_alias must differ \(both 'champion'\)"),
        (["eval.eval_tokens=999"],
         r"eval\.eval_tokens=999 is fewer than tracking\.min_held_out_tokens=1000: the champion gate could never "
         r"decide on finetuned\.tinyshakespeare\.bits_per_byte; raise eval\.eval_tokens or lower "
         r"tracking\.min_held_out_tokens$"),
        (["tracking.promote_metric=finetuned.shakespeare_cloze.acc",
          "eval.benchmarks=[{name: shakespeare_cloze, kind: hellaswag, path: x.jsonl, limit: 20}]"],
         r"eval\.benchmarks\.0\.limit=20 is fewer than tracking\.min_held_out_examples=30: the champion gate could "
         r"never decide on finetuned\.shakespeare_cloze\.acc; raise the limit or lower tracking\.min_held_out_examples$"),
    ],
)
def test_bad_batch_settings_name_the_fields(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_the_gate_minimums_are_checked_against_what_can_be_scored():
    assert load_config(None, ["eval.eval_tokens=500", "tracking.min_held_out_tokens=500"]).eval.eval_tokens == 500
    # The SFT figure's amount is known once the file is read (the split then holds out enough): no check here.
    sft = load_config(None, ["finetune.mode=sft", "finetune.sft_path=chat.json", "eval.eval_tokens=500"])
    assert sft.sft_min_held_out() == (30, 1000) and load_config(None).sft_min_held_out() is None


def test_batch_tokens_sets_the_global_batch_whatever_the_split():
    cfg = load_config(None, ["pretrain.batch_tokens=8192", "pretrain.batch_size=8",
                             "pretrain.distributed.nproc_per_node=2"])
    assert cfg.pretrain.sequences_per_step(128) == 64  # 8 per micro-batch x 4 accumulation x 2 processes
    assert load_config(None).pretrain.sequences_per_step(128) == 16  # batch_size x grad_accum_steps


def test_the_champion_metric_defaults_to_bits_per_byte_on_the_finetuning_corpus():
    assert load_config(None).champion_metric() == "finetuned.tinyshakespeare.bits_per_byte"
    cfg = load_config(None, ["tracking.promote_metric=finetuned.wikitext2.loss"])
    assert cfg.champion_metric() == "finetuned.wikitext2.loss"


def test_integer_classification_labels_are_their_decimal_strings_as_in_the_data():
    cfg = load_config(None, ["classify={path: data.jsonl, labels: [0, 1, two]}"])
    assert cfg.classify.labels == ["0", "1", "two"]
    with pytest.raises(ConfigError, match="labels"):
        load_config(None, ["classify={path: data.jsonl, labels: [true, false]}"])


def test_after_sft_the_champion_metric_defaults_to_bits_per_byte_on_the_held_out_sft_examples():
    sft = ["finetune.mode=sft", "finetune.sft_path=chat.jsonl"]
    cfg = load_config(None, sft)
    assert cfg.champion_metric() == "finetuned.sft/val.bits_per_byte"
    assert cfg.promotable_metrics() - load_config(None).promotable_metrics() == {
        "finetuned.sft/val.loss", "finetuned.sft/val.perplexity", "finetuned.sft/val.bits_per_byte"}
    # An explicit choice still wins, a corpus's included.
    cfg = load_config(None, [*sft, "tracking.promote_metric=finetuned.tinyshakespeare.bits_per_byte"])
    assert cfg.champion_metric() == "finetuned.tinyshakespeare.bits_per_byte"
    assert load_config(None, [*sft, "tracking.promote_metric=finetuned.sft/val.loss"]).champion_metric() == \
        "finetuned.sft/val.loss"
    # Without SFT there is no such figure to promote on.
    with pytest.raises(ConfigError, match=r"tracking.promote_metric='finetuned.sft/val.loss' is not a metric"):
        load_config(None, ["tracking.promote_metric=finetuned.sft/val.loss"])


def test_switching_an_sft_preset_to_continue_leaves_the_sft_fields_out(tmp_path):
    preset = tmp_path / "sft.yaml"
    preset.write_text("finetune: {mode: sft, sft_path: chat.jsonl, sft_layout: packed, learning_rate: 0.001}\n")
    cfg = load_config(preset, ["finetune.mode=continue"])
    assert cfg.finetune.mode == "continue" and cfg.finetune.learning_rate == 0.001
    assert "sft_path" not in cfg.finetune.model_dump()
    # A field the overrides set themselves is not dropped: it is an error that names it.
    with pytest.raises(ConfigError, match=r"finetune\.sft_layout: unknown field \(got 'padded'\)"):
        load_config(preset, ["finetune.mode=continue", "finetune.sft_layout=padded"])
    # Without a mode switch, nothing is dropped: a stray SFT field in continue mode is an error.
    with pytest.raises(ConfigError, match=r"finetune\.sft_path: unknown field \(got 'chat.jsonl'\)"):
        load_config(None, ["finetune.sft_path=chat.jsonl"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.arch=gpt2", "model.rope_theta=500"], "model: rope_theta only applies to model.arch='qwen3' (model.arch is 'gpt2'); "
                                   "set model.arch=qwen3 or leave it out"),
        (["model.arch=gpt2", "model.n_kv_head=2", "model.tie_embeddings=false"],
         "model: n_kv_head, tie_embeddings only apply to model.arch='qwen3' (model.arch is 'gpt2')"),
        (["model.arch=llama"], "model: arch must be one of 'gpt2', 'qwen3'"),
        (["model.arch=qwen3", "model.n_kv_head=3"], "model: n_kv_head=3 must divide n_head=4"),
        (["model.arch=qwen3", "model.n_head=8", "model.n_embd=24"],
         "model: n_embd / n_head = 24 / 8 = 3 must be even: rotary embeddings rotate pairs of each head's dimensions"),
        (["model.arch=qwen3", "model.rope_theta=0"], "model.rope_theta: Input should be greater than 0 (got 0)"),
        (["model.arch=qwen3", "model.intermediate_size=0"],
         "model.intermediate_size: Input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_qwen3_fields_exist_only_for_that_arch_and_are_checked(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_switching_the_arch_takes_the_new_arch_defaults_and_drops_the_other_fields(tmp_path):
    cfg = load_config(None)
    assert isinstance(cfg.model, Qwen3ModelConfig)  # the default
    assert (cfg.model.bias, cfg.model.n_kv_head, cfg.model.rope_theta, cfg.model.tie_embeddings) == (
        False, None, 10000.0, True)
    gpt2 = load_config(None, ["model.arch=gpt2"]).model  # Qwen3's bias=false was its default, not a choice
    assert type(gpt2) is ModelConfig and gpt2.bias is True and "rope_theta" not in gpt2.model_dump()
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.arch=qwen3"])  # from a GPT-2 preset
    assert isinstance(cfg.model, Qwen3ModelConfig) and (cfg.model.n_layer, cfg.model.bias) == (2, False)
    assert load_config(None, ["model.arch=qwen3", "model.bias=true"]).model.bias is True
    preset = tmp_path / "qwen3.yaml"
    preset.write_text("model: {arch: qwen3, n_layer: 2, rope_theta: 500.0, n_kv_head: 2}\n")
    cfg = load_config(preset)
    assert (cfg.model.arch, cfg.model.rope_theta, cfg.model.n_kv_head) == ("qwen3", 500.0, 2)
    back = load_config(preset, ["model.arch=gpt2"])
    assert type(back.model) is ModelConfig and back.model.n_layer == 2 and back.model.bias is True
    assert "rope_theta" not in back.model.model_dump()


def test_the_json_schema_offers_the_fine_tune_modes_as_any_of():
    """The Prefect UI's parameter form renders anyOf as a choice of definitions, picked by the value."""
    schema = PipelineConfig.model_json_schema()
    finetune = schema["properties"]["finetune"]
    assert "oneOf" not in finetune
    assert finetune["anyOf"] == [{"$ref": "#/$defs/ContinueFinetuneConfig"}, {"$ref": "#/$defs/SFTFinetuneConfig"}]
    assert schema["$defs"]["SFTFinetuneConfig"]["properties"]["mode"]["const"] == "sft"
    assert schema["properties"]["model"]["anyOf"] == [{"$ref": "#/$defs/ModelConfig"},
                                                      {"$ref": "#/$defs/Qwen3ModelConfig"}]
    assert schema["$defs"]["Qwen3ModelConfig"]["properties"]["arch"]["const"] == "qwen3"


@pytest.mark.parametrize("override", ["data.pretrain.sources[1].doc_boundary=file",
                                      "data.pretrain.sources.1.doc_boundary=file"])
def test_a_list_item_is_overridden_by_its_index_in_either_form(override):
    cfg = load_config(None, [override])
    assert [s.doc_boundary for s in cfg.data.pretrain.sources] == ["wikitext_title", "file"]
    assert cfg.data.pretrain.sources[1].uri == PipelineConfig().data.pretrain.sources[1].uri  # the rest kept
    assert load_config(None, ["eval.prompts[1]=To be"]).eval.prompts == ["ROMEO:", "To be"]
    whole = load_config(None, ["data.pretrain.sources[0]={uri: a.txt, doc_boundary: line}"]).data.pretrain.sources[0]
    assert (whole.uri, whole.doc_boundary, whole.max_bytes) == ("a.txt", "line", None)  # an item set whole


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.pretrain.sources[2].doc_boundary=file"],
         "override data.pretrain.sources[2].doc_boundary: index 2 is out of range: data.pretrain.sources has 2 items "
         "(indices 0..1)"),
        (["data.pretrain.sources.5.doc_boundary=file"],
         "override data.pretrain.sources.5.doc_boundary: index 5 is out of range: data.pretrain.sources has 2 items "
         "(indices 0..1)"),
        (["data.finetune.sources[1]={uri: b.txt}"],
         "override data.finetune.sources[1]: index 1 is out of range: data.finetune.sources has 1 item (indices 0..0)"),
        (["eval.prompts=[]", "eval.prompts[0]=x"],
         "override eval.prompts[0]: index 0 is out of range: eval.prompts has no items"),
        (["data.pretrain[0].uri=a.txt"],
         "override data.pretrain[0].uri: data.pretrain is not a list, so [0] cannot index it (it is a section)"),
        (["data.pretrain.name[0]=x"],
         "override data.pretrain.name[0]: data.pretrain.name is not a list, so [0] cannot index it (it is 'wikitext2')"),
        (["data.pretrain.sources.uri=a.txt"],
         "override data.pretrain.sources.uri: data.pretrain.sources is a list: give an item's index "
         "(data.pretrain.sources[0].uri), not a field name"),
        (["data.pretrain.sources[-1].uri=a.txt"],
         "override data.pretrain.sources[-1].uri: [-1] is not a list index (0, 1, 2, ...)"),
        (["data.pretrain.sources[0]uri=a.txt"],
         "override data.pretrain.sources[0]uri: 'sources[0]uri' is not a field name, optionally with [index]"),
    ],
)
def test_a_bad_index_names_the_field_the_index_and_the_length(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_an_invalid_list_item_is_named_with_its_index():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.pretrain.sources.0.doc_boundary=page", "data.pretrain.sources[1].colour=red"])
    assert str(err.value).splitlines()[1:] == [
        "  data.pretrain.sources[0].doc_boundary: Input should be 'file', 'line', 'blank_line' or 'wikitext_title' "
        "(got 'page')",
        "  data.pretrain.sources[1].colour: unknown field (got 'red')"]
