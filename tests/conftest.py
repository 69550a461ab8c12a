"""Shared fixtures. Each engineer's fixtures live in their own section below.

Keep the "Hub test bed" section first: it sets HF_ENDPOINT & co. when this file is
imported, and huggingface_hub reads them once, at its own import.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubserver import HubServer

# --- Hub test bed ---
#
# One Hub-compatible server (tests/hubserver.py) for the whole session, started when this
# file is imported: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_CACHE into its
# constants at import time, so they must be set before anything imports it (a test module,
# a plugin, or a later section of this file). Subprocesses (CLI tests) inherit the same
# environment and so talk to the same server. pytest_unconfigure stops it and restores the
# environment.

_HUB_ENV_UNSET = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _start_session_hub() -> dict:
    if "huggingface_hub" in sys.modules:
        raise pytest.UsageError(
            "huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT; "
            "move that import below the 'Hub test bed' section or into a fixture."
        )
    home = Path(tempfile.mkdtemp(prefix="lora-prep-hub-"))
    server = HubServer(home / "store").start()
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home / "hf-home"),
        "HF_HUB_CACHE": str(home / "hf-home" / "hub"),
        "HF_HUB_DISABLE_XET": "1",  # plain HTTP downloads: the test hub has no Xet storage
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",  # 2 cores; also silences the fork warning
    }
    saved = {k: os.environ.get(k) for k in (*env, *_HUB_ENV_UNSET)}
    for key in _HUB_ENV_UNSET:
        os.environ.pop(key, None)
    os.environ.update(env)
    return {"server": server, "home": home, "saved": saved}


_hub_session = _start_session_hub()


def pytest_unconfigure(config: pytest.Config) -> None:
    _stop_local_prefect_server()
    if os.environ.get(_LOCKS_ENV) and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ.pop(_LOCKS_ENV), ignore_errors=True)
    if not _hub_session:
        return
    _hub_session["server"].stop()
    for key, value in _hub_session["saved"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(_hub_session["home"], ignore_errors=True)
    _hub_session.clear()


@pytest.fixture(scope="session")
def hub() -> Iterator[HubServer]:
    """The session's running HubServer (HF_ENDPOINT points at it) with the standard test repos.

    ``hub.repos`` is what ``tests.model_factory.build_test_repos(store)`` returned (``{}`` when
    that module does not exist). Tests may publish more repos with ``hub.publish(...)``; use an
    org of your own (e.g. "testbed/...") so names do not collide.
    """
    server: HubServer = _hub_session["server"]
    if not server.repos:
        try:
            from tests import model_factory
        except ModuleNotFoundError as exc:
            if exc.name != "tests.model_factory":
                raise
            model_factory = None
        build = getattr(model_factory, "build_test_repos", None)
        if build is not None:
            server.repos = build(server.store)
    yield server
    # A server bug answers 500 and is kept here rather than printed per request.
    assert not server.errors, f"the test hub server hit internal errors: {server.errors}"


@pytest.fixture
def hub_token(hub: HubServer) -> str:
    """The token the hub accepts for gated repos (pass as ``token=``; HF_TOKEN is unset in tests)."""
    return hub.token


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: HubServer) -> Iterator[Path]:
    """A fresh, empty Hugging Face cache for one test; the hub's faults and counters start clean.

    huggingface_hub reads HF_HUB_CACHE into ``huggingface_hub.constants.HF_HUB_CACHE`` once at
    import, so setting the variable later changes nothing in this process. This fixture sets
    both the variable (for subprocesses) and the constant (huggingface_hub and transformers read
    it at call time when ``cache_dir`` is None). Code under test should still take the cache
    directory as a parameter (SourceSettings.cache_dir) and tests pass ``cache_dir=`` explicitly.
    """
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    hub.reset_faults()
    hub.reset_counters()
    yield cache
    hub.reset_faults()  # a test that left the hub refusing or failing must not break the next one


# --- Pipeline: Prefect, MLflow, lora-prep home ---
#
# One Prefect test harness for the session (it costs ~13 s to start: migrations of a
# temporary SQLite database); results and artifacts go under a temporary PREFECT_HOME
# set before prefect is imported. MLflow stores are per test: a SQLite file in tmp_path.

_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="lora-prep-prefect-"))
# Removed when this process exits (each xdist worker has its own): registered before prefect is
# imported, so it runs after Prefect's own exit handlers, which may still write under PREFECT_HOME.
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = str(_PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# No MLflow client knobs here (MLFLOW_HTTP_REQUEST_*): the suite runs with the user's defaults,
# and lora-prep's own bound on its calls (tasks/tracking/store.py) is what keeps a dead server fast.
for _key in [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST_")]:
    os.environ.pop(_key)
# No per-user defaults leak from the developer's machine into tests.
os.environ["LORA_PREP_HOME"] = str(_PREFECT_HOME / "lora-prep-home")
os.environ.pop("MLFLOW_TRACKING_URI", None)


def _stop_local_prefect_server() -> None:
    """A `lora-prep prepare` run without PREFECT_API_URL starts lora-prep's shared local server under the
    session's PREFECT_HOME (tests that mean to, stop theirs): whatever one left is stopped with the session."""
    from lora_prep import local_server

    if os.environ.get("PREFECT_HOME") == str(_PREFECT_HOME) and local_server.stop():
        print("\nconftest: stopped a local Prefect server a test left running", file=sys.stderr)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """A real Prefect API (the test harness: a temporary database and a server subprocess); yields its API URL."""
    from prefect.logging.configuration import setup_logging
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        # Configure Prefect's console handler now, on the session's stderr: configured
        # later inside a capsys test it would keep writing to that test's closed stream.
        setup_logging()
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def prefect_home() -> Path:
    return _PREFECT_HOME


@pytest.fixture
def lora_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A per-test lora-prep data directory (artifacts and the default MLflow store go there)."""
    home = tmp_path / "lora-prep-home"
    monkeypatch.setenv("LORA_PREP_HOME", str(home))
    return home


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """A real MLflow tracking store: a SQLite file in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"


# --- Parallel runs: `make test` runs pytest-xdist workers ---
#
# Two workers (`-n 2 --dist loadfile`: a module's tests and its module fixtures stay on one worker).
# Most of the suite's wall time is waiting (servers starting, zombie detection, watchdogs), so two
# workers overlap it. Two things are arranged here:
# - Order: the longest modules first (they would otherwise finish alone at the end), the modules
#   with `alone` tests last. `--no-loadscope-reorder` keeps this order (xdist's default sorts
#   modules by their number of tests, which puts the one-test fleet module last).
# - `@pytest.mark.heavy`: a test that runs many processes at once (the fleet, eight runs at once).
#   Two of them at once oversubscribe the two cores several times over; one beside ordinary tests is
#   fine. So at most one heavy test runs at a time, and the order spaces them out.
# - `@pytest.mark.alone`: a test that asserts a user-facing time bound ("one line within a minute")
#   runs with nothing on the other worker: a time bound measured while another worker saturates the
#   two cores measures that worker. Every other test holds a shared lock for its whole protocol
#   (setup, call, teardown, module fixtures included); an `alone` test holds it exclusively. A gate
#   lock taken first makes the exclusive side win: once an `alone` test waits, no new test starts.
# Run serially (plain `pytest`), none of this applies.

_HEAVY_FIRST = (  # measured seconds in one serial run; longest first, but the two heavy modules apart
    "tests/test_fleet.py",  # ~370, heavy
    "tests/reliability/test_crashes.py",  # ~170
    "tests/test_cli.py",  # ~200
    "tests/test_e2e.py",  # ~170
    "tests/test_wheel.py",  # ~85
    "tests/reliability/test_concurrency.py",  # ~230, heavy: reached about when the fleet ends
    "tests/reliability/test_import_race.py",  # ~60
    "tests/test_qlora.py",
    "tests/test_portable.py",
)
_LOCKS_ENV = "LORA_PREP_TEST_LOCKS"


def pytest_configure(config: pytest.Config) -> None:
    # The controller makes the lock directory; its workers start after this hook and inherit the variable.
    if not os.environ.get("PYTEST_XDIST_WORKER") and getattr(config.option, "numprocesses", None):
        os.environ[_LOCKS_ENV] = tempfile.mkdtemp(prefix="lora-prep-test-locks-")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        if path in _HEAVY_FIRST:
            return _HEAVY_FIRST.index(path)
        if any(other.get_closest_marker("alone") for other in by_module[path]):
            return len(_HEAVY_FIRST) + 2
        return len(_HEAVY_FIRST) + 1

    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    items.sort(key=rank)  # stable: the order within a module and among the rest stays


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    locks = os.environ.get(_LOCKS_ENV)
    if not locks or not os.environ.get("PYTEST_XDIST_WORKER"):
        return (yield)
    from tests.xdist_locks import exclusive_or_shared

    alone, heavy = (item.get_closest_marker(name) is not None for name in ("alone", "heavy"))
    with exclusive_or_shared(Path(locks), exclusive=alone, heavy=heavy):
        return (yield)
