"""Finding a trained model by the name a user has for it: a checkpoint directory or a registry URI.

``lmpipe generate``, ``lmpipe evaluate`` and ``lmpipe export`` accept either

- a checkpoint directory (``.lmpipe/finetune/<fingerprint>/model``, or any
  ``step-NNNNNNN`` checkpoint): its tokenizer is the one whose sha256 the
  checkpoint's state.json names, given with ``--tokenizer`` or found among the
  work directory's tokenizer stages; or
- an MLflow model URI (``MODEL_URI_FORMS``: ``models:/lmpipe-gpt@candidate``,
  ``models:/lmpipe-gpt/3``, ``models:/lmpipe-gpt/latest``, ``models:/m-<model id>``
  as ``registration.json``'s ``logged_model_uri`` gives it, ``runs:/<run id>/model``):
  the registered pyfunc is downloaded and its checkpoint and tokenizer artifacts are used.

Either way the checkpoint and the tokenizer are checked to belong together.

Nothing heavy is imported at module level; nothing of Prefect, and MLflow only through
``lmpipe.tracking.registry``, inside the functions that resolve a registry URI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmpipe.tracking.uris import MODEL_URI_FORMS, is_model_uri

TOKENIZER_STAGE = "train_tokenizer"


@dataclass(frozen=True)
class ModelFiles:
    checkpoint: Path  # directory with model.safetensors and state.json
    tokenizer_dir: Path  # directory with tokenizer.json (and tokenizer_meta.json)

    @property
    def tokenizer(self) -> Path:
        from lmpipe.data.tokenizer import TOKENIZER_FILE

        return self.tokenizer_dir / TOKENIZER_FILE


def find_tokenizer(fingerprint: str, workdir: Path) -> Path | None:
    """The tokenizer stage directory under workdir whose tokenizer.json has this sha256, if any."""
    from lmpipe.data.tokenizer import TOKENIZER_FILE, tokenizer_fingerprint

    for candidate in sorted((Path(workdir) / TOKENIZER_STAGE).glob(f"*/{TOKENIZER_FILE}")):
        if tokenizer_fingerprint(candidate) == fingerprint:
            return candidate.parent
    return None


def resolve_model(ref: str, *, workdir: Path, tokenizer: Path | None = None, tracking_uri: str | None = None,
                  download_dir: Path | None = None, workdir_from: str = "--workdir",
                  tracking_from: str = "--tracking-uri") -> ModelFiles:
    """The checkpoint and tokenizer ``ref`` names; errors say which argument is wrong and why (``workdir_from``
    and ``tracking_from``: the option or config field that gave ``workdir`` and ``tracking_uri``)."""
    from lmpipe.data.tokenizer import tokenizer_fingerprint
    from lmpipe.model.checkpoint import STATE_FILE, read_state

    if is_model_uri(ref):
        from lmpipe.tracking.registry import download_model_files, missing_store
        from lmpipe.tracking.runs import check_server

        check_server(tracking_uri, tracking_from)  # a server that is down: said now, not after minutes of retries
        if download_dir is None:
            raise ValueError(f"model {ref!r}: a registry URI needs a download directory")
        if tracking_uri is None:  # the work directory's own store, as the pipeline uses it
            from lmpipe.config.evaluation import TrackingConfig
            from lmpipe.tracking.runs import resolve_uri

            tracking_uri = resolve_uri(TrackingConfig(), workdir)
            store = missing_store(tracking_uri)
            if store is not None:  # checked here too, to say which option points at it
                raise FileNotFoundError(f"model {ref!r}: there is no MLflow store at {store} ({workdir_from} "
                                        f"{str(workdir)!r} is not a pipeline's work directory); pass the run's "
                                        "--workdir or --tracking-uri")
        checkpoint, tokenizer_dir = download_model_files(ref, tracking_uri, download_dir)
        files = ModelFiles(checkpoint, tokenizer_dir)
    else:
        checkpoint = Path(ref)
        if not (checkpoint / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"model {ref!r} is neither a checkpoint directory (no {STATE_FILE}) nor an MLflow model URI "
                f"({MODEL_URI_FORMS})"
            )
        fingerprint = read_state(checkpoint).get("tokenizer_fingerprint")
        if tokenizer is None:
            found = find_tokenizer(str(fingerprint), workdir)
            if found is None:
                raise FileNotFoundError(
                    f"model {ref!r} was trained with tokenizer {fingerprint}, which is not among the tokenizer "
                    f"stages under {str(Path(workdir) / TOKENIZER_STAGE)!r}; pass --tokenizer DIR"
                )
            tokenizer = found
        files = ModelFiles(checkpoint, Path(tokenizer))
    if not files.tokenizer.is_file():
        raise FileNotFoundError(f"tokenizer {str(files.tokenizer)!r} does not exist")
    expected = read_state(files.checkpoint).get("tokenizer_fingerprint")
    actual = tokenizer_fingerprint(files.tokenizer)
    if expected != actual:
        raise ValueError(f"model {ref!r} was trained with tokenizer {expected}, but {str(files.tokenizer)!r} "
                         f"is {actual}")
    return files
