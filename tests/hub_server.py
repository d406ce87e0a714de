"""A small, in-process, Hub-compatible HTTP server for offline tests.

Why: the tests must exercise the *real* ``huggingface_hub`` client (and ``transformers``' ``push_to_hub`` /
``from_pretrained``) without network access, and no published package offers an uploadable local Hub. This
module implements, with the standard library only (``http.server.ThreadingHTTPServer`` in a daemon thread,
bound to 127.0.0.1), the subset of the Hub HTTP API that ``huggingface_hub`` 2.x calls when Xet is disabled:

* auth: ``GET /api/whoami-v2``; ``Authorization: Bearer <token>``; a wrong token gives 401
  ``Invalid credentials in Authorization header`` on every route, a missing one 401 on write routes.
* repos: ``POST /api/repos/create`` (409 when it exists, 403 outside the user's namespaces; a new repo gets an
  "initial commit" with the default ``.gitattributes``, as on the Hub), ``DELETE /api/repos/delete``,
  ``PUT /api/{type}s/{id}/settings`` (visibility).
* read: ``GET /api/{type}s/{id}[/revision/{rev}]`` (``sha``, ``siblings``; sizes / blob ids / LFS info with
  ``?blobs=true``), ``GET .../tree/{rev}[/{path}]`` (``recursive``, ``expand``), ``POST .../paths-info/{rev}``,
  ``GET .../refs``, ``GET .../commits/{rev}``.
* write: ``POST .../preupload/{rev}`` (``lfs`` when the path matches the repo's ``.gitattributes`` LFS patterns,
  when the sample contains a NUL byte or above 10 MiB; ``oid`` of the remote file when it exists),
  ``POST .../commit/{rev}`` (NDJSON ``header`` / ``file`` / ``lfsFile`` / ``deletedFile`` / ``deletedFolder``;
  ``parentCommit`` -> 412; ``?create_pr=1``), ``POST|DELETE .../branch/{name}``, ``POST .../tag/{rev}``,
  ``DELETE .../tag/{name}``, ``POST /api/validate-yaml``.
* Git LFS: ``POST /{id}.git/info/lfs/objects/batch`` (basic transfer, upload actions pointing back at this
  server, no ``actions`` for objects already stored), the signed ``PUT`` of the object (sha256 and size checked)
  and ``POST /{id}.git/info/lfs/objects/verify``.
* download: ``GET|HEAD /{id}/resolve/{rev}/{path}``, with ``X-Repo-Commit``, ``ETag`` (git blob sha1) and
  ``Content-Length``; LFS files answer ``302`` to a signed "CDN" URL on ``localhost:<port>`` (another origin,
  like the real CDN, so the client keeps the metadata of the redirect and drops its token), carrying
  ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``. ``Range`` requests are honoured. Errors carry the
  ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) the client maps to its exceptions.

Test helpers: :meth:`HubServer.fail_next` (inject HTTP errors), :meth:`HubServer.stop` / :meth:`HubServer.start`
(connection refused while stopped, state kept, same port), :attr:`HubServer.requests` (what the client called),
:attr:`HubServer.errors` (server-side exceptions, i.e. bugs in this module) and :func:`serve_hub`, the body of the
``hub_server`` pytest fixture, which also points the already-imported client libraries at the server.

Not implemented: Xet, multipart LFS, pagination (single page), gated repos, discussions, Spaces runtime, buckets.

Client behaviour this relies on (read from huggingface_hub 2.4.0 / transformers 5.24):

* ``huggingface_hub.constants`` reads ``HF_ENDPOINT`` (-> ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``,
  ``HF_URL_HOSTS``), ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE``, ``HF_HOME``/``HF_HUB_CACHE``/``HF_TOKEN_PATH``
  and the timeouts once, at import; ``huggingface_hub.hf_api.api`` (behind ``huggingface_hub.create_repo`` & co)
  copied ``ENDPOINT`` at import; ``utils._http._HUB_ORIGINS`` too; ``transformers.utils.hub._hf_api`` is a
  lazily created, then cached, ``HfApi``. :func:`serve_hub` patches all of them (and resets the caches).
* Xet must be disabled (``hf_xet`` is installed): otherwise uploads go through the Xet CAS protocol.
* Retries: ``http_backoff`` (5 retries, sleeps 1, 2, 4, 8, 8 s, on 408/429/500/502/503/504 and on connect/timeout
  errors) wraps preupload, the LFS batch, the LFS PUT and verify, and the tree listing. ``create_repo``, the commit
  POST, ``model_info``, ``whoami``, refs and branches are *not* retried: one 5xx or a refused connection raises at
  once (``HfHubHTTPError``, or ``httpx2.ConnectError`` which is not an ``HfHubHTTPError``). The HEAD of
  ``hf_hub_download`` is not retried either and falls back to the cache (``LocalEntryNotFoundError`` when not
  cached; 401 and ``RepoNotFound``/``RevisionNotFound``/``EntryNotFound`` are re-raised as such); the file GET is
  resumed up to 5 times on connection errors, 1 s apart.
* Over ``http://`` a 401 stays a plain ``HfHubHTTPError``: the client only maps 401 to ``RepositoryNotFoundError``
  for ``https://`` URLs (or with ``X-Error-Code: RepoNotFound``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import json
import mimetypes
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

DEFAULT_TOKEN = "hf_test_token_0123456789abcdef"
DEFAULT_USERNAME = "user"
DEFAULT_ORGS: tuple[str, ...] = ("test-org",)
REGULAR_FILE_MAX_SIZE = 10 * 1024 * 1024  # the Hub refuses non-LFS files above 10 MiB

# Default `.gitattributes` of a new Hub repo (model repos).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HEX40_RE = re.compile(r"^[0-9a-f]{40}$")
_SHORT_SHA_RE = re.compile(r"^[0-9a-f]{7,39}$")
_OID_RE = re.compile(r"^[0-9a-f]{64}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")

_API_REPO_RE = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
_LFS_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+?)\.git/info/lfs/objects/(batch|verify)$")
_RESOLVE_RE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
_LFS_UPLOAD_RE = re.compile(r"^/__lfs/upload/([0-9a-f]{64})$")
_CDN_RE = re.compile(r"^/__cdn/([0-9a-f]{64})$")
_seq = itertools.count(1)


# --------------------------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------------------------


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class _Blob:
    """A file of a commit: regular (``content``) or LFS (``lfs_oid``, content in the server's LFS store)."""

    size: int
    blob_id: str  # git sha1 of the content, or of the LFS pointer file
    content: bytes | None = None
    lfs_oid: str | None = None
    pointer_size: int | None = None

    @classmethod
    def regular(cls, content: bytes) -> _Blob:
        return cls(size=len(content), blob_id=_git_blob_sha1(content), content=content)

    @classmethod
    def lfs(cls, oid: str, size: int) -> _Blob:
        pointer = _lfs_pointer(oid, size)
        return cls(size=size, blob_id=_git_blob_sha1(pointer), lfs_oid=oid, pointer_size=len(pointer))

    @property
    def oid_for_preupload(self) -> str:
        """What the client compares with its local oid: sha256 for LFS files, git sha1 otherwise."""
        return self.lfs_oid or self.blob_id


@dataclass(frozen=True)
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    internal_id: str
    sdk: str | None = None
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def url_path(self) -> str:
        return _URL_PREFIX[self.repo_type] + self.repo_id


@dataclass
class FailureRule:
    """An injected failure, see :meth:`HubServer.fail_next`. ``hits`` counts the requests it answered."""

    method: str
    path_regex: re.Pattern[str]
    status: int
    remaining: int | None
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and self.path_regex.search(path) is not None


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # raw path, without the query string
    query: str
    status: int
    injected: bool  # answered by a `fail_next` rule


class HubError(Exception):
    """Raised by route handlers; rendered as the JSON error the Hub returns."""

    def __init__(
        self, status: int, message: str, *, error_code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        if error_code is not None:
            self.headers["X-Error-Code"] = error_code
            self.headers.setdefault("X-Error-Message", message)


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    host: str

    @property
    def base_url(self) -> str:
        return f"http://{self.host}"

    def flag(self, name: str) -> bool:
        value = self.query.get(name, [""])[-1].lower()
        return value in ("1", "true", "yes")

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        return cls(status=status, body=json.dumps(data).encode(), headers=hdrs)


def _repo_not_found(user: str | None) -> HubError:
    # Like the Hub: 401 for anonymous callers (no leak of private repos), 404 for authenticated ones.
    return HubError(401 if user is None else 404, "Repository not found", error_code="RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")


def _entry_not_found(path: str, commit: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit} if commit else None
    return HubError(404, f"Entry not found: {path}", error_code="EntryNotFound", headers=headers)


def _gitattributes_lfs_patterns(text: str) -> list[re.Pattern[str]]:
    """LFS patterns of a ``.gitattributes`` file, as regexes on the full path (simplified git semantics)."""
    patterns = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or line.lstrip().startswith("#") or "filter=lfs" not in parts[1:]:
            continue
        pattern = parts[0]
        anchored = "/" in pattern.strip("/")
        rx = ""
        i = 0
        pattern = pattern.lstrip("/")
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        patterns.append(re.compile(("^" if anchored else "^(?:.*/)?") + rx + "$"))
    return patterns


def _gitignore_matches(gitignore: str, path: str) -> bool:
    for line in gitignore.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        rx = _gitattributes_lfs_patterns(f"{line.rstrip('/')} filter=lfs")[0]
        if rx.match(path) or any(rx.match("/".join(path.split("/")[: i + 1])) for i in range(path.count("/"))):
            return True
    return False


# --------------------------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.hub._track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.hub._track_connection(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        hub = self.server.hub
        body = self._read_body()  # always drain the body to keep the keep-alive connection usable
        split = urlsplit(self.path)
        request = _Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            host=self.headers.get("Host") or f"{hub.host}:{hub.port}",
        )
        rule = hub._take_failure(request.method, request.path)
        if rule is not None:
            message = f"Injected failure: HTTP {rule.status}"
            payload = rule.body if rule.body is not None else {"error": message}
            response = _Response.json(payload, status=rule.status, headers=rule.headers)
        else:
            try:
                response = hub._dispatch(request)
            except HubError as e:
                response = _Response.json({"error": e.message}, status=e.status, headers=e.headers)
            except Exception:  # a bug in this module: report it to the test through `hub.errors`
                hub._record_error(f"{request.method} {self.path}\n{traceback.format_exc()}")
                response = _Response.json({"error": "Internal Error - We're working hard to fix this."}, 500)
        response.headers.setdefault("X-Request-Id", f"Root={uuid.uuid4()}")
        hub._record(RecordedRequest(request.method, request.path, split.query, response.status, rule is not None))
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            if not hub.is_running:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if request.method != "HEAD" and response.body:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


# --------------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------------


class HubServer:
    """In-memory Hub. ``url`` is the value for ``HF_ENDPOINT``; ``token`` the only valid token (user ``username``,
    member of ``orgs``). LFS files are redirected to ``http://{cdn_host}:{port}`` (``cdn_host=None``: served inline
    from the resolve URL, still with ``X-Linked-*`` headers)."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        username: str = DEFAULT_USERNAME,
        orgs: Iterable[str] = DEFAULT_ORGS,
        port: int = 0,
        cdn_host: str | None = "localhost",
    ) -> None:
        self.host = "127.0.0.1"
        self.token = token
        self.username = username
        self.orgs = tuple(orgs)
        self.cdn_host = cdn_host
        # Set by `serve_hub` (the pytest fixture): the temporary HF_HOME / HF_HUB_CACHE of the test.
        self.hf_home: Path | None = None
        self.hub_cache: Path | None = None
        self._port = port
        self._lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs: dict[str, bytes] = {}
        self._failures: list[FailureRule] = []
        self._requests: list[RecordedRequest] = []
        self._errors: list[str] = []
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()

    # ---- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def is_running(self) -> bool:
        return self._httpd is not None

    def start(self) -> HubServer:
        """Start (or restart, on the same port, keeping all repos) the server. Idempotent."""
        with self._lock:
            if self._httpd is not None:
                return self
            httpd = _HTTPServer((self.host, self._port), self)
            httpd.timeout = 0.05  # `handle_request` polls, so that `stop` never waits on a blocked accept
            self._port = httpd.server_address[1]
            self._httpd = httpd
            self._stop_event = threading.Event()
            self._thread = threading.Thread(
                target=self._serve, args=(httpd, self._stop_event), name=f"hub-server-{self._port}", daemon=True
            )
            self._thread.start()
        return self

    @staticmethod
    def _serve(httpd: _HTTPServer, stop_event: threading.Event) -> None:
        while not stop_event.is_set():
            httpd.handle_request()

    def stop(self) -> None:
        """Stop listening and cut open connections: clients get "connection refused" until :meth:`start`."""
        with self._lock:
            httpd, thread, self._httpd, self._thread = self._httpd, self._thread, None, None
            connections = list(self._connections)
        if httpd is None:
            return
        self._stop_event.set()
        if thread is not None:
            thread.join(timeout=5)
        httpd.server_close()
        for conn in connections:  # keep-alive connections would otherwise keep being served
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- test helpers ---------------------------------------------------------------------------------------------

    def fail_next(
        self,
        method: str = "*",
        path_regex: str = ".*",
        status: int = 500,
        count: int | None = 1,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> FailureRule:
        """Answer the next ``count`` requests (``None``: all of them) matching ``method`` (``"*"``: any) and
        ``path_regex`` (``re.search`` on the raw path, query excluded) with ``status`` and a JSON error body,
        before authentication or routing. Rules are checked in the order they were added."""
        rule = FailureRule(method.upper(), re.compile(path_regex), status, count, body, dict(headers or {}))
        with self._lock:
            self._failures.append(rule)
        return rule

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def count_requests(self, method: str = "*", path_regex: str = ".*") -> int:
        rx = re.compile(path_regex)
        return sum(1 for r in self.requests if method in ("*", r.method) and rx.search(r.path))

    @property
    def errors(self) -> list[str]:
        """Tracebacks of exceptions raised inside the server (bugs of this module, not client errors)."""
        with self._lock:
            return list(self._errors)

    def reset(self) -> None:
        """Forget all repos, LFS objects, failure rules and recorded requests."""
        with self._lock:
            self._repos.clear()
            self._lfs.clear()
            self._failures.clear()
            self._requests.clear()

    def head(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> str:
        """Commit sha of ``revision``."""
        with self._lock:
            return self._resolve(self._repos[(repo_type, repo_id)], revision).oid

    def repo_files(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """Content of every file of ``revision`` (LFS files resolved)."""
        with self._lock:
            commit = self._resolve(self._repos[(repo_type, repo_id)], revision)
            return {path: self._blob_bytes(blob) for path, blob in commit.files.items()}

    def commit_titles(self, repo_id: str, *, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Titles of the commits reachable from ``revision``, newest first."""
        with self._lock:
            return [c.title for c in self._history(self._repos[(repo_type, repo_id)], revision)]

    # ---- internals used by the handler ----------------------------------------------------------------------------

    def _track_connection(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(conn)

    def _take_failure(self, method: str, path: str) -> FailureRule | None:
        with self._lock:
            for rule in self._failures:
                if rule.matches(method, path):
                    rule.hits += 1
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._failures.remove(rule)
                    return rule
        return None

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _record_error(self, error: str) -> None:
        with self._lock:
            self._errors.append(error)

    def _sign(self, purpose: str, oid: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{oid}".encode(), hashlib.sha256).hexdigest()

    def _blob_bytes(self, blob: _Blob) -> bytes:
        if blob.content is not None:
            return blob.content
        assert blob.lfs_oid is not None
        return self._lfs[blob.lfs_oid]

    # ---- auth -----------------------------------------------------------------------------------------------------

    def _user(self, req: _Request) -> str | None:
        """The authenticated user, ``None`` when anonymous; 401 on a wrong token (on any route, like the Hub)."""
        auth = req.headers.get("authorization")
        if auth is None:
            return None
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            return self.username
        message = "Invalid credentials in Authorization header"
        raise HubError(401, message, headers={"X-Error-Message": message})

    def _require_user(self, req: _Request) -> str:
        user = self._user(req)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return user

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and namespace in (self.username, *self.orgs)

    def _repo_for_read(self, req: _Request, repo_type: str, repo_id: str) -> tuple[_Repo, str | None]:
        user = self._user(req)
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._can_write(user, repo.namespace)):
            raise _repo_not_found(user)
        return repo, user

    def _repo_for_write(self, req: _Request, repo_type: str, repo_id: str) -> tuple[_Repo, str]:
        user = self._require_user(req)
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._can_write(user, repo.namespace)):
            raise _repo_not_found(user)
        if not self._can_write(user, repo.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo.url_path}")
        return repo, user

    # ---- git-ish helpers ------------------------------------------------------------------------------------------

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        rev = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        if rev in repo.tags:
            return repo.commits[repo.tags[rev]]
        if (m := _PR_REF_RE.match(revision)) and int(m.group(1)) in repo.pull_requests:
            return repo.commits[repo.pull_requests[int(m.group(1))]]
        if _HEX40_RE.match(rev) and rev in repo.commits:
            return repo.commits[rev]
        if _SHORT_SHA_RE.match(rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(matches) == 1:
                return repo.commits[matches[0]]
        raise _revision_not_found(revision)

    def _history(self, repo: _Repo, revision: str) -> list[_Commit]:
        commit: _Commit | None = self._resolve(repo, revision)
        history = []
        while commit is not None:
            history.append(commit)
            commit = repo.commits[commit.parent] if commit.parent else None
        return history

    def _new_commit(
        self, repo: _Repo, parent: _Commit | None, files: dict[str, _Blob], title: str, message: str, author: str
    ) -> _Commit:
        tree = hashlib.sha1("\n".join(f"{p}\0{b.blob_id}" for p, b in sorted(files.items())).encode()).hexdigest()
        raw = f"tree {tree}\nparent {parent.oid if parent else ''}\nauthor {author} {next(_seq)}\n\n{title}\n{message}"
        commit = _Commit(
            oid=hashlib.sha1(raw.encode()).hexdigest(),
            parent=parent.oid if parent else None,
            title=title,
            message=message,
            author=author,
            date=_now(),
            files=files,
        )
        repo.commits[commit.oid] = commit
        return commit

    def _is_lfs_path(self, commit: _Commit, path: str) -> bool:
        gitattributes = commit.files.get(".gitattributes")
        text = self._blob_bytes(gitattributes).decode(errors="replace") if gitattributes else ""
        return any(rx.match(path) for rx in _gitattributes_lfs_patterns(text))

    def _last_commit(self, repo: _Repo, commit: _Commit, path: str) -> _Commit:
        """Last commit of the history of ``commit`` that changed ``path`` (a file or a folder)."""

        def state(c: _Commit) -> list[tuple[str, str]]:
            return sorted((p, b.blob_id) for p, b in c.files.items() if p == path or p.startswith(path + "/"))

        current = commit
        while current.parent is not None:
            parent = repo.commits[current.parent]
            if state(parent) != state(current):
                break
            current = parent
        return current

    def _file_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        blob = commit.files[path]
        entry: dict[str, Any] = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": path}
        if blob.lfs_oid is not None:
            entry["lfs"] = {"oid": blob.lfs_oid, "size": blob.size, "pointerSize": blob.pointer_size}
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    def _folder_entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        content = sorted(f"{p}\0{b.blob_id}" for p, b in commit.files.items() if p.startswith(path + "/"))
        entry: dict[str, Any] = {
            "type": "directory",
            "oid": hashlib.sha1("\n".join(content).encode()).hexdigest(),
            "size": 0,
            "path": path,
        }
        if expand:
            last = self._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    @staticmethod
    def _folders(commit: _Commit) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in commit.files for i in range(1, p.count("/") + 1)}

    # ---- routing --------------------------------------------------------------------------------------------------

    def _dispatch(self, req: _Request) -> _Response:
        method, path = req.method, req.path
        with self._lock:
            if path == "/api/whoami-v2" and method == "GET":
                return self._whoami(req)
            if path == "/api/repos/create" and method == "POST":
                return self._create_repo(req)
            if path == "/api/repos/delete" and method == "DELETE":
                return self._delete_repo(req)
            if path == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml(req)
            if path == "/api/agent-harnesses" and method == "GET":
                return _Response.json({"standardEnvVars": [], "harnesses": {}})
            if m := _API_REPO_RE.match(path):
                repo_type = _REPO_TYPES[m.group(1)]
                repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
                return self._repo_api(req, repo_type, repo_id, m.group(4) or "")
            if (m := _LFS_RE.match(path)) and method == "POST":
                repo_type = _REPO_TYPES.get(m.group(1) or "models", "model")
                repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
                if m.group(4) == "batch":
                    return self._lfs_batch(req, repo_type, repo_id)
                return self._lfs_verify(req, repo_type, repo_id)
            if (m := _RESOLVE_RE.match(path)) and method in ("GET", "HEAD"):
                repo_type = _REPO_TYPES.get(m.group(1) or "models", "model")
                repo_id = f"{unquote(m.group(2))}/{unquote(m.group(3))}"
                return self._resolve_file(req, repo_type, repo_id, unquote(m.group(4)), unquote(m.group(5)))
        # Routes on LFS content: no lock while hashing large bodies.
        if (m := _LFS_UPLOAD_RE.match(path)) and method == "PUT":
            return self._lfs_upload(req, m.group(1))
        if (m := _CDN_RE.match(path)) and method in ("GET", "HEAD"):
            return self._cdn_download(req, m.group(1))
        raise HubError(404, f"Sorry, we can't find the page you are looking for ({method} {path}).")

    def _repo_api(self, req: _Request, repo_type: str, repo_id: str, rest: str) -> _Response:
        segments = rest.split("/") if rest else []
        action = segments[0] if segments else ""
        arg = unquote(segments[1]) if len(segments) > 1 else None
        method = req.method
        if method == "GET" and action == "":
            return self._repo_info(req, repo_type, repo_id, None)
        if method == "GET" and action == "revision" and arg is not None:
            return self._repo_info(req, repo_type, repo_id, arg)
        if method == "GET" and action == "tree" and arg is not None:
            return self._tree(req, repo_type, repo_id, arg, unquote("/".join(segments[2:])))
        if method == "POST" and action == "paths-info" and arg is not None:
            return self._paths_info(req, repo_type, repo_id, arg)
        if method == "GET" and action == "refs":
            return self._refs(req, repo_type, repo_id)
        if method == "GET" and action == "commits" and arg is not None:
            return self._commits(req, repo_type, repo_id, arg)
        if method == "POST" and action == "preupload" and arg is not None:
            return self._preupload(req, repo_type, repo_id, arg)
        if method == "POST" and action == "commit" and arg is not None:
            return self._commit(req, repo_type, repo_id, arg)
        if method in ("POST", "DELETE") and action == "branch" and arg is not None:
            return self._branch(req, repo_type, repo_id, arg)
        if method in ("POST", "DELETE") and action == "tag" and arg is not None:
            return self._tag(req, repo_type, repo_id, arg)
        if method == "PUT" and action == "settings":
            return self._settings(req, repo_type, repo_id)
        raise HubError(404, f"Sorry, we can't find the page you are looking for ({method} {req.path}).")

    # ---- account / repos ------------------------------------------------------------------------------------------

    def _whoami(self, req: _Request) -> _Response:
        user = self._require_user(req)
        return _Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": "Test User",
                "email": f"{user}@example.com",
                "emailVerified": True,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in self.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    def _create_repo(self, req: _Request) -> _Response:
        user = self._require_user(req)
        payload = req.json()
        name = payload.get("name")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        if not isinstance(name, str) or not _NAME_RE.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        if not self._can_write(user, namespace):
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        repo_id = f"{namespace}/{name}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            return _Response.json(
                {"error": f"You already created this {repo_type} repo", "url": f"{req.base_url}/{existing.url_path}"},
                status=409,
            )
        if repo_type == "space" and not payload.get("sdk"):
            raise HubError(400, "sdk is required for Spaces")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = _Repo(repo_type, repo_id, private, _now(), secrets.token_hex(12), sdk=payload.get("sdk"))
        initial = self._new_commit(
            repo, None, {".gitattributes": _Blob.regular(DEFAULT_GITATTRIBUTES.encode())}, "initial commit", "", user
        )
        repo.branches["main"] = initial.oid
        self._repos[(repo_type, repo_id)] = repo
        return _Response.json({"url": f"{req.base_url}/{repo.url_path}", "name": repo_id, "id": repo.internal_id})

    def _delete_repo(self, req: _Request) -> _Response:
        payload = req.json()
        namespace = payload.get("organization") or self._require_user(req)
        repo_type = payload.get("type") or "model"
        repo, _ = self._repo_for_write(req, repo_type, f"{namespace}/{payload.get('name')}")
        del self._repos[(repo.repo_type, repo.repo_id)]
        return _Response()

    def _settings(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo, _ = self._repo_for_write(req, repo_type, repo_id)
        payload = req.json()
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        return _Response.json({})

    def _validate_yaml(self, req: _Request) -> _Response:
        content = str(req.json().get("content", ""))
        match = re.match(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", content, flags=re.S)
        if match:
            try:
                import yaml

                metadata = yaml.safe_load(match.group(1))
            except ImportError:
                metadata = {}
            except Exception as e:  # yaml.YAMLError
                return _Response.json({"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []}, status=400)
            if metadata is not None and not isinstance(metadata, dict):
                return _Response.json({"errors": [{"message": "Metadata must be a mapping"}], "warnings": []}, 400)
        return _Response.json({"errors": [], "warnings": []})

    # ---- read API -------------------------------------------------------------------------------------------------

    def _repo_info(self, req: _Request, repo_type: str, repo_id: str, revision: str | None) -> _Response:
        repo, _ = self._repo_for_read(req, repo_type, repo_id)
        commit = self._resolve(repo, revision or "main")
        with_blobs = req.flag("blobs")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=blob.size, blobId=blob.blob_id)
                if blob.lfs_oid is not None:
                    sibling["lfs"] = {"size": blob.size, "sha256": blob.lfs_oid, "pointerSize": blob.pointer_size}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": repo.internal_id,
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(blob.size for blob in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo_type == "space":
            info["sdk"] = repo.sdk
        return _Response.json(info)

    def _tree(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo, _ = self._repo_for_read(req, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        recursive, expand = req.flag("recursive"), req.flag("expand")
        path = path.strip("/")
        folders = self._folders(commit)
        if path and path not in folders:
            raise _entry_not_found(path, commit.oid)
        prefix = f"{path}/" if path else ""

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

        entries = [self._folder_entry(repo, commit, p, expand) for p in sorted(folders) if wanted(p)]
        entries += [self._file_entry(repo, commit, p, expand) for p in sorted(commit.files) if wanted(p)]
        return _Response.json(entries)

    def _paths_info(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo, _ = self._repo_for_read(req, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        if req.headers.get("content-type", "").startswith("application/json"):
            payload = req.json()
            paths, expand = list(payload.get("paths", [])), bool(payload.get("expand"))
        else:
            form = parse_qs(req.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[-1].lower() == "true"
        folders = self._folders(commit)
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                entries.append(self._file_entry(repo, commit, path, expand))
            elif path in folders:
                entries.append(self._folder_entry(repo, commit, path, expand))
        return _Response.json(entries)

    def _refs(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo, _ = self._repo_for_read(req, repo_type, repo_id)

        def ref(name: str, full: str, oid: str) -> dict[str, str]:
            return {"name": name, "ref": full, "targetCommit": oid}

        data: dict[str, Any] = {
            "branches": [ref(b, f"refs/heads/{b}", oid) for b, oid in sorted(repo.branches.items())],
            "converts": [],
            "tags": [ref(t, f"refs/tags/{t}", oid) for t, oid in sorted(repo.tags.items())],
        }
        if req.flag("include_prs"):
            data["pullRequests"] = [
                ref(f"refs/pr/{n}", f"refs/pr/{n}", oid) for n, oid in sorted(repo.pull_requests.items())
            ]
        return _Response.json(data)

    def _commits(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo, _ = self._repo_for_read(req, repo_type, repo_id)
        return _Response.json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": ""}],
                    "date": c.date,
                }
                for c in self._history(repo, revision)
            ]
        )

    def _resolve_file(self, req: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo, _ = self._repo_for_read(req, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _entry_not_found(path, commit.oid)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.blob_id}"', "Accept-Ranges": "bytes"}
        if blob.lfs_oid is None:
            assert blob.content is not None
            content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
            return self._ranged(req, blob.content, {**headers, "Content-Type": content_type})
        headers.update({"X-Linked-Etag": f'"{blob.lfs_oid}"', "X-Linked-Size": str(blob.size)})
        if self.cdn_host is None:
            return self._ranged(req, self._lfs[blob.lfs_oid], {**headers, "Content-Type": "application/octet-stream"})
        filename = quote(path.rsplit("/", 1)[-1])
        location = (
            f"http://{self.cdn_host}:{self._port}/__cdn/{blob.lfs_oid}"
            f"?filename={filename}&X-Signature={self._sign('download', blob.lfs_oid)}"
        )
        return _Response(302, b"", {**headers, "Location": location})

    def _ranged(self, req: _Request, content: bytes, headers: dict[str, str]) -> _Response:
        range_header = req.headers.get("range")
        if not range_header or req.method == "HEAD":
            return _Response(200, content, headers)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
        total = len(content)
        if m is None or (m.group(1) == "" and m.group(2) == ""):
            return _Response(416, b"", {**headers, "Content-Range": f"bytes */{total}"})
        if m.group(1) == "":  # suffix range: last N bytes
            start, end = max(total - int(m.group(2)), 0), total - 1
        else:
            start = int(m.group(1))
            end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
        if start >= total or start > end:
            return _Response(416, b"", {**headers, "Content-Range": f"bytes */{total}"})
        return _Response(206, content[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{total}"})

    # ---- upload API -----------------------------------------------------------------------------------------------

    def _target_ref(self, repo: _Repo, revision: str) -> tuple[str, str | int]:
        """The ref a commit on ``revision`` moves: a branch or a PR."""
        rev = revision.removeprefix("refs/heads/")
        if rev in repo.branches:
            return "branch", rev
        if (m := _PR_REF_RE.match(revision)) and int(m.group(1)) in repo.pull_requests:
            return "pr", int(m.group(1))
        raise _revision_not_found(revision)

    def _preupload(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo, _ = self._repo_for_write(req, repo_type, repo_id)
        commit = self._resolve(repo, revision)
        payload = req.json()
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in commit.files:
            gitignore = self._blob_bytes(commit.files[".gitignore"]).decode(errors="replace")
        files = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            try:
                sample = base64.b64decode(item.get("sample", ""), validate=True)
            except (binascii.Error, ValueError) as e:
                raise HubError(400, f"Invalid sample for {path}: {e}") from e
            is_lfs = size > REGULAR_FILE_MAX_SIZE or b"\0" in sample or self._is_lfs_path(commit, path)
            info: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if is_lfs else "regular",
                "shouldIgnore": bool(gitignore) and _gitignore_matches(gitignore, path),
            }
            if path in commit.files:
                info["oid"] = commit.files[path].oid_for_preupload
            files.append(info)
        return _Response.json({"files": files, "commitOid": commit.oid})

    def _commit(self, req: _Request, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo, user = self._repo_for_write(req, repo_type, repo_id)
        create_pr = req.flag("create_pr")
        kind, ref = self._target_ref(repo, revision)
        base = self._resolve(repo, revision)
        try:
            lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        except ValueError as e:
            raise HubError(400, f"Invalid NDJSON payload: {e}") from e
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of the payload must be the commit header")
        header = lines[0].get("value", {})
        title = str(header.get("summary") or "").strip()
        if not title:
            raise HubError(400, "Commit summary is required")
        parent_commit = header.get("parentCommit")
        if parent_commit is not None and parent_commit != base.oid:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = str(value.get("path", "")).strip("/")
            if not path or ".." in path.split("/"):
                raise HubError(400, f"Invalid path: {value.get('path')!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
                content = base64.b64decode(value.get("content", ""))
                if len(content) > REGULAR_FILE_MAX_SIZE:
                    raise HubError(400, f"Your push was rejected: {path} is larger than 10 MiB, use LFS.")
                files[path] = _Blob.regular(content)
            elif key == "lfsFile":
                oid = value.get("oid")
                stored = self._lfs.get(oid) if isinstance(oid, str) else None
                if stored is None or ("size" in value and int(value["size"]) != len(stored)):
                    raise HubError(
                        422,
                        "Your push was rejected because an LFS pointer pointed to a file that does not exist."
                        f" Offending file: {path}",
                    )
                files[path] = _Blob.lfs(oid, len(stored))
            elif key == "deletedFile":
                if path not in files:
                    raise _entry_not_found(f"A file with this name doesn't exist: {path}")
                del files[path]
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise _entry_not_found(f"A folder with this name doesn't exist: {path}")
                for p in doomed:
                    del files[p]
            else:
                raise HubError(400, f"Unknown operation: {key!r}")
        commit = self._new_commit(repo, base, files, title, str(header.get("description") or ""), user)
        response: dict[str, Any] = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{req.base_url}/{repo.url_path}/commit/{commit.oid}",
            "hookOutput": "",
        }
        if create_pr:
            number = max(repo.pull_requests, default=0) + 1
            repo.pull_requests[number] = commit.oid
            response["pullRequestUrl"] = f"{req.base_url}/{repo.url_path}/discussions/{number}"
        elif kind == "branch":
            repo.branches[str(ref)] = commit.oid
        else:
            repo.pull_requests[int(ref)] = commit.oid
        return _Response.json(response)

    def _branch(self, req: _Request, repo_type: str, repo_id: str, branch: str) -> _Response:
        repo, _ = self._repo_for_write(req, repo_type, repo_id)
        if req.method == "DELETE":
            if branch not in repo.branches:
                raise _revision_not_found(branch)
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
            return _Response.json({})
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        if not branch or branch.startswith("refs/") or branch in repo.tags:
            raise HubError(400, f"Invalid branch name: {branch}")
        starting_point = req.json().get("startingPoint") or "main"
        repo.branches[branch] = self._resolve(repo, starting_point).oid
        return _Response.json({})

    def _tag(self, req: _Request, repo_type: str, repo_id: str, arg: str) -> _Response:
        repo, _ = self._repo_for_write(req, repo_type, repo_id)
        if req.method == "DELETE":
            if arg not in repo.tags:
                raise _revision_not_found(arg)
            del repo.tags[arg]
            return _Response.json({})
        tag = str(req.json().get("tag") or "")
        if not tag:
            raise HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise HubError(409, "Tag already exists")
        repo.tags[tag] = self._resolve(repo, arg).oid
        return _Response.json({})

    # ---- Git LFS --------------------------------------------------------------------------------------------------

    def _lfs_batch(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        repo, _ = self._repo_for_write(req, repo_type, repo_id)
        payload = req.json()
        if payload.get("operation") != "upload":
            raise HubError(422, "Only the 'upload' operation is supported by this test server")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(422, "Only the 'basic' transfer is supported by this test server")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _OID_RE.match(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "Invalid object"}
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else -1, "error": error})
                continue
            stored = self._lfs.get(oid)
            if stored is not None and len(stored) == size:
                objects.append({"oid": oid, "size": size, "authenticated": True})  # already present: no actions
                continue
            signature = self._sign(f"upload:{size}", oid)
            upload_href = f"{req.base_url}/__lfs/upload/{oid}?size={size}&X-Signature={signature}"
            verify_href = f"{req.base_url}/{repo.url_path}.git/info/lfs/objects/verify"
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {"upload": {"href": upload_href, "expires_in": 3600}, "verify": {"href": verify_href}},
                }
            )
        return _Response.json(
            {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_upload(self, req: _Request, oid: str) -> _Response:
        size = req.query.get("size", [""])[-1]
        signature = req.query.get("X-Signature", [""])[-1]
        if not size.isdigit() or not hmac.compare_digest(signature, self._sign(f"upload:{size}", oid)):
            raise HubError(403, "Invalid or expired upload signature")
        if len(req.body) != int(size):
            raise HubError(400, f"Size mismatch: expected {size} bytes, got {len(req.body)}")
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch between the uploaded content and the object id")
        with self._lock:
            self._lfs[oid] = req.body
        return _Response(200, b"", {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'})

    def _lfs_verify(self, req: _Request, repo_type: str, repo_id: str) -> _Response:
        self._repo_for_write(req, repo_type, repo_id)
        payload = req.json()
        stored = self._lfs.get(str(payload.get("oid")))
        if stored is None or len(stored) != payload.get("size"):
            raise HubError(404, f"Object {payload.get('oid')} not found")
        return _Response.json({"success": True})

    def _cdn_download(self, req: _Request, oid: str) -> _Response:
        signature = req.query.get("X-Signature", [""])[-1]
        if not hmac.compare_digest(signature, self._sign("download", oid)):
            return _Response(403, b"<Error><Code>AccessDenied</Code></Error>", {"Content-Type": "application/xml"})
        with self._lock:
            content = self._lfs.get(oid)
        if content is None:
            return _Response(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"})
        filename = req.query.get("filename", ["file"])[-1]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{oid}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename)}; filename=\"{filename}\";",
        }
        return self._ranged(req, content, headers)


# --------------------------------------------------------------------------------------------------------------------
# pytest fixture helper: point the already-imported client libraries at the server
# --------------------------------------------------------------------------------------------------------------------


class _FastSleepTime:
    """Stand-in for the `time` module of the client's retry loops: same API, sleeps capped at `max_sleep`."""

    def __init__(self, max_sleep: float) -> None:
        self._max_sleep = max_sleep

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._max_sleep))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _reset_client_caches() -> None:
    """Drop client-side state bound to a previous endpoint (pooled connections, cached `HfApi`/fs instances)."""
    if (http := sys.modules.get("huggingface_hub.utils._http")) is not None:
        http.close_session()
    if (transformers_hub := sys.modules.get("transformers.utils.hub")) is not None:
        transformers_hub._hf_api = None  # lazily rebuilt with `constants.ENDPOINT`
    if (hf_file_system := sys.modules.get("huggingface_hub.hf_file_system")) is not None:
        hf_file_system.HfFileSystem.clear_instance_cache()


def serve_hub(
    monkeypatch: pytest.MonkeyPatch,
    hf_home: Path,
    *,
    fast_retries: bool = True,
    etag_timeout: int = 5,
    download_timeout: int = 5,
    **server_kwargs: Any,
) -> Iterator[HubServer]:
    """Start a :class:`HubServer` and point ``huggingface_hub`` / ``transformers`` (/ ``datasets``) at it.

    Sets the environment (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_OFFLINE=0``, a fresh
    ``HF_HOME`` / ``HF_HUB_CACHE`` under ``hf_home``, low ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT``) *and*
    the module-level copies that ``huggingface_hub`` took of them at import time. With ``fast_retries``, the
    client's retry loops (``http_backoff``: up to 5 retries, 1-8 s apart; ``http_get``: 1 s) sleep at most 20 ms.
    Yields the running server; stops it and undoes every patch afterwards (via ``monkeypatch``).
    """
    import huggingface_hub.file_download as file_download
    import huggingface_hub.hf_api as hf_api
    from huggingface_hub import constants
    from huggingface_hub.utils import _detect_agent, _http

    server = HubServer(**server_kwargs).start()
    endpoint = server.url
    hf_home = Path(hf_home)
    hub_cache = hf_home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    server.hf_home, server.hub_cache = hf_home, hub_cache

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": server.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        "HF_HUB_ETAG_TIMEOUT": str(etag_timeout),
        "HF_HUB_DOWNLOAD_TIMEOUT": str(download_timeout),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING",
        "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_DEBUG",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)

    # `huggingface_hub.constants` is evaluated once, at import time: patch the values, not only the env.
    constant_values: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {server.host},
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "HF_DEBUG": False,
        "HF_HUB_ETAG_TIMEOUT": etag_timeout,
        "HF_HUB_DOWNLOAD_TIMEOUT": download_timeout,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HUGGINGFACE_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": env["HF_TOKEN_PATH"],
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(hf_home / ".check_for_skill_update_done"),
    }
    for name, value in constant_values.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    # Other copies taken at import time.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # the `HfApi()` behind `huggingface_hub.create_repo` & co
    monkeypatch.setattr(hf_api.api, "_whoami_cache", {})
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(endpoint)})
    # User-agent building fetches `/api/agent-harnesses` once per process: pin it so that no request is spent on it.
    monkeypatch.setattr(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    module_copies = {
        "huggingface_hub.utils._cache_manager": {"HF_HUB_CACHE": str(hub_cache)},
        "huggingface_hub.utils._cache_assets": {"HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"]},
        "huggingface_hub.utils._git_credential": {"ENDPOINT": endpoint},
        "huggingface_hub.cli.auth": {"ENDPOINT": endpoint},
        "transformers.utils.hub": {"HF_MODULES_CACHE": env["HF_MODULES_CACHE"]},
        "datasets.config": {
            "HF_ENDPOINT": endpoint,
            "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
            "HF_HUB_OFFLINE": False,
            "HF_DATASETS_OFFLINE": False,
        },
        "evaluate.config": {
            "HF_ENDPOINT": endpoint,
            "HF_LIST_ENDPOINT": endpoint + "/api/spaces?filter={type}",
            "HUB_EVALUATE_URL": endpoint + "/spaces/{path}/resolve/{revision}/{name}",
        },
    }
    for module_name, values in module_copies.items():
        if (module := sys.modules.get(module_name)) is not None:
            for name, value in values.items():
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, value)

    if fast_retries:
        monkeypatch.setattr(_http, "time", _FastSleepTime(0.02))
        monkeypatch.setattr(file_download, "time", _FastSleepTime(0.02))

    _reset_client_caches()
    try:
        yield server
    finally:
        server.stop()
        _reset_client_caches()
