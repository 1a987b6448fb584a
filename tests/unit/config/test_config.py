
import pytest
import torch

from lmpipe.config.base import ConfigError
from lmpipe.config.loading import load_config
from lmpipe.config.pipeline import PipelineConfig
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
