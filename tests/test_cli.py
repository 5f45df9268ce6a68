"""The az-style CLI as a client of a real server started by the test (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import yaml
from tests.conftest import run_openssl
from tests.test_mqtt_hub import Client as Device
from tests.test_mqtt_hub import hub_username

from opendps.transport import sas

SERVER_STORES = ("sqlite",)  # the CLI/SDK/front end is the subject, not the store (tests/conftest.py)


def _json(proc) -> object:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_connection_string_show_matches_info(server):
    out = _json(server.cli("dps", "connection-string", "show"))
    assert out["connectionString"] == server.connection_string


def test_adr_namespace_and_policy_verbs(server, tmp_path):
    ns = _json(server.cli("adr", "ns", "create", "--name", "cli-ns", "--policy-name", "line-a",
                          "--cert-validity-days", "14"))
    assert ns["name"] == "cli-ns" and ns["properties"]["policies"] == ["line-a"]
    assert [n["name"] for n in _json(server.cli("adr", "ns", "list")) if n["name"] == "cli-ns"] == ["cli-ns"]
    assert _json(server.cli("adr", "ns", "show", "--name", "cli-ns"))["etag"] == ns["etag"]

    pem = server.cli("adr", "ns", "credential", "show", "--namespace", "cli-ns", "--pem")
    assert pem.returncode == 0 and pem.stdout.startswith("-----BEGIN CERTIFICATE-----")
    (tmp_path / "root.pem").write_text(pem.stdout)

    pol = _json(server.cli("adr", "ns", "policy", "show", "--namespace", "cli-ns", "--name", "line-a"))
    assert pol["properties"]["certificate"]["leafCertificateConfiguration"]["validityPeriodInDays"] == 14
    (tmp_path / "ica.pem").write_text(
        pol["properties"]["certificate"]["certificateAuthorityConfiguration"]["certificate"])
    run_openssl("verify", "-CAfile", str(tmp_path / "root.pem"), str(tmp_path / "ica.pem"))

    upd = _json(server.cli("adr", "ns", "policy", "update", "--namespace", "cli-ns", "--name", "line-a",
                           "--cert-validity-days", "60"))
    assert upd["properties"]["certificate"]["leafCertificateConfiguration"]["validityPeriodInDays"] == 60
    created = _json(server.cli("adr", "ns", "policy", "create", "--namespace", "cli-ns", "--name", "line-b",
                               "--cert-validity-days", "1"))
    assert created["name"] == "line-b"
    table = server.cli("adr", "ns", "policy", "list", "--namespace", "cli-ns", "-o", "table")
    assert table.returncode == 0 and "line-a" in table.stdout and "line-b" in table.stdout

    for args, words in [
        (["adr", "ns", "policy", "create", "--namespace", "cli-ns", "--name", "line-b"], "already exists"),
        (["adr", "ns", "policy", "update", "--namespace", "cli-ns", "--name", "line-a", "--cert-validity-days",
          "91"], "--cert-validity-days"),
        (["adr", "ns", "policy", "show", "--namespace", "cli-ns", "--name", "nope"], "nope"),
        (["adr", "ns", "create", "--name", "cli-ns"], "already exists"),
    ]:
        r = server.cli(*args)
        assert r.returncode != 0, args
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr

    assert server.cli("adr", "ns", "policy", "delete", "--namespace", "cli-ns", "--name", "line-b").returncode == 0
    assert server.cli("adr", "ns", "delete", "--name", "cli-ns").returncode == 0
    assert server.cli("adr", "ns", "show", "--name", "cli-ns").returncode != 0


def test_dps_certificate_proof_of_possession_with_cli(server, tmp_path):
    run_openssl("req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384",
                "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=cli-root",
                "-addext", "basicConstraints=critical,CA:true,pathlen:1", "-addext", "keyUsage=critical,keyCertSign",
                cwd=tmp_path)
    up = _json(server.cli("dps", "certificate", "create", "--certificate-name", "cli-root", "--path",
                          str(tmp_path / "ca.pem")))
    assert up["properties"]["isVerified"] is False
    code = _json(server.cli("dps", "certificate", "generate-verification-code", "--certificate-name", "cli-root",
                            "--etag", up["etag"]))
    vcode = code["properties"]["verificationCode"]
    run_openssl("req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-keyout", "v.key",
                "-out", "v.csr", "-subj", f"/CN={vcode}", cwd=tmp_path)
    run_openssl("x509", "-req", "-in", "v.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", "v.pem", "-days", "1", "-sha256", cwd=tmp_path)
    stale = server.cli("dps", "certificate", "verify", "--certificate-name", "cli-root", "--path",
                       str(tmp_path / "v.pem"), "--etag", up["etag"])
    assert stale.returncode != 0 and "412" in stale.stderr
    ok = _json(server.cli("dps", "certificate", "verify", "--certificate-name", "cli-root", "--path",
                          str(tmp_path / "v.pem"), "--etag", code["etag"]))
    assert ok["properties"]["isVerified"] is True
    listed = server.cli("dps", "certificate", "list", "-o", "table")
    assert listed.returncode == 0 and "cli-root" in listed.stdout
    missing = server.cli("dps", "certificate", "create", "--certificate-name", "x", "--path",
                         str(tmp_path / "missing.pem"))
    assert missing.returncode != 0 and "missing.pem" in missing.stderr
    assert server.cli("dps", "certificate", "delete", "--certificate-name", "cli-root", "--etag",
                      ok["etag"]).returncode == 0


def test_login_flag_and_env_connection(server, tmp_path):
    env = {k: v for k, v in server.env.items() if k != "OPENDPS_DATA_DIR"}
    env["OPENDPS_DATA_DIR"] = str(tmp_path / "nowhere")
    def run(*args: str, extra: dict | None = None):
        return server.cli(*args, env={**env, **(extra or {})})

    r = run("adr", "ns", "list")
    assert r.returncode != 0 and "no connection" in r.stderr
    r = run("adr", "ns", "list", "--login", server.connection_string, "--ca-file", str(server.ca_file))
    assert r.returncode == 0, r.stderr
    r = run("adr", "ns", "list", extra={"OPENDPS_CONNECTION_STRING": server.connection_string,
                                        "OPENDPS_CA_FILE": str(server.ca_file)})
    assert r.returncode == 0, r.stderr
    bad = server.connection_string.split(";SharedAccessKey=")[0] + ";SharedAccessKey=QUJDRA=="
    r = run("adr", "ns", "list", "--login", bad, "--ca-file", str(server.ca_file))
    assert r.returncode != 0 and "401" in r.stderr


def _one_error_line(proc, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_output_formats_and_query_as_az(server):
    """Issue 12.18: -o tsv / yaml / none and --query (JMESPath) on every verb, as az has them."""
    for name in ("fmt-a", "fmt-b"):
        assert server.cli("adr", "ns", "create", "--name", name, "--policy-name", f"{name}-p").returncode == 0
    listed = _json(server.cli("adr", "ns", "list"))
    names = server.cli("adr", "ns", "list", "--query", "[].name", "-o", "tsv")
    assert names.returncode == 0 and names.stdout.splitlines() == [n["name"] for n in listed]
    one = server.cli("adr", "ns", "show", "--name", "fmt-a", "--query", "{name: name, etag: etag}", "-o", "tsv")
    assert one.stdout == f"fmt-a\t{listed[[n['name'] for n in listed].index('fmt-a')]['etag']}\n"
    as_yaml = server.cli("adr", "ns", "show", "--name", "fmt-b", "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout) == _json(server.cli("adr", "ns", "show", "--name", "fmt-b"))
    filtered = _json(server.cli("adr", "ns", "list", "--query", "[?starts_with(name, 'fmt-')].properties.policies[0]"))
    assert filtered == ["fmt-a-p", "fmt-b-p"]
    table = server.cli("adr", "ns", "list", "--query", "[].{ns: name}", "-o", "table")
    assert table.returncode == 0 and " ns " in table.stdout and "fmt-b" in table.stdout
    quiet = server.cli("adr", "ns", "show", "--name", "fmt-a", "-o", "none")
    assert quiet.returncode == 0 and quiet.stdout == ""
    info = server.cli("info", "--query", "idScope", "-o", "tsv")
    assert info.stdout.strip() == server.id_scope

    _one_error_line(server.cli("adr", "ns", "list", "--query", "[?name=="), "--query", "JMESPath")
    _one_error_line(server.cli("adr", "ns", "list", "--query", "length(@[0].name) + `1`"), "--query")
    _one_error_line(server.cli("adr", "ns", "list", "--query", "abs(@)"), "--query failed")
    _one_error_line(server.cli("adr", "ns", "list", "-o", "xml"), "'xml' is not one of")


def test_policy_rotate_and_namespace_devices(server):
    ns = _json(server.cli("adr", "ns", "create", "--name", "rot-ns", "--policy-name", "rot-p"))
    before = _json(server.cli("adr", "ns", "policy", "show", "--namespace", "rot-ns", "--name", "rot-p"))
    rotated = _json(server.cli("adr", "ns", "policy", "rotate", "--namespace", "rot-ns", "--name", "rot-p",
                               "--etag", before["etag"]))
    ca = ["properties", "certificate", "certificateAuthorityConfiguration", "certificate"]

    def dig(doc: dict) -> str:
        for key in ca:
            doc = doc[key]
        return doc  # type: ignore[return-value]

    assert dig(rotated) != dig(before) and rotated["etag"] != before["etag"]
    assert dig(_json(server.cli("adr", "ns", "policy", "show", "--namespace", "rot-ns", "--name", "rot-p"))) == dig(rotated)
    _one_error_line(server.cli("adr", "ns", "policy", "rotate", "--namespace", "rot-ns", "--name", "rot-p",
                               "--etag", before["etag"]), "ETag", "412")
    _one_error_line(server.cli("adr", "ns", "policy", "rotate", "--namespace", "rot-ns", "--name", "nope"), "nope")
    assert _json(server.cli("adr", "ns", "device", "list", "--namespace", "rot-ns")) == []
    _one_error_line(server.cli("adr", "ns", "device", "show", "--namespace", "rot-ns", "-d", "ghost"), "ghost")
    _one_error_line(server.cli("adr", "ns", "device", "list", "--namespace", "no-such-ns"), "no-such-ns")
    assert ns["name"] == "rot-ns"
    # issue 17: the policy's issuing CAs; the retired one revoked; settings; a policy's certificates revoked
    listed = _json(server.cli("adr", "ns", "policy", "issuing-ca", "list", "--namespace", "rot-ns", "--name", "rot-p"))
    assert [c["status"] for c in listed] == ["active", "retired"]
    _one_error_line(server.cli("adr", "ns", "policy", "issuing-ca", "revoke", "--namespace", "rot-ns", "--name",
                               "rot-p", "--ca", listed[0]["serialNumber"]), "rotate", "409")
    done = _json(server.cli("adr", "ns", "policy", "issuing-ca", "revoke", "--namespace", "rot-ns", "--name", "rot-p",
                            "--ca", listed[1]["serialNumber"], "--reason", "keyCompromise"))
    assert (done["issuingCa"]["status"], done["revokedCertificateCount"]) == ("revoked", 0)
    updated = _json(server.cli("adr", "ns", "policy", "update", "--namespace", "rot-ns", "--name", "rot-p",
                               "--keep-superseded", "--crl-validity-hours", "12"))
    assert updated["properties"]["certificate"]["leafCertificateConfiguration"]["revokeSupersededCertificates"] is False
    assert updated["properties"]["certificate"]["certificateAuthorityConfiguration"]["crlValidityInHours"] == 12
    assert _json(server.cli("certificate", "revoke", "--policy", "rot-p", "--namespace", "rot-ns")) == {
        "revokedCertificateCount": 0}
    _one_error_line(server.cli("certificate", "revoke", "--policy", "rot-p"), "--namespace")
    _one_error_line(server.cli("certificate", "revoke", "--policy", "rot-p", "--device-id", "x"), "exactly one")


def test_device_identity_connection_string_and_renew_key(server):
    created = _json(server.cli("hub", "device-identity", "create", "-d", "cs-dev"))
    keys = created["authentication"]["symmetricKey"]

    def connection_string(*extra: str) -> dict[str, str]:
        shown = _json(server.cli("hub", "device-identity", "connection-string", "show", "-d", "cs-dev", *extra))
        return dict(part.split("=", 1) for part in shown["connectionString"].split(";"))

    def connects(key: str) -> bool:
        device = Device(server, "cs-dev", hub_username("cs-dev"), password=sas.generate("localhost/devices/cs-dev", key))
        device.c.disconnect()
        device.c.loop_stop()
        return device.rc == 0

    primary = connection_string()
    assert primary == {"HostName": "localhost", "DeviceId": "cs-dev", "SharedAccessKey": keys["primaryKey"]}
    assert connection_string("--key-type", "secondary")["SharedAccessKey"] == keys["secondaryKey"]
    assert connects(primary["SharedAccessKey"])

    renewed = _json(server.cli("hub", "device-identity", "renew-key", "-d", "cs-dev", "--key-type", "primary"))
    new = renewed["authentication"]["symmetricKey"]
    assert new["primaryKey"] != keys["primaryKey"] and new["secondaryKey"] == keys["secondaryKey"]
    assert connection_string()["SharedAccessKey"] == new["primaryKey"]
    assert not connects(keys["primaryKey"]) and connects(new["primaryKey"])
    swapped = _json(server.cli("hub", "device-identity", "renew-key", "-d", "cs-dev", "--kt", "swap"))
    assert swapped["authentication"]["symmetricKey"] == {"primaryKey": new["secondaryKey"],
                                                         "secondaryKey": new["primaryKey"]}
    both = _json(server.cli("hub", "device-identity", "renew-key", "-d", "cs-dev", "--kt", "both"))
    assert set(both["authentication"]["symmetricKey"].values()).isdisjoint(new.values())
    _one_error_line(server.cli("hub", "device-identity", "renew-key", "-d", "cs-dev", "--kt", "primary", "--etag",
                               created["etag"]), "ETag", "412")

    assert server.cli("hub", "device-identity", "create", "-d", "cs-ca", "--am", "x509_ca").returncode == 0
    x509 = _json(server.cli("hub", "device-identity", "connection-string", "show", "-d", "cs-ca"))
    assert x509["connectionString"] == "HostName=localhost;DeviceId=cs-ca;x509=true"
    _one_error_line(server.cli("hub", "device-identity", "renew-key", "-d", "cs-ca", "--kt", "primary"),
                    "not symmetric keys")
    _one_error_line(server.cli("hub", "device-identity", "connection-string", "show", "-d", "ghost"), "ghost")


def test_dps_policy_verbs_as_az(server):
    """Issue 12.18: az iot dps policy create|list|show|update|delete (+ renew-key), and the policy's connection
    string working for exactly what its rights allow."""
    created = _json(server.cli("dps", "policy", "create", "--pn", "cli-pol", "-r", "EnrollmentRead",
                               "RegistrationStatusRead"))  # az's space-separated list
    assert created == {"keyName": "cli-pol", "rights": "EnrollmentRead, RegistrationStatusRead"}
    assert _json(server.cli("dps", "policy", "show", "--policy-name", "cli-pol")) == created
    listed = _json(server.cli("dps", "policy", "list"))
    assert [p["keyName"] for p in listed][:1] == ["provisioningserviceowner"] and created in listed
    table = server.cli("dps", "policy", "list", "-o", "table")
    assert table.returncode == 0 and "cli-pol" in table.stdout and "EnrollmentRead, RegistrationStatusRead" in table.stdout

    conn = _json(server.cli("dps", "connection-string", "show", "--pn", "cli-pol"))["connectionString"]
    assert ";SharedAccessKeyName=cli-pol;SharedAccessKey=" in conn
    second = _json(server.cli("dps", "connection-string", "show", "--pn", "cli-pol", "--key-type", "secondary"))
    assert second["connectionString"] != conn
    assert server.cli("dps", "enrollment", "create", "--enrollment-id", "cli-pol-dev", "--attestation-type",
                      "symmetrickey").returncode == 0
    assert "cli-pol-dev" in [e["registrationId"] for e in _json(server.cli("dps", "enrollment", "list",
                                                                           "--login", conn))]
    _one_error_line(server.cli("dps", "enrollment", "delete", "--enrollment-id", "cli-pol-dev", "--login", conn),
                    "EnrollmentWrite", "HTTP 401")
    _one_error_line(server.cli("adr", "ns", "list", "--login", conn), "ServiceConfig", "HTTP 401")
    assert _json(server.cli("dps", "connection-string", "show", "--login", conn))["connectionString"] == conn

    updated = _json(server.cli("dps", "policy", "update", "--pn", "cli-pol", "--rights", "EnrollmentWrite"))
    assert updated == {"keyName": "cli-pol", "rights": "EnrollmentWrite"}
    renewed = _json(server.cli("dps", "policy", "renew-key", "--pn", "cli-pol", "--rk", "primary"))
    assert renewed["keyName"] == "cli-pol" and renewed["primaryKey"] not in conn
    _one_error_line(server.cli("dps", "enrollment", "list", "--login", conn), "HTTP 401")  # the old key: refused
    fresh = _json(server.cli("dps", "connection-string", "show", "--pn", "cli-pol"))["connectionString"]
    assert fresh.endswith(f"SharedAccessKey={renewed['primaryKey']}")
    assert server.cli("dps", "enrollment", "delete", "--enrollment-id", "cli-pol-dev", "--login", fresh
                      ).returncode == 0  # EnrollmentWrite now
    assert _json(server.cli("dps", "policy", "update", "--pn", "cli-pol", "--secondary-key",
                            renewed["primaryKey"]))["rights"] == "EnrollmentWrite"  # rights kept

    for args, words in [
        (["dps", "policy", "create", "--pn", "cli-bad", "-r", "ServiceConfig", "Superuser"], "unknown right 'Superuser'"),
        (["dps", "policy", "create", "--pn", "cli-bad"], "--rights is required"),
        (["dps", "policy", "create", "--pn", "cli-pol", "-r", "ServiceConfig"], "already exists"),
        (["dps", "policy", "create", "--pn", "cli bad", "-r", "ServiceConfig"], "is invalid"),
        (["dps", "policy", "update", "--pn", "cli-pol"], "nothing to update"),
        (["dps", "policy", "update", "--pn", "cli-nope", "-r", "ServiceConfig"], "no access policy named 'cli-nope'"),
        (["dps", "policy", "show", "--pn", "cli-nope"], "HTTP 404"),
        (["dps", "policy", "delete", "--pn", "provisioningserviceowner"], "cannot be deleted"),
        (["dps", "policy", "renew-key", "--pn", "cli-pol", "--rk", "tertiary"], "tertiary"),
        (["dps", "connection-string", "show", "--pn", "cli-nope"], "HTTP 404"),
    ]:
        _one_error_line(server.cli(*args), words)

    assert server.cli("dps", "policy", "delete", "--pn", "cli-pol").returncode == 0
    _one_error_line(server.cli("dps", "enrollment", "list", "--login", fresh), "not an access policy", "HTTP 401")
    _one_error_line(server.cli("dps", "policy", "show", "--pn", "cli-pol"), "HTTP 404")


def test_audit_list_and_verify_and_tampering_found_by_both(server):
    """Issue 17.4 through the real CLI: an enrollment change is listed with its actor, ``audit verify`` passes (via the
    server and on the database itself), an UPDATE done with raw SQL makes both fail naming the entry."""
    from sqlalchemy import create_engine, text

    group = _json(server.cli("dps", "enrollment-group", "create", "-e", "audit-cli-group"))
    listed = _json(server.cli("audit", "list", "--action", "enrollment", "--since", "1h"))
    [entry] = [e for e in listed if e["subject"] == "audit-cli-group"]
    assert entry["action"] == "enrollment.created" and entry["actor"] == "provisioningserviceowner"
    assert entry["details"]["etag"] == group["etag"] and "primaryKey" not in json.dumps(listed)
    table = server.cli("audit", "list", "--action", "enrollment.created", "--top", "3", "-o", "table")
    assert table.returncode == 0 and "audit-cli-group" in table.stdout
    for args in (("audit", "verify"), ("audit", "verify", "--local")):
        ok = server.cli(*args)
        assert ok.returncode == 0 and ok.stdout.startswith("audit log intact: "), (args, ok.stderr)
    seq = entry["sequenceNumber"]
    engine = create_engine(server.db_url)
    try:
        with engine.begin() as c:
            original = c.execute(text("SELECT details FROM audit_log WHERE seq = :s"), {"s": seq}).scalar_one()
            c.execute(text("UPDATE audit_log SET details = :d WHERE seq = :s"),
                      {"d": original.replace('"symmetricKey"', '"x509"'), "s": seq})
        for args in (("audit", "verify"), ("audit", "verify", "--db", server.db_url)):
            _one_error_line(server.cli(*args), f"audit log broken at entry {seq}:", "does not match its hash")
        as_json = server.cli("audit", "verify", "-o", "json")
        assert as_json.returncode == 1 and json.loads(as_json.stdout)["firstBadEntry"] == seq
    finally:
        with engine.begin() as c:
            c.execute(text("UPDATE audit_log SET details = :d WHERE seq = :s"), {"d": original, "s": seq})
        engine.dispose()
    assert server.cli("audit", "verify").returncode == 0
