"""Shared fixtures: one Prefect test harness for the session, real corpora, a tiny config.

Prefect keeps persisted task results (the cache) under PREFECT_HOME, which the
harness does not isolate: point it at a fresh temporary folder *before* prefect
is imported, so no test reuses a cache from an earlier session or the user's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_PREFECT_HOME = tempfile.mkdtemp(prefix="lmpipe-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from lmpipe.config.loading import load_config  # noqa: E402
from lmpipe.config.pipeline import PipelineConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    """The shared corpora beside the checkout when present, else the copies bundled in data/."""
    shared = REPO.parent / "shared" / "data"
    return shared if (shared / "tinyshakespeare.txt").is_file() else REPO / "data"


DATA = _data_dir()
# nanoGPT's optimizer settings (the defaults are Muon beside AdamW at 6e-3): what the tests that train a model
# for another purpose keep training with, as configs/tiny.yaml does.
NANOGPT: dict[str, Any] = {"optimizer": "adamw", "learning_rate": 2e-3}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the whole session (it takes ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


def flow_run_logs(flow_run_id: str) -> list:
    """Every log of a flow run, oldest first: the ones still queued in this process are sent first, and the API's
    pages (200 logs each by default) are all read, so a long run's last lines are not cut off."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    logs: list = []
    with get_client(sync_client=True) as prefect:
        while page := prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                        sort=LogSort.TIMESTAMP_ASC, offset=len(logs), limit=200):
            logs.extend(page)
    return logs


def tiny_config(workdir: Path, *overrides: str) -> PipelineConfig:
    """configs/tiny.yaml on the real corpora, everything written under workdir."""
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"workdir={workdir}",
            f"data.pretrain.sources=[{{uri: '{DATA / 'wikitext2-valid.txt'}', doc_boundary: wikitext_title}}]",
            f"data.finetune.sources=[{{uri: '{DATA / 'tinyshakespeare.txt'}', doc_boundary: blank_line}}]",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def stages(tmp_path_factory: pytest.TempPathFactory):
    """(tokenizer, shards) stage results of Tiny Shakespeare's first ~120 KB, for the training tests.

    Vocabulary 512 and 4,096-token shards, so training windows cross shard boundaries.
    """
    from lmpipe.config.data import CorpusConfig, ShardConfig, SourceConfig, TokenizerConfig
    from lmpipe.stages.tokenizer import run_train_tokenizer
    from tests.unit.data.test_shards import encode_and_shard
    from tests.unit.data.test_tokenizer import write_documents

    root = tmp_path_factory.mktemp("stages")
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:120_000]
    texts = [d for d in text.split("\n\n") if d.strip()]
    docs = write_documents(root / "docs", texts, ids=[f"d{i:05d}" for i in range(len(texts))])
    tok = run_train_tokenizer(TokenizerConfig(vocab_size=512), docs, root / "tok", "tok")
    corpus = CorpusConfig(name="shakespeare", sources=[SourceConfig(uri="unused")], val_fraction=0.1)
    shards = encode_and_shard(ShardConfig(shard_tokens=4096), corpus, docs, tok, root / "shards",
                              corpus_field="data.finetune")
    return tok, shards


@pytest.fixture(scope="session")
def tokenizer(stages):
    """The tokenizer stage of ``stages``: byte-level BPE, vocabulary 512, default special tokens (ids 0..4).
    Test modules with a tokenizer of their own define a fixture of this name, which takes precedence."""
    return stages[0]


@pytest.fixture(scope="session")
def tok(tokenizer):
    """``tokenizer`` loaded (a tokenizers.Tokenizer)."""
    from lmpipe.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer.path("tokenizer.json"))

