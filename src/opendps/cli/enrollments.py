"""az-style provisioning verbs: ``opendps dps enrollment``, ``enrollment-group``, ``registration``, ``linked-hub``.

Flags and their mapping onto Azure's enrollment document follow ``az iot dps`` so scripts port over;
the server validates (docs/api.md), the CLI only builds requests and prints answers. Attached to the
``dps`` group by :func:`opendps.cli.management.register`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from opendps.cli import CliError
from opendps.cli._client import Client, api_path, loads_json, read_certificate_file
from opendps.cli.management import _exists, _list, api_command, lazy_api_command
from opendps.cli.output import emit

MAX_PAGE = 1000  # the server's (and Azure's) largest x-ms-max-item-count
SETTING_COLUMNS = ["attestation.type", "provisioningStatus", "credentialPolicyName", "allocationPolicy", "etag"]
REGISTRATION_COLUMNS = ["registrationId", "status", "assignedHub", "deviceId", "etag"]
HUB_COLUMNS = ["name", "properties.hostName", "properties.allocationWeight", "properties.applyAllocationPolicy", "etag"]
HUB_DEVICE_COLUMNS = ["deviceId", "status", "authenticationType", "etag"]
HUB_CA_COLUMNS = ["name", "properties.subject", "properties.status", "properties.expiry", "properties.enrollments"]
# (updateHubAssignment, migrateDeviceData), exactly as az iot dps maps --reprovision-policy
REPROVISION_POLICIES = {"reprovisionandmigratedata": (True, True), "reprovisionandresetdata": (True, False),
                        "never": (False, False)}
READ_ONLY_FIELDS = ("etag", "createdDateTimeUtc", "lastUpdatedDateTimeUtc")

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Kind:
    """What differs between individual enrollments and enrollment groups on the wire and in messages."""

    collection: str
    id_field: str
    noun: str
    command: str

    @property
    def columns(self) -> list[str]:
        return [self.id_field, *SETTING_COLUMNS]

    def path(self, enrollment_id: str, *rest: str) -> str:
        return api_path(self.collection, enrollment_id, *rest)


INDIVIDUAL = Kind("enrollments", "registrationId", "enrollment", "enrollment")
GROUP = Kind("enrollmentGroups", "enrollmentGroupId", "enrollment group", "enrollment-group")


def register(dps: click.Group) -> None:
    """Attach the provisioning verb groups to ``opendps dps``."""
    for group in (enrollment, enrollment_group, registration, linked_hub):
        dps.add_command(group)


def _options(*options: Decorator) -> Decorator:
    """Apply click options so that help lists them in the given order."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


# ---------------------------------------------------------------- flags → document


def parse_json_object(value: str, flag: str) -> dict[str, Any]:
    """``--initial-twin-*``: inline JSON or, as az accepts, the path of a JSON file; must be an object."""
    text, source = value, ""
    try:
        data = loads_json(text)
    except ValueError as exc:
        try:
            is_file = not value.lstrip().startswith(("{", "[")) and Path(value).is_file()
        except OSError:
            is_file = False
        if not is_file:
            raise CliError(f"{flag} is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from exc
        source = f" (file {value})"
        try:
            data = loads_json(Path(value).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as file_exc:
            raise CliError(f"{flag}{source} is not a readable JSON file: {file_exc}") from file_exc
    if not isinstance(data, dict):
        raise CliError(f"{flag}{source} must be a JSON object, not {type(data).__name__}")
    return data


def split_hubs(values: tuple[str, ...]) -> list[str]:
    """``--iot-hubs``: az passes space-separated names in one argument; commas and repeats work too."""
    return [h for h in re.split(r"[\s,]+", " ".join(values)) if h]


def apply_settings(doc: dict[str, Any], flags: dict[str, Any]) -> None:
    """Fold the non-attestation flags into ``doc`` (new, or the current document on update): only given ones change."""
    if flags.get("device_id") is not None:
        doc["deviceId"] = flags["device_id"]
    if flags["provisioning_status"] is not None:
        doc["provisioningStatus"] = flags["provisioning_status"]
    if flags["allocation_policy"] is not None:
        doc["allocationPolicy"] = flags["allocation_policy"]
    if flags["iot_hubs"]:  # an explicit empty value clears the list (every hub that applies allocation policy)
        doc["iotHubs"] = split_hubs(flags["iot_hubs"])
        doc.pop("iotHubHostName", None)
    _apply_custom_allocation(doc, flags["webhook_url"], flags["api_version"])
    _apply_initial_twin(doc, flags["initial_twin_properties"], flags["initial_twin_tags"])
    if flags["reprovision_policy"] is not None:
        update, migrate = REPROVISION_POLICIES[flags["reprovision_policy"]]
        doc["reprovisionPolicy"] = {"updateHubAssignment": update, "migrateDeviceData": migrate}
    if flags["edge_enabled"] is not None:
        doc["capabilities"] = {"iotEdge": flags["edge_enabled"]}
    policy = flags["credential_policy"]
    if policy is not None:
        doc.pop("namespaceName", None)  # re-resolved by the server unless --namespace is given
        if policy:
            doc["credentialPolicyName"] = policy
        else:  # --credential-policy "": no operational certificates any more
            doc.pop("credentialPolicyName", None)
    if flags["namespace"] is not None:
        if not doc.get("credentialPolicyName"):
            raise CliError("--namespace only disambiguates --credential-policy; give the policy too")
        doc["namespaceName"] = flags["namespace"]


def _apply_custom_allocation(doc: dict[str, Any], webhook: str | None, api_version: str | None) -> None:
    """``--webhook-url``/``--api-version`` into ``customAllocationDefinition``; a custom policy needs a webhook."""
    if webhook is not None or api_version is not None:
        if doc.get("allocationPolicy") != "custom":
            raise CliError("--webhook-url/--api-version apply only with --allocation-policy custom")
        cad = dict(doc.get("customAllocationDefinition") or {})
        if webhook is not None:
            cad["webhookUrl"] = webhook
        if api_version is not None:
            cad["apiVersion"] = api_version
        doc["customAllocationDefinition"] = cad
    if doc.get("allocationPolicy") == "custom" and not (doc.get("customAllocationDefinition") or {}).get("webhookUrl"):
        raise CliError("--allocation-policy custom needs --webhook-url")


def _apply_initial_twin(doc: dict[str, Any], props: str | None, tags: str | None) -> None:
    """``--initial-twin-properties``/``--initial-twin-tags``: each given one replaces its part of ``initialTwin``."""
    if props is not None or tags is not None:
        twin = doc.get("initialTwin") or {}
        new_tags = twin.get("tags") or {}
        desired = (twin.get("properties") or {}).get("desired") or {}
        if tags is not None:
            new_tags = parse_json_object(tags, "--initial-twin-tags")
        if props is not None:
            desired = parse_json_object(props, "--initial-twin-properties")
        doc["initialTwin"] = {"tags": new_tags, "properties": {"desired": desired}}


def _keys_given(flags: dict[str, Any]) -> bool:
    return flags["primary_key"] is not None or flags["secondary_key"] is not None


def _symmetric(flags: dict[str, Any]) -> dict[str, Any]:
    """Given keys only: the server generates any missing one (or keeps both on update when none is given)."""
    keys = {name: flags[flag] for name, flag in (("primaryKey", "primary_key"), ("secondaryKey", "secondary_key"))
            if flags[flag] is not None}
    return {"type": "symmetricKey", "symmetricKey": keys}


def _tpm(current: dict[str, Any] | None, flags: dict[str, Any]) -> dict[str, Any] | None:
    """``--endorsement-key``: the TPM's EK, base64 TPM2B_PUBLIC (what ``opendps device tpm-info`` prints); the server
    checks it. On update without it the enrolled EK stays."""
    ek = flags["endorsement_key"]
    current_type = (current or {}).get("type")
    if ek is None:
        if current_type == "tpm":
            return None
        raise CliError("--attestation-type tpm needs --endorsement-key (the TPM's EK, base64; see 'opendps device "
                       "tpm-info')")
    ek = "".join(ek.split())
    try:
        if not base64.b64decode(ek, validate=True):
            raise ValueError("empty")
    except (binascii.Error, ValueError) as exc:
        raise CliError("--endorsement-key is not valid base64 (the TPM's EK as a base64 TPM2B_PUBLIC)") from exc
    return {"type": "tpm", "tpm": {"endorsementKey": ek}}


def individual_attestation(current: dict[str, Any] | None, flags: dict[str, Any]) -> dict[str, Any] | None:
    """The attestation to send, or None to keep ``current`` (update without attestation flags)."""
    current_type = (current or {}).get("type")
    target = flags["attestation_type"] or current_type
    certs_given = bool(flags["certificate_path"] or flags["secondary_certificate_path"])
    if target == "tpm":
        if _keys_given(flags) or certs_given:
            raise CliError("--primary-key/--secondary-key and --certificate-path/--secondary-certificate-path do not "
                           "apply to --attestation-type tpm (it takes --endorsement-key)")
        return _tpm(current, flags)
    if flags["endorsement_key"] is not None:
        raise CliError("--endorsement-key applies only to --attestation-type tpm")
    if target == "x509" and _keys_given(flags):
        raise CliError("--primary-key/--secondary-key apply only to --attestation-type symmetricKey")
    if target == "symmetricKey" and certs_given:
        raise CliError("--certificate-path/--secondary-certificate-path apply only to --attestation-type x509")
    if target == "symmetricKey":
        return _symmetric(flags) if _keys_given(flags) or current_type != "symmetricKey" else None
    if not certs_given and current_type == "x509":
        return None
    certs: dict[str, Any] = {}
    if current_type == "x509":
        for slot, entry in (((current or {}).get("x509") or {}).get("clientCertificates") or {}).items():
            if entry and entry.get("certificate"):
                certs[slot] = {"certificate": entry["certificate"]}
    for slot, flag in (("primary", "certificate_path"), ("secondary", "secondary_certificate_path")):
        if flags[flag]:
            certs[slot] = {"certificate": read_certificate_file(flags[flag])}
    if "primary" not in certs:
        raise CliError("--attestation-type x509 needs --certificate-path (the device certificate, PEM or DER)")
    return {"type": "x509", "x509": {"clientCertificates": certs}}


def group_attestation(current: dict[str, Any] | None, flags: dict[str, Any]) -> dict[str, Any] | None:
    """X.509 when a CA name or signing certificate is given, else symmetric key (as az decides); None keeps it."""
    slots = (("primary", "ca_name", "certificate_path"), ("secondary", "secondary_ca_name", "secondary_certificate_path"))
    x509_given = any(flags[name] or flags[path] for _, name, path in slots)
    if x509_given and _keys_given(flags):
        raise CliError("give either CA flags (--ca-name/--certificate-path) or symmetric key flags "
                       "(--primary-key/--secondary-key), not both")
    current_type = (current or {}).get("type")
    if _keys_given(flags) or (current is None and not x509_given):
        return _symmetric(flags)
    if not x509_given:
        return None
    refs: dict[str, str] = {}
    if current_type == "x509":
        refs = {k: v for k, v in (((current or {}).get("x509") or {}).get("caReferences") or {}).items() if v}
    signing: dict[str, Any] = {}
    for slot, name_flag, path_flag in slots:
        name, path = flags[name_flag], flags[path_flag]
        if name and path:
            raise CliError(f"give --{name_flag.replace('_', '-')} or --{path_flag.replace('_', '-')} for the "
                           f"{slot} CA, not both")
        if name:
            refs[slot] = name
        elif path:  # the server resolves an uploaded, verified DPS certificate to its name
            refs.pop(slot, None)
            signing[slot] = {"certificate": read_certificate_file(path)}
    x509: dict[str, Any] = {"caReferences": refs}
    if signing:
        x509["signingCertificates"] = signing
    return {"type": "x509", "x509": x509}


def _writable(doc: dict[str, Any]) -> dict[str, Any]:
    """A GET answer as a PUT body: without the server-maintained fields."""
    return {k: v for k, v in doc.items() if k not in READ_ONLY_FIELDS}


# ---------------------------------------------------------------- shared verbs


def query_all(client: Client, path: str, top: int | None, body: Any = None, *, page_size: int = MAX_PAGE,
              params: Mapping[str, str] | None = None, method: str = "POST", size_param: str | None = None) -> list[Any]:
    """Every item of an Azure query, following ``x-ms-continuation`` until exhausted (or ``top`` items);
    ``params``: query parameters sent with each page (the hub verbs' ``?hub=``); ``size_param``: a query parameter
    that carries the page size too (``GET /devices?top=``)."""
    items: list[Any] = []
    token: str | None = None
    seen: set[str] = set()
    while top is None or len(items) < top:
        size = page_size if top is None else min(top - len(items), page_size)
        headers = {"x-ms-max-item-count": str(size)}
        if token is not None:
            headers["x-ms-continuation"] = token
        query = {**(params or {}), **({size_param: str(size)} if size_param else {})}
        page, answer = client.exchange(method, path, json=body, headers=headers, params=query or None)
        if not isinstance(page, list):
            raise CliError(f"{method} {path} did not answer with a list")
        items.extend(page)
        token = answer.get("x-ms-continuation")
        if not token:
            break
        if token in seen:
            raise CliError(f"{method} {path} repeated continuation token {token!r}")
        seen.add(token)
    return items if top is None else items[:top]


def _top(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is None or value == -1:
        return None
    if value < 1:
        raise click.BadParameter("must be a positive number, or -1 for all", ctx, param)
    return value


def _create(client: Client, kind: Kind, enrollment_id: str, doc: dict[str, Any], output: str) -> None:
    path = kind.path(enrollment_id)
    if _exists(client, path) is not None:  # PUT without If-Match would silently replace it
        raise CliError(f"{kind.noun} {enrollment_id!r} already exists (use '{kind.command} update')")
    emit(client.request("PUT", path, json=doc), output, kind.columns)


def _show(client: Client, kind: Kind, enrollment_id: str, show_keys: bool, output: str) -> None:
    doc = client.request("GET", kind.path(enrollment_id))
    if show_keys:  # keys are only ever sent by the attestation mechanism call, as in Azure
        doc["attestation"] = client.request("POST", kind.path(enrollment_id, "attestationmechanism"))
    emit(doc, output, kind.columns)


def _update(client: Client, kind: Kind, enrollment_id: str, flags: dict[str, Any], etag: str | None, output: str,
            attestation: Callable[[dict[str, Any] | None, dict[str, Any]], dict[str, Any] | None]) -> None:
    if all(v is None or v == () for v in flags.values()):
        raise CliError("nothing to update: pass at least one setting to change")
    path = kind.path(enrollment_id)
    current = client.request("GET", path)
    doc = _writable(current)
    old = current.get("attestation") or {}
    one_key = (flags["primary_key"] is None) != (flags["secondary_key"] is None)
    if one_key and old.get("type") == "symmetricKey" and flags.get("attestation_type") in (None, "symmetricKey"):
        # a PUT with one key makes the server generate the other: keep the current one instead
        keys = (client.request("POST", kind.path(enrollment_id, "attestationmechanism")) or {}).get("symmetricKey") or {}
        flags = {**flags, "primary_key": flags["primary_key"] or keys.get("primaryKey"),
                 "secondary_key": flags["secondary_key"] or keys.get("secondaryKey")}
    new = attestation(old, flags)
    if new is not None:
        doc["attestation"] = new
    apply_settings(doc, flags)
    emit(client.request("PUT", path, json=doc, if_match=etag or current.get("etag")), output, kind.columns)


ENROLLMENT_ID = click.option("--enrollment-id", "-e", "--eid", "enrollment_id", required=True, metavar="ID",
                             help="Enrollment id (for an individual enrollment: the device's registration id).")
ETAG = click.option("--etag", "etag", default=None, help="Only act if the resource still has this ETag.")
SHOW_KEYS = click.option("--show-keys", "--keys", "show_keys", is_flag=True, default=False,
                         help="Include the symmetric keys (fetched with the attestation mechanism).")
TOP = click.option("--top", type=int, default=None, callback=_top,
                   help="Maximum number of items to return (-1: all, the default).")
PRIMARY_KEY = click.option("--primary-key", "--pk", "primary_key", default=None,
                           help="Primary symmetric key, base64 (generated by the server when omitted).")
SECONDARY_KEY = click.option("--secondary-key", "--sk", "secondary_key", default=None,
                             help="Secondary symmetric key, base64 (generated by the server when omitted).")
COMMON_SETTINGS = _options(
    click.option("--credential-policy", "credential_policy", default=None, metavar="POLICY",
                 help="ADR credential policy issuing operational certificates (--credential-policy '' removes it)."),
    click.option("--namespace", "namespace", default=None,
                 help="Namespace of --credential-policy, when several namespaces have a policy of that name."),
    click.option("--provisioning-status", "--ps", "provisioning_status", default=None,
                 type=click.Choice(["enabled", "disabled"], case_sensitive=False), help="Enable or disable provisioning."),
    click.option("--allocation-policy", "--ap", "allocation_policy", default=None,
                 type=click.Choice(["hashed", "geoLatency", "static", "custom"], case_sensitive=False),
                 help="How a device is assigned to one of --iot-hubs (default hashed)."),
    click.option("--iot-hubs", "--ih", "iot_hubs", multiple=True,
                 help="Linked hub host names or names, space- or comma-separated ('' clears: all hubs)."),
    click.option("--webhook-url", "--wh", "webhook_url", default=None,
                 help="Custom allocation webhook URL (--allocation-policy custom)."),
    click.option("--api-version", "--av", "api_version", default=None,
                 help="API version of the custom allocation webhook (default 2019-03-31)."),
    click.option("--initial-twin-properties", "--props", "initial_twin_properties", default=None, metavar="JSON",
                 help="Initial desired properties: a JSON object, inline or a file path."),
    click.option("--initial-twin-tags", "--tags", "initial_twin_tags", default=None, metavar="JSON",
                 help="Initial twin tags: a JSON object, inline or a file path."),
    click.option("--reprovision-policy", "--rp", "reprovision_policy", default=None,
                 type=click.Choice(list(REPROVISION_POLICIES), case_sensitive=False),
                 help="What re-provisioning does: move hub and keep data, move and reset data, or never move."),
    click.option("--edge-enabled", "--ee", "edge_enabled", type=click.BOOL, is_flag=False, flag_value=True,
                 default=None, metavar="[true|false]", help="IoT Edge device(s); alone means true, or give true/false."),
)


def _individual_flags(create: bool) -> Decorator:
    return _options(
        click.option("--attestation-type", "--at", "attestation_type", required=create, default=None,
                     type=click.Choice(["x509", "symmetricKey", "tpm"], case_sensitive=False),
                     help="Attestation mechanism."),
        click.option("--endorsement-key", "--ek", "endorsement_key", default=None,
                     help="The TPM's endorsement key, base64 TPM2B_PUBLIC (tpm; 'opendps device tpm-info' prints it)."),
        click.option("--certificate-path", "--cp", "certificate_path", default=None,
                     help="Primary device certificate file, PEM or DER (x509); its CN is the registration id."),
        click.option("--secondary-certificate-path", "--scp", "secondary_certificate_path", default=None,
                     help="Secondary device certificate file, PEM or DER (x509)."),
        PRIMARY_KEY, SECONDARY_KEY,
        click.option("--device-id", "device_id", default=None, help="Device id in the hub (default: the registration id)."),
        COMMON_SETTINGS,
    )


def _group_flags() -> Decorator:
    return _options(
        click.option("--ca-name", "--cn", "--root-ca-name", "ca_name", default=None,
                     help="Verified DPS CA certificate (dps certificate) that signs members' certificates (x509)."),
        click.option("--secondary-ca-name", "--scn", "--secondary-root-ca-name", "secondary_ca_name", default=None,
                     help="Secondary verified DPS CA certificate name (x509)."),
        click.option("--certificate-path", "--cp", "certificate_path", default=None,
                     help="Primary signing certificate file, PEM or DER: an uploaded and verified DPS CA (x509)."),
        click.option("--secondary-certificate-path", "--scp", "secondary_certificate_path", default=None,
                     help="Secondary signing certificate file, PEM or DER (x509)."),
        PRIMARY_KEY, SECONDARY_KEY,
        COMMON_SETTINGS,
    )


# ---------------------------------------------------------------- dps enrollment


@click.group("enrollment")
def enrollment() -> None:
    """Individual enrollments: one device each (az iot dps enrollment)."""


@enrollment.command("create")
@ENROLLMENT_ID
@_individual_flags(create=True)
@api_command
def enrollment_create(client: Client, output: str, enrollment_id: str, **flags: Any) -> None:
    """Create an individual enrollment; fails if it exists."""
    doc: dict[str, Any] = {"registrationId": enrollment_id}
    doc["attestation"] = individual_attestation(None, flags)
    apply_settings(doc, flags)
    _create(client, INDIVIDUAL, enrollment_id, doc, output)


@enrollment.command("show")
@ENROLLMENT_ID
@SHOW_KEYS
@api_command
def enrollment_show(client: Client, output: str, enrollment_id: str, show_keys: bool) -> None:
    """Show an individual enrollment (keys only with --show-keys)."""
    _show(client, INDIVIDUAL, enrollment_id, show_keys, output)


@enrollment.command("list")
@TOP
@api_command
def enrollment_list(client: Client, output: str, top: int | None) -> None:
    """List individual enrollments."""
    emit(query_all(client, api_path("enrollments", "query"), top, {"query": "*"}), output, INDIVIDUAL.columns)


@enrollment.command("update")
@ENROLLMENT_ID
@_individual_flags(create=False)
@ETAG
@api_command
def enrollment_update(client: Client, output: str, enrollment_id: str, etag: str | None, **flags: Any) -> None:
    """Change the given settings of an individual enrollment (If-Match: --etag, else the current ETag)."""
    _update(client, INDIVIDUAL, enrollment_id, flags, etag, output, individual_attestation)


@enrollment.command("delete")
@ENROLLMENT_ID
@ETAG
@api_command
def enrollment_delete(client: Client, output: str, enrollment_id: str, etag: str | None) -> None:
    """Delete an individual enrollment and its registration state."""
    client.request("DELETE", INDIVIDUAL.path(enrollment_id), if_match=etag)


# ---------------------------------------------------------------- dps enrollment-group


@click.group("enrollment-group")
def enrollment_group() -> None:
    """Enrollment groups: devices sharing a CA or a group key (az iot dps enrollment-group)."""


@enrollment_group.command("create")
@ENROLLMENT_ID
@_group_flags()
@api_command
def group_create(client: Client, output: str, enrollment_id: str, **flags: Any) -> None:
    """Create an enrollment group (symmetric key unless a CA is given); fails if it exists."""
    doc: dict[str, Any] = {"enrollmentGroupId": enrollment_id, "attestation": group_attestation(None, flags)}
    apply_settings(doc, flags)
    _create(client, GROUP, enrollment_id, doc, output)


@enrollment_group.command("show")
@ENROLLMENT_ID
@SHOW_KEYS
@api_command
def group_show(client: Client, output: str, enrollment_id: str, show_keys: bool) -> None:
    """Show an enrollment group (keys only with --show-keys)."""
    _show(client, GROUP, enrollment_id, show_keys, output)


@enrollment_group.command("list")
@TOP
@api_command
def group_list(client: Client, output: str, top: int | None) -> None:
    """List enrollment groups."""
    emit(query_all(client, api_path("enrollmentGroups", "query"), top, {"query": "*"}), output, GROUP.columns)


@enrollment_group.command("update")
@ENROLLMENT_ID
@_group_flags()
@ETAG
@api_command
def group_update(client: Client, output: str, enrollment_id: str, etag: str | None, **flags: Any) -> None:
    """Change the given settings of an enrollment group (If-Match: --etag, else the current ETag)."""
    _update(client, GROUP, enrollment_id, flags, etag, output, group_attestation)


@enrollment_group.command("delete")
@ENROLLMENT_ID
@ETAG
@api_command
def group_delete(client: Client, output: str, enrollment_id: str, etag: str | None) -> None:
    """Delete an enrollment group."""
    client.request("DELETE", GROUP.path(enrollment_id), if_match=etag)


@enrollment_group.command("compute-device-key")
@click.option("--registration-id", "--rid", "registration_id", required=True, help="The device's registration id.")
@click.option("--key", "--symmetric-key", "key", default=None, help="Group key, base64 (computed locally).")
@click.option("--enrollment-id", "-e", "--eid", "enrollment_id", default=None, metavar="ID",
              help="Symmetric-key enrollment group whose primary key to use (fetched from the server).")
@lazy_api_command
def group_compute_device_key(connect: Callable[[], Client], output: str, registration_id: str, key: str | None,
                             enrollment_id: str | None) -> None:
    """Print a member device's key: base64(HMAC-SHA256(group key, registration id))."""
    from opendps.errors import InvalidInput
    from opendps.provisioning.enrollments import check_registration_id
    from opendps.transport.sas import derive_device_key

    if (key is None) == (enrollment_id is None):
        raise CliError("give exactly one of --key (the group key) or --enrollment-id (fetch the group's key)")
    try:  # why: --rid '' printed a key (exit 0) for an id no device can register with
        check_registration_id(registration_id, "--registration-id")
    except InvalidInput as exc:
        raise CliError(exc.message) from exc
    if key is None:
        mech = connect().request("POST", GROUP.path(str(enrollment_id), "attestationmechanism")) or {}
        if mech.get("type") != "symmetricKey":
            raise CliError(f"enrollment group {enrollment_id!r} uses {mech.get('type')!r} attestation, "
                           "not symmetricKey: it has no group key")
        key = str(mech["symmetricKey"]["primaryKey"])
    else:
        if not key:  # valid base64 of no bytes: an HMAC key no group has, printed as if it were a device's key
            raise CliError("--key must not be empty: give the group's base64 key")
        try:
            base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CliError("--key is not valid base64") from exc
    click.echo(derive_device_key(key, registration_id))


# ---------------------------------------------------------------- dps registration


@click.group("registration")
def registration() -> None:
    """Device registration states (az iot dps enrollment-group registration)."""


REGISTRATION_ID = click.option("--registration-id", "--rid", "registration_id", required=True,
                               help="The device's registration id.")


@registration.command("show")
@REGISTRATION_ID
@api_command
def registration_show(client: Client, output: str, registration_id: str) -> None:
    """Show a device's registration state."""
    emit(client.request("GET", api_path("registrations", registration_id)), output, REGISTRATION_COLUMNS)


@registration.command("list")
@ENROLLMENT_ID
@TOP
@api_command
def registration_list(client: Client, output: str, enrollment_id: str, top: int | None) -> None:
    """List the registration states of an enrollment group's devices."""
    emit(query_all(client, api_path("registrations", enrollment_id, "query"), top), output, REGISTRATION_COLUMNS)


@registration.command("delete")
@REGISTRATION_ID
@ETAG
@api_command
def registration_delete(client: Client, output: str, registration_id: str, etag: str | None) -> None:
    """Forget a registration state: the device registers as new next time (its hub identity stays)."""
    client.request("DELETE", api_path("registrations", registration_id), if_match=etag)


# ---------------------------------------------------------------- dps linked-hub


@click.group("linked-hub")
def linked_hub() -> None:
    """Linked IoT hubs devices are assigned to, with their device registries (az iot dps linked-hub)."""


HUB_NAME = click.option("--hub-name", "-n", "--hn", "hub_name", required=True, help="Linked hub name.")


@linked_hub.command("create")
@HUB_NAME
@click.option("--hub-host-name", "host_name", default=None,
              help="Host name devices connect to (default '<name>.<server host name>').")
@click.option("--allocation-weight", "--aw", "allocation_weight", type=int, default=None,
              help="Weight in allocation, 0-1000 (default 1).")
@click.option("--apply-allocation-policy", "--aap", "apply_allocation_policy", type=click.BOOL, default=None,
              help="Whether enrollments without --iot-hubs may use this hub (true/false, default true).")
@api_command
def hub_create(client: Client, output: str, hub_name: str, host_name: str | None, allocation_weight: int | None,
               apply_allocation_policy: bool | None) -> None:
    """Link a hub; fails if one of that name or host name exists."""
    props = {k: v for k, v in (("hostName", host_name), ("allocationWeight", allocation_weight),
                               ("applyAllocationPolicy", apply_allocation_policy)) if v is not None}
    emit(client.request("PUT", api_path("linkedHubs", hub_name), json={"properties": props}), output, HUB_COLUMNS)


@linked_hub.command("list")
@api_command
def hub_list(client: Client, output: str) -> None:
    """List linked hubs."""
    emit(_list(client, api_path("linkedHubs")), output, HUB_COLUMNS)


@linked_hub.command("show")
@HUB_NAME
@api_command
def hub_show(client: Client, output: str, hub_name: str) -> None:
    """Show a linked hub."""
    emit(client.request("GET", api_path("linkedHubs", hub_name)), output, HUB_COLUMNS)


@linked_hub.command("delete")
@HUB_NAME
@ETAG
@api_command
def hub_delete(client: Client, output: str, hub_name: str, etag: str | None) -> None:
    """Unlink a hub and drop its device registry (refused while an enrollment names it in --iot-hubs)."""
    client.request("DELETE", api_path("linkedHubs", hub_name), if_match=etag)


@linked_hub.command("device-list")
@HUB_NAME
@api_command
def hub_device_list(client: Client, output: str, hub_name: str) -> None:
    """List the device identities (twins) provisioning created in a hub."""
    emit(_list(client, api_path("linkedHubs", hub_name, "devices")), output, HUB_DEVICE_COLUMNS)


@linked_hub.command("certificate-list")
@HUB_NAME
@api_command
def hub_certificate_list(client: Client, output: str, hub_name: str) -> None:
    """List the issuing CAs the hub trusts for devices' operational certificates."""
    emit(_list(client, api_path("linkedHubs", hub_name, "certificates")), output, HUB_CA_COLUMNS)
