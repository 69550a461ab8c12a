"""A Hugging Face Hub-compatible HTTP server for tests, serving repos from a folder.

It answers what huggingface_hub 2.4 and transformers 5.24 request (read from their
source: ``file_download.py``, ``hf_api.py``, ``utils/_http.py``), so the real client
code paths run against it: model info, tree listing, refs, commits, paths-info, and
HEAD/GET ``resolve`` with Range. Errors are signalled as the Hub does (``X-Error-Code``
and ``X-Error-Message`` headers plus a JSON ``{"error": ...}`` body), so
huggingface_hub raises its own typed errors.

Store layout (``publish`` writes it; the server re-reads ``repo.json`` on each request,
so repos published after ``start()`` are served at once)::

    STORE/{org}/{name}/repo.json       {"gated": false, "refs": {"main": sha, "v1": sha}, "tags": ["v1"],
                                        "commits": [sha, ...], "parents": {sha: parent|null}, "dates": {sha: iso}}
    STORE/{org}/{name}/commits/{sha}/  the files of that commit (a full snapshot; subfolders allowed)

``refs`` holds branches and tags in one namespace; ``tags`` says which refs are tags.

Deliberate simplifications, each faithful to what the client can observe:
- LFS files are served directly (no redirect to a CDN); their ETag and ``X-Linked-Etag``
  are the sha256, as the Hub's redirect response carries.
- Gating applies to file content (``resolve``) only: like the Hub, model info and the
  tree of a gated repo are public. 401 without a token, 403 with a wrong one.
- A token is only checked for gated repos; public repos ignore the Authorization header.
- ``lastCommit`` in expanded tree entries is the requested commit, not the last one
  that touched the file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_testtoken_lora_prep_0123456789"

# Git LFS in Hub repos: these suffixes by .gitattributes convention, anything else above 10 KiB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".onnx", ".msgpack", ".h5", ".model")
LFS_MIN_SIZE = 10 * 1024  # bytes; a file strictly larger than this is LFS whatever its name
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_CHUNK = 64 * 1024  # bytes per socket write: small enough that a cut lands mid-file
_EPOCH = "2024-01-01T00:00:00.000Z"  # date for commits published without one


# --- file facts: sizes and hashes, cached by (path, mtime, size) -------------------------


@dataclass(frozen=True)
class FileFacts:
    size: int
    sha256: str
    git_sha1: str  # git blob oid of the content: the ETag and cache blob name of a regular file
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def oid(self) -> str:
        """Tree oid: for an LFS file git stores (and the Hub lists) the pointer's blob oid."""
        return _git_blob_sha1(self.pointer) if self.lfs else self.git_sha1


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE


_facts_cache: dict[tuple[str, int, int], FileFacts] = {}
_facts_lock = threading.Lock()


def file_facts(path: Path, repo_path: str | None = None) -> FileFacts:
    """Size and hashes of a file; hashed once per (path, mtime, size), so a rewritten file is re-hashed."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    with _facts_lock:
        cached = _facts_cache.get(key)
    if cached is not None:
        return cached
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % st.st_size)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    facts = FileFacts(st.st_size, sha256.hexdigest(), sha1.hexdigest(), is_lfs(repo_path or path.name, st.st_size))
    with _facts_lock:
        _facts_cache[key] = facts
    return facts


def _seed_facts(path: Path, facts: FileFacts) -> None:
    st = path.stat()
    with _facts_lock:
        _facts_cache[(str(path), st.st_mtime_ns, st.st_size)] = facts


# --- the store: publish and read ---------------------------------------------------------

_publish_lock = threading.Lock()


def _hard_link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
        return True
    except OSError:  # another file system, or one without hard links
        return False


def _split_repo_id(repo_id: str) -> tuple[str, str]:
    parts = repo_id.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}.")
    return parts[0], parts[1]


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def publish(
    store: Path,
    repo_id: str,
    src_dir: Path,
    *,
    branch: str = "main",
    tags: Sequence[str] = (),
    gated: bool | str | None = None,
    link: bool = False,
) -> str:
    """Copy src_dir's files as a new commit on `branch` (created if missing), point `tags` at it;
    return the 40-hex commit sha.

    sha = sha1 over the parent sha and the sorted (path, sha256) of the files: deterministic.
    A new branch starts from the head of main (its parent), as `git branch` would.
    `gated`: True (shown as "auto"), "manual", False, or None to keep the repo's setting.
    `link`: hard-link the files instead of copying them where the file system allows (the caller then must
    not modify src_dir's files: the benchmark's generated models, served without a second copy on disk).
    """
    org, name = _split_repo_id(repo_id)
    src_dir = Path(src_dir)
    paths = sorted(p.relative_to(src_dir).as_posix() for p in src_dir.rglob("*") if p.is_file())
    if not paths:
        raise ValueError(f"publish: {src_dir} holds no files; write the repo's files there first.")
    facts = {p: file_facts(src_dir / p, p) for p in paths}
    repo_dir = Path(store) / org / name
    with _publish_lock:
        meta = read_repo_meta(repo_dir) or {"gated": False, "refs": {}, "tags": [], "commits": []}
        meta.setdefault("parents", {})
        meta.setdefault("dates", {})
        if branch in meta["tags"]:
            raise ValueError(f"publish: {branch!r} is a tag of {repo_id}; publish to a branch name.")
        parent = meta["refs"].get(branch, meta["refs"].get("main"))
        digest = hashlib.sha1(f"parent {parent or ''}\n".encode())
        for p in paths:
            digest.update(f"{p}\0{facts[p].sha256}\n".encode())
        sha = digest.hexdigest()

        commit_dir = repo_dir / "commits" / sha
        if not commit_dir.exists():  # same parent and files: the commit exists already
            tmp = repo_dir / "commits" / f".tmp-{sha}-{uuid.uuid4().hex[:8]}"
            for p in paths:
                dst = tmp / p
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not (link and _hard_link(src_dir / p, dst)):
                    shutil.copyfile(src_dir / p, dst)
            os.replace(tmp, commit_dir)
        for p in paths:  # so that serving never re-hashes what publish just hashed
            _seed_facts(commit_dir / p, facts[p])

        if sha not in meta["commits"]:
            meta["commits"].append(sha)
            meta["parents"][sha] = parent
            meta["dates"][sha] = _now()
        meta["refs"][branch] = sha
        for tag in tags:
            if tag in meta["refs"] and tag not in meta["tags"]:
                raise ValueError(f"publish: tag {tag!r} is a branch of {repo_id}; choose another tag name.")
            meta["refs"][tag] = sha
            if tag not in meta["tags"]:
                meta["tags"].append(tag)
        if gated is not None:
            meta["gated"] = gated
        _write_json_atomic(repo_dir / "repo.json", meta)
    return sha


def read_repo_meta(repo_dir: Path) -> dict | None:
    try:
        return json.loads((repo_dir / "repo.json").read_text())
    except FileNotFoundError:
        return None


def resolve_ref(meta: dict, revision: str) -> str | None:
    """Branch, tag, refs/heads/X, refs/tags/X, or a full sha of a known commit -> commit sha."""
    refs, tags = meta["refs"], set(meta.get("tags", ()))
    if revision in refs:
        return refs[revision]
    if revision.startswith("refs/heads/") and (b := revision[len("refs/heads/") :]) in refs and b not in tags:
        return refs[b]
    if revision.startswith("refs/tags/") and (t := revision[len("refs/tags/") :]) in tags:
        return refs[t]
    if _SHA_RE.match(revision) and revision in meta.get("commits", ()):
        return revision
    return None


_listing_cache: dict[str, list[str]] = {}  # commit dir -> sorted file paths (a commit never changes)
_listing_lock = threading.Lock()


def commit_files(commit_dir: Path) -> list[str]:
    key = str(commit_dir)
    with _listing_lock:
        if key in _listing_cache:
            return _listing_cache[key]
    files = sorted(p.relative_to(commit_dir).as_posix() for p in commit_dir.rglob("*") if p.is_file())
    with _listing_lock:
        _listing_cache[key] = files
    return files


def safetensors_param_counts(path: Path) -> dict[str, int]:
    """Parameters per dtype from a safetensors header (8-byte little-endian length, then JSON)."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    counts: dict[str, int] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for dim in info["shape"]:
            n *= dim
        counts[info["dtype"]] = counts.get(info["dtype"], 0) + n
    return counts


# --- fault injection and request records -------------------------------------------------


@dataclass
class RequestRecord:
    method: str
    path: str  # URL-decoded path, without the query
    query: str
    status: int
    range: str | None  # the Range header as sent
    body_bytes: int = 0  # response body bytes written (a cut or a range counts only what was sent)


@dataclass
class _Rule:
    path_glob: str
    methods: frozenset[str] | None
    remaining: int | None  # None: until reset_faults()
    status: int = 0
    retry_after: str | None = None
    nbytes: int = 0
    seconds: float = 0.0
    headers: dict | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and fnmatch.fnmatchcase(path, self.path_glob)


def _methods(methods: Iterable[str] | None) -> frozenset[str] | None:
    return None if methods is None else frozenset(m.upper() for m in methods)


# --- HTTP --------------------------------------------------------------------------------


class HubError(Exception):
    """A Hub-style error response: status + X-Error-Code + X-Error-Message."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Listener(ThreadingHTTPServer):
    """One listening socket; tracks its connections so stop() can close idle keep-alive ones."""

    daemon_threads = True
    allow_reuse_address = True  # refuse(False) rebinds the same port at once

    def __init__(self, address: tuple[str, int], hub: HubServer):
        self.hub = hub
        self.closing = threading.Event()  # wakes delayed handlers on stop
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        name = f"hubserver-{self.server_address[1]}-conn"
        t = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True, name=name)
        with self._conns_lock:
            self._conns[t] = request
        t.start()

    def _serve_one(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except OSError:
            pass  # the client went away (a timeout, a cut, a refused restart): not a server bug
        except Exception as exc:  # noqa: BLE001 - recorded for tests to assert on, never printed per request
            self.hub.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.shutdown_request(request)
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)

    def close_all(self, timeout: float) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns.items())
        for _, sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _ in conns:
            thread.join(timeout)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx2 uses with the real Hub
    server_version = "lora-prep-hubserver"
    timeout = 60  # seconds an idle keep-alive connection is kept before the thread ends
    server: _Listener

    def log_message(self, format, *args):  # noqa: A002 - silence per-request logging to stderr
        pass

    def do_GET(self):
        self.server.hub._handle(self, "GET")

    def do_HEAD(self):
        self.server.hub._handle(self, "HEAD")

    def do_POST(self):
        self.server.hub._handle(self, "POST")


class HubServer:
    """Hub-compatible server on 127.0.0.1 over a store folder, with fault injection and request records.

    Use as ``with HubServer(store) as hub: ...`` or ``hub = HubServer(store).start(); ...; hub.stop()``.
    Point huggingface_hub at ``hub.url`` with HF_ENDPOINT (before importing it) or ``endpoint=``.
    """

    def __init__(self, store: Path, *, token: str = DEFAULT_TOKEN, host: str = "127.0.0.1", port: int = 0):
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.host = host
        self.port = port
        self.repos: dict = {}  # facts about published repos, set by whoever publishes them (the hub fixture)
        self.errors: list[str] = []  # internal handler errors (bugs), never printed per request
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._fails: list[_Rule] = []
        self._cuts: list[_Rule] = []
        self._delays: list[_Rule] = []
        self._overrides: list[_Rule] = []
        self._stalls: list[_Rule] = []
        self._ignored_ranges: list[_Rule] = []
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self._refusing = False

    # lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> HubServer:
        self._listen()
        return self

    def stop(self) -> None:
        self._unlisten()
        self._refusing = False

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _listen(self) -> None:
        if self._listener is not None:
            return
        self._listener = _Listener((self.host, self.port), self)
        self.port = self._listener.server_address[1]
        # poll_interval 0.05 s: stop() returns within 50 ms instead of the default 500 ms
        self._thread = threading.Thread(
            target=self._listener.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"hubserver-{self.port}",
        )
        self._thread.start()

    def _unlisten(self) -> None:
        if self._listener is None:
            return
        self._listener.close_all(timeout=5.0)
        self._thread.join(5.0)
        self._listener = self._thread = None

    def publish(self, repo_id: str, src_dir: Path, **kwargs) -> str:
        return publish(self.store, repo_id, src_dir, **kwargs)

    # faults

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        path_glob: str = "*",
        methods: Iterable[str] | None = None,
        retry_after: str | None = None,
    ) -> None:
        """The next n requests matching (decoded path glob, methods; None = any) answer `status`.

        429 and 503 carry ``Retry-After: 0`` unless `retry_after` says otherwise (huggingface_hub then
        waits Retry-After + 1 s before its retry)."""
        if retry_after is None and status in (429, 503):
            retry_after = "0"
        with self._lock:
            self._fails.append(_Rule(path_glob, _methods(methods), n, status=status, retry_after=retry_after))

    def cut_after(self, path_glob: str, nbytes: int, times: int = 1) -> None:
        """The next `times` matching GETs declare the full Content-Length, send `nbytes` of the body, then close."""
        with self._lock:
            self._cuts.append(_Rule(path_glob, frozenset({"GET"}), times, nbytes=nbytes))

    def stall_after(self, path_glob: str, nbytes: int, seconds: float, times: int = 1) -> None:
        """The next `times` matching whole-file GETs (no Range header) send `nbytes` of the body, then hang for
        `seconds` before going on: a transfer in progress, for a test that kills its client mid-download."""
        with self._lock:
            self._stalls.append(_Rule(path_glob, frozenset({"GET"}), times, nbytes=nbytes, seconds=seconds))

    def ignore_range(self, path_glob: str, times: int = 1) -> None:
        """The next `times` matching GETs that ask for a Range get the whole file (200), as some CDNs answer:
        a client resuming a cut transfer must start its file over."""
        with self._lock:
            self._ignored_ranges.append(_Rule(path_glob, frozenset({"GET"}), times))

    def delay(
        self, seconds: float, path_glob: str = "*", methods: Iterable[str] | None = None, times: int | None = None
    ) -> None:
        """Matching requests wait `seconds` before any answer (times=None: until reset_faults())."""
        with self._lock:
            self._delays.append(_Rule(path_glob, _methods(methods), times, seconds=seconds))

    def override_headers(self, path_glob: str, headers: dict[str, str], methods: Iterable[str] | None = None, times: int | None = None) -> None:
        """Matching responses (errors too) carry these header values instead of the true ones: a hostile or
        broken mirror (an ETag or X-Repo-Commit that is a path, say). times=None: until reset_faults()."""
        with self._lock:
            self._overrides.append(_Rule(path_glob, _methods(methods), times, headers=dict(headers)))

    def refuse(self, on: bool = True) -> None:
        """Simulate the Hub being down: stop listening, so clients get connection refused (httpx2.ConnectError);
        open keep-alive connections are closed. refuse(False) listens again on the same port."""
        if on:
            self._refusing = True
            self._unlisten()
        else:
            self._refusing = False
            self._listen()

    def reset_faults(self) -> None:
        with self._lock:
            self._fails.clear()
            self._cuts.clear()
            self._delays.clear()
            self._overrides.clear()
            self._stalls.clear()
            self._ignored_ranges.clear()
        if self._refusing:
            self.refuse(False)

    @staticmethod
    def _take(rules: list[_Rule], method: str, path: str) -> _Rule | None:
        for rule in rules:
            if rule.matches(method, path):
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        rules.remove(rule)
                return rule
        return None

    # request records

    def records(self, path_glob: str = "*", method: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                r
                for r in self._records
                if (method is None or r.method == method) and fnmatch.fnmatchcase(r.path, path_glob)
            ]

    def requests(self, path_glob: str = "*", method: str | None = None) -> int:
        return len(self.records(path_glob, method))

    def body_bytes(self, path_glob: str = "*", methods: Iterable[str] | None = ("GET",)) -> int:
        allowed = _methods(methods)
        with self._lock:
            return sum(
                r.body_bytes
                for r in self._records
                if (allowed is None or r.method in allowed) and fnmatch.fnmatchcase(r.path, path_glob)
            )

    def reset_counters(self) -> None:
        with self._lock:
            self._records.clear()

    # request handling

    def _handle(self, h: _Handler, method: str) -> None:
        split = urlsplit(h.path)
        path = unquote(split.path)
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        query = parse_qs(split.query, keep_blank_values=True)

        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""  # read even when failing: keep-alive needs it consumed

        with self._lock:
            delay = self._take(self._delays, method, path)
        if delay is not None and h.server.closing.wait(delay.seconds):
            h.close_connection = True
            return
        with self._lock:
            fail = self._take(self._fails, method, path)
        if fail is not None:
            headers = {"Retry-After": fail.retry_after} if fail.retry_after is not None else {}
            self._send_error(h, method, path, split.query, HubError(fail.status, None, "Injected fault", headers))
            return

        try:
            self._route(h, method, path, split.query, segments, query, body)
        except HubError as err:
            self._send_error(h, method, path, split.query, err)
        except (ConnectionError, TimeoutError):
            raise  # the client went away mid-answer (its timeout, a cut): nothing more to send
        except Exception as exc:  # noqa: BLE001 - a server bug: answer 500 and keep it for tests to see
            self.errors.append(f"{method} {path}: {type(exc).__name__}: {exc}")
            self._send_error(h, method, path, split.query, HubError(500, None, f"{type(exc).__name__}: {exc}"))

    def _route(self, h, method, path, raw_query, segments, query, body) -> None:
        if segments == ["api", "agent-harnesses"]:  # fetched once per process for the User-Agent: none here
            return self._send_json(h, method, path, raw_query, {"standardEnvVars": [], "harnesses": {}})
        if segments[:2] in (["api", "datasets"], ["api", "spaces"]):
            raise HubError(404, "RepoNotFound", "Repository not found")
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            repo_id, rest = f"{segments[2]}/{segments[3]}", segments[4:]
            if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
                form = parse_qs(body.decode(), keep_blank_values=True)
                return self._send_json(h, method, path, raw_query, self._paths_info(repo_id, rest[1], form))
            if method not in ("GET", "HEAD"):
                raise HubError(405, None, f"Method {method} not allowed")
            if not rest:
                data = self._model_info(repo_id, "main", query)
            elif rest[0] == "revision" and len(rest) >= 2:  # a revision may come with its slashes unencoded
                data = self._model_info(repo_id, "/".join(rest[1:]), query)
            elif rest[0] == "tree" and len(rest) >= 2:
                data = self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
            elif rest == ["refs"]:
                data = self._refs(repo_id, query)
            elif rest[0] == "commits" and len(rest) == 2:
                data = self._commits(repo_id, rest[1])
            else:
                raise HubError(404, None, "Not Found")
            return self._send_json(h, method, path, raw_query, data)
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(h, method, path, raw_query, f"{segments[0]}/{segments[1]}", segments[3], segments[4:])
        raise HubError(404, None, "Not Found")

    # repo lookups

    def _repo(self, repo_id: str) -> tuple[Path, dict]:
        parts = repo_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise HubError(404, "RepoNotFound", "Repository not found")
        repo_dir = self.store / parts[0] / parts[1]
        meta = read_repo_meta(repo_dir)
        if meta is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo_dir, meta

    def _commit(self, repo_id: str, revision: str) -> tuple[Path, dict, str, Path]:
        repo_dir, meta = self._repo(repo_id)
        sha = resolve_ref(meta, revision)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo_dir, meta, sha, repo_dir / "commits" / sha

    def _check_access(self, h: _Handler, repo_id: str, meta: dict) -> None:
        if not meta.get("gated"):
            return
        auth = h.headers.get("Authorization") or ""
        if not auth.lower().startswith("bearer "):
            raise HubError(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in.",
            )
        if auth[len("bearer ") :].strip() != self.token:
            raise HubError(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self.url}/{repo_id} to ask for access.",
            )

    # API bodies

    def _model_info(self, repo_id: str, revision: str, query: dict) -> dict:
        repo_dir, meta, sha, commit_dir = self._commit(repo_id, revision)
        files = commit_files(commit_dir)
        blobs = _truthy(query.get("blobs"))
        siblings = []
        for p in files:
            entry: dict = {"rfilename": p}
            if blobs:
                f = file_facts(commit_dir / p, p)
                entry.update(size=f.size, blobId=f.oid)
                if f.lfs:
                    entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
            siblings.append(entry)
        params: dict[str, int] = {}
        for p in files:
            if p.endswith(".safetensors"):
                for dtype, n in safetensors_param_counts(commit_dir / p).items():
                    params[dtype] = params.get(dtype, 0) + n
        config = _read_json(commit_dir / "config.json")
        gated = meta.get("gated") or False
        tags = (["transformers"] if config is not None else []) + (["safetensors"] if params else [])
        if config and config.get("model_type"):
            tags.append(config["model_type"])
        tags += meta.get("model_tags", [])
        data = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": sha,
            "lastModified": meta.get("dates", {}).get(sha, _EPOCH),
            "createdAt": meta.get("dates", {}).get(meta["commits"][0], _EPOCH) if meta.get("commits") else _EPOCH,
            "private": False,
            "disabled": False,
            "gated": "auto" if gated is True else gated,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(file_facts(commit_dir / p, p).size for p in files),
        }
        if config is not None:
            data["library_name"] = "transformers"
            data["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        if params:
            data["safetensors"] = {"parameters": params, "total": sum(params.values())}
        if _truthy(query.get("securityStatus")):
            data["securityRepoStatus"] = {"scansDone": True, "filesWithIssues": []}
        expand = query.get("expand", []) + query.get("expand[]", [])
        if expand:  # like the Hub: only the asked-for properties
            data = {k: v for k, v in data.items() if k in ("_id", "id") or k in expand}
        return data

    def _entries(self, commit_dir: Path, sha: str, date: str, expand: bool) -> dict[str, dict]:
        """Every file and directory of a commit as the tree API lists them, keyed by path."""
        files = commit_files(commit_dir)
        entries: dict[str, dict] = {}
        for p in files:
            f = file_facts(commit_dir / p, p)
            entries[p] = {"type": "file", "oid": f.oid, "size": f.size, "path": p}
            if f.lfs:
                entries[p]["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
        dirs = {posixpath.dirname(p) for p in files}
        for d in list(dirs):
            while d:
                dirs.add(d)
                d = posixpath.dirname(d)
        dirs.discard("")
        children: dict[str, list[str]] = {}
        for p in [*files, *dirs]:
            children.setdefault(posixpath.dirname(p), []).append(p)
        for d in sorted(dirs, key=lambda d: -d.count("/")):  # deepest first: a tree oid covers its children's oids
            listing = "".join(f"{entries[k]['type']} {k} {entries[k]['oid']}\n" for k in sorted(children[d]))
            entries[d] = {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": d}
        if expand:
            for e in entries.values():
                e["lastCommit"] = {"id": sha, "title": f"Commit {sha[:7]}", "date": date}
        return entries

    def _tree(self, repo_id: str, revision: str, path_in_repo: str, query: dict) -> list[dict]:
        repo_dir, meta, sha, commit_dir = self._commit(repo_id, revision)
        entries = self._entries(commit_dir, sha, meta.get("dates", {}).get(sha, _EPOCH), _truthy(query.get("expand")))
        prefix = path_in_repo.strip("/")
        if prefix and entries.get(prefix, {}).get("type") != "directory":
            raise HubError(404, "EntryNotFound", f"{prefix} does not exist on \"{revision}\"", {"X-Repo-Commit": sha})
        recursive = _truthy(query.get("recursive"))
        out = []
        for p, e in sorted(entries.items()):
            parent = posixpath.dirname(p)
            inside = p.startswith(prefix + "/") if prefix else True
            if inside and (recursive or parent == prefix):
                out.append(e)
        return out

    def _paths_info(self, repo_id: str, revision: str, form: dict) -> list[dict]:
        repo_dir, meta, sha, commit_dir = self._commit(repo_id, revision)
        expand = _truthy(form.get("expand"))
        entries = self._entries(commit_dir, sha, meta.get("dates", {}).get(sha, _EPOCH), expand)
        return [entries[p.strip("/")] for p in form.get("paths", []) if p.strip("/") in entries]

    def _refs(self, repo_id: str, query: dict) -> dict:
        _, meta = self._repo(repo_id)
        tags = set(meta.get("tags", ()))
        out: dict = {"branches": [], "converts": [], "tags": [], "pullRequests": []}
        for name, sha in sorted(meta["refs"].items()):
            if name in tags:
                out["tags"].append({"name": name, "ref": f"refs/tags/{name}", "targetCommit": sha})
            elif name.startswith("refs/pr/"):
                out["pullRequests"].append({"name": name, "ref": name, "targetCommit": sha})
            else:
                out["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha})
        if not _truthy(query.get("include_prs")):
            del out["pullRequests"]
        return out

    def _commits(self, repo_id: str, revision: str) -> list[dict]:
        _, meta, sha, _ = self._commit(repo_id, revision)
        out = []
        while sha:
            date = meta.get("dates", {}).get(sha, _EPOCH)
            author = [{"user": "lora-prep-tests"}]
            out.append({"id": sha, "authors": author, "date": date, "title": f"Commit {sha[:7]}", "message": ""})
            sha = meta.get("parents", {}).get(sha)
        return out

    # resolve: the file bytes

    def _resolve(self, h, method, path, raw_query, repo_id, revision, file_segments) -> None:
        repo_dir, meta = self._repo(repo_id)
        self._check_access(h, repo_id, meta)
        _, _, sha, commit_dir = self._commit(repo_id, revision)
        repo_path = posixpath.normpath("/".join(file_segments))
        file = commit_dir / repo_path
        if repo_path.startswith(("..", "/")) or not file.is_file():
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        f = file_facts(file, repo_path)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": sha,
        }
        if f.lfs:  # huggingface_hub prefers these over ETag / Content-Length (get_hf_file_metadata)
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        status, start, end = 200, 0, f.size - 1
        range_header = h.headers.get("Range")
        if range_header and method == "GET":
            with self._lock:
                if self._take(self._ignored_ranges, method, path) is not None:
                    range_header = None
        if range_header:
            parsed = _parse_range(range_header, f.size)
            if parsed == "unsatisfiable":
                headers["Content-Range"] = f"bytes */{f.size}"
                err = HubError(416, None, "Requested Range Not Satisfiable", headers)
                self._send_error(h, method, path, raw_query, err)
                return
            if parsed is not None:
                status, (start, end) = 206, parsed
                headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        headers["Content-Length"] = str(end - start + 1)
        record = self._start_response(h, method, path, raw_query, status, headers)
        if method == "HEAD":
            return
        with self._lock:
            cut = self._take(self._cuts, method, path)
            stall = None if range_header else self._take(self._stalls, method, path)
        budget = cut.nbytes if cut is not None else None
        stall_at = stall.nbytes if stall is not None else None
        with file.open("rb") as src:
            src.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    break
                if budget is not None:
                    chunk = chunk[:budget]
                    budget -= len(chunk)
                if stall_at is not None and len(chunk) > stall_at:
                    head, chunk = chunk[:stall_at], chunk[stall_at:]
                    self._write(h, record, head)
                    left -= len(head)
                    stall_at = None
                    self._hang(stall.seconds)
                elif stall_at is not None:
                    stall_at -= len(chunk)
                self._write(h, record, chunk)
                left -= len(chunk)
                if budget == 0 and left > 0:
                    h.close_connection = True  # FIN before Content-Length is reached: a cut-off stream
                    return

    def _hang(self, seconds: float) -> None:
        """Mid-body silence, bounded; over early once the server stops."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._listener is not None:
            time.sleep(0.1)

    # response writing

    def _start_response(self, h, method, path, raw_query, status, headers) -> RequestRecord:
        # Recorded before the status line goes out, so a test never sees a response it cannot count.
        record = RequestRecord(method, path, raw_query, status, h.headers.get("Range"))
        with self._lock:
            self._records.append(record)
            override = self._take(self._overrides, method, path)
        if override is not None:
            headers = {**headers, **override.headers}
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        return record

    def _write(self, h, record: RequestRecord, data: bytes) -> None:
        with self._lock:  # counted before sending: the client cannot hold bytes the counter lacks
            record.body_bytes += len(data)
        try:
            h.wfile.write(data)
        except OSError:
            with self._lock:
                record.body_bytes -= len(data)
            raise

    def _send_json(self, h, method, path, raw_query, data, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(data).encode()
        all_headers = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body))}
        all_headers.update(headers or {})
        record = self._start_response(h, method, path, raw_query, status, all_headers)
        if method != "HEAD":
            self._write(h, record, body)

    def _send_error(self, h, method, path, raw_query, err: HubError) -> None:
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        # a header is one latin-1 line: a revision name or an exception text may be neither
        headers["X-Error-Message"] = " ".join(err.message.split()).encode("latin-1", "replace").decode("latin-1")
        self._send_json(h, method, path, raw_query, {"error": err.message}, err.status, headers)


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError, RecursionError):  # a broken repo's config: the Hub serves it anyway
        return None


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(start, end) inclusive, clamped to the file; "unsatisfiable"; or None to ignore the header (RFC 9110)."""
    m = _RANGE_RE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed or multi-range: serve the whole file
    if not m.group(1):  # suffix range: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(size - n, 0), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and end < start:
        return None  # invalid: ignored
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)
