"""The ``opendps`` command under bad input and a hostile environment: every failure one ``error:`` line, non-zero.

In-process (click's CliRunner, :func:`tests.conftest.invoke_cli`) wherever the behaviour does not depend on a process
of its own; the service is an ``httpx.MockTransport`` answering what a foreign or broken server would.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from tests.conftest import invoke_cli

from opendps.cli import _client as client_mod
from opendps.cli import main

KEY = base64.b64encode(b"k" * 32).decode()
LOGIN = f"HostName=localhost:8443;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey={KEY}"


def _one_error_line(result, *words: str) -> str:
    """Exit 1, exactly one ``error:`` line on stderr (no traceback) holding ``words``."""
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """``cli(*args)``: the command tree in this process, in an empty directory, without OPENDPS_* settings."""
    for name in [n for n in os.environ if n.startswith("OPENDPS_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str):
        return CliRunner().invoke(main, list(args), prog_name="opendps", catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One initialised data directory (SQLite); tests copy it before changing it."""
    d = tmp_path_factory.mktemp("edges") / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENDPS_")}
    proc = invoke_cli(env, "init", "--data-dir", str(d))
    assert proc.returncode == 0, proc.stderr
    return d


# ---------------------------------------------------------------- the data directory


def test_a_master_key_file_of_random_bytes_is_one_line(cli, data_dir: Path, tmp_path: Path) -> None:
    """It was a UnicodeDecodeError traceback (read_text of a binary file) from every verb opening the directory."""
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    (copy / "master.key").write_bytes(bytes([0xD7, 0xFF, 0x00, 0x80]) * 8)
    for verb in (["info", "-o", "none"], ["init"], ["dps", "policy", "list"]):
        _one_error_line(cli(*verb, "--data-dir", str(copy)), f"master key from {copy / 'master.key'}",
                        "is not valid base64")


def test_db_upgrade_of_a_missing_data_directory_names_it(cli, tmp_path: Path) -> None:
    """It said "migration failed: unable to open database file" (SQLite's words for the file in a missing directory)."""
    _one_error_line(cli("db", "upgrade", "--data-dir", str(tmp_path / "nowhere")),
                    f"data directory {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_audit_verify_local_on_a_broken_database_is_the_driver_s_line(cli, tmp_path: Path) -> None:
    """Not SQLAlchemy's "(sqlite3.DatabaseError) ... (Background on this error at: https://sqlalche.me/...)"."""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    line = _one_error_line(cli("audit", "verify", "--local", "--db", f"sqlite:///{garbage}"),
                           "cannot read the database", "file is not a database")
    assert "sqlalche.me" not in line and "(sqlite3." not in line


def test_audit_verify_local_on_an_audit_log_not_as_opendps_made_it_is_one_line(cli, tmp_path: Path) -> None:
    """A column dropped or renamed (by hand, or a tamperer) was a traceback: "no such column: audit_log.created_at"."""
    import sqlite3

    db = tmp_path / "odd.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE audit_log (seq INTEGER PRIMARY KEY, hash TEXT)")
        c.execute("INSERT INTO audit_log VALUES (1, 'x')")
    c.close()
    _one_error_line(cli("audit", "verify", "--db", f"sqlite:///{db}"),
                    f"cannot check the audit log in sqlite:///{db}", "no such column: audit_log.")


def test_a_metrics_host_that_cannot_be_bound_is_named(monkeypatch, capsys, tmp_path: Path) -> None:
    """The line blamed --host (127.0.0.1) for the metrics listener's own bind address."""
    import opendps.server

    def refuse(_instance: object) -> None:
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(opendps.server, "run", refuse)
    with pytest.raises(SystemExit) as exited:
        main.main(["serve", "--data-dir", str(tmp_path / "d"), "--db", f"sqlite:///{tmp_path / 'x.db'}",
                   "--metrics-host", "metrics.invalid", "--metrics-port", "9999"])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "metrics port 9999 on metrics.invalid" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- a server answering what this CLI cannot read


@pytest.fixture
def answering(monkeypatch: pytest.MonkeyPatch, cli):
    """``answering(body)(*args)``: run a verb against a server answering every request 200 with ``body``."""

    original = client_mod.Client.__init__

    def server(body: bytes):
        def init(self, connection, *, timeout: float = 30.0, transport=None) -> None:
            original(self, connection, timeout=timeout,
                     transport=httpx.MockTransport(lambda _request: httpx.Response(
                         200, content=body, headers={"Content-Type": "application/json"})))

        monkeypatch.setattr(client_mod.Client, "__init__", init)

        def invoke(*args: str):
            return cli(*args, "--login", LOGIN)

        return invoke

    return server


VERBS = [
    ["adr", "ns", "list"],
    ["adr", "ns", "credential", "show", "--ns", "ns1", "--pem"],
    ["adr", "ns", "policy", "update", "--ns", "ns1", "-n", "p1", "--cert-validity-days", "5"],
    ["dps", "policy", "list"],
    ["dps", "enrollment", "show", "-e", "e1", "--show-keys"],
    ["dps", "enrollment", "update", "-e", "e1", "--ps", "disabled"],
    ["dps", "enrollment-group", "update", "-e", "g1", "--ps", "disabled"],
    ["dps", "enrollment-group", "compute-device-key", "--rid", "d1", "-e", "g1"],
    ["hub", "device-identity", "update", "-d", "d1", "--sta", "disabled"],
    ["hub", "device-identity", "connection-string", "show", "-d", "d1"],
    ["hub", "device-identity", "renew-key", "-d", "d1", "--kt", "primary"],
    ["certificate", "list"],
    ["audit", "list"],
    ["audit", "verify"],
    ["status"],
]


@pytest.mark.parametrize("body", [b"[]", b'"text"', b'{"value": 5}', b'{"properties": 5, "etag": 5, "value": {}}', b""],
                         ids=["list", "string", "value-not-a-list", "fields-of-other-types", "empty"])
@pytest.mark.parametrize("verb", VERBS, ids=[" ".join(v[:3]) for v in VERBS])
def test_an_answer_of_another_shape_is_one_line_naming_the_request(answering, verb: list[str], body: bytes) -> None:
    """A proxy, another version or a foreign service answering JSON of another shape was a traceback
    (AttributeError: 'list' object has no attribute 'get', TypeError: 'int' object is not iterable, ...)."""
    result = answering(body)(*verb)
    if result.exit_code == 0:  # an answer this verb can print as it is (e.g. an empty list) is no error
        return
    line = _one_error_line(result)
    if "answered with JSON this opendps cannot read" in line:
        assert "https://localhost:8443/" in line and "is it an opendps server of this version?" in line


def test_every_shape_case_above_fails_somewhere(answering) -> None:
    """The parametrised test above must see the new line, not only verbs that cope: these all broke before."""
    for verb, body in ((VERBS[2], b"[]"), (VERBS[3], b'{"value": 5}'), (VERBS[12], b'"text"'), (VERBS[4], b"")):
        line = _one_error_line(answering(body)(*verb))
        assert "answered with JSON this opendps cannot read" in line, line


def test_a_bug_with_no_server_answer_is_not_hidden(monkeypatch, cli) -> None:
    """The shape rule applies only after a server answered: a TypeError of the CLI's own stays a traceback."""
    def broken(*_args: object, **_kwargs: object) -> None:
        raise TypeError("a bug of the CLI")

    from opendps.transport import sas

    monkeypatch.setattr(sas, "derive_device_key", broken)
    with pytest.raises(TypeError, match="a bug of the CLI"):
        cli("dps", "enrollment-group", "compute-device-key", "--rid", "d1", "--key", KEY)


# ---------------------------------------------------------------- files to send


def test_a_file_too_large_to_send_is_refused_before_reading_it_all(answering, tmp_path: Path) -> None:
    """/dev/zero (or a multi-GB file named by mistake) was read until memory ran out."""
    run = answering(b"{}")
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (client_mod.MAX_FILE_BYTES + 1))
    _one_error_line(run("dps", "certificate", "create", "-n", "c1", "-p", "/dev/zero"),
                    "certificate file /dev/zero is larger than 1024 KB")
    _one_error_line(run("dps", "enrollment", "create", "-e", "e1", "--at", "x509", "--cp", str(big)),
                    f"certificate file {big} is larger than 1024 KB")
    _one_error_line(run("hub", "c2d-message", "send", "-d", "d1", "--dfp", "/dev/zero"),
                    "--data-file-path /dev/zero is larger than 1024 KB")
    _one_error_line(run("hub", "c2d-message", "send", "-d", "d1", "--dfp", str(tmp_path / "none")),
                    f"cannot read --data-file-path {tmp_path / 'none'}: No such file or directory")


# ---------------------------------------------------------------- device and bootstrap ids


@pytest.mark.parametrize("rid", ["", "a" * 65, "a" * 200])
def test_a_registration_id_that_cannot_be_a_csr_cn_is_one_line(cli, rid: str, tmp_path: Path) -> None:
    """provision: a ValueError traceback from the CSR builder; run: retried forever (exit 0 after --duration)."""
    common = ["--rid", rid, "--symmetric-key", KEY, "--id-scope", "0ne00000000", "--store-dir", str(tmp_path / "s")]
    _one_error_line(cli("device", "provision", *common), "cannot be a CSR's common name", f"{len(rid)} characters")
    _one_error_line(cli("device", "run", *common, "--duration", "1"), "cannot be a CSR's common name")
    assert not (tmp_path / "s").exists()


def test_a_simulate_prefix_making_ids_too_long_for_a_cn_is_one_line(cli) -> None:
    _one_error_line(cli("device", "simulate", "-n", "11", "--group-key", KEY, "--id-scope", "0ne00000000",
                        "--prefix", "p" * 62), f"registration id (from --prefix) '{'p' * 62}-10'", "65 characters")


@pytest.mark.parametrize("content", [b"", b"not a certificate\n", os.urandom(512)], ids=["empty", "text", "binary"])
def test_a_ca_file_without_certificates_is_one_line_naming_it(cli, tmp_path: Path, content: bytes) -> None:
    """run retried it forever and exited 0 after --duration; simulate did not say which file."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    common = ["--id-scope", "0ne00000000", "--ca-file", str(ca)]
    for verb in (["device", "provision", "--rid", "d1", "--symmetric-key", KEY],
                 ["device", "run", "--rid", "d1", "--symmetric-key", KEY, "--duration", "1"],
                 ["device", "simulate", "-n", "1", "--group-key", KEY]):
        _one_error_line(cli(*verb, *common), f"CA file {ca} cannot be used", "PEM certificates")


def test_bootstrap_refuses_an_id_too_long_for_its_ca_names_before_writing(cli, tmp_path: Path) -> None:
    """'<id>-intermediate' is a CN too: a 52-character id was a ValueError traceback."""
    certs = tmp_path / "certs"
    _one_error_line(cli("bootstrap", "--rid", "b" * 52, "--cert-dir", str(certs), "--skip-upload"),
                    "--registration-id is 52 characters", "use at most 51")
    assert not certs.exists()


def test_compute_device_key_refuses_an_id_no_device_can_register_with(cli) -> None:
    """--rid '' printed a key and exited 0."""
    for rid in ("", "a b"):
        result = cli("dps", "enrollment-group", "compute-device-key", "--rid", rid, "--key", KEY)
        _one_error_line(result, f"--registration-id {rid!r} is invalid")
        assert result.stdout == ""


def test_the_quickstart_tpm_device_silences_the_tss_libraries(monkeypatch, tmp_path: Path) -> None:
    """A passing quickstart printed the TSS libraries' WARNING/ERROR lines (a fresh swtpm has no EK certificate)."""
    pytest.importorskip("tpm2_pytss")
    from opendps.cli import quickstart
    from opendps.device import swtpm

    monkeypatch.delenv("TSS2_LOG", raising=False)
    seen: list[str | None] = []

    @contextlib.contextmanager
    def no_swtpm(_work: Path):
        seen.append(os.environ.get("TSS2_LOG"))
        raise RuntimeError("no swtpm in this test")
        yield ""  # pragma: no cover

    monkeypatch.setattr(quickstart, "tpm_missing", lambda: None)
    monkeypatch.setattr(swtpm, "running_swtpm", no_swtpm)
    run = quickstart.Run(quiet=True)
    with contextlib.ExitStack() as stack, contextlib.suppress(quickstart._Stop):  # the step fails, the flow stops
        quickstart.tpm_device(run, object(), stack, tmp_path, "qs-tpm", {})  # type: ignore[arg-type]
    assert seen == ["all+none"]
    assert [(step.name, step.ok) for step in run.steps] == [("software TPM", False)]


def test_json_error_lines_hold_no_secret(answering) -> None:
    """The shape line names the request, never the SAS token or key it was signed with."""
    line = _one_error_line(answering(b"[]")(*VERBS[5]))
    assert KEY not in line and "SharedAccessSignature" not in line


def test_a_query_failing_on_a_large_result_is_one_short_line(answering) -> None:
    """jmespath's message quotes the whole value it could not use: an enrollment, a twin, kilobytes on one line."""
    body = json.dumps({"value": [{"name": "n" * 5000, "x": 1}, {"name": "m", "x": 2}]}).encode()
    line = _one_error_line(answering(body)("adr", "ns", "list", "--query", "sort_by(@, &foo)"), "--query failed")
    assert len(line) < 400
