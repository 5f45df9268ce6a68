"""Logging: the text format (as before) or ``--log-format json`` (one object per line), request ids, and the one
filter that keeps secrets out of every line.

Front ends give each request (HTTPS) and each MQTT connection an id in :data:`REQUEST_ID`;
``frontends.runtime.DomainRunner`` runs domain code in a copy of the caller's context, so domain log lines made on
its threads carry the id of the request they serve. Log lines that tell of an outcome say which with
``extra=event("registration.assigned", registration_id=..., hub=...)``: ``event`` names it, the other fields are
from :data:`FIELDS` (stable names operators filter on); a JSON line holds them as members, a text line only its
message, as before.

Secrets never reach a line: nothing logs a key, token, PIN, password or connection string on purpose (nor do the
libraries: httpx's request lines, which name a webhook's whole URL, are off), and :func:`redact` removes what would
look like one anyway (a SAS ``sig=``, ``SharedAccessKey=``, a key or password member, a URL's password or query key,
a PEM private key) from every message and traceback, in both formats.

Imports only the standard library: any package may log events with :func:`event`.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

FORMATS = ("text", "json")
# the request (HTTPS) or MQTT connection being served: set by the front ends, read by the formatters
REQUEST_ID: ContextVar[str | None] = ContextVar("opendps_request_id", default=None)
# the event fields a JSON line may carry, besides time, level, logger, event, message, request_id (stable names)
FIELDS = ("registration_id", "device_id", "hub", "outcome", "reason", "serial", "policy", "enrollment_id", "transport",
          "attestation", "error_code", "auth", "count", "namespace", "operation_id", "worker", "pid")
_FIELD_SET = frozenset(FIELDS)
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,64}")

_SECRETS = [
    # a SAS token's signature (in a header, a URL query, a password): the rest of the token says nothing secret
    (re.compile(r"(?i)(\bsig=)[^&\s\"',;]+"), r"\1<redacted>"),
    # connection strings' keys and tokens
    (re.compile(r"(?i)(SharedAccessKey=)[^;\s\"',]+"), r"\1<redacted>"),
    (re.compile(r"(?i)(SharedAccessSignature=)[^;\s\"',]+"), r"\1<redacted>"),
    # key, password and PIN members of JSON bodies or key=value text
    (re.compile(r"(?i)([\"']?(?:primaryKey|secondaryKey|symmetricKey|password|passwd|pin|secret|apiKey|token)[\"']?"
                r"\s*[:=]\s*[\"']?)[^\"',;\s}&]+"), r"\1<redacted>"),
    # a URL query's key (an Azure Functions webhook's ?code=, an API key)
    (re.compile(r"(?i)([?&](?:code|key|api[-_]?key|access_token)=)[^&\s\"',;]+"), r"\1<redacted>"),
    # a URL's user:password@
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@/\s]+(@)"), r"\1<redacted>\2"),
    (re.compile(r"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|$)", re.S),
     r"<redacted private key>"),
]


# what every pattern above needs in the text (a superset): a line with none of it, as most are, is one search
_MAYBE_SECRET = re.compile(r"(?i)sig=|sharedaccess|key|passw|pin|secret|token|code=|://")


def redact(text: str) -> str:
    """``text`` without anything that looks like a secret (SAS signatures, keys, passwords, private keys)."""
    if _MAYBE_SECRET.search(text) is None:
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class LineBudget:
    """At most ``per_minute`` lines of one kind on ``logger`` a minute; the rest are counted, and the first line of the
    next minute says how many were left out. For lines about one peer's connection (a failed handshake, a refused
    CONNECT, a connection cut): there is one per connection, connections cost a client next to nothing, and a
    flood of them made megabytes of log a minute."""

    def __init__(self, logger: logging.Logger, about: str, per_minute: int = 120) -> None:
        self.logger, self.about, self.per_minute = logger, about, per_minute
        self._window = -60.0
        self._written = self._skipped = 0

    def __call__(self, level: int, message: str, *args: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self._window >= 60.0:
            if self._skipped:
                self.logger.warning("%d more lines about %s were not written in the last minute", self._skipped,
                                    self.about)
            self._window, self._written, self._skipped = now, 0, 0
        if self._written >= self.per_minute:
            self._skipped += 1
            return
        self._written += 1
        self.logger.log(level, message, *args)


def event(name: str, **fields: Any) -> dict[str, Any]:
    """``extra=`` for a log line that tells of an outcome: ``event`` names it (``registration.assigned``,
    ``hub.refused``...), ``fields`` from :data:`FIELDS` (None values left out)."""
    unknown = fields.keys() - _FIELD_SET
    if unknown:
        raise ValueError(f"log fields {sorted(unknown)} are not in opendps.logs.FIELDS")
    return {"event": name, **{k: v for k, v in fields.items() if v is not None}}


def new_request_id(prefix: str = "") -> str:
    """A fresh request id: 16 hex digits (with ``prefix``: ``m-`` for MQTT connections)."""
    return f"{prefix}{secrets.token_hex(8)}"


def accept_request_id(value: str | None) -> str | None:
    """A caller's own id (``x-ms-client-request-id``), if it is a plain token (never anything that could forge a
    log line)."""
    return value if value is not None and _REQUEST_ID_OK.fullmatch(value) else None


class RedactingFormatter(logging.Formatter):
    """The text format, with :func:`redact` over the message and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ms), ``level``, ``logger``, ``event`` (null for a line that tells of
    no outcome), ``message``, ``request_id`` (null outside a request), the :data:`FIELDS` the line carries,
    ``worker`` and ``pid`` under ``--workers``, and ``exception`` (the traceback) when there is one."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None),
            "message": redact(record.getMessage()),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                data[name] = redact(value) if isinstance(value, str) else value
        if self.worker is not None:
            data.setdefault("worker", self.worker)
            data.setdefault("pid", record.process)
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            data["exception"] = redact(record.exc_text)
        return json.dumps(data, default=str, ensure_ascii=False)


def text_format(who: str | None) -> str:
    """The text line: time, level, [who pid] under --workers, logger, message."""
    where = f" [{who} %(process)d]" if who else ""
    return f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s"


def configure(log_format: str = "text", *, who: str | None = None, worker: int | None = None,
              level: int = logging.INFO) -> None:
    """The process's one handler (stderr): ``text`` (as before) or ``json``. ``who``: ``supervisor`` or ``worker N``
    in the text format; ``worker``: the worker index a JSON line carries."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r} is not one of {', '.join(FORMATS)}")
    # what no line of either format shows is not gathered for every record (the logging HOWTO's "Optimization"): the
    # caller's file and line (a walk up the stack), the thread's and the process's names; the pid is kept (workers)
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if log_format == "json" else RedactingFormatter(text_format(who)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx writes a line per request it sends (INFO) with the whole URL: a custom allocation webhook's, whose query
    # may hold its key (an Azure Functions ?code=); the domain tells the webhook's outcome, without its URL
    logging.getLogger("httpx").setLevel(logging.WARNING)
