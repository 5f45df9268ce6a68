"""az-style management verbs (``opendps adr ...``, ``opendps dps ...``): thin clients of the REST API.

They mirror ``az iot adr`` / ``az iot dps`` verbs and flags so scripts port over; all logic stays on the
server, the CLI only maps flags to requests (docs/api.md) and prints answers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from opendps.cli import OUTPUT_OPTION, CliError, non_empty_path
from opendps.cli._client import ApiError, Client, api_path, read_certificate_file, resolve_connection
from opendps.cli.output import emit
from opendps.transport import sas

CERT_COLUMNS = ["name", "properties.subject", "properties.isVerified", "properties.expiry", "etag"]
NS_COLUMNS = ["name", "properties.credential.subject", "properties.policies"]
POLICY_COLUMNS = ["name", "properties.certificate.leafCertificateConfiguration.validityPeriodInDays",
                  "properties.certificate.certificateAuthorityConfiguration.subject",
                  "properties.certificate.certificateAuthorityConfiguration.keyBackend", "etag"]
DEVICE_RECORD_COLUMNS = ["name", "properties.registrationId", "properties.iotHubHostName", "properties.policy",
                         "properties.operationalCertificate.serialNumber", "properties.operationalCertificate.notAfter"]
CREDENTIAL_COLUMNS = ["name", "properties.subject", "properties.thumbprint", "properties.notBefore",
                      "properties.notAfter", "properties.curve", "properties.keyBackend", "properties.keyLabel"]
DEFAULT_VALIDITY_DAYS = 30

VALIDITY = click.IntRange(1, 90)


def _connection_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """The shared connection and output options, in the order help lists them (after the command's own)."""
    return [
        click.option("--login", "-l", default=None, metavar="CONNECTION_STRING",
                     help="Service connection string 'HostName=...;SharedAccessKeyName=...;"
                          "SharedAccessKey=...' (default $OPENDPS_CONNECTION_STRING, else the local "
                          "data directory)."),
        click.option("--data-dir", type=click.Path(), default=None, callback=non_empty_path,
                     help="Data directory to take the connection from "
                          "(default $OPENDPS_DATA_DIR or ./.opendps)."),
        click.option("--ca-file", type=click.Path(path_type=Path), default=None,
                     help="PEM CA certificate to trust for the server (default $OPENDPS_CA_FILE, else the "
                          "data directory's tls/server-ca.pem, else the system store)."),
        OUTPUT_OPTION,
    ]


def _with_connection_options(wrapper: Callable[..., Any], output: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """Attach the connection options; ``output`` replaces the default ``-o`` option (e.g. a table default)."""
    options = [output if (o is OUTPUT_OPTION and output is not None) else o for o in _connection_options()]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def api_command(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared connection and output options; call ``f(client, ...)`` with a ready Client."""

    @functools.wraps(f)
    def wrapper(*args: Any, login: str | None, data_dir: Path | None, ca_file: Path | None,
                **kwargs: Any) -> Any:
        client = Client(resolve_connection(login, data_dir, ca_file))
        try:
            return f(client, *args, **kwargs)
        finally:
            client.close()

    return _with_connection_options(wrapper)


def lazy_api_command(f: Callable[..., Any] | None = None, *, output: Callable[..., Any] | None = None) -> Any:
    """Like :func:`api_command`, but ``f(connect, ...)`` gets a factory: verbs that may work offline
    (e.g. computing a device key from a given group key) must not fail for want of a connection.
    ``@lazy_api_command(output=...)`` swaps the ``-o`` option."""
    if f is None:
        return functools.partial(lazy_api_command, output=output)

    @functools.wraps(f)
    def wrapper(*args: Any, login: str | None, data_dir: Path | None, ca_file: Path | None,
                **kwargs: Any) -> Any:
        clients: list[Client] = []

        def connect() -> Client:
            if not clients:
                clients.append(Client(resolve_connection(login, data_dir, ca_file)))
            return clients[0]

        try:
            return f(connect, *args, **kwargs)
        finally:
            for client in clients:
                client.close()

    return _with_connection_options(wrapper, output)


def _list(client: Client, path: str) -> list[Any]:
    """List endpoints answer ``{"value": [...]}``; print just the list, as az does. A paged one also answers a
    ``continuationToken``: the pages are followed to the end."""
    items: list[Any] = []
    token: str | None = None
    seen: set[str] = set()
    while True:
        body = client.exchange("GET", path, params={"continuationToken": token} if token else None)[0] or {}
        if not isinstance(body, dict):
            return body if isinstance(body, list) else items
        items.extend(body.get("value", []))
        token = body.get("continuationToken")
        if not token:
            return items
        if token in seen:
            raise CliError(f"GET {path} repeated continuation token {token!r}")
        seen.add(token)


def _exists(client: Client, path: str) -> dict[str, Any] | None:
    """The resource at ``path``, or None on 404 (other errors propagate)."""
    try:
        return client.request("GET", path)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def _ns_path(namespace: str, *rest: str) -> str:
    return api_path("namespaces", namespace, *rest)


def _policy_path(namespace: str, *rest: str) -> str:
    return _ns_path(namespace, "credentials", "default", "policies", *rest)


def _policy_body(validity_days: int, allow_p256: bool, revoke_superseded: bool | None = None,
                 crl_hours: int | None = None, key_backend: str | None = None) -> dict[str, Any]:
    """A policy PUT body; the settings left None are not sent, so the service keeps (or defaults) them."""
    ca: dict[str, Any] = {"keyType": "ECC"}
    leaf: dict[str, Any] = {"validityPeriodInDays": validity_days, "allowP256": allow_p256}
    if crl_hours is not None:
        ca["crlValidityInHours"] = crl_hours
    if key_backend is not None:
        ca["keyBackend"] = key_backend
    if revoke_superseded is not None:
        leaf["revokeSupersededCertificates"] = revoke_superseded
    return {"properties": {"certificate": {"certificateAuthorityConfiguration": ca,
                                           "leafCertificateConfiguration": leaf}}}


NS_NAME = click.option("--name", "-n", "--ns", "--namespace", "name", required=True, help="Namespace name.")
NAMESPACE = click.option("--namespace", "--ns", "namespace", required=True, help="Namespace name.")
POLICY_NAME = click.option("--name", "-n", "name", required=True, help="Credential policy name.")
CERT_NAME = click.option("--certificate-name", "--name", "-n", "name", required=True,
                         help="Name of the CA certificate in the service.")
CERT_PATH = click.option("--path", "-p", "path", required=True,
                         help="Certificate file (.pem or .cer: PEM or DER).")
VALIDITY_OPTION = click.option("--cert-validity-days", "validity", type=VALIDITY, default=None,
                               help="Validity of issued leaf certificates in days (1-90).")
ALLOW_P256 = click.option("--allow-p256/--no-allow-p256", "allow_p256", default=None,
                          help="Accept device CSRs with P-256 keys (default: P-384 only).")
# RFC 5280 CRLReason names (the service checks them too: opendps.pki.REVOCATION_REASONS)
REVOCATION_REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
                      "cessationOfOperation", "certificateHold", "privilegeWithdrawn", "aACompromise")
SUPERSEDE = click.option("--revoke-superseded/--keep-superseded", "revoke_superseded", default=None,
                         help="When a device connects with a renewed certificate, revoke its older ones as superseded "
                              "(default), or keep them valid until they expire (Azure's behaviour).")
KEY_BACKEND = click.option("--key-backend", type=click.Choice(["software", "pkcs11"]), default=None,
                           help="Where the CA's private key is generated: encrypted in the database (software) or on "
                                "the installation's PKCS#11 token (pkcs11); default: the installation's choice.")
CRL_HOURS = click.option("--crl-validity-hours", "crl_hours", type=click.IntRange(1, 168), default=None,
                         help="How far ahead the issuing CA's CRL and OCSP responses are valid (1-168; default 24).")


def etag_option(required: bool, help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--etag", "-e", "etag", required=required, default=None, help=help_text)


def register(main: click.Group) -> None:
    """Attach the ``adr``, ``dps``, ``hub`` and ``device`` groups and ``bootstrap`` to the ``opendps`` command."""
    from opendps.cli.bootstrap import register as register_bootstrap
    from opendps.cli.device import register as register_device
    from opendps.cli.dps_policy import register as register_dps_policy
    from opendps.cli.enrollments import register as register_enrollments  # they import this module
    from opendps.cli.hub import register as register_hub

    main.add_command(adr)
    main.add_command(dps)
    register_enrollments(dps)
    register_dps_policy(dps)
    register_hub(main)
    register_bootstrap(main)
    register_device(main)
    main.add_command(issued_certificate)


# ---------------------------------------------------------------- adr


@click.group()
def adr() -> None:
    """Device registry namespaces, their root CA credential and certificate policies (az iot adr)."""


@adr.group("ns")
def ns() -> None:
    """Namespaces."""


@ns.command("create")
@NS_NAME
@click.option("--policy-name", default="default", show_default=True,
              help="Name of the initial credential policy.")
@VALIDITY_OPTION
@KEY_BACKEND
@click.option("--policy-key-backend", type=click.Choice(["software", "pkcs11"]), default=None,
              help="Where the first policy's issuing CA key is generated, if not where the root's is.")
@api_command
def ns_create(client: Client, output: str, name: str, policy_name: str, validity: int | None, key_backend: str | None,
              policy_key_backend: str | None) -> None:
    """Create a namespace with its root CA and a first policy (issuing CA)."""
    props: dict[str, Any] = {"policyName": policy_name}
    if validity is not None:
        props["validityPeriodInDays"] = validity
    if key_backend is not None:
        props["keyBackend"] = key_backend
    if policy_key_backend is not None:
        props["policyKeyBackend"] = policy_key_backend
    emit(client.request("PUT", _ns_path(name), json={"properties": props}), output, NS_COLUMNS)


@ns.command("show")
@NS_NAME
@api_command
def ns_show(client: Client, output: str, name: str) -> None:
    """Show a namespace."""
    emit(client.request("GET", _ns_path(name)), output, NS_COLUMNS)


@ns.command("list")
@api_command
def ns_list(client: Client, output: str) -> None:
    """List namespaces."""
    emit(_list(client, api_path("namespaces")), output, NS_COLUMNS)


@ns.command("delete")
@NS_NAME
@api_command
def ns_delete(client: Client, output: str, name: str) -> None:
    """Delete a namespace (refused while an enrollment uses one of its policies)."""
    client.request("DELETE", _ns_path(name))


@ns.group("credential")
def credential() -> None:
    """The namespace credential (root CA)."""


@credential.command("show")
@NAMESPACE
@click.option("--pem", is_flag=True, default=False, help="Print only the root CA certificate (PEM).")
@api_command
def credential_show(client: Client, output: str, namespace: str, pem: bool) -> None:
    """Show the namespace root CA (trust anchor for devices' issued certificates)."""
    body = client.request("GET", _ns_path(namespace, "credentials", "default"))
    if pem:
        text = ((body or {}).get("properties") or {}).get("certificate")
        if not text:
            raise CliError(f"namespace {namespace!r} credential has no certificate")
        click.echo(text, nl=not text.endswith("\n"))
        return
    emit(body, output, CREDENTIAL_COLUMNS)


@ns.group("policy")
def policy() -> None:
    """Credential policies: an issuing CA plus leaf certificate settings."""


@policy.command("create")
@NAMESPACE
@POLICY_NAME
@VALIDITY_OPTION
@ALLOW_P256
@SUPERSEDE
@CRL_HOURS
@KEY_BACKEND
@api_command
def policy_create(client: Client, output: str, namespace: str, name: str, validity: int | None,
                  allow_p256: bool | None, revoke_superseded: bool | None, crl_hours: int | None,
                  key_backend: str | None) -> None:
    """Create a policy (a new issuing CA under the namespace root); fails if it exists."""
    path = _policy_path(namespace, name)
    if _exists(client, path) is not None:  # the API has no If-None-Match; PUT would silently update
        raise CliError(f"policy {name!r} already exists in namespace {namespace!r} (use 'policy update')")
    body = _policy_body(DEFAULT_VALIDITY_DAYS if validity is None else validity, bool(allow_p256), revoke_superseded,
                        crl_hours, key_backend)
    emit(client.request("PUT", path, json=body), output, POLICY_COLUMNS)


@policy.command("update")
@NAMESPACE
@POLICY_NAME
@VALIDITY_OPTION
@ALLOW_P256
@SUPERSEDE
@CRL_HOURS
@etag_option(False, "Only update if the policy still has this ETag.")
@api_command
def policy_update(client: Client, output: str, namespace: str, name: str, validity: int | None,
                  allow_p256: bool | None, revoke_superseded: bool | None, crl_hours: int | None,
                  etag: str | None) -> None:
    """Change leaf validity, P-256 acceptance, superseded-certificate handling or CRL validity; fails if the
    policy does not exist."""
    if validity is None and allow_p256 is None and revoke_superseded is None and crl_hours is None:
        raise CliError("nothing to update: pass --cert-validity-days, --allow-p256/--no-allow-p256, "
                       "--revoke-superseded/--keep-superseded and/or --crl-validity-hours")
    path = _policy_path(namespace, name)
    current = _exists(client, path)
    if current is None:
        raise CliError(f"policy {name!r} does not exist in namespace {namespace!r} (use 'policy create')")
    leaf = (((current.get("properties") or {}).get("certificate") or {})
            .get("leafCertificateConfiguration") or {})
    if validity is None:
        validity = leaf.get("validityPeriodInDays", DEFAULT_VALIDITY_DAYS)
    if allow_p256 is None:
        allow_p256 = bool(leaf.get("allowP256", False))
    body = _policy_body(validity, allow_p256, revoke_superseded, crl_hours)
    emit(client.request("PUT", path, json=body, if_match=etag), output, POLICY_COLUMNS)


@policy.command("show")
@NAMESPACE
@POLICY_NAME
@api_command
def policy_show(client: Client, output: str, namespace: str, name: str) -> None:
    """Show a policy, including its issuing CA certificate."""
    emit(client.request("GET", _policy_path(namespace, name)), output, POLICY_COLUMNS)


@policy.command("list")
@NAMESPACE
@api_command
def policy_list(client: Client, output: str, namespace: str) -> None:
    """List a namespace's policies."""
    emit(_list(client, _policy_path(namespace)), output, POLICY_COLUMNS)


@policy.command("delete")
@NAMESPACE
@POLICY_NAME
@etag_option(False, "Only delete if the policy still has this ETag.")
@api_command
def policy_delete(client: Client, output: str, namespace: str, name: str, etag: str | None) -> None:
    """Delete a policy (refused while an enrollment references it)."""
    client.request("DELETE", _policy_path(namespace, name), if_match=etag)


@policy.command("rotate")
@NAMESPACE
@POLICY_NAME
@etag_option(False, "Only rotate if the policy still has this ETag.")
@click.option("--key-backend", type=click.Choice(["software", "pkcs11"]), default=None,
              help="Where the new issuing CA's key is generated (default: where the current one's is).")
@api_command
def policy_rotate(client: Client, output: str, namespace: str, name: str, etag: str | None,
                  key_backend: str | None) -> None:
    """Give the policy a new issuing CA: devices get certificates from it when they next renew; hubs keep
    trusting the old one until it expires, so devices that have not renewed yet still connect."""
    body = {"keyBackend": key_backend} if key_backend is not None else None
    emit(client.request("POST", _policy_path(namespace, name, "rotate"), json=body, if_match=etag), output,
         POLICY_COLUMNS)


ISSUING_CA_COLUMNS = ["serialNumber", "status", "subject", "notAfter", "revocationReason"]


@policy.group("issuing-ca")
def policy_issuing_ca() -> None:
    """A policy's issuing CAs, past and present; revoke a retired one (key compromise: rotate, then revoke)."""


@policy_issuing_ca.command("list")
@NAMESPACE
@POLICY_NAME
@api_command
def issuing_ca_list(client: Client, output: str, namespace: str, name: str) -> None:
    """List the policy's issuing CAs, newest first (active, retired, revoked)."""
    emit(_list(client, _policy_path(namespace, name, "issuingCas")), output, ISSUING_CA_COLUMNS)


@policy_issuing_ca.command("revoke")
@NAMESPACE
@POLICY_NAME
@click.option("--ca", "ca", required=True, help="The issuing CA's serial number (hex) or SHA-256 thumbprint.")
@click.option("--reason", "-r", default=None, type=click.Choice(REVOCATION_REASONS, case_sensitive=False),
              help="RFC 5280 reason (default unspecified; keyCompromise revokes its leaves as cACompromise).")
@api_command
def issuing_ca_revoke(client: Client, output: str, namespace: str, name: str, ca: str, reason: str | None) -> None:
    """Revoke a retired issuing CA and every certificate it signed; hubs stop trusting it at once. The active CA
    cannot be revoked: rotate the policy first."""
    emit(client.request("POST", _policy_path(namespace, name, "issuingCas", ca, "revoke"), {"reason": reason}),
         output, ["issuingCa.serialNumber", "issuingCa.status", "revokedCertificateCount"])


@ns.group("device")
def ns_device() -> None:
    """The namespace's device registry: each provisioned device and its current operational certificate."""


@ns_device.command("list")
@NAMESPACE
@api_command
def ns_device_list(client: Client, output: str, namespace: str) -> None:
    """List the devices provisioned into a namespace."""
    emit(_list(client, _ns_path(namespace, "devices")), output, DEVICE_RECORD_COLUMNS)


@ns_device.command("show")
@NAMESPACE
@click.option("--device-id", "-d", "device_id", required=True, help="Device id.")
@api_command
def ns_device_show(client: Client, output: str, namespace: str, device_id: str) -> None:
    """Show one device record."""
    emit(client.request("GET", _ns_path(namespace, "devices", device_id)), output, DEVICE_RECORD_COLUMNS)


# ---------------------------------------------------------------- certificate (issued certificates, revocation)
ISSUED_COLUMNS = ["serialNumber", "registrationId", "notAfter", "revoked", "revocationReason"]


@click.group("certificate")
def issued_certificate() -> None:
    """Operational certificates this service issued: list, show, revoke (the hub refuses a revoked certificate at
    once and drops the sessions holding it)."""


@issued_certificate.command("list")
@click.option("--device-id", "-d", "device_id", default=None, help="Only this device's (device or registration id).")
@click.option("--namespace", "--ns", "namespace", default=None, help="Only those issued under this namespace.")
@api_command
def issued_list(client: Client, output: str, device_id: str | None, namespace: str | None) -> None:
    """List issued certificates, newest first."""
    params = {k: v for k, v in (("deviceId", device_id), ("namespace", namespace)) if v}
    body = client.exchange("GET", "/deviceCertificates", params=params)[0] or {}
    emit(body.get("value", []), output, ISSUED_COLUMNS)


@issued_certificate.command("show")
@click.option("--serial-number", "-s", "serial", required=True,
              help="Serial number as openssl prints it (hex), or the SHA-256 thumbprint.")
@api_command
def issued_show(client: Client, output: str, serial: str) -> None:
    """Show one issued certificate."""
    emit(client.request("GET", api_path("deviceCertificates", serial)), output, ISSUED_COLUMNS)


@issued_certificate.command("revoke")
@click.option("--serial-number", "-s", "serial", default=None,
              help="Serial number as openssl prints it (hex), or the SHA-256 thumbprint.")
@click.option("--device-id", "-d", "device_id", default=None,
              help="Revoke every unrevoked certificate of this device (device or registration id).")
@click.option("--policy", "-p", "policy", default=None,
              help="Revoke every unrevoked certificate issued under this policy (with --namespace).")
@click.option("--namespace", "--ns", "namespace", default=None,
              help="With --device-id: only under this namespace; with --policy: the policy's namespace.")
@click.option("--reason", "-r", default=None, type=click.Choice(REVOCATION_REASONS, case_sensitive=False),
              help="RFC 5280 reason (default unspecified).")
@api_command
def issued_revoke(client: Client, output: str, serial: str | None, device_id: str | None, policy: str | None,
                  namespace: str | None, reason: str | None) -> None:
    """Revoke one certificate (--serial-number), all of a device's (--device-id) or all under a policy (--policy)."""
    if sum(x is not None for x in (serial, device_id, policy)) != 1:
        raise CliError("give exactly one of --serial-number, --device-id and --policy")
    if policy is not None:
        if namespace is None:
            raise CliError("--policy needs --namespace")
        emit(client.request("POST", _policy_path(namespace, policy, "revokeCertificates"), {"reason": reason}),
             output, ["revokedCertificateCount"])
        return
    if serial is not None:
        if namespace is not None:
            raise CliError("--namespace goes with --device-id or --policy")
        emit(client.request("POST", api_path("deviceCertificates", serial, "revoke"), {"reason": reason}), output,
             ISSUED_COLUMNS)
        return
    body = client.request("POST", "/deviceCertificates/revoke",
                          {"deviceId": device_id, "namespace": namespace, "reason": reason}) or {}
    emit(body.get("value", []), output, ISSUED_COLUMNS)


# ---------------------------------------------------------------- dps


@click.group()
def dps() -> None:
    """Device Provisioning Service management (az iot dps)."""


@dps.group("certificate")
def certificate() -> None:
    """CA certificates verified by proof of possession."""


@certificate.command("create")
@CERT_NAME
@CERT_PATH
@api_command
def certificate_create(client: Client, output: str, name: str, path: str) -> None:
    """Upload a new CA certificate (unverified until 'verify')."""
    body = {"properties": {"certificate": read_certificate_file(path)}}
    emit(client.request("PUT", api_path("certificates", name), json=body), output, CERT_COLUMNS)


@certificate.command("update")
@CERT_NAME
@CERT_PATH
@etag_option(True, "ETag of the certificate being replaced.")
@api_command
def certificate_update(client: Client, output: str, name: str, path: str, etag: str) -> None:
    """Replace an existing CA certificate (resets verification)."""
    body = {"properties": {"certificate": read_certificate_file(path)}}
    emit(client.request("PUT", api_path("certificates", name), json=body, if_match=etag),
         output, CERT_COLUMNS)


@certificate.command("show")
@CERT_NAME
@api_command
def certificate_show(client: Client, output: str, name: str) -> None:
    """Show a CA certificate."""
    emit(client.request("GET", api_path("certificates", name)), output, CERT_COLUMNS)


@certificate.command("list")
@api_command
def certificate_list(client: Client, output: str) -> None:
    """List CA certificates."""
    emit(_list(client, api_path("certificates")), output, CERT_COLUMNS)


@certificate.command("delete")
@CERT_NAME
@etag_option(False, "Only delete if the certificate still has this ETag.")
@api_command
def certificate_delete(client: Client, output: str, name: str, etag: str | None) -> None:
    """Delete a CA certificate."""
    client.request("DELETE", api_path("certificates", name), if_match=etag)


@certificate.command("generate-verification-code")
@CERT_NAME
@etag_option(True, "Current ETag of the certificate.")
@api_command
def certificate_generate_code(client: Client, output: str, name: str, etag: str) -> None:
    """Get a verification code: sign a certificate with this CN to prove key possession."""
    path = api_path("certificates", name, "generateVerificationCode")
    emit(client.request("POST", path, if_match=etag), output, CERT_COLUMNS + ["properties.verificationCode"])


@certificate.command("verify")
@CERT_NAME
@CERT_PATH
@etag_option(True, "ETag returned by generate-verification-code.")
@api_command
def certificate_verify(client: Client, output: str, name: str, path: str, etag: str) -> None:
    """Verify possession with the certificate signed by the CA whose CN is the verification code."""
    body = {"certificate": read_certificate_file(path)}
    emit(client.request("POST", api_path("certificates", name, "verify"), json=body, if_match=etag),
         output, CERT_COLUMNS)


@dps.group("connection-string")
def connection_string() -> None:
    """Service connection strings."""


@connection_string.command("show")
@click.option("--policy-name", "--pn", default=None,
              help="Shared access policy (default: the connection in use's, e.g. provisioningserviceowner).")
@click.option("--key-type", "--kt", "key_type", type=click.Choice(["primary", "secondary"]), default=None,
              help="Which of the policy's keys to use (default primary; without it and --policy-name, the "
                   "connection in use).")
@api_command
def connection_string_show(client: Client, output: str, policy_name: str | None, key_type: str | None) -> None:
    """Print a service connection string: the one in use, or another policy's (read with the connection in use,
    which needs ServiceConfig); 'dps policy list|show' never print keys."""
    conn = client.connection
    if key_type is None and policy_name in (None, conn.key_name):
        emit({"connectionString": conn.connection_string}, output, ["connectionString"])
        return
    name = policy_name or conn.key_name
    keys = client.request("GET", api_path("accessPolicies", name, "keys"))
    key = keys["secondaryKey"] if key_type == "secondary" else keys["primaryKey"]
    emit({"connectionString": sas.connection_string(conn.host, keys["keyName"], key)}, output, ["connectionString"])
