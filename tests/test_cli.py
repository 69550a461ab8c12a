"""The `lora-prep` command line: exit codes, one-line errors, --json.

Refusals run in-process through `lora_prep.cli.main` (the same code path as the console
script, against the session's Prefect harness); two tests start the real console
script as a subprocess to check what a user's terminal gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_prep.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("lora-prep: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def common(hf_cache, mlflow_uri, tmp_path) -> list[str]:
    return ["--cache-dir", str(hf_cache), "--tracking-uri", mlflow_uri, "--output-dir", str(tmp_path / "out")]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nobody/nothing"], ["not found", "HF_TOKEN"]),
        (["tiny/llama", "--revision", "no-such-branch"], ["revision", "no-such-branch"]),
        (["tiny/gated"], ["gated", "HF_TOKEN"]),
        (["tiny/llama-pickle"], ["pickle", "--allow-pickle"]),
        (["tiny/remote-code"], ["own python code", "--trust-remote-code"]),
        (["tiny/remote-code", "--trust-remote-code"], ["--revision"]),
        (["tiny/llama", "--max-memory", "cpu=100KB"], ["MiB", "max_memory"]),
        (["tiny/llama", "--r", "0", "--dropout", "1.5"], ["lora.r", "lora.dropout"]),
        (["tiny/llama", "--target-modules", "q_projj"], ["q_projj", "q_proj"]),
    ],
    ids=[
        "unknown-repo",
        "bad-revision",
        "gated-without-token",
        "pickle-only",
        "remote-code",
        "remote-code-unpinned",
        "does-not-fit",
        "invalid-lora",
        "unknown-target-module",
    ],
)
def test_each_refusal_exits_2_with_one_line_that_names_the_fix(capsys, hub, common, mlflow_uri, tmp_path, argv, expected):
    code, out, err = _run(capsys, "prepare", *argv, *common)

    assert code == 2, err
    line = _error_line(err)
    for fragment in expected:
        assert fragment.lower() in line.lower(), line
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]
    _assert_no_mlflow_run_left_running(mlflow_uri)


def _assert_no_mlflow_run_left_running(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lora-prep")
    if experiment is not None:  # refusals before the run opens leave no run at all
        runs = client.search_runs([experiment.experiment_id])
        assert all(r.info.status == "FAILED" for r in runs), [r.info.status for r in runs]


def test_an_unexpected_failure_exits_1(capsys, hub, common):
    # An unreachable MLflow server is not the user's input: exit 1, and the artifact is kept.
    code, out, err = _run(capsys, "prepare", "tiny/llama", *common[:2], "--tracking-uri", "http://127.0.0.1:9", *common[4:])

    assert code == 1
    assert "lora-prep log" in _error_line(err)


def test_plan_is_a_dry_run_that_downloads_no_weights(capsys, hub, hf_cache):
    code, out, err = _run(capsys, "plan", "tiny/llama-extras", "--cache-dir", str(hf_cache), "--json")

    assert code == 0, err
    report = json.loads(out)
    assert report["commit_sha"] == hub.repos["tiny/llama-extras"].sha
    assert {f["path"] for f in report["files"]} >= {"config.json", "model.safetensors"}
    assert not [f for f in report["files"] if f["path"].endswith((".bin", ".pth")) or f["path"].startswith("original/")]
    # resolve reads config.json (a few hundred bytes) into the cache; nothing else is fetched.
    assert [f["path"] for f in report["files"] if f["cached"]] == ["config.json"]
    assert 0 < report["bytes_to_download"] < report["bytes_total"]
    assert report["fits"] and report["plan"]["dtype"] == "float32"
    assert "model.layers.0.self_attn.q_proj" in report["targets"]["target_modules"]
    assert report["targets"]["trainable_params"] > 0 and report["artifact_parent"]
    weights = [r for r in hub.records("*/model.safetensors", "GET")]
    assert all(r.range for r in weights), "only ranged header reads, no weights body"
    # main() called by a caller (not the console script) leaves bitsandbytes importable in the caller's process.
    assert sys.modules.get("bitsandbytes", "not imported") is not None


_PLAN_IMPORTS = """
import atexit, json, sys
from lora_prep.cli import console_main
heavy = ("prefect", "mlflow", "bitsandbytes", "torch", "transformers", "peft")
atexit.register(lambda: print("IMPORTED " + json.dumps([m for m in heavy if sys.modules.get(m) is not None]), file=sys.stderr))
sys.argv = ["lora-prep", *sys.argv[1:]]
console_main()
"""


def test_plan_imports_what_it_uses_and_not_the_engine_or_the_store(hub, hf_cache):
    # A dry run never runs a flow or logs a run: Prefect and MLflow stay unimported (about 1.5 s and 1 s here), and so
    # does bitsandbytes when nothing is quantized. The console script's own process, as a user runs it.
    out = subprocess.run(
        [sys.executable, "-c", _PLAN_IMPORTS, "plan", "tiny/llama", "--cache-dir", str(hf_cache), "--json"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["fits"]
    imported = json.loads(out.stderr.split("IMPORTED ")[-1])
    assert imported == ["torch", "transformers", "peft"]  # the skeleton and PEFT's target resolution


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_prepare_imports_bitsandbytes_only_when_it_quantizes(prefect_harness, hub, hf_cache, mlflow_uri, tmp_path, quantization):
    # The console script's process runs one preparation: without quantization PEFT's eager bitsandbytes import
    # (native libraries and torch's compiler stack, about 1 s) is kept out; a 4-bit run loads with it, on this CPU.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PLAN_IMPORTS,
            "prepare",
            "tiny/llama",
            "--quantization",
            quantization,
            "--r",
            "4",
            "--tracking-uri",
            mlflow_uri,
            "--output-dir",
            str(tmp_path / "out"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=_cli_env(prefect_harness, hf_cache),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    manifest = json.loads((Path(result["artifact_dir"]) / "manifest.json").read_text())
    assert manifest["load_used"]["quantization"].startswith(quantization)  # "none", or "4bit nf4 double-quant ..."
    imported = json.loads(out.stderr.split("IMPORTED ")[-1])
    assert imported == ["prefect", "mlflow", *(["bitsandbytes"] if quantization == "4bit" else []), "torch", "transformers", "peft"]


def test_keep_bitsandbytes_out_acts_only_for_an_unquantized_run_of_a_one_run_process():
    # In a fresh interpreter: the block is process-wide (sys.modules), so it cannot be tried in the test's own.
    script = (
        "import json, sys\n"
        "from lora_prep.tasks.machine import kbit\n"
        "before = kbit.keep_bitsandbytes_out('none', {})\n"  # not a one-run process: a caller's, left alone
        "kbit.one_run_process()\n"
        "prequantized = kbit.keep_bitsandbytes_out('none', {'quantization_config': {'quant_method': 'bitsandbytes'}})\n"
        "quantized = kbit.keep_bitsandbytes_out('4bit', {})\n"
        "kept_out = kbit.keep_bitsandbytes_out('none', {})\n"
        "try:\n"
        "    import bitsandbytes  # noqa: F401\n"
        "    imports = True\n"
        "except ImportError:\n"
        "    imports = False\n"
        "from transformers.utils import is_bitsandbytes_available\n"
        "from peft.import_utils import is_bnb_available\n"
        "print(json.dumps([before, prequantized, quantized, kept_out, imports, is_bitsandbytes_available(), is_bnb_available()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == [False, False, False, True, False, False, False]


def test_plan_exits_2_and_says_why_when_the_model_does_not_fit(capsys, hub, hf_cache):
    code, out, err = _run(capsys, "plan", "tiny/llama", "--cache-dir", str(hf_cache), "--max-memory", "cpu=100KB")

    assert code == 2
    assert "fits       NO" in out and "max_memory" in out


def test_probe_prints_a_table_and_json(capsys):
    code, out, _ = _run(capsys, "probe")
    assert code == 0 and "CPU" in out
    code, out, _ = _run(capsys, "probe", "--json")
    profile = json.loads(out)
    assert code == 0 and profile["cpu_count"] >= 1 and "cuda_available" in profile


def _cli_env(prefect_harness: str, hf_cache: Path) -> dict[str, str]:
    # Reuse the session's Prefect API instead of letting each process start its own server.
    return {**os.environ, "PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(hf_cache)}


def test_prepare_json_from_a_fresh_process_prints_one_parsable_object_and_load_reads_it_back(
    prefect_harness, hub, hf_cache, mlflow_uri, tmp_path
):
    lora_prep = Path(sys.executable).with_name("lora-prep")
    env = _cli_env(prefect_harness, hf_cache)
    prepared = subprocess.run(
        [lora_prep, "prepare", "tiny/gpt2", "--r", "4", "--tracking-uri", mlflow_uri, "--output-dir", str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    result = json.loads(prepared.stdout)
    assert result["commit_sha"] == hub.repos["tiny/gpt2"].sha
    assert {
        "artifact_dir",
        "mlflow_run_id",
        "model_uri",
        "total_params",
        "trainable_params",
        "target_modules",
        "bytes_downloaded",
        "from_cache",
        "seconds",
    } <= set(result)

    loaded = subprocess.run([lora_prep, "load", result["artifact_dir"], "--json"], capture_output=True, text=True, env=env, timeout=240)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    summary = json.loads(loaded.stdout)
    assert summary["base"] == "tiny/gpt2" and summary["commit_sha"] == result["commit_sha"]
    assert summary["target_modules"] == result["target_modules"]
    assert summary["trainable_params"] == 0  # loaded frozen unless --trainable


def test_a_refusal_in_a_real_terminal_is_one_error_line_without_traceback(prefect_harness, hub, hf_cache, tmp_path):
    lora_prep = Path(sys.executable).with_name("lora-prep")
    done = subprocess.run(
        [lora_prep, "prepare", "tiny/llama-pickle", "--output-dir", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
        capture_output=True,
        text=True,
        env=_cli_env(prefect_harness, hf_cache),
        timeout=240,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "--allow-pickle" in _error_line(done.stderr)
    assert done.stderr.count("--allow-pickle") == 1, done.stderr  # said once, not again by Prefect's logs
    assert done.stdout == ""


def test_make_prepare_runs_the_flow_and_leaves_the_artifact_and_mlflow_store_in_the_per_user_directory(
    prefect_harness, hub, hf_cache, tmp_path
):
    repo = Path(__file__).resolve().parents[1]
    home = tmp_path / "home"
    venv = Path(sys.prefix)  # the suite's own environment: `make` finds it set up and skips the install
    env = {**_cli_env(prefect_harness, hf_cache), "HOME": str(home), "XDG_DATA_HOME": str(home / ".local" / "share")}
    env.pop("LORA_PREP_HOME", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        ["make", "-s", "prepare", "MODEL=tiny/llama", f"VENV={venv}"], cwd=repo, capture_output=True, text=True, env=env, timeout=300
    )

    assert done.returncode == 0, done.stderr[-3000:]
    data = home / ".local" / "share" / "lora-prep"
    artifacts = [p for p in (data / "artifacts").iterdir() if not p.name.startswith(".")]
    assert len(artifacts) == 1 and artifacts[0].name.startswith("tiny--llama--")
    assert (artifacts[0] / "manifest.json").is_file() and (data / "mlflow.db").is_file()
    assert f"artifact   {artifacts[0]}" in done.stdout


def test_two_prepare_processes_at_once_both_succeed_and_fetch_the_weights_once(prefect_harness, hub, hf_cache, mlflow_uri, tmp_path):
    lora_prep = Path(sys.executable).with_name("lora-prep")
    env = _cli_env(prefect_harness, hf_cache)
    # Slow the weight transfer so that the two runs overlap on it (huggingface_hub's file lock decides who fetches).
    hub.delay(1.0, "*/tiny/phi3/resolve/*/model.safetensors", methods=("GET",))
    procs = [
        subprocess.Popen(
            [lora_prep, "prepare", "tiny/phi3", "--tracking-uri", mlflow_uri, "--output-dir", str(tmp_path / f"out{i}"), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    assert [p.returncode for p in procs] == [0, 0], [line for _, err in outputs for line in err.splitlines() if "error" in line.lower()]
    results = [json.loads(out) for out, _ in outputs]
    assert results[0]["commit_sha"] == results[1]["commit_sha"] == hub.repos["tiny/phi3"].sha
    weights = hub.store / "tiny" / "phi3" / "commits" / hub.repos["tiny/phi3"].sha / "model.safetensors"
    whole_file_reads = [r for r in hub.records("*/tiny/phi3/resolve/*/model.safetensors", "GET") if not r.range]
    assert sum(r.body_bytes for r in whole_file_reads) == weights.stat().st_size


def _run_in_a_terminal(argv: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    """Run a command with a pseudo-terminal as its stdin, stdout and stderr (an interactive session); its output and exit code."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a new pty is 0x0: progress bars would draw nothing
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed its end
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def test_a_successful_prepare_in_a_terminal_prints_progress_bars_and_its_summary_and_nothing_else(prefect_harness, hub, hf_cache, tmp_path):
    from lora_prep.tasks.artifact.summary import LABEL_WIDTH

    # A first run: new Prefect home (where the telemetry notice would show once), new MLflow store (its migration
    # would announce itself), an MoE model (its dropout decision), an MLflow run opened in a worker thread.
    env = {**_cli_env(prefect_harness, hf_cache), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    argv = [
        str(Path(sys.executable).with_name("lora-prep")),
        "prepare",
        "tiny/qwen3-moe",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/new/mlflow.db",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    code, output = _run_in_a_terminal(argv, env)
    assert code == 0, output[-3000:]
    labels = ("artifact", "model", "load", "memory", "lora", "experts", "left out", "trainable", "download", "mlflow", "open", "seconds")
    import re

    output = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)  # a bar redraws itself with cursor moves
    lines = [line for part in output.split("\n") for line in part.split("\r") if line.strip()]
    # tqdm bars: "Loading weights: 100%|...| 25/25 [00:00<00:00, 5872.07it/s]", "Download complete: ████|  193kB"
    bar = re.compile(r"\d+%\||it/s\]|s/it\]|\|\s+[\d.]+\s?[kMGT]?B\b")
    progress = [line for line in lines if bar.search(line)]
    summary = [line for line in lines if line[:LABEL_WIDTH].rstrip() in labels or line.startswith("  ")]  # "  ": a row's detail
    other = [line for line in lines if line not in progress and line not in summary]
    assert other == [], f"printed besides the progress bars and the summary: {other}"
    assert any(line.startswith("artifact ") for line in summary) and any("Loading weights" in line for line in progress)
