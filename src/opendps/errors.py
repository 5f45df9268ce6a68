"""Domain errors, shared by every layer.

Each error carries Azure's six-digit ``error_code``: its first three digits are the HTTP status
(401002 -> 401), so front ends translate an error without knowing the domain, and domain code
never imports HTTP. The message always names the problem: it reaches users verbatim.
"""

from __future__ import annotations


class OpenDPSError(Exception):
    """Base of every error that is the caller's to fix (bad input, conflicts, auth)."""

    error_code: int = 400004

    def __init__(self, message: str, *, error_code: int | None = None, info: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if error_code is not None:
            self.error_code = error_code
        self.info = info or {}

    @property
    def status(self) -> int:
        """HTTP status implied by the error code (first three digits)."""
        return self.error_code // 1000


class InvalidInput(OpenDPSError):
    error_code = 400004


class Unauthorized(OpenDPSError):
    error_code = 401002


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
    error_code = 429001


class ConfigurationError(Exception):
    """The server cannot start as configured (wrong master key, unreadable data directory...)."""
