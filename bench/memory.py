"""Peak memory of the data stages on a corpus larger than memory should need: ``python -m bench.memory``.

Generates a synthetic corpus of ``--gigabytes`` GB (default 2) of UTF-8 text as
zstd-compressed JSON lines, in several files read through one glob, then runs
the real data flow (``lmpipe data``: download, chunked cleaning with exact and
MinHash de-duplication, tokenizer training on a sample, chunked encoding,
sharding) in a child process and samples the resident memory of that process
and of every process it starts (chunk workers), excluding the Prefect API
server it launches. Prints the peak, the stage times and the throughput.

Documents are sentences drawn at random (seeded) from WikiText-2 and Tiny
Shakespeare, so the text is real English, near-unique, and a known share of
documents are exact copies (1%) and near copies (1%) for the de-duplication to
find.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import zstandard

REPO = Path(__file__).resolve().parents[1]
FILE_BYTES = 256 * 2**20  # text per generated file


def _data_dir() -> Path:
    shared = REPO.parent / "shared" / "data"
    return shared if (shared / "tinyshakespeare.txt").is_file() else REPO / "data"


def _sentences() -> list[str]:
    data = _data_dir()
    text = " ".join((data / name).read_text(encoding="utf-8")
                    for name in ("wikitext2-valid.txt", "wikitext2-test.txt", "tinyshakespeare.txt"))
    parts = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return [p for p in parts if 20 <= len(p) <= 400]


def generate(out_dir: Path, total_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Write corpus-NNN.jsonl.zst files holding about total_bytes of text; returns (documents, text bytes)."""
    rng = random.Random(seed)
    sentences = _sentences()
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = written = 0
    recent: list[str] = []
    index = 0
    while written < total_bytes:
        path = out_dir / f"corpus-{index:03d}.jsonl.zst"
        file_bytes = 0
        with open(path, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as z:
            while file_bytes < FILE_BYTES and written < total_bytes:
                roll = rng.random()
                if roll < 0.01 and recent:  # exact copy of a recent document
                    text = rng.choice(recent)
                elif roll < 0.02 and recent:  # near copy: one sentence changed
                    words = rng.choice(recent).split(" ")
                    words[rng.randrange(len(words))] = rng.choice(sentences).split(" ")[0]
                    text = " ".join(words)
                else:
                    text = " ".join(rng.choice(sentences) for _ in range(rng.randint(8, 60)))
                    recent = (recent + [text])[-1000:]
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                z.write(line.encode("utf-8"))
                n = len(text.encode("utf-8"))
                file_bytes += n
                written += n
                docs += 1
        index += 1
    return docs, written


class TreeSampler:
    """Peak RSS of a process and its descendants (one sample every `interval` seconds)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_main = 0
        self.peak_tree = 0

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for p in procs:
            try:
                if "prefect.server" in " ".join(p.cmdline()):
                    continue  # the Prefect API server (uvicorn ... prefect.server.api) is a service, not a stage
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            if p.pid == self.root.pid:
                self.peak_main = max(self.peak_main, rss)
        self.peak_tree = max(self.peak_tree, total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=2.0, help="size of the synthetic corpus's text")
    parser.add_argument("--workdir", help="where to put the corpus and outputs (default: a temporary folder)")
    parser.add_argument("--runner", default="threads", choices=["threads", "processes", "dask"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    if args.workdir:
        return measure(Path(args.workdir), args)
    root = Path(tempfile.mkdtemp(prefix="lmpipe-bench-memory-"))
    try:
        return measure(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # gigabytes of corpus and outputs


def measure(root: Path, args: argparse.Namespace) -> int:
    """Generate the corpus under root (unless it is there), run the data flow, print the table."""
    corpus = root / "corpus"
    start = time.perf_counter()
    if not any(corpus.glob("*.jsonl.zst")):
        docs, nbytes = generate(corpus, int(args.gigabytes * 1e9))
    else:
        docs, nbytes = -1, int(args.gigabytes * 1e9)
    gen_seconds = time.perf_counter() - start
    print(f"corpus: {nbytes / 1e9:.2f} GB of text, {docs} documents, generated in {gen_seconds:.0f} s", flush=True)

    overrides = [
        f"workdir={root / 'work'}",
        "name=bench-memory",
        f"data.pretrain={{name: synthetic, sources: [{{uri: '{corpus}/*.jsonl.zst'}}], val_fraction: 0.001}}",
        "data.clean.minhash.enabled=true",
        f"data.runner.kind={args.runner}",
        f"data.runner.workers={args.workers}",
        "tokenizer.sample_bytes=50000000",
        "tokenizer.vocab_size=8192",
    ]
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    (root / "prefect").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "flows.cli", "data", *overrides]
    start = time.perf_counter()
    log_path = root / "flow.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        while proc.poll() is None:
            sampler.sample()
            time.sleep(sampler.interval)
    seconds = time.perf_counter() - start
    print(log_path.read_text(encoding="utf-8")[-6000:])
    if proc.returncode != 0:
        print(f"bench.memory: the data flow failed (exit {proc.returncode}); its log: {log_path}", file=sys.stderr)
        return 1
    gib = 2**30
    print(f"{'measure':<44}{'value':>14}")
    print("-" * 58)
    print(f"{'text processed (GB)':<44}{nbytes / 1e9:>14.2f}")
    print(f"{'data flow wall time (s)':<44}{seconds:>14.0f}")
    print(f"{'throughput (MB/s of text, all stages)':<44}{nbytes / 1e6 / seconds:>14.2f}")
    print(f"{'peak RSS, flow process (GiB)':<44}{sampler.peak_main / gib:>14.2f}")
    print(f"{'peak RSS, flow + chunk workers (GiB)':<44}{sampler.peak_tree / gib:>14.2f}")
    print(f"{'target':<44}{'< 2 GB (1.86 GiB)':>14}")
    return 0 if sampler.peak_tree < 2e9 else 3


if __name__ == "__main__":
    sys.exit(main())
