"""CLI start-up cost and concurrent runs, against a bare script doing the same work.

    .venv/bin/python bench/bench_cli.py [--runs 3]

Serves tiny/llama from the test hub (tests/hubserver.py) on 127.0.0.1 and measures, in
fresh processes, medians of --runs:
  bare     a plain script: snapshot_download + from_pretrained + get_peft_model + save_pretrained
  cli      `lora-prep prepare` on the embedded defaults (ephemeral Prefect server, MLflow SQLite)
  cli-api  `lora-prep prepare` against an already running Prefect API (PREFECT_API_URL)
  2x cli   two `lora-prep prepare` started together on one PREFECT_HOME (wall time, exit codes)
Each run gets a cold HF cache (all variants download the same bytes); the MLflow store and
PREFECT_HOME are shared and warmed once, as on a user's machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BARE = textwrap.dedent(
    """
    import sys
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import LoraConfig, get_peft_model
    d = snapshot_download("tiny/llama", allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    m = AutoModelForCausalLM.from_pretrained(d)
    t = AutoTokenizer.from_pretrained(d)
    p = get_peft_model(m, LoraConfig(r=16, target_modules="all-linear"))
    p.save_pretrained(sys.argv[1] + "/adapter"); t.save_pretrained(sys.argv[1] + "/tokenizer")
    """
)


def timed(cmd: list[str], env: dict, timeout: int = 300) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
    return time.perf_counter() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from tests.hubserver import HubServer
    from tests.model_factory import build_test_repos

    work = Path(tempfile.mkdtemp(prefix="lora-prep-bench-cli-"))
    server = HubServer(work / "store").start()
    build_test_repos(server.store)
    lora_prep = str(Path(sys.executable).with_name("lora-prep"))

    def env(i: int, **extra) -> dict:
        run = work / f"run{i}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
        return {**base, "HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_CACHE": str(run / "hf"),
                "LORA_PREP_HOME": str(work / "home"), "PREFECT_HOME": str(work / "prefect-home"), **extra}

    results: dict[str, list[float]] = {"bare": [], "cli": [], "cli-api": []}
    n = 0
    # One warm-up of the embedded server: its first start runs the database migrations.
    timed([lora_prep, "prepare", "tiny/llama"], env(n)); n += 1
    for _ in range(args.runs):
        results["bare"].append(timed([sys.executable, "-c", BARE, str(work / f"bare{n}")], env(n))[0]); n += 1
        results["cli"].append(timed([lora_prep, "prepare", "tiny/llama"], env(n))[0]); n += 1

    from tests.servers import start_prefect_server

    api = start_prefect_server(work / "api")
    try:
        for _ in range(args.runs):
            results["cli-api"].append(timed([lora_prep, "prepare", "tiny/llama"], env(n, PREFECT_API_URL=api.url))[0]); n += 1
    finally:
        api.stop()

    started = time.perf_counter()
    procs = [subprocess.Popen([lora_prep, "prepare", "tiny/llama"], env=env(n + i), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    both = time.perf_counter() - started
    locked = sum("database is locked" in (p.stderr.read() or "") for p in procs)
    server.stop()

    bare = statistics.median(results["bare"])
    print(f"{'variant':<10} {'median s':>9} {'ratio to bare':>14}   runs")
    for name, values in results.items():
        med = statistics.median(values)
        print(f"{name:<10} {med:>9.2f} {med / bare:>14.2f}   {', '.join(f'{v:.2f}' for v in values)}")
    print(f"2x cli     {both:>9.2f} wall, exit codes {codes}, 'database is locked' in {locked} of 2 stderr")


if __name__ == "__main__":
    main()
