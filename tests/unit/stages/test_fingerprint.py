"""A stage's code version covers every lmpipe module it imports at module level, and only those."""

from __future__ import annotations

import importlib
import inspect
import sys

from lmpipe.stages.fingerprint import STAGE_ENTRY, code_text, code_version, source_hash, stage_modules


def _closure(stage: str) -> set[str]:
    return {m for entry in STAGE_ENTRY[stage] for m in stage_modules(entry)}


def test_pretrain_code_covers_the_modules_training_runs():
    # The torchrun worker and the loop's parts decide what pretraining computes; evaluation, tracking and
    # the SFT reader (fine-tuning's) are not reached at module level.
    pretrain = _closure("pretrain")
    assert pretrain == {
        "lmpipe.artifacts", "lmpipe.config.base", "lmpipe.config.continual", "lmpipe.config.data",
        "lmpipe.config.effects", "lmpipe.config.evaluation", "lmpipe.config.pipeline", "lmpipe.config.training",
        "lmpipe.data.documents", "lmpipe.data.jsonl",
        "lmpipe.data.shards", "lmpipe.data.tokenizer",
        "lmpipe.model.checkpoint", "lmpipe.model.device", "lmpipe.model.gpt", "lmpipe.model.lora",
        "lmpipe.processes", "lmpipe.stages.contract", "lmpipe.stages.lease", "lmpipe.stages.pretrain",
        "lmpipe.stages.torchrun_worker", "lmpipe.stages.training",
        "lmpipe.training.checkpoint", "lmpipe.training.data", "lmpipe.training.device",
        "lmpipe.training.distributed", "lmpipe.training.early_stopping", "lmpipe.training.launch",
        "lmpipe.training.loader", "lmpipe.training.loop", "lmpipe.training.metrics", "lmpipe.training.optimizer",
        "lmpipe.training.schedule",
        "lmpipe.training.setup", "lmpipe.training.step", "lmpipe.training.validation",
    }
    finetune = _closure("finetune")
    assert finetune - pretrain == {"lmpipe.stages.finetune", "lmpipe.data.sft"}
    assert _closure("continue") - pretrain == {"lmpipe.stages.continual"}
    assert _closure("register") == {
        "lmpipe.artifacts", "lmpipe.config.base", "lmpipe.config.data", "lmpipe.config.effects",
        "lmpipe.config.evaluation", "lmpipe.data.documents", "lmpipe.data.gutenberg", "lmpipe.data.increments",
        "lmpipe.data.reader",
        "lmpipe.data.shards", "lmpipe.data.sources", "lmpipe.data.splitting", "lmpipe.data.tokenizer",
        "lmpipe.model.generation_settings", "lmpipe.processes", "lmpipe.stages.register", "lmpipe.tracking.owners",
        "lmpipe.tracking.registry", "lmpipe.tracking.runs", "lmpipe.tracking.serving", "lmpipe.tracking.store",
        "lmpipe.tracking.links", "lmpipe.tracking.trained_on", "lmpipe.tracking.uris",
    }
    # downloading the champion's files does not depend on how models are trained
    assert not any(m.startswith("lmpipe.training") for m in _closure("champion"))
    assert not any(m.startswith("lmpipe.training") for m in _closure("evaluate"))  # evaluation only loads models
    assert len({code_version("pretrain"), code_version("finetune"), code_version("evaluate")}) == 3


def _package(root, name: str, files: dict[str, str]) -> None:
    pkg = root / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for mod, text in files.items():
        (pkg / f"{mod}.py").write_text(text)


def test_closure_follows_module_level_imports_of_every_form(tmp_path, monkeypatch):
    name = "lmpipe_fp_probe"
    _package(tmp_path, name, {
        "entry": f"from {name} import helper\nimport {name}.direct as direct\n"
                 f"from {name}.cfg import Setting\n\n\ndef late():\n    from {name} import lazy\n",
        "helper": "from .deep import value\n",
        "direct": "import json\n",
        "cfg": "Setting = 1\n",
        "deep": "value = 1\n",
        "lazy": "",
        "unused": "",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        mods = stage_modules(f"{name}.entry", name)
        assert mods == tuple(f"{name}.{m}" for m in ("cfg", "deep", "direct", "entry", "helper"))
        before = source_hash(mods)
        (tmp_path / name / "lazy.py").write_text("changed = True\n")
        assert source_hash(mods) == before
        (tmp_path / name / "deep.py").write_text("value = 2\n")  # two imports below the entry
        assert source_hash(mods) != before
    finally:
        sys.modules.pop(name, None)


CODE = '''"""A module."""

from pydantic import BaseModel, Field


class Config(BaseModel):
    """A section."""

    steps: int = Field(3, ge=1, description="How many.")  # a comment


def run(cfg: Config) -> int:
    """Run it."""
    return cfg.steps * 2
'''


def test_code_version_ignores_docstrings_comments_and_field_descriptions(tmp_path, monkeypatch):
    redocumented = (CODE.replace('"""A module."""', '"""The module, described anew."""')
                    .replace('"""A section."""', "# no docstring, a comment instead")
                    .replace('"How many."', '"How many steps,\\n" "in two strings."')
                    .replace("# a comment", "# another comment")
                    .replace('    """Run it."""\n', "")
                    .replace("class Config", "\n\nclass Config"))  # moved down: line numbers do not count
    assert code_text(redocumented) == code_text(CODE)
    for changed in (CODE.replace("* 2", "* 3"), CODE.replace("ge=1", "ge=0"),
                    CODE.replace('description="How many."', 'title="How many."'),
                    CODE.replace('"""Run it."""', '"""Run it."""\n    print("hi")')):
        assert code_text(changed) != code_text(CODE)
    # through source_hash, on real modules
    name = "lmpipe_doc_probe"
    _package(tmp_path, name, {"mod": CODE})
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    mods = (f"{name}.mod",)
    before = source_hash(mods)
    (tmp_path / name / "mod.py").write_text(redocumented)
    assert source_hash(mods) == before
    (tmp_path / name / "mod.py").write_text(CODE.replace("* 2", "* 3"))
    assert source_hash(mods) != before


def test_editing_a_config_description_re_runs_no_stage():
    import lmpipe.config.training as training

    source = inspect.getsource(training)
    assert 'description="Optimizer steps."' in source
    assert code_text(source.replace('description="Optimizer steps."', 'description="Steps."')) == code_text(source)
    assert code_text(source.replace("Field(600, ge=1", "Field(601, ge=1")) != code_text(source)

