"""Peak RSS of a whole `lora-prep prepare` against a bare from_pretrained of the same model.

    .venv/bin/python bench/bench_prepare_memory.py [--runs 3] [--model-dir DIR]

The model is the ~200 M-parameter llama of bench/bench_load_memory.py (bfloat16 on disk,
loaded in float32 on CPU as the planner chooses), published into the test hub
(tests/hubserver.py on 127.0.0.1). Each variant runs in a fresh process; peak RSS is the
kernel's high-water mark of that process tree (os.wait4), medians of --runs:
  bare     python -c "AutoModelForCausalLM.from_pretrained(snapshot, dtype=float32, device_map='cpu', attn_implementation='sdpa')"
  prepare  lora-prep prepare (resolve, probe, plan, download, load, LoRA wrap, save, MLflow), against a
           running Prefect API so that the ephemeral server's own process is not counted
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 2**20


def peak(cmd: list[str], env: dict) -> int:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr.read().decode()[-3000:])
    return usage.ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024, help="model width; 2048 gives ~0.8 B params (3.2 GB in float32)")
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()

    from tests.hubserver import HubServer, publish
    from tests.model_factory import build_big_model_dir

    args.model_dir = args.model_dir or Path(f"/tmp/lora-prep-bench/llama-h{args.hidden}-l16")
    if not (args.model_dir / "config.json").exists():
        build_big_model_dir(args.model_dir, hidden=args.hidden, layers=16)
    work = Path(tempfile.mkdtemp(prefix="lora-prep-bench-mem-"))
    server = HubServer(work / "store").start()
    publish(server.store, "bench/llama", args.model_dir)
    from tests.servers import start_prefect_server

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    base_env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", PREFECT_HOME=str(work / "prefect"), LORA_PREP_HOME=str(work / "home"))
    api = start_prefect_server(work / "api")
    try:
        bare, prepare = [], []
        for i in range(args.runs):
            env = {**base_env, "HF_HUB_CACHE": str(work / f"hf{i}"), "PREFECT_API_URL": api.url}
            prepare.append(peak([str(Path(sys.executable).with_name("lora-prep")), "prepare", "bench/llama"], env))
            snapshot = next((work / f"hf{i}" / "models--bench--llama" / "snapshots").iterdir())
            bare.append(peak([sys.executable, "-c",
                              "import sys, torch; from transformers import AutoModelForCausalLM; "
                              "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, device_map='cpu', attn_implementation='sdpa')",
                              str(snapshot)], env))
    finally:
        api.stop()
        server.stop()
    b, p = statistics.median(bare), statistics.median(prepare)
    print(f"bare from_pretrained peak RSS  {b / MiB:8.0f} MiB   runs {[round(x / MiB) for x in bare]}")
    print(f"lora-prep prepare peak RSS     {p / MiB:8.0f} MiB   runs {[round(x / MiB) for x in prepare]}")
    print(f"ratio prepare / bare           {p / b:8.3f}")


if __name__ == "__main__":
    main()
