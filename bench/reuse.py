"""Benchmark: what verifying reused stages costs a cached re-run, in one process.

    python -m bench.reuse [--config configs/demo.yaml] [--repeats 3] [override ...]

Runs the preset's pipeline once to fill its work directory (minutes, unless a
run already did), then times cached re-runs of the whole flow (every stage
reused) taking turns: ``verified``, as a run does (every file's size, the sha256
of every file up to ``SMALL_FILE_BYTES``), and ``unverified``, with the check
switched off in this process only. Both start Prefect's temporary API once, in
the first run, which is not timed. Prints the best of each, their ratio, and the
bytes hashed.

The target (issue 13): verification adds at most 10% to the demo's cached re-run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml", help="preset (default demo)")
    parser.add_argument("--repeats", type=int, default=3, help="cached re-runs of each kind, taking turns")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. workdir=/tmp/w")
    args = parser.parse_args(argv)

    from flows.cli import _prefect_environment
    from lmpipe.config.loading import load_config

    config = load_config(args.config, args.overrides)
    _prefect_environment(config)  # as `lmpipe run` sets Prefect up: its database in the work directory

    import lmpipe.stages.contract as contract
    from flows.pipeline import pipeline

    checked = contract.file_problems
    hashed = {"files": 0, "bytes": 0}

    def counting(result, *, full=False):  # type: ignore[no-untyped-def]
        for size in result.sizes.values():
            if full or size <= contract.SMALL_FILE_BYTES:
                hashed["files"] += 1
                hashed["bytes"] += size
        return checked(result, full=full)

    start = time.perf_counter()
    summary = pipeline(config=config)
    ran = [s["label"] for s in summary["stages"] if s["status"] != "reused"]
    print(f"first run: {time.perf_counter() - start:.1f} s ({len(ran)} stages ran)")
    times: dict[str, list[float]] = {"verified": [], "unverified": []}
    per_run = dict(hashed)
    for _ in range(args.repeats):
        for kind in times:
            contract.file_problems = counting if kind == "verified" else (lambda result, *, full=False: [])
            hashed.update(files=0, bytes=0)
            start = time.perf_counter()
            summary = pipeline(config=config)
            times[kind].append(time.perf_counter() - start)
            assert {s["status"] for s in summary["stages"]} == {"reused"}, summary["stages"]
            if kind == "verified":
                per_run = dict(hashed)
    contract.file_problems = checked
    best = {kind: min(t) for kind, t in times.items()}
    print(f"cached re-run of {args.config.name} (flow only, best of {args.repeats}; all runs: "
          + ", ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in times.items()) + ")")
    print(f"  verified   {best['verified']:.2f} s  ({per_run['files']} files, {per_run['bytes'] / 1e6:.1f} MB hashed)")
    print(f"  unverified {best['unverified']:.2f} s")
    print(f"  ratio verified / unverified: {best['verified'] / best['unverified']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
