"""A stage's code version covers every lmpipe module it imports at module level, and only those."""

from __future__ import annotations

import importlib
import sys

from lmpipe.fingerprint import STAGE_ENTRY, code_version, source_hash, stage_modules


def test_pretrain_code_covers_the_modules_training_runs():
    # distributed.py (the torchrun worker) and docset.py (below shards.py) decide what pretraining computes;
    # evaluate.py and tracking.py are only reached inside functions, and so is sft.py (fine-tuning's).
    pretrain = stage_modules(*STAGE_ENTRY["pretrain"])
    assert pretrain == (
        "lmpipe.checkpoint", "lmpipe.config", "lmpipe.distributed", "lmpipe.docset", "lmpipe.loader",
        "lmpipe.lora", "lmpipe.model", "lmpipe.shards", "lmpipe.stage", "lmpipe.tokenizer", "lmpipe.train",
    )
    finetune = {m for entry in STAGE_ENTRY["finetune"] for m in stage_modules(entry)}
    assert finetune - set(pretrain) == {"lmpipe.sft", "lmpipe.jsonl"}
    assert stage_modules(*STAGE_ENTRY["register"]) == (
        "lmpipe.config", "lmpipe.docset", "lmpipe.handoff", "lmpipe.stage", "lmpipe.tokenizer", "lmpipe.tracking",
    )
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
