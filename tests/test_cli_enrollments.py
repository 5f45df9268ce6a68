"""az-style provisioning verbs (dps enrollment / enrollment-group / registration / linked-hub) against a real server.

The server is shared per module (SQLite and PostgreSQL): every test uses its own resource names.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
from pathlib import Path

import httpx
import pytest
from tests.conftest import run_openssl

from opendps.cli._client import ApiError, Client, resolve_connection
from opendps.cli.enrollments import query_all
from opendps.transport import sas

SERVER_STORES = ("sqlite",)  # the CLI/SDK/front end is the subject, not the store (tests/conftest.py)

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(100, 148))).decode()


def _json(proc) -> object:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _fails(proc, *words: str) -> str:
    """The command failed with exactly one ``error:`` line on stderr containing ``words``."""
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _hmac_key(group_key: str, registration_id: str) -> str:
    return base64.b64encode(hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256).digest()).decode()


def _self_signed(tmp_path: Path, cn: str, name: str) -> Path:
    run_openssl("req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384",
                "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={cn}", cwd=tmp_path)
    return tmp_path / f"{name}.pem"


def _sha256(pem: Path) -> str:
    out = run_openssl("x509", "-in", str(pem), "-noout", "-fingerprint", "-sha256").stdout
    return out.strip().split("=", 1)[1].replace(":", "").upper()


def _ca(tmp_path: Path, name: str) -> Path:
    run_openssl("req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384",
                "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:true,pathlen:1", "-addext", "keyUsage=critical,keyCertSign",
                cwd=tmp_path)
    return tmp_path / f"{name}.pem"


def _client(server) -> Client:
    """The CLI's own REST client, for what the verbs do not expose (paging size, raw bodies)."""
    return Client(resolve_connection(server.connection_string, None, server.ca_file, env={}))


def _service_host(server) -> str:
    return sas.parse_connection_string(server.connection_string)["HostName"].split(":")[0]


# ---------------------------------------------------------------- individual, symmetric key


def test_individual_symmetric_key_lifecycle(server):
    created = _json(server.cli("dps", "enrollment", "create", "-e", "sk-dev-1", "--at", "symmetricKey"))
    assert created["registrationId"] == "sk-dev-1"
    assert created["provisioningStatus"] == "enabled"
    assert created["allocationPolicy"] == "hashed" and created["iotHubs"] == []
    assert created["reprovisionPolicy"] == {"updateHubAssignment": True, "migrateDeviceData": True}
    assert created["capabilities"] == {"iotEdge": False}

    shown = _json(server.cli("dps", "enrollment", "show", "--enrollment-id", "sk-dev-1"))
    assert shown["attestation"] == {"type": "symmetricKey", "symmetricKey": {}}
    keys = _json(server.cli("dps", "enrollment", "show", "-e", "sk-dev-1", "--show-keys"))["attestation"]["symmetricKey"]
    assert set(keys) == {"primaryKey", "secondaryKey"} and keys["primaryKey"] != keys["secondaryKey"]
    assert len(base64.b64decode(keys["primaryKey"])) == 64 and len(base64.b64decode(keys["secondaryKey"])) == 64

    _fails(server.cli("dps", "enrollment", "create", "-e", "sk-dev-1", "--at", "symmetricKey"),
           "enrollment 'sk-dev-1' already exists")

    updated = _json(server.cli("dps", "enrollment", "update", "-e", "sk-dev-1", "--ps", "disabled",
                               "--props", '{"fw": {"version": "1.2"}}', "--tags", '{"site": "b1"}',
                               "--etag", shown["etag"]))
    assert updated["provisioningStatus"] == "disabled"
    assert updated["initialTwin"] == {"tags": {"site": "b1"}, "properties": {"desired": {"fw": {"version": "1.2"}}}}
    assert updated["etag"] != shown["etag"]
    _fails(server.cli("dps", "enrollment", "update", "-e", "sk-dev-1", "--ps", "enabled", "--etag", shown["etag"]),
           "ETag", "412")

    tags_only = _json(server.cli("dps", "enrollment", "update", "-e", "sk-dev-1", "--tags", '{"site": "b2"}'))
    assert tags_only["initialTwin"] == {"tags": {"site": "b2"}, "properties": {"desired": {"fw": {"version": "1.2"}}}}
    assert tags_only["provisioningStatus"] == "disabled"
    after = _json(server.cli("dps", "enrollment", "show", "-e", "sk-dev-1", "--keys"))["attestation"]["symmetricKey"]
    assert after == keys  # updates without key flags keep the keys

    _json(server.cli("dps", "enrollment", "update", "-e", "sk-dev-1", "--pk", KEY_A))
    one = _json(server.cli("dps", "enrollment", "show", "-e", "sk-dev-1", "--keys"))["attestation"]["symmetricKey"]
    assert one == {"primaryKey": KEY_A, "secondaryKey": keys["secondaryKey"]}  # the other key is kept

    _fails(server.cli("dps", "enrollment", "update", "-e", "sk-dev-1", "--props", "{bad"), "--initial-twin-properties")
    _fails(server.cli("dps", "enrollment", "update", "-e", "sk-dev-1", "--tags", "[1]"),
           "--initial-twin-tags", "JSON object")
    _fails(server.cli("dps", "enrollment", "update", "-e", "sk-dev-1"), "nothing to update")
    _fails(server.cli("dps", "enrollment", "update", "-e", "sk-dev-1", "--cp", "x.pem"), "--certificate-path")

    _fails(server.cli("dps", "enrollment", "delete", "-e", "sk-dev-1", "--etag", shown["etag"]), "412")
    assert server.cli("dps", "enrollment", "delete", "-e", "sk-dev-1").returncode == 0
    _fails(server.cli("dps", "enrollment", "show", "-e", "sk-dev-1"), "'sk-dev-1' does not exist", "404")


def test_individual_with_given_keys_edge_and_device_id(server):
    created = _json(server.cli("dps", "enrollment", "create", "--enrollment-id", "sk-given", "--attestation-type",
                               "symmetrickey", "--primary-key", KEY_A, "--secondary-key", KEY_B, "--device-id", "dev-given",
                               "--edge-enabled", "--ps", "disabled"))
    assert created["deviceId"] == "dev-given" and created["capabilities"] == {"iotEdge": True}
    assert created["provisioningStatus"] == "disabled"
    shown = _json(server.cli("dps", "enrollment", "show", "-e", "sk-given", "--show-keys"))
    assert shown["attestation"] == {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B}}
    off = _json(server.cli("dps", "enrollment", "update", "-e", "sk-given", "--edge-enabled", "false"))
    assert off["capabilities"] == {"iotEdge": False} and off["deviceId"] == "dev-given"
    _fails(server.cli("dps", "enrollment", "create", "-e", "sk-bad-key", "--at", "symmetricKey", "--pk", "c2hvcnQ="),
           "primaryKey", "16-64 bytes")


def test_reprovision_policy_mapping(server):
    expected = {"reprovisionandmigratedata": {"updateHubAssignment": True, "migrateDeviceData": True},
                "reprovisionandresetdata": {"updateHubAssignment": True, "migrateDeviceData": False},
                "never": {"updateHubAssignment": False, "migrateDeviceData": False}}
    for i, (value, mapping) in enumerate(expected.items()):
        _json(server.cli("dps", "enrollment", "create", "-e", f"rp-{i}", "--at", "symmetricKey", "--rp", value))
        assert _json(server.cli("dps", "enrollment", "show", "-e", f"rp-{i}"))["reprovisionPolicy"] == mapping
    grp = _json(server.cli("dps", "enrollment-group", "create", "-e", "rp-group", "--reprovision-policy", "never"))
    assert grp["reprovisionPolicy"] == {"updateHubAssignment": False, "migrateDeviceData": False}
    upd = _json(server.cli("dps", "enrollment", "update", "-e", "rp-2", "--rp", "reprovisionandresetdata"))
    assert upd["reprovisionPolicy"] == {"updateHubAssignment": True, "migrateDeviceData": False}


def test_custom_allocation_flags(server):
    created = _json(server.cli("dps", "enrollment", "create", "-e", "custom-1", "--at", "symmetricKey", "--ap", "custom",
                               "--wh", "https://hook.example/alloc"))
    assert created["allocationPolicy"] == "custom"
    assert created["customAllocationDefinition"] == {"webhookUrl": "https://hook.example/alloc", "apiVersion": "2019-03-31"}
    upd = _json(server.cli("dps", "enrollment", "update", "-e", "custom-1", "--av", "2021-10-01"))
    assert upd["customAllocationDefinition"] == {"webhookUrl": "https://hook.example/alloc", "apiVersion": "2021-10-01"}
    geo = _json(server.cli("dps", "enrollment", "update", "-e", "custom-1", "--ap", "geolatency"))
    assert geo["allocationPolicy"] == "geoLatency" and "customAllocationDefinition" not in geo
    _fails(server.cli("dps", "enrollment", "create", "-e", "custom-2", "--at", "symmetricKey", "--wh", "https://h.example"),
           "--allocation-policy custom")
    _fails(server.cli("dps", "enrollment", "create", "-e", "custom-3", "--at", "symmetricKey", "--ap", "custom"),
           "--webhook-url")


def test_list_json_table_top_and_paging(server):
    for rid in ("list-a", "list-b", "list-c"):
        _json(server.cli("dps", "enrollment", "create", "-e", rid, "--at", "symmetricKey"))
    listed = _json(server.cli("dps", "enrollment", "list"))
    ids = [e["registrationId"] for e in listed]
    assert {"list-a", "list-b", "list-c"} <= set(ids) and len(ids) == len(set(ids))
    by_id = {e["registrationId"]: e for e in listed}
    assert by_id["list-b"]["attestation"] == {"type": "symmetricKey", "symmetricKey": {}}  # never keys in a list
    assert [e["registrationId"] for e in _json(server.cli("dps", "enrollment", "list", "--top", "2"))] == ids[:2]
    _fails(server.cli("dps", "enrollment", "list", "--top", "0"), "--top")

    table = server.cli("dps", "enrollment", "list", "-o", "table")
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[1]
    for column in ("registrationId", "attestation.type", "provisioningStatus", "credentialPolicyName",
                   "allocationPolicy", "etag"):
        assert column in header, header
    row = next(line for line in table.stdout.splitlines() if " list-b " in line)
    assert "symmetricKey" in row and "enabled" in row and "hashed" in row

    # continuation paging against the real server: one item per page, every item exactly once
    client = _client(server)
    try:
        paged = query_all(client, "/enrollments/query", None, {"query": "*"}, page_size=1)
        two = query_all(client, "/enrollments/query", 2, {"query": "*"}, page_size=1)
    finally:
        client.close()
    assert [e["registrationId"] for e in paged] == ids
    assert [e["registrationId"] for e in two] == ids[:2]


# ---------------------------------------------------------------- individual, X.509


def test_individual_x509(server, tmp_path):
    pem = _self_signed(tmp_path, "x509-dev-1", "dev1")
    created = _json(server.cli("dps", "enrollment", "create", "-e", "x509-dev-1", "--at", "x509", "--cp", str(pem)))
    primary = created["attestation"]["x509"]["clientCertificates"]["primary"]
    assert created["attestation"]["type"] == "x509"
    assert primary["info"]["subjectName"] == "CN=x509-dev-1"
    assert primary["info"]["sha256Thumbprint"] == _sha256(pem)

    updated = _json(server.cli("dps", "enrollment", "update", "-e", "x509-dev-1", "--ps", "disabled"))
    assert updated["provisioningStatus"] == "disabled"
    assert updated["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["sha256Thumbprint"] == _sha256(pem)

    pem2 = _self_signed(tmp_path, "x509-dev-2", "dev2")
    run_openssl("x509", "-in", str(pem2), "-outform", "DER", "-out", "dev2.der", cwd=tmp_path)
    der = _json(server.cli("dps", "enrollment", "create", "-e", "x509-dev-2", "--at", "x509",
                           "--certificate-path", str(tmp_path / "dev2.der")))
    assert der["attestation"]["x509"]["clientCertificates"]["primary"]["info"]["sha256Thumbprint"] == _sha256(pem2)

    _fails(server.cli("dps", "enrollment", "create", "-e", "x509-other", "--at", "x509", "--cp", str(pem)),
           "CN 'x509-dev-1'", "x509-other")
    _fails(server.cli("dps", "enrollment", "show", "-e", "x509-other"), "does not exist")
    _fails(server.cli("dps", "enrollment", "create", "-e", "x509-none", "--at", "x509"), "--certificate-path")
    _fails(server.cli("dps", "enrollment", "create", "-e", "x509-key", "--at", "x509", "--cp", str(pem), "--pk", KEY_A),
           "--primary-key")
    _fails(server.cli("dps", "enrollment", "create", "-e", "x509-missing", "--at", "x509", "--cp",
                      str(tmp_path / "missing.pem")), "missing.pem")


# ---------------------------------------------------------------- groups


def test_x509_group_on_verified_and_unverified_ca(server, tmp_path):
    ca = _ca(tmp_path, "grp-root")
    up = _json(server.cli("dps", "certificate", "create", "--certificate-name", "grp-root", "--path", str(ca)))
    _fails(server.cli("dps", "enrollment-group", "create", "-e", "grp-x509", "--ca-name", "grp-root"),
           "'grp-root' is not verified")
    code = _json(server.cli("dps", "certificate", "generate-verification-code", "--certificate-name", "grp-root",
                            "--etag", up["etag"]))
    run_openssl("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-keyout", "v.key",
                "-out", "v.csr", "-subj", f"/CN={code['properties']['verificationCode']}", cwd=tmp_path)
    run_openssl("x509", "-req", "-in", "v.csr", "-CA", "grp-root.pem", "-CAkey", "grp-root.key", "-CAcreateserial",
                "-out", "v.pem", "-days", "1", "-sha256", cwd=tmp_path)
    ok = _json(server.cli("dps", "certificate", "verify", "--certificate-name", "grp-root", "--path",
                          str(tmp_path / "v.pem"), "--etag", code["etag"]))
    assert ok["properties"]["isVerified"] is True

    grp = _json(server.cli("dps", "enrollment-group", "create", "-e", "grp-x509", "--ca-name", "grp-root",
                           "--tags", '{"line": "7"}'))
    assert grp["enrollmentGroupId"] == "grp-x509"
    assert grp["attestation"] == {"type": "x509", "x509": {"caReferences": {"primary": "grp-root"}}}
    assert grp["initialTwin"] == {"tags": {"line": "7"}, "properties": {"desired": {}}}
    by_file = _json(server.cli("dps", "enrollment-group", "create", "-e", "grp-x509-file", "--certificate-path", str(ca)))
    assert by_file["attestation"] == {"type": "x509", "x509": {"caReferences": {"primary": "grp-root"}}}
    _fails(server.cli("dps", "enrollment-group", "create", "-e", "grp-x509", "--ca-name", "grp-root"), "already exists")
    with_keys = _json(server.cli("dps", "enrollment-group", "show", "-e", "grp-x509", "--keys"))
    assert with_keys["attestation"] == grp["attestation"]  # an X.509 group has no keys to add
    upd = _json(server.cli("dps", "enrollment-group", "update", "-e", "grp-x509", "--ps", "disabled"))
    assert upd["attestation"] == grp["attestation"] and upd["provisioningStatus"] == "disabled"
    _fails(server.cli("dps", "enrollment-group", "compute-device-key", "--rid", "d1", "-e", "grp-x509"),
           "not symmetricKey")
    _fails(server.cli("dps", "enrollment-group", "create", "-e", "grp-both", "--ca-name", "grp-root", "--pk", KEY_A),
           "not both")
    _fails(server.cli("dps", "enrollment-group", "create", "-e", "grp-nope", "--ca-name", "no-such-ca"),
           "'no-such-ca'", "does not exist")
    table = server.cli("dps", "enrollment-group", "list", "-o", "table")
    assert table.returncode == 0 and "enrollmentGroupId" in table.stdout
    row = next(line for line in table.stdout.splitlines() if " grp-x509 " in line)
    assert "x509" in row and "disabled" in row


def _register(server, registration_id: str, device_key: str) -> dict:
    """Register over the device API with a SAS token signed by ``device_key`` (proves the key is right)."""
    scope = _json(server.cli("info", "-o", "json"))["idScope"]
    token = sas.generate(f"{scope}/registrations/{registration_id}", device_key, key_name="registration")
    with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=str(server.ca_file)),
                      headers={"Authorization": token}, params={"api-version": "2021-06-01"}, timeout=60) as http:
        accepted = http.put(f"/{scope}/registrations/{registration_id}/register", json={"registrationId": registration_id})
        assert accepted.status_code == 202 and accepted.json()["status"] == "assigned", accepted.text
        return accepted.json()


def test_symmetric_group_device_key_and_registrations(server):
    grp = _json(server.cli("dps", "enrollment-group", "create", "-e", "grp-sk", "--pk", KEY_A, "--ih", "default"))
    assert grp["attestation"]["type"] == "symmetricKey"
    default_host = _json(server.cli("dps", "linked-hub", "show", "-n", "default"))["properties"]["hostName"]
    assert grp["iotHubs"] == [default_host]

    expected = _hmac_key(KEY_A, "grp-dev-1")
    local = server.cli("dps", "enrollment-group", "compute-device-key", "--rid", "grp-dev-1", "--key", KEY_A)
    assert local.returncode == 0 and local.stdout == expected + "\n"
    fetched = server.cli("dps", "enrollment-group", "compute-device-key", "--registration-id", "grp-dev-1", "-e", "grp-sk")
    assert fetched.returncode == 0 and fetched.stdout == expected + "\n"
    # a given key needs no connection at all
    offline = {k: v for k, v in server.env.items() if k != "OPENDPS_DATA_DIR"}
    offline["OPENDPS_DATA_DIR"] = "/nonexistent/opendps"
    alone = server.cli("dps", "enrollment-group", "compute-device-key", "--rid", "grp-dev-1", "--symmetric-key", KEY_A,
                       env=offline)
    assert alone.returncode == 0 and alone.stdout == expected + "\n", alone.stderr
    _fails(server.cli("dps", "enrollment-group", "compute-device-key", "--rid", "x"), "exactly one")
    _fails(server.cli("dps", "enrollment-group", "compute-device-key", "--rid", "x", "--key", KEY_A, "-e", "grp-sk"),
           "exactly one")
    _fails(server.cli("dps", "enrollment-group", "compute-device-key", "--rid", "x", "--key", "not base64!"),
           "--key is not valid base64")

    generated = _json(server.cli("dps", "enrollment-group", "create", "-e", "grp-sk-gen"))
    assert generated["attestation"]["type"] == "symmetricKey"
    gen_key = _json(server.cli("dps", "enrollment-group", "show", "-e", "grp-sk-gen", "--show-keys"))[
        "attestation"]["symmetricKey"]["primaryKey"]
    by_id = server.cli("dps", "enrollment-group", "compute-device-key", "--rid", "dev-z", "-e", "grp-sk-gen").stdout
    by_key = server.cli("dps", "enrollment-group", "compute-device-key", "--rid", "dev-z", "--key", gen_key).stdout
    assert by_id == by_key == _hmac_key(gen_key, "dev-z") + "\n"

    result = _register(server, "grp-dev-1", expected)
    assert result["status"] == "assigned", result
    state = _json(server.cli("dps", "registration", "show", "--rid", "grp-dev-1"))
    assert (state["registrationId"], state["status"], state["assignedHub"], state["deviceId"]) == (
        "grp-dev-1", "assigned", default_host, "grp-dev-1")
    listed = _json(server.cli("dps", "registration", "list", "-e", "grp-sk"))
    assert [r["registrationId"] for r in listed] == ["grp-dev-1"]
    assert _json(server.cli("dps", "registration", "list", "--enrollment-id", "grp-sk-gen")) == []
    devices = _json(server.cli("dps", "linked-hub", "device-list", "--hub-name", "default"))
    mine = [d for d in devices if d["deviceId"] == "grp-dev-1"]
    assert len(mine) == 1 and mine[0]["authenticationType"] == "sas" and mine[0]["status"] == "enabled"
    table = server.cli("dps", "linked-hub", "device-list", "-n", "default", "-o", "table")
    assert table.returncode == 0 and "grp-dev-1" in table.stdout

    _fails(server.cli("dps", "registration", "delete", "--rid", "grp-dev-1", "--etag", "stale"), "412")
    assert server.cli("dps", "registration", "delete", "--rid", "grp-dev-1", "--etag", state["etag"]).returncode == 0
    _fails(server.cli("dps", "registration", "show", "--rid", "grp-dev-1"), "'grp-dev-1' does not exist")
    _fails(server.cli("dps", "registration", "list", "-e", "no-such-group"), "'no-such-group' does not exist")


def test_an_empty_group_key_is_refused_offline():
    """`--key ''` is valid base64 of no bytes: a device key was derived from an empty HMAC key and printed, exit 0."""
    from click.testing import CliRunner

    from opendps.cli import main

    result = CliRunner().invoke(main, ["dps", "enrollment-group", "compute-device-key", "--rid", "d1", "--key", ""])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr == "error: --key must not be empty: give the group's base64 key\n"


def test_registration_show_unknown(server):
    _fails(server.cli("dps", "registration", "show", "--registration-id", "never-registered"),
           "registration 'never-registered' does not exist", "404")


# ---------------------------------------------------------------- credential policies


def test_credential_policy_link(server):
    _json(server.cli("adr", "ns", "create", "--name", "enr-ns", "--policy-name", "enr-line"))
    created = _json(server.cli("dps", "enrollment", "create", "-e", "cp-dev", "--at", "symmetricKey",
                               "--credential-policy", "enr-line"))
    assert (created["credentialPolicyName"], created["namespaceName"]) == ("enr-line", "enr-ns")
    with_ns = _json(server.cli("dps", "enrollment-group", "create", "-e", "cp-grp", "--credential-policy", "enr-line",
                               "--namespace", "enr-ns"))
    assert (with_ns["credentialPolicyName"], with_ns["namespaceName"]) == ("enr-line", "enr-ns")

    cas = _json(server.cli("dps", "linked-hub", "certificate-list", "--hub-name", "default"))
    mine = [c for c in cas if c["name"] == "enr-ns-enr-line"]
    assert len(mine) == 1 and mine[0]["properties"]["status"] == "active"
    assert mine[0]["properties"]["enrollments"] == ["cp-dev", "cp-grp"]
    assert mine[0]["properties"]["certificate"].startswith("-----BEGIN CERTIFICATE-----")

    _fails(server.cli("dps", "enrollment", "create", "-e", "cp-bad", "--at", "symmetricKey", "--credential-policy",
                      "no-such-policy"), "credential policy 'no-such-policy'", "does not exist")
    _fails(server.cli("dps", "enrollment", "create", "-e", "cp-bad", "--at", "symmetricKey", "--credential-policy",
                      "enr-line", "--namespace", "other-ns"), "in namespace 'other-ns' does not exist")
    _fails(server.cli("dps", "enrollment", "create", "-e", "cp-bad", "--at", "symmetricKey", "--namespace", "enr-ns"),
           "--namespace")
    _fails(server.cli("dps", "enrollment", "show", "-e", "cp-bad"), "does not exist")
    _fails(server.cli("adr", "ns", "policy", "delete", "--namespace", "enr-ns", "--name", "enr-line"), "409")

    removed = _json(server.cli("dps", "enrollment", "update", "-e", "cp-dev", "--credential-policy", ""))
    assert "credentialPolicyName" not in removed and "namespaceName" not in removed


# ---------------------------------------------------------------- linked hubs


def test_linked_hub_verbs(server):
    host = _service_host(server)
    a = _json(server.cli("dps", "linked-hub", "create", "--hub-name", "lh-a"))
    assert a["name"] == "lh-a"
    assert a["properties"] | {"createdAt": None} == {"hostName": f"lh-a.{host}", "allocationWeight": 1,
                                                      "applyAllocationPolicy": True, "createdAt": None}
    b = _json(server.cli("dps", "linked-hub", "create", "-n", "lh-b", "--hub-host-name", "Hub-B.example.com",
                         "--aw", "5", "--aap", "false"))
    props = b["properties"]
    assert (props["hostName"], props["allocationWeight"], props["applyAllocationPolicy"]) == ("hub-b.example.com", 5, False)
    _fails(server.cli("dps", "linked-hub", "create", "-n", "lh-a"), "'lh-a' already exists", "409")
    _fails(server.cli("dps", "linked-hub", "create", "-n", "lh-c", "--aw", "1001"), "allocationWeight")

    names = [h["name"] for h in _json(server.cli("dps", "linked-hub", "list"))]
    assert {"default", "lh-a", "lh-b"} <= set(names)
    table = server.cli("dps", "linked-hub", "list", "-o", "table")
    assert table.returncode == 0 and "hub-b.example.com" in table.stdout and "hostName" in table.stdout
    assert _json(server.cli("dps", "linked-hub", "show", "-n", "lh-b")) == b
    assert _json(server.cli("dps", "linked-hub", "device-list", "-n", "lh-b")) == []
    assert _json(server.cli("dps", "linked-hub", "certificate-list", "-n", "lh-b")) == []

    user = _json(server.cli("dps", "enrollment", "create", "-e", "hub-user", "--at", "symmetricKey",
                            "--ih", "lh-a hub-b.example.com"))
    assert user["iotHubs"] == [f"lh-a.{host}", "hub-b.example.com"]
    _fails(server.cli("dps", "linked-hub", "delete", "-n", "lh-a"), "'lh-a' is used by enrollment(s) hub-user", "409")
    moved = _json(server.cli("dps", "enrollment", "update", "-e", "hub-user", "--ih", "lh-b,default"))
    default_host = _json(server.cli("dps", "linked-hub", "show", "-n", "default"))["properties"]["hostName"]
    assert moved["iotHubs"] == ["hub-b.example.com", default_host]
    _fails(server.cli("dps", "enrollment", "update", "-e", "hub-user", "--ap", "static"), "exactly one hub")
    _fails(server.cli("dps", "enrollment", "update", "-e", "hub-user", "--ih", "no-such-hub"), "'no-such-hub'")

    _fails(server.cli("dps", "linked-hub", "delete", "-n", "lh-a", "--etag", b["etag"]), "412")
    assert server.cli("dps", "linked-hub", "delete", "-n", "lh-a", "--etag", a["etag"]).returncode == 0
    _fails(server.cli("dps", "linked-hub", "show", "-n", "lh-a"), "'lh-a' does not exist")
    _fails(server.cli("dps", "linked-hub", "device-list", "-n", "lh-a"), "'lh-a' does not exist")


def test_registration_list_group_id_is_case_insensitive(server):
    _json(server.cli("dps", "enrollment-group", "create", "-e", "grp-case", "--pk", KEY_B, "--ih", "default"))
    assert _register(server, "case-dev-1", _hmac_key(KEY_B, "case-dev-1"))["status"] == "assigned"
    assert [r["registrationId"] for r in _json(server.cli("dps", "registration", "list", "-e", "grp-case"))] == [
        "case-dev-1"]
    assert _json(server.cli("dps", "enrollment-group", "show", "-e", "GRP-CASE"))["enrollmentGroupId"] == "grp-case"
    listed = _json(server.cli("dps", "registration", "list", "-e", "GRP-CASE"))
    assert [r["registrationId"] for r in listed] == ["case-dev-1"]


def test_linked_hub_non_boolean_apply_allocation_policy_is_400(server):
    client = _client(server)
    try:
        with pytest.raises(ApiError) as err:
            client.request("PUT", "/linkedHubs/lh-badbool", json={"properties": {"applyAllocationPolicy": "no"}})
    finally:
        client.close()
    assert err.value.status == 400 and "applyAllocationPolicy" in err.value.format_message()
