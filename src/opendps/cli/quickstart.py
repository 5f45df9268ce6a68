"""``opendps quickstart``: the whole seed in one command, against an embedded server or a running one.

Namespace + policy, the seed's bootstrap CA chain (uploaded and proven), an enrollment group on the
intermediate, one device onboarded over MQTT with its X.509 bootstrap certificate and one over HTTPS
with a symmetric key — both with CSRs — both connected to the hub with their operational certificates,
telemetry flowing, certificate dates in the twin, and a forced renewal. Every step is checked from the
service side; the command exits 0 only if all of them succeeded.

When ``swtpm`` is on PATH and tpm2-pytss imports, a third device attests with a TPM (issue 16): a private swtpm
(state in a temporary directory of the work area, loopback TCP on free ports, stopped and removed at the end
whatever happens), an individual TPM enrollment for its endorsement key, provisioning over HTTPS with a P-384
CSR (``ProvisioningClient(tpm=...)`` through the device agent), then the hub with its operational certificate,
telemetry and twin like the others. Without them the run says why the TPM device was skipped and still exits 0;
tpm2-pytss is only imported then, never when this module is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from opendps.cli import CliError, data_dir_option, output_option
from opendps.cli._client import Client, api_path, resolve_connection
from opendps.cli.output import emit

if TYPE_CHECKING:
    from opendps.device.agent import DeviceAgent
    from opendps.instance import Instance

NAMESPACE = "quickstart"
POLICY = "quickstart-policy"


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    seconds: float
    skipped: bool = False  # an optional part left out (ok: it does not fail the run); detail says why


DEFAULT_PREFIX = "quickstart"


@dataclass
class Run:
    steps: list[Step] = field(default_factory=list)
    quiet: bool = False

    def step(self, name: str, fn: Callable[[], str]) -> None:
        """Run one step; record its outcome (the flow stops at the first failure)."""
        started = time.monotonic()
        try:
            detail = fn()
            ok = True
        except click.ClickException as exc:  # our own one-line errors (CliError, ApiError): the message is the detail
            detail, ok = exc.format_message(), False
        except Exception as exc:  # noqa: BLE001 - every failure is reported as the step's outcome
            detail, ok = f"{type(exc).__name__}: {exc}", False
        self.steps.append(Step(name, ok, detail, time.monotonic() - started))
        if not self.quiet:
            click.echo(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", err=True)
        if not ok:
            raise _Stop

    def skip(self, name: str, reason: str) -> None:
        """Record an optional part left out and say why (the run still succeeds)."""
        self.steps.append(Step(name, True, reason, 0.0, skipped=True))
        if not self.quiet:
            click.echo(f"{name} skipped: {reason}", err=True)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)


class _Stop(Exception):
    pass


class EmbeddedServer:
    """``opendps serve`` in a background thread (its own event loop), stopped on exit."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="opendps-embedded", daemon=True)

    def _main(self) -> None:
        from opendps.server import serve

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            ready = asyncio.Event()
            self._task = asyncio.create_task(serve(self.instance, ready=ready, banner=False))
            waiter = asyncio.create_task(ready.wait())
            await asyncio.wait({self._task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if self._task.done() and self._task.exception() is not None:
                raise self._task.exception()
            self._ready.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> EmbeddedServer:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise CliError(f"the embedded server did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(30)


@contextlib.contextmanager
def _server(data_dir: Path | None, https_port: int | None, mqtt_port: int | None, amqp_port: int | None = None,
            http_port: int | None = None) -> Iterator[tuple[Client, dict[str, Any]]]:
    """Start the embedded server; yield a management client of it and its ``info()`` (scope, ports, CA)."""
    from opendps.errors import ConfigurationError
    from opendps.instance import Settings, open_instance

    settings = Settings.load(data_dir, https_port=https_port, mqtt_port=mqtt_port, amqp_port=amqp_port,
                             http_port=http_port)
    try:
        instance = open_instance(settings)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    try:
        with EmbeddedServer(instance):
            info = instance.info()
            client = Client(resolve_connection(None, settings.data_dir, None))
            try:
                yield client, info
            finally:
                client.close()
    finally:
        instance.close()


def _find_event(client: Client, device_id: str, nonce: str, timeout: float = 15) -> dict[str, Any]:
    """The device's telemetry message carrying ``nonce``, read from the hub's durable event stream."""
    params = {"from": "earliest", "deviceId": device_id, "timeout": str(timeout)}
    with client.stream("GET", "/events", params=params) as resp:
        for line in resp.iter_lines():
            if line.strip():
                event = json.loads(line)
                payload = event["event"]["payload"]
                if isinstance(payload, dict) and payload.get("run") == nonce:
                    return event
    raise RuntimeError(f"no telemetry from {device_id} within {timeout:g} s")


def _twin_certificate(client: Client, device_id: str, serial: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        reported = (client.request("GET", api_path("twins", device_id)) or {}).get("properties", {}).get("reported", {})
        cert = reported.get("certificate") or {}
        if cert.get("serialNumber") == serial or time.monotonic() > deadline:
            if cert.get("serialNumber") != serial:
                raise RuntimeError(f"the twin of {device_id} reports {cert.get('serialNumber')!r}, not {serial!r}")
            return cert
        time.sleep(0.2)


def _flow(run: Run, client: Client, info: dict[str, Any], work: Path, prefix: str, validity: int) -> None:
    from opendps.device.agent import AgentConfig, DeviceAgent

    x509_id, sas_id, tpm_id = f"{prefix}-x509", f"{prefix}-symkey", f"{prefix}-tpm"
    # each prefix its own bootstrap chain (another prefix's files are never reused or in the way)
    cert_dir = work / "certs" if prefix == DEFAULT_PREFIX else work / f"certs-{prefix}"
    mqtt = info.get("endpoints", {}).get("mqtt", {})
    https = info.get("endpoints", {}).get("https", {})
    host = https.get("hostName", "localhost")
    ca_file = info.get("serverCaCertificate")
    scope = info["idScope"]

    common = {"dps_host": host, "id_scope": scope, "https_port": int(https.get("port", 8443)),
              "mqtt_port": int(mqtt.get("port", 8883)), "ca_file": ca_file, "retry_base": 1.0, "retry_max": 5.0}
    with contextlib.ExitStack() as stack:  # the TPM device's swtpm and TPM session: closed whatever happens
        sas_key = _service_side_steps(run, client, x509_id, sas_id, cert_dir, validity)
        tpm_agents = tpm_device(run, client, stack, work, tpm_id, common)
        agents = {
        x509_id: DeviceAgent(AgentConfig(registration_id=x509_id, store_dir=work / "devices" / x509_id, transport="mqtt",
                                         x509_cert_file=cert_dir / "device" / "device-full-chain.pem",
                                         x509_key_file=cert_dir / "device" / "device.key", renewal_method="hub", **common)),
        sas_id: DeviceAgent(AgentConfig(registration_id=sas_id, store_dir=work / "devices" / sas_id, transport="https",
                                        symmetric_key=sas_key, renewal_method="dps", **common)),
            **tpm_agents,
        }
        transports = {x509_id: "MQTT, X.509 bootstrap", sas_id: "HTTPS, symmetric key", tpm_id: "HTTPS, TPM (swtpm)"}
        _device_steps(run, client, agents, {rid: transports[rid] for rid in agents}, x509_id)


TPM_DEVICE = "TPM device"


def tpm_missing() -> str | None:
    """Why the quickstart cannot run a TPM device here (no swtpm, no usable tpm2-pytss), or None."""
    reasons = []
    from opendps.device.swtpm import swtpm_missing

    if (missing := swtpm_missing()) is not None:
        reasons.append(missing)
    try:
        import tpm2_pytss  # noqa: F401 - only whether it imports (with its TSS2 libraries)
    except ImportError:
        reasons.append("tpm2-pytss not installed (pip install 'opendps[tpm]'; it needs apt install libtss2-dev)")
    except OSError as exc:  # installed, but the TSS2 shared libraries are not
        reasons.append(f"tpm2-pytss not usable ({exc}; apt install libtss2-dev)")
    return "; ".join(reasons) or None


def tpm_device(run: Run, client: Client | None, stack: contextlib.ExitStack, work: Path, rid: str,
               common: dict[str, Any]) -> dict[str, DeviceAgent]:
    """The TPM device's service-side steps (a private swtpm, its EK enrolled); → its agent, or nothing when skipped.

    The swtpm and the TPM session go on ``stack`` (closed by the caller whatever happens). Without swtpm or
    tpm2-pytss it records one skipped step saying why and touches nothing else.
    """
    reason = tpm_missing()
    if reason is not None:
        run.skip(TPM_DEVICE, reason)
        return {}
    assert client is not None
    # as `opendps device`'s open_tpm: the TSS libraries log their own WARNING/ERROR lines on stderr (reading the EK
    # certificate's NV index that a fresh swtpm does not have), which made a passing run look failed
    os.environ.setdefault("TSS2_LOG", "all+none")
    from opendps.device.agent import AgentConfig, DeviceAgent
    from opendps.device.swtpm import running_swtpm
    from opendps.device.tpm import DeviceTpm

    box: dict[str, Any] = {}
    store_dir = work / "devices" / rid

    def software_tpm() -> str:
        tcti = stack.enter_context(running_swtpm(work))
        box["tpm"] = tpm = stack.enter_context(DeviceTpm(tcti))
        box["ek"] = tpm.endorsement_key()
        port = tcti.rsplit("=", 1)[1]
        return f"a private swtpm on 127.0.0.1:{port} (TCTI {tcti}): RSA-2048 endorsement key and SRK created"

    def tpm_enrollment() -> str:
        client.request("PUT", api_path("enrollments", rid), json={
            "registrationId": rid, "attestation": {"type": "tpm", "tpm": {"endorsementKey": box["ek"]}},
            "credentialPolicyName": POLICY, "namespaceName": NAMESPACE})
        # each run has a new TPM: an earlier run's certificate and SRK-wrapped key belong to a TPM that is gone
        shutil.rmtree(store_dir, ignore_errors=True)
        return f"individual TPM enrollment {rid!r} for this swtpm's endorsement key"

    run.step("software TPM", software_tpm)
    run.step("TPM enrollment", tpm_enrollment)
    return {rid: DeviceAgent(AgentConfig(registration_id=rid, store_dir=store_dir, transport="https", tpm=box["tpm"],
                                         renewal_method="dps", **common))}


def _service_side_steps(run: Run, client: Client, x509_id: str, sas_id: str, cert_dir: Path, validity: int) -> str:
    """Namespace and policy, the bootstrap CA chain proven, the two enrollments; → the symmetric key."""
    from opendps.cli.bootstrap import build_pki, ensure_group, ensure_policy, upload_and_verify

    def namespace() -> str:
        ensure_policy(client, NAMESPACE, POLICY)
        client.request("PUT", api_path("namespaces", NAMESPACE, "credentials", "default", "policies", POLICY),
                       json={"properties": {"certificate": {"leafCertificateConfiguration": {
                           "validityPeriodInDays": validity}}}}, if_match="*")
        return f"namespace {NAMESPACE!r}, policy {POLICY!r}: P-384 issuing CA, {validity}-day leaves"

    pki_box: dict[str, Any] = {}

    def bootstrap_pki() -> str:
        pki = build_pki(x509_id, cert_dir, force=False)
        pki_box["pki"] = pki
        return f"RSA-4096 root + intermediate, RSA-2048 bootstrap certificate for {x509_id!r} in {cert_dir}"

    def prove() -> str:
        pki = pki_box["pki"]
        for which, cert, key in (("root", pki.root, pki.root_key), ("intermediate", pki.intermediate, pki.intermediate_key)):
            upload_and_verify(client, f"{x509_id}-{which}", cert, key)
        return "root and intermediate uploaded and verified by proof of possession"

    def group() -> str:
        ensure_group(client, f"{x509_id}-group", f"{x509_id}-intermediate", POLICY, NAMESPACE)
        return f"enrollment group {x509_id}-group on the intermediate, credential policy {POLICY!r}"

    keys: dict[str, str] = {}

    def symmetric_enrollment() -> str:
        doc = client.request("PUT", api_path("enrollments", sas_id), json={
            "registrationId": sas_id, "attestation": {"type": "symmetricKey"}, "credentialPolicyName": POLICY,
            "namespaceName": NAMESPACE})
        keys["sas"] = doc["attestation"]["symmetricKey"]["primaryKey"]
        return f"individual symmetric-key enrollment {sas_id!r}"

    for name, fn in (("namespace and policy", namespace), ("bootstrap CA chain", bootstrap_pki),
                     ("proof of possession", prove), ("enrollment group", group),
                     ("symmetric-key enrollment", symmetric_enrollment)):
        run.step(name, fn)
    return keys["sas"]


def _device_steps(run: Run, client: Client, agents: dict[str, DeviceAgent], transports: dict[str, str],
                  x509_id: str) -> None:
    """Every device provisioned and connected, telemetry, twin reporting and a forced renewal (of ``x509_id``),
    on one event loop."""
    loop = asyncio.new_event_loop()
    tasks = {rid: loop.create_task(a.run()) for rid, a in agents.items()}
    try:
        for rid, transport in transports.items():
            def provisioned(rid: str = rid, transport: str = transport) -> str:
                loop.run_until_complete(asyncio.wait_for(agents[rid].wait_ready(), 120))
                st = agents[rid].status
                cert = st.certificate or {}
                return (f"{rid} via {transport}: hub {st.assigned_hub}, certificate {cert.get('serialNumber')} "
                        f"valid {cert.get('validFrom')} .. {cert.get('validUntil')}")
            run.step(f"provision and connect {rid}", provisioned)

        def blocking(fn: Callable[..., Any], *args: Any) -> Any:
            """Service-side checks block; run them in a thread so the devices' event loop keeps running."""
            return loop.run_until_complete(asyncio.to_thread(fn, *args))

        def telemetry() -> str:
            nonce = uuid.uuid4().hex

            async def send() -> None:
                for rid, agent in agents.items():
                    agent.queue_telemetry({"temperature": 21.5, "device": rid, "run": nonce}, {"source": "quickstart"})
            loop.run_until_complete(send())
            for rid in agents:
                blocking(_find_event, client, rid, nonce)
            return "one message from each device, read back from the hub's event stream"

        def twins() -> str:
            for rid, agent in agents.items():
                blocking(_twin_certificate, client, rid, (agent.status.certificate or {}).get("serialNumber", ""))
            every = "both twins report" if len(agents) == 2 else f"all {len(agents)} twins report"
            return f"{every} their certificate's validFrom/validUntil/serialNumber/thumbprint"

        def renewal() -> str:
            before = (agents[x509_id].status.certificate or {}).get("serialNumber")
            after = loop.run_until_complete(asyncio.wait_for(agents[x509_id].renew_now(), 120))
            if after.get("serialNumber") == before:
                raise RuntimeError("renewal returned the same certificate")
            blocking(_twin_certificate, client, x509_id, after["serialNumber"])
            return (f"{x509_id} renewed through the hub: serial {before} -> {after['serialNumber']}, "
                    f"valid until {after['validUntil']}; the hub accepted it and the twin shows it")

        for name, fn in (("telemetry", telemetry), ("twin reporting", twins), ("forced renewal", renewal)):
            run.step(name, fn)
    finally:
        for agent in agents.values():
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(agent.stop(), 15))
        for task in tasks.values():
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks.values(), return_exceptions=True))
        loop.close()


def register(main: click.Group) -> None:
    main.add_command(quickstart)


@click.command()
@data_dir_option
@click.option("--https-port", type=int, default=None, help="HTTPS port of the embedded server (default 8443).")
@click.option("--mqtt-port", type=int, default=None, help="MQTT port of the embedded server (default 8883).")
@click.option("--amqp-port", type=int, default=None, help="AMQP port of the embedded server (default 5671; 0 = off).")
@click.option("--http-port", type=int, default=None,
              help="Plain-HTTP port (CRLs and OCSP) of the embedded server (default 8080; 0 = off).")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="Prefix of the devices' registration ids.")
@click.option("--cert-validity-days", "validity", type=click.IntRange(1, 90), default=30, show_default=True,
              help="Leaf validity of the quickstart policy.")
@output_option(default="table")
def quickstart(data_dir: Path | None, https_port: int | None, mqtt_port: int | None, amqp_port: int | None,
               http_port: int | None, prefix: str, validity: int, output: str) -> None:
    """Run the seed end to end against an embedded server; exit 0 only if every step succeeded."""
    run = Run(quiet=output != "table")
    with _server(data_dir, https_port, mqtt_port, amqp_port, http_port) as (client, info):
        work = Path(info["dataDir"]) / "quickstart"
        with contextlib.suppress(_Stop):
            _flow(run, client, info, work, prefix, validity)
    if output != "table":
        emit({"ok": run.ok, "steps": [s.__dict__ for s in run.steps]}, output)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="opendps quickstart")
        for col in ("step", "result", "detail", "seconds"):
            table.add_column(col)
        for s in run.steps:
            table.add_row(s.name, "skipped" if s.skipped else "ok" if s.ok else "FAILED", s.detail, f"{s.seconds:.1f}")
        Console().print(table)
    if not run.ok:
        sys.exit(1)
