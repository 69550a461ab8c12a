"""Every bad input is refused before the weights download: exit 2, one line naming the problem and the fix,
no artifact, no MLflow run left RUNNING, and no weight bytes moved (only ~100 KB header reads)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from lora_prep.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")
HEADER_READ = 100_001  # bytes huggingface_hub reads for one safetensors header


def _run(capsys, *argv: str) -> tuple[int, str, float]:
    started = time.monotonic()
    code = main(list(argv))
    _, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("lora-prep: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    seconds = time.monotonic() - started
    print(f"time to outcome: exit {code} after {seconds:.1f} s: {lines[0]}")
    return code, lines[0], seconds


@pytest.fixture
def common(hf_cache, mlflow_uri, tmp_path) -> list[str]:
    return ["--cache-dir", str(hf_cache), "--tracking-uri", mlflow_uri]


def _weight_bytes(hub, repo: str) -> int:
    return hub.body_bytes(f"*/{repo}/resolve/*/model*.safetensors")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--target-modules", "q_projj,v_proj"], ["q_projj", "closest", "q_proj"]),
        (["--target-modules", "experts"], ["experts", "no experts"]),
        (["--exclude-modules", "nothing_like_this"], ["exclude_modules", "nothing_like_this"]),
        (["--rank-pattern", '{"zzz": 4}'], ["rank_pattern", "zzz"]),
    ],
    ids=["unknown-target", "experts-on-a-dense-model", "unknown-exclusion", "unknown-rank-pattern"],
)
def test_lora_settings_that_match_nothing_are_refused_at_plan_time(capsys, hub, hf_cache, common, tmp_path, argv, expected):
    code, line, seconds = _run(capsys, "prepare", "tiny/llama", *common, "--output-dir", str(tmp_path / "out"), *argv)
    assert code == 2
    for fragment in expected:
        assert fragment in line, line
    assert _weight_bytes(hub, "tiny/llama") <= HEADER_READ
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_output_dir_that_is_a_file_is_refused_before_the_download(capsys, hub, hf_cache, common, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    code, line, _ = _run(capsys, "prepare", "tiny/gpt2", *common, "--output-dir", str(taken))
    assert code == 2 and "is a file, not a directory" in line and "--output-dir" in line
    assert _weight_bytes(hub, "tiny/gpt2") <= HEADER_READ


def test_an_output_dir_on_a_read_only_filesystem_is_refused_before_the_download(capsys, hub, hf_cache, common):
    # /proc is read-only for everyone, root included (the suite runs as root, so chmod would not do).
    code, line, _ = _run(capsys, "prepare", "tiny/gpt2", *common, "--output-dir", "/proc/lora-prep-artifacts")
    assert code == 2 and "cannot be created or written" in line and "/proc/lora-prep-artifacts" in line
    assert _weight_bytes(hub, "tiny/gpt2") <= HEADER_READ


def test_every_problem_is_reported_at_once(capsys, hub, hf_cache, common, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("x")
    code, line, _ = _run(capsys, "prepare", "tiny/llama", *common, "--output-dir", str(taken), "--target-modules", "q_projj",
                         "--attn", "flash_attention_2")
    assert code == 2
    assert "q_projj" in line and "is a file" in line and "flash_attention_2" in line


def test_a_safetensors_header_with_a_negative_dimension_is_one_line_naming_the_file(capsys, hub, bad_repos, common, tmp_path):
    code, line, _ = _run(capsys, "prepare", bad_repos["negative"], *common, "--output-dir", str(tmp_path / "out"))
    assert code == 2
    assert "model.safetensors" in line and "corrupt" in line and "ModelFacts" not in line and "invalid parameters" not in line


@pytest.mark.alone  # a time bound
def test_a_config_json_nested_200000_deep_is_one_line_naming_the_file(capsys, hub, bad_repos, common, tmp_path):
    code, line, seconds = _run(capsys, "prepare", bad_repos["deep"], *common, "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "config.json" in line and "nested too deeply" in line and "RecursionError" not in line
    assert seconds < 60


def test_a_revision_that_is_a_path_is_refused_before_any_request(capsys, hub, hf_cache, common, tmp_path):
    hub.reset_counters()
    code, line, _ = _run(capsys, "prepare", "tiny/llama", "--revision", "../../../x", *common, "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "not a valid branch, tag or commit sha" in line
    assert hub.requests("*tiny/llama*") == 0
    assert not list(Path(hf_cache).rglob("x"))


def test_a_local_directory_that_is_not_a_model_is_refused(capsys, common, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    code, line, _ = _run(capsys, "prepare", str(empty), *common, "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "config.json" in line


def test_the_dry_run_refuses_the_same_inputs_and_writes_nothing(capsys, hub, hf_cache, tmp_path):
    before = set(os.listdir(tmp_path))
    code, line, _ = _run(capsys, "plan", "tiny/llama", "--cache-dir", str(hf_cache), "--output-dir", str(tmp_path / "new" / "dir"),
                         "--target-modules", "nope")
    assert code == 2 and "nope" in line
    assert set(os.listdir(tmp_path)) == before  # the dry run creates no output directory


@pytest.mark.parametrize("uri", ["file:///{tmp}/mlruns", "ftp://x", "{tmp}/mlruns"], ids=["file-store", "ftp", "bare-path"])
def test_a_tracking_uri_mlflow_cannot_use_is_refused_where_it_is_declared(capsys, hub, hf_cache, tmp_path, uri):
    uri = uri.format(tmp=tmp_path)
    code, line, _ = _run(capsys, "prepare", "tiny/gpt2", "--cache-dir", str(hf_cache), "--tracking-uri", uri, "--output-dir", str(tmp_path / "out"))
    assert code == 2 and uri in line and "sqlite:///" in line
    assert hub.body_bytes("*/tiny/gpt2/*") == 0  # refused with the settings: not even a header read


def test_a_tracking_uri_from_the_environment_is_refused_at_plan_time(capsys, hub, hf_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    code, line, _ = _run(capsys, "prepare", "tiny/gpt2", "--cache-dir", str(hf_cache), "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "file store" in line
    assert _weight_bytes(hub, "tiny/gpt2") <= HEADER_READ
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_tracking_uri_through_the_prefect_api_fails_the_flow_run_before_any_stage(hub, hf_cache, tmp_path):
    from lora_prep.flows.prepare_model import prepare_model

    state = prepare_model("tiny/gpt2", source={"cache_dir": str(hf_cache)}, tracking={"tracking_uri": "ftp://x"},
                          output={"output_dir": str(tmp_path / "out")}, return_state=True)
    assert state.is_failed() and "ftp" in state.message
    assert hub.requests("*/tiny/gpt2/*") == 0 and not (tmp_path / "out").exists()
