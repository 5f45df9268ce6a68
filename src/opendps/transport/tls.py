"""TLS for every listener.

Choice (see docs/architecture.md, "TLS"): the management HTTPS listener uses the stdlib ``ssl``
module (:func:`server_context`) with a P-256 server certificate, TLS 1.2 minimum.

Device-plane listeners (DPS device API over HTTPS, MQTT on 8883) must *request* but not *require* a
client certificate, accept any chain the client sends (expired, self-signed, unknown CA) and hand it
to the application exactly as sent, because attestation code decides at run time and answers with a
protocol-level error (HTTP 401, CONNACK refusal) rather than a failed handshake. Stdlib ``ssl`` cannot
do that (CERT_OPTIONAL still aborts on an unverifiable chain and has no verify callback), so this
module drives pyOpenSSL (OpenSSL bundled with ``cryptography``) over memory BIOs from an asyncio
protocol:

* :func:`device_tls_context` builds the pyOpenSSL context;
* :class:`TlsProtocol` sits between the socket transport and an inner protocol (aiohttp's request
  handler, the MQTT session) and gives the inner protocol a :class:`TlsTransport`; the inner
  protocol sees ``connection_made`` only after the handshake, so
  ``transport.get_extra_info("peer_certificate_chain")`` is valid from the first byte;
* :func:`start_tls_server` and :func:`start_aiohttp_site` open listeners;
* :func:`context_serving` and :func:`replace_context` change the certificate new connections get, while the
  listeners run (see :func:`replace_context` for why a new context instead of changing the old one).

Session resumption is disabled on device contexts: a resumed session carries no certificate chain,
and attestation needs the chain on every connection.

Front ends only ever call the functions of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import logging
import socket
import ssl
import struct
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto

from opendps.logs import LineBudget
from opendps.transport import format_peer

if TYPE_CHECKING:
    from aiohttp import web

__all__ = [
    "LISTENER_WEIGHTS",
    "Evictable",
    "TlsProtocol",
    "TlsTransport",
    "client_context",
    "connection_budgets",
    "context_serving",
    "device_tls_context",
    "discard_unsent",
    "guard_accepts",
    "http_keepalive_idle",
    "replace_context",
    "server_context",
    "start_aiohttp_site",
    "start_tls_server",
]

log = logging.getLogger("opendps.tls")


# lines about single connections (failed handshakes, unreadable certificates, connections cut): at most 120 a minute
CONNECTION_LINES = "single TLS connections (failed handshakes, connections cut)"
_connection_line = LineBudget(log, CONNECTION_LINES)

_RECV_SIZE = 65536  # plaintext per SSL_read call (a record holds at most 16 KiB)
_BIO_READ_SIZE = 262144  # ciphertext per read from the outgoing memory BIO
_SEND_CHUNK = 262144  # plaintext per SSL_write; the BIO is flushed between chunks to bound memory
_SESSION_ID_CONTEXT = b"opendps-device"
# a memory BIO keeps the largest buffer it ever held (OpenSSL's BUF_MEM never shrinks): one that carried more than
# this at once is replaced by a fresh one as soon as it is empty (see _renew_bios)
_BIO_KEEP = 2048


# --- stdlib contexts (management listener, clients) -------------------------------------------


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


# --- device-plane context ---------------------------------------------------------------------


def _accept_any_chain(conn: SSL.Connection, cert: Any, errnum: int, depth: int, ok: int) -> bool:
    """Verify callback: never fail the handshake; attestation judges the chain afterwards."""
    return True


def _alpn_selector(ours: Sequence[bytes]) -> Callable[[SSL.Connection, list[bytes]], Any]:
    """Server-preference ALPN; no overlap continues without ALPN instead of failing (lenient devices)."""

    def select(conn: SSL.Connection, offered: list[bytes]) -> Any:
        for proto in ours:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def device_tls_context(
    cert_file: Path,
    key_file: Path,
    *,
    alpn: list[bytes] | None = None,
    client_ca_certs: Iterable[x509.Certificate] = (),
) -> SSL.Context:
    """pyOpenSSL server context for device listeners: request any client chain, never reject it.

    ``cert_file`` is PEM, leaf first, optionally followed by intermediates. The client certificate is
    requested (VERIFY_PEER) but not required (no FAIL_IF_NO_PEER_CERT), and the verify callback
    accepts everything. ``client_ca_certs`` only fills the CertificateRequest's list of acceptable CA
    names (a hint for clients holding several identities); by default that list is empty. TLS 1.2
    is the minimum; renegotiation and session resumption are disabled so every connection shows
    its full chain.
    """
    recipe = functools.partial(_device_context, list(alpn) if alpn else None, tuple(client_ca_certs))
    ctx = recipe()
    ctx.use_certificate_chain_file(str(cert_file))
    ctx.use_privatekey_file(str(key_file))
    ctx.check_privatekey()
    _RECIPES[ctx] = recipe
    return ctx


def _device_context(alpn: list[bytes] | None, client_ca_certs: tuple[x509.Certificate, ...]) -> SSL.Context:
    """Everything of a device context but its certificate and key."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    options = SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    ctx.set_options(options)
    ctx.set_verify(SSL.VERIFY_PEER, _accept_any_chain)
    # OpenSSL's verdict on the client chain is never used (the callback accepts everything; attestation validates the
    # chain it is handed, as sent), yet it checked the signatures of up to 100 of its certificates in the handshake, on
    # the event loop: a chain of CA certificates made once and replayed cost 10x a normal handshake's CPU (100 P-256),
    # 20x (21 RSA-8192 with a 64-bit exponent) and up to ~70x within the 100 KB certificate list. Depth 0: OpenSSL
    # looks at the leaf and its issuer only; the whole chain still reaches the application.
    ctx.set_verify_depth(0)
    ctx.set_session_id(_SESSION_ID_CONTEXT)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    # an idle connection gives its read and write buffers back (allocated again for the next record): ~24 KB less
    # per idle device, as Mosquitto does
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    for ca in client_ca_certs:
        ctx.add_client_ca(ca)
    if alpn:
        ctx.set_alpn_select_callback(_alpn_selector(list(alpn)))
    return ctx


# how each device context was made (to make another like it), and the context that replaces a listener's
_RECIPES: weakref.WeakKeyDictionary[SSL.Context, Callable[[], SSL.Context]] = weakref.WeakKeyDictionary()
_SUCCESSORS: weakref.WeakKeyDictionary[SSL.Context, SSL.Context] = weakref.WeakKeyDictionary()


def context_serving(context: SSL.Context, chain: Sequence[x509.Certificate], key: Any) -> SSL.Context:
    """A new device context made like ``context`` (a :func:`device_tls_context`: same ALPN, client CA names,
    options) that serves ``chain`` (leaf first, then its issuers, as in a certificate file) with ``key`` (the
    leaf's private key, a ``cryptography`` object). Touches nothing shared: any thread may call it (~0.5 ms)."""
    recipe = _RECIPES.get(context)
    if recipe is None:
        raise ValueError("not a context made by device_tls_context")
    if not chain:
        raise ValueError("a server certificate chain needs its leaf")
    fresh = recipe()
    fresh.use_certificate(chain[0])
    for issuer in chain[1:]:
        fresh.add_extra_chain_cert(issuer)
    fresh.use_privatekey(key)
    fresh.check_privatekey()  # a key that is not the leaf's fails here, never in a handshake
    _RECIPES[fresh] = recipe
    return fresh


def replace_context(context: SSL.Context, successor: SSL.Context) -> None:
    """From now on, connections accepted by listeners started with ``context`` use ``successor`` (made by
    :func:`context_serving`); connections already accepted, handshaking or not, keep the context they were made
    with. Call it on the listeners' event loop.

    Why a new context and not a new certificate in the old one: pyOpenSSL refuses to change a context that has
    made a connection (``use_certificate`` raises ValueError once the context is used), and changing an SSL_CTX
    under live connections is what OpenSSL leaves undefined. A servername (SNI) callback switching contexts would
    reach only clients that send SNI (a client connecting to an IP address sends none, so an expired certificate
    would never be replaced for it), and ``SSL_set_SSL_CTX`` copies only part of a context. So a listener keeps
    its original context as a name, and :class:`TlsProtocol` takes that name's newest successor when a
    connection arrives: one dictionary lookup per connection, ~0.5 ms per replacement, nothing dropped.
    """
    if context not in _RECIPES or successor not in _RECIPES:
        raise ValueError("not a context made by device_tls_context")
    _SUCCESSORS[context] = successor


def current_context(context: SSL.Context) -> SSL.Context:
    """The context a new connection on a listener started with ``context`` uses."""
    return _SUCCESSORS.get(context, context)


# --- helpers ------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """One-line, key-free description of a pyOpenSSL (or OS) error."""
    if isinstance(exc, SSL.ZeroReturnError):
        return "close_notify received during handshake"
    if isinstance(exc, SSL.SysCallError):
        code, text = (exc.args + (None, None))[:2]
        if code == -1:
            return "unexpected EOF"
        return f"{text or 'socket error'} (errno {code})"
    if isinstance(exc, SSL.Error):
        reasons: list[str] = []
        if exc.args and isinstance(exc.args[0], list):
            for entry in exc.args[0]:
                reason = entry[2] if isinstance(entry, tuple) and len(entry) >= 3 else str(entry)
                if reason and reason not in reasons:
                    reasons.append(str(reason))
        return "; ".join(reasons) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _peer_chain(conn: SSL.Connection) -> list[x509.Certificate]:
    """The chain exactly as the client sent it, leaf first.

    Server side, OpenSSL's SSL_get_peer_cert_chain() leaves out the leaf; it comes from
    SSL_get_peer_certificate(). The CA certificates after the leaf are looked up by their DER first: a fleet's devices
    send the same issuing CA, parsed once per process (:func:`_interned`).

    OpenSSL takes certificates that cryptography cannot load (an X.509 version number past v3, say): such a leaf
    makes the chain empty, as if the client sent none (it is no credential the domain could check), and such a CA
    certificate is left out (a path through it cannot validate); one line at INFO says so.
    """
    try:
        leaf = conn.get_peer_certificate(as_cryptography=True)
    except Exception as exc:  # noqa: BLE001 - cryptography's parser: InvalidVersion is not a ValueError
        _connection_line(logging.INFO, "TLS client certificate cannot be read (%s): taken as no certificate", _why(exc))
        return []
    if leaf is None:
        return []
    ders = [crypto.dump_certificate(crypto.FILETYPE_ASN1, c) for c in conn.get_peer_cert_chain() or []]
    if ders and ders[0] == leaf.public_bytes(Encoding.DER):  # some OpenSSL builds include it: not a CA to keep
        ders = ders[1:]
    chain = [leaf]
    for der in ders:
        try:
            chain.append(_interned(der))
        except Exception as exc:  # noqa: BLE001 - as above
            _connection_line(logging.INFO, "TLS client chain: a CA certificate cannot be read (%s): left out", _why(exc))
    return chain


def _why(exc: Exception) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


_CA_OBJECTS: OrderedDict[bytes, x509.Certificate] = OrderedDict()
_CA_OBJECTS_MAX = 512


def _interned(der: bytes) -> x509.Certificate:
    """One object per distinct CA certificate: a fleet's devices send the same issuing CA, and each connection
    keeps its peer chain for its whole life (~1.5 KB per parsed copy). Event-loop thread only."""
    known = _CA_OBJECTS.get(der)
    if known is not None:
        _CA_OBJECTS.move_to_end(der)
        return known
    certificate = _CA_OBJECTS[der] = x509.load_der_x509_certificate(der)
    if len(_CA_OBJECTS) > _CA_OBJECTS_MAX:
        _CA_OBJECTS.popitem(last=False)
    return certificate


class _State(enum.Enum):
    NEW = "new"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSING = "closing"  # close_notify queued or failure; waiting for the socket to close
    CLOSED = "closed"


# --- transport presented to the inner protocol ------------------------------------------------


class TlsTransport(asyncio.Transport):
    """What the inner protocol sees: plaintext in and out, TLS details via ``get_extra_info``.

    Extra info: ``peer_certificate_chain`` (list of ``cryptography`` certificates, leaf first, ``[]``
    without a client certificate), ``ssl_object`` (the pyOpenSSL Connection), ``sslcontext`` (the
    pyOpenSSL Context), ``cipher`` ((name, protocol, secret bits) like stdlib ``ssl``),
    ``tls_version`` (e.g. ``"TLSv1.3"``), ``alpn_protocol``; everything else (``peername``,
    ``sockname``, ``socket``) comes from the socket transport.
    """

    __slots__ = ("_tls",)

    def __init__(self, tls: TlsProtocol) -> None:
        super().__init__()
        self._tls = tls

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls._extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls._inner = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls._inner

    def is_closing(self) -> bool:
        return self._tls._is_closing()

    def close(self) -> None:
        """Send close_notify, then close the socket once its buffer is flushed."""
        self._tls._start_close()

    def abort(self) -> None:
        """Close the socket at once, dropping buffered data (no close_notify)."""
        self._tls._abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expecting a bytes-like instance, got {type(data).__name__}")
        self._tls._write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections cannot half-close; use close()")

    def pause_reading(self) -> None:
        self._tls._pause_reading()

    def resume_reading(self) -> None:
        self._tls._resume_reading()

    def is_reading(self) -> bool:
        return self._tls._is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        raw = self._tls._raw
        if raw is not None:
            raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tls._write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        raw = self._tls._raw
        if raw is None:
            return (0, 0)
        return raw.get_write_buffer_limits()

    def __repr__(self) -> str:
        return f"<TlsTransport {self._tls._peer} {self._tls._state.value}>"


# --- protocol on the socket -------------------------------------------------------------------


class Evictable(Protocol):
    """A connection a :class:`ConnectionGate` may close to make room (see there)."""

    def evict(self) -> None:
        """Close at once; the slot now belongs to a newer connection, so do not release it."""


class ConnectionGate:
    """At most ``limit`` connections on one listener. Over it, the oldest connection that has not been answered yet
    (:meth:`answered`: nothing written to it, e.g. still in its TLS handshake or before its MQTT CONNECT) is closed
    to make room; with ``idle`` (HTTPS: :func:`http_keepalive_idle`), else the oldest answered one that ``idle``
    says waits for nothing (a keep-alive connection between requests, as nginx reuses them when it runs out);
    when there is none, the new connection is closed at once — accepted and aborted, so its descriptor is free
    again. One log line a minute says how many were closed and refused.

    Why a cap: every connection holds a file descriptor; a listener without one lets idle or slow clients use them
    all, and then every listener of the process fails to accept (and asyncio logs each failed accept()). Why the
    oldest unanswered one goes: refusing the newest let one peer hold a listener full for as long as it liked with
    connections that never send a byte, each replaced as its handshake deadline closed it (a few thousand a second
    are nothing to a client); a real client's handshake and first request take milliseconds, so a flood now closes
    its own connections, not theirs. Not by address: behind a TCP load balancer every client has the same one.
    Why idle keep-alive connections go too: a peer that completes each handshake and sends one request held the
    HTTPS listener full for the keep-alive timeout (~90 handshakes a second for 5,000 slots at 60 s); an HTTP client
    expects a pooled connection to be closed between requests and opens another.
    """

    IDLE_SCAN = 32  # answered connections asked per admission at most (busy ones move to the back)

    REPORT_EVERY = 60.0

    def __init__(self, name: str, limit: int, *, idle: Callable[[Any], bool] | None = None) -> None:
        if limit < 1:
            raise ValueError("a listener needs room for one connection at least")
        self.name, self.limit = name, limit
        self._idle = idle
        self._answered: dict[Evictable, None] = {}  # with ``idle``: answered ones, oldest first
        self.active = 0
        self.refused = 0  # since the last report
        self.evicted = 0  # since the last report
        self._reported_at = -self.REPORT_EVERY
        self._unanswered: dict[Evictable, None] = {}  # admitted, nothing written to them yet: oldest first

    def admit(self, connection: Evictable | None = None) -> bool:
        """Room for one more (``connection``, evictable until :meth:`answered`), made if need be (see the class)."""
        if self.active < self.limit:
            self.active += 1
            if connection is not None:
                self._unanswered[connection] = None
            return True
        if connection is not None and self._unanswered:
            oldest = next(iter(self._unanswered))
            del self._unanswered[oldest]
            oldest.evict()  # its slot is the new connection's
            self._unanswered[connection] = None
            self.evicted += 1
            self._report()
            return True
        if connection is not None and self._idle is not None and self._evict_idle():
            self._unanswered[connection] = None
            self.evicted += 1
            self._report()
            return True
        self.refused += 1
        self._report()
        return False

    def answered(self, connection: Evictable) -> None:
        """``connection`` was written to: it is past connecting, closed to make room only when ``idle`` says so."""
        if connection in self._unanswered:
            del self._unanswered[connection]
            if self._idle is not None:
                self._answered[connection] = None

    def release(self, connection: Evictable | None = None) -> None:
        self.active -= 1
        if connection is not None:
            self._unanswered.pop(connection, None)
            self._answered.pop(connection, None)

    def _evict_idle(self) -> bool:
        """Close the oldest answered connection that is idle, asking at most :attr:`IDLE_SCAN` of them (each busy one
        asked goes to the back, so a listener full of long requests costs a bounded scan per new connection)."""
        assert self._idle is not None
        answered = self._answered
        for _ in range(min(self.IDLE_SCAN, len(answered))):
            oldest = next(iter(answered))
            del answered[oldest]
            if self._idle(oldest):
                oldest.evict()
                return True
            answered[oldest] = None
        return False

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._reported_at >= self.REPORT_EVERY:
            log.warning("%s listener is at its limit of %d connections: since the last report, closed %d that had "
                        "not been answered or were idle to make room and refused %d new ones",
                        self.name, self.limit,
                        self.evicted, self.refused)
            self._reported_at, self.refused, self.evicted = now, 0, 0


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit of open files to the hard limit (where allowed); the soft limit after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def discard_unsent(transport: asyncio.BaseTransport) -> None:
    """Make closing ``transport``'s socket a reset that drops what the peer never took (SO_LINGER 0): a plain close
    leaves the kernel trying to deliver it, megabytes per connection, for minutes after the descriptor is gone."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# A listener's share of the descriptors. The MQTT listener holds the fleet all day (every hub device, DPS sessions);
# HTTPS serves registrations, which are short, and the management API; AMQP a few service clients; the plain-HTTP
# status and metrics listeners a few fetchers. An equal split left a hub with a 20,000-descriptor limit room for only
# 6,624 devices next to three other listeners.
LISTENER_WEIGHTS = {"MQTT": 8, "HTTPS": 4, "AMQP": 2, "HTTP": 1, "metrics": 1}


def connection_budgets(listeners: Iterable[str], *, reserve: int = 128) -> dict[str, int]:
    """Connections each of ``listeners`` (names of :data:`LISTENER_WEIGHTS`) may hold so that together they stay
    below the descriptor limit, with ``reserve`` descriptors left for the database, files and the process itself;
    the rest is shared by weight (at least one connection each)."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft = soft if soft != resource.RLIM_INFINITY else 1 << 20
    names = list(listeners)
    weights = {name: LISTENER_WEIGHTS[name] for name in names}
    total = sum(weights.values()) or 1
    room = max(0, soft - reserve)
    return {name: max(1, room * weight // total) for name, weight in weights.items()}


# accept() errors that say the process or the host is out of something (descriptors, buffers, memory), not the peer
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_EXHAUSTED = "socket.accept() out of system resource"  # asyncio's message for one of them
DESCRIPTOR_LINES = "listeners out of file descriptors"
_descriptor_line = LineBudget(log, DESCRIPTOR_LINES, per_minute=1)


class _AcceptOnce:
    """A listening socket as one wake-up of asyncio's accept loop sees it: once an ``accept()`` has failed for want
    of descriptors or memory, the rest of that wake-up finds nothing waiting (``BlockingIOError``, which ends the
    loop) instead of failing again.

    Why: asyncio (CPython before gh-151615) answers such a failure by pausing the listener for a second and
    scheduling its return, but goes on calling ``accept()`` up to ``backlog`` (1,024) times in the same wake-up:
    each failure logged with a traceback and each scheduling one more return, so a process at its descriptor limit
    spun a core and wrote ~35,000 log lines a second. With this, each listener tries once a second."""

    __slots__ = ("sock", "failed")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failed = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failed:
            raise BlockingIOError
        try:
            return self.sock.accept()
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                self.failed = True
            raise

    def __getattr__(self, name: str) -> Any:  # fileno, getsockname...: the socket's own
        return getattr(self.sock, name)


def guard_accepts(loop: asyncio.AbstractEventLoop) -> bool:
    """Make ``loop``'s listeners, started after this, stop for a second at the first ``accept()`` that fails for
    want of resources (:class:`_AcceptOnce`), and say so in at most one line a minute (:func:`_loop_exception`),
    without a traceback; every other exception the loop reports goes to the handler it had. False where the loop
    is not asyncio's selector loop (another loop accepts its own way)."""
    original = getattr(loop, "_accept_connection", None)
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop) or not callable(original):
        return False
    if getattr(original, "_guarded", False):
        return True

    def accept(protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> Any:
        # a listener's return after a pause hands back the wrapper it was paused with: wrap the socket anew
        raw = sock.sock if isinstance(sock, _AcceptOnce) else sock
        return original(protocol_factory, _AcceptOnce(raw), *args, **kwargs)

    accept._guarded = True  # type: ignore[attr-defined]
    loop._accept_connection = accept  # type: ignore[attr-defined]
    previous = loop.get_exception_handler()
    loop.set_exception_handler(functools.partial(_loop_exception, previous))
    return True


def _loop_exception(previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None,
                    loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    if context.get("message") == _ACCEPT_EXHAUSTED and isinstance(exc, OSError):
        import resource

        sock = context.get("socket")
        try:
            where = format_peer(sock.getsockname()) if sock is not None else "a listener"
        except OSError:
            where = "a listener"
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        _descriptor_line(logging.WARNING, "cannot accept connections on %s: %s (descriptor limit %s); new connections "
                         "wait in the listen queue, and each listener tries again every second until descriptors are "
                         "free (raise the limit, e.g. LimitNOFILE=, if this lasts)", where,
                         exc.strerror or exc, "unlimited" if soft == resource.RLIM_INFINITY else soft)
        return
    if previous is not None:
        previous(loop, context)
    else:
        loop.default_exception_handler(context)


def _bio_sizes() -> Callable[[SSL.Connection, bool], int] | None:
    """``sizes(conn, outgoing)``: the bytes waiting in ``conn``'s outgoing (or incoming) memory BIO.

    Why: pyOpenSSL reports an empty BIO or a consumed record by raising WantReadError, and a device's message costs
    three of them (the read after its record, and the BIO reads after it and after the answer). Asking the BIO
    first makes each of those a C call. pyOpenSSL has no public call for it: this uses its binding and the
    connection's two BIO attributes; None (the loops ask until WantReadError, as before) if a release changes them.
    """
    try:
        from OpenSSL._util import ffi, lib

        pending = lib.BIO_get_mem_data
    except (ImportError, AttributeError):  # pragma: no cover - depends on the pyOpenSSL release
        return None
    null = ffi.NULL

    def sizes(conn: SSL.Connection, outgoing: bool) -> int:
        bio = conn._from_ssl if outgoing else conn._into_ssl  # type: ignore[attr-defined]
        return int(pending(bio, null)) if bio is not None else 0

    try:
        probe = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
        probe.bio_write(b"\x16")
        if sizes(probe, False) != 1 or sizes(probe, True) != 0:  # pragma: no cover - a changed binding
            return None
    except (AttributeError, SSL.Error):  # pragma: no cover - depends on the pyOpenSSL release
        return None
    return sizes


_bio_size = _bio_sizes()


def _bio_renewer() -> Callable[[SSL.Connection, bool, bool], bool] | None:
    """``renew(conn, inbound, outbound)``: give ``conn`` fresh, empty memory BIOs on the chosen sides.

    Why: pyOpenSSL's memory BIOs keep the largest buffer they ever held, so every idle device would carry its
    handshake flights (2-4 KB each way: certificate chains) for the connection's life. OpenSSL lets a connection
    change BIOs between records (``SSL_set_bio`` frees the old ones); pyOpenSSL has no public call for it, so this
    uses its binding and its two BIO attributes (as :func:`_bio_sizes`), and returns None (nothing renewed, the
    connection works as before) if a pyOpenSSL release changes them. tests/test_tls.py checks the renewal happens.
    """
    sizes = _bio_size
    if sizes is None:  # pragma: no cover - depends on the pyOpenSSL release
        return None
    try:
        from OpenSSL._util import ffi, lib

        new_bio, mem, set_bio = lib.BIO_new, lib.BIO_s_mem, lib.SSL_set_bio
    except (ImportError, AttributeError):  # pragma: no cover - depends on the pyOpenSSL release
        return None
    null = ffi.NULL

    def renew(conn: SSL.Connection, inbound: bool, outbound: bool) -> bool:
        try:
            ssl_ptr, into, out = conn._ssl, conn._into_ssl, conn._from_ssl  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - depends on the pyOpenSSL release
            return False
        if into is None or out is None:
            return False
        if inbound and sizes(conn, False) or outbound and sizes(conn, True):
            return False  # bytes still wait in it: next time
        if inbound:
            into = new_bio(mem())
            if into == null:
                return False
        if outbound:
            fresh_out = new_bio(mem())
            if fresh_out == null:
                if inbound:
                    lib.BIO_free(into)
                return False
            out = fresh_out
        set_bio(ssl_ptr, into, out)  # frees the replaced BIOs
        conn._into_ssl, conn._from_ssl = into, out  # type: ignore[attr-defined]
        return True

    return renew


_renew_bios = _bio_renewer()


def _plaintext_reader() -> Callable[[SSL.Connection, list[bytes]], None] | None:
    """``read(conn, chunks)``: append the plaintext of every record OpenSSL can give now to ``chunks``, and return when
    it wants more ciphertext; anything else (close_notify, an alert, a broken record) raises what pyOpenSSL's ``recv``
    raises, after appending what came before it.

    Why: ``recv`` allocates a 64 KiB buffer, reads, then asks OpenSSL for the error state on every call, even a
    successful one: 3.3 µs per telemetry message against 1.2 µs for one SSL_read into a buffer kept per thread (an
    event loop's thread: connections take turns, never at once). One call reads every record a segment brought
    (a device's pipelined messages are a record each), asking OpenSSL in C whether more is there, instead of three
    Python calls per record. Errors keep pyOpenSSL's own mapping (``_raise_ssl_error``, the method ``recv`` uses).
    None (the loops use ``recv``) if a pyOpenSSL release changes what this relies on.
    """
    try:
        from OpenSSL._util import ffi, lib

        ssl_read, get_error, want_read = lib.SSL_read, lib.SSL_get_error, lib.SSL_ERROR_WANT_READ
        ssl_pending, bio_pending = lib.SSL_pending, lib.BIO_get_mem_data
        raise_error = SSL.Connection._raise_ssl_error  # type: ignore[attr-defined]
    except (ImportError, AttributeError):  # pragma: no cover - depends on the pyOpenSSL release
        return None
    local = threading.local()
    as_buffer, null = ffi.buffer, ffi.NULL

    def read(conn: SSL.Connection, chunks: list[bytes]) -> None:
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = ffi.new("char[]", _RECV_SIZE)
        ssl_ptr, into = conn._ssl, conn._into_ssl  # type: ignore[attr-defined]
        while True:
            count = ssl_read(ssl_ptr, buffer, _RECV_SIZE)
            if count <= 0:
                if get_error(ssl_ptr, count) == want_read:
                    return
                raise_error(conn, ssl_ptr, count)  # raises: ZeroReturnError for close_notify, SSL.Error for the rest
                return  # pragma: no cover - _raise_ssl_error always raises for these codes
            chunks.append(as_buffer(buffer, count)[:])
            if not ssl_pending(ssl_ptr) and (into is None or not bio_pending(into, null)):
                return  # no plaintext left in OpenSSL, no ciphertext to read: the next SSL_read would want more

    try:
        probe = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
        probe.set_accept_state()
        got: list[bytes] = []
        read(probe, got)
        if got:  # nothing received yet: it wants more  # pragma: no cover
            return None
    except (AttributeError, TypeError, SSL.Error):  # pragma: no cover - a changed binding
        return None
    return read


_read_plaintext = _plaintext_reader()


def _record_writers() -> tuple[Callable[[SSL.Connection, bytes], None], Callable[[SSL.Connection, Any], int],
                               Callable[[SSL.Connection, int], bytes]] | None:
    """``(feed, send, take)``: ``feed(conn, ciphertext)`` puts what the socket brought into ``conn``'s incoming memory
    BIO; ``send(conn, plaintext)`` encrypts it into the outgoing one and returns the bytes taken; ``take(conn, size)``
    returns the ``size`` bytes the outgoing one holds (as :func:`_bio_sizes` reports them). Each fails as pyOpenSSL's
    ``bio_write``, ``send`` and ``bio_read`` do (``send`` raises WantReadError, or the error ``_raise_ssl_error`` maps).

    Why: pyOpenSSL's methods check and convert their argument, wrap it in a buffer (``bio_read`` allocates one per
    call) and, for ``send``, ask OpenSSL for the error state even on success: 0.3-0.8 µs more than the C call each,
    once for every segment a device sends and for every answer (a telemetry PUBACK). Uses pyOpenSSL's binding as
    :func:`_plaintext_reader` does (a buffer kept per thread for ``take``); None (the methods are used) if a release
    changes what this relies on."""
    try:
        from OpenSSL._util import ffi, lib

        bio_write, ssl_write, get_error, bio_read = lib.BIO_write, lib.SSL_write, lib.SSL_get_error, lib.BIO_read
        want_read = lib.SSL_ERROR_WANT_READ
        raise_error = SSL.Connection._raise_ssl_error  # type: ignore[attr-defined]
    except (ImportError, AttributeError):  # pragma: no cover - depends on the pyOpenSSL release
        return None
    from_buffer, as_buffer = ffi.from_buffer, ffi.buffer
    local = threading.local()

    def feed(conn: SSL.Connection, data: bytes) -> None:
        count = len(data)
        if bio_write(conn._into_ssl, data if type(data) is bytes else from_buffer(data), count) != count:  # type: ignore[attr-defined]
            raise SSL.Error([("memory BIO", "BIO_write", f"took less than the {count} bytes given")])

    def send(conn: SSL.Connection, data: Any) -> int:
        ssl_ptr = conn._ssl  # type: ignore[attr-defined]
        count = ssl_write(ssl_ptr, data if type(data) is bytes else from_buffer(data), len(data))
        if count <= 0:
            if get_error(ssl_ptr, count) == want_read:
                raise SSL.WantReadError()
            raise_error(conn, ssl_ptr, count)  # raises the mapped error
        return int(count)

    def take(conn: SSL.Connection, size: int) -> bytes:
        if size > _TAKE_BUFFER:  # a large answer: pyOpenSSL's own buffer of its size
            return conn.bio_read(size)
        buffer = getattr(local, "buffer", None)
        if buffer is None:
            buffer = local.buffer = ffi.new("char[]", _TAKE_BUFFER)
        count = bio_read(conn._from_ssl, buffer, size)  # type: ignore[attr-defined]
        if count <= 0:
            raise SSL.WantReadError()  # nothing there after all: as pyOpenSSL's bio_read says it
        return as_buffer(buffer, count)[:]

    try:
        probe = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
        probe.set_accept_state()
        feed(probe, b"\x16")
        if _bio_size is not None and _bio_size(probe, False) != 1:  # pragma: no cover - a changed binding
            return None
        try:
            send(probe, b"x")  # before the handshake: OpenSSL wants the client's hello first
        except SSL.WantReadError:
            pass
        else:  # pragma: no cover - a changed binding
            return None
    except (AttributeError, TypeError, SSL.Error):  # pragma: no cover - a changed binding
        return None
    return feed, send, take


_TAKE_BUFFER = 32768  # outgoing ciphertext taken through the per-thread buffer (a record and its header fit twice)
_write_records = _record_writers()


class TlsProtocol(asyncio.Protocol):
    """Server-side TLS over memory BIOs between a socket transport and ``inner``.

    Why hand-written: stdlib ``ssl`` (and so asyncio's sslproto) cannot accept an unverifiable
    client chain. State machine: HANDSHAKE until pyOpenSSL's do_handshake succeeds (the inner
    protocol is connected only then), OPEN while application data flows, CLOSING after close() or a
    failure, CLOSED once the socket is gone. Every call into pyOpenSSL is followed by a flush of the
    outgoing BIO (handshake flights, TLS 1.3 post-handshake messages, alerts, close_notify).

    A failed or timed-out handshake closes this connection only and logs one line on
    ``opendps.tls``. With ``write_timeout``, a peer that leaves what we send unread (the socket's buffer above its
    high-water mark, so the inner protocol is paused) for that long is cut off: one INFO line, the socket aborted.
    """

    # thousands live at once (one per connection): no per-object __dict__
    __slots__ = (
        "__weakref__",
        "_gate", "_admitted", "_inner", "_context", "_handshake_timeout", "_close_timeout", "_loop", "_raw",
        "_conn", "_app_transport", "_state", "_timer", "_received_bytes", "_failure_logged",
        "_inner_connected", "_eof_delivered", "_reading_paused", "_raw_writing_paused", "_inner_writing_paused",
        "_backlog", "_backlog_size", "_write_timeout", "_answered"
    )

    def __init__(
        self,
        inner: asyncio.Protocol,
        context: SSL.Context,
        *,
        handshake_timeout: float = 10.0,
        close_timeout: float = 10.0,
        gate: ConnectionGate | None = None,
        write_timeout: float | None = None,
    ) -> None:
        if handshake_timeout <= 0 or close_timeout <= 0 or write_timeout is not None and write_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._gate = gate
        self._write_timeout = write_timeout
        self._admitted = False
        self._inner = inner
        self._context = context
        self._handshake_timeout = handshake_timeout
        self._close_timeout = close_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._raw: asyncio.Transport | None = None
        self._conn: SSL.Connection | None = None
        self._app_transport = TlsTransport(self)
        self._state = _State.NEW
        self._timer: asyncio.TimerHandle | None = None
        self._received_bytes = False
        self._failure_logged = False
        self._inner_connected = False  # connection_made delivered, connection_lost not yet
        self._eof_delivered = False
        self._reading_paused = False
        self._raw_writing_paused = False
        self._inner_writing_paused = False
        self._backlog: list[bytes] = []  # plaintext SSL_write could not take yet (WantRead)
        self._backlog_size = 0
        self._answered = False  # something written to the connection (the gate's "answered")

    def __repr__(self) -> str:
        return f"<TlsProtocol {self._peer} {self._state.value}>"

    @property
    def _peer(self) -> str:
        """The client's address for log lines (formatted when one is written, not kept per connection)."""
        return format_peer(self._raw.get_extra_info("peername")) if self._raw is not None else "unknown peer"

    # socket-transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._gate is not None:
            if not self._gate.admit(self):
                self._state = _State.CLOSED
                transport.abort()
                return
            self._admitted = True
        self._loop = asyncio.get_running_loop()
        self._raw = transport
        self._context = current_context(self._context)  # a replaced server certificate (replace_context)
        conn = SSL.Connection(self._context, None)
        conn.set_accept_state()
        self._conn = conn
        self._state = _State.HANDSHAKE
        self._timer = self._loop.call_later(self._handshake_timeout, self._on_handshake_timeout)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.HANDSHAKE:
            self._received_bytes = True
            if self._feed(data):
                self._do_handshake()
        elif self._state is _State.OPEN and self._feed(data):
            self._do_read()
            if len(data) > _BIO_KEEP and _renew_bios is not None and self._state is _State.OPEN:
                _renew_bios(self._conn, True, False)  # type: ignore[arg-type]
        # CLOSING/CLOSED: the socket is being closed; late bytes are irrelevant.

    def eof_received(self) -> bool | None:
        if self._state is _State.HANDSHAKE:
            if self._received_bytes:
                self._handshake_failed("connection closed by peer")
            else:  # port probes and load-balancer health checks: not worth an INFO line
                self._handshake_failed("connection closed before any byte", level=logging.DEBUG)
            return True
        if self._state is _State.OPEN:
            # TCP FIN (with or without close_notify): nothing more will arrive; all records were
            # already drained, since reading pauses at the socket when the inner protocol pauses.
            if not self._eof_delivered:
                self._deliver_eof()
            return True  # keep the socket for writing if the inner protocol wants it; else closed
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted and self._gate is not None:
            self._admitted = False
            self._gate.release(self)
        previous = self._state
        self._state = _State.CLOSED
        self._cancel_timer()
        self._backlog.clear()
        self._backlog_size = 0
        if previous is _State.HANDSHAKE and not self._failure_logged:
            self._failure_logged = True
            reason = _describe(exc) if exc is not None else "connection closed"
            _connection_line(logging.INFO, "TLS handshake with %s failed: %s", self._peer, reason)
        if self._inner_connected:
            self._inner_connected = False
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._raw_writing_paused = True
        self._arm_write_timer()
        # the peer does not read what we send: read no more from it either until it does. OpenSSL answers some records
        # by itself, out of the inner protocol's sight (a TLS 1.3 KeyUpdate asking for ours: 22 bytes in, 22 out), so a
        # peer sending those and reading nothing had the answers buffered here at a core's pace until the write deadline
        if self._raw is not None and self._state is _State.OPEN:
            self._raw.pause_reading()
        if self._inner_connected and not self._inner_writing_paused:
            self._inner_writing_paused = True
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._raw_writing_paused = False
        if self._state is _State.OPEN:
            self._cancel_timer()  # in OPEN the timer is only ever the write deadline
            if self._raw is not None and not self._reading_paused:
                self._raw.resume_reading()
        if self._inner_connected and self._inner_writing_paused:
            self._inner_writing_paused = False
            self._inner.resume_writing()

    def _arm_write_timer(self) -> None:
        """The peer stopped reading: it has ``write_timeout`` to take our bytes again (an answer it asked for and
        never reads, MQTT publishes to a client that only sends) before the connection is cut, else its slot, its
        buffers and whoever waits to write to it (a request handler, a twin update) are held for as long as it
        likes. OPEN only: the handshake has its own deadline, a closing connection its close timer."""
        if self._write_timeout is None or self._state is not _State.OPEN or self._timer is not None:
            return
        assert self._loop is not None
        self._timer = self._loop.call_later(self._write_timeout, self._on_write_timeout)

    def _on_write_timeout(self) -> None:
        self._timer = None
        if self._state is not _State.OPEN or not self._raw_writing_paused:
            return
        _connection_line(logging.INFO, "TLS connection from %s closed: it read nothing we sent for %g s", self._peer,
                         self._write_timeout)
        self._abort()

    # handshake

    def _do_handshake(self) -> None:
        assert self._conn is not None
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            self._handshake_failed(_describe(exc))
            return
        self._flush()
        self._handshake_done()

    def _handshake_done(self) -> None:
        assert self._conn is not None
        self._cancel_timer()
        self._state = _State.OPEN
        self._inner_connected = True
        self._inner.connection_made(self._app_transport)
        if self._raw_writing_paused:
            self._arm_write_timer()
        if self._raw_writing_paused and self._inner_connected and not self._inner_writing_paused:
            self._inner_writing_paused = True
            self._inner.pause_writing()
        # A TLS 1.3 client may send application data in the same flight as its Finished.
        self._do_read()
        if _renew_bios is not None and self._conn is not None and self._state is _State.OPEN:
            _renew_bios(self._conn, True, True)  # the handshake's flights: 4-8 KB an idle device need not keep

    def _handshake_failed(self, reason: str, level: int = logging.INFO) -> None:
        self._cancel_timer()
        self._state = _State.CLOSING
        if not self._failure_logged:
            self._failure_logged = True
            _connection_line(level, "TLS handshake with %s failed: %s", self._peer, reason)
        self._flush()  # the alert, if OpenSSL produced one
        assert self._raw is not None
        self._raw.close()
        self._arm_close_timer()

    def _on_handshake_timeout(self) -> None:
        self._timer = None
        if self._state is not _State.HANDSHAKE:
            return
        self._state = _State.CLOSING
        if not self._failure_logged:
            self._failure_logged = True
            _connection_line(logging.INFO, "TLS handshake with %s failed: timed out after %g s", self._peer,
                             self._handshake_timeout)
        assert self._raw is not None
        self._raw.abort()

    # reading

    def _feed(self, data: bytes) -> bool:
        assert self._conn is not None
        try:
            if _write_records is not None:
                _write_records[0](self._conn, data)
            else:
                self._conn.bio_write(data)
        except SSL.Error as exc:  # memory BIOs only fail on allocation
            self._fail(exc)
            return False
        return True

    def _do_read(self) -> None:
        if self._state is not _State.OPEN or self._reading_paused:
            return
        conn = self._conn
        assert conn is not None
        chunks: list[bytes] = []
        eof = False
        failure: SSL.Error | None = None
        read = _read_plaintext
        if read is not None:
            try:
                read(conn, chunks)
            except SSL.ZeroReturnError:  # close_notify
                eof = True
            except SSL.Error as exc:
                failure = exc
        else:
            sizes = _bio_size
            while True:
                try:
                    chunk = conn.recv(_RECV_SIZE)
                except SSL.WantReadError:
                    break
                except SSL.ZeroReturnError:  # close_notify
                    eof = True
                    break
                except SSL.Error as exc:
                    failure = exc
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                if sizes is not None and not conn.pending() and not sizes(conn, False):
                    break  # no plaintext left in OpenSSL and no ciphertext to read: the next recv would want more
        self._flush()
        if chunks:
            self._inner.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if failure is not None:
            self._fail(failure)
            return
        if eof and not self._eof_delivered and self._state is _State.OPEN:
            self._deliver_eof()
        if self._backlog and self._state is _State.OPEN:
            self._retry_backlog()

    def _deliver_eof(self) -> None:
        self._eof_delivered = True
        keep_open = self._inner.eof_received()
        if not keep_open:
            self._start_close()

    def _pause_reading(self) -> None:
        if self._reading_paused:
            return
        self._reading_paused = True
        if self._raw is not None and self._state is _State.OPEN:
            self._raw.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._raw is not None and self._state is _State.OPEN:
            if not self._raw_writing_paused:  # else resume_writing resumes it
                self._raw.resume_reading()
            assert self._loop is not None
            self._loop.call_soon(self._do_read)  # records may wait inside the SSL object

    def _is_reading(self) -> bool:
        return self._state is _State.OPEN and not self._reading_paused

    # writing

    def evict(self) -> None:
        """The listener is full and this connection is its oldest not yet answered, or its oldest idle one
        (:class:`ConnectionGate`). An idle one is closed as a keep-alive timeout closes it (close_notify, FIN), at once:
        its descriptor is the new connection's."""
        self._admitted = False  # the slot went to the newer connection
        if not self._failure_logged:
            self._failure_logged = True
            log.debug("connection from %s closed to make room: the listener is full and it %s", self._peer,
                      "was idle" if self._answered else "was sent nothing yet")
        if self._answered and self._state is _State.OPEN:
            self._start_close()
            if self._raw is not None and self._raw.get_write_buffer_size():  # the peer reads nothing: not waited for
                self._abort()
            return
        self._abort()

    def idle(self, inner_idle: Callable[[asyncio.Protocol], bool]) -> bool:
        """Open, everything sent taken by the socket, and ``inner_idle`` of the inner protocol (see
        :func:`http_keepalive_idle`)."""
        return (self._state is _State.OPEN and not self._backlog and not self._reading_paused
                and self._raw is not None and not self._raw.get_write_buffer_size() and inner_idle(self._inner))

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is not _State.OPEN or not data:
            return  # like asyncio's transports: writes after close are dropped
        if not self._answered:
            self._answered = True
            if self._gate is not None:
                self._gate.answered(self)
        if self._backlog:
            chunk = bytes(data)
            self._backlog.append(chunk)
            self._backlog_size += len(chunk)
            return
        self._encrypt(data if type(data) is bytes else memoryview(data).cast("B"))
        self._flush()

    def _encrypt(self, data: bytes | memoryview) -> None:
        """Encrypt ``data`` (bytes, or a memoryview of bytes) into the outgoing BIO, flushing between chunks."""
        conn = self._conn
        assert conn is not None
        offset, total = 0, len(data)
        send = _write_records[1] if _write_records is not None else SSL.Connection.send
        view: memoryview | None = None  # made only when the data goes in several calls (no copies of the rest)
        while offset < total:
            if not offset and total <= _SEND_CHUNK:
                piece: bytes | memoryview = data  # the usual: the whole of it in one call
            else:
                if view is None:
                    view = memoryview(data).cast("B")
                piece = view[offset : offset + _SEND_CHUNK]
            try:
                offset += send(conn, piece)
            except SSL.WantReadError:  # not expected without renegotiation; retried on next read
                rest = bytes(data[offset:])
                self._backlog.append(rest)
                self._backlog_size += len(rest)
                return
            except SSL.Error as exc:
                self._fail(exc)
                return
            if offset < total:
                self._flush()

    def _retry_backlog(self) -> None:
        pending, self._backlog, self._backlog_size = self._backlog, [], 0
        for i, chunk in enumerate(pending):
            self._encrypt(chunk)
            if self._backlog or self._state is not _State.OPEN:
                rest = pending[i + 1 :]
                self._backlog.extend(rest)
                self._backlog_size += sum(len(c) for c in rest)
                break
        self._flush()

    def _flush(self) -> None:
        """Move everything OpenSSL produced from the outgoing BIO to the socket."""
        conn, raw = self._conn, self._raw
        if conn is None or raw is None:
            return
        out: list[bytes] = []
        sizes = _bio_size
        if sizes is not None:
            size = sizes(conn, True)
            if not size:
                return
            # a memory BIO hands out all it holds
            out.append(_write_records[2](conn, size) if _write_records is not None else conn.bio_read(size))
        else:
            while True:
                try:
                    data = conn.bio_read(_BIO_READ_SIZE)
                except SSL.WantReadError:
                    break
                except SSL.Error:
                    break
                if not data:
                    break
                out.append(data)
        if not out:
            return
        payload = out[0] if len(out) == 1 else b"".join(out)
        if not raw.is_closing():
            raw.write(payload)
        if len(payload) > _BIO_KEEP and _renew_bios is not None and self._state is _State.OPEN:
            _renew_bios(conn, False, True)

    def _write_buffer_size(self) -> int:
        raw_size = self._raw.get_write_buffer_size() if self._raw is not None else 0
        return raw_size + self._backlog_size

    # closing

    def _start_close(self) -> None:
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSING
        assert self._conn is not None and self._raw is not None
        with contextlib.suppress(SSL.Error):
            self._conn.shutdown()  # queues close_notify; we do not wait for the peer's
        self._flush()
        self._raw.close()
        self._arm_close_timer()

    def _abort(self) -> None:
        """Close at once, dropping what the peer has not taken: ours and the kernel's (:func:`discard_unsent`; a
        device cut off by the application with megabytes queued kept receiving them, then a FIN, for as long as it
        read slowly)."""
        if self._state is _State.CLOSED or self._raw is None:
            return
        self._state = _State.CLOSING
        self._cancel_timer()
        discard_unsent(self._raw)
        self._raw.abort()

    def _fail(self, exc: BaseException) -> None:
        """Fatal TLS error after the handshake: one log line, send the alert, close."""
        if self._state in (_State.CLOSING, _State.CLOSED):
            return
        self._state = _State.CLOSING
        if not self._failure_logged:
            self._failure_logged = True
            _connection_line(logging.INFO, "TLS error on connection from %s: %s", self._peer, _describe(exc))
        self._flush()
        assert self._raw is not None
        self._raw.close()
        self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        """Bound the wait for a peer that does not read our last bytes."""
        self._cancel_timer()
        raw = self._raw
        if raw is not None and self._loop is not None and raw.get_write_buffer_size():
            self._timer = self._loop.call_later(self._close_timeout, self._abort)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _is_closing(self) -> bool:
        return self._state is not _State.OPEN or self._raw is None or self._raw.is_closing()

    # extra info

    def _extra_info(self, name: str, default: Any) -> Any:
        conn = self._conn
        established = conn is not None and self._state is not _State.HANDSHAKE and self._state is not _State.NEW
        if name == "peer_certificate_chain":
            # parsed from the SSL object (which holds the peer's certificates anyway) on each call: a parsed copy
            # kept for the connection's life would cost every idle device ~1.5 KB for a value read at its CONNECT
            return _peer_chain(conn) if established and conn is not None else []
        if name == "ssl_object":
            return conn if conn is not None else default
        if name == "sslcontext":
            return self._context
        if name == "cipher":
            if not established or conn.get_cipher_name() is None:
                return default
            return (conn.get_cipher_name(), conn.get_cipher_version(), conn.get_cipher_bits())
        if name == "tls_version":
            return conn.get_protocol_version_name() if established else default
        if name == "alpn_protocol":
            if not established:
                return default
            proto = conn.get_alpn_proto_negotiated()
            return proto.decode("ascii", "replace") if proto else None
        if self._raw is not None:
            return self._raw.get_extra_info(name, default)
        return default


# --- listeners --------------------------------------------------------------------------------


async def start_tls_server(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    context: SSL.Context,
    *,
    handshake_timeout: float = 10.0,
    close_timeout: float = 10.0,
    backlog: int = 1024,
    gate: ConnectionGate | None = None,
    reuse_port: bool = False,
    write_timeout: float | None = None,
) -> asyncio.Server:
    """Listen on ``host:port``; every connection gets a :class:`TlsProtocol` around a new inner protocol
    (at most ``gate.limit`` at a time when a gate is given). ``reuse_port``: SO_REUSEPORT, so that each of
    several worker processes has its own listening socket on the port and the kernel spreads connections.
    ``write_timeout``: how long a peer may leave what we send unread before its connection is cut (None: forever)."""
    return await _listen(protocol_factory, host, port, context, handshake_timeout, close_timeout, backlog, None, gate,
                         reuse_port, write_timeout)


async def _listen(
    protocol_factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    context: SSL.Context,
    handshake_timeout: float,
    close_timeout: float,
    backlog: int,
    track: weakref.WeakSet[TlsProtocol] | None,
    gate: ConnectionGate | None = None,
    reuse_port: bool = False,
    write_timeout: float | None = None,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()

    def factory() -> TlsProtocol:
        proto = TlsProtocol(protocol_factory(), context, handshake_timeout=handshake_timeout, close_timeout=close_timeout,
                            gate=gate, write_timeout=write_timeout)
        if track is not None:
            track.add(proto)
        return proto

    return await loop.create_server(factory, host, port, backlog=backlog, reuse_address=True,
                                    reuse_port=reuse_port or None)


def _aiohttp_waiting(handler: asyncio.Protocol) -> bool:
    """An aiohttp connection between requests: no request in progress and its loop waiting for the next one —
    aiohttp's own test before its keep-alive timer closes a connection (``RequestHandler._process_keepalive``).
    A connection whose next request header is still arriving counts as idle too (aiohttp waits for whole headers;
    the keep-alive timer would cut it as well). Private attributes, hence read with defaults: a release without
    them makes no connection idle (never closed to make room; tests/test_tls.py fails), not a wrong one."""
    waiter = getattr(handler, "_waiter", None)
    return (isinstance(waiter, asyncio.Future) and not waiter.done()
            and getattr(handler, "_request_in_progress", True) is False)


def http_keepalive_idle(connection: object) -> bool:
    """For an HTTPS :class:`ConnectionGate`: ``connection`` is a :class:`TlsProtocol` whose aiohttp handler waits
    for its next request with nothing left to send."""
    return isinstance(connection, TlsProtocol) and connection.idle(_aiohttp_waiting)


@functools.cache
def _aiohttp_site_class() -> type:
    """Defined lazily so that importing this module does not import aiohttp (MQTT-only users)."""
    from aiohttp import web
    from yarl import URL

    class DeviceTlsSite(web.BaseSite):
        """An aiohttp site served through :class:`TlsProtocol`; runner.cleanup() stops it like TCPSite.

        Stopping also aborts connections still in their handshake: otherwise one completing after
        runner.cleanup() would reach request handlers of an application already cleaned up.
        """

        __slots__ = ("_host", "_port", "_context", "_handshake_timeout", "_close_timeout", "_protocols", "_gate",
                     "_reuse_port", "_write_timeout")

        def __init__(
            self,
            runner: web.BaseRunner,
            host: str,
            port: int,
            context: SSL.Context,
            *,
            handshake_timeout: float = 10.0,
            close_timeout: float = 10.0,
            backlog: int = 1024,
            gate: ConnectionGate | None = None,
            reuse_port: bool = False,
            write_timeout: float | None = None,
        ) -> None:
            super().__init__(runner, backlog=backlog)
            self._gate = gate
            self._write_timeout = write_timeout
            self._reuse_port = reuse_port
            self._host, self._port, self._context = host, port, context
            self._handshake_timeout, self._close_timeout = handshake_timeout, close_timeout
            self._protocols: weakref.WeakSet[TlsProtocol] = weakref.WeakSet()

        @property
        def name(self) -> str:
            return str(URL.build(scheme="https", host=self._host or "0.0.0.0", port=self._port))

        async def start(self) -> None:
            await super().start()
            server = self._runner.server
            assert server is not None
            self._server = await _listen(server, self._host, self._port, self._context, self._handshake_timeout,
                                         self._close_timeout, self._backlog, self._protocols, self._gate,
                                         self._reuse_port, self._write_timeout)

        async def stop(self) -> None:
            await super().stop()
            for proto in list(self._protocols):
                if proto._state in (_State.NEW, _State.HANDSHAKE):
                    proto._abort()

    return DeviceTlsSite


async def start_aiohttp_site(
    runner: web.BaseRunner,
    host: str,
    port: int,
    context: SSL.Context,
    **kw: Any,
) -> asyncio.Server:
    """Serve an aiohttp runner over the device TLS layer; handlers read the client chain from
    ``request.transport.get_extra_info("peer_certificate_chain")``.

    The listener is registered as a site of ``runner``, so ``runner.cleanup()`` stops it and closes
    open keep-alive connections (sending close_notify); closing the returned server afterwards is
    harmless. ``kw``: ``handshake_timeout``, ``close_timeout``, ``backlog``, ``gate``, ``reuse_port``, ``write_timeout`` as for
    :func:`start_tls_server`. Calls ``runner.setup()`` if that has not happened yet.
    """
    if runner.server is None:
        await runner.setup()
    site = _aiohttp_site_class()(runner, host, port, context, **kw)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    return server
