"""The management CLI without a server: connection resolution, error lines, If-Match, request shapes."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from opendps.cli import CliError, main, management
from opendps.cli import _client as client_mod
from opendps.cli._client import (
    NO_CONNECTION,
    ApiError,
    Client,
    Connection,
    api_path,
    format_error,
    if_match_value,
    parse_login,
    read_certificate_file,
    resolve_connection,
)
from opendps.transport import sas

KEY = base64.b64encode(b"k" * 32).decode()
LOGIN = f"HostName=localhost:8443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={KEY}"
OTHER = f"HostName=env.example:9443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={KEY}"


def _no_local(_: Path) -> None:
    return None


# ---------------------------------------------------------------- connection resolution


def test_login_wins_over_env_and_data_dir(tmp_path: Path) -> None:
    def local(_: Path) -> tuple[str, Path]:
        raise AssertionError("the data directory must not be opened when --login is given")

    conn = resolve_connection(LOGIN, tmp_path, env={"OPENDPS_CONNECTION_STRING": OTHER}, load_local=local)
    assert (conn.host, conn.key_name, conn.key) == ("localhost:8443", "provisioningserviceowner", KEY)
    assert conn.base_url == "https://localhost:8443"
    assert conn.source == "--login"
    assert conn.connection_string == LOGIN


def test_env_connection_string_before_data_dir(tmp_path: Path) -> None:
    conn = resolve_connection(env={"OPENDPS_CONNECTION_STRING": OTHER, "OPENDPS_DATA_DIR": str(tmp_path)},
                              load_local=_no_local)
    assert conn.host == "env.example:9443"
    assert conn.source == "OPENDPS_CONNECTION_STRING"


def test_data_dir_default_order(tmp_path: Path) -> None:
    seen: list[Path] = []

    def local(d: Path) -> tuple[str, Path]:
        seen.append(d)
        return LOGIN, d / "tls" / "server-ca.pem"

    resolve_connection(data_dir=tmp_path / "explicit", env={"OPENDPS_DATA_DIR": "envdir"}, load_local=local)
    resolve_connection(env={"OPENDPS_DATA_DIR": "envdir", "OPENDPS_CONNECTION_STRING": ""}, load_local=local)
    resolve_connection(env={}, load_local=local)
    assert seen == [tmp_path / "explicit", Path("envdir"), Path(".opendps")]


def test_nothing_found_is_one_clear_error() -> None:
    with pytest.raises(CliError) as err:
        resolve_connection(env={}, load_local=_no_local)
    assert err.value.format_message() == NO_CONNECTION


def test_trust_order(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    local_ca = tmp_path / "tls" / "server-ca.pem"
    local_ca.write_text("pem")
    explicit, from_env = tmp_path / "a.pem", tmp_path / "b.pem"
    explicit.write_text("pem")
    from_env.write_text("pem")
    env = {"OPENDPS_CA_FILE": str(from_env)}
    assert resolve_connection(LOGIN, tmp_path, explicit, env=env).ca_file == explicit
    assert resolve_connection(LOGIN, tmp_path, env=env).ca_file == from_env
    # with --login the data directory still supplies the CA to trust, if it has one
    assert resolve_connection(LOGIN, tmp_path, env={}).ca_file == local_ca
    assert resolve_connection(LOGIN, tmp_path / "none", env={}).ca_file is None


def test_missing_ca_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="CA file .*nope.pem does not exist"):
        resolve_connection(LOGIN, tmp_path, tmp_path / "nope.pem", env={})
    with pytest.raises(CliError, match=f"CA file {re.escape(str(tmp_path))} is not a file"):  # it said "does not exist"
        resolve_connection(LOGIN, tmp_path, tmp_path, env={})


def test_an_empty_login_is_refused_not_replaced_by_the_local_owner_key(tmp_path: Path) -> None:
    """`--login "$UNSET"` used the data directory's owner connection string: another installation than was meant."""
    def local(_: Path) -> tuple[str, Path]:
        raise AssertionError("an empty --login must not fall back to the data directory")

    for value in ("", "  "):
        with pytest.raises(CliError, match="--login is empty"):
            resolve_connection(value, tmp_path, env={"OPENDPS_CONNECTION_STRING": OTHER}, load_local=local)


def test_local_data_dir_end_to_end(tmp_path: Path) -> None:
    from opendps.instance import Settings, open_instance

    data = tmp_path / "data"
    open_instance(Settings(data_dir=data, lint=False, https_port=18443)).close()
    conn = resolve_connection(env={"OPENDPS_DATA_DIR": str(data)})
    assert conn.host == "localhost:18443"
    assert conn.key_name == "provisioningserviceowner"
    assert conn.ca_file == data / "tls" / "server-ca.pem"
    assert conn.source == f"data directory {data}"


@pytest.mark.parametrize("value, expected", [
    ("HostName=h;SharedAccessKeyName=p", "lacks SharedAccessKey"),
    ("garbage", "malformed connection string"),
    (f"HostName=h;SharedAccessKeyName=p;SharedAccessKey={KEY};{KEY[:10]}", "malformed connection string"),
    ("HostName=h;SharedAccessKeyName=p;SharedAccessKey=not base64!", "not valid base64"),
    ("HostName=;SharedAccessKeyName=p;SharedAccessKey=" + KEY, "empty HostName"),
])
def test_bad_connection_strings_never_echo_the_key(value: str, expected: str) -> None:
    with pytest.raises(CliError) as err:
        parse_login(value)
    message = err.value.format_message()
    assert expected in message
    assert KEY[:10] not in message and "not base64!" not in message


def test_connection_repr_hides_key() -> None:
    assert KEY not in repr(Connection("h", "p", KEY))


# ---------------------------------------------------------------- errors, If-Match, files


def test_format_error_azure_body() -> None:
    body = json.dumps({"errorCode": 412001, "trackingId": "t", "message": "etag mismatch",
                       "timestampUtc": "2026-11-27T08:00:00.000000Z", "info": {}}).encode()
    assert format_error(412, body, "412001") == "etag mismatch (HTTP 412, code 412001)"


def test_format_error_fallbacks() -> None:
    multiline = json.dumps({"message": "a\n  b"}).encode()
    assert format_error(404, multiline, "404001") == "a b (HTTP 404, code 404001)"
    assert format_error(502, b"<html>bad gateway</html>") == "<html>bad gateway</html> (HTTP 502)"
    assert format_error(503, b"") == "Service Unavailable (HTTP 503)"
    assert format_error(500, b'{"unexpected": 1}') == "Internal Server Error (HTTP 500)"


@pytest.mark.parametrize("etag, header", [
    (None, None),
    ("AAAAAB3x9k8=", '"AAAAAB3x9k8="'),
    (' "AAAAAB3x9k8=" ', '"AAAAAB3x9k8="'),
    ('W/"x"', 'W/"x"'),
    ("*", "*"),
])
def test_if_match_value(etag: str | None, header: str | None) -> None:
    assert if_match_value(etag) == header


def test_if_match_empty_is_refused() -> None:
    with pytest.raises(CliError, match="--etag"):
        if_match_value("  ")


def test_a_non_ascii_etag_is_refused_before_sending() -> None:
    with pytest.raises(CliError, match="printable ASCII"):
        if_match_value("\u00fc")


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    """click lists a Choice's values on lines of their own; opendps prints every error on one line."""
    missing = CliRunner().invoke(main, ["hub", "policy", "renew-key", "--login", LOGIN])
    assert missing.exit_code == 2
    assert len(missing.stderr.splitlines()) == 1 and "Choose from: primary, secondary, swap" in missing.stderr
    bad_id = CliRunner().invoke(main, ["bootstrap", "--rid", "d\u00fcse", "--skip-upload", "--cert-dir", str(tmp_path)])
    assert bad_id.exit_code == 1 and len(bad_id.stderr.splitlines()) == 1
    assert bad_id.stderr.startswith("error: --registration-id 'd\u00fcse' is invalid")
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("command", [
    ["init"], ["serve"], ["info"], ["hub", "connection-string", "show"], ["audit", "verify"], ["device", "provision"],
    ["dps", "enrollment", "list"],
])
def test_an_empty_data_dir_is_refused_not_read_as_the_current_directory(command: list[str], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``--data-dir "$UNSET"`` was Path(''), the current directory: an instance made (init) or used wherever the
    command ran. Every command's --data-dir refuses it in one line; "." still names the current directory."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [*command, "--data-dir", ""], prog_name="opendps")
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"error: Invalid value for '--data-dir': must name a directory (it is empty) (see 'opendps {' '.join(command)} "
        "--help')"]
    assert not any(tmp_path.iterdir())  # nothing made here
    assert CliRunner().invoke(main, ["init", "--data-dir", "."]).exit_code == 0
    assert (tmp_path / "config.json").exists()


def test_read_certificate_file(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    (tmp_path / "c.pem").write_text(pem)
    (tmp_path / "c.der").write_bytes(b"\x30\x82\x01\xff\x80")
    assert read_certificate_file(tmp_path / "c.pem") == pem
    assert read_certificate_file(tmp_path / "c.der") == base64.b64encode(b"\x30\x82\x01\xff\x80").decode()
    with pytest.raises(CliError, match="missing.pem"):
        read_certificate_file(tmp_path / "missing.pem")
    (tmp_path / "empty.pem").write_text("\n")
    with pytest.raises(CliError, match="empty.pem is empty"):
        read_certificate_file(tmp_path / "empty.pem")


def test_api_path_encodes_segments() -> None:
    assert api_path("namespaces", "ns1", "credentials", "default") == "/namespaces/ns1/credentials/default"
    assert api_path("certificates", "../x?y") == "/certificates/..%2Fx%3Fy"


def test_an_empty_or_dot_name_cannot_change_the_route() -> None:
    """`--name ''` made /namespaces/ (the list) and `--name ..` made /namespaces/ns1/credentials/default (httpx removes
    dot segments): `show` printed another resource and exited 0. Empty is refused; dots reach the server as a name."""
    with pytest.raises(CliError, match=re.escape("a name or id must not be empty (in /namespaces/...)")):
        api_path("namespaces", "")
    with pytest.raises(CliError, match=re.escape("(in /namespaces/ns1/credentials/default/policies/...)")):
        api_path("namespaces", "ns1", "credentials", "default", "policies", "")
    assert api_path("devices", ".") == "/devices/%2E"
    assert api_path("namespaces", "ns1", "policies", "..") == "/namespaces/ns1/policies/%2E%2E"
    assert api_path("devices", "a..b") == "/devices/a..b"
    url = httpx.Client(base_url="https://h").build_request("GET", api_path("namespaces", "ns1", "policies", "..")).url
    assert url.raw_path == b"/namespaces/ns1/policies/%2E%2E"


# ---------------------------------------------------------------- the client against a mock transport


def _client(handler) -> Client:
    return Client(Connection("localhost:8443", "provisioningserviceowner", KEY),
                  transport=httpx.MockTransport(handler))


def test_request_is_signed_and_versioned() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"name": "root"})

    assert _client(handler).request("POST", "/certificates/root/verify", json={"certificate": "x"},
                                    if_match="AAA=") == {"name": "root"}
    req = seen[0]
    assert str(req.url) == "https://localhost:8443/certificates/root/verify?api-version=2025-07-01-preview"
    assert req.headers["If-Match"] == '"AAA="'
    assert json.loads(req.content) == {"certificate": "x"}
    token = sas.parse(req.headers["Authorization"])
    assert token.resource == "localhost:8443" and token.key_name == "provisioningserviceowner"
    sas.verify(token, KEY)


def test_request_without_etag_sends_no_if_match() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert "If-Match" not in request.headers
        return httpx.Response(204)

    assert _client(handler).request("DELETE", "/certificates/root") is None


def test_error_response_becomes_api_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(412, json={"errorCode": 412001, "message": "precondition failed: etag"},
                              headers={"x-ms-error-code": "412001"})

    with pytest.raises(ApiError) as err:
        _client(handler).request("DELETE", "/certificates/root", if_match="old")
    assert err.value.status == 412
    assert err.value.format_message() == "precondition failed: etag (HTTP 412, code 412001)"


def test_connection_failure_names_url() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(CliError, match=r"cannot reach https://localhost:8443/namespaces: connection refused"):
        _client(handler).request("GET", "/namespaces")


# ---------------------------------------------------------------- commands (mock transport, no server)


class FakeServer:
    """Routes requests to canned answers and records them."""

    def __init__(self, routes: dict[tuple[str, str], httpx.Response]):
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        resp = self.routes.get((request.method, request.url.path))
        return resp if resp is not None else httpx.Response(
            404, json={"errorCode": 404001, "message": f"{request.url.path} not found"})


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OPENDPS_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("OPENDPS_CA_FILE", raising=False)

    def invoke(server: FakeServer, *args: str):
        monkeypatch.setattr(management, "Client",
                            lambda conn: client_mod.Client(conn, transport=httpx.MockTransport(server)))
        return CliRunner().invoke(main, [*args, "--login", LOGIN], catch_exceptions=False)

    return invoke


POLICY = {"name": "p1", "etag": "E1", "properties": {"certificate": {
    "certificateAuthorityConfiguration": {"keyType": "ECC", "subject": "CN=p1"},
    "leafCertificateConfiguration": {"validityPeriodInDays": 45, "allowP256": True}}}}
P1 = "/namespaces/ns1/credentials/default/policies/p1"


def test_policy_create_refuses_existing(run) -> None:
    server = FakeServer({("GET", P1): httpx.Response(200, json=POLICY)})
    result = run(server, "adr", "ns", "policy", "create", "--ns", "ns1", "-n", "p1")
    assert result.exit_code == 1
    assert "error: policy 'p1' already exists in namespace 'ns1'" in result.stderr
    assert [r.method for r in server.requests] == ["GET"]


def test_policy_create_sends_defaults(run) -> None:
    server = FakeServer({("PUT", P1): httpx.Response(201, json=POLICY)})
    result = run(server, "adr", "ns", "policy", "create", "--namespace", "ns1", "--name", "p1")
    assert result.exit_code == 0, result.output
    body = json.loads(server.requests[-1].content)
    assert body["properties"]["certificate"]["leafCertificateConfiguration"] == {
        "validityPeriodInDays": 30, "allowP256": False}
    assert json.loads(result.stdout)["name"] == "p1"


def test_policy_update_keeps_unchanged_settings(run) -> None:
    server = FakeServer({("GET", P1): httpx.Response(200, json=POLICY),
                         ("PUT", P1): httpx.Response(200, json=POLICY)})
    result = run(server, "adr", "ns", "policy", "update", "--ns", "ns1", "-n", "p1",
                 "--cert-validity-days", "10", "-e", "E1")
    assert result.exit_code == 0, result.output
    put = server.requests[-1]
    assert put.headers["If-Match"] == '"E1"'
    assert json.loads(put.content)["properties"]["certificate"]["leafCertificateConfiguration"] == {
        "validityPeriodInDays": 10, "allowP256": True}


def test_show_with_an_empty_or_dot_name_shows_nothing_else(run) -> None:
    credential = {"name": "default", "properties": {"subject": "CN=ns1 Root CA"}}
    server = FakeServer({("GET", "/namespaces/"): httpx.Response(200, json={"value": [{"name": "ns1"}]}),
                         ("GET", "/namespaces/ns1/credentials/default"): httpx.Response(200, json=credential)})
    empty = run(server, "adr", "ns", "show", "--name", "")
    assert empty.exit_code == 1 and server.requests == []
    assert empty.stderr == "error: a name or id must not be empty (in /namespaces/...)\n"
    dots = run(server, "adr", "ns", "policy", "show", "--ns", "ns1", "-n", "..")
    assert dots.exit_code == 1 and "default" not in dots.stdout
    assert server.requests[-1].url.raw_path.startswith(b"/namespaces/ns1/credentials/default/policies/%2E%2E")


def test_an_empty_hub_name_is_refused_not_sent_as_the_default_hub(run) -> None:
    """`--hub-name ''` was sent as ?hub= and the server answered for the default hub."""
    server = FakeServer({("GET", "/twins/d1"): httpx.Response(200, json={"deviceId": "d1"})})
    result = run(server, "hub", "device-twin", "show", "-d", "d1", "--hub-name", "")
    assert result.exit_code == 1 and server.requests == []
    assert result.stderr == "error: --hub-name must not be empty (leave it out for the default hub)\n"


def test_a_non_utf8_argument_is_one_line_naming_its_option(run, tmp_path: Path, monkeypatch) -> None:
    """argv bytes that are not UTF-8 arrive as lone surrogates; a name sent in a URL or a JSON body, or a data directory
    put in the SQLite URL, failed with a UnicodeEncodeError traceback."""
    bad = os.fsdecode(b"ab\xff\xfe")
    server = FakeServer({})
    for args, option in ((["adr", "ns", "show", "--name", bad], "--name"),
                         (["adr", "ns", "show", f"--name={bad}"], "--name"),
                         (["hub", "query", "-q", f"SELECT {bad}"], "-q")):
        result = run(server, *args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.exception)
        assert result.stderr.startswith(f"error: {option} '") and result.stderr.endswith(" is not valid UTF-8 text\n")
        assert "\\xff\\xfe" in result.stderr and len(result.stderr.splitlines()) == 1
    assert server.requests == []
    monkeypatch.delenv("OPENDPS_CONNECTION_STRING", raising=False)
    data_dir = tmp_path / bad  # exists, not initialised: its SQLite URL could not be written
    data_dir.mkdir()
    result = CliRunner().invoke(main, ["certificate", "list", "--data-dir", str(data_dir)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert result.stderr.startswith("error: --data-dir '") and "is not valid UTF-8 text" in result.stderr
    from opendps.cli import _not_utf8  # a non-UTF-8 file name is fine: it is named only when it is what failed

    assert _not_utf8(["--path", bad], "some other text \udcc3") is None
    assert _not_utf8(["--path", bad], f"/x/{bad}") == "--path 'ab\\xff\\xfe'"


def test_policy_update_missing(run) -> None:
    result = run(FakeServer({}), "adr", "ns", "policy", "update", "--ns", "ns1", "-n", "p1",
                 "--no-allow-p256")
    assert result.exit_code == 1
    assert "policy 'p1' does not exist in namespace 'ns1'" in result.stderr


def test_server_error_is_one_line(run) -> None:
    result = run(FakeServer({}), "adr", "ns", "show", "--namespace", "nope")
    assert result.exit_code == 1
    assert result.stderr == "error: /namespaces/nope not found (HTTP 404, code 404001)\n"


def test_list_prints_the_value_array(run) -> None:
    cert = {"name": "root", "etag": "E", "properties": {"subject": "CN=r", "isVerified": False}}
    server = FakeServer({("GET", "/certificates"): httpx.Response(200, json={"value": [cert]})})
    assert json.loads(run(server, "dps", "certificate", "list").stdout) == [cert]
    table = run(server, "dps", "certificate", "list", "-o", "table").stdout
    assert "root" in table and "CN=r" in table and "isVerified" in table


def test_certificate_create_uploads_file(run, tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    (tmp_path / "root.pem").write_text(pem)
    server = FakeServer({("PUT", "/certificates/root"): httpx.Response(201, json={"name": "root"})})
    result = run(server, "dps", "certificate", "create", "--certificate-name", "root", "-p",
                 str(tmp_path / "root.pem"))
    assert result.exit_code == 0, result.output
    assert json.loads(server.requests[0].content) == {"properties": {"certificate": pem}}
    assert "If-Match" not in server.requests[0].headers


def test_certificate_create_missing_file(run, tmp_path: Path) -> None:
    server = FakeServer({})
    result = run(server, "dps", "certificate", "create", "-n", "root", "--path", str(tmp_path / "x.pem"))
    assert result.exit_code == 1
    assert "x.pem" in result.stderr and not server.requests


def test_credential_show_pem(run) -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    server = FakeServer({("GET", "/namespaces/ns1/credentials/default"): httpx.Response(
        200, json={"name": "default", "properties": {"certificate": pem}})})
    assert run(server, "adr", "ns", "credential", "show", "--ns", "ns1", "--pem").stdout == pem


def test_connection_string_show(run) -> None:
    server = FakeServer({})
    result = run(server, "dps", "connection-string", "show")
    assert json.loads(result.stdout) == {"connectionString": LOGIN}
    assert not server.requests
    other = run(server, "dps", "connection-string", "show", "--policy-name", "enrollmentread")
    assert other.exit_code == 1 and KEY not in other.stderr


@pytest.mark.parametrize("port, shown", [("0", "off"), ("15671", "localhost:15671")])
def test_info_table_shows_the_amqp_endpoint(tmp_path: Path, port: str, shown: str) -> None:
    data = str(tmp_path / "data")
    runner = CliRunner()
    assert runner.invoke(main, ["init", "--data-dir", data, "--no-lint", "--amqp-port", port]).exit_code == 0
    result = runner.invoke(main, ["info", "--data-dir", data, "-o", "table"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "amqp" in result.output and shown in result.output, result.output


def test_tables_print_lists_as_items(capsys):
    """Issue 12.19: a list in a table cell is its items, not Python's repr."""
    from opendps.cli.output import emit

    emit([{"name": "ns", "properties": {"policies": ["default", "extra"]}}], "table", ["name", "properties.policies"])
    out = capsys.readouterr().out
    assert "default, extra" in out and "['default'" not in out


def test_a_configuration_error_while_serving_is_one_line_not_a_traceback(monkeypatch, capsys, tmp_path: Path) -> None:
    """E.g. a worker that could not bind its port after the supervisor's probe (another program took it between)."""
    import opendps.server
    from opendps.cli import main
    from opendps.errors import ConfigurationError

    def refuse(_instance: object) -> None:
        raise ConfigurationError("worker 0: cannot listen: error while attempting to bind on address "
                                 "('127.0.0.1', 1): address already in use")

    monkeypatch.setattr(opendps.server, "run", refuse)
    with pytest.raises(SystemExit) as exited:
        main.main(["serve", "--data-dir", str(tmp_path / "d"), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: worker 0: cannot listen") and "address already in use" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_command_tree_loads_without_the_server_s_libraries():
    """Every management verb is an HTTPS client: building the command tree (what ``opendps --help`` or ``opendps
    iot hub device-identity list`` pays before its request) loads neither the store (SQLAlchemy, Alembic) nor pkilint
    nor the server's front ends: 0.4 s instead of 1 s a call, for scripts that run the CLI in a loop."""
    import subprocess
    import sys

    heavy = ("sqlalchemy", "alembic", "pkilint", "aiohttp", "opendps.store", "opendps.pki", "opendps.frontends")
    code = ("import sys; from click.testing import CliRunner; from opendps.cli import main; "
            "assert CliRunner().invoke(main, ['--help']).exit_code == 0; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"loaded at start: {proc.stdout.strip()}"


@pytest.mark.parametrize("text, says", [
    ("1e999", "1e999 is not a JSON number"),
    ('{"delay": NaN}', "NaN is not a JSON number"),
    ("[-Infinity]", "-Infinity is not a JSON number"),
    ("9" * 5000, "Exceeds the limit"),
    ("[" * 100_000, "nested too deeply"),  # RecursionError traceback
])
def test_json_on_the_command_line_that_is_not_json_is_one_line(text, says):
    """Python's json accepts NaN, Infinity and 1e999 (→ inf), which no JSON body can carry: `--mp 1e999` failed with a
    ValueError traceback when the request was encoded. Refused where it is parsed, with the flag named."""
    from opendps.cli.enrollments import parse_json_object
    from opendps.cli.hub import parse_json_value

    with pytest.raises(CliError, match=f"--mp is not valid JSON: {re.escape(says)}"):
        parse_json_value(text, "--mp")
    with pytest.raises(CliError, match=f"--json is not valid JSON: {re.escape(says)}"):
        parse_json_object(text if text.startswith("{") else "{\"a\": " + text + "}", "--json")
    assert parse_json_value('{"delay": 1.5e3, "n": [1, -2]}', "--mp") == {"delay": 1500.0, "n": [1, -2]}


def test_a_database_url_or_a_path_no_verb_can_use_is_one_line(tmp_path):
    """`db upgrade --db <not a URL>` raised SQLAlchemy's ArgumentError; a --data-dir or --ca-file name longer than the
    file system allows raised OSError: each is now one `error:` line and exit 1, as init and serve already were."""
    for args, says in ((["db", "upgrade", "--data-dir", str(tmp_path), "--db", "garbage"], "'garbage' is not a database URL"),
                       (["db", "upgrade", "--data-dir", str(tmp_path), "--db", "mysql://u@h/d"], "'mysql' is not supported"),
                       # --db '' migrated (and created) the data directory's SQLite file and exited 0
                       (["db", "upgrade", "--data-dir", str(tmp_path), "--db", ""], "'' is not a database URL"),
                       (["audit", "verify", "--data-dir", str(tmp_path), "--db", ""], "'' is not a database URL"),
                       (["info", "--data-dir", "x" * 3000], "File name too long"),
                       (["adr", "ns", "list", "--login", LOGIN, "--ca-file", "y" * 3000], "File name too long")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args[:2], result.exception)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], (args[:2], lines)
        assert len(lines[0]) < 400  # the long name is cut
    assert not (tmp_path / "opendps.db").exists()
