"""The one error convention of opendps (Boulder's ``BoulderError`` + WFE mapping, in Azure's numbers).

Domain code raises an :class:`OpenDPSError` of a typed kind (the subclasses below); each kind carries
Azure's six-digit ``error_code``, whose first three digits are the HTTP status (401002 -> 401). Front
ends map kinds to their wire and nothing else: HTTP status + Azure error body, MQTT ``res/{status}``
topics or CONNACK return codes, AMQP error conditions. Domain code never imports a front end. A more
specific Azure code is given with ``error_code=`` (or by a subclass in the package that owns it,
e.g. ``EnrollmentDisabled``) only when it differs from the kind's default. The message always names
the problem: it reaches users verbatim.

Anything else that escapes a front end is a bug or an operator problem: the caller gets a 500 with
a tracking id and the log gets the traceback. :class:`ConfigurationError` is the operator's kind:
the server cannot start or go on as configured (wrong master key, unreadable data directory).
"""

from __future__ import annotations


class OpenDPSError(Exception):
    """Base of every error that is the caller's to fix (bad input, conflicts, authentication).

    ``reason``: a short stable word for *why* (``revoked``, ``sas_expired``...) where the kind alone does not say it,
    given by the domain code that decides; it is never sent on the wire, only counted (metrics label, refusal log).
    Without one, the kind's own name (``unauthorized``, ``enrollment_disabled``): so the set of reasons stays bounded
    by the code, never by what a caller sends."""

    error_code: int = 400004

    def __init__(self, message: str, *, error_code: int | None = None, info: dict[str, str] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if error_code is not None:
            self.error_code = error_code
        self.info = info or {}
        self._reason = reason

    @property
    def status(self) -> int:
        """HTTP status implied by the error code (first three digits)."""
        return self.error_code // 1000

    @property
    def reason(self) -> str:
        """Why, as a bounded word: the one the domain gave, else the kind's name in snake case."""
        return getattr(self, "_reason", None) or _snake(type(self).__name__)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


class InvalidInput(OpenDPSError):
    """The request is malformed or breaks a rule (MQTT CONNECT: identifier rejected)."""

    error_code = 400004


class Unauthorized(OpenDPSError):
    """The caller did not prove who it is, or is not allowed to connect (MQTT CONNECT: not authorized)."""

    error_code = 401002


class InvalidCredentials(Unauthorized):
    """The credential itself is missing, malformed, expired or does not verify (MQTT CONNECT: bad credentials)."""


class Forbidden(OpenDPSError):
    error_code = 403000


class NotFound(OpenDPSError):
    error_code = 404001


class Conflict(OpenDPSError):
    error_code = 409001


class PreconditionFailed(OpenDPSError):
    """ETag mismatch (RFC 7232 If-Match semantics)."""

    error_code = 412001


class PayloadTooLarge(OpenDPSError):
    error_code = 413001


class Throttled(OpenDPSError):
    """Too many requests; ``info["retryAfter"]`` says when to come back (seconds)."""

    error_code = 429001


class ServiceUnavailable(OpenDPSError):
    """A service opendps depends on (a telemetry route's NATS server) did not take the work; retry later."""

    error_code = 503001


class GatewayTimeout(OpenDPSError):
    """Someone else (a device answering a method) did not answer in time."""

    error_code = 504101


class ConfigurationError(Exception):
    """The server cannot start or go on as configured (wrong master key, unreadable data directory...)."""
