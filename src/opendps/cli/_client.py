"""Synchronous client of the management REST API (docs/api.md) for the az-style CLI verbs.

Resolving *which* server and key to use is kept separate (and pure) so it can be tested without a
server; the client itself is one generic ``request`` that turns every failure into a one-line CliError.
"""

from __future__ import annotations

import base64
import json
import math
import os
import ssl
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from opendps.cli import CliError, note_answer
from opendps.transport import sas

API_VERSION = "2025-07-01-preview"
CONNECTION_ENV = "OPENDPS_CONNECTION_STRING"
CA_FILE_ENV = "OPENDPS_CA_FILE"
DATA_DIR_ENV = "OPENDPS_DATA_DIR"
DEFAULT_DATA_DIR = ".opendps"
TOKEN_TTL = 3600
EXPECTED_FORMAT = "HostName=...;SharedAccessKeyName=...;SharedAccessKey=..."
NO_CONNECTION = ("no connection: pass --login, set OPENDPS_CONNECTION_STRING, or run in a directory with an "
                 "opendps data directory (--data-dir)")


def loads_json(text: str) -> Any:
    """``json.loads`` for JSON given on the command line. NaN, Infinity and numbers past a double (``1e999``) are not
    JSON (RFC 8259) and could not be sent; an integer of thousands of digits is refused by Python, and so is nesting
    deeper than its recursion limit: each is a :class:`json.JSONDecodeError` here, so the verb says so in its one
    line (it was a traceback)."""
    def refuse(token: str) -> Any:
        raise json.JSONDecodeError(f"{token} is not a JSON number", text, max(0, text.find(token)))

    def finite(token: str) -> float:
        value = float(token)
        return refuse(token) if math.isinf(value) else value

    try:
        return json.loads(text, parse_constant=refuse, parse_float=finite)
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits)"
        raise json.JSONDecodeError(str(exc), text, 0) from exc
    except RecursionError as exc:  # thousands of nested [ or {: Python's decoder recurses once per level
        raise json.JSONDecodeError("nested too deeply", text, 0) from exc


@dataclass(frozen=True)
class Connection:
    """Where the service is and how to sign requests; ``repr`` omits the key so it never leaks."""

    host: str
    key_name: str
    key: str = field(repr=False)
    ca_file: Path | None = None  # None: the system trust store
    source: str = ""

    @property
    def base_url(self) -> str:
        return f"https://{self.host}"

    @property
    def connection_string(self) -> str:
        return sas.connection_string(self.host, self.key_name, self.key)


def parse_login(value: str) -> tuple[str, str, str]:
    """(HostName, SharedAccessKeyName, SharedAccessKey); errors never echo the (secret) input."""
    try:
        parts = sas.parse_connection_string(value)
    except ValueError as exc:
        detail = str(exc) if "lacks" in str(exc) else "malformed connection string"
        raise CliError(f"{detail} (expected {EXPECTED_FORMAT})") from exc
    host = parts["HostName"].strip().rstrip("/")
    if host.lower().startswith(("https://", "http://")):
        host = host.split("://", 1)[1]
    if not host or not parts["SharedAccessKeyName"] or not parts["SharedAccessKey"]:
        raise CliError("connection string has an empty HostName, SharedAccessKeyName or SharedAccessKey")
    try:
        base64.b64decode(parts["SharedAccessKey"], validate=True)
    except ValueError as exc:
        raise CliError("connection string SharedAccessKey is not valid base64") from exc
    return host, parts["SharedAccessKeyName"], parts["SharedAccessKey"]


def load_local_connection(data_dir: Path) -> tuple[str, Path] | None:
    """(owner connection string, server CA path) of the installation in ``data_dir``, or None if absent."""
    if not data_dir.is_dir():
        return None
    from opendps.errors import ConfigurationError
    from opendps.instance import Settings, open_instance

    try:
        inst = open_instance(Settings.load(data_dir), create=False, migrate=False)
    except ConfigurationError as exc:
        raise CliError(f"cannot use data directory {data_dir}: {exc}") from exc
    try:
        return inst.owner_connection_string(), inst.server_ca_path
    except KeyError as exc:
        raise CliError(f"data directory {data_dir} has no owner access policy: run 'opendps init'") from exc
    finally:
        inst.close()


def resolve_connection(login: str | None = None, data_dir: Path | None = None, ca_file: Path | None = None,
                       *, env: Mapping[str, str] | None = None,
                       load_local: Callable[[Path], tuple[str, Path] | None] = load_local_connection,
                       ) -> Connection:
    """--login, else $OPENDPS_CONNECTION_STRING, else the local data directory; trust likewise (see docs)."""
    env = os.environ if env is None else env
    directory = Path(data_dir or env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    local_ca: Path | None = None
    if login is not None and not login.strip():  # e.g. --login "$UNSET": the local owner key is not what was meant
        raise CliError("--login is empty: give a connection string (HostName=...;SharedAccessKeyName=...;"
                       "SharedAccessKey=...) or leave the option out")
    if login:
        value, source = login, "--login"
    elif env.get(CONNECTION_ENV):
        value, source = env[CONNECTION_ENV], CONNECTION_ENV
    else:
        found = load_local(directory)
        if found is None:
            raise CliError(NO_CONNECTION)
        value, local_ca = found
        source = f"data directory {directory}"
    host, key_name, key = parse_login(value)
    return Connection(host, key_name, key, ca_file=resolve_trust(ca_file, directory, local_ca, env),
                      source=source)


def resolve_trust(ca_file: Path | None, data_dir: Path, local_ca: Path | None,
                  env: Mapping[str, str]) -> Path | None:
    """CA bundle to verify the server with: --ca-file, $OPENDPS_CA_FILE, the data directory's, or None."""
    explicit = ca_file or env.get(CA_FILE_ENV)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CliError(f"CA file {path} {'is not a file' if path.exists() else 'does not exist'}")
        return path
    for candidate in (local_ca, data_dir / "tls" / "server-ca.pem"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def if_match_value(etag: str | None) -> str | None:
    """Header value for an --etag: quoted per RFC 9110 unless ``*`` or already quoted (server takes both)."""
    if etag is None:
        return None
    etag = etag.strip()
    if not etag:
        raise CliError("--etag must not be empty")
    if not etag.isascii() or not etag.isprintable():
        raise CliError(f"--etag {etag!r} is not an ETag: ETags are printable ASCII, as the service returns them")
    if etag == "*" or etag.startswith(('"', 'W/"')):
        return etag
    return f'"{etag}"'


def format_error(status: int, content: bytes, error_code_header: str | None = None) -> str:
    """One line from an Azure error body: ``message (HTTP 412, code 412001)``; tolerates non-JSON bodies."""
    message = ""
    code: Any = error_code_header
    try:
        body = json.loads(content) if content else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("message"), str):
            message = body["message"]
        code = body.get("errorCode") or code
    if not message:
        text = content.decode("utf-8", "replace").strip() if content and body is None else ""
        message = text[:200] or httpx.codes.get_reason_phrase(status) or "request failed"
    message = " ".join(message.split())
    return f"{message} (HTTP {status}, code {code})" if code else f"{message} (HTTP {status})"


MAX_FILE_BYTES = 1024 * 1024  # the service takes no request body larger than this (frontends/http/app.py MAX_BODY)


def read_limited(path: str | Path, what: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a file to send, refused past ``limit``: the service could not take more, and a device file such as
    /dev/zero (or a multi-GB file named by mistake) was read until memory ran out."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CliError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise CliError(f"{what} {path} is larger than {limit // 1024} KB: the service takes no more")
    return data


def read_certificate_file(path: str | Path) -> str:
    """The --path file as the API wants it: PEM text as is, anything else (DER) base64-encoded."""
    data = read_limited(path, "certificate file")
    if not data.strip():
        raise CliError(f"certificate file {path} is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text.lstrip("\ufeff").lstrip().startswith("-----BEGIN"):
        return text.lstrip("\ufeff")
    return base64.b64encode(data).decode("ascii")


def api_path(*segments: str) -> str:
    """``/a/b`` with each user-supplied segment percent-encoded (a name can never change the route).

    An empty segment would drop a level (``/namespaces/`` lists them all, so ``show --name ''`` printed the list and
    exited 0): it is refused. ``.`` and ``..`` are sent as ``%2E``, else the URL's dot segments would be removed
    (``policies/..`` is the credential) and the server could not judge them as names."""
    encoded = ["/" + (s.replace(".", "%2E") if s in (".", "..") else quote(s, safe="")) for s in segments]
    if "" in segments:
        raise CliError(f"a name or id must not be empty (in {''.join(encoded[:segments.index('')])}/...)")
    return "".join(encoded)


class ApiError(CliError):
    """A non-2xx answer; ``status`` lets callers treat e.g. 404 as "absent"."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """One SAS-signed httpx client per command invocation."""

    def __init__(self, connection: Connection, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.connection = connection
        self._timeout = timeout
        self._transport = transport
        self._http: httpx.Client | None = None

    def _client(self) -> httpx.Client:
        if self._http is None:
            conn = self.connection
            try:
                token = sas.generate(conn.host, conn.key, key_name=conn.key_name, ttl=TOKEN_TTL)
            except sas.SasError as exc:
                raise CliError(str(exc)) from exc
            verify: ssl.SSLContext | bool = True
            if self._transport is None and conn.ca_file is not None:
                try:
                    verify = ssl.create_default_context(cafile=str(conn.ca_file))
                except (OSError, ssl.SSLError) as exc:
                    raise CliError(f"cannot load CA file {conn.ca_file}: {exc}") from exc
            self._http = httpx.Client(base_url=conn.base_url, verify=verify, timeout=self._timeout,
                                      transport=self._transport, params={"api-version": API_VERSION},
                                      headers={"Authorization": token, "Accept": "application/json"})
        return self._http

    def request(self, method: str, path: str, json: Any = None, if_match: str | None = None) -> Any:
        """Send one request; return the decoded JSON body (None when empty) or raise CliError."""
        return self.exchange(method, path, json=json, if_match=if_match)[0]

    def exchange(self, method: str, path: str, json: Any = None, if_match: str | None = None,
                 headers: Mapping[str, str] | None = None, *, params: Mapping[str, str] | None = None,
                 content: bytes | None = None, timeout: float | None = None) -> tuple[Any, httpx.Headers]:
        """Like :meth:`request`, with extra request headers and the response headers returned too.

        Azure's query paging travels in headers (``x-ms-max-item-count``, ``x-ms-continuation``); the hub
        API also takes query parameters (``?hub=``), raw bodies (C2D messages) and long waits (methods).
        """
        http = self._client()
        sent = self._headers(headers, if_match)
        url = self.connection.base_url + path
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            resp = http.request(method, path, json=json, content=content, headers=sent, params=params, **extra)
        except httpx.TransportError as exc:
            raise _unreachable(url, exc) from exc
        if not resp.is_success:
            raise _api_error(resp)
        note_answer(f"{method} {url}")
        if not resp.content.strip():
            return None, resp.headers
        try:
            return resp.json(), resp.headers
        except ValueError as exc:
            raise CliError(f"{method} {url} answered with a non-JSON body (HTTP {resp.status_code})") from exc

    @contextmanager
    def stream(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
               headers: Mapping[str, str] | None = None) -> Iterator[httpx.Response]:
        """A streamed answer (e.g. NDJSON telemetry) whose reads never time out: the stream may idle for long.

        Errors are raised, as by :meth:`request`, before the caller reads anything.
        """
        http = self._client()
        url = self.connection.base_url + path
        timeout = httpx.Timeout(self._timeout, read=None)
        try:
            with http.stream(method, path, params=params, headers=self._headers(headers, None),
                             timeout=timeout) as resp:
                if not resp.is_success:
                    resp.read()
                    raise _api_error(resp)
                note_answer(f"{method} {url}")
                yield resp
        except httpx.TransportError as exc:
            raise _unreachable(url, exc) from exc

    @staticmethod
    def _headers(headers: Mapping[str, str] | None, if_match: str | None) -> dict[str, str]:
        sent = dict(headers or {})
        if (value := if_match_value(if_match)) is not None:
            sent["If-Match"] = value
        return sent

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


def _unreachable(url: str, exc: httpx.TransportError) -> CliError:
    reason = str(exc) or type(exc).__name__
    hint = " (trust the server CA with --ca-file)" if "CERTIFICATE_VERIFY_FAILED" in reason else ""
    return CliError(f"cannot reach {url}: {reason}{hint}")


def _api_error(resp: httpx.Response) -> ApiError:
    return ApiError(resp.status_code, format_error(resp.status_code, resp.content, resp.headers.get("x-ms-error-code")))
