"""``opendps bootstrap``: the seed's ``setup-x509-attestation`` script (steps 1-8) as one command.

It makes the seed's onboarding PKI with ``cryptography`` instead of openssl (same profiles, same file
layout), uploads the root and intermediate CA to the DPS the CLI is connected to, proves possession of
both keys with verification certificates, ensures the ADR namespace and credential policy exist and
creates the X.509 enrollment group that references the intermediate. Existing files are reused (the
root is the trust anchor devices were shipped with: regenerating it silently would strand them) unless
``--force``. Server-side steps are idempotent, so a re-run after a failure simply continues.

Profiles (what the seed's openssl 3 commands produce; ``keyid:always,issuer`` yields a key id only,
because openssl adds issuer and serial only when no key id is available):

* root CA: RSA-4096, SHA-256, 3650 days, CN ``<rid>-root``, basicConstraints critical CA:true pathlen:1,
  keyUsage critical keyCertSign+cRLSign, SKI (hash), AKI keyid.
* intermediate CA: RSA-4096, 1825 days, CN ``<rid>-intermediate``, pathlen 0, same key usage, SKI, AKI keyid.
* device bootstrap: RSA-2048, 365 days, CN ``<rid>``, basicConstraints CA:FALSE, keyUsage critical
  digitalSignature+keyEncipherment, EKU clientAuth, SAN DNS:<rid>, AKI keyid, SKI (openssl 3 adds it).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from opendps.cli import CliError, output_option
from opendps.cli._client import Client, api_path
from opendps.cli.management import (
    DEFAULT_VALIDITY_DAYS,
    _exists,
    _ns_path,
    _policy_body,
    _policy_path,
    lazy_api_command,
)
from opendps.cli.output import emit
from opendps.files import write_atomic

ROOT_DAYS, INTERMEDIATE_DAYS, DEVICE_DAYS, VERIFICATION_DAYS = 3650, 1825, 365, 1
CA_KEY_BITS, DEVICE_KEY_BITS, VERIFICATION_KEY_BITS = 4096, 2048, 2048
PUBLIC_MODE, KEY_MODE = 0o644, 0o600
MAX_CN = 64  # RFC 5280 ub-common-name

# role -> path relative to --cert-dir (the seed's layout, step 1)
LAYOUT = {
    "rootCertificate": "root/root-ca.pem",
    "rootKey": "root/root-ca.key",
    "intermediateCertificate": "ca/intermediate-ca.pem",
    "intermediateKey": "ca/intermediate-ca.key",
    "deviceCertificate": "device/device.pem",
    "deviceKey": "device/device.key",
    "chain": "device/chain.pem",
    "fullChain": "device/device-full-chain.pem",
}

# ---------------------------------------------------------------- files


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    """Unencrypted PKCS#8, as ``openssl req -nodes`` / ``genrsa`` write it (protected by the 0600 mode)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cn(cert: x509.Certificate) -> str:
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def new_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


# ---------------------------------------------------------------- profiles (seed steps 2 and 6)

CA_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)
DEVICE_USAGE = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                             data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                             encipher_only=False, decipher_only=False)


def _builder(subject: str, issuer: x509.Name, public_key: rsa.RSAPublicKey, days: int,
             now: datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + timedelta(days=days)))


def _aki(issuer_key: rsa.RSAPrivateKey) -> x509.AuthorityKeyIdentifier:
    """``authorityKeyIdentifier=keyid:always[,issuer]``: the issuer's SKI (hash of its public key), nothing else."""
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        x509.SubjectKeyIdentifier.from_public_key(issuer_key.public_key()))


def make_root(registration_id: str, key: rsa.RSAPrivateKey, now: datetime | None = None) -> x509.Certificate:
    """Seed step 2, ``openssl req -x509 ... -addext``: the self-signed root (pathlen 1: one intermediate below)."""
    now = now or datetime.now(UTC)
    name = _name(f"{registration_id}-root")
    return (_builder(f"{registration_id}-root", name, key.public_key(), ROOT_DAYS, now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_aki(key), critical=False)
            .sign(key, hashes.SHA256()))


def make_intermediate(registration_id: str, key: rsa.RSAPrivateKey, root: x509.Certificate,
                      root_key: rsa.RSAPrivateKey, now: datetime | None = None) -> x509.Certificate:
    """Seed step 2, ``-extfile intermediate-ext.cnf -extensions v3_intermediate`` (the intended v3 certificate)."""
    now = now or datetime.now(UTC)
    return (_builder(f"{registration_id}-intermediate", root.subject, key.public_key(), INTERMEDIATE_DAYS, now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(_aki(root_key), critical=False)
            .sign(root_key, hashes.SHA256()))


def make_device(registration_id: str, key: rsa.RSAPrivateKey, intermediate: x509.Certificate,
                intermediate_key: rsa.RSAPrivateKey, now: datetime | None = None) -> x509.Certificate:
    """Seed step 6, ``-extfile device-ext.cnf -extensions v3_req``: the bootstrap (onboarding) certificate."""
    now = now or datetime.now(UTC)
    return (_builder(registration_id, intermediate.subject, key.public_key(), DEVICE_DAYS, now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
            .add_extension(DEVICE_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(registration_id)]), critical=False)
            .add_extension(_aki(intermediate_key), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(intermediate_key, hashes.SHA256()))


def make_verification(code: str, ca: x509.Certificate, ca_key: rsa.RSAPrivateKey) -> str:
    """Seed steps 4/5: a certificate with CN = verification code signed by the CA key (proof of possession), PEM.

    Backdated a few minutes so a server whose clock is slightly behind still finds it valid.
    """
    now = datetime.now(UTC)
    key = new_rsa_key(VERIFICATION_KEY_BITS)
    cert = (x509.CertificateBuilder().subject_name(_name(code)).issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=VERIFICATION_DAYS)).sign(ca_key, hashes.SHA256()))
    return _pem(cert).decode("ascii")


# ---------------------------------------------------------------- the local PKI


@dataclass
class Pki:
    """The seed's three certificates and keys, and which of them this run made."""

    root: x509.Certificate
    root_key: rsa.RSAPrivateKey
    intermediate: x509.Certificate
    intermediate_key: rsa.RSAPrivateKey
    device: x509.Certificate
    device_key: rsa.RSAPrivateKey
    created: list[str] = field(default_factory=list)

    def certificate(self, which: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        return {"root": (self.root, self.root_key), "intermediate": (self.intermediate, self.intermediate_key)}[which]


def _load_pair(cert_dir: Path, cert_role: str, key_role: str, expected_cn: str, fix_mode: Callable[[Path], None]
               ) -> tuple[x509.Certificate, rsa.RSAPrivateKey] | None:
    """An existing certificate + key (None if neither file exists); refuses half a pair or a foreign one."""
    cert_path, key_path = cert_dir / LAYOUT[cert_role], cert_dir / LAYOUT[key_role]
    have = cert_path.exists(), key_path.exists()
    if not any(have):
        return None
    if not all(have):
        present, missing = (cert_path, key_path) if have[0] else (key_path, cert_path)
        raise CliError(f"{present} exists without {missing}; restore it or re-run with --force to regenerate")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CliError(f"cannot load {cert_path} / {key_path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CliError(f"{key_path} is not an RSA private key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != cert.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise CliError(f"{key_path} does not match {cert_path}; re-run with --force to regenerate")
    if _cn(cert) != expected_cn:
        raise CliError(f"{cert_path} is for CN={_cn(cert)!r}, not {expected_cn!r}: use another --cert-dir or --force")
    fix_mode(key_path)
    return cert, key


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def build_pki(registration_id: str, cert_dir: Path, *, force: bool, progress: Callable[[str], None] = lambda _: None,
              working: Callable[[str], None] = lambda _: None,
              generate: Callable[[int], rsa.RSAPrivateKey] = new_rsa_key) -> Pki:
    """Load the seed's files from ``cert_dir`` or make what is missing, then (re)write the chain files.

    A stage is reused only if its issuer is reused too (a new root invalidates everything below it).
    ``progress`` hears of finished steps, ``working`` of slow ones starting.
    The two RSA-4096 CA keys are generated concurrently (the slow part; the library releases the GIL).
    """

    def tighten(path: Path) -> None:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, KEY_MODE)
            progress(f"{path}: mode {mode:o} was too open, set to 600")

    def load(cert_role: str, key_role: str, cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey] | None:
        return None if force else _load_pair(cert_dir, cert_role, key_role, cn, tighten)

    rid = registration_id
    root = load("rootCertificate", "rootKey", f"{rid}-root")
    intermediate = load("intermediateCertificate", "intermediateKey", f"{rid}-intermediate")
    device = load("deviceCertificate", "deviceKey", rid)
    if root is None or (intermediate is not None and not _issued_by(intermediate[0], root[0])):
        intermediate = None
    if intermediate is None or (device is not None and not _issued_by(device[0], intermediate[0])):
        device = None
    created: list[str] = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="rsa-keygen") as pool:
        root_key_job = pool.submit(generate, CA_KEY_BITS) if root is None else None
        intermediate_key_job = pool.submit(generate, CA_KEY_BITS) if intermediate is None else None
        if root_key_job is not None or intermediate_key_job is not None:
            working("generating RSA-4096 CA keys (in parallel)")
        if root_key_job is not None:
            key = root_key_job.result()
            root = make_root(rid, key), key
            write_atomic(cert_dir / LAYOUT["rootKey"], _key_pem(key), KEY_MODE)
            write_atomic(cert_dir / LAYOUT["rootCertificate"], _pem(root[0]), PUBLIC_MODE)
            created.append("root")
            progress(f"root CA created: CN={rid}-root")
        assert root is not None
        if intermediate_key_job is not None:
            key = intermediate_key_job.result()
            intermediate = make_intermediate(rid, key, root[0], root[1]), key
            write_atomic(cert_dir / LAYOUT["intermediateKey"], _key_pem(key), KEY_MODE)
            write_atomic(cert_dir / LAYOUT["intermediateCertificate"], _pem(intermediate[0]), PUBLIC_MODE)
            created.append("intermediate")
            progress(f"intermediate CA created: CN={rid}-intermediate")
    assert intermediate is not None
    if device is None:
        key = generate(DEVICE_KEY_BITS)
        device = make_device(rid, key, intermediate[0], intermediate[1]), key
        write_atomic(cert_dir / LAYOUT["deviceKey"], _key_pem(key), KEY_MODE)
        write_atomic(cert_dir / LAYOUT["deviceCertificate"], _pem(device[0]), PUBLIC_MODE)
        created.append("device")
        progress(f"device bootstrap certificate created: CN={rid}")
    # seed step 6 "Create certificate chain files": always consistent with the three certificates above
    write_atomic(cert_dir / LAYOUT["chain"], _pem(intermediate[0], root[0]), PUBLIC_MODE)
    write_atomic(cert_dir / LAYOUT["fullChain"], _pem(device[0], intermediate[0], root[0]), PUBLIC_MODE)
    return Pki(root[0], root[1], intermediate[0], intermediate[1], device[0], device[1], created)


# ---------------------------------------------------------------- the server side (seed steps 4, 5, 7)


def upload_and_verify(client: Client, name: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """Upload a CA certificate (replacing a different one of that name) and prove possession of its key.

    Idempotent: an identical, verified certificate is left alone.
    """
    from opendps.pki.certificates import thumbprint  # here: the pki package loads the store (SQLAlchemy) for a CLI call

    path = api_path("certificates", name)
    current = _exists(client, path)
    pem = _pem(cert).decode("ascii")
    action = "unchanged"
    if current is None:
        current = client.request("PUT", path, json={"properties": {"certificate": pem}})
        action = "uploaded"
    elif (current.get("properties") or {}).get("sha256Thumbprint", "").upper() != thumbprint(cert):
        current = client.request("PUT", path, json={"properties": {"certificate": pem}}, if_match=current.get("etag"))
        action = "replaced"
    if not (current.get("properties") or {}).get("isVerified"):
        coded = client.request("POST", api_path("certificates", name, "generateVerificationCode"),
                               if_match=current.get("etag"))
        code = str((coded.get("properties") or {}).get("verificationCode") or "")
        if not code:
            raise CliError(f"the server returned no verification code for certificate {name!r}")
        current = client.request("POST", api_path("certificates", name, "verify"),
                                 json={"certificate": make_verification(code, cert, key)}, if_match=coded.get("etag"))
        action = f"{action}, verified" if action != "unchanged" else "verified"
    props = current.get("properties") or {}
    if props.get("isVerified") is not True:
        raise CliError(f"certificate {name!r} is still not verified after proof of possession")
    return {"name": name, "subject": props.get("subject"), "sha256Thumbprint": props.get("sha256Thumbprint"),
            "isVerified": True, "action": action}


def ensure_policy(client: Client, namespace: str, policy: str) -> dict[str, Any]:
    """Like ``opendps adr ns create --policy-name``: a missing namespace is created with the policy, a missing policy added."""
    if _exists(client, _ns_path(namespace)) is None:
        client.request("PUT", _ns_path(namespace), json={"properties": {"policyName": policy}})
        return {"namespace": namespace, "policy": policy, "action": "created namespace and policy"}
    if _exists(client, _policy_path(namespace, policy)) is None:
        client.request("PUT", _policy_path(namespace, policy), json=_policy_body(DEFAULT_VALIDITY_DAYS, False))
        return {"namespace": namespace, "policy": policy, "action": "created policy"}
    return {"namespace": namespace, "policy": policy, "action": "unchanged"}


def ensure_group(client: Client, group_id: str, ca_name: str, policy: str, namespace: str) -> dict[str, Any]:
    """Seed step 7: an enabled X.509 group on the intermediate CA with the credential policy; an existing one is aligned."""
    path = api_path("enrollmentGroups", group_id)
    attestation = {"type": "x509", "x509": {"caReferences": {"primary": ca_name}}}
    wanted = {"attestation": attestation, "credentialPolicyName": policy, "namespaceName": namespace,
              "provisioningStatus": "enabled"}
    current = _exists(client, path)
    if current is None:
        doc = client.request("PUT", path, json={"enrollmentGroupId": group_id, **wanted})
        action = "created"
    else:
        refs = ((current.get("attestation") or {}).get("x509") or {}).get("caReferences") or {}
        same = (current.get("attestation", {}).get("type") == "x509" and refs.get("primary") == ca_name
                and not refs.get("secondary") and current.get("credentialPolicyName") == policy
                and current.get("namespaceName") == namespace and current.get("provisioningStatus") == "enabled")
        if same:
            doc, action = current, "unchanged"
        else:
            body = {k: v for k, v in current.items()
                    if k not in ("etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc")} | wanted
            doc = client.request("PUT", path, json=body, if_match=current.get("etag"))
            action = "updated"
    refs = ((doc.get("attestation") or {}).get("x509") or {}).get("caReferences") or {}
    return {"enrollmentGroupId": doc.get("enrollmentGroupId", group_id), "caReference": refs.get("primary"),
            "credentialPolicyName": doc.get("credentialPolicyName"), "namespaceName": doc.get("namespaceName"),
            "provisioningStatus": doc.get("provisioningStatus"), "action": action}


# ---------------------------------------------------------------- output


def _file_rows(cert_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for role, relative in LAYOUT.items():
        path = cert_dir / relative
        rows.append({"role": role, "path": str(path), "mode": f"{stat.S_IMODE(path.stat().st_mode):o}"})
    return rows


def _print_summary(summary: dict[str, Any]) -> None:
    console = Console(width=200)

    def table(title: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        t = Table(title=title, show_header=True, header_style="bold", title_justify="left")
        for column in rows[0]:
            t.add_column(column, overflow="fold")
        for row in rows:
            t.add_row(*["" if v is None else str(v) for v in row.values()])
        console.print(t)

    table("Files", summary["files"])
    table("CA certificates", summary["certificates"])
    table("Credential policy", [summary["credentialPolicy"]] if summary["credentialPolicy"] else [])
    table("Enrollment group", [summary["enrollmentGroup"]] if summary["enrollmentGroup"] else [])
    created = ", ".join(summary["created"]) or "none (existing files reused)"
    console.print(f"created: {created}")


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[tuple[Callable[[str], None], Callable[[str], None]]]:
    """(done, working): a spinner naming the running step on stderr, finished steps logged above it.

    Only on a terminal, on stderr: stdout stays clean for ``-o json`` (where nothing is shown at all).
    """
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:  # piped: the summary says it all, and an error stays one line
        yield (lambda _message: None), (lambda _message: None)
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("preparing certificates", total=None)

        def done(message: str) -> None:
            bar.console.print(f"[green]✓[/green] {message}", highlight=False)
            bar.update(task, description="working")

        def working(message: str) -> None:
            bar.update(task, description=message)

        yield done, working


_OUTPUT = output_option(default="table")


@click.command("bootstrap")
@click.option("--registration-id", "--rid", "registration_id", required=True,
              help="Device registration id: CN of the device certificate, prefix of the CA names.")
@click.option("--enrollment-group-name", "--enrollment-group", "group_name", default=None,
              help="Enrollment group to create (default '<registration-id>-group').")
@click.option("--cert-dir", type=click.Path(path_type=Path, file_okay=False), default=Path("certs"),
              show_default=True, help="Where the seed's root/, ca/ and device/ folders go.")
@click.option("--credential-policy", "credential_policy", default="default", show_default=True,
              help="ADR credential policy issuing the operational certificates (created if missing).")
@click.option("--namespace", "namespace", default="default", show_default=True,
              help="ADR namespace of the policy (created with the policy if missing).")
@click.option("--skip-upload", is_flag=True, default=False, help="Only write the files; no server needed.")
@click.option("--force", is_flag=True, default=False,
              help="Regenerate every key and certificate even if files exist (devices holding the old ones stop working).")
@lazy_api_command(output=_OUTPUT)  # a person's setup step: a table by default
def bootstrap(connect: Callable[[], Client], registration_id: str, group_name: str | None, cert_dir: Path,
              credential_policy: str, namespace: str, skip_upload: bool, force: bool, output: str) -> None:
    """Set up X.509 onboarding like the seed's script: CA chain, device certificate, verified CAs, enrollment group."""
    from opendps.errors import InvalidInput
    from opendps.provisioning.enrollments import check_registration_id

    rid = registration_id.strip()
    try:  # the certificate's CN and DNS name: what DPS will accept as this device's registration id
        check_registration_id(rid, "--registration-id")
    except InvalidInput as exc:
        raise CliError(exc.message) from exc
    longest = f"{rid}-intermediate"  # the CA names are CNs too, which RFC 5280 limits to 64 characters
    if len(longest) > MAX_CN:  # why: a longer id was a ValueError traceback from cryptography
        raise CliError(f"--registration-id is {len(rid)} characters: the intermediate CA's CN {longest[:20]!r}... "
                       f"would be {len(longest)}, and a CN holds at most {MAX_CN} (RFC 5280); use at most "
                       f"{MAX_CN - len('-intermediate')}")
    group_name = group_name or f"{rid}-group"
    summary: dict[str, Any] = {"registrationId": rid, "certDir": str(cert_dir), "created": [], "files": [],
                               "certificates": [], "credentialPolicy": None, "enrollmentGroup": None}
    client = None if skip_upload else connect()  # a missing connection fails before any file is written
    try:
        with _progress(output == "table") as (step, working):
            pki = build_pki(rid, cert_dir, force=force, progress=step, working=working)
            summary["created"] = pki.created
            if not pki.created:
                step(f"reusing the certificates in {cert_dir}")
            if client is not None:
                working(f"uploading and verifying the CA certificates at {client.connection.base_url}")
                for which in ("root", "intermediate"):
                    cert, key = pki.certificate(which)
                    result = upload_and_verify(client, f"{rid}-{which}", cert, key)
                    summary["certificates"].append(result)
                    step(f"{which} CA {result['name']} in DPS: {result['action']}")
                summary["credentialPolicy"] = ensure_policy(client, namespace, credential_policy)
                step(f"credential policy {namespace}/{credential_policy}: {summary['credentialPolicy']['action']}")
                summary["enrollmentGroup"] = ensure_group(client, group_name, f"{rid}-intermediate", credential_policy,
                                                          namespace)
                step(f"enrollment group {group_name}: {summary['enrollmentGroup']['action']}")
    except OSError as exc:
        raise CliError(f"cannot write certificates: {exc.strerror or exc}"
                       + (f" ({exc.filename})" if exc.filename else "")) from exc
    summary["files"] = _file_rows(cert_dir)
    if output != "table":
        emit(summary, output)
    else:
        _print_summary(summary)


def register(main: click.Group) -> None:
    """Attach ``opendps bootstrap``."""
    main.add_command(bootstrap)
