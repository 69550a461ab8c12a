"""Peak RSS of the load stage against a bare transformers load (a benchmark, not a test).

    .venv/bin/python bench/bench_load_memory.py [--runs 3] [--dtypes float32,bfloat16] [--model-dir DIR]

Builds a ~200 M-parameter llama once (tests.model_factory.build_big_model_dir, bfloat16 on
disk: 0.4 GB, 0.8 GB in float32) into /tmp and reuses it. Each measurement runs in a fresh
subprocess that first imports the same libraries (torch, transformers, peft, tasks.*), so
every figure pays the same import cost; the modes are:

    imports  nothing more: the baseline
    bare     AutoModelForCausalLM.from_pretrained(dir, dtype=..., device_map="cpu", attn_implementation=...)
    load     tasks.load.load_model through probe_hardware -> plan_load -> load_model (same dtype, device, attention)
    wrap     load, then tasks.lora.wrap_lora(model, LoraSettings())   (skipped while tasks/lora/wrap.py is missing)

Peak RSS is ru_maxrss (the kernel's high-water mark, so nothing between polls is missed),
read after the load and again after one 8-token forward pass, which touches every weight
(transformers memory-maps safetensors: a bfloat16 load may not have read every page yet).
Reported: medians over --runs, absolute and as the increase over the imports-only baseline,
and the ratios load/bare and wrap/bare of those increases.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path("/tmp/lora-prep-bench/llama-h1024-l16")
MODES = ("imports", "bare", "load", "wrap")
MiB = 2**20


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux, bytes on macOS


# --- child: one measurement in a fresh process -------------------------------------------


def _model_facts(model_dir: Path):
    """ModelFacts as the resolve stage builds them: config.json plus counts from safetensors headers."""
    from lora_prep.tasks.model.facts import ModelFacts

    return ModelFacts.from_local_dir(model_dir, "bench/llama", "0" * 40)


def child(mode: str, dtype: str, model_dir: Path) -> dict:
    # The same imports in every mode, so the baseline pays exactly what the others pay.
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM

    from lora_prep.tasks.machine.hardware import probe_hardware
    from lora_prep.tasks.model.load import load_model
    from lora_prep.tasks.model.load_plan import plan_load
    from lora_prep.tasks.settings import LoadSettings, LoraSettings

    try:
        from lora_prep.tasks.lora.wrap import wrap_lora
    except ImportError:
        wrap_lora = None

    after_imports = peak_rss()
    started = time.perf_counter()
    model = None
    settings = LoadSettings(dtype=dtype, device_map="cpu")
    plan = plan_load(probe_hardware(), _model_facts(model_dir), settings, "main")
    if mode == "bare":
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, plan.dtype), device_map="cpu",
            attn_implementation=plan.attn_implementation, use_safetensors=True, local_files_only=True,
        )  # fmt: skip
    elif mode in ("load", "wrap"):
        model = load_model(str(model_dir), plan, settings).model
        if mode == "wrap":
            if wrap_lora is None:
                return {"skipped": "tasks/lora/wrap.py is missing"}
            model, _ = wrap_lora(model, LoraSettings())
    seconds = time.perf_counter() - started
    after_load = peak_rss()
    if model is not None:
        with torch.no_grad():
            model(input_ids=torch.arange(1, 9).unsqueeze(0))
    return {
        "after_imports": after_imports,
        "after_load": after_load,
        "after_forward": peak_rss(),
        "seconds": seconds,
        "plan": {"dtype": plan.dtype, "attn": plan.attn_implementation, "device_map": plan.device_map},
    }


# --- parent: build once, run every mode in fresh processes, summarise ----------------------


def ensure_model(model_dir: Path) -> Path:
    if (model_dir / "model.safetensors.index.json").exists():
        return model_dir
    sys.path.insert(0, str(REPO))
    from tests.model_factory import build_big_model_dir

    print(f"building the benchmark model into {model_dir} (once) ...", flush=True)
    tmp = model_dir.with_name(model_dir.name + ".partial")
    build_big_model_dir(tmp, hidden=1024, layers=16)
    os.replace(tmp, model_dir)  # a killed build never leaves a half-written model to be reused
    return model_dir


def run_child(mode: str, dtype: str, model_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--child", mode, "--dtype", dtype, "--model-dir", str(model_dir)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{mode}/{dtype} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, list[dict]]) -> dict:
    med = lambda key, mode: statistics.median(r[key] for r in results[mode])  # noqa: E731
    base = med("after_forward", "imports")
    table = {"imports": {"peak_bytes": base}}
    for mode in ("bare", "load", "wrap"):
        if not results.get(mode) or "skipped" in results[mode][0]:
            continue
        table[mode] = {
            "peak_after_load_bytes": med("after_load", mode),
            "peak_bytes": med("after_forward", mode),
            "increase_after_load_bytes": med("after_load", mode) - base,
            "increase_bytes": med("after_forward", mode) - base,
            "seconds": med("seconds", mode),
        }
    for mode in ("load", "wrap"):
        if mode in table:
            for key in ("increase_after_load_bytes", "increase_bytes"):
                bare = table["bare"][key]
                # A lazily memory-mapped bfloat16 load can stay within the import baseline's noise (< 16 MiB).
                table[mode][key.replace("bytes", "ratio_to_bare")] = round(table[mode][key] / bare, 3) if bare > 16 * MiB else None
    return table


def print_table(dtype: str, table: dict, plan: dict) -> None:
    print(f"\n{dtype} (plan: {plan})")
    print(f"  {'mode':8} {'peak MiB':>9} {'+ over imports':>15} {'ratio to bare':>14} {'after load only':>16} {'ratio':>6} {'load s':>7}")
    print(f"  {'imports':8} {table['imports']['peak_bytes'] / MiB:9.0f}")
    for mode in ("bare", "load", "wrap"):
        if mode not in table:
            continue
        row = table[mode]
        ratio = _ratio(row.get("increase_ratio_to_bare", 1.0))
        ratio_load = _ratio(row.get("increase_after_load_ratio_to_bare", 1.0))
        print(
            f"  {mode:8} {row['peak_bytes'] / MiB:9.0f} {row['increase_bytes'] / MiB:15.0f} {ratio:>14}"
            f" {row['increase_after_load_bytes'] / MiB:16.0f} {ratio_load:>6} {row['seconds']:7.2f}"
        )


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated LoadSettings.dtype values")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.model_dir)))
        return

    model_dir = ensure_model(args.model_dir)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(f"model: {model_dir} ({size / MiB:.0f} MiB of safetensors on disk), {args.runs} runs per mode, medians")
    summary = {}
    for dtype in args.dtypes.split(","):
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(args.runs):
            for mode in MODES:  # round-robin, so drift (page cache, other load) hits every mode alike
                results[mode].append(run_child(mode, dtype, model_dir))
        summary[dtype] = summarise(results)
        print_table(dtype, summary[dtype], results["bare"][0]["plan"])
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
