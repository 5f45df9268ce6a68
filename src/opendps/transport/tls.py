"""TLS server contexts for every listener.

Choice (see docs/architecture.md, "TLS"): the management and device HTTPS listener use the
stdlib ``ssl`` module with a P-256 server certificate, TLS 1.2 minimum. Device-plane listeners
that must accept any client chain and leave the decision to attestation code (issue 3/4) add a
pyOpenSSL layer here; front ends only ever call the functions of this module.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Server-authenticated TLS 1.2/1.3 with the node's certificate chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """Client context trusting ``ca_file`` (or the system store)."""
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
