"""The architecture table: the default `prepare` stages on each architecture of the test bed, in-process.

    .venv/bin/python bench/architectures.py > bench/architectures.md

For each tiny random model (tests/model_factory.py) served by the Hub-compatible test server: the LoRA
module leaves and parameter targets the defaults resolve to, their counts, trainable and total
parameters, the dropout, how many modules were left out automatically (routers, modules PEFT refuses
for the architecture), how many decoder layers the forward/backward check ran, and the seconds from
resolve to the written artifact. Everything lives in a temporary directory, removed at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ["repo", "model_type", "LoRA module leaves", "parameter targets", "modules", "params", "trainable", "total",
           "dropout", "left out", "check layers", "s"]


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="lora-prep-architectures-"))
    from tests.hubserver import HubServer

    server = HubServer(home / "store").start()
    try:
        os.environ.update({"HF_ENDPOINT": server.url, "HF_HOME": str(home / "hf"), "HF_HUB_CACHE": str(home / "hf" / "hub"),
                           "HF_HUB_DISABLE_XET": "1", "LORA_PREP_HOME": str(home / "lora-prep")})
        from lora_prep.tasks.build import build_adapter_ready
        from lora_prep.tasks.hub.repo import resolve_repo
        from lora_prep.tasks.hub.snapshot import download_snapshot
        from lora_prep.tasks.machine.hardware import probe_hardware
        from lora_prep.tasks.plan import plan_prepare
        from lora_prep.tasks.settings import (
            LoadSettings,
            LoraSettings,
            OutputSettings,
            SourceSettings,
        )
        from tests.model_factory import EXTRA_REPOS, build_test_repos

        build_test_repos(server.store)
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for repo in ["tiny/llama", "tiny/gpt2", "tiny/phi3", "tiny/gpt-neox", *EXTRA_REPOS.values()]:
            started = time.perf_counter()
            source, load, lora = SourceSettings(), LoadSettings(), LoraSettings()
            output = OutputSettings(output_dir=str(home / "out"))
            facts = resolve_repo(repo, "main", source)
            profile = probe_hardware()
            plan = plan_prepare(profile, facts, load, lora, output, "main", source)
            built = build_adapter_ready(download_snapshot(facts, source), facts, profile, plan, load, lora, output)
            seconds = time.perf_counter() - started
            targets = plan.targets
            leaves = sorted({m.rsplit(".", 1)[-1] for m in built.target_modules})
            row = [repo, facts.config.get("model_type"), ", ".join(leaves), ", ".join(targets.expert_parameter_leaves) or "-",
                   len(built.target_modules), len(built.target_parameters), f"{built.trainable_params:,}",
                   f"{built.total_params:,}", targets.dropout, len(targets.excluded),
                   f"{built.check.layers}/{built.check.layers_total}", f"{seconds:.2f}"]
            print("| " + " | ".join(str(x) for x in row) + " |", flush=True)
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
