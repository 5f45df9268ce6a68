"""az-style IoT hub verbs (``opendps hub ...``): thin clients of the hub service API (docs/api.md).

They mirror ``az iot hub`` verbs and flags (device-identity, device-twin, query, invoke-device-method,
c2d-message, monitor-events, certificate, connection-string) so scripts port over. The hub is chosen
with ``--hub-name`` (sent as ``?hub=`` with the DPS owner connection) or by a hub connection string
given to ``--login``, whose token names its hub. Attached to ``opendps`` by
:func:`opendps.cli.management.register`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from opendps.cli import OUTPUT_OPTION, CliError, non_empty_path
from opendps.cli._client import (
    ApiError,
    Client,
    api_path,
    loads_json,
    read_certificate_file,
    read_limited,
    resolve_connection,
)
from opendps.cli.enrollments import _top, parse_json_object, query_all
from opendps.cli.management import CERT_COLUMNS, CERT_PATH, _connection_options, api_command, etag_option
from opendps.cli.output import emit

DEFAULT_HUB = "default"
HUB_OWNER_POLICY = "iothubowner"
# az's --auth-method names → the Device document's authentication.type
AUTH_METHODS = {"shared_private_key": "sas", "x509_thumbprint": "selfSigned", "x509_ca": "certificateAuthority"}
DEVICE_COLUMNS = ["deviceId", "status", "authentication.type", "connectionState"]
TWIN_COLUMNS = ["deviceId", "status", "version", "connectionState", "etag"]
HUB_CA_COLUMNS = ["name", "properties.subject", "properties.status", "properties.expiry"]
MAX_METHOD_TIMEOUT = 300
HTTP_MARGIN = 15.0  # seconds the HTTP read waits beyond a method's own timeout, so the server's 504 arrives
DEFAULT_C2D_DATA = "Ping from opendps CLI"
SELECT_STAR = re.compile(r"^\s*select\s+(?:top\s+\d+\s+)?\*", re.IGNORECASE)  # twins: the twin table's columns
PROPERTY_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header token: it travels as iothub-app-<name>

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


class HubClient:
    """A :class:`Client` bound to one hub.

    With the DPS owner connection every request carries ``?hub=<name>`` (default ``default``); a hub
    connection string's token already names its hub, so ``?hub`` is sent only when ``--hub-name`` was given
    (and the server refuses a name that is not the token's).
    """

    def __init__(self, client: Client, hub_name: str | None) -> None:
        if hub_name is not None and not hub_name.strip():  # it was sent as ?hub= and served the default hub
            raise CliError("--hub-name must not be empty (leave it out for the default hub)")
        self.client = client
        if hub_name is None and client.connection.key_name != HUB_OWNER_POLICY:
            hub_name = DEFAULT_HUB
        self.name = hub_name
        self.params = {"hub": hub_name} if hub_name is not None else {}

    @property
    def label(self) -> str:
        """The hub as messages name it."""
        return f"hub {self.name!r}" if self.name is not None else "the connection string's hub"

    def request(self, method: str, path: str, *, json: Any = None, if_match: str | None = None,
                headers: Mapping[str, str] | None = None, content: bytes | None = None,
                timeout: float | None = None) -> Any:
        """One hub service request; the decoded JSON answer (None when empty) or a one-line CliError."""
        return self.client.exchange(method, path, json=json, if_match=if_match, headers=headers, params=self.params,
                                    content=content, timeout=timeout)[0]

    def find(self, path: str) -> Any:
        """The resource at ``path``, or None on 404."""
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise


HUB_NAME = click.option("--hub-name", "-n", "hub_name", default=None,
                        help="IoT hub name (default 'default'; with a hub connection string, its hub).")
DEVICE_ID = click.option("--device-id", "-d", "device_id", required=True, help="Target device id.")


def _options(*options: Decorator) -> Decorator:
    """Apply click options so that help lists them in the given order."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def hub_command(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--hub-name`` and the shared connection/output options; call ``f(hub, ...)`` with a ready HubClient."""

    @functools.wraps(f)
    def wrapper(client: Client, *args: Any, hub_name: str | None, **kwargs: Any) -> Any:
        return f(HubClient(client, hub_name), *args, **kwargs)

    return HUB_NAME(api_command(wrapper))


def hub_stream_command(f: Callable[..., Any]) -> Callable[..., Any]:
    """Like :func:`hub_command` without the json/table ``--output`` (a stream has its own formats)."""

    @functools.wraps(f)
    def wrapper(*args: Any, login: str | None, data_dir: Path | None, ca_file: Path | None, hub_name: str | None,
                **kwargs: Any) -> Any:
        client = Client(resolve_connection(login, data_dir, ca_file))
        try:
            return f(HubClient(client, hub_name), *args, **kwargs)
        finally:
            client.close()

    decorated: Callable[..., Any] = wrapper
    for option in reversed([o for o in _connection_options() if o is not OUTPUT_OPTION]):
        decorated = option(decorated)
    return HUB_NAME(decorated)


def parse_json_value(value: str, flag: str) -> Any:
    """``--method-payload``: any inline JSON value or, as az accepts, the path of a JSON file."""
    try:
        return loads_json(value)
    except ValueError as exc:
        try:
            is_file = Path(value).is_file()
        except OSError:
            is_file = False
        if not is_file:
            raise CliError(f"{flag} is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from exc
    try:
        return loads_json(Path(value).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CliError(f"{flag} (file {value}) is not a readable JSON file: {exc}") from exc


def parse_properties(value: str) -> dict[str, str]:
    """``--props 'a=1;b=2'`` (az's format) → application properties; each must fit an HTTP header."""
    props: dict[str, str] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        name, sep, prop = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CliError(f"--props entry {part!r} is not name=value (expected e.g. 'a=1;b=2')")
        if not PROPERTY_NAME.fullmatch(name):
            raise CliError(f"--props name {name!r} may only contain letters, digits and !#$%&'*+.^_`|~-")
        if not (prop.isascii() and prop.isprintable()):
            raise CliError(f"--props value of {name!r} must be printable ASCII")
        props[name] = prop
    return props


def register(main: click.Group) -> None:
    """Attach the ``hub`` group to the ``opendps`` command."""
    main.add_command(hub)


@click.group()
def hub() -> None:
    """IoT hub service: device identities, twins and twin queries, direct methods, C2D messages, telemetry (az iot hub)."""


# ---------------------------------------------------------------- device-identity


@hub.group("device-identity")
def device_identity() -> None:
    """Device identities in a hub's registry."""


AUTH_OPTIONS = _options(
    click.option("--primary-key", "--pk", "primary_key", default=None,
                 help="Primary symmetric key (base64; shared_private_key only; generated when omitted)."),
    click.option("--secondary-key", "--sk", "secondary_key", default=None,
                 help="Secondary symmetric key (base64; shared_private_key only; generated when omitted)."),
    click.option("--primary-thumbprint", "--ptp", "primary_thumbprint", default=None,
                 help="Primary certificate thumbprint (x509_thumbprint only)."),
    click.option("--secondary-thumbprint", "--stp", "secondary_thumbprint", default=None,
                 help="Secondary certificate thumbprint (x509_thumbprint only)."),
)


def _device_path(device_id: str, *rest: str) -> str:
    return api_path("devices", device_id, *rest)


def _authentication(auth_type: str, flags: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any]:
    """The Device document's ``authentication`` for ``auth_type``; on update, unchanged parts come from ``current``."""
    keys_given = flags["primary_key"] is not None or flags["secondary_key"] is not None
    thumbs_given = flags["primary_thumbprint"] is not None or flags["secondary_thumbprint"] is not None
    if keys_given and auth_type != "sas":
        raise CliError("--primary-key/--secondary-key apply only to --auth-method shared_private_key")
    if thumbs_given and auth_type != "selfSigned":
        raise CliError("--primary-thumbprint/--secondary-thumbprint apply only to --auth-method x509_thumbprint")
    same = current is not None and current.get("type") == auth_type
    auth: dict[str, Any] = {"type": auth_type}
    if auth_type == "sas" and keys_given:
        old = ((current or {}).get("symmetricKey") or {}) if same else {}
        primary = flags["primary_key"] or old.get("primaryKey")
        secondary = flags["secondary_key"] or old.get("secondaryKey")
        if not primary or not secondary:
            raise CliError("give both --primary-key and --secondary-key (or neither, to have both generated)")
        auth["symmetricKey"] = {"primaryKey": primary, "secondaryKey": secondary}
    elif auth_type == "selfSigned":
        old = ((current or {}).get("x509Thumbprint") or {}) if same else {}
        primary = flags["primary_thumbprint"] or old.get("primaryThumbprint")
        secondary = flags["secondary_thumbprint"] or old.get("secondaryThumbprint")
        if not primary:
            raise CliError("--auth-method x509_thumbprint needs --primary-thumbprint")
        auth["x509Thumbprint"] = {"primaryThumbprint": primary, "secondaryThumbprint": secondary}
    return auth


@device_identity.command("create")
@DEVICE_ID
@click.option("--auth-method", "--am", "auth_method", type=click.Choice(list(AUTH_METHODS)),
              default="shared_private_key", show_default=True, help="How the device authenticates.")
@AUTH_OPTIONS
@click.option("--status", "--sta", "status", type=click.Choice(["enabled", "disabled"]), default="enabled",
              show_default=True, help="Whether the device may connect.")
@hub_command
def identity_create(hub: HubClient, output: str, device_id: str, auth_method: str, status: str,
                    **flags: Any) -> None:
    """Create a device identity; fails if it exists (PUT would silently replace it)."""
    path = _device_path(device_id)
    if hub.find(path) is not None:
        raise CliError(f"device {device_id!r} already exists in {hub.label} (use 'device-identity update')")
    body = {"deviceId": device_id, "status": status,
            "authentication": _authentication(AUTH_METHODS[auth_method], flags, None)}
    emit(hub.request("PUT", path, json=body), output, DEVICE_COLUMNS)


@device_identity.command("show")
@DEVICE_ID
@hub_command
def identity_show(hub: HubClient, output: str, device_id: str) -> None:
    """Show a device identity, with its keys."""
    emit(hub.request("GET", _device_path(device_id)), output, DEVICE_COLUMNS)


@device_identity.command("list")
@click.option("--top", "top", type=int, default=None, callback=_top,
              help="Maximum number of devices to list (-1 or omitted: all).")
@hub_command
def identity_list(hub: HubClient, output: str, top: int | None) -> None:
    """List device identities (without keys), in device id order, page by page (1,000 at a time)."""
    emit(query_all(hub.client, "/devices", top, params=hub.params, method="GET", size_param="top"), output,
         DEVICE_COLUMNS)


@device_identity.command("update")
@DEVICE_ID
@click.option("--auth-method", "--am", "auth_method", type=click.Choice(list(AUTH_METHODS)), default=None,
              help="Change how the device authenticates.")
@AUTH_OPTIONS
@click.option("--status", "--sta", "status", type=click.Choice(["enabled", "disabled"]), default=None,
              help="Enable or disable the device (disabling drops its live session).")
@click.option("--etag", "-e", "etag", default=None, help="Only update if the device still has this ETag (default '*').")
@hub_command
def identity_update(hub: HubClient, output: str, device_id: str, auth_method: str | None, status: str | None,
                    etag: str | None, **flags: Any) -> None:
    """Change a device's status or authentication; fails if it does not exist. Unchanged settings are kept."""
    if auth_method is None and status is None and all(v is None for v in flags.values()):
        raise CliError("nothing to update: pass --status, --auth-method or keys/thumbprints")
    path = _device_path(device_id)
    current = hub.find(path)
    if current is None:
        raise CliError(f"device {device_id!r} does not exist in {hub.label} (use 'device-identity create')")
    old_auth = current.get("authentication") or {}
    auth_type = AUTH_METHODS[auth_method] if auth_method else old_auth.get("type", "sas")
    body = {"deviceId": current.get("deviceId", device_id), "status": status or current.get("status", "enabled"),
            "authentication": _authentication(auth_type, flags, old_auth)}
    emit(hub.request("PUT", path, json=body, if_match=etag or "*"), output, DEVICE_COLUMNS)


@device_identity.command("delete")
@DEVICE_ID
@click.option("--etag", "-e", "etag", default=None, help="Only delete if the device still has this ETag.")
@hub_command
def identity_delete(hub: HubClient, output: str, device_id: str, etag: str | None) -> None:
    """Delete a device identity (drops its live session)."""
    hub.request("DELETE", _device_path(device_id), if_match=etag)


def _symmetric_keys(device: dict[str, Any], device_id: str, verb: str) -> dict[str, str]:
    """The device's symmetric keys; a one-line error for a device that authenticates by certificate."""
    auth = device.get("authentication") or {}
    keys = auth.get("symmetricKey") or {}
    if auth.get("type") != "sas" or not keys.get("primaryKey"):
        raise CliError(f"device {device_id!r} authenticates with {auth.get('type') or 'no'} credentials, not "
                       f"symmetric keys: there is no key to {verb}")
    return {"primaryKey": keys["primaryKey"], "secondaryKey": keys.get("secondaryKey") or ""}


def _hub_host(hub: HubClient) -> str:
    """The hub's host name, as devices address it: a hub connection string names it, else the linked hub says."""
    if hub.client.connection.key_name == HUB_OWNER_POLICY and hub.name is None:
        return hub.client.connection.host.split(":", 1)[0]
    linked = hub.client.request("GET", api_path("linkedHubs", hub.name or DEFAULT_HUB)) or {}
    return str((linked.get("properties") or {}).get("hostName") or "")


@device_identity.group("connection-string")
def identity_connection_string() -> None:
    """Device connection strings."""


@identity_connection_string.command("show")
@DEVICE_ID
@click.option("--key-type", "--kt", "key_type", type=click.Choice(["primary", "secondary"]), default="primary",
              show_default=True, help="Which of the device's keys to use.")
@hub_command
def identity_connection_string_show(hub: HubClient, output: str, device_id: str, key_type: str) -> None:
    """Show a device's connection string (what the Azure device SDKs' create_from_connection_string take)."""
    device = hub.request("GET", _device_path(device_id)) or {}
    host = _hub_host(hub)
    canonical = device.get("deviceId", device_id)
    if (device.get("authentication") or {}).get("type") == "sas":
        key = _symmetric_keys(device, device_id, "show")[f"{key_type}Key"]
        value = f"HostName={host};DeviceId={canonical};SharedAccessKey={key}"
    else:
        value = f"HostName={host};DeviceId={canonical};x509=true"
    emit({"connectionString": value}, output, ["connectionString"])


@device_identity.command("renew-key")
@DEVICE_ID
@click.option("--key-type", "--kt", "key_type", type=click.Choice(["primary", "secondary", "swap", "both"]),
              required=True, help="Which key to regenerate (swap exchanges them).")
@click.option("--etag", "-e", "etag", default=None, help="Only renew if the device still has this ETag.")
@hub_command
def identity_renew_key(hub: HubClient, output: str, device_id: str, key_type: str, etag: str | None) -> None:
    """Regenerate a device's symmetric key(s); connections signed with an old key are refused from now on."""
    import base64
    import secrets

    path = _device_path(device_id)
    device = hub.request("GET", path) or {}
    keys = _symmetric_keys(device, device_id, "renew")
    if key_type == "swap":
        keys = {"primaryKey": keys["secondaryKey"], "secondaryKey": keys["primaryKey"]}
    for which in (("primary", "secondary") if key_type == "both" else (key_type,)):
        if which in ("primary", "secondary"):
            keys[f"{which}Key"] = base64.b64encode(secrets.token_bytes(32)).decode()
    body = {"deviceId": device.get("deviceId", device_id), "status": device.get("status", "enabled"),
            "authentication": {"type": "sas", "symmetricKey": keys}}
    emit(hub.request("PUT", path, json=body, if_match=etag or device.get("etag") or "*"), output, DEVICE_COLUMNS)


# ---------------------------------------------------------------- device-twin


@hub.group("device-twin")
def device_twin() -> None:
    """Device twins: tags and desired/reported properties."""


@device_twin.command("show")
@DEVICE_ID
@hub_command
def twin_show(hub: HubClient, output: str, device_id: str) -> None:
    """Show a device twin."""
    emit(hub.request("GET", api_path("twins", device_id)), output, TWIN_COLUMNS)


@device_twin.command("update")
@DEVICE_ID
@click.option("--desired", "desired", default=None,
              help="Desired properties patch: a JSON object or the path of a JSON file (null deletes a key).")
@click.option("--tags", "tags", default=None, help="Tags patch: a JSON object or the path of a JSON file.")
@click.option("--etag", "-e", "etag", default=None, help="Only update if the twin still has this ETag.")
@hub_command
def twin_update(hub: HubClient, output: str, device_id: str, desired: str | None, tags: str | None,
                etag: str | None) -> None:
    """Merge-patch desired properties and/or tags (a connected device gets the desired change at once)."""
    if desired is None and tags is None:
        raise CliError("nothing to update: pass --desired and/or --tags")
    body: dict[str, Any] = {}
    if tags is not None:
        body["tags"] = parse_json_object(tags, "--tags")
    if desired is not None:
        body["properties"] = {"desired": parse_json_object(desired, "--desired")}
    emit(hub.request("PATCH", api_path("twins", device_id), json=body, if_match=etag), output, TWIN_COLUMNS)


@device_twin.command("replace")
@DEVICE_ID
@click.option("--json", "-j", "twin_json", required=True,
              help="The new twin: a JSON object or the path of a JSON file; its tags and properties.desired replace "
              "the current ones (a member left out is emptied; reported properties are ignored).")
@click.option("--etag", "-e", "etag", default=None, help="Only replace if the twin still has this ETag.")
@hub_command
def twin_replace(hub: HubClient, output: str, device_id: str, twin_json: str, etag: str | None) -> None:
    """Replace tags and desired properties wholesale (a connected device gets the desired change at once)."""
    body = parse_json_object(twin_json, "--json")
    emit(hub.request("PUT", api_path("twins", device_id), json=body, if_match=etag), output, TWIN_COLUMNS)


# ---------------------------------------------------------------- query


@hub.command("query")
@click.option("--query-command", "-q", "query_command", required=True,
              help="IoT Hub query, e.g. \"SELECT * FROM devices WHERE tags.site = 'lab'\" (docs/api.md lists what "
              "is supported).")
@click.option("--top", "top", type=int, default=None, callback=_top,
              help="Maximum number of results (-1 or omitted: all, following every page).")
@hub_command
def hub_query(hub: HubClient, output: str, query_command: str, top: int | None) -> None:
    """Query device twins with the IoT Hub query language (az iot hub query)."""
    rows = query_all(hub.client, "/devices/query", top, {"query": query_command}, params=hub.params)
    emit(rows, output, TWIN_COLUMNS if SELECT_STAR.match(query_command) else None)


# ---------------------------------------------------------------- invoke-device-method


@hub.command("invoke-device-method")
@DEVICE_ID
@click.option("--method-name", "--mn", "method_name", required=True, help="Name of the direct method.")
@click.option("--method-payload", "--mp", "method_payload", default="{}", show_default=True,
              help="JSON payload (inline or the path of a JSON file).")
@click.option("--timeout", "--to", "--method-response-timeout", "--mrt", "timeout",
              type=click.IntRange(1, MAX_METHOD_TIMEOUT), default=30, show_default=True,
              help="Seconds to wait for the device's answer (1-300).")
@click.option("--method-connect-timeout", "--mct", "connect_timeout", type=click.IntRange(0, MAX_METHOD_TIMEOUT),
              default=0, show_default=True,
              help="Seconds to wait for a device that is not connected (or not listening for methods) to be (0-300).")
@hub_command
def invoke_device_method(hub: HubClient, output: str, device_id: str, method_name: str, method_payload: str,
                         timeout: int, connect_timeout: int) -> None:
    """Call a direct method on a connected device and print its answer (status and payload)."""
    body = {"methodName": method_name, "payload": parse_json_value(method_payload, "--method-payload"),
            "responseTimeoutInSeconds": timeout, "connectTimeoutInSeconds": connect_timeout}
    answer = hub.request("POST", api_path("twins", device_id, "methods"), json=body,
                         timeout=connect_timeout + timeout + HTTP_MARGIN)
    emit(answer, output, ["status", "payload"])


# ---------------------------------------------------------------- c2d-message


@hub.group("c2d-message")
def c2d_message() -> None:
    """Cloud-to-device messages."""


@c2d_message.command("send")
@DEVICE_ID
@click.option("--data", "--da", "data", default=None, help=f"Message body (default {DEFAULT_C2D_DATA!r}).")
@click.option("--data-file-path", "--dfp", "data_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Read the message body (bytes) from this file instead.")
@click.option("--props", "--properties", "props", default=None,
              help="Application properties as 'a=1;b=2'.")
@click.option("--message-id", "--mid", "message_id", default=None, help="Message id (default: generated).")
@click.option("--correlation-id", "--cid", "correlation_id", default=None, help="Correlation id.")
@click.option("--user-id", "--uid", "user_id", default=None, help="User id.")
@click.option("--content-type", "--ct", "content_type", default=None, help="Content type of the body.")
@click.option("--content-encoding", "--ce", "content_encoding", default=None, help="Content encoding of the body.")
@click.option("--ack", "ack", type=click.Choice(["positive", "negative", "full"]), default=None,
              help="Delivery feedback to request.")
@click.option("--ttl", "ttl", type=click.IntRange(min=1), default=None,
              help="Seconds the message may wait for the device (server default 3600, at most 2 days).")
@hub_command
def c2d_send(hub: HubClient, output: str, device_id: str, data: str | None, data_file: Path | None,
             props: str | None, message_id: str | None, correlation_id: str | None, user_id: str | None,
             content_type: str | None, content_encoding: str | None, ack: str | None, ttl: int | None) -> None:
    """Queue a message for a device (delivered now if connected, else when it connects); print its id."""
    if data is not None and data_file is not None:
        raise CliError("give --data or --data-file-path, not both")
    if data_file is not None:
        body = read_limited(data_file, "--data-file-path")
    else:
        body = (DEFAULT_C2D_DATA if data is None else data).encode("utf-8")
    headers: dict[str, str] = {}
    for header, value, flag in (("iothub-messageid", message_id, "--message-id"),
                                ("iothub-correlationid", correlation_id, "--correlation-id"),
                                ("iothub-userid", user_id, "--user-id"), ("Content-Type", content_type, "--content-type"),
                                ("Content-Encoding", content_encoding, "--content-encoding"), ("iothub-ack", ack, "--ack"),
                                ("iothub-ttl", None if ttl is None else str(ttl), "--ttl")):
        if value is None:
            continue
        if not (value.isascii() and value.isprintable()):
            raise CliError(f"{flag} must be printable ASCII")
        headers[header] = value
    for name, value in parse_properties(props or "").items():
        headers[f"iothub-app-{name}"] = value
    answer = hub.request("POST", _device_path(device_id, "messages", "deviceBound"), content=body, headers=headers)
    emit(answer, output, ["messageId"])


@c2d_message.command("purge")
@DEVICE_ID
@hub_command
def c2d_purge(hub: HubClient, output: str, device_id: str) -> None:
    """Delete every message waiting for a device (as ``az iot device c2d-message purge``); print how many."""
    answer = hub.request("DELETE", _device_path(device_id, "commands"))
    emit(answer, output, ["deviceId", "totalMessagesPurged"])


# ---------------------------------------------------------------- monitor-events


def _position(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value in ("earliest", "latest") or (value.isdigit() and value.isascii()):
        return value
    raise click.BadParameter("must be earliest, latest or a position (a number printed with an event)", ctx, param)


@hub.command("monitor-events")
@click.option("--device-id", "-d", "device_id", default=None, help="Only this device's events.")
@click.option("--from", "start", default="latest", show_default=True, callback=_position,
              help="Where to start: earliest, latest (only new events) or a position from a previous event.")
@click.option("--timeout", "--to", "timeout", type=click.IntRange(min=0), default=300, show_default=True,
              help="Stop after this many seconds without an event (0: run until Ctrl-C).")
@click.option("--count", "-c", "count", type=click.IntRange(min=1), default=None,
              help="Stop after this many events.")
@click.option("-o", "--output", "output", type=click.Choice(["json", "jsonl"]), default="json", show_default=True,
              help="json: each event pretty-printed (as az does); jsonl: one compact line per event.")
@hub_stream_command
def monitor_events(hub: HubClient, device_id: str | None, start: str, timeout: int, count: int | None,
                   output: str) -> None:
    """Print device-to-cloud telemetry as it arrives (Ctrl-C stops quietly)."""
    params = {**hub.params, "from": start, "timeout": str(timeout)}
    if device_id:
        params["deviceId"] = device_id
    if count:
        params["count"] = str(count)
    received = 0
    try:
        with hub.client.stream("GET", "/events", params=params) as response:
            target = f"device {device_id!r}" if device_id else "all devices"
            click.echo(f"Starting event monitor on {target}, use ctrl-c to stop...", err=True)
            for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError as exc:
                    raise CliError("the event stream sent a line that is not JSON") from exc
                click.echo(json.dumps(event, indent=2) if output == "json" else json.dumps(event))  # echo flushes
                received += 1
                if count and received >= count:
                    break
    except KeyboardInterrupt:  # Ctrl-C is how a follow ends: not an error
        return
    except BrokenPipeError:  # the reader left (e.g. piped into `head`): end as quietly as on Ctrl-C
        _silence_stdout()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, or Python reports the broken pipe again when it flushes stdout at exit."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ---------------------------------------------------------------- certificate


@hub.group("certificate")
def certificate() -> None:
    """CA certificates the hub trusts for devices' operational certificates."""


@certificate.command("list")
@hub_command
def certificate_list(hub: HubClient, output: str) -> None:
    """List the CAs the hub trusts: issuing CAs synced from linked policies, then CAs uploaded to the hub."""
    body = hub.client.request("GET", _hub_cert_path(hub)) or {}
    emit(body.get("value", []) if isinstance(body, dict) else body, output, HUB_CA_COLUMNS)


# as az iot hub certificate's --name, without -n (here -n is the hub)
CERT_NAME = click.option("--certificate-name", "--name", "name", required=True, help="Name of the CA certificate in the hub.")


def _hub_cert_path(hub: HubClient, *rest: str) -> str:
    return api_path("linkedHubs", hub.name or DEFAULT_HUB, "certificates", *rest)


@certificate.command("create")
@CERT_NAME
@CERT_PATH
@hub_command
def certificate_create(hub: HubClient, output: str, name: str, path: str) -> None:
    """Upload your own CA certificate to the hub (trusted once verified), as az iot hub certificate create."""
    body = {"properties": {"certificate": read_certificate_file(path)}}
    emit(hub.client.request("PUT", _hub_cert_path(hub, name), json=body), output, CERT_COLUMNS)


@certificate.command("show")
@CERT_NAME
@hub_command
def certificate_show(hub: HubClient, output: str, name: str) -> None:
    """Show a CA certificate uploaded to the hub."""
    emit(hub.client.request("GET", _hub_cert_path(hub, name)), output, CERT_COLUMNS)


@certificate.command("delete")
@CERT_NAME
@etag_option(False, "Only delete if the certificate still has this ETag.")
@hub_command
def certificate_delete(hub: HubClient, output: str, name: str, etag: str | None) -> None:
    """Delete a CA certificate uploaded to the hub."""
    hub.client.request("DELETE", _hub_cert_path(hub, name), if_match=etag)


@certificate.command("generate-verification-code")
@CERT_NAME
@etag_option(True, "Current ETag of the certificate.")
@hub_command
def certificate_generate_code(hub: HubClient, output: str, name: str, etag: str) -> None:
    """Get a verification code: sign a certificate with this CN to prove key possession."""
    emit(hub.client.request("POST", _hub_cert_path(hub, name, "generateVerificationCode"), if_match=etag), output,
         CERT_COLUMNS + ["properties.verificationCode"])


@certificate.command("verify")
@CERT_NAME
@CERT_PATH
@etag_option(True, "ETag returned by generate-verification-code.")
@hub_command
def certificate_verify(hub: HubClient, output: str, name: str, path: str, etag: str) -> None:
    """Verify possession with the certificate signed by the CA whose CN is the verification code."""
    body = {"certificate": read_certificate_file(path)}
    emit(hub.client.request("POST", _hub_cert_path(hub, name, "verify"), json=body, if_match=etag), output, CERT_COLUMNS)


# ---------------------------------------------------------------- route (telemetry to NATS)


@hub.group("route")
def route() -> None:
    """Telemetry routes: the hub's device messages also go to NATS (JetStream), after the store."""


ROUTE_NAME = click.option("--route-name", "--rn", "name", required=True, help="Name of the route in the hub.")
ROUTE_COLUMNS = ["name", "properties.url", "properties.subject", "properties.durable", "properties.isEnabled"]


def _route_path(hub: HubClient, *rest: str) -> str:
    return api_path("linkedHubs", hub.name or DEFAULT_HUB, "routes", *rest)


@route.command("create")
@ROUTE_NAME
@click.option("--nats-url", "url", required=True, help="NATS server URL, e.g. nats://127.0.0.1:4222 (comma-separated "
              "for several).")
@click.option("--subject", default="opendps.telemetry", show_default=True,
              help="Subject prefix: messages go to {subject}.{hub}.{device}.")
@click.option("--durable/--no-durable", default=True, show_default=True,
              help="Wait for JetStream's acknowledgement before the device's PUBACK (a stream must capture the subject); "
              "--no-durable: plain NATS publish, at most once.")
@click.option("--enabled/--disabled", default=True, show_default=True, help="Whether the route is in use.")
@etag_option(False, "Replace the route only if it still has this ETag.")
@hub_command
def route_create(hub: HubClient, output: str, name: str, url: str, subject: str, durable: bool, enabled: bool,
                 etag: str | None) -> None:
    """Create or replace a telemetry route of the hub."""
    body = {"properties": {"endpointType": "nats", "url": url, "subject": subject, "durable": durable,
                           "isEnabled": enabled}}
    emit(hub.client.request("PUT", _route_path(hub, name), json=body, if_match=etag), output, ROUTE_COLUMNS)


@route.command("list")
@hub_command
def route_list(hub: HubClient, output: str) -> None:
    """List the hub's telemetry routes."""
    body = hub.client.request("GET", _route_path(hub)) or {}
    emit(body.get("value", []) if isinstance(body, dict) else body, output, ROUTE_COLUMNS)


@route.command("show")
@ROUTE_NAME
@hub_command
def route_show(hub: HubClient, output: str, name: str) -> None:
    """Show a telemetry route."""
    emit(hub.client.request("GET", _route_path(hub, name)), output, ROUTE_COLUMNS)


@route.command("delete")
@ROUTE_NAME
@etag_option(False, "Only delete if the route still has this ETag.")
@hub_command
def route_delete(hub: HubClient, output: str, name: str, etag: str | None) -> None:
    """Delete a telemetry route (the store keeps every message either way)."""
    hub.client.request("DELETE", _route_path(hub, name), if_match=etag)


# ---------------------------------------------------------------- connection-string


@hub.group("policy")
def policy() -> None:
    """The hub's shared access policy (iothubowner): each hub has its own keys."""


@policy.command("renew-key")
@click.option("--renew-key", "--rk", "renew_key", type=click.Choice(["primary", "secondary", "swap"]), required=True,
              help="Which key to regenerate (swap: exchange primary and secondary).")
@click.option("--policy-name", "--pn", "policy_name", default=HUB_OWNER_POLICY, show_default=True,
              help="Shared access policy (hubs have only iothubowner).")
@hub_command
def policy_renew_key(hub: HubClient, output: str, renew_key: str, policy_name: str) -> None:
    """Regenerate a key of the hub's owner policy, as az iot hub policy renew-key (needs the DPS owner)."""
    if policy_name != HUB_OWNER_POLICY:
        raise CliError(f"no policy {policy_name!r}: hubs have only {HUB_OWNER_POLICY!r}")
    path = api_path("linkedHubs", hub.name or DEFAULT_HUB, "keys", "renew")
    emit(hub.client.request("POST", path, json={"renewKey": renew_key}), output, ["keyName", "primaryKey", "secondaryKey"])


@hub.group("connection-string")
def connection_string() -> None:
    """Hub connection strings."""


@connection_string.command("show")
@click.option("--hub-name", "-n", "hub_name", default=DEFAULT_HUB, show_default=True, help="IoT hub name.")
@click.option("--policy-name", "--pn", "policy_name", default=HUB_OWNER_POLICY, show_default=True,
              help="Shared access policy.")
@click.option("--key-type", "--kt", "key_type", type=click.Choice(["primary", "secondary"]), default="primary",
              show_default=True, help="Which of the policy's keys to use.")
@click.option("--data-dir", type=click.Path(), default=None, callback=non_empty_path,
              help="Data directory of the installation (default $OPENDPS_DATA_DIR or ./.opendps).")
@OUTPUT_OPTION
def connection_string_show(hub_name: str, policy_name: str, key_type: str, data_dir: Path | None,
                           output: str) -> None:
    """Print a hub's owner connection string (read from the local data directory, as 'opendps info' does)."""
    from opendps.errors import ConfigurationError
    from opendps.instance import Settings, open_instance

    if policy_name != HUB_OWNER_POLICY:
        raise CliError(f"no connection string for policy {policy_name!r}: hubs have only {HUB_OWNER_POLICY!r}")
    try:
        settings = Settings.load(data_dir)
        inst = open_instance(settings, create=False, migrate=False)
    except ConfigurationError as exc:
        raise CliError(f"cannot read the local installation: {exc}") from exc
    try:
        hubs = {h.name: h for h in inst.services.hubs.list()}
        if hub_name not in hubs:
            raise CliError(f"no hub named {hub_name!r} in {settings.data_dir} (hubs: {', '.join(sorted(hubs)) or 'none'})")
        value = inst.hub_connection_string(hub_name, secondary=key_type == "secondary")
    finally:
        inst.close()
    emit({"connectionString": value}, output, ["connectionString"])
