"""Stage champion: the @champion's weights and tokenizer, downloaded from MLflow into the work directory.

A continual run starts from them: the tokenizer (tokenizer.json, tokenizer_meta.json at the top, as a
tokenizer stage has them) encodes the new documents, and model/ is the checkpoint training continues from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmpipe.artifacts import BuildOutput, StageResult, sha256_file
from lmpipe.data.tokenizer import META_FILE, TOKENIZER_FILE
from lmpipe.model.checkpoint import MODEL_DIR, WEIGHTS_FILE
from lmpipe.stages.contract import run_stage
from lmpipe.tracking.registry import download_model_files


def run_champion(tracking_uri: str, name: str, version: str, weights: str, out_dir: str | Path,
                 fingerprint: str) -> StageResult:
    """Stage: version ``version`` of ``name``, whose weights must have sha256 ``weights`` (its tag)."""

    def build(tmp: Path) -> BuildOutput:
        checkpoint, tok_dir = download_model_files(f"models:/{name}/{version}", tracking_uri, tmp / "_download")
        shutil.move(str(checkpoint), tmp / MODEL_DIR)
        for file in (TOKENIZER_FILE, META_FILE):
            shutil.move(str(tok_dir / file), tmp / file)
        shutil.rmtree(tmp / "_download")
        actual = sha256_file(tmp / MODEL_DIR / WEIGHTS_FILE)
        if actual != weights:
            raise ValueError(f"models:/{name}/{version}: its {WEIGHTS_FILE} has sha256 {actual}, the version's tag "
                             f"says {weights}: the registry's files were changed")
        return BuildOutput(metrics={"version": float(version)},
                           meta={"name": name, "version": version, "weights_sha256": weights})

    return run_stage("champion", fingerprint, out_dir, build)
