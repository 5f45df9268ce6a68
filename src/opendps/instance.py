"""One opendps installation: its data directory, database, master key, ID scope, owner credentials
and local TLS material. ``opendps init`` creates it; ``serve``, ``info`` and the CLI open it.

Data directory (default ``./.opendps``)::

    config.json      last-used endpoints and database URL (no secrets)
    master.key       0600, base64 of 32 bytes; encrypts CA keys at rest (or OPENDPS_MASTER_KEY); CA keys on a
                     PKCS#11 token (--key-backend pkcs11) are not in the database at all (opendps.pki.pkcs11)
    opendps.db       SQLite database (unless a PostgreSQL URL is given)
    tls/server-ca.pem  the local server CA clients must trust
    tls/server.pem, tls/server.key (0600)  this node's TLS server certificate (P-256)
    tls/server.lock    held (flock) while the server.pem/server.key pair is checked or replaced

Facts every node must share (ID scope, access policy keys wrapped by the master key, the server
CA) live in the database, so several nodes on one PostgreSQL agree. The domain services of the
installation are wired once (:mod:`opendps.services`) and reached as ``instance.services``; the access
policies are :class:`opendps.provisioning.AccessPolicies`' (init makes the owner's).
"""

from __future__ import annotations

import base64
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from opendps.errors import ConfigurationError, NotFound
from opendps.files import replace_all, write_atomic
from opendps.hub import DEFAULT_HUB
from opendps.logs import FORMATS as LOG_FORMATS
from opendps.pki import KeyStore, Publication, load_master_key, root_ca, sign_builder
from opendps.pki.keys import BACKENDS, MASTER_KEY_CHECK, MASTER_KEY_ENV, custody_settings, remember_custody, tokens_in_use
from opendps.pki.pkcs11 import PIN_ENV, Pkcs11Config, Pkcs11Token, read_pin
from opendps.pki.profiles import BACKDATE, random_serial
from opendps.pki.status import CRL_PATH
from opendps.provisioning.access import HUB_OWNER_POLICY as HUB_OWNER_POLICY  # each hub's own (Hubs.owner_keys)
from opendps.provisioning.access import OWNER_POLICY as OWNER_POLICY
from opendps.provisioning.access import OWNER_RIGHTS, AccessPolicies
from opendps.services import Services, wire
from opendps.store import SQLITE_BUSY_TIMEOUT, SQLITE_SYNCHRONOUS, Store, add_setting, sqlite_url, unavailable
from opendps.transport import nats_client, sas, shown

DATA_DIR_ENV = "OPENDPS_DATA_DIR"
DB_ENV = "OPENDPS_DB"
BUS_ENV = "OPENDPS_BUS"
STORE_BUS = "store"  # --bus store: back to the database's own carrier (a NATS URL, once given, is saved)
MAX_WORKERS = 256
DEFAULT_DATA_DIR = ".opendps"
SERVER_CERT_DAYS = 365
SERVER_CERT_RENEW_BEFORE = timedelta(days=30)  # re-issued when it expires within this


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _is_host(value: object) -> bool:
    """A DNS name (labels of 1-63 letters, digits, '-' or '_'; at most 253 characters) or an IP address."""
    if not isinstance(value, str) or not value:
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _seconds(name: str, value: object, low: float, high: float = 3600) -> None:
    """A duration setting (config.json may hold anything): a number of seconds within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigurationError(f"{name} {value!r} is out of range {low:g}-{high:g} seconds")


@dataclass
class Settings:
    """Where the instance lives and how it is reached; persisted in config.json minus overrides."""

    data_dir: Path = field(default_factory=default_data_dir)
    db: str | None = None
    host: str = "127.0.0.1"
    hostname: str = "localhost"
    https_port: int = 8443
    mqtt_port: int = 8883
    amqp_port: int = 5671  # service-side C2D over AMQP 1.0 (azure-iot-hub's send_c2d_message); 0 = off
    http_port: int = 8080  # plain HTTP: CRLs and OCSP for relying parties; 0 = off (then named on the HTTPS port)
    metrics_port: int = 0  # plain HTTP: GET /metrics only (Prometheus), on metrics_host; 0 = off (HTTPS /metrics stays)
    metrics_host: str = "127.0.0.1"  # the metrics listener's bind address: loopback unless the operator opens it
    log_format: str = "text"  # text | json (opendps.logs)
    lint: bool = True
    client_timeout: float = 60.0  # seconds a client may stay silent (see frontends.runtime.Runtime)
    # SQLite: "normal" (a commit survives the process dying) or "full" (also a power cut: the WAL synced at every commit)
    sqlite_synchronous: str = "normal"
    # SQLite: seconds a write waits for another process's lock (a backup, the sqlite3 shell) before a 503 + Retry-After
    sqlite_busy_timeout: float = SQLITE_BUSY_TIMEOUT
    workers: int = 0  # server processes on this host; 0 = one per core on PostgreSQL, one on SQLite (opendps.workers)
    bus: str | None = None  # NATS server carrying live state between nodes (default: the store's own, opendps.cluster)
    # CA keys on a PKCS#11 token (opendps.pki.pkcs11): the module and PIN file are this host's (config.json); the
    # default backend and the token label are the installation's (instance_settings), given to init; the PIN never
    # leaves the environment (OPENDPS_PKCS11_PIN) or its file
    key_backend: str | None = None  # init: where new CA keys go (software | pkcs11); None keeps the installation's
    pkcs11_module: str | None = None
    pkcs11_token_label: str | None = None
    pkcs11_pin_file: str | None = None
    # what opening found worth telling the operator (not errors); the CLI prints them, serve logs them
    warnings: list[str] = field(default_factory=list, compare=False)

    @property
    def config_path(self) -> Path:
        return self.data_dir / "config.json"

    @property
    def db_url(self) -> str:
        return self.db or sqlite_url((self.data_dir / "opendps.db").resolve())

    @property
    def service_host(self) -> str:
        """HostName of the service API as used in connection strings and SAS ``sr``."""
        return self.hostname if self.https_port == 443 else f"{self.hostname}:{self.https_port}"

    def publication(self) -> Publication | None:
        """Where certificates say their CRL and OCSP are: the plain-HTTP listener on the public host name, or the
        HTTPS listener when that is off. None (with a warning) for a host name a certificate's URL may not carry:
        then certificates name none, rather than a URL this installation does not serve."""
        scheme, port = ("http", self.http_port) if self.http_port else ("https", self.https_port)
        try:
            return Publication.at(scheme, self.hostname, port)
        except ValueError as exc:
            warning = (f"certificates will name no CRL or OCSP URL: {exc}; give --hostname a fully qualified name "
                       "or an IP address")
            if warning not in self.warnings:
                self.warnings.append(warning)
            return None

    @classmethod
    def load(cls, data_dir: Path | None = None, **overrides: str | int | bool | None) -> Settings:
        """Settings from config.json (if any), then OPENDPS_DB, then explicit non-None overrides."""
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        values: dict[str, object] = {}
        cfg = data_dir / "config.json"
        if cfg.exists():
            try:
                values = json.loads(cfg.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"cannot read {cfg}: {exc}") from exc
            if not isinstance(values, dict):
                raise ConfigurationError(f"{cfg} does not hold a JSON object")
        if os.environ.get(DB_ENV):
            values["db"] = os.environ[DB_ENV]
        if os.environ.get(BUS_ENV):
            values["bus"] = os.environ[BUS_ENV]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("bus") == STORE_BUS:
            values["bus"] = None
        known = {f for f in cls.__dataclass_fields__ if f not in ("data_dir", "warnings")}
        return cls(data_dir=data_dir, **{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]

    def check(self) -> None:
        """Refuse what cannot work before anything is opened or written: ports, names, the database URL (config.json
        may have been edited by hand: every value's type too)."""
        for name in ("host", "hostname", "metrics_host"):
            value = getattr(self, name)
            if name == "hostname":  # it goes into devices' URLs as it is: no IPv6 literal
                ok, kind = _is_host(value) and ":" not in value, "a DNS name or an IPv4 address"
            else:
                ok, kind = _is_host(value), "a host name or an IP address"
            if not ok:
                raise ConfigurationError(f"{name.replace('_', ' ')} {shown(value, 80)} is not {kind}")
        for name in ("pkcs11_module", "pkcs11_pin_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigurationError(f"{name.replace('_', ' ')} {value!r} is not a file path")
        for name in ("https_port", "mqtt_port", "amqp_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            low = 0 if name in ("amqp_port", "http_port", "metrics_port") else 1
            if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
                raise ConfigurationError(f"{name.replace('_', ' ')} {port!r} is out of range {low}-65535")
        if self.db is not None:
            check_db_url(self.db)
        _seconds("client timeout", self.client_timeout, 1)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 0 <= self.workers <= MAX_WORKERS:
            raise ConfigurationError(f"workers {self.workers!r} is out of range 0-{MAX_WORKERS} (0: one per core on "
                                     "PostgreSQL, one on SQLite)")
        if self.bus is not None and not (isinstance(self.bus, str) and self.bus.startswith(("nats://", "tls://"))):
            bus = nats_client.shown_url(self.bus) if isinstance(self.bus, str) else self.bus  # without its password
            raise ConfigurationError(f"bus {bus!r} is not a NATS server URL (nats://host:4222 or tls://host:4222)")
        _seconds("SQLite busy timeout", self.sqlite_busy_timeout, 0.1)
        if self.sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            raise ConfigurationError(f"SQLite synchronous {self.sqlite_synchronous!r} is not one of "
                                     f"{', '.join(SQLITE_SYNCHRONOUS)}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigurationError(f"log format {self.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        if self.key_backend is not None and self.key_backend not in BACKENDS:
            raise ConfigurationError(f"key backend {self.key_backend!r} is not one of {', '.join(BACKENDS)}")

    def save(self) -> bool:
        """Write config.json; returns whether a database password was left out of it (it is never written)."""
        # the key backend and token label are the installation's, in the database: not this host's config.json
        data = {k: v for k, v in asdict(self).items()
                if k not in ("data_dir", "lint", "warnings", "key_backend", "pkcs11_token_label")}
        stripped = False
        if data["db"]:
            url = make_url(data["db"])
            if url.password:  # the URL stays, its password does not: PGPASSWORD, ~/.pgpass or OPENDPS_DB give it
                data["db"] = url._replace(password=None).render_as_string(hide_password=False)
                stripped = True
        if data["bus"] and "@" in data["bus"]:  # NATS credentials in the URL: kept out like the database password
            data["bus"] = None
            stripped = True
        write_atomic(self.config_path, (json.dumps(data, indent=2) + "\n").encode(), 0o644)
        return stripped


SUPPORTED_DATABASES = ("sqlite", "postgresql")


def check_db_url(url: str) -> None:
    """A database opendps runs on: SQLite or PostgreSQL (``postgresql+psycopg://user@host/db``)."""
    try:
        backend = make_url(url).get_backend_name()
    except Exception as exc:
        raise ConfigurationError(f"{_shown_db_url(url)!r} is not a database URL: use postgresql+psycopg://user@host/db "
                                 "(or nothing, for SQLite in the data directory)") from exc
    if backend not in SUPPORTED_DATABASES:
        raise ConfigurationError(f"database {backend!r} is not supported: opendps runs on SQLite (the default) or "
                                 "PostgreSQL (postgresql+psycopg://user@host/db)")


# a database URL's user:password@ as SQLAlchemy reads it (user up to ':' or '/', password up to '@')
_DB_PASSWORD = re.compile(r"^([\w+]+://[^:/]*):[^@]*@")


def _shown_db_url(url: str) -> str:
    """A URL SQLAlchemy could not parse, as an error may show it: its password as ``***`` (a mistyped port must not
    put the password on the terminal or in a log)."""
    return _DB_PASSWORD.sub(r"\1:***@", url, count=1)


def redacted_db_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


class Instance:
    """The opened installation and its domain services."""

    def __init__(self, settings: Settings, store: Store, keys: KeyStore) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.id_scope = store.setting("id_scope") or ""
        self.publication = settings.publication()  # the CRL and OCSP URLs every new certificate names
        self.services: Services = wire(store, keys, id_scope=self.id_scope, hub_domain=settings.hostname,
                                       lint=settings.lint, publication=self.publication)

    # ---- paths ----
    @property
    def tls_dir(self) -> Path:
        return self.settings.data_dir / "tls"

    @property
    def server_ca_path(self) -> Path:
        return self.tls_dir / "server-ca.pem"

    @property
    def server_cert_path(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def server_key_path(self) -> Path:
        return self.tls_dir / "server.key"

    # ---- credentials ----
    def access_policy_keys(self, name: str) -> tuple[str, str]:
        """(primary, secondary) base64 keys of a shared access policy (``iothubowner``: an older installation's
        shared hub pair); KeyError when there is none."""
        if name == HUB_OWNER_POLICY:
            former = self.services.access_policies.former_hub_owner_keys()
            if former is None:
                raise KeyError(name)
            return former
        try:
            return self.services.access_policies.keys_of(name)
        except NotFound as exc:
            raise KeyError(name) from exc

    def owner_connection_string(self, *, secondary: bool = False) -> str:
        primary, second = self.access_policy_keys(OWNER_POLICY)
        return sas.connection_string(self.settings.service_host, OWNER_POLICY, second if secondary else primary)

    def hub_connection_string(self, hub_name: str, *, secondary: bool = False) -> str:
        """A hub's owner connection string (for azure-iot-hub's registry manager): the hub's host on the HTTPS port,
        signed with that hub's own key."""
        hub = self.services.hubs.get(hub_name)
        primary, second = self.services.hubs.owner_keys(hub_name)
        port = self.settings.https_port
        host = hub.host_name if port == 443 else f"{hub.host_name}:{port}"
        return sas.connection_string(host, HUB_OWNER_POLICY, second if secondary else primary)

    def info(self, *, secrets: bool = False) -> dict[str, object]:
        """What an operator or a script needs to reach this installation; ``secrets``: also the owner connection
        strings (keys that own the service and every hub: printed only when asked, as ``connection-string show``)."""
        st = self.settings
        return {
            "dataDir": str(st.data_dir.resolve()),
            "database": redacted_db_url(st.db_url),
            # when a commit reaches the disk on SQLite (--sqlite-synchronous); PostgreSQL's is its own configuration's
            "sqliteSynchronous": st.sqlite_synchronous if self.store.dialect == "sqlite" else None,
            "sqliteBusyTimeout": st.sqlite_busy_timeout if self.store.dialect == "sqlite" else None,
            "idScope": self.id_scope,
            "serverCaCertificate": str(self.server_ca_path.resolve()),
            "endpoints": {
                "bindAddress": st.host,
                "https": {"hostName": st.hostname, "port": st.https_port,
                          "url": f"https://{st.service_host}"},
                "mqtt": {"hostName": st.hostname, "port": st.mqtt_port},
                "amqp": {"hostName": st.hostname, "port": st.amqp_port},
                "http": {"hostName": st.hostname, "port": st.http_port},
                # Prometheus: GET /metrics on HTTPS always; on this plain-HTTP listener too when port is not 0
                "metrics": {"bindAddress": st.metrics_host, "port": st.metrics_port},
                "deviceProvisioningHost": st.hostname,
            },
            # where certificates say their status is (None: they name none); {ca} is in each certificate's URL
            "certificateStatus": ({"crl": self.publication.base_url + CRL_PATH, "ocsp": self.publication.ocsp_url}
                                  if self.publication is not None else None),
            **({"connectionStrings": {"provisioningServiceOwner": self.owner_connection_string()}} if secrets else {}),
            "hubs": [{"name": h.name, "hostName": h.host_name,
                      **({"connectionString": self.hub_connection_string(h.name)} if secrets else {})}
                     for h in self.services.hubs.list()],
            "workers": st.workers or None,
            "keyCustody": self.key_custody(),
            "nodes": self.nodes(),
        }

    def key_custody(self) -> dict[str, object]:
        """Where new CA keys go and which token holds this installation's keys (no PIN)."""
        backend, token = custody_settings(self.store)
        return {"defaultKeyBackend": backend, "pkcs11": None if not token and not self.settings.pkcs11_module else
                {"tokenLabel": token, "module": self.settings.pkcs11_module,
                 "tokensInUse": sorted(tokens_in_use(self.store))}}

    def nodes(self) -> list[dict[str, object]]:
        """The server processes alive now, on every host (``cluster_nodes``; empty before a migration)."""
        from opendps.cluster import NODE_TIMEOUT, Nodes

        try:
            return [n.to_wire() for n in Nodes(self.store).alive(NODE_TIMEOUT)]
        except Exception:  # noqa: BLE001 - a database this version has not migrated: no cluster table yet
            return []

    def close(self) -> None:
        self.store.dispose()


def _ensure_access_policy(store: Store, keys: KeyStore, name: str, rights: str) -> None:
    """The access policy ``name`` exists (init makes the owner's; the owner of the table decides how)."""
    AccessPolicies(store, keys).ensure(name, rights)


def _give_hubs_their_own_keys(inst: Instance) -> None:
    """Hubs made before each hub had its own owner keys get them (store migration 0006). The default hub adopts
    the installation's former shared ``iothubowner`` pair, so the connection strings users hold keep working for
    it — and only for it."""
    shared = inst.services.access_policies.former_hub_owner_keys()
    for hub in inst.services.hubs.list():
        inst.services.hubs.owner_keys(hub.name, initial=shared if hub.name == DEFAULT_HUB else None)


def _ensure_server_ca(inst: Instance) -> x509.Certificate:
    store, keys = inst.store, inst.keys
    der_b64 = store.setting("server_ca_der")
    if der_b64 is None:
        try:
            with store.session() as s:
                signer = keys.generate(s, "server-ca")
                cert = root_ca(signer, f"opendps server CA {inst.id_scope}", lint=inst.settings.lint)
                add_setting(s, "server_ca_key_id", signer.key_id)
                add_setting(s, "server_ca_der", base64.b64encode(cert.public_bytes(Encoding.DER)).decode())
        except IntegrityError:
            pass  # another node made it first
        der_b64 = store.setting("server_ca_der")
        assert der_b64 is not None
    cert = x509.load_der_x509_certificate(base64.b64decode(der_b64))
    pem = cert.public_bytes(Encoding.PEM)
    if not inst.server_ca_path.exists() or inst.server_ca_path.read_bytes() != pem:
        write_atomic(inst.server_ca_path, pem, 0o644)
    return cert


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return out


def server_names(inst: Instance, extra_names: Iterable[str] = ()) -> list[str]:
    """The names this node's server certificate must carry: ``--hostname``, localhost, 127.0.0.1 and ``extra_names``
    (every linked hub's host name)."""
    return list(dict.fromkeys([inst.settings.hostname, "localhost", "127.0.0.1", *extra_names]))


@dataclass(frozen=True)
class ServerCertificate:
    """This node's TLS server certificate as served: ``chain`` is [leaf, server CA] (the server.pem order)."""

    chain: tuple[x509.Certificate, ...]
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def fresh(self, now: datetime | None = None) -> bool:
        """Not about to expire (within :data:`SERVER_CERT_RENEW_BEFORE` it is re-issued)."""
        return self.leaf.not_valid_after_utc - (now or datetime.now(UTC)) >= SERVER_CERT_RENEW_BEFORE

    def serves(self, names: Iterable[str], *, now: datetime | None = None) -> bool:
        """Whether it is :meth:`fresh` and carries every one of ``names``."""
        if not self.fresh(now):
            return False
        try:
            sans = set(self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            return False
        return set(_san_entries(names)) <= sans


def _read_server_certificate(inst: Instance, ca: x509.Certificate) -> ServerCertificate | None:
    """The pair on disk, if it is one: the certificate issued by the server CA, the key its own."""
    try:
        chain = x509.load_pem_x509_certificates(inst.server_cert_path.read_bytes())
        key = serialization.load_pem_private_key(inst.server_key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or chain[0].issuer != ca.subject \
            or chain[0].public_key() != key.public_key():
        return None
    return ServerCertificate(tuple(chain), key)


@contextmanager
def _server_tls_lock(tls_dir: Path) -> Iterator[None]:
    """Exclusive hold of this data directory's server.pem/server.key pair: ``serve --workers N`` shares one data
    directory, and each process checks and may replace the pair (a flock per open file, so threads exclude each
    other too; released when the file is closed, also by a crash)."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(tls_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_server_certificate(inst: Instance, extra_names: Iterable[str] | None = None) -> ServerCertificate:
    """This node's P-256 TLS certificate, covering :func:`server_names` (with ``extra_names``, the linked hubs' host
    names): the pair in the data directory when it does, else a new one, issued by the server CA (whose key is in
    the database) and written to server.pem/server.key. The check and the write happen under the data directory's
    lock, so processes sharing it never write at once, and the pair on disk always belongs together; a process
    that finds a pair another one just wrote uses it instead of issuing its own. Blocking: not on an event loop."""
    ca = _ensure_server_ca(inst)
    names = server_names(inst, extra_names or ())
    with _server_tls_lock(inst.tls_dir):
        current = _read_server_certificate(inst, ca)
        if current is not None and current.serves(names):
            return current
        issued = _issue_server_certificate(inst, ca, names)
        key_pem = issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        replace_all(inst.tls_dir, {inst.server_key_path.name: (key_pem, 0o600),
                                   inst.server_cert_path.name: (b"".join(c.public_bytes(Encoding.PEM) for c in issued.chain),
                                                                0o644)})
        return issued


def _issue_server_certificate(inst: Instance, ca: x509.Certificate, names: list[str]) -> ServerCertificate:
    signer = inst.keys.signer(inst.store.setting("server_ca_key_id") or "")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, inst.settings.hostname)]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(random_serial())
        .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=SERVER_CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(_san_entries(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    # not linted: pkilint rejects the single-label "localhost" SAN that local clients need
    return ServerCertificate((sign_builder(builder, signer, lint=False), ca), key)


def open_instance(settings: Settings, *, create: bool = True, migrate: bool = True,
                  persist: bool = True) -> Instance:
    """Open (and with ``create``, initialise) the installation described by ``settings``.

    Nothing is left half-made: a data directory this call created is removed again when opening fails.
    ``persist=False`` leaves config.json alone (``serve`` writes it once it is listening).
    """
    settings.check()
    d = settings.data_dir
    created = False
    try:
        if not d.exists():
            if not create:
                raise ConfigurationError(f"data directory {d} does not exist: run 'opendps init' first")
            d.mkdir(parents=True, mode=0o700)
            created = True
        elif not d.is_dir():
            raise ConfigurationError(f"data directory {d} is not a directory")
        if create:
            (d / "tls").mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigurationError(f"cannot create data directory {d}: {exc.strerror or exc}") from exc
    try:
        return _open(settings, create=create, migrate=migrate, persist=persist)
    except BaseException:
        if created:
            shutil.rmtree(d, ignore_errors=True)
        raise


# room a new SQLite database needs to be made: its schema (~300 KB), its WAL and its -shm index, with a margin.
# Why checked first: with a few dozen KB free, SQLite crashed the process (SIGBUS) setting up its -shm file, and a
# failure part-way left files behind; a full disk is better named before anything is written.
NEW_DATABASE_ROOM = 2 * 1024 * 1024


def _open_store(settings: Settings, *, create: bool, migrate: bool) -> Store:
    url = settings.db_url
    if create and url.startswith("sqlite"):
        db_file = settings.data_dir / "opendps.db"
        if not db_file.exists():  # SQLite gives its -wal and -shm files the database file's mode
            free = shutil.disk_usage(settings.data_dir).free
            if free < NEW_DATABASE_ROOM:
                raise ConfigurationError(f"the file system of {settings.data_dir} has {free // 1024} KB free; a new "
                                         f"database needs {NEW_DATABASE_ROOM // (1024 * 1024)} MB: make room first")
            os.close(os.open(db_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        store = Store(url, sqlite_synchronous=settings.sqlite_synchronous,
                      sqlite_busy_timeout=settings.sqlite_busy_timeout)
    except Exception as exc:
        raise ConfigurationError(f"cannot open database {redacted_db_url(url)}: {exc}") from exc
    try:
        if migrate:
            store.upgrade()
        elif store.current_revision() is None:
            raise ConfigurationError(f"database {redacted_db_url(url)} is not initialised")
    except ConfigurationError:
        store.dispose()
        raise
    except Exception as exc:
        store.dispose()
        raise ConfigurationError(f"cannot open database {redacted_db_url(url)}: {one_line(exc)}") from exc
    return store


def one_line(exc: BaseException) -> str:
    """A driver's error as one line: the driver's own message (not SQLAlchemy's wrapper and link)."""
    text = str(getattr(exc, "orig", None) or exc)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _master_key(settings: Settings, store: Store, *, create: bool) -> bytes:
    path = settings.data_dir / "master.key"
    if not os.environ.get(MASTER_KEY_ENV) and not path.exists() and store.setting(MASTER_KEY_CHECK) is not None:
        raise ConfigurationError(f"{path} is missing and {MASTER_KEY_ENV} is not set, but this database's CA keys "
                                 "are encrypted with a master key: restore master.key (a new key could not decrypt "
                                 "them; nothing was written)")
    try:
        key = load_master_key(path, create=create)
    except OSError as exc:  # a full disk: say which file (nothing is left behind: it is created whole or not at all)
        raise ConfigurationError(f"master key {path}: {exc.strerror or exc}") from exc
    if path.exists() and path.stat().st_mode & 0o077:
        settings.warnings.append(f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}): "
                                 f"chmod 600 {path}")
    return key


def _key_store(settings: Settings, store: Store, master_key: bytes, *, create: bool) -> tuple[KeyStore, str, str | None]:
    """The key store with this process's token, if the installation has or gets one; (store, default backend, token
    label). ``create`` (init, serve): the token is opened now, so a missing module or token or a wrong PIN stops the
    start with one line; otherwise (workers, read-only verbs) it opens on first use, and without a PIN not at all."""
    backend, label = custody_settings(store)
    if create and settings.pkcs11_token_label:
        label = settings.pkcs11_token_label
    if create and settings.key_backend is not None:  # init --key-backend: the installation's choice from now on
        backend = settings.key_backend
        if backend == "pkcs11" and not label:
            raise ConfigurationError("--key-backend pkcs11 needs --pkcs11-token-label (the token's label: "
                                     "softhsm2-util --show-slots, pkcs11-tool -L)")
    try:
        in_use = tokens_in_use(store)
    except Exception:  # a read-only verb on a database this version has not migrated (no such column)
        if create:
            raise
        in_use = set()
    if label and in_use - {label}:
        raise ConfigurationError(f"this installation's CA keys are on PKCS#11 token(s) {', '.join(sorted(in_use))}, "
                                 f"not {label!r}")
    needed = backend == "pkcs11" or bool(in_use)
    token = None
    if settings.pkcs11_module and label:
        try:
            pin = read_pin(settings.pkcs11_pin_file)
        except ConfigurationError:
            if create:
                raise
            pin = None  # opendps info and the like sign nothing
        if pin is not None:
            token = Pkcs11Token(Pkcs11Config(settings.pkcs11_module, label, pin))
            if create:
                token.open()
    elif create and needed:
        raise ConfigurationError(f"this installation keeps CA keys on PKCS#11 token {label or '?'!r}: give "
                                 "--pkcs11-module PATH (kept in config.json) and the user PIN in "
                                 f"{PIN_ENV} or --pkcs11-pin-file")
    return KeyStore(store, master_key, token=token, default_backend=backend), backend, label


def _open(settings: Settings, *, create: bool, migrate: bool, persist: bool) -> Instance:
    store = _open_store(settings, create=create, migrate=migrate)
    try:
        keys, backend, label = _key_store(settings, store, _master_key(settings, store, create=create), create=create)
        keys.check_master_key()
        if create and (backend, label) != custody_settings(store):
            remember_custody(store, backend, label)
        store.set_setting_if_absent("id_scope", "0ne" + secrets.token_hex(4).upper())
        _ensure_access_policy(store, keys, OWNER_POLICY, OWNER_RIGHTS)
        inst = Instance(settings, store, keys)
        if create:
            inst.services.hubs.ensure(DEFAULT_HUB, settings.hostname)
            _give_hubs_their_own_keys(inst)
            ensure_server_certificate(inst, [h.host_name for h in inst.services.hubs.list()])
            if persist and settings.save():
                settings.warnings.append(DB_PASSWORD_NOT_SAVED)
    except BaseException as exc:
        store.dispose()
        if isinstance(exc, Exception) and not isinstance(exc, ConfigurationError) and unavailable(exc):
            # a full disk, a database gone: one line naming it, not a traceback (the steps so far are idempotent)
            raise ConfigurationError(f"cannot write to database {redacted_db_url(settings.db_url)}: "
                                     f"{one_line(exc)}") from exc
        raise
    return inst


DB_PASSWORD_NOT_SAVED = ("credentials in a URL are not written to config.json: give the database password next time "
                         "with PGPASSWORD, ~/.pgpass, a libpq service file or the whole URL in OPENDPS_DB, and a NATS "
                         "bus URL with credentials in OPENDPS_BUS")
