"""Stages clean_chunk and clean: clean each chunk of documents, then de-duplicate across chunks and report."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from lmpipe.artifacts import BuildOutput, StageResult, read_versioned_json, sha256_file, write_json_atomic
from lmpipe.config.data import CleanConfig
from lmpipe.data import dedup
from lmpipe.data import documents as docset
from lmpipe.data.clean import (
    BATCH_DOCS,
    CLEAN_FIELD,
    EXACT_FILE,
    EXCERPT_CHARS,
    KEPT_FILE,
    LANGUAGES_FILE,
    MINHASH_FILE,
    REMOVED_FILE,
    REMOVED_SCHEMA,
    REPORT_FILE,
    ROW_KEYS,
    STATS_FILE,
    STATS_FORMAT_VERSION,
    Dedup,
    LanguageStep,
    Step,
    _ChunkState,
    _row,
    build_steps,
)
from lmpipe.stages.contract import load_completed, run_stage

CHUNK_STAGES = "chunk_stages"  # the clean stage's meta: fingerprints of the clean_chunk stages it combined


def _totals(rows: list[dict[str, Any]], docs_in: int, bytes_in: int) -> dict[str, int]:
    last = rows[-1] if rows else {"docs_out": docs_in, "bytes_out": bytes_in}
    return {"docs_in": docs_in, "docs_out": last["docs_out"], "bytes_in": bytes_in, "bytes_out": last["bytes_out"]}


def _metrics(totals: dict[str, int], rows: list[dict[str, Any]]) -> dict[str, float]:
    metrics = {k: float(v) for k, v in totals.items()}
    for r in rows:
        metrics[f"{r['step']}.docs_removed"] = float(r["docs_in"] - r["docs_out"])
        metrics[f"{r['step']}.bytes_removed"] = float(r["bytes_in"] - r["bytes_out"])
    return metrics


def run_clean_chunk(cfg: CleanConfig, chunk_file: str | Path, out_dir: str | Path, fingerprint: str
                    ) -> StageResult:
    """Stage "clean_chunk": one download chunk through the per-document steps, plus its dedup signatures.

    Writes kept.parquet (survivors, input order), removed.parquet (id, source, step, reason, bytes,
    excerpt), exact.npy (uint64 per survivor), minhash.npy (uint32 [survivors, permutations], when
    enabled) and stats.json (per-step rows and the first ``cfg.report_samples`` removals per step).
    """
    chunk_file = Path(chunk_file)
    steps = [s for s in build_steps(cfg) if not isinstance(s, Dedup)]

    def build(tmp: Path) -> BuildOutput:
        state = _ChunkState(steps, cfg.report_samples, cfg.min_chars)
        docs_in = bytes_in = 0
        for batch in docset.iter_document_batches(chunk_file, BATCH_DOCS, columns=docset.DOCUMENT_COLUMNS):
            docs_in += len(batch["id"])
            bytes_in += sum(batch["nbytes"])
            state.add_batch(batch["id"], batch["text"], batch["source"], batch["nbytes"])
        kept = state.kept
        docset.write_documents(tmp / KEPT_FILE, kept["id"], kept["text"], kept["source"])
        pq.write_table(pa.table(state.removed, schema=REMOVED_SCHEMA), tmp / REMOVED_FILE,
                       row_group_size=docset.ROW_GROUP_ROWS)
        np.save(tmp / EXACT_FILE, dedup.exact_hashes(kept["text"]))
        if cfg.minhash.enabled:
            mh = cfg.minhash
            np.save(tmp / MINHASH_FILE, dedup.minhash_signatures(kept["text"], mh.ngram, mh.permutations, mh.seed))
        totals = _totals(state.rows, docs_in, bytes_in)
        labels = sorted(state.languages)
        if any(isinstance(s, LanguageStep) for s in steps):
            code = {lang: i for i, lang in enumerate(labels)}
            np.save(tmp / LANGUAGES_FILE, np.array([code[lang or ""] for lang in state.kept_languages], np.int16))
        write_json_atomic(tmp / STATS_FILE, {"format_version": STATS_FORMAT_VERSION, "chunk": chunk_file.name,
                                             "steps": state.rows, "samples": state.samples, "totals": totals,
                                             "languages": [state.languages[lang] for lang in labels]})
        return BuildOutput(metrics={k: float(v) for k, v in totals.items()}, meta={"chunk": chunk_file.name})

    return run_stage("clean_chunk", fingerprint, out_dir, build)


class EmptyCorpusError(ValueError):
    """Cleaning removed every document."""


def _now(cfg: CleanConfig, name: str) -> str:
    value = getattr(cfg, name)
    return "enabled" if isinstance(value, BaseModel) else repr(value)


def _empty_message(corpus_field: str, clean_field: str, steps: list[Step], rows: list[dict],
                   cfg: CleanConfig, docs_in: int, bytes_in: int) -> str:
    """Why nothing is left: the step that removed the most bytes, each step's removals, the knobs to relax."""
    if docs_in == 0:
        return f"{corpus_field}: the download produced no documents; check {corpus_field}.sources"
    top = max(rows, key=lambda r: r["bytes_in"] - r["bytes_out"])  # the earliest on a tie
    removed = ", ".join(f"{r['step']} {r['docs_in'] - r['docs_out']} ({r['bytes_in'] - r['bytes_out']} bytes)"
                        for r in rows if r["docs_in"] != r["docs_out"])
    culprits = [s for s, r in zip(steps, rows) if not isinstance(s, Dedup) and r["docs_in"] != r["docs_out"]]
    hints = " or ".join(f"{clean_field}.{s.field} (now {_now(cfg, s.field)})" for s in culprits)
    return (
        f"{corpus_field}: no document survived cleaning ({docs_in} documents, {bytes_in} bytes in). "
        f"{top['step']} removed the most: {top['bytes_in'] - top['bytes_out']} of the {bytes_in} bytes "
        f"({top['docs_in'] - top['docs_out']} of the {docs_in} documents); documents removed per step: {removed}. "
        f"Relax {hints}, or check that {corpus_field}.sources hold the text you expect."
    )


def _read_stats(chunk: StageResult) -> dict[str, Any]:
    if chunk.stage != "clean_chunk":
        raise ValueError(f"run_clean takes clean_chunk results, got a {chunk.stage!r} result ({chunk.out_dir})")
    return read_versioned_json(chunk.path(STATS_FILE), STATS_FORMAT_VERSION, "clean chunk stats",
                               "re-run the clean_chunk task")


def _sum_chunk_rows(steps: list[Step], stats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [_row(s.name) for s in steps if not isinstance(s, Dedup)]
    for st in stats:
        if [r["step"] for r in st["steps"]] != [r["step"] for r in rows]:
            raise ValueError(f"clean chunk {st['chunk']!r} ran steps {[r['step'] for r in st['steps']]}, this "
                             f"config runs {[r['step'] for r in rows]}: re-run its clean_chunk task")
        for row, chunk_row in zip(rows, st["steps"]):
            for key in ROW_KEYS:
                row[key] += chunk_row[key]
    return rows


@dataclass
class _Duplicates:
    """Per corpus ordinal of a per-document survivor: which dedup step removed it, and in favour of whom."""

    step: np.ndarray  # int8: -1 kept, else the index into the list of Dedup steps
    keeper: np.ndarray  # int64: the ordinal of the document kept instead
    similarity: np.ndarray  # float64: estimated Jaccard similarity to the keeper (minhash only)


def _find_duplicates(cfg: CleanConfig, dedup_steps: list[Dedup], chunks: list[StageResult]) -> _Duplicates:
    """Exact duplicates first, then near duplicates among what is left; the earliest document always stays."""
    hashes = [np.load(c.path(EXACT_FILE)) for c in chunks]
    n = sum(len(h) for h in hashes)
    found = _Duplicates(np.full(n, -1, np.int8), np.arange(n, dtype=np.int64), np.ones(n))
    for index, step in enumerate(dedup_steps):
        active = found.step < 0
        if step.name == "dedup":
            keeper = dedup.first_occurrence(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))
        else:
            store = dedup.SignatureStore([_load_minhash(c) for c in chunks])
            if len(store) != n:
                raise ValueError("clean chunks' minhash.npy and exact.npy disagree: re-run the clean_chunk tasks")
            bands, rows = dedup.optimal_bands(cfg.minhash.threshold, cfg.minhash.permutations)
            keeper = dedup.near_duplicates(store, active, cfg.minhash.threshold, bands, rows)
        removed = active & (keeper != np.arange(n))
        found.step[removed] = index
        found.keeper[removed] = keeper[removed]
        if step.name == "minhash" and removed.any():
            found.similarity[removed] = store.similarity(keeper[removed], np.flatnonzero(removed))
    return found


def _load_minhash(chunk: StageResult) -> np.ndarray:
    path = chunk.path(MINHASH_FILE)
    if not path.is_file():
        raise ValueError(f"clean chunk {chunk.meta.get('chunk')!r} has no {MINHASH_FILE}: it was cleaned with "
                         f"minhash off; re-run its clean_chunk task with this config")
    return np.load(path, mmap_mode="r")


class _DedupRemovals:
    """Writes the dedup steps' removals, one temporary parquet per step, as the chunks stream past.

    A keeper always comes before its duplicates, so remembering the ids of the keepers seen so far
    is enough to name them. Rows are appended as they come, so no removal list is held whole.
    """

    def __init__(self, tmp: Path, steps: list[Dedup], found: _Duplicates, samples: dict[str, list],
                 report_samples: int) -> None:
        self.steps, self.found, self.samples, self.report_samples = steps, found, samples, report_samples
        self.paths = [tmp / f".{s.name}-removed.parquet" for s in steps]
        self.writers = [pq.ParquetWriter(path, REMOVED_SCHEMA) for path in self.paths]
        self.bytes = [0] * len(steps)
        # per corpus ordinal, the bytes of a document a dedup step removed (for the per-language rows)
        self.removed_bytes = np.zeros(len(found.step), np.int64)
        self.keepers = np.unique(found.keeper[found.step >= 0])
        self.keeper_ids: dict[int, str] = {}

    def add_chunk(self, table: pa.Table, start: int) -> None:
        """Record the removals among one chunk's documents, whose first corpus ordinal is ``start``."""
        end = start + table.num_rows
        here = self.keepers[(self.keepers >= start) & (self.keepers < end)]
        self.keeper_ids.update(zip(here.tolist(), table.column("id").take(here - start).to_pylist()))
        step = self.found.step[start:end]
        for index in range(len(self.steps)):
            rows = np.flatnonzero(step == index)
            if len(rows):
                self._write(index, table.take(rows), rows + start)

    def _write(self, index: int, gone: pa.Table, ordinals: np.ndarray) -> None:
        step, found = self.steps[index], self.found
        reasons = [_dedup_reason(step, self.keeper_ids[int(found.keeper[o])], float(found.similarity[o]))
                   for o in ordinals]
        nbytes = pc.binary_length(gone.column("text"))
        self.removed_bytes[ordinals] = nbytes.to_numpy()
        excerpts = pc.utf8_slice_codeunits(gone.column("text"), 0, EXCERPT_CHARS)  # code points, despite the name
        self.writers[index].write_table(
            pa.table([gone.column("id"), gone.column("source"), pa.array([step.name] * len(reasons)),
                      pa.array(reasons), pc.cast(nbytes, pa.int64()), excerpts], schema=REMOVED_SCHEMA),
            row_group_size=docset.ROW_GROUP_ROWS)
        self.bytes[index] += pc.sum(nbytes).as_py()
        room = max(0, self.report_samples - len(self.samples[step.name]))
        self.samples[step.name] += [{"id": d, "reason": r, "excerpt": e} for d, r, e in zip(
            gone.column("id").to_pylist()[:room], reasons[:room], excerpts.to_pylist()[:room])]

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _language_rows(chunks: list[StageResult], stats: list[dict[str, Any]], found: _Duplicates,
                   removals: _DedupRemovals) -> list[dict[str, Any]]:
    """Per language: documents and bytes into the language step and out of the last step, largest first."""
    rows: dict[str, dict[str, Any]] = {}
    for st in stats:
        for chunk_row in st.get("languages", []):
            row = rows.setdefault(chunk_row["language"], {"language": chunk_row["language"],
                                                          **dict.fromkeys(ROW_KEYS, 0)})
            for key in ROW_KEYS:
                row[key] += chunk_row[key]
    if rows:
        labels = [lang for st in stats for lang in (r["language"] for r in st.get("languages", []))]
        offsets = np.cumsum([0] + [len(st.get("languages", [])) for st in stats])
        codes = np.concatenate([np.load(c.path(LANGUAGES_FILE)).astype(np.int64) + offsets[i]
                                for i, c in enumerate(chunks)]) if chunks else np.zeros(0, np.int64)
        gone = found.step >= 0
        for code, nbytes in zip(codes[gone].tolist(), removals.removed_bytes[gone].tolist()):
            rows[labels[code]]["docs_out"] -= 1
            rows[labels[code]]["bytes_out"] -= nbytes
    return sorted(rows.values(), key=lambda r: (-r["bytes_in"], r["language"]))


def _write_final_chunks(chunks: list[StageResult], found: _Duplicates, removals: _DedupRemovals, tmp: Path
                        ) -> list[dict[str, Any]]:
    """Stream each chunk's survivors once more: its dedup removals, then its final part (skipped if empty).

    Part i comes from download chunk i, so a document's chunk number never changes. Returns the index entries.
    """
    entries = []
    start = 0
    for i, chunk in enumerate(chunks):
        table = docset.read_documents(chunk.path(KEPT_FILE))
        removals.add_chunk(table, start)
        survivors = table.filter(pa.array(found.step[start:start + table.num_rows] < 0))
        start += table.num_rows
        if survivors.num_rows:
            name = docset.chunk_name(i)
            docset.write_documents(tmp / name, *(survivors.column(c).to_pylist() for c in docset.DOCUMENT_COLUMNS))
            entries.append({"file": name, "documents": survivors.num_rows,
                            "bytes": pc.sum(pc.binary_length(survivors.column("text"))).as_py(),
                            "sha256": sha256_file(tmp / name)})
    return entries


def _dedup_reason(step: Dedup, keeper_id: str, similarity: float) -> str:
    if step.name == "dedup":
        return f"dedup: same text as {keeper_id}"
    return f"minhash: ~{similarity:.2f} similar to {keeper_id}"


def _removed_tables(chunks: list[StageResult], extra: list[Path]) -> Iterator[pa.Table]:
    for chunk in chunks:
        yield pq.read_table(chunk.path(REMOVED_FILE))
    for path in extra:
        yield pq.read_table(path)


def _before_split_rows(before_split: list[dict[str, Any]], docs_in: int, bytes_in: int) -> list[dict[str, Any]]:
    """Report rows of the steps the download stage ran on whole files, before cutting them into documents (the
    Gutenberg cut): they come first, with the documents the files gave, and the bytes they took out."""
    rows: list[dict[str, Any]] = []
    for entry in reversed(before_split):
        removed = entry["bytes_removed"]
        rows.insert(0, {"step": entry["step"], "docs_in": docs_in, "docs_out": docs_in,
                        "bytes_in": bytes_in + removed, "bytes_out": bytes_in})
        bytes_in += removed
    return rows


def run_clean(cfg: CleanConfig, chunks: list[StageResult], out_dir: str | Path, fingerprint: str, *,
              corpus_field: str, clean_field: str = CLEAN_FIELD,
              before_split: list[dict[str, Any]] | None = None, may_be_empty: bool = False) -> StageResult:
    """Stage "clean": de-duplicate the cleaned chunks across the corpus and publish the final document set.

    chunks: the clean_chunk results in corpus order (download chunk 0, 1, ...).
    corpus_field / clean_field: config paths (e.g. "data.pretrain", "data.clean") for error messages.
    before_split: the download stage's ``before_split`` meta (what it cut from each file before splitting it),
    reported as the first rows, with each file's cut and reason.
    may_be_empty: when no document survives, finish with an empty document set and the EmptyCorpusError's
    message as ``meta["empty"]`` (a continual run's new documents), instead of raising it.
    """
    before_split = before_split or []
    steps = build_steps(cfg)
    dedup_steps = [s for s in steps if isinstance(s, Dedup)]

    def build(tmp: Path) -> BuildOutput:
        stats = [_read_stats(c) for c in chunks]
        rows = _sum_chunk_rows(steps, stats)
        docs_in = sum(st["totals"]["docs_in"] for st in stats)
        bytes_in = sum(st["totals"]["bytes_in"] for st in stats)
        survivors = _totals(rows, docs_in, bytes_in)
        empty = None
        if survivors["docs_out"] == 0:
            empty = _empty_message(corpus_field, clean_field, steps, rows, cfg, docs_in, bytes_in)
            if not may_be_empty:
                raise EmptyCorpusError(empty)

        samples: dict[str, list[dict[str, Any]]] = {s.name: [] for s in steps}
        for st in stats:
            for name, examples in st["samples"].items():
                samples[name] += examples[:cfg.report_samples - len(samples[name])]
        found = _find_duplicates(cfg, dedup_steps, chunks)
        removals = _DedupRemovals(tmp, dedup_steps, found, samples, cfg.report_samples)
        try:
            entries = _write_final_chunks(chunks, found, removals, tmp)
        finally:
            removals.close()
        docs, nbytes = survivors["docs_out"], survivors["bytes_out"]
        for index, step in enumerate(dedup_steps):
            gone = int(np.count_nonzero(found.step == index))
            rows.append({"step": step.name, "docs_in": docs, "docs_out": docs - gone,
                         "bytes_in": nbytes, "bytes_out": nbytes - removals.bytes[index]})
            docs, nbytes = docs - gone, nbytes - removals.bytes[index]

        with pq.ParquetWriter(tmp / REMOVED_FILE, REMOVED_SCHEMA) as writer:
            for table in _removed_tables(chunks, removals.paths):
                if table.num_rows:
                    writer.write_table(table, row_group_size=docset.ROW_GROUP_ROWS)
        for path in removals.paths:
            path.unlink()
        docset.write_index(tmp, entries)
        rows = _before_split_rows(before_split, docs_in, bytes_in) + rows
        for entry in before_split:
            samples[entry["step"]] = [{"id": f["file"], "reason": f["reason"], "excerpt": ""}
                                      for f in entry["files"][:cfg.report_samples]]
        totals = _totals(rows, docs_in, rows[0]["bytes_in"] if before_split else bytes_in)
        report: dict[str, Any] = {"corpus_field": corpus_field, "steps": rows, "totals": totals, "samples": samples}
        if before_split:
            report["before_split"] = before_split
        meta: dict[str, Any] = {"report": rows, "samples": samples, "chunks": [e["file"] for e in entries],
                                CHUNK_STAGES: [c.fingerprint for c in chunks]}
        if empty is not None:
            meta["empty"] = empty
        if any(isinstance(s, LanguageStep) for s in steps):
            report["languages"] = meta["languages"] = _language_rows(chunks, stats, found, removals)
        write_json_atomic(tmp / REPORT_FILE, report)
        return BuildOutput(metrics=_metrics(totals, rows), meta=meta)

    return nonempty(run_stage("clean", fingerprint, out_dir, build), may_be_empty)


def nonempty(result: StageResult, may_be_empty: bool) -> StageResult:
    """A clean stage's ``result``, unless it holds no document and the caller does not allow that: then the
    EmptyCorpusError cleaning would raise now. ``may_be_empty`` is not in the fingerprint, so a stage that a
    caller allowing it finished (a continual run's new documents) may be found by one that does not."""
    if "empty" in result.meta and not may_be_empty:
        raise EmptyCorpusError(result.meta["empty"])
    return result


@dataclass
class Removals:
    """What the files under a work directory say about one document (``lmpipe why``).

    rows: one per stage that removed it (stage, stage_dir, chunk, id, source, step, reason, bytes,
    excerpt): finished clean stages first, then finished clean_chunk stages that no finished clean
    stage combined (their clean stage failed or has not run yet).
    uncombined: those clean_chunk stages' directories. While there are any, a document found nowhere
    may still be in one of their chunks, or removed by de-duplication when their clean stage runs.
    """

    rows: list[dict[str, Any]]
    uncombined: list[str]


def why_removed(workdir: str | Path, doc_id: str) -> Removals:
    """Which step removed ``doc_id`` and why, from the stage directories alone (no MLflow, no Prefect).

    A corpus cleaned with several configs has several clean stages, so several rows. When a clean
    stage failed (an empty corpus, a corrupt chunk), its chunks' removals are still in their
    clean_chunk stages' removed.parquet: the answer comes from there.
    """
    workdir = Path(workdir)
    cleans = _finished(workdir / "clean")
    combined = {fp for result in cleans for fp in result.meta.get(CHUNK_STAGES, [])}
    uncombined = [r for r in _finished(workdir / "clean_chunk") if r.fingerprint not in combined]
    rows: list[dict[str, Any]] = []
    for result in cleans + uncombined:
        table = pq.read_table(result.path(REMOVED_FILE), filters=[("id", "=", doc_id)])
        rows += [{"stage": result.stage, "stage_dir": result.out_dir, "chunk": result.meta.get("chunk"), **row}
                 for row in table.to_pylist()]
    return Removals(rows, [r.out_dir for r in uncombined])


def _finished(stage_root: Path) -> list[StageResult]:
    """The finished stages under ``<workdir>/<stage>/``, by directory name (unfinished ones have no result)."""
    found = (load_completed(path) for path in sorted(stage_root.glob("*")) if path.is_dir())
    return [result for result in found if result is not None]

