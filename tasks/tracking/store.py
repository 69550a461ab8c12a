"""The MLflow store lora-prep talks to: which one, a client for it, and a bound on every call.

- ``resolve_tracking_uri``: the setting, else MLFLOW_TRACKING_URI, else the per-user SQLite file.
- ``client(uri)``: an ``MlflowClient`` for that store. A SQLite store is created and migrated
  under an inter-process file lock taken *before* any client object exists (building a client
  is what migrates); later writers wait on SQLite's busy timeout instead of failing.
- ``bounded(uri)``: lora-prep's own retry budget for its calls. MLflow's HTTP client retries 7
  times with backoff up to 2 minutes by default (one call to a dead server: ~4 min); inside
  ``bounded`` our calls make at most 3 attempts 1 s apart with a 10 s timeout, an http(s) store
  is asked for ``/health`` first (5 s), and urllib3's retry warnings stay off the console.
  Settings the user exported (MLFLOW_HTTP_REQUEST_*) win. Process-wide while active (MLflow reads
  them per call from the environment), so nested and concurrent users share one override.
- ``mlflow_errors(uri, ...)``: transport failures become ``TrackingUnavailable`` (one line, the
  URI and what to do); everything else MLflow raises passes through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_prep.tasks.common.causes import causes
from lora_prep.tasks.common.paths import (
    default_mlflow_artifact_root,
    default_tracking_uri,
)
from lora_prep.tasks.errors import InvalidInput, TrackingUnavailable
from lora_prep.tasks.settings import TrackingSettings, tracking_uri_problem

# Our budget per MLflow HTTP call (the user's exported values win): 3 attempts, 1-2 s apart, 30 s each
# (artifact uploads share the timeout, so not less). A refused connection fails in ~2.5 s (measured);
# a hung server is caught by the 5 s /health probe first. MLflow reads these per call (rest_utils.py).
BOUNDED_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # an int: MLflow refuses "0.5"
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # set_terminated on a server prints "View run ..." to stdout, which would break `--json` output.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
HEALTH_TIMEOUT_S = 5
# SQLite: seconds a writer waits for another process's lock before "database is locked".
SQLITE_BUSY_TIMEOUT_S = 120
_INIT_LOCK_TIMEOUT_S = 300  # a first migration takes seconds; a stuck one is a bug worth an error


def resolve_tracking_uri(settings: TrackingSettings | None = None) -> str:
    """The flow parameter, else MLFLOW_TRACKING_URI, else the per-user SQLite file."""
    return (settings.tracking_uri if settings else None) or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking_uri(uri: str) -> None:
    """Refuse, before any weight moves, a tracking URI MLflow cannot use: its scheme (the rule beside the
    setting), and for a database the driver SQLAlchemy would load for it (e.g. psycopg2 for postgresql://)."""
    problem = tracking_uri_problem(uri)
    if problem is None and not uri.startswith(("sqlite:", "http:", "https:", "databricks", "uc:")):
        try:
            from sqlalchemy.engine import make_url

            make_url(uri).get_dialect().import_dbapi()
        except ImportError as exc:
            problem = f"tracking URI {uri!r} needs the database driver {exc.name or 'for its scheme'}, which is not installed: install it (e.g. pip install psycopg2-binary for postgresql://)"
        except Exception as exc:  # a malformed URL: SQLAlchemy's own words
            problem = f"tracking URI {uri!r} is not a database URL SQLAlchemy can read ({type(exc).__name__}: {exc})"
    if problem:
        raise InvalidInput(problem + ".", tracking_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, absolute, as SQLAlchemy (and so MLflow) opens it: what follows
    ``sqlite:///`` is the path, absolute when it starts with ``/`` (``sqlite:////srv/m.db``), else relative to the
    working directory (``sqlite:///m.db``); percent-escapes decoded, a ``?query`` not part of it. None for other
    URIs and for an in-memory database. (urlparse reads the path of ``sqlite:////srv/db/m.db`` as ``//srv/db/m.db``,
    whose file: URI names a host ``srv``: MLflow put the artifacts under ``/db/mlartifacts``, outside the store's
    directory; and it reads ``sqlite:///m.db`` as ``/m.db``, at the root.)"""
    if not uri.startswith("sqlite:///"):
        return None
    database = urllib.parse.unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if database in ("", ":memory:"):
        return None
    if database.startswith("/"):
        return Path("/" + database.lstrip("/"))
    return Path.cwd() / database


def sqlite_artifact_root(uri: str) -> str | None:
    """For a sqlite:/// store, artifacts live next to the database (MLflow would use ./mlruns of the cwd)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    if uri == default_tracking_uri():
        return default_mlflow_artifact_root().as_uri()
    return (db.parent / "mlartifacts").as_uri()


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


# --- the bound ---------------------------------------------------------------------------------

_bound_lock = threading.Lock()
_bound_users = 0
_bound_saved: dict[str, str | None] = {}


class _NoRetryWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Retrying (")


_quiet = _NoRetryWarnings()


def _check_health(uri: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:
            response.read(64)
    except OSError as exc:  # URLError, refused, timeout, reset: all OSErrors
        raise TrackingUnavailable(
            f"MLflow at {uri} is unreachable ({type(getattr(exc, 'reason', exc)).__name__}): start the tracking server, "
            "or point --tracking-uri / MLFLOW_TRACKING_URI at one that runs.",
            tracking_uri=uri,
        ) from exc


@contextlib.contextmanager
def bounded(uri: str) -> Iterator[None]:
    """Our MLflow calls inside this block fail within seconds when the store is unreachable."""
    global _bound_users
    pool_logger = logging.getLogger("urllib3.connectionpool")
    with _bound_lock:
        if _bound_users == 0:
            for key, value in BOUNDED_ENV.items():
                if key not in os.environ:
                    _bound_saved[key] = None
                    os.environ[key] = value
            pool_logger.addFilter(_quiet)
        _bound_users += 1
    try:
        if is_server(uri):
            _check_health(uri)
        yield
    finally:
        with _bound_lock:
            _bound_users -= 1
            if _bound_users == 0:
                for key in list(_bound_saved):
                    if os.environ.get(key) == BOUNDED_ENV[key]:
                        os.environ.pop(key, None)
                    _bound_saved.pop(key)
                pool_logger.removeFilter(_quiet)


def is_connection_problem(exc: BaseException) -> bool:
    """Transport failures and a SQLite store busy past its timeout, by type: MLflow wraps them in
    MlflowException (raised without ``from``, so the chain is walked through ``__context__`` too)."""
    import requests
    from mlflow.exceptions import MlflowException

    transport = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
        ConnectionError,
        TimeoutError,
        TrackingUnavailable,
    )
    return any(
        isinstance(e, transport) or (isinstance(e, MlflowException) and e.error_code == "TEMPORARILY_UNAVAILABLE")  # "database is locked"
        for e in causes(exc)
    )


@contextlib.contextmanager
def mlflow_errors(uri: str, fix: str = "start the tracking server or check --tracking-uri") -> Iterator[None]:
    """Inside: bounded calls; an unreachable store becomes TrackingUnavailable naming the URI and ``fix``."""
    from mlflow.exceptions import MlflowException

    try:
        with bounded(uri):
            yield
    except TrackingUnavailable as exc:
        raise TrackingUnavailable(f"MLflow at {uri} is unreachable: {fix}.", tracking_uri=uri) from exc
    except (MlflowException, OSError) as exc:
        if not is_connection_problem(exc):
            raise
        raise TrackingUnavailable(f"MLflow at {uri} is unreachable ({type(exc).__name__}): {fix}.", tracking_uri=uri) from exc


# --- the client ----------------------------------------------------------------------------------

_initialised: set[str] = set()


def client(uri: str) -> Any:
    """An MlflowClient for ``uri`` (tracking and registry); a SQLite store is made ready first, once per process."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None and uri not in _initialised:
        init_sqlite_store(uri)
        _initialised.add(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _quiet_migrations() -> Iterator[None]:
    """MLflow announces a new store's tables on its own console handler ("Creating initial MLflow database
    tables...", alembic's steps): between a run's progress bars that is noise; warnings still show."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def init_sqlite_store(uri: str) -> None:
    """Create or migrate a SQLite store, one process at a time, before any other client touches it.

    Several processes migrating a new store at once collide ("duplicate column name",
    "table ... already exists") and can leave it half-migrated. The lock is taken
    before the first client object is built; inside it, one process builds both stores (the
    tracking store and the model registry) and switches the database to WAL, so readers never
    block the one writer; the others find the work done.
    """
    import sqlite3

    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    assert db is not None, "init_sqlite_store is called for sqlite: URIs only"
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".init.lock", timeout=_INIT_LOCK_TIMEOUT_S), _quiet_migrations():
        probe = MlflowClient(tracking_uri=uri, registry_uri=uri)
        probe.search_experiments(max_results=1)  # tracking store: tables created or migrated
        probe.search_registered_models(max_results=1)  # registry store, likewise
        with contextlib.closing(sqlite3.connect(str(db), timeout=SQLITE_BUSY_TIMEOUT_S)) as conn:
            # Persistent in the file. MLflow's own sessions wait 20 s on a lock (PRAGMA busy_timeout in
            # store/db/utils.py); what still times out is retried by the track task (TEMPORARILY_UNAVAILABLE).
            conn.execute("PRAGMA journal_mode=WAL")


@contextlib.contextmanager
def default_uris(uri: str) -> Iterator[None]:
    """MLflow's process-default tracking and registry URIs set to ``uri`` for one call, then restored.

    Needed where MLflow resolves a reference against its default store whatever client is used
    (a SQLite registry resolving ``models:/<model id>``; ModelsArtifactRepository): it would
    otherwise read or create ``./mlflow.db`` in the working directory. Restores MLflow's own
    module state (not the environment), so a user's MLFLOW_TRACKING_URI is left as it was.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _default_lock:
        saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
        tracking_utils._tracking_uri, registry_utils._registry_uri = uri, uri
        try:
            yield
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = saved


_default_lock = threading.Lock()
