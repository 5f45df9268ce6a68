"""``opendps device``: the device side from the command line, built on the device SDK (:mod:`opendps.device`).

``provision`` onboards one device the way the seed's device application does (bootstrap credential +
CSR for a key made here, operational chain kept in a :class:`~opendps.device.store.CertificateStore`);
``simulate`` onboards a fleet in one asyncio loop and connects each device to its hub once, to try a
server (or an enrollment group) under load. Both are clients of the *device* endpoints only: they need
no service credentials, just the ID scope and the server CA to trust, which default to the local data
directory's so that ``opendps serve`` + ``opendps device ...`` work on one machine without flags.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import math
import os
import ssl
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from opendps.cli import OUTPUT_OPTION, CliError, non_empty_path, output_option
from opendps.cli.output import emit

DEFAULT_HOST = "localhost"
DEFAULT_HTTPS_PORT = 8443
DEFAULT_MQTT_PORT = 8883
DATA_DIR_ENV = "OPENDPS_DATA_DIR"
CA_FILE_ENV = "OPENDPS_CA_FILE"
DEFAULT_DATA_DIR = ".opendps"
PROVISION_COLUMNS = ["registrationId", "assignedHub", "deviceId", "certificate.serialNumber", "certificate.validFrom",
                     "certificate.validUntil", "files.directory"]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------- where the DPS is


@dataclass(frozen=True)
class Endpoint:
    """Everything a device needs to reach DPS and its hub (no service credentials)."""

    host: str
    id_scope: str
    https_port: int
    mqtt_port: int
    ca_file: Path | None
    transport: str
    hub_address: str | None = None

    def client_options(self) -> dict[str, Any]:
        """Keywords for :class:`~opendps.device.provisioning.ProvisioningClient`."""
        return {"https_port": self.https_port, "mqtt_port": self.mqtt_port, "transport": self.transport}


@dataclass(frozen=True)
class LocalInstallation:
    """What the data directory of a server on this machine says about reaching it."""

    directory: Path
    hostname: str
    https_port: int
    mqtt_port: int
    server_ca: Path | None


def local_installation(data_dir: Path | None) -> LocalInstallation | None:
    """The local server's settings (config.json), or None when there is no data directory to default from."""
    directory = Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    if not (directory / "config.json").is_file():
        if data_dir is not None:
            raise CliError(f"{directory} is not an opendps data directory (no config.json)")
        return None
    from opendps.errors import ConfigurationError
    from opendps.instance import Settings

    try:
        settings = Settings.load(directory)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    ca = directory / "tls" / "server-ca.pem"
    return LocalInstallation(directory, settings.hostname, settings.https_port, settings.mqtt_port,
                             ca if ca.is_file() else None)


def local_id_scope(local: LocalInstallation) -> str:
    """The ID scope stored in the local installation's database (what ``opendps info`` prints)."""
    from opendps.errors import ConfigurationError
    from opendps.instance import Settings, open_instance

    try:
        inst = open_instance(Settings.load(local.directory), create=False, migrate=False)
    except ConfigurationError as exc:
        raise CliError(f"no --id-scope given and cannot read it from {local.directory}: {_one_line(exc)}") from exc
    try:
        return inst.id_scope
    finally:
        inst.close()


def resolve_endpoint(*, id_scope: str | None, host: str | None, https_port: int | None, mqtt_port: int | None,
                     ca_file: Path | None, transport: str, data_dir: Path | None,
                     hub_address: str | None = None) -> Endpoint:
    """Flags first, then the local data directory, then the defaults (localhost, 8443, 8883, system trust store)."""
    local = local_installation(data_dir)
    if not id_scope:
        if local is None:
            raise CliError(f"--id-scope is required (no local data directory at "
                           f"{os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR} to take it from)")
        id_scope = local_id_scope(local)
    explicit_ca = ca_file or (Path(os.environ[CA_FILE_ENV]) if os.environ.get(CA_FILE_ENV) else None)
    if explicit_ca is not None and not explicit_ca.is_file():
        raise CliError(f"CA file {explicit_ca} does not exist")
    trusted = explicit_ca or (local.server_ca if local else None)
    if trusted is not None:
        _check_ca_file(trusted)
    return Endpoint(
        host=host or (local.hostname if local else DEFAULT_HOST),
        id_scope=id_scope,
        https_port=https_port or (local.https_port if local else DEFAULT_HTTPS_PORT),
        mqtt_port=mqtt_port or (local.mqtt_port if local else DEFAULT_MQTT_PORT),
        ca_file=trusted,
        transport=transport,
        hub_address=hub_address,
    )


def _check_ca_file(path: Path) -> None:
    """Why: a CA file that is not PEM certificates (a key, binary, empty) was found out per connection: ``device run``
    retried it forever (exit 0 after --duration), ``simulate`` said "no certificate or crl found" without the file."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise CliError(f"CA file {path} cannot be used: {_one_line(reason)} (it must hold PEM certificates)") from exc


def _check_csr_id(registration_id: str, flag: str = "--registration-id") -> None:
    """The id goes into the CSR as its CN, which RFC 5280 (and the service) limit to 1-64 characters; why checked here:
    ``provision`` failed with a ValueError traceback and ``run`` retried it forever."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        x509.NameAttribute(NameOID.COMMON_NAME, registration_id)
    except ValueError as exc:
        shown = registration_id if len(registration_id) <= 80 else registration_id[:80] + "..."
        raise CliError(f"{flag} {shown!r} cannot be a CSR's common name: it has {len(registration_id)} characters, "
                       "a CN holds 1-64 (RFC 5280)") from exc


def endpoint_options(*, hub: bool) -> Decorator:
    """Connection flags shared by the device verbs (``provision``, ``simulate``, the agent's ``run``).

    The command gets one ``endpoint`` keyword instead of the flags; ``hub`` adds ``--hub-address`` for
    verbs that connect to the assigned hub after provisioning.
    """
    options: list[Decorator] = [
        click.option("--id-scope", "--scope", "id_scope", default=None,
                     help="DPS ID scope (default: the local data directory's, as 'opendps info' shows it)."),
        click.option("--provisioning-host", "--host", "host", default=None,
                     help=f"DPS host name (default: the local data directory's, else {DEFAULT_HOST})."),
        click.option("--https-port", type=click.IntRange(1, 65535), default=None,
                     help=f"DPS HTTPS port (default: the local data directory's, else {DEFAULT_HTTPS_PORT})."),
        click.option("--mqtt-port", type=click.IntRange(1, 65535), default=None,
                     help=f"DPS and hub MQTT port (default: the local data directory's, else {DEFAULT_MQTT_PORT})."),
        click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Server CA to trust (default $OPENDPS_CA_FILE, else the data directory's tls/server-ca.pem, "
                          "else the system store)."),
        click.option("--transport", type=click.Choice(["https", "mqtt"]), default="https", show_default=True,
                     help="Provisioning protocol."),
        click.option("--data-dir", type=click.Path(), default=None, callback=non_empty_path,
                     help="Local data directory to take defaults from (default $OPENDPS_DATA_DIR or ./.opendps)."),
    ]
    if hub:
        options.append(click.option("--hub-address", default=None,
                                    help="Network address to reach the assigned hub at (default: its host name; TLS "
                                         "still checks the host name)."))

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)  # keeps the options already attached below this decorator
        def wrapper(*args: Any, id_scope: str | None, host: str | None, https_port: int | None, mqtt_port: int | None,
                    ca_file: Path | None, transport: str, data_dir: Path | None, hub_address: str | None = None,
                    **kwargs: Any) -> Any:
            endpoint = resolve_endpoint(id_scope=id_scope, host=host, https_port=https_port, mqtt_port=mqtt_port,
                                        ca_file=ca_file, transport=transport, data_dir=data_dir, hub_address=hub_address)
            return f(*args, endpoint=endpoint, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def _base64_key(value: str | None, flag: str) -> str | None:
    """Refuse a key that is not base64 before any network traffic (one line, without echoing the secret)."""
    if value is None:
        return None
    value = value.strip()
    try:
        if not base64.b64decode(value, validate=True):
            raise ValueError("empty")
    except (binascii.Error, ValueError) as exc:
        raise CliError(f"{flag} is not a valid base64 key") from exc
    return value


def _provisioning_error(registration_id: str, exc: Exception) -> CliError:
    from opendps.device.provisioning import ProvisioningError

    if isinstance(exc, ProvisioningError):
        code = f", code {exc.error_code}" if exc.error_code else ""
        return CliError(f"registration of {registration_id!r} failed: {_one_line(exc.message)} (status {exc.status}{code})")
    return CliError(f"registration of {registration_id!r} failed: {type(exc).__name__}: {_one_line(exc)}")


# ---------------------------------------------------------------- TPM


def tpm_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--tpm`` and ``--tcti`` (TPM attestation over HTTPS; the TCTI defaults to $TPM2TOOLS_TCTI, $TCTI, then the
    kernel's resource manager /dev/tpmrm0)."""
    f = click.option("--tcti", default=None, metavar="TCTI",
                     help="TPM to use, e.g. swtpm:host=127.0.0.1,port=2321 or device:/dev/tpmrm0 (default "
                          "$TPM2TOOLS_TCTI, else $TCTI, else device:/dev/tpmrm0).")(f)
    return click.option("--tpm", "use_tpm", is_flag=True, default=False,
                        help="Attest with the TPM (an individual enrollment holding its endorsement key; HTTPS only). "
                             "Its DPS key stays in the TPM; the SRK-wrapped copy goes to <store-dir>/tpm-hmac.key.")(f)


@contextlib.contextmanager
def open_tpm(tcti: str | None) -> Any:
    """The device's TPM (:class:`~opendps.device.tpm.DeviceTpm`), closed (its transient objects flushed) on exit;
    a missing library or an unreachable TPM is a one-line CLI error."""
    # the TSS libraries log their own multi-line account of a failure on stderr: the CLI says it in one line
    os.environ.setdefault("TSS2_LOG", "all+none")
    from opendps.device.tpm import DeviceTpm, TpmError

    try:
        tpm = DeviceTpm(tcti)
    except TpmError as exc:
        raise CliError(_one_line(exc)) from exc
    except Exception as exc:  # a TSS error while reading the EK/SRK of a reachable but unusable TPM
        raise CliError(f"cannot use the TPM at {tcti or 'the default TCTI'}: {type(exc).__name__}: "
                       f"{_one_line(exc)}") from exc
    try:
        yield tpm
    finally:
        tpm.close()


@click.command("tpm-info")
@click.option("--tcti", default=None, metavar="TCTI",
              help="TPM to read (default $TPM2TOOLS_TCTI, else $TCTI, else device:/dev/tpmrm0).")
@OUTPUT_OPTION
def tpm_info(tcti: str | None, output: str) -> None:
    """Print the TPM's endorsement key, storage root key and EK-derived registration id (to create its enrollment:
    'opendps dps enrollment create --attestation-type tpm --endorsement-key <endorsementKey> -e <id>')."""
    with open_tpm(tcti) as tpm:
        doc = {"registrationId": tpm.registration_id(), "endorsementKey": tpm.endorsement_key(),
               "storageRootKey": tpm.storage_root_key(), "tcti": tpm.tcti}
    emit(doc, output, ["registrationId", "tcti"])


# ---------------------------------------------------------------- provision


@click.group("device")
def device() -> None:
    """Device side: onboard with DPS using the device SDK, simulate fleets."""


device.add_command(tpm_info)


@device.command("provision")
@click.option("--registration-id", "--rid", "registration_id", default=None,
              help="The device's registration id (with --tpm, default: the id derived from the TPM's EK).")
@click.option("--certificate-file", "--cert", "certificate_file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="X.509 bootstrap chain, leaf first (e.g. the seed's device-full-chain.pem).")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Private key of --certificate-file (e.g. the seed's device.key).")
@click.option("--symmetric-key", "--key", "symmetric_key", default=None, help="Individual enrollment key (base64).")
@click.option("--group-key", default=None,
              help="Symmetric-key enrollment group key (base64); the device key is derived for --registration-id.")
@tpm_options
@click.option("--store-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the operational key and chain go (default ./device-<registration-id>).")
@click.option("--curve", type=click.Choice(["P-384", "P-256"]), default="P-384", show_default=True,
              help="Curve of the new operational key (P-256 only if the policy allows it).")
@click.option("--retries", type=click.IntRange(0, 20), default=3, show_default=True,
              help="Retries of throttled (429), failing (5xx) or unreachable requests, with backoff.")
@endpoint_options(hub=False)
@OUTPUT_OPTION
def provision(endpoint: Endpoint, output: str, registration_id: str | None, certificate_file: Path | None,
              key_file: Path | None, symmetric_key: str | None, group_key: str | None, use_tpm: bool, tcti: str | None,
              store_dir: Path | None, curve: str, retries: int) -> None:
    """Register once with a CSR for a key made here, and keep the issued operational chain in --store-dir."""
    if tcti is not None and not use_tpm:
        raise CliError("--tcti goes with --tpm")
    if not use_tpm:
        if registration_id is None:
            raise CliError("--registration-id is required")
        _provision(endpoint, output, registration_id, certificate_file, key_file, symmetric_key, group_key, None,
                   store_dir, curve, retries)
        return
    if endpoint.transport != "https":
        raise CliError("--tpm works over HTTPS only (Azure DPS has no TPM attestation over MQTT): drop --transport mqtt")
    if any(v is not None for v in (certificate_file, key_file, symmetric_key, group_key)):
        raise CliError("give exactly one onboarding credential: --tpm, --certificate-file/--key-file, --symmetric-key "
                       "or --group-key")
    with open_tpm(tcti) as tpm:
        _provision(endpoint, output, registration_id or tpm.registration_id(), None, None, None, None, tpm, store_dir,
                   curve, retries)


def _provision(endpoint: Endpoint, output: str, registration_id: str, certificate_file: Path | None,
               key_file: Path | None, symmetric_key: str | None, group_key: str | None, tpm: Any,
               store_dir: Path | None, curve: str, retries: int) -> None:
    from opendps.device.keys import certificate_summary, new_key_and_csr
    from opendps.device.provisioning import ProvisioningClient, ProvisioningError
    from opendps.device.store import CertificateStore, StoreError

    credential: dict[str, Any] = {}
    if certificate_file is not None or key_file is not None:
        if certificate_file is None or key_file is None:
            raise CliError("--certificate-file and --key-file go together")
        credential["x509"] = (certificate_file, key_file)
    if symmetric_key is not None:
        credential["symmetric_key"] = _base64_key(symmetric_key, "--symmetric-key")
    if group_key is not None:
        credential["group_key"] = _base64_key(group_key, "--group-key")
    _check_csr_id(registration_id)
    store_dir = store_dir or Path(f"device-{registration_id}")
    if tpm is not None:
        from opendps.device.agent import TPM_KEY_FILE

        credential = {"tpm": tpm, "tpm_key_file": store_dir / TPM_KEY_FILE}
    if len(credential) != (2 if tpm is not None else 1):
        raise CliError("give exactly one onboarding credential: --certificate-file/--key-file, --symmetric-key, "
                       "--group-key or --tpm")
    try:
        client = ProvisioningClient(endpoint.host, endpoint.id_scope, registration_id, ca_file=endpoint.ca_file,
                                    max_retries=retries, **endpoint.client_options(), **credential)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in (endpoint.ca_file, certificate_file, key_file) if p is not None)
        raise CliError(f"cannot load TLS files ({files}): {_one_line(getattr(exc, 'strerror', None) or exc)}") from exc
    key, csr = new_key_and_csr(registration_id, curve)  # type: ignore[arg-type]
    from opendps.device.tpm import TpmError

    # Why before registering: a --store-dir that cannot be written (read-only, full, a file in the way) was found out
    # only after DPS had issued the certificate, whose new key was then lost (and with --revoke-superseded the
    # device's previous certificate revoked). A directory made here and left unused is removed again.
    made = not store_dir.exists()
    try:
        CertificateStore(store_dir).check_writable()
    except (OSError, StoreError) as exc:
        _remove_if_made(store_dir, made)
        raise CliError(f"cannot store credentials in {store_dir}: {_one_line(getattr(exc, 'strerror', None) or exc)}; "
                       "nothing was asked of DPS") from exc
    try:
        result = asyncio.run(client.register(csr))
    except (ProvisioningError, OSError, ssl.SSLError, TpmError) as exc:
        _remove_if_made(store_dir, made)
        raise _provisioning_error(registration_id, exc) from exc
    except BaseException:
        _remove_if_made(store_dir, made)
        raise
    doc: dict[str, Any] = {"registrationId": registration_id, "status": result.status, "assignedHub": result.assigned_hub,
                           "deviceId": result.device_id, "substatus": result.substatus, "transport": endpoint.transport,
                           "certificate": None, "files": None}
    if tpm is not None:
        doc["tpm"] = {"registrationId": tpm.registration_id(), "keyFile": str(credential["tpm_key_file"])}
    if not result.issued_chain:
        _remove_if_made(store_dir, made)
        click.echo(f"warning: {registration_id!r} was assigned but no operational certificate was issued "
                   "(the enrollment has no credential policy); nothing stored", err=True)
    else:
        try:
            store = CertificateStore(store_dir)
            stored = store.save(key, result.issued_chain)
            if result.assigned_hub and result.device_id:
                store.save_assignment(result.assigned_hub, result.device_id)  # what `device run` connects with
        except (OSError, ValueError, StoreError) as exc:
            raise CliError(f"cannot store the issued certificate in {store_dir}: {_one_line(exc)}") from exc
        leaf = stored.certificate
        doc["certificate"] = {"subject": leaf.subject.rfc4514_string(), **certificate_summary(leaf)}
        doc["files"] = {"directory": str(stored.directory), "key": str(stored.key_file), "certificate": str(stored.cert_file),
                        "chain": str(stored.chain_file), "fullChain": str(stored.fullchain_file),
                        "assignment": str(store.assignment_file)}
    from opendps.cli.output import emit

    emit(doc, output, PROVISION_COLUMNS)


def _remove_if_made(directory: Path, made: bool) -> None:
    """Remove ``directory`` if this command made it and it is still empty (never anything a user keeps there)."""
    if made:
        with contextlib.suppress(OSError):
            directory.rmdir()


# ---------------------------------------------------------------- simulate


@dataclass
class Outcome:
    """One simulated device: what it reached and how long each phase took."""

    registration_id: str
    provisioned: bool = False
    connected: bool = False
    provision_seconds: float | None = None
    connect_seconds: float | None = None
    error: str | None = None


@dataclass
class FleetReport:
    """The outcomes of a run and its wall-clock time."""

    outcomes: list[Outcome] = field(default_factory=list)
    total_seconds: float = 0.0


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (an actual observed latency, no interpolation); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _generic(message: str, registration_id: str) -> str:
    """The error without the device's id, so that a fleet's identical failures are counted as one kind."""
    return message.replace(registration_id, "<id>")


def _hub_context(ca_pem: str | None, chain_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(chain_file), str(key_file))
    return ctx


async def simulate_fleet(endpoint: Endpoint, group_key: str, registration_ids: list[str], *, concurrency: int,
                         connect: bool, work_dir: Path, keep: bool = False,
                         on_event: Callable[[str, Outcome], None] | None = None, retries: int = 5,
                         timeout: float = 60.0) -> FleetReport:
    """Provision every id with a CSR (group-derived keys), then connect it to its hub and send one message.

    At most ``concurrency`` devices are in flight; each honours the service's Retry-After and backs off
    on 429/5xx like a real device would. ``on_event("provisioned"|"connected"|"failed", outcome)``
    drives a progress display. Credentials go to ``work_dir/<id>`` when connecting or with ``keep``.
    Failures are recorded per device, never raised.
    """
    from opendps.device.hub import HubClient
    from opendps.device.keys import new_key_and_csr
    from opendps.device.mqtt import client_ssl_context
    from opendps.device.provisioning import ProvisioningClient, ProvisioningError
    from opendps.device.store import CertificateStore

    dps_context = client_ssl_context(endpoint.ca_file)  # one context for all: no client certificate with a group key
    ca_pem = endpoint.ca_file.read_text(encoding="ascii") if endpoint.ca_file else None
    slots = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()
    notify = on_event or (lambda _event, _outcome: None)

    async def one(registration_id: str) -> Outcome:
        outcome = Outcome(registration_id)
        async with slots:
            try:
                started = loop.time()
                key, csr = new_key_and_csr(registration_id)
                client = ProvisioningClient(endpoint.host, endpoint.id_scope, registration_id, group_key=group_key,
                                            ssl_context=dps_context, max_retries=retries, timeout=timeout,
                                            **endpoint.client_options())
                result = await client.register(csr)
                outcome.provision_seconds = loop.time() - started
                if not result.issued_chain:
                    raise RuntimeError("assigned without an operational certificate (no credential policy?)")
                outcome.provisioned = True
                notify("provisioned", outcome)
                if connect or keep:
                    stored = await asyncio.to_thread(CertificateStore(work_dir / registration_id).save, key,
                                                     result.issued_chain)
                if connect:
                    started = loop.time()
                    ctx = _hub_context(ca_pem, stored.chain_file, stored.key_file)
                    hub = HubClient(result.assigned_hub or endpoint.host, result.device_id or registration_id,
                                    port=endpoint.mqtt_port, ssl_context=ctx, x509=stored.tls_identity,
                                    address=endpoint.hub_address, reconnect=False, timeout=timeout)
                    try:
                        await hub.connect()
                        await hub.send_telemetry({"simulated": True, "registrationId": registration_id},
                                                 message_id=f"{registration_id}-1", timeout=timeout)
                    finally:
                        await hub.disconnect()
                    outcome.connect_seconds = loop.time() - started
                    outcome.connected = True
                    notify("connected", outcome)
            except ProvisioningError as exc:
                code = f" {exc.error_code}" if exc.error_code else ""
                outcome.error = _generic(f"provisioning: {exc.status}{code} {_one_line(exc.message)}", registration_id)
            except Exception as exc:  # noqa: BLE001 - one device's failure must not stop the fleet
                phase = "hub" if outcome.provisioned else "provisioning"
                outcome.error = _generic(f"{phase}: {type(exc).__name__}: {_one_line(exc) or 'no detail'}", registration_id)
            if outcome.error is not None:
                notify("failed", outcome)
        return outcome

    begin = time.perf_counter()
    outcomes = await asyncio.gather(*(one(rid) for rid in registration_ids))
    return FleetReport(list(outcomes), time.perf_counter() - begin)


def fleet_summary(report: FleetReport, *, transport: str, concurrency: int, connect: bool) -> dict[str, Any]:
    """Counts, latency percentiles (seconds) and the distinct errors, for JSON or the table."""
    outcomes = report.outcomes
    provision_times = [o.provision_seconds for o in outcomes if o.provisioned and o.provision_seconds is not None]
    connect_times = [o.connect_seconds for o in outcomes if o.connected and o.connect_seconds is not None]
    errors = Counter(o.error for o in outcomes if o.error)
    example = {o.error: o.registration_id for o in reversed(outcomes) if o.error}

    def stats(values: list[float]) -> dict[str, float | None]:
        return {name: None if (v := percentile(values, q)) is None else round(v, 3)
                for name, q in (("p50", 0.50), ("p95", 0.95), ("max", 1.0))}

    total = report.total_seconds
    return {
        "count": len(outcomes),
        "transport": transport,
        "concurrency": concurrency,
        "provisioned": sum(o.provisioned for o in outcomes),
        "connected": sum(o.connected for o in outcomes) if connect else None,
        "failed": sum(o.error is not None for o in outcomes),
        "latencySeconds": {"provisioning": stats(provision_times), "hub": stats(connect_times) if connect else None},
        "totalSeconds": round(total, 3),
        "devicesPerSecond": round(len(outcomes) / total, 2) if total > 0 else None,
        "errors": [{"message": message, "count": count, "example": example[message]}
                   for message, count in errors.most_common(10)],
    }


def _print_fleet_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    latency = summary["latencySeconds"]
    table = Table(title="device simulate", show_header=True, header_style="bold", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    rows = [("devices", summary["count"]), ("transport", summary["transport"]), ("concurrency", summary["concurrency"]),
            ("provisioned", summary["provisioned"]),
            ("connected", "-" if summary["connected"] is None else summary["connected"]),
            ("failed", summary["failed"]),
            ("provisioning p50 / p95", f"{ms(latency['provisioning']['p50'])} / {ms(latency['provisioning']['p95'])}")]
    if latency["hub"] is not None:
        rows.append(("hub connect + send p50 / p95", f"{ms(latency['hub']['p50'])} / {ms(latency['hub']['p95'])}"))
    rows += [("total time", f"{summary['totalSeconds']:.2f} s"), ("devices / s", summary["devicesPerSecond"])]
    for name, value in rows:
        table.add_row(name, str(value))
    console = Console(width=200)
    console.print(table)
    for error in summary["errors"]:
        console.print(f"[red]{error['count']} ×[/red] {error['message']} (e.g. {error['example']})", highlight=False)


@device.command("simulate")
@click.option("--count", "-n", type=click.IntRange(1, 100_000), default=10, show_default=True,
              help="Number of devices.")
@click.option("--group-key", required=True,
              help="Key of a symmetric-key enrollment group with a credential policy (base64); device keys are derived.")
@click.option("--prefix", default="sim", show_default=True, help="Registration ids are '<prefix>-<i>', i = 0..count-1.")
@click.option("--concurrency", "-c", type=click.IntRange(1, 10_000), default=32, show_default=True,
              help="Devices in flight at once.")
@click.option("--connect/--no-connect", "connect", default=True, show_default=True,
              help="Connect each provisioned device to its hub with its new certificate and send one telemetry message.")
@click.option("--store-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep each device's operational credentials in <store-dir>/<registration id> (default: a temporary "
                   "directory, removed afterwards).")
@click.option("--retries", type=click.IntRange(0, 20), default=5, show_default=True,
              help="Per-request retries on 429/5xx/unreachable, with backoff and jitter.")
@endpoint_options(hub=True)
@output_option(default="table")
def simulate(endpoint: Endpoint, output: str, count: int, group_key: str, prefix: str, concurrency: int, connect: bool,
             store_dir: Path | None, retries: int) -> None:
    """Provision --count devices concurrently with CSRs, connect each to its hub once; non-zero exit if any failed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    key = _base64_key(group_key, "--group-key")
    assert key is not None
    ids = [f"{prefix}-{i}" for i in range(count)]
    _check_csr_id(ids[-1], "registration id (from --prefix)")
    with contextlib.ExitStack() as stack:
        if store_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="opendps-simulate-")))
        else:
            work_dir = store_dir
            work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        console = Console(stderr=True)  # stdout carries only the summary; off a terminal stderr only the error
        bar = stack.enter_context(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                           TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                                           console=console, transient=output != "table",
                                           disable=not console.is_terminal or output != "table"))
        provisioning = bar.add_task("provisioned", total=count, failed=0)
        hub_task = bar.add_task("connected", total=count, failed=0) if connect else None
        failed = 0

        def on_event(event: str, outcome: Outcome) -> None:
            nonlocal failed
            if event == "provisioned":
                bar.advance(provisioning)
            elif event == "connected" and hub_task is not None:
                bar.advance(hub_task)
            elif event == "failed":
                failed += 1
                bar.update(provisioning, failed=failed)

        report = asyncio.run(simulate_fleet(endpoint, key, ids, concurrency=concurrency, connect=connect,
                                            work_dir=work_dir, keep=store_dir is not None, on_event=on_event,
                                            retries=retries))
    summary = fleet_summary(report, transport=endpoint.transport, concurrency=concurrency, connect=connect)
    if output != "table":
        emit(summary, output)
    else:
        _print_fleet_summary(summary)
    if summary["failed"]:
        first = summary["errors"][0]["message"].replace("<id>", summary["errors"][0]["example"])
        raise CliError(f"{summary['failed']} of {summary['count']} devices failed (first: {first})")


# ---------------------------------------------------------------- run


@device.command("run")
@click.option("--registration-id", "--rid", "registration_id", required=True, help="The device's registration id.")
@click.option("--certificate-file", "--cert", "certificate_file", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="X.509 bootstrap chain, leaf first (e.g. the seed's device-full-chain.pem).")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Private key of --certificate-file (e.g. the seed's device.key).")
@click.option("--symmetric-key", "--key", "symmetric_key", default=None, help="Individual enrollment key (base64).")
@click.option("--group-key", default=None, help="Symmetric-key group key (base64); the device key is derived.")
@tpm_options
@click.option("--store-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Operational key and chain (default ./device-<registration-id>); reused across restarts.")
@click.option("--renewal", "renewal_method", type=click.Choice(["dps", "hub"]), default="dps", show_default=True,
              help="Renew by re-registering with DPS (the seed's method) or through the hub's $iothub/credentials topic.")
@click.option("--telemetry-interval", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
              help="Seconds between telemetry messages.")
@click.option("--renew-now", is_flag=True, default=False, help="Renew once right after connecting (e.g. to test it).")
@click.option("--duration", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Stop after this many seconds (0: run until interrupted); exit non-zero if the device did not "
                   "connect to its hub meanwhile.")
@endpoint_options(hub=True)
def run_agent(endpoint: Endpoint, registration_id: str, certificate_file: Path | None, key_file: Path | None,
              symmetric_key: str | None, group_key: str | None, use_tpm: bool, tcti: str | None, store_dir: Path | None,
              renewal_method: str, telemetry_interval: float, renew_now: bool, duration: float) -> None:
    """The long-running device agent: provision if needed, connect, send telemetry, answer methods, renew in time.

    Reuses the set `device provision` stored in --store-dir. Answers the direct methods getStatus and
    renewCertificate (202: the renewal follows). Prints one JSON line per event: lifecycle events (provisioned,
    connected, switching, renewed, rolled-back, renewal-failed, and certificate-refused, reprovisioned,
    reprovision-failed when the hub refuses the certificate, e.g. revoked, and the agent registers again) with the
    agent's status, and traffic events (method, c2d, desired, disconnected, reconnected, connect-refused) with what
    arrived. With --tpm the agent onboards (and renews through DPS) with TPM attestation and connects to its hub with
    the operational certificate.
    """
    credential: dict[str, Any] = {}
    if certificate_file is not None or key_file is not None:
        if certificate_file is None or key_file is None:
            raise CliError("--certificate-file and --key-file go together")
        credential = {"x509_cert_file": certificate_file, "x509_key_file": key_file}
    if symmetric_key is not None:
        credential["symmetric_key"] = _base64_key(symmetric_key, "--symmetric-key")
    if group_key is not None:
        credential["group_key"] = _base64_key(group_key, "--group-key")
    if use_tpm:
        credential["tpm"] = True
    elif tcti is not None:
        raise CliError("--tcti goes with --tpm")
    if len([k for k in credential if k != "x509_key_file"]) != 1:
        raise CliError("give exactly one onboarding credential: --certificate-file/--key-file, --symmetric-key, "
                       "--group-key or --tpm")
    if use_tpm and endpoint.transport != "https":
        raise CliError("--tpm works over HTTPS only (Azure DPS has no TPM attestation over MQTT): drop --transport mqtt")
    _check_csr_id(registration_id)
    with contextlib.ExitStack() as stack:
        if use_tpm:
            credential["tpm"] = stack.enter_context(open_tpm(tcti))
        _run_agent(endpoint, registration_id, credential, store_dir, renewal_method, telemetry_interval, renew_now,
                   duration)


def _run_agent(endpoint: Endpoint, registration_id: str, credential: dict[str, Any], store_dir: Path | None,
               renewal_method: str, telemetry_interval: float, renew_now: bool, duration: float) -> None:
    from opendps.device.agent import AgentConfig, AgentError, DeviceAgent
    from opendps.device.hub import HubError
    from opendps.device.mqtt import MqttError
    from opendps.device.provisioning import ProvisioningError
    from opendps.device.store import StoreError

    hub_options = {"address": endpoint.hub_address} if endpoint.hub_address else {}
    config = AgentConfig(dps_host=endpoint.host, id_scope=endpoint.id_scope, registration_id=registration_id,
                         store_dir=store_dir or Path(f"device-{registration_id}"), https_port=endpoint.https_port,
                         mqtt_port=endpoint.mqtt_port, ca_file=endpoint.ca_file, transport=endpoint.transport,
                         renewal_method=renewal_method, telemetry_interval=telemetry_interval, hub_options=hub_options,
                         **credential)

    connected = False  # whether the device reached its hub at all during the run

    def on_event(name: str, status: Any, details: dict[str, Any]) -> None:
        nonlocal connected
        connected = connected or name in ("connected", "reprovisioned", "renewed")
        if details:  # a traffic event
            line = {"event": name, "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                    "deviceId": status.device_id, **details}
        else:
            line = {"event": name, **status.to_dict()}
        click.echo(json.dumps(line, default=str))

    async def main() -> None:
        agent = DeviceAgent(config, on_event=on_event)
        task = asyncio.create_task(agent.run())
        renewed = False

        async def session() -> None:
            nonlocal renewed
            if renew_now:
                await agent.wait_ready()
                try:
                    await agent.renew_now()
                except (AgentError, ProvisioningError, HubError, MqttError, StoreError, OSError) as exc:
                    raise CliError(f"renewal of {registration_id!r} failed: {exc}") from exc
                renewed = True
            await asyncio.shield(task)  # the duration's end stops the agent below, it does not cancel it

        try:
            if not duration:
                await session()
            else:
                # the whole run within --duration, the wait for a first connection of --renew-now included (a device
                # that never connected, e.g. refused with 401, made it run until killed)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(session(), duration)
                if renew_now and not renewed:
                    raise CliError(f"renewal of {registration_id!r} was not done within --duration {duration:g} s: "
                                   "the device did not connect (see the lines above)")
                if not connected:  # a bounded run (a smoke test, firmware CI) that never got there did not succeed
                    raise CliError(f"{registration_id!r} did not connect to its hub within --duration {duration:g} s "
                                   "(see the lines above)")
        finally:
            await agent.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def register(main: click.Group) -> None:
    """Attach ``opendps device``."""
    main.add_command(device)
