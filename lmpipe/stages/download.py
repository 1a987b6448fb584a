"""Stage download: read every source of a corpus into chunked document files, with a read report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lmpipe.artifacts import BuildOutput, StageResult, write_json_atomic
from lmpipe.config.data import CorpusConfig
from lmpipe.data.documents import ChunkWriter
from lmpipe.data.gutenberg import STEP as GUTENBERG_STEP
from lmpipe.data.gutenberg import GutenbergCut
from lmpipe.data.reader import READ_REPORT_FILE, ReadReport, SourceReader
from lmpipe.data.sources import HTTP_BACKOFF_S, HTTP_RETRIES, SOURCES_FILE, check_sources
from lmpipe.stages.contract import run_stage

# ---------------------------------------------------------------------------
# the stage


def run_download(corpus: CorpusConfig, out_dir: str | Path, fingerprint: str, *, field: str, chunk_bytes: int,
                 strict: bool = False, download_dir: Path | None = None, retries: int = HTTP_RETRIES,
                 backoff_s: float = HTTP_BACKOFF_S, gutenberg_boilerplate: bool = False) -> StageResult:
    """Stream every source of ``corpus`` into a document set, ``sources.json`` and ``read_report.json``.

    field: the corpus's config path (e.g. "data.pretrain") for messages.
    chunk_bytes: about this many UTF-8 bytes of text per chunk file.
    strict: raise SourceContentError on the first bad record instead of counting it.
    download_dir: cache of http(s) downloads kept across runs (the flow passes
    ``<workdir>/downloads``); None downloads into the build directory and discards.
    retries, backoff_s: of each http(s) download (see ``download_url``).
    gutenberg_boilerplate: cut Project Gutenberg headers and licences from each file (each record of a JSON
    lines, parquet or Hub source) before it is split into documents (``lmpipe.data.gutenberg``); what each
    file lost is in the stage's meta (``before_split``), which the clean stage reports.
    """
    check_sources(corpus, field)

    def build(tmp: Path) -> BuildOutput:
        scratch = tmp / "_scratch"  # a Hub cache, and downloads without a cache dir; removed before publishing
        scratch.mkdir()
        report = ReadReport(field, strict, len(corpus.sources))
        entries = []
        cuts: list[GutenbergCut] = []
        try:
            with ChunkWriter(tmp, chunk_bytes) as writer:
                for i, source in enumerate(corpus.sources):
                    reader = SourceReader(source, i, f"{field}.sources[{i}]", report, scratch,
                                           Path(download_dir) if download_dir is not None else scratch / "downloads",
                                           retries, backoff_s, gutenberg_boilerplate)
                    entries.append(_read_source(reader, corpus.name, writer))
                    cuts += [c for c in reader.cuts if c.bytes_removed]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        write_json_atomic(tmp / SOURCES_FILE, entries)
        write_json_atomic(tmp / READ_REPORT_FILE, report.to_json([s.uri for s in corpus.sources]))
        metrics = {"documents": float(writer.documents), "bytes": float(writer.bytes),
                   "sources": float(len(entries)), "chunks": float(len(writer.chunks)),
                   "bad_records": float(report.total)}
        metrics.update({f"bad_records.{k}": float(n) for k, n in report.issues.items() if n})
        meta = {"sources": entries, "chunks": [c["file"] for c in writer.chunks], "read_issues": report.issues}
        if gutenberg_boilerplate:
            removed = sum(c.bytes_removed for c in cuts)
            metrics[f"{GUTENBERG_STEP}.bytes_removed"] = float(removed)
            meta["before_split"] = [{"step": GUTENBERG_STEP, "bytes_removed": removed,
                                     "files": [c.to_json() for c in cuts]}]
        return BuildOutput(metrics=metrics, meta=meta)

    return run_stage("download", fingerprint, out_dir, build)


def _read_source(reader: SourceReader, corpus_name: str, writer: ChunkWriter) -> dict[str, Any]:
    """Write one source's documents; its sources.json entry."""
    prefix = f"{corpus_name}/{reader.index}/"
    count, total = 0, 0
    for doc in reader.documents():
        origin = reader.files[-1].path if reader.files else reader.source.uri
        writer.add(prefix + (doc.doc_id if doc.doc_id is not None else str(count)), doc.text, origin, doc.nbytes)
        count += 1
        total += doc.nbytes
    return {"uri": reader.source.uri, "files": [f.to_json() for f in reader.files], "documents": count,
            "bytes": total}
