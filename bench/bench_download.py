"""Benchmark the download stage on the largest test model, against the plain baselines.

    .venv/bin/python bench/bench_download.py [--hidden 1024 --layers 8 --repeat 3] [--json out.json]

Builds ``tests.model_factory.build_big_model_dir`` (defaults: ~115 M params, ~230 MB bf16 in
100 MB shards), publishes it into a temporary store served by ``tests.hubserver.HubServer``
on 127.0.0.1, and measures, medians of ``--repeat`` runs, each cold run on a fresh cache:

- cold: resolve_repo + download_snapshot (ours), bare ``snapshot_download`` with the same file
  selection, and the ``hf download`` CLI with the same files (a subprocess: its time includes
  the CLI's start-up, reported separately as a ``hf version`` run).
- bytes: whole-file GET bodies and ranged header reads, counted by the server.
- warm: resolve_repo + download_snapshot again on the same cache: bytes on the wire and what
  verification costs when the markers hold, against hashing everything on the cold run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hubserver import HubServer  # noqa: E402 - no huggingface_hub import yet

REPO_ID = "bench/big-llama"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lora-prep-bench-"))
    try:
        results = serve_and_run(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # about 2 GB of store and caches
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def serve_and_run(work: Path, args) -> dict:
    with HubServer(work / "store") as server:
        # huggingface_hub reads these when imported: set them first.
        os.environ.update(
            HF_ENDPOINT=server.url,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HOME=str(work / "hf-home"),
            HF_HUB_CACHE=str(work / "hf-home" / "unused-default-cache"),
        )
        os.environ.pop("HF_TOKEN", None)
        return run(server, work, args)


def run(server: HubServer, work: Path, args) -> dict:
    from huggingface_hub import snapshot_download

    from lora_prep.tasks.hub.repo import resolve_repo
    from lora_prep.tasks.hub.snapshot import download_snapshot
    from lora_prep.tasks.hub.verify import VerifyStats
    from lora_prep.tasks.settings import SourceSettings
    from tests.model_factory import build_big_model_dir

    t0 = time.perf_counter()
    src_dir = build_big_model_dir(work / "src", hidden=args.hidden, layers=args.layers)
    server.publish(REPO_ID, src_dir)
    build_s = time.perf_counter() - t0

    def fresh_cache(tag: str, i: int) -> Path:
        return work / "caches" / f"{tag}-{i}"

    def whole_and_ranged() -> tuple[int, int]:
        gets = server.records(f"/{REPO_ID}/resolve/*", "GET")
        return sum(r.body_bytes for r in gets if r.range is None), sum(r.body_bytes for r in gets if r.range)

    hf = str(Path(sys.executable).parent / "hf")
    m: dict[str, list] = {k: [] for k in (
        "ours", "ours_resolve", "ours_bytes", "cold_verify", "cold_hash", "warm", "warm_bytes", "warm_requests",
        "warm_verify", "bare", "bare_bytes", "cli", "cli_bytes", "cli_startup",
    )}
    selected = None
    # Interleaved (ours, bare, CLI) per round, so no contender always meets a warmer page cache.
    for i in range(args.repeat):
        source = SourceSettings(cache_dir=str(fresh_cache("ours", i)))
        server.reset_counters()
        stats = VerifyStats()
        t = time.perf_counter()
        facts = resolve_repo(REPO_ID, "main", source)
        m["ours_resolve"].append(time.perf_counter() - t)
        download_snapshot(facts, source, stats=stats)
        m["ours"].append(time.perf_counter() - t)
        m["ours_bytes"].append(whole_and_ranged())
        m["cold_verify"].append(stats.seconds)
        m["cold_hash"].append((stats.hash_seconds, stats.hashed_bytes))
        selected = facts

        server.reset_counters()
        stats = VerifyStats()
        t = time.perf_counter()
        download_snapshot(resolve_repo(REPO_ID, "main", source), source, stats=stats)
        m["warm"].append(time.perf_counter() - t)
        m["warm_bytes"].append(whole_and_ranged())
        m["warm_requests"].append(server.requests())
        m["warm_verify"].append((stats.seconds, stats.hashed))

        server.reset_counters()
        t = time.perf_counter()
        snapshot_download(REPO_ID, cache_dir=str(fresh_cache("bare", i)), allow_patterns=selected.selected)
        m["bare"].append(time.perf_counter() - t)
        m["bare_bytes"].append(whole_and_ranged())

        server.reset_counters()
        t = time.perf_counter()
        subprocess.run(
            [hf, "download", REPO_ID, *selected.selected, "--cache-dir", str(fresh_cache("cli", i))],
            check=True, capture_output=True, timeout=600,
        )
        m["cli"].append(time.perf_counter() - t)
        m["cli_bytes"].append(whole_and_ranged())
        t = time.perf_counter()
        subprocess.run([hf, "version"], check=True, capture_output=True, timeout=120)
        m["cli_startup"].append(time.perf_counter() - t)

    med = statistics.median
    return {
        "model": {
            "repo_id": REPO_ID, "params": selected.param_count, "dtypes": selected.stored_dtypes,
            "selected_files": len(selected.selected), "selected_bytes": selected.selected_bytes,
            "weight_files": [p for p in selected.selected if p.endswith(".safetensors")],
            "build_and_publish_s": round(build_s, 2),
        },
        "repeat": args.repeat,
        "cold": {
            "ours_resolve_download_verify_s": round(med(m["ours"]), 3),
            "ours_resolve_s": round(med(m["ours_resolve"]), 3),
            "bare_snapshot_download_s": round(med(m["bare"]), 3),
            "hf_download_cli_s": round(med(m["cli"]), 3),
            "hf_cli_startup_s": round(med(m["cli_startup"]), 3),
            "ours_whole_file_bytes": m["ours_bytes"][0][0],
            "ours_header_range_bytes": m["ours_bytes"][0][1],
            "bare_whole_file_bytes": m["bare_bytes"][0][0],
            "cli_whole_file_bytes": m["cli_bytes"][0][0],
            "verify_s": round(med(m["cold_verify"]), 3),
            "hash_s": round(med(h for h, _ in m["cold_hash"]), 3),
            "hashed_bytes": m["cold_hash"][0][1],
        },
        "warm": {
            "resolve_download_verify_s": round(med(m["warm"]), 4),
            "whole_file_bytes": m["warm_bytes"][0][0],
            "header_range_bytes": m["warm_bytes"][0][1],
            "requests": m["warm_requests"][0],
            "verify_s": round(med(v for v, _ in m["warm_verify"]), 5),
            "files_hashed": m["warm_verify"][0][1],
        },
    }


if __name__ == "__main__":
    main()
