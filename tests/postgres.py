"""A throwaway PostgreSQL 15 cluster for end-to-end tests, in the style of tests/servers.py.

    pg = PostgresHandle(log_dir=tmp / "logs").start()   # initdb + postgres on 127.0.0.1:<free port>
    pg.create_database("prefect")
    pg.url("prefect", driver="postgresql+asyncpg")       # postgresql+asyncpg://lp@127.0.0.1:PORT/prefect
    pg.psql("select 1", database="prefect")
    ...
    pg.stop()                                            # fast shutdown, cluster directory removed

The cluster lives in a fresh directory under the system temporary directory (not pytest's
tmp_path: /tmp/pytest-of-root is 0700, and the server runs as the ``postgres`` user when the
tests run as root, since initdb and postgres refuse root). The handle starts the ``postgres``
binary itself in the foreground, in its own session, like every launched server of the test bed:
``stop()`` signals that process (SIGINT: fast shutdown), waits (bounded), then ends the whole
group. Authentication is ``trust`` on 127.0.0.1 only; the superuser is ``lp``. Durability is off
(fsync, synchronous_commit, full_page_writes): nothing here outlives the test.

Every wait is bounded; a failure includes the tail of the server log. Measured on the 2-core
test machines (2026-12): initdb ~1.5 s, ready ~0.5 s after launch, fast stop < 1 s.

Binaries: /usr/lib/postgresql/15/bin (Debian's postgresql-15), or LORA_PREP_PG_BIN.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.servers import free_port

PG_BIN = Path(os.environ.get("LORA_PREP_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "lp"


def available() -> str | None:
    """None when a cluster can be started here, else why not (the test fails with it)."""
    missing = [b for b in ("initdb", "postgres", "psql", "pg_isready") if not (PG_BIN / b).is_file()]
    if missing:
        return f"PostgreSQL binaries not found in {PG_BIN}: {', '.join(missing)} (Debian: apt-get install postgresql-15)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb and postgres as"
    return None


class PostgresHandle:
    """One cluster: its directory, port, server process and log. Start it once, stop it once (stop is idempotent)."""

    def __init__(self, log_dir: Path, *, port: int | None = None, parent: Path | None = None) -> None:
        self.log_path = Path(log_dir) / "postgres.log"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._parent = Path(parent or tempfile.gettempdir())
        self.root: Path | None = None
        self.process: subprocess.Popen | None = None
        self._as_user = "postgres" if os.geteuid() == 0 else None

    # --- addresses ---------------------------------------------------------------------------

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A SQLAlchemy URL: ``postgresql`` (psycopg2, MLflow), ``postgresql+asyncpg`` (Prefect)."""
        return f"{driver}://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "not started"
        return self.root / "data"

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PostgresHandle:
        why = available()
        if why:
            raise RuntimeError(why)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="lora-prep-pg-", dir=self._parent))
        try:
            if self._as_user:
                shutil.chown(self.root, user=self._as_user, group=self._as_user)
            self._check_traversable()
            self._run([str(PG_BIN / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", SUPERUSER,
                       "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"], timeout=timeout)
            self._launch()
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_traversable(self) -> None:
        if not self._as_user:
            return
        import pwd

        uid = pwd.getpwnam(self._as_user).pw_uid
        for folder in [self.root, *self.root.parents]:
            st = folder.stat()
            if st.st_uid != uid and not st.st_mode & 0o001:
                raise RuntimeError(f"{folder} (mode {oct(st.st_mode & 0o777)}) is not traversable by the {self._as_user} user; "
                                   "pass a parent directory it can reach")

    def _launch(self) -> None:
        argv = [
            str(PG_BIN / "postgres"), "-D", str(self.data_dir), "-p", str(self.port), "-k", str(self.root),
            "-c", f"listen_addresses={self.host}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200",  # Prefect's server pools per service; MLflow's too
        ]
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(self.root),
                env=self._env(), start_new_session=True, user=self._as_user, group=self._as_user,
            )
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"postgres exited with code {self.process.returncode} before it was ready:\n{self.log_tail()}")
            probe = subprocess.run([str(PG_BIN / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres"],
                                   capture_output=True, text=True, timeout=10, env=self._env())
            if probe.returncode == 0:
                return
            last = (probe.stdout + probe.stderr).strip()
            time.sleep(0.2)
        raise TimeoutError(f"postgres not ready on {self.host}:{self.port} after {timeout:.0f} s ({last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """Fast shutdown (SIGINT to the postmaster), bounded; then SIGKILL the group; then remove the cluster directory."""
        process = self.process
        if process is not None:
            if process.poll() is None:
                _signal(process.pid, signal.SIGINT)  # postgres: SIGINT = fast shutdown (rolls back, disconnects clients)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    _signal(process.pid, signal.SIGQUIT)  # immediate shutdown
                    try:
                        process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
            _killpg(process.pid)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 10
            while _group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        return process.returncode if process is not None else None

    def __enter__(self) -> PostgresHandle:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- SQL ---------------------------------------------------------------------------------

    def psql(self, sql: str, database: str = "postgres", timeout: float = 30.0) -> str:
        """Run SQL with psql over TCP; returns unaligned, tuples-only output. Raises with psql's error and the log tail."""
        result = subprocess.run(
            [str(PG_BIN / "psql"), "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", database,
             "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t", "-c", sql],
            capture_output=True, text=True, timeout=timeout, env=self._env(), stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql -d {database} -c {sql!r} exited {result.returncode}: {result.stderr.strip()}\n{self.log_tail(2000)}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; returns its SQLAlchemy URL (plain ``postgresql://``)."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def tables(self, database: str) -> set[str]:
        """The tables of the database's public schema (what a server created there)."""
        out = self.psql("select tablename from pg_catalog.pg_tables where schemaname = 'public'", database=database)
        return set(out.split()) if out else set()

    # --- helpers -----------------------------------------------------------------------------

    def _run(self, argv: list[str], timeout: float) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self._env(), cwd=str(self.root),
                                stdin=subprocess.DEVNULL, user=self._as_user, group=self._as_user)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no PGHOST/PGPORT/PGDATA of the caller
        env.update({"LC_ALL": "C", "LANG": "C", "PGCONNECT_TIMEOUT": "5"})
        if self._as_user:
            env.update({"HOME": str(self.root), "USER": self._as_user, "LOGNAME": self._as_user})
        return env


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
