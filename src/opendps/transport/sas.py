"""Azure-style shared access signatures (SAS), for the service API and the device side.

Token: ``SharedAccessSignature sr=<url-encoded resource>&sig=<url-encoded b64 HMAC>&se=<unix>[&skn=<name>]``.
The HMAC-SHA256 (key = base64-decoded shared key) is over ``sr`` *exactly as received* (still
URL-encoded) + ``"\\n"`` + ``se``: the C SDK encodes with lower-case hex and Python/C# with upper
case, so re-encoding on the server would break one of them (azure-wire-protocol.md §3.1).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote

PREFIX = "SharedAccessSignature "
_FIELDS = ("sr", "sig", "se", "skn")  # the names a token may carry (others are ignored)
DEFAULT_SKEW_SECONDS = 300


class SasError(ValueError):
    """The token is malformed, expired or its signature does not verify."""


@dataclass(frozen=True)
class SasToken:
    raw_resource: str  # sr as received (URL-encoded)
    signature: str  # sig, URL-decoded (base64)
    expiry: int
    key_name: str | None

    @property
    def resource(self) -> str:
        return unquote(self.raw_resource)


def sign(key_b64: str, string_to_sign: str) -> str:
    """base64(HMAC-SHA256(b64decode(key), string_to_sign))."""
    try:
        key = base64.b64decode(key_b64, validate=True)
    except ValueError as exc:
        raise SasError("shared access key is not valid base64") from exc
    return base64.b64encode(hmac.new(key, string_to_sign.encode(), hashlib.sha256).digest()).decode()


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """Device key of a symmetric-key enrollment group member (wire spec §3.2):
    base64(HMAC-SHA256(b64decode(group key), registration id)). The device SDK and DPS both use this one."""
    try:
        group_key = base64.b64decode(group_key_b64, validate=True)
    except ValueError as exc:
        raise ValueError("group key is not valid base64") from exc
    return base64.b64encode(hmac.new(group_key, registration_id.encode("utf-8"), hashlib.sha256).digest()).decode()


def generate(resource: str, key_b64: str, key_name: str | None = None, ttl: int = 3600,
             now: float | None = None) -> str:
    """Make a token for ``resource`` (given unencoded; encoded here with ``quote(safe='')``)."""
    se = int((time.time() if now is None else now) + ttl)
    return token(resource, sign(key_b64, f"{quote(resource, safe='')}\n{se}"), se, key_name)


def token(resource: str, signature: str, expiry: int, key_name: str | None = None) -> str:
    """Assemble a token from a signature made elsewhere (e.g. in a TPM) over ``quote(resource, safe='') + "\\n" +
    str(expiry)``: ``resource`` unencoded, ``signature`` base64; the encoding is :func:`generate`'s."""
    result = f"{PREFIX}sr={quote(resource, safe='')}&sig={quote(signature, safe='')}&se={expiry}"
    if key_name:
        result += f"&skn={quote(key_name, safe='')}"
    return result


def parse(header: str) -> SasToken:
    """Parse a token; raises SasError naming what is missing or malformed."""
    if not header or not header.startswith(PREFIX):
        raise SasError("authorization is not a SharedAccessSignature")
    fields: dict[str, str] = {}
    for part in header[len(PREFIX):].strip().split("&"):
        name, sep, value = part.partition("=")
        if not sep or not name:  # the field is not echoed: it may be a pasted key or signature, and this is logged
            raise SasError("malformed SharedAccessSignature: every field must be name=value")
        if name in fields:
            raise SasError(f"SharedAccessSignature field {name!r} given twice" if name in _FIELDS
                           else "a SharedAccessSignature field is given twice")
        fields[name] = value
    for required in ("sr", "sig", "se"):
        if required not in fields:
            raise SasError(f"SharedAccessSignature lacks {required!r}")
    try:
        expiry = int(fields["se"])
    except ValueError as exc:
        raise SasError("SharedAccessSignature expiry 'se' is not an integer") from exc
    skn = unquote(fields["skn"]) if "skn" in fields else None
    return SasToken(fields["sr"], unquote(fields["sig"]), expiry, skn)


def verify(token: SasToken, key_b64: str, now: float | None = None,
           skew: int = DEFAULT_SKEW_SECONDS) -> None:
    """Check signature and expiry (with ``skew`` seconds of clock tolerance); raise SasError."""
    expected = sign(key_b64, f"{token.raw_resource}\n{token.expiry}")
    if not hmac.compare_digest(expected.encode(), token.signature.encode()):
        raise SasError("SharedAccessSignature signature does not verify")
    current = time.time() if now is None else now
    if token.expiry + skew < current:
        raise SasError("SharedAccessSignature has expired")


def connection_string(host: str, key_name: str, key_b64: str) -> str:
    return f"HostName={host};SharedAccessKeyName={key_name};SharedAccessKey={key_b64}"


def parse_connection_string(value: str) -> dict[str, str]:
    """Parse ``HostName=..;SharedAccessKeyName=..;SharedAccessKey=..`` (keys may contain '=')."""
    out: dict[str, str] = {}
    for part in value.strip().split(";"):
        if not part:
            continue
        name, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"connection string part {part!r} is not Name=Value")
        out[name.strip()] = val.strip()
    for required in ("HostName", "SharedAccessKeyName", "SharedAccessKey"):
        if required not in out:
            raise ValueError(f"connection string lacks {required}")
    return out
