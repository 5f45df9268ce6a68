"""PKCS#11 key custody: CA keys generated on an HSM token, never leaving it, used through it for every signature.

A key is made on the token (``C_GenerateKeyPair``, EC P-384) as a private object that is sensitive, never
extractable and may only sign, with a public twin under the same CKA_LABEL and CKA_ID; the store keeps that
reference and the public key, nothing private. A signature is ``CKM_ECDSA`` over the SHA-384 digest (raw r||s from
the token, DER-encoded here), so what :class:`Signer` callers get is the same as from a software key.

Process model: each process opens the PKCS#11 module itself (python-pkcs11's ``lib``, once per module path and
process) and holds **one logged-in session per token**; every call to the module is made under the module's lock,
because python-pkcs11 initialises it with ``C_Initialize(NULL)``, which lets a module assume one caller at a time.
``opendps serve --workers N`` spawns its workers (no fork), and each opens its own module and session; should a
process fork anyway, the child re-initialises the module before its first call and never uses the parent's session.
The calls release the GIL, so the event loop runs while the token signs.

A session lost mid-run (the session handle invalid, the device removed or re-inserted, the module re-initialised)
is re-opened — token found again by label, logged in again, key found again — and the call retried once; a second
failure, a key that is not on the token, or a token that does not answer is :class:`KeyUnavailable` (503 with
Retry-After: nothing that depends on the signature is written). There is no fallback to software keys.

A token that does not answer (its device or token directory gone, the module unable to initialise) is an outage of
that token, told once when it begins and once when the token answers again, like the database's: meanwhile calls are
refused at once, and at most one call per :data:`PROBE_INTERVAL` tries the token again (re-initialising the module,
which is what brings a device or token directory back), so a busy node neither logs a line per request nor holds its
domain threads on a token that is away. A call that hangs in the module holds its own thread only: the calls behind
it are refused once it has run :data:`STUCK_AFTER` seconds. A PIN the token refused is never tried again by this
process (a token locks itself after a few wrong PINs): its calls are refused until it is restarted with the right one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from opendps.errors import ConfigurationError, ServiceUnavailable

if TYPE_CHECKING:
    from pkcs11.types import Session

log = logging.getLogger("opendps.pkcs11")

BACKEND = "pkcs11"
PIN_ENV = "OPENDPS_PKCS11_PIN"
LABEL_PREFIX = "opendps-"  # CKA_LABEL of a key: the prefix and the key id, so an operator sees whose keys these are
INSTALL_HINT = "pip install 'opendps[hsm]' (python-pkcs11)"
RETRY_AFTER = 5  # seconds a client refused because a CA key cannot sign now is told to wait (Retry-After)
PROBE_INTERVAL = 1.0  # seconds between two attempts to re-open a token that is away; calls meanwhile are refused at once
STUCK_AFTER = 5.0  # seconds a call may hold the module before the token counts as hung: the calls after it are refused
_T = TypeVar("_T")


class KeyUnavailable(ServiceUnavailable):
    """A CA key cannot sign now: its token does not answer, or the key is not on it (503 with Retry-After: retry later;
    nothing that needed the signature was written)."""

    error_code = 503002

    def __init__(self, message: str, *, info: dict[str, str] | None = None, reason: str | None = None) -> None:
        super().__init__(message, info={"retryAfter": str(RETRY_AFTER), **(info or {})},
                         reason=reason or "key_unavailable")


def read_pin(pin_file: Path | str | None = None) -> str:
    """The token's user PIN: the first line of ``pin_file`` when given, else ``OPENDPS_PKCS11_PIN``. Never logged,
    never written to config.json."""
    if pin_file:
        try:
            text = Path(pin_file).read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the PKCS#11 PIN file {pin_file}: {exc.strerror or exc}") from exc
        pin = text.splitlines()[0].strip() if text.strip() else ""
        if not pin:
            raise ConfigurationError(f"the PKCS#11 PIN file {pin_file} is empty")
        return pin
    pin = os.environ.get(PIN_ENV, "")
    if not pin:
        raise ConfigurationError(f"the PKCS#11 token's user PIN is needed: set {PIN_ENV} or give --pkcs11-pin-file")
    return pin


@dataclass(frozen=True)
class Pkcs11Config:
    """Where the token is: the module (shared library), the token's label, the user PIN (never in repr)."""

    module: str
    token_label: str
    pin: str = field(repr=False)


@dataclass(frozen=True)
class TokenKey:
    """A key pair on the token, as the store references it."""

    token: str  # the token's label
    label: str  # CKA_LABEL of the private and the public object
    cka_id: bytes  # their CKA_ID
    public_key: ec.EllipticCurvePublicKey


def key_label(key_id: str) -> str:
    return LABEL_PREFIX + key_id


def _pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError as exc:
        raise ConfigurationError(f"the pkcs11 key backend needs python-pkcs11: {INSTALL_HINT}") from exc
    return pkcs11


class _OpenFailed(Exception):
    """The token could not be opened (message says why): a ConfigurationError at start, KeyUnavailable later."""


class _PinRefused(_OpenFailed):
    """The token refused the PIN (wrong, or locked): never tried again by this process."""


class _TokenDown(Exception):
    """The token does not answer, even after the session was re-opened (message says why): an outage of the token."""


@dataclass
class _TokenState:
    """One token's session in this process, shared by every :class:`Pkcs11Token` naming it: a process holds one
    session (and one login) per token."""

    session: Session | None = None
    generation: int = -1  # the module generation the session belongs to
    pin_digest: bytes = b""  # SHA-256 of the PIN the session logged in with (a second login is not checked by C_Login)
    keys: dict[bytes, Any] = field(default_factory=dict)  # CKA_ID -> private key object of the current session
    refused_pin: bytes = b""  # SHA-256 of a PIN the token refused: not tried again (each try counts toward a lock)
    refused_why: str = ""  # what the token said about it
    down_since: float | None = None  # monotonic time the token stopped answering, while it does not
    down_cause: str = ""  # why, as first seen
    next_try: float = 0.0  # while down: before this, calls are refused without touching the module
    refused: int = 0  # calls refused during the current outage


class _Module:
    """One PKCS#11 module (shared library) in this process: loaded and initialised once, one caller at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.generation = 0  # bumped when the module is (re-)initialised: sessions of an older one are gone
        self._lib: Any = None  # pkcs11.lib (typed as a function in python-pkcs11's stubs)
        self._forked = False
        self._failing = False  # the last C_Initialize failed (the device or token directory away): told already
        self.busy_since: float | None = None  # when the call holding :attr:`lock` began (monotonic), while one does
        self._hung_told = False  # a call was found hung, and said so: its return is said too
        self.slots: dict[str, _TokenState] = {}  # token label -> this process's session on it

    @contextmanager
    def turn(self, label: str, what: str) -> Iterator[None]:
        """:attr:`lock` for one call — or :class:`KeyUnavailable` at once when the call holding it has run for
        :data:`STUCK_AFTER` seconds: a token that hangs (a network HSM unreachable, SoftHSM blocked on its files) holds
        the one thread inside it, not every domain thread of the process behind it (no HTTP answer, no hub CONNECT,
        no registration on a software key)."""
        while True:
            since = self.busy_since
            wait = STUCK_AFTER if since is None else STUCK_AFTER - (time.monotonic() - since)
            if self.lock.acquire(timeout=wait) if wait > 0 else self.lock.acquire(blocking=False):
                break
            since = self.busy_since
            held = 0.0 if since is None else time.monotonic() - since
            if held >= STUCK_AFTER:
                if not self._hung_told:
                    self._hung_told = True
                    log.warning("PKCS#11 token %r: a call to module %s has not returned for %.0f s (the token or the "
                                "way to it hangs): its calls are refused as retryable (HTTP 503) until it returns",
                                label, self.path, held)
                raise KeyUnavailable(f"{what}: PKCS#11 token {label!r} has not answered a call for {held:.0f} s; "
                                     "retry later")
            # else another call took the module meanwhile: wait for that one, as long
        outer = self.busy_since is None  # not a call of this thread's own within its call (the lock is re-entrant)
        if outer:
            self.busy_since = time.monotonic()
        try:
            yield
        finally:
            if outer:
                took, self.busy_since = time.monotonic() - (self.busy_since or 0.0), None
                if self._hung_told and took >= STUCK_AFTER:
                    self._hung_told = False
                    log.info("PKCS#11 token %r: the call that hung returned after %.1f s", label, took)
            self.lock.release()

    def slot(self, label: str) -> _TokenState:
        """This process's state for the token labelled ``label`` (call with :attr:`lock` held)."""
        state = self.slots.get(label)
        if state is None:
            state = self.slots[label] = _TokenState()
        return state

    def lib(self) -> Any:
        """The initialised module (call with :attr:`lock` held)."""
        if self._lib is None:
            pkcs11 = _pkcs11()
            if not Path(self.path).is_file():
                raise _OpenFailed(f"PKCS#11 module {self.path} does not exist (--pkcs11-module: the HSM vendor's "
                                  "library, e.g. /usr/lib/softhsm/libsofthsm2.so)")
            try:
                self._lib = pkcs11.lib(self.path)
            except pkcs11.PKCS11Error as exc:
                raise _OpenFailed(f"cannot load PKCS#11 module {self.path}: {_describe(exc)}") from None
            self.generation += 1
        elif self._forked:  # a forked child: the parent's initialisation is not ours (PKCS#11 v2.40, 6.7.1)
            self.reinitialize()
        return self._lib

    def reinitialize(self) -> None:
        """C_Finalize + C_Initialize: every session of this module in this process is gone afterwards. A failure is
        told once, not at each of the tries made while the token is away (the token's outage line says the rest)."""
        assert self._lib is not None
        try:
            self._lib.reinitialize()
        except Exception as exc:  # noqa: BLE001 - C_Finalize of a module that lost its device: initialise anyway
            self._tell("re-initialising: %s", _describe(exc))
            try:
                self._lib.initialize()
            except Exception as again:  # noqa: BLE001 - the next call says what is wrong, as KeyUnavailable
                self._tell("C_Initialize failed: %s", _describe(again))
                self._failing = True
            else:
                self._failing = False
        else:
            self._failing = False
        self._forked = False
        self.generation += 1

    def _tell(self, message: str, detail: str) -> None:
        log.log(logging.DEBUG if self._failing else logging.WARNING, "PKCS#11 module %s: " + message, self.path, detail)

    def after_fork(self) -> None:
        self.lock = threading.RLock()  # the parent's may have been held by a thread the child does not have
        self.busy_since, self._hung_told = None, False
        self._forked = self._lib is not None
        self.generation += 1


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def _module(path: str) -> _Module:
    path = os.path.realpath(path)
    with _MODULES_LOCK:
        module = _MODULES.get(path)
        if module is None:
            module = _MODULES[path] = _Module(path)
        return module


def _after_fork_in_child() -> None:
    global _MODULES_LOCK
    _MODULES_LOCK = threading.Lock()
    for module in _MODULES.values():
        module.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _describe(exc: BaseException) -> str:
    """A PKCS#11 error as words: python-pkcs11's class name (CKR_* as CamelCase) and its message, if any."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


# errors after which a fresh session may work: the session or the device went away, or a handle went stale
_RECOVERABLE = ("SessionHandleInvalid", "SessionClosed", "DeviceRemoved", "DeviceError", "TokenNotPresent",
                "TokenNotRecognised", "UserNotLoggedIn", "ObjectHandleInvalid", "KeyHandleInvalid", "GeneralError",
                "FunctionFailed", "DeviceMemory", "PKCS11Error")


def _recoverable(exc: BaseException) -> bool:
    return type(exc).__name__ in _RECOVERABLE


class Pkcs11Token:
    """This process's connection to one token: one logged-in session, re-opened when lost."""

    backend = BACKEND

    def __init__(self, config: Pkcs11Config) -> None:
        self.config = config
        self._module = _module(config.module)

    @property
    def label(self) -> str:
        return self.config.token_label

    @property
    def _state(self) -> _TokenState:
        return self._module.slot(self.label)

    def __repr__(self) -> str:  # never the PIN
        return f"Pkcs11Token(module={self.config.module!r}, token={self.label!r})"

    # ---- opening ----
    def open(self) -> None:
        """Load the module, find the token, log in — or a one-line ConfigurationError naming what failed (for
        ``init`` and ``serve`` to refuse to start)."""
        with self._module.lock:
            try:
                self._session_here()
            except _OpenFailed as exc:
                raise ConfigurationError(str(exc)) from None

    def _session_here(self) -> Session:
        """This process's session on the token, opened (and logged in) if there is none yet."""
        lib = self._module.lib()
        state = self._state
        digest = hashlib.sha256(self.config.pin.encode()).digest()
        if state.session is not None and state.generation == self._module.generation:
            if state.pin_digest != digest:
                raise _OpenFailed(self._wrong_pin())
            return state.session
        self._forget()
        pkcs11 = _pkcs11()
        token = self._find(lib, pkcs11)
        try:
            try:
                session = token.open(rw=True, user_pin=self.config.pin)
            except pkcs11.UserAlreadyLoggedIn:  # a session of this process this module lost track of holds it
                session = token.open(rw=True)
        except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange):
            raise _PinRefused(self._wrong_pin()) from None
        except pkcs11.PinLocked:
            raise _PinRefused(f"the user PIN of PKCS#11 token {self.label!r} is locked: the security officer "
                              "must reset it") from None
        except pkcs11.PKCS11Error as exc:
            raise _OpenFailed(f"cannot open a session on PKCS#11 token {self.label!r}: {_describe(exc)}") from None
        state.session = cast("Session", session)
        state.generation = self._module.generation
        state.pin_digest = digest
        return state.session

    def _find(self, lib: Any, pkcs11: Any) -> Any:
        """The token by label; a token not in the slot list is looked for once more after re-initialising the
        module (a device plugged in, or a token made, after the module was loaded)."""
        for attempt in (1, 2):
            try:
                return lib.get_token(token_label=self.label)
            except pkcs11.NoSuchToken:
                if attempt == 2:
                    raise _OpenFailed(f"PKCS#11 token {self.label!r} is not present in module {self.config.module} "
                                      "(check the label: softhsm2-util --show-slots / pkcs11-tool -L)") from None
                self._module.reinitialize()
            except pkcs11.MultipleTokensReturned:
                raise _OpenFailed(f"several PKCS#11 tokens are labelled {self.label!r} in module "
                                  f"{self.config.module}: give each token its own label") from None
            except pkcs11.PKCS11Error as exc:
                # e.g. SoftHSM's token directory gone (GeneralError), or a module whose C_Initialize failed meanwhile
                # (CKR_CRYPTOKI_NOT_INITIALIZED): only a re-initialised module sees the token again once it is back
                if attempt == 2:
                    raise _OpenFailed(f"PKCS#11 token {self.label!r} cannot be reached: module {self.config.module} "
                                      f"cannot list its tokens: {_describe(exc)}") from None
                self._module.reinitialize()
        raise AssertionError("unreachable")

    def _wrong_pin(self) -> str:
        return (f"wrong user PIN for PKCS#11 token {self.label!r} (from {PIN_ENV} or the PIN file); the token locks "
                "itself after a few wrong PINs")

    def _forget(self) -> None:
        """Drop the session (closing it if it still belongs to this process's module) and the key handles."""
        state = self._state
        session, state.session, state.keys, state.pin_digest = state.session, None, {}, b""
        if session is not None and state.generation == self._module.generation:
            try:
                session.close()  # logs out too, so the next open logs in afresh
            except Exception as exc:  # noqa: BLE001 - it is being dropped because it failed
                log.debug("closing a lost PKCS#11 session: %s", _describe(exc))

    def close(self) -> None:
        with self._module.lock:
            self._forget()

    # ---- the one way every call is made ----
    def _call(self, what: str, op: Callable[[Session], _T]) -> _T:
        """``op`` on this process's session, under the module lock; a lost session is re-opened and ``op`` retried
        once (a module that lost its state is re-initialised first); then :class:`KeyUnavailable`. While the token is
        away, calls are refused at once but for one every :data:`PROBE_INTERVAL`, which tries the token again; while a
        call hangs, the others are refused after :data:`STUCK_AFTER` (:meth:`_Module.turn`)."""
        with self._module.turn(self.label, what):
            state = self._state
            digest = hashlib.sha256(self.config.pin.encode()).digest()
            if state.refused_pin == digest:  # never a second wrong PIN: the token counts them and locks itself
                raise KeyUnavailable(f"{what}: {state.refused_why}; restart opendps with the token's right PIN")
            if state.down_since is not None and time.monotonic() < state.next_try:
                state.refused += 1
                raise KeyUnavailable(f"{what}: PKCS#11 token {self.label!r} is unavailable ({state.down_cause}); "
                                     "retry later")
            try:
                result = self._attempt(what, op)
            except _PinRefused as exc:
                state.refused_pin, state.refused_why = digest, str(exc)
                log.error("PKCS#11 token %r does not take this process's PIN any more (%s). It is not tried again: "
                          "the token's keys cannot sign until opendps is restarted with the right PIN", self.label, exc)
                raise KeyUnavailable(f"{what}: {exc}") from None
            except _TokenDown as exc:
                self._down(str(exc))
                raise KeyUnavailable(f"{what}: {exc}") from None
            except KeyUnavailable:  # the token answered (the key is not on it...): not an outage of the token
                self._answered()
                raise
            self._answered()
            return result

    def _attempt(self, what: str, op: Callable[[Session], _T]) -> _T:
        """``op``, and once more on a re-opened session if the session or the device went away; :class:`_TokenDown`
        if the token still does not answer, :class:`KeyUnavailable` for what the token answered."""
        pkcs11 = _pkcs11()
        try:
            return op(self._session_here())
        except _PinRefused:
            raise
        except _OpenFailed as exc:
            cause = str(exc)
        except pkcs11.PKCS11Error as exc:
            if not _recoverable(exc):
                raise KeyUnavailable(f"{what}: PKCS#11 token {self.label!r} answered {_describe(exc)}") from None
            cause = _describe(exc)
            if type(exc).__name__ in ("DeviceRemoved", "TokenNotPresent", "TokenNotRecognised", "GeneralError"):
                self._forget()
                self._module.reinitialize()  # a re-inserted device shows up after C_Initialize
        if self._state.down_since is not None:  # a probe while the token is away: once is enough, and not news
            self._forget()
            raise _TokenDown(cause)
        log.warning("PKCS#11 token %r: %s (%s); re-opening the session and retrying once", self.label, cause, what)
        self._forget()
        try:
            return op(self._session_here())
        except _PinRefused:
            raise
        except _OpenFailed as exc:
            raise _TokenDown(str(exc)) from None
        except pkcs11.PKCS11Error as exc:
            self._forget()  # the next call starts afresh
            message = f"PKCS#11 token {self.label!r} answered {_describe(exc)} after the session was re-opened"
            if not _recoverable(exc):
                raise KeyUnavailable(f"{what}: {message}") from None
            raise _TokenDown(message) from None

    def _down(self, cause: str) -> None:
        """A call found the token away (module lock held): said once per outage; the next try in a while."""
        state = self._state
        now = time.monotonic()
        state.next_try = now + PROBE_INTERVAL
        state.refused += 1
        if state.down_since is None:
            state.down_since, state.down_cause = now, cause
            log.warning("PKCS#11 token %r is unavailable (%s): its keys' signatures are refused as retryable (HTTP "
                        "503, MQTT res/503) and the token is tried again every %.0f s until it answers", self.label,
                        cause, PROBE_INTERVAL)

    def _answered(self) -> None:
        """The token answered a call (module lock held): if it was away, the outage is over."""
        state = self._state
        if state.down_since is None:
            return
        took, refused = time.monotonic() - state.down_since, state.refused
        state.down_since, state.down_cause, state.refused = None, "", 0
        log.info("PKCS#11 token %r answers again after %.1f s (%d call(s) refused meanwhile)", self.label, took,
                 refused)

    def _private_key(self, session: Session, label: str, cka_id: bytes) -> Any:
        keys = self._state.keys
        key = keys.get(cka_id)
        if key is None:
            pkcs11 = _pkcs11()
            try:
                key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, key_type=pkcs11.KeyType.EC,
                                      label=label, id=cka_id)
            except pkcs11.NoSuchKey:
                raise KeyUnavailable(f"CA key {label!r} (CKA_ID {cka_id.hex()}) is not on PKCS#11 token "
                                     f"{self.label!r}: it was deleted, or this is another token with the same "
                                     "label") from None
            except pkcs11.MultipleObjectsReturned:
                raise KeyUnavailable(f"PKCS#11 token {self.label!r} holds several private keys labelled {label!r} "
                                     f"with CKA_ID {cka_id.hex()}: remove the ones opendps did not make") from None
            keys[cka_id] = key
        return key

    # ---- what the key store asks ----
    def generate(self, key_id: str) -> TokenKey:
        """A new EC P-384 key pair on the token: the private key sensitive, never extractable, private, sign only."""
        pkcs11 = _pkcs11()
        from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

        label = key_label(key_id)
        cka_id = bytes.fromhex(key_id.rpartition("-")[2]) if _is_hex(key_id.rpartition("-")[2]) else \
            hashlib.sha256(key_id.encode()).digest()[:8]
        a = pkcs11.Attribute

        def make(session: Session) -> bytes:
            params = session.create_domain_parameters(
                pkcs11.KeyType.EC, {a.EC_PARAMS: encode_named_curve_parameters("secp384r1")}, local=True)
            public, private = params.generate_keypair(
                store=True, label=label, id=cka_id,
                public_template={a.TOKEN: True, a.PRIVATE: False, a.VERIFY: True, a.ENCRYPT: False, a.WRAP: False,
                                 a.DERIVE: False},
                private_template={a.TOKEN: True, a.PRIVATE: True, a.SENSITIVE: True, a.EXTRACTABLE: False,
                                  a.SIGN: True, a.DECRYPT: False, a.UNWRAP: False, a.DERIVE: False})
            self._state.keys[cka_id] = private
            return bytes(encode_ec_public_key(public))

        spki = self._call(f"generating CA key {label!r}", make)
        public_key = serialization.load_der_public_key(spki)
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp384r1":
            raise KeyUnavailable(f"PKCS#11 token {self.label!r} made a key that is not EC P-384 for {label!r}")
        return TokenKey(self.label, label, cka_id, public_key)

    def sign_digest(self, label: str, cka_id: bytes, digest: bytes) -> bytes:
        """The token's raw ECDSA signature (r||s) over ``digest``."""
        pkcs11 = _pkcs11()

        def sign(session: Session) -> bytes:
            key = self._private_key(session, label, cka_id)
            return bytes(key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA))

        return self._call(f"signing with CA key {label!r}", sign)

    def destroy(self, label: str, cka_id: bytes) -> int:
        """Delete the key pair's objects from the token; how many were deleted."""
        def delete(session: Session) -> int:
            found = list(session.get_objects({_pkcs11().Attribute.LABEL: label, _pkcs11().Attribute.ID: cka_id}))
            for obj in found:
                obj.destroy()
            self._state.keys.pop(cka_id, None)
            return len(found)

        return self._call(f"deleting CA key {label!r}", delete)


def _is_hex(text: str) -> bool:
    return len(text) >= 2 and len(text) % 2 == 0 and all(c in "0123456789abcdef" for c in text)


class Pkcs11Signer:
    """A CA key on a token: the public key from the store, every signature from the token. The first signature
    this process makes is verified against the stored public key, so a token holding another key under the same
    label and id is caught before anything it signed is used."""

    def __init__(self, key_id: str, public_key: ec.EllipticCurvePublicKey, token: Pkcs11Token, label: str,
                 cka_id: bytes) -> None:
        self.key_id = key_id
        self._public_key = public_key
        self.token = token
        self.label = label
        self.cka_id = cka_id
        self._verified = False

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        raw = self.token.sign_digest(self.label, self.cka_id, hashlib.sha384(data).digest())
        half = len(raw) // 2
        if len(raw) != 96:
            raise KeyUnavailable(f"PKCS#11 token {self.token.label!r} returned a {len(raw)}-byte signature for CA key "
                                 f"{self.label!r}; a P-384 ECDSA signature is 96 bytes")
        der = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        if not self._verified:
            try:
                self._public_key.verify(der, data, ec.ECDSA(hashes.SHA384()))
            except InvalidSignature:
                raise KeyUnavailable(f"CA key {self.label!r} on PKCS#11 token {self.token.label!r} does not match the "
                                     "public key on record: the token holds another key under its label and id") from None
            self._verified = True
        return der

    def __repr__(self) -> str:
        return f"Pkcs11Signer(key_id={self.key_id!r}, token={self.token.label!r}, label={self.label!r})"
