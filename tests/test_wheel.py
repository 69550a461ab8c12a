"""The wheel, as a user gets it: built from this tree, installed with its declared dependencies
into a fresh virtual environment (nothing of the suite's .venv, no checkout on sys.path), then
used from a directory that has packages of its own called flows/, tasks/ and deployments/.

What it proves: the public API imports; `lora-prep --help` and `lora-prep prepare` work from the
installed console script (against the test hub, the session's Prefect API and a SQLite MLflow
store); `prefect deploy` of the *installed* prefect.yaml records a module entrypoint and no
working directory; the wheel adds one top-level name to site-packages, `lora_prep`, so a user's
own `flows` or `tasks` package is never shadowed.

The install: `python -m venv --without-pip`, then one `uv pip install --python <venv>
torch==<the suite's torch> <wheel>`. uv resolves the wheel's declared dependencies afresh from the
index (PyPI here) and installs them from its cache (~/.cache/uv, or UV_CACHE_DIR) by hard links:
2-3 s warm, 25-40 s cold on a 2-core machine. uv is taken from PATH or the suite's venv, else
installed once with pip into pytest's cache directory (.pytest_cache/d/uv-tool, ~7 s). Without uv,
or with LORA_PREP_WHEEL_INSTALLER=pip, it is `pip --python <venv> install`: ~115 s on these
machines, whose registry proxy answers without cache headers, so pip's HTTP cache never keeps a
wheel and each install downloads all ~1.5 GB again. torch is pinned to the suite's own version (the
Makefile's torch==2.13.0): an unpinned torch resolves to a newer, multi-GB CUDA build. The user's
pip configuration (find-links, index URLs: the CPU torch file) is handed to uv, so both installers
see the same sources; both resolve the same 176 distributions here.

`lora-prep prepare` is the long step (~20 s); the other checks run while it does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
# What `pip wheel .` reads: pyproject.toml's packages (lora_prep + the three folders) and the readme.
SOURCES = ("pyproject.toml", "README.md", "lora_prep", "flows", "tasks", "deployments")
POOL = "lora-prep-process"  # deployments/prefect.yaml
DEPLOYMENT = "prepare-model/prepare-on-demand"
USER_MARK = "the user's own"


# --- processes: each one bounded, each one (and its children) ended ---------------------------


@contextlib.contextmanager
def _started(argv: list, *, cwd: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """A process in its own group, output to pipes; on the way out its whole group is killed."""
    proc = subprocess.Popen(
        [str(a) for a in argv], cwd=str(cwd), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        yield proc
    finally:
        try:  # the process itself if still running (a failed check, a deadline), and whatever it left in its group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.communicate(timeout=30)


def _finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait at most `timeout` s for a _started process, then fail (the context manager kills it)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{[str(a) for a in proc.args[:3]]} still running after {timeout:.0f} s; killed")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(argv: list, *, cwd: Path, env: dict | None = None, timeout: float) -> subprocess.CompletedProcess:
    """Run to completion within `timeout` s; its process group is ended either way."""
    with _started(argv, cwd=cwd, env=env) as proc:
        return _finish(proc, timeout)


def _check(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args[:4]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-4000:]}"
    return done


# --- building and installing ------------------------------------------------------------------


def _build_wheel(tmp: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the tree: setuptools writes build/ and *.egg-info next to
    the sources, and a stale build/lib would put deleted modules into the wheel."""
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        path = ROOT / name
        (shutil.copytree(path, src / name, ignore=ignore) if path.is_dir() else shutil.copy2(path, src / name))
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(tmp / "dist")]
    # The suite's own setuptools when it satisfies [build-system] (>=68) and builds wheels by itself
    # (>=70.1, no `wheel` package needed): no download. Else an isolated build, as pip does by default.
    if _version_at_least("setuptools", 71):
        argv.insert(argv.index("-q"), "--no-build-isolation")
    _check(_run(argv, cwd=tmp, timeout=180))
    (wheel,) = (tmp / "dist").glob("lora_prep-*.whl")
    return wheel


def _version_at_least(dist: str, major: int) -> bool:
    try:
        return int(metadata.version(dist).split(".")[0]) >= major
    except (metadata.PackageNotFoundError, ValueError):
        return False


def _uv(request: pytest.FixtureRequest, tmp: Path) -> str | None:
    """uv from PATH or the suite's venv, else installed once with pip under pytest's cache dir."""
    found = shutil.which("uv", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found:
        return found
    cache = getattr(request.config, "cache", None)
    home = cache.mkdir("uv-tool") if cache is not None else tmp / "uv-tool"
    uv = home / "bin" / "uv"
    if not uv.exists():
        done = _run([sys.executable, "-m", "pip", "install", "-q", "--target", home, "--upgrade", "uv"], cwd=tmp, timeout=180)
        if done.returncode != 0:
            return None
    return str(uv) if uv.exists() else None


def _pip_sources() -> list[str]:
    """The user's pip sources (config files and PIP_* variables) as uv options, so uv sees what pip sees."""
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    values: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        match = re.fullmatch(r"[^.]*\.(find-links|index-url|extra-index-url)='(.*)'", line.strip())
        if match:
            values.setdefault(match[1], []).extend(match[2].split())
    args: list[str] = []
    for link in dict.fromkeys(values.get("find-links", [])):
        args += ["--find-links", link]
    if values.get("index-url"):
        args += ["--index-url", values["index-url"][-1]]
    for url in dict.fromkeys(values.get("extra-index-url", [])):
        args += ["--extra-index-url", url]
    if values.get("extra-index-url"):
        args += ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version from any index
    return args


def _install(request: pytest.FixtureRequest, tmp: Path, wheel: Path) -> tuple[Path, str]:
    """A fresh venv (no pip, no system site-packages) with the wheel and its dependencies."""
    venv = tmp / "venv"
    _check(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, timeout=60))
    python = venv / "bin" / "python"
    torch = f"torch=={metadata.version('torch').split('+')[0]}"  # the suite's torch; + local builds match it
    uv = None if os.environ.get("LORA_PREP_WHEEL_INSTALLER") == "pip" else _uv(request, tmp)  # "pip": as pip users do
    if uv:
        env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
        argv = [uv, "pip", "install", "--python", python, *_pip_sources(), torch, wheel]
        how = "uv pip install"
    else:
        env = None
        argv = [sys.executable, "-m", "pip", "--python", python, "install", "-q", torch, wheel]
        how = "pip --python install"
    _check(_run(argv, cwd=tmp, env=env, timeout=480))
    return python, how


# --- the user's side --------------------------------------------------------------------------


def _user_project(tmp: Path) -> Path:
    """A directory with its own flows/, tasks/ and deployments/ packages, as a user's project has."""
    user = tmp / "user-project"
    for package, module in (("flows", "prepare_model"), ("tasks", "settings"), ("deployments", "serve")):
        (user / package).mkdir(parents=True)
        (user / package / "__init__.py").write_text(f"OWNER = {USER_MARK!r}\n")
        (user / package / f"{module}.py").write_text(f"def {module}():\n    return {USER_MARK!r}\n")
    return user


def _user_env(python: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This session's environment (the hub's HF_* variables, PREFECT_HOME) with the fresh venv first on PATH."""
    # No PYTHONPATH & co.; and bytecode is written, as on a user's machine, so later processes reuse it.
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE"}}
    env["VIRTUAL_ENV"] = str(python.parent.parent)
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


_API_CHECK = textwrap.dedent("""
    import json, sys
    from lora_prep import prepare_model, load_adapter_ready, LoraSettings, Manifest, LoraPrepError, PreparedModel
    import lora_prep
    # The library took none of the user's names, then the user's packages import as theirs.
    taken = sorted(m for m in sys.modules if m.split(".")[0] in ("flows", "tasks", "deployments"))
    import flows, tasks, deployments
    from flows.prepare_model import prepare_model as user_prepare
    from tasks.settings import settings
    from deployments.serve import serve
    import lora_prep.flows.prepare_model, lora_prep.tasks.settings, lora_prep.deployments
    print(json.dumps({
        "taken_before_user_import": taken,
        "user": [flows.__file__, tasks.__file__, deployments.__file__],
        "user_calls": [user_prepare(), settings(), serve(), flows.OWNER],
        "library": [lora_prep.__file__, lora_prep.flows.__file__, lora_prep.tasks.__file__, lora_prep.deployments.__file__],
        "flow_name": prepare_model.name,
        "lora_r": LoraSettings(r=4).r,
        "error_is_exception": issubclass(LoraPrepError, Exception),
        "types": [Manifest.__name__, PreparedModel.__name__, callable(load_adapter_ready)],
        "sys_path": sys.path,
    }))
""")

_SITE_CHECK = textwrap.dedent("""
    import importlib.metadata as md, json, os, sysconfig
    site = sysconfig.get_paths()["purelib"]
    owners = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        for top in {f.parts[0] for f in dist.files or []}:
            owners.setdefault(top, set()).add(name)
    mine = md.distribution("lora-prep")
    print(json.dumps({
        "site": site,
        "record_top": sorted({f.parts[0] for f in mine.files if f.parts[0] != ".."}),
        "record_outside": sorted(str(f) for f in mine.files if f.parts[0] == ".."),
        "top_level_txt": (mine.read_text("top_level.txt") or "").split(),
        "unowned": sorted(set(os.listdir(site)) - set(owners) - {"__pycache__"}),  # bytecode of top-level modules
        "only_lora_prep_owns": sorted(n for n, o in owners.items() if o == {"lora-prep"}),
        "user_names_in_site": sorted(n for n in os.listdir(site) if n.split(".")[0] in ("flows", "tasks", "deployments")),
        "prefect_yaml": str(__import__("pathlib").Path(__import__("lora_prep.deployments").deployments.__file__).with_name("prefect.yaml")),
    }))
""")


@contextlib.contextmanager
def _process_pool(api_url: str) -> Iterator[None]:
    """`prefect work-pool create lora-prep-process --type process`, through the API; on the way out
    the pool (and so the deployments on it) is deleted again if this test created it: the API is
    the session's, shared with other tests."""
    import httpx
    from prefect.workers.process import ProcessWorker

    body = {"name": POOL, "type": "process", "base_job_template": ProcessWorker.get_default_base_job_template()}
    response = httpx.post(f"{api_url}/work_pools/", json=body, timeout=30)
    assert response.status_code in (201, 409), response.text
    try:
        yield
    finally:
        if response.status_code == 201:
            deployment = httpx.get(f"{api_url}/deployments/name/{DEPLOYMENT}", timeout=30)
            if deployment.status_code == 200:
                httpx.delete(f"{api_url}/deployments/{deployment.json()['id']}", timeout=30)
            httpx.delete(f"{api_url}/work_pools/{POOL}", timeout=30)


def test_the_wheel_installs_with_its_dependencies_and_works_beside_a_users_own_flows_and_tasks(
    request, hub, prefect_harness, mlflow_uri, tmp_path
):
    import httpx

    seconds: dict[str, float] = {}
    mark = started = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        seconds[name] = round(now - mark, 1)
        mark = now

    wheel = _build_wheel(tmp_path)
    lap("build wheel")
    python, how = _install(request, tmp_path, wheel)
    lap(f"fresh venv + {how}")
    user = _user_project(tmp_path)
    site_packages = python.parent.parent / "lib"

    # A real preparation through the installed CLI: the test hub, the session's Prefect API, a SQLite
    # MLflow store. The longest step, so the other checks run meanwhile (each is short; the CPU is mostly its).
    out = tmp_path / "out"
    lora_prep = python.with_name("lora-prep")
    prepare = [lora_prep, "prepare", "tiny/gpt2", "--r", "4", "--tracking-uri", mlflow_uri, "--output-dir", out, "--json"]
    env = _user_env(python, {"PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(tmp_path / "hf-cache")})
    with _started(prepare, cwd=user, env=env) as preparing:
        # site-packages: the wheel added `lora_prep` and its dist-info, and nothing named like a user's package.
        site = json.loads(_check(_run([python, "-c", _SITE_CHECK], cwd=user, env=_user_env(python), timeout=60)).stdout)
        version = metadata.version("lora-prep")
        assert site["record_top"] == ["lora_prep", f"lora_prep-{version}.dist-info"], site["record_top"]
        assert site["only_lora_prep_owns"] == site["record_top"] and site["unowned"] == [], site
        assert site["top_level_txt"] == ["lora_prep"] and site["user_names_in_site"] == [], site
        assert site["record_outside"] == ["../../../bin/lora-prep"], site["record_outside"]  # the console script
        installed_yaml = Path(site["prefect_yaml"])
        assert installed_yaml.is_file() and installed_yaml.is_relative_to(site_packages), installed_yaml
        lap("site-packages")

        # The public API from the user's directory (its packages come first on sys.path there).
        api = json.loads(_check(_run([python, "-c", _API_CHECK], cwd=user, env=_user_env(python), timeout=180)).stdout)
        assert api["taken_before_user_import"] == [], f"importing lora_prep imported a top-level {api['taken_before_user_import']}"
        assert all(Path(f).is_relative_to(user) for f in api["user"]), api["user"]
        assert api["user_calls"] == [USER_MARK] * 4
        assert all(Path(f).is_relative_to(site_packages) for f in api["library"]), api["library"]
        assert not any(p.startswith(str(ROOT)) for p in api["sys_path"]), api["sys_path"]  # no checkout on the path
        assert api["flow_name"] == "prepare-model" and api["lora_r"] == 4 and api["error_is_exception"]
        assert api["types"] == ["Manifest", "PreparedModel", True]
        lap("public API")

        done = _check(_run([lora_prep, "--help"], cwd=user, env=_user_env(python), timeout=60))
        assert "usage: lora-prep" in done.stdout and "prepare" in done.stdout
        lap("lora-prep --help")

        # `prefect deploy` of the installed prefect.yaml, from the user's directory, with the fresh venv's prefect.
        with _process_pool(prefect_harness):
            done = _check(_run(
                [python.with_name("prefect"), "--no-prompt", "deploy", "--name", "prepare-on-demand", "--prefect-file", installed_yaml],
                cwd=user, env=_user_env(python, {"PREFECT_API_URL": prefect_harness}), timeout=180,
            ))
            response = httpx.get(f"{prefect_harness}/deployments/name/{DEPLOYMENT}", timeout=30)
        assert response.status_code == 200, f"{response.text}\n{done.stdout[-2000:]}"
        deployment = response.json()
        entrypoint = deployment["entrypoint"]
        assert entrypoint == "lora_prep.flows.prepare_model:prepare_model", entrypoint
        assert entrypoint.startswith("lora_prep.flows.") and ".py" not in entrypoint and "/" not in entrypoint
        for step in deployment["pull_steps"] or []:
            assert "prefect.deployments.steps.set_working_directory" not in step, f"pull step needs a checkout: {step}"
            assert str(user) not in json.dumps(step) and str(ROOT) not in json.dumps(step), step
        assert deployment["path"] in (None, ""), f"a working directory was recorded: {deployment['path']}"
        assert deployment["work_pool_name"] == POOL and deployment["enforce_parameter_schema"] is True
        assert "model_id" in deployment["parameter_openapi_schema"]["required"]
        lap("prefect deploy")

        done = _check(_finish(preparing, timeout=300))
    result = json.loads(done.stdout)
    assert result["commit_sha"] == hub.repos["tiny/gpt2"].sha
    assert Path(result["artifact_dir"]).is_relative_to(out) and (Path(result["artifact_dir"]) / "manifest.json").is_file()
    assert result["mlflow_run_id"] and result["trainable_params"] > 0 and result["target_modules"]
    lap("lora-prep prepare (the rest of it)")

    total = round(time.monotonic() - started, 1)
    print(f"\nwheel test timings (s): {seconds}, total {total}")
