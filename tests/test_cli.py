import yaml

from flows.cli import format_summary, main
from tests.conftest import REPO


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", "--config", str(REPO / "configs" / "tiny.yaml"), "pretrain.max_steps=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pretrain"]["max_steps"] == 3
    assert printed["model"]["n_layer"] == 2


def test_bad_config_exits_2_naming_the_field_before_prefect_starts(capsys):
    assert main(["run", "tokenizer.vocab_size=200"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.vocab_size: 200 is too small" in err and "needs at least 261" in err


def test_summary_table_lists_stages_evaluation_and_where_to_look():
    summary = {
        "stages": [{"label": "pretrain", "status": "cached", "seconds": 0.04, "out_dir": "w/pretrain/abc"}],
        "metrics": {"evaluate": {"base.wiki.loss": 2.0, "base.wiki.perplexity": 7.389, "base.wiki.bits_per_byte": 1.25}},
        "registered": {"model_uri": "models:/m@candidate", "version": "3"},
        "tracking_uri": "sqlite:///w/mlflow.db", "workdir": "w", "mlflow_run_id": "r1",
    }
    text = format_summary(summary, 12.0)
    assert "pretrain                    cached        0.0  w/pretrain/abc" in text
    assert "base        wiki                   2.000       7.4      1.250" in text
    assert "registered model: models:/m@candidate (version 3)" in text
    assert "mlflow ui --backend-store-uri sqlite:///w/mlflow.db" in text
