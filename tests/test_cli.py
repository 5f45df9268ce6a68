"""The az-style CLI as a client of a real server started by the test (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

from tests.conftest import run_openssl


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
