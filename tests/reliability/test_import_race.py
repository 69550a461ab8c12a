"""No package is first-imported by two threads at once: the window in which transformers' own import breaks.

While transformers' ``__init__`` runs in one thread, ``from transformers import AutoConfig`` in another
raises ``ImportError: cannot import name 'AutoConfig'`` (the waiting thread is handed the module object
that ``__init__`` is about to replace in ``sys.modules``). A background "warm-up" import opened that window
in every CLI run; which run fell into it depended on how fast the first stages were.

The test makes the window as wide as a run: a ``sitecustomize`` in the CLI process holds any thread other
than the main one for HOLD_S seconds inside transformers' ``__init__`` (on its first submodule import), and
an audit hook records which thread imported every module of the heavy packages. A run that imports
transformers off the main thread fails deterministically under this hook; the runs below must succeed,
and every heavy import must have happened in the main thread.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.servers import child_env

LORA_PREP = str(Path(sys.executable).with_name("lora-prep"))
HOLD_S = 30  # longer than any run here takes to reach its first transformers import
HEAVY = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors")
pytestmark = pytest.mark.slow

_SITECUSTOMIZE = textwrap.dedent(
    """
    import atexit, json, os, sys, threading, time

    _log, _main = os.environ["LORA_PREP_TEST_IMPORT_LOG"], threading.main_thread()
    _heavy = tuple(os.environ["LORA_PREP_TEST_HEAVY"].split(","))
    _seen = {"imports": [], "held": [], "threads_by_module": {}}
    _threads = {}

    def _audit(event, args):
        if event != "import":
            return
        _threads.setdefault(args[0], set()).add(threading.current_thread().name)
        if args[0].split(".")[0] in _heavy:
            _seen["imports"].append([args[0], threading.current_thread() is _main, threading.current_thread().name])

    def _write():
        # Modules that two threads both started to import (an import that failed, an optional
        # dependency probed, does not count: only what ended up imported).
        _seen["threads_by_module"] = {m: sorted(t) for m, t in _threads.items() if len(t) > 1 and m in sys.modules}
        with open(_log, "w") as f:
            f.write(json.dumps(_seen))

    class _HoldInsideTransformersInit:
        # transformers/__init__.py imports transformers.dependency_versions_check first: a thread asking
        # for it is inside that __init__, with sys.modules["transformers"] not yet replaced.
        def find_spec(self, name, path=None, target=None):
            if name == "transformers.dependency_versions_check" and threading.current_thread() is not _main:
                _seen["held"].append(threading.current_thread().name)
                time.sleep(float(os.environ["LORA_PREP_TEST_HOLD_S"]))
            return None

    sys.addaudithook(_audit)
    sys.meta_path.insert(0, _HoldInsideTransformersInit())
    atexit.register(_write)
    """
)


def _run_with_hook(tmp_path: Path, argv: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    log = tmp_path / f"imports-{len(list(tmp_path.glob('imports-*')))}.json"
    env = {**env, "PYTHONPATH": str(hook), "LORA_PREP_TEST_IMPORT_LOG": str(log),
           "LORA_PREP_TEST_HOLD_S": str(HOLD_S), "LORA_PREP_TEST_HEAVY": ",".join(HEAVY)}
    done = subprocess.run([LORA_PREP, *argv], capture_output=True, text=True, env=env, timeout=240)
    return done, json.loads(log.read_text())


@pytest.mark.parametrize(
    ("repo", "extra"),
    [("tiny/llama-pickle", ["--allow-pickle"]), ("tiny/remote-code", ["--trust-remote-code", "--revision", "SHA"])],
    ids=["pickle-only", "remote-code"],
)
def test_a_prepare_imports_every_heavy_package_in_one_thread_even_when_another_would_hold_transformers_init(
    prefect_harness, hub, hf_cache, tmp_path, repo, extra
):
    extra = [hub.repos[repo].sha if a == "SHA" else a for a in extra]
    env = child_env({"PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(hf_cache)})
    argv = ["prepare", repo, *extra, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--output-dir", str(tmp_path / "out"), "--json"]
    done, seen = _run_with_hook(tmp_path, argv, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["repo_id"] == repo
    assert seen["held"] == []  # no thread but the main one ever entered transformers' __init__
    off_main = sorted({f"{name} ({thread})" for name, on_main, thread in seen["imports"] if not on_main})
    assert off_main == [], f"heavy modules imported outside the main thread: {off_main[:10]}"
    assert any(name == "transformers" for name, _, _ in seen["imports"])  # the hook did watch the imports
    assert seen["threads_by_module"] == {}, f"modules imported by two threads: {seen['threads_by_module']}"
